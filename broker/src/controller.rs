//! The controller API over a consensus node, the liveness loop that fences silent brokers, and
//! the broker agent that registers and heartbeats.
//!
//! Heartbeats are records in the metadata log (tiny, one every `heartbeat_interval` per broker),
//! so they reach the consensus leader through the node handle's forwarding from any node, and
//! the unfence decision is part of the deterministic apply. Time is only ever read by the
//! liveness loop of the current leader: it notes when each broker's last heartbeat offset last
//! moved and proposes `FenceBroker` once that is older than the session timeout. A node that
//! becomes leader starts every broker's timer afresh, so a failover never fences everyone.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{Consensus, ConsensusError};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::machine::{FeedGap, MetadataMachine};
use crate::model::*;

/// The node handle type of the metadata plane.
pub type MetadataNode = Consensus<MetadataMachine>;

/// Liveness settings (Kafka's `broker.session.timeout.ms`, `broker.heartbeat.interval.ms`).
#[derive(Debug, Clone)]
pub struct LivenessConfig {
    /// A broker silent for longer is fenced (default 9 s).
    pub session_timeout: Duration,
    /// How often a broker agent heartbeats (default 2 s).
    pub heartbeat_interval: Duration,
    /// How often the leader checks sessions (default 500 ms).
    pub check_interval: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            session_timeout: Duration::from_secs(9),
            heartbeat_interval: Duration::from_secs(2),
            check_interval: Duration::from_millis(500),
        }
    }
}

/// Why a controller call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// The consensus layer failed (no leader, timeout, shutting down...).
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    /// The record was refused; nothing changed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// A feed reader fell behind the feed.
    #[error(transparent)]
    FeedGap(#[from] FeedGap),
}

/// The controller API of one metadata node. Cheap to clone.
#[derive(Clone)]
pub struct Controller {
    node: MetadataNode,
    liveness: Arc<LivenessConfig>,
    task: Arc<JoinHandle<()>>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl Controller {
    /// Wraps `node` and starts its liveness loop (active only while the node leads).
    pub fn start(node: MetadataNode, liveness: LivenessConfig) -> Self {
        let task = tokio::spawn(liveness_loop(node.clone(), liveness.clone()));
        Self {
            node,
            liveness: Arc::new(liveness),
            task: Arc::new(task),
        }
    }

    /// The consensus node.
    pub fn node(&self) -> &MetadataNode {
        &self.node
    }

    /// The liveness settings.
    pub fn liveness(&self) -> &LivenessConfig {
        &self.liveness
    }

    /// Appends a record; a refused record is an error and changed nothing.
    pub async fn submit(&self, cmd: MetadataCommand) -> Result<MetadataResponse, ControllerError> {
        match self.node.propose(cmd).await? {
            MetadataResponse::Error(e) => Err(e.into()),
            ok => Ok(ok),
        }
    }

    /// Checks `cmd` against a linearizable read of the image ([`MetadataMachine::check`]) and
    /// appends it only if it passes: a request that cannot succeed costs no log entry and
    /// leaves the feed unchanged. Apply still re-checks, since the image may move on before the
    /// record commits.
    pub async fn submit_checked(
        &self,
        cmd: MetadataCommand,
    ) -> Result<MetadataResponse, ControllerError> {
        self.node.read(|m| m.check(&cmd)).await??;
        self.submit(cmd).await
    }

    /// Registers a broker; returns its epoch.
    pub async fn register_broker(
        &self,
        broker_id: BrokerId,
        incarnation: u64,
        endpoints: Vec<String>,
        rack: Option<String>,
    ) -> Result<u64, ControllerError> {
        match self
            .submit(MetadataCommand::RegisterBroker {
                broker_id,
                incarnation,
                endpoints,
                rack,
            })
            .await?
        {
            MetadataResponse::Registered { epoch } => Ok(epoch),
            other => Err(unexpected(other)),
        }
    }

    /// Records a heartbeat of `broker_id` at `epoch`, caught up to `metadata_offset`.
    pub async fn heartbeat(
        &self,
        broker_id: BrokerId,
        epoch: u64,
        metadata_offset: u64,
    ) -> Result<(), ControllerError> {
        self.submit(MetadataCommand::Heartbeat {
            broker_id,
            epoch,
            metadata_offset,
        })
        .await
        .map(|_| ())
    }

    /// Creates a topic; returns its id and replica assignment.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        replication_factor: u16,
        configs: BTreeMap<String, String>,
    ) -> Result<(TopicId, Vec<Vec<BrokerId>>), ControllerError> {
        match self
            .submit_checked(MetadataCommand::CreateTopic {
                name: name.to_string(),
                partitions,
                replication_factor,
                configs,
            })
            .await?
        {
            MetadataResponse::TopicCreated {
                topic_id,
                assignment,
            } => Ok((topic_id, assignment)),
            other => Err(unexpected(other)),
        }
    }

    /// Preferred-leader election on `topics` (every topic when empty); returns how many
    /// partitions' leaders moved.
    pub async fn elect_preferred_leaders(
        &self,
        topics: Vec<String>,
    ) -> Result<u64, ControllerError> {
        match self
            .submit_checked(MetadataCommand::ElectPreferredLeaders { topics })
            .await?
        {
            MetadataResponse::LeadersElected { moved } => Ok(moved),
            other => Err(unexpected(other)),
        }
    }

    /// A linearizable copy of the metadata image.
    pub async fn image(&self) -> Result<MetadataImage, ControllerError> {
        Ok(self.node.read(|m| m.image().clone()).await?)
    }

    /// Changes after `offset` (at most `max`), waiting up to `wait` for one to appear: a
    /// broker follows the metadata like a log with this. On a node whose consensus has stopped
    /// it fails at once with `ShuttingDown` (read the feed from another node).
    pub async fn changes_since(
        &self,
        offset: u64,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<MetadataChange>, ControllerError> {
        let deadline = Instant::now() + wait;
        let mut status = self.node.watch();
        loop {
            let changes = self.node.read_local(|m| m.changes_since(offset, max))?;
            if !changes.is_empty() || Instant::now() >= deadline {
                return Ok(changes);
            }
            // A stopped node's feed never moves again (and its status channel is closed, so
            // waiting on it would return at once, forever): say so instead of spinning.
            let st = self.node.status();
            if st.role == consensus_api::Role::Shutdown || st.stopped.is_some() {
                tracing::debug!(stopped = ?st.stopped, "feed read on a stopped node");
                return Err(ConsensusError::ShuttingDown.into());
            }
            match tokio::time::timeout_at(deadline, status.changed()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(_)) => return Err(ConsensusError::ShuttingDown.into()),
            }
        }
    }
}

fn unexpected(r: MetadataResponse) -> ControllerError {
    ControllerError::Consensus(ConsensusError::Internal(format!(
        "unexpected metadata response {r:?}"
    )))
}

/// Fences brokers whose heartbeat offset has not moved for a session timeout, while this node
/// leads.
async fn liveness_loop(node: MetadataNode, cfg: LivenessConfig) {
    let mut seen: HashMap<BrokerId, (u64, Instant)> = HashMap::new();
    let mut leading = false;
    loop {
        tokio::time::sleep(cfg.check_interval).await;
        if !node.status().is_leader() {
            leading = false;
            continue;
        }
        if !leading {
            // New leader: every session starts now (no mass fencing after a failover).
            leading = true;
            seen.clear();
        }
        let now = Instant::now();
        let brokers: Vec<(BrokerId, u64, u64, bool)> = node.read_local(|m| {
            m.image()
                .brokers
                .values()
                .map(|b| (b.broker_id, b.epoch, b.last_heartbeat_offset, b.fenced))
                .collect()
        });
        seen.retain(|id, _| brokers.iter().any(|b| b.0 == *id));
        for (id, epoch, offset, fenced) in brokers {
            let entry = seen.entry(id).or_insert((offset, now));
            if entry.0 != offset {
                *entry = (offset, now);
            }
            if fenced || now.duration_since(entry.1) <= cfg.session_timeout {
                continue;
            }
            tracing::warn!(
                broker = id,
                epoch,
                "broker session expired (no heartbeat for {:?}); fencing it",
                cfg.session_timeout
            );
            entry.1 = now;
            match node
                .propose(MetadataCommand::FenceBroker {
                    broker_id: id,
                    epoch,
                })
                .await
            {
                Ok(MetadataResponse::Error(e)) => tracing::debug!(broker = id, "fence: {e}"),
                Ok(_) => warn_offline(&node),
                Err(e) => tracing::warn!(broker = id, "fence not committed: {e}"),
            }
        }
    }
}

/// Warns of the partitions left without a leader (after a fence).
fn warn_offline(node: &MetadataNode) {
    let offline: Vec<String> = node
        .read_local(|m| m.image().partitions_where(|p| p.leader.is_none()))
        .into_iter()
        .map(|(t, i)| format!("{t}-{i}"))
        .collect();
    if !offline.is_empty() {
        let shown: Vec<&str> = offline.iter().take(10).map(String::as_str).collect();
        tracing::warn!(
            count = offline.len(),
            "partitions offline (no in-sync replica available): {}{}",
            shown.join(", "),
            if offline.len() > shown.len() {
                ", ..."
            } else {
                ""
            }
        );
    }
}

fn flatten<T>(
    r: Result<Result<T, ControllerError>, tokio::time::error::Elapsed>,
) -> Result<T, ControllerError> {
    r.unwrap_or_else(|_| {
        Err(ControllerError::Consensus(ConsensusError::Timeout(
            "a heartbeat attempt".into(),
        )))
    })
}

/// A broker process's registration and heartbeats, kept up in the background.
pub struct BrokerAgent {
    task: JoinHandle<()>,
    state: Arc<parking_lot::Mutex<Option<u64>>>,
    controller: Controller,
    broker_id: BrokerId,
}

impl BrokerAgent {
    /// Registers `broker_id` (retrying until it succeeds) and heartbeats every
    /// `heartbeat_interval` with the node's applied offset; re-registers if its epoch went
    /// stale.
    pub fn start(
        controller: Controller,
        broker_id: BrokerId,
        incarnation: u64,
        endpoints: Vec<String>,
        rack: Option<String>,
    ) -> Self {
        let state: Arc<parking_lot::Mutex<Option<u64>>> = Arc::default();
        let c = controller.clone();
        let st = state.clone();
        let task = tokio::spawn(async move {
            let interval = c.liveness().heartbeat_interval;
            // One attempt may not outlive a third of the session: a call stuck on a dead
            // leader must not make the broker miss its session on the next one.
            let attempt = c.liveness().session_timeout / 3;
            let mut epoch = None;
            loop {
                match epoch {
                    None => {
                        match c
                            .register_broker(
                                broker_id,
                                incarnation,
                                endpoints.clone(),
                                rack.clone(),
                            )
                            .await
                        {
                            Ok(e) => {
                                epoch = Some(e);
                                *st.lock() = Some(e);
                                continue;
                            }
                            Err(e) => tracing::debug!(broker = broker_id, "register: {e}"),
                        }
                    }
                    Some(e) => {
                        let offset = c.node().status().applied_index;
                        let beat = c.heartbeat(broker_id, e, offset);
                        match flatten(tokio::time::timeout(attempt, beat).await) {
                            Ok(()) => {}
                            Err(ControllerError::Metadata(
                                MetadataError::StaleBrokerEpoch { .. }
                                | MetadataError::UnknownBroker(_),
                            )) => {
                                epoch = None;
                                *st.lock() = None;
                                continue;
                            }
                            Err(err) => tracing::debug!(broker = broker_id, "heartbeat: {err}"),
                        }
                    }
                }
                tokio::time::sleep(interval).await;
            }
        });
        Self {
            task,
            state,
            controller,
            broker_id,
        }
    }

    /// The broker epoch, once registered.
    pub fn epoch(&self) -> Option<u64> {
        *self.state.lock()
    }

    /// Stops heartbeating without telling anyone (a crash, as far as the controller can tell).
    pub fn kill(&self) {
        self.task.abort();
    }

    /// Stops heartbeating and moves leadership away (controlled shutdown).
    pub async fn shutdown(&self) -> Result<(), ControllerError> {
        self.task.abort();
        if let Some(epoch) = self.epoch() {
            self.controller
                .submit(MetadataCommand::BeginControlledShutdown {
                    broker_id: self.broker_id,
                    epoch,
                })
                .await?;
        }
        Ok(())
    }
}

impl Drop for BrokerAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}
