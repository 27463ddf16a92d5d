//! [`Consensus`]: the typed node handle programs use, the same for every backend.
//!
//! It owns the one leader-forwarding policy: an operation that reaches a follower is sent once,
//! over the transport's forwarding channel, to the leader the engine names; the leader runs it
//! locally and the caller gets the leader's answer.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::batch::{self, Batcher, Waiting};
use crate::metrics::{ProposalMetrics, StatusMetrics, STATUS_REFRESH};
use crate::mux::{Mux, ENGINE_CHANNEL, FORWARD_CHANNEL};
use crate::state_machine::{ApplyOutcome, Shared};
use crate::{
    codec, Backend, ConsensusError, Engine, EngineContext, InboundHandler, NodeConfig, NodeId,
    StateMachine, Status, Transport, TransportError,
};

/// How long a follower waits between attempts while no leader is known.
const LEADER_POLL: Duration = Duration::from_millis(20);

/// An operation that a follower forwards to the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Forwarded {
    Propose(#[serde(with = "serde_bytes")] Vec<u8>),
    ReadIndex,
    AddLearner(NodeId, String),
    ChangeVoters(BTreeSet<NodeId>),
    RemoveNode(NodeId),
    TransferLeader(NodeId),
    /// The leader's status (with its replication view); read-only.
    LeaderStatus,
}

impl Forwarded {
    /// Whether running it twice is harmless, so a transport failure may be retried.
    fn idempotent(&self) -> bool {
        !matches!(self, Forwarded::Propose(_))
    }
    fn name(&self) -> &'static str {
        match self {
            Forwarded::Propose(_) => "propose",
            Forwarded::ReadIndex => "read index",
            Forwarded::AddLearner(..) => "add learner",
            Forwarded::ChangeVoters(_) => "change voters",
            Forwarded::RemoveNode(_) => "remove node",
            Forwarded::TransferLeader(_) => "transfer leader",
            Forwarded::LeaderStatus => "leader status",
        }
    }
    /// Whether it changes who the members or the leader are.
    fn changes_membership(&self) -> bool {
        !matches!(
            self,
            Forwarded::Propose(_) | Forwarded::ReadIndex | Forwarded::LeaderStatus
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Reply {
    Proposed(#[serde(with = "serde_bytes")] Vec<u8>),
    ReadIndex(u64),
    Done,
    Status(Box<Status>),
}

/// See [`crate::fuzzing::forwarded`].
pub(crate) fn fuzz_forwarded(data: &[u8]) {
    if let Ok(op) = codec::decode::<Forwarded>(data) {
        let again = codec::encode(&op).map(|b| codec::decode::<Forwarded>(&b));
        assert!(
            matches!(again, Ok(Ok(ref o)) if format!("{o:?}") == format!("{op:?}")),
            "a decoded forwarded operation does not survive re-encoding: {op:?}"
        );
    }
}

/// Before a promotion on the leader: every learner named in `voters` must have caught up with
/// the leader's commit index as of now. Waits for that for at most half the time left before
/// `deadline`, then refuses with how far each one is, so a learner far behind (or not running)
/// never becomes a voter that quorums wait for. Not the leader: `Ok`, the engine answers.
async fn caught_up_for_promotion(
    engine: &dyn Engine,
    voters: &BTreeSet<NodeId>,
    deadline: Instant,
) -> Result<(), ConsensusError> {
    let mut rx = engine.status();
    let (target, promoted) = {
        let s = rx.borrow_and_update();
        let promoted: Vec<NodeId> = voters
            .iter()
            .filter(|id| s.learners.contains(id))
            .copied()
            .collect();
        if !s.is_leader() || promoted.is_empty() {
            return Ok(());
        }
        (s.commit_index, promoted)
    };
    let behind = |s: &Status| -> Vec<(NodeId, u64)> {
        promoted
            .iter()
            .map(|id| (*id, s.replication.get(id).map_or(0, |p| p.matched)))
            .filter(|(_, matched)| *matched < target)
            .collect()
    };
    let wait = deadline.saturating_duration_since(Instant::now()) / 2;
    let settled = {
        let settled = rx.wait_for(|s| !s.is_leader() || behind(s).is_empty());
        tokio::time::timeout(wait, settled).await.map(|r| r.is_ok())
    };
    match settled {
        Ok(true) => Ok(()),
        Ok(false) => Err(ConsensusError::ShuttingDown),
        Err(_) => {
            let lagging: Vec<String> = behind(&rx.borrow())
                .into_iter()
                .map(|(id, m)| format!("node {id} has replicated up to index {m}"))
                .collect();
            Err(ConsensusError::InvalidRequest(format!(
                "promotion refused: the leader had committed index {target}, but {}; promote \
                 once it has caught up (see the leader's replication status)",
                lagging.join(", ")
            )))
        }
    }
}

async fn run_local(
    engine: &dyn Engine,
    op: Forwarded,
    deadline: Instant,
) -> Result<Reply, ConsensusError> {
    Ok(match op {
        Forwarded::Propose(cmd) => Reply::Proposed(engine.propose(cmd).await?),
        Forwarded::ReadIndex => Reply::ReadIndex(engine.read_index().await?),
        Forwarded::AddLearner(id, addr) => {
            engine.add_learner(id, addr).await?;
            Reply::Done
        }
        Forwarded::ChangeVoters(v) => {
            caught_up_for_promotion(engine, &v, deadline).await?;
            engine.change_voters(v).await?;
            Reply::Done
        }
        Forwarded::RemoveNode(id) => {
            engine.remove_node(id).await?;
            Reply::Done
        }
        Forwarded::TransferLeader(to) => {
            engine.transfer_leader(to).await?;
            Reply::Done
        }
        Forwarded::LeaderStatus => {
            let st = engine.status().borrow().clone();
            if !st.is_leader() {
                let leader = st.leader.filter(|l| *l != st.id);
                return Err(ConsensusError::NotLeader { leader });
            }
            Reply::Status(Box::new(st))
        }
    })
}

/// Runs operations other nodes forward here. Who may forward what is checked against this
/// node's view of the membership and the transport's proof of the sender's identity.
struct ForwardHandler {
    engine: Arc<dyn Engine>,
    status: watch::Receiver<Status>,
    /// Whether `from` is proven ([`Transport::authenticates_peers`]).
    authenticated: bool,
    timeout: Duration,
}

impl ForwardHandler {
    /// Only members forward; membership changes and leader transfers come only from voters,
    /// and only over a transport that proves who the sender is.
    fn admit(&self, from: NodeId, op: &Forwarded) -> Result<(), ConsensusError> {
        let (voter, learner) = {
            let s = self.status.borrow();
            (s.voters.contains(&from), s.learners.contains(&from))
        };
        let refuse = |why: String| {
            tracing::warn!(from, op = op.name(), "forwarded request refused: {why}");
            Err(ConsensusError::InvalidRequest(why))
        };
        if !voter && !learner {
            return refuse(format!(
                "node {from} is not a member of this cluster; only members may forward a {}",
                op.name()
            ));
        }
        if op.changes_membership() {
            if !self.authenticated {
                return refuse(format!(
                    "a forwarded {} is refused: the transport does not authenticate its peers \
                     (no TLS), so the sender's identity is unproven; run it on the leader",
                    op.name()
                ));
            }
            if !voter {
                return refuse(format!(
                    "node {from} is a learner; only voters may forward a {}",
                    op.name()
                ));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl InboundHandler for ForwardHandler {
    fn on_message(&self, from: NodeId, _frame: Bytes) {
        tracing::debug!(from, "unexpected one-way frame on the forwarding channel");
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let result = match codec::decode::<Forwarded>(&frame) {
            Ok(op) => match self.admit(from, &op) {
                Err(e) => Err(e),
                Ok(()) => {
                    let name = op.name();
                    let deadline = Instant::now() + self.timeout;
                    tokio::time::timeout(self.timeout, run_local(&*self.engine, op, deadline))
                        .await
                        .unwrap_or_else(|_| Err(ConsensusError::Timeout(name.into())))
                }
            },
            Err(e) => Err(ConsensusError::InvalidRequest(format!(
                "malformed forwarded request: {e}"
            ))),
        };
        codec::encode(&result)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

struct Inner {
    id: NodeId,
    engine: Arc<dyn Engine>,
    /// Kept alive here: the transport channel holds it weakly.
    _forward_handler: Arc<ForwardHandler>,
    forward: Arc<dyn Transport>,
    transport: Arc<dyn Transport>,
    status: watch::Receiver<Status>,
    request_timeout: Duration,
    max_command_bytes: usize,
    /// Proposals waiting for a batch (used when the state machine [`StateMachine::BATCHES`]).
    batcher: Batcher,
    stopped: AtomicBool,
    cluster_id: String,
    proposals: ProposalMetrics,
    /// Refreshes the status gauges; ends with the node.
    status_metrics: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.status_metrics.abort();
    }
}

/// Keeps the status gauges of node `id` current, at most every [`STATUS_REFRESH`].
fn spawn_status_metrics(
    id: NodeId,
    mut status: watch::Receiver<Status>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut gauges = StatusMetrics::new(id);
        loop {
            let st = status.borrow_and_update().clone();
            gauges.update(&st);
            tokio::time::sleep(STATUS_REFRESH).await;
            if status.changed().await.is_err() {
                break;
            }
        }
    })
}

/// A running consensus node replicating the state machine `SM`.
///
/// Cheap to clone; every clone talks to the same node.
pub struct Consensus<SM: StateMachine> {
    inner: Arc<Inner>,
    sm: Shared<SM>,
}

impl<SM: StateMachine> Clone for Consensus<SM> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            sm: self.sm.clone(),
        }
    }
}

impl<SM: StateMachine> Consensus<SM> {
    /// Starts a node: checks (or, on a first start, records) its data directory's identity
    /// ([`crate::data_dir`]: an empty directory is refused unless
    /// [`NodeConfig::new_data_dir`] says to create or join a cluster; another cluster's or
    /// node's is refused), opens its durable state, bootstraps a fresh cluster once (see
    /// [`NodeConfig::initial_members`]), and begins serving on `transport`.
    pub async fn start(
        backend: &dyn Backend,
        config: NodeConfig,
        state_machine: SM,
        transport: Arc<dyn Transport>,
    ) -> Result<Self, ConsensusError> {
        config.validate()?;
        let config = crate::data_dir::prepare(&config)?;
        if transport.local_id() != config.id {
            return Err(ConsensusError::InvalidRequest(format!(
                "transport is bound for node {} but the config is for node {}",
                transport.local_id(),
                config.id
            )));
        }
        for (id, addr) in &config.initial_members {
            if *id != config.id {
                transport.set_peer(*id, addr.clone());
            }
        }
        let mux = Mux::new(transport.clone());
        let sm = Shared::new(state_machine);
        let id = config.id;
        let cluster_id = config.cluster_id.clone();
        let request_timeout = config.request_timeout;
        let entry_limit = config.max_command_bytes();
        // A batched command shares its entry with the batch framing.
        let max_command_bytes = if SM::BATCHES {
            entry_limit.saturating_sub(batch::OVERHEAD)
        } else {
            entry_limit
        };
        let engine = backend
            .start(EngineContext {
                config,
                state_machine: Arc::new(sm.clone()),
                transport: mux.channel(ENGINE_CHANNEL),
                snapshot_transport: mux.channel(crate::channel::SNAPSHOT),
            })
            .await?;
        let forward = mux.channel(FORWARD_CHANNEL);
        let forward_handler = Arc::new(ForwardHandler {
            engine: engine.clone(),
            status: engine.status(),
            authenticated: forward.authenticates_peers(),
            timeout: request_timeout,
        });
        forward.set_handler(forward_handler.clone());
        let status = engine.status();
        let status_metrics = spawn_status_metrics(id, engine.status());
        Ok(Self {
            inner: Arc::new(Inner {
                id,
                engine,
                _forward_handler: forward_handler,
                forward,
                transport,
                status,
                request_timeout,
                max_command_bytes,
                batcher: Batcher::new(entry_limit),
                stopped: AtomicBool::new(false),
                cluster_id,
                proposals: ProposalMetrics::new(id),
                status_metrics,
            }),
            sm,
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The latest status of this node.
    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// The cluster id this node was started with ([`NodeConfig::cluster_id`]).
    pub fn cluster_id(&self) -> &str {
        &self.inner.cluster_id
    }

    /// The leader's status, from the leader (forwarded to it from a follower): the one place
    /// [`Status::replication`] (each member's matched index, last contact, last caught up) is
    /// filled. `NotLeader`/`Timeout` while there is no leader.
    pub async fn leader_status(&self) -> Result<Status, ConsensusError> {
        let deadline = Instant::now() + self.inner.request_timeout;
        match self.route(Forwarded::LeaderStatus, deadline).await? {
            Reply::Status(st) => Ok(*st),
            other => Err(unexpected(other)),
        }
    }

    /// A stream of status changes (role, term, leader, indexes, membership).
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.inner.status.clone()
    }

    /// Waits until this node knows a leader; returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, ConsensusError> {
        let st = self
            .wait_status(timeout, |s| s.leader.is_some())
            .await
            .map_err(|_| ConsensusError::NotLeader { leader: None })?;
        st.leader.ok_or(ConsensusError::NotLeader { leader: None })
    }

    /// Waits until `pred` holds for this node's status, at most `timeout`.
    pub async fn wait_status(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Status) -> bool,
    ) -> Result<Status, ConsensusError> {
        let mut rx = self.inner.status.clone();
        let fut = async {
            loop {
                {
                    let st = rx.borrow_and_update();
                    if pred(&st) {
                        return Ok(st.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(ConsensusError::ShuttingDown);
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or_else(|_| Err(ConsensusError::Timeout("a status condition".into())))
    }

    /// Replicates `command` and returns the state machine's response once it is committed and
    /// applied. On a follower the proposal is forwarded to the leader. A `Timeout` means the
    /// outcome is unknown.
    pub async fn propose(&self, command: SM::Command) -> Result<SM::Response, ConsensusError> {
        let bytes = codec::encode(&command)?;
        if bytes.len() > self.inner.max_command_bytes {
            return Err(ConsensusError::InvalidRequest(format!(
                "command of {} bytes exceeds the limit of {} bytes (max_command_bytes, from \
                 transport.max_frame_bytes)",
                bytes.len(),
                self.inner.max_command_bytes
            )));
        }
        let started = Instant::now();
        let deadline = started + self.inner.request_timeout;
        let outcome = if SM::BATCHES {
            self.propose_batched(bytes, deadline).await
        } else {
            proposed(self.route(Forwarded::Propose(bytes), deadline).await)
        };
        self.inner.proposals.proposal(&outcome, started.elapsed());
        codec::decode::<ApplyOutcome<SM::Response>>(&outcome?)?
            .map_err(ConsensusError::InvalidRequest)
    }

    /// Queues an encoded command for the next batch ([`crate::batch`]); sends a batch at once
    /// when a slot is free. The command's own part of the batch's outcome.
    async fn propose_batched(
        &self,
        command: Vec<u8>,
        deadline: Instant,
    ) -> Result<Vec<u8>, ConsensusError> {
        self.check_running()?;
        let (answer, rx) = tokio::sync::oneshot::channel();
        let w = Waiting {
            command,
            deadline,
            answer,
        };
        if let Some(batch) = self.inner.batcher.push(w) {
            let node = self.clone();
            tokio::spawn(async move { node.send_batches(batch).await });
        }
        rx.await.unwrap_or(Err(ConsensusError::ShuttingDown))
    }

    /// Sends `batch` and the batches queued behind it on one slot until the queue is empty.
    async fn send_batches(self, mut batch: Vec<Waiting>) {
        loop {
            let deadline = batch
                .iter()
                .map(|w| w.deadline)
                .min()
                .unwrap_or_else(Instant::now);
            let frame = batch::encode(batch.iter().map(|w| w.command.as_slice()));
            let routed = self.route(Forwarded::Propose(frame), deadline).await;
            answer_batch(batch, routed);
            match self.inner.batcher.next() {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    /// A read barrier: when it returns, this node's state machine reflects every write committed
    /// before the call. Fails (never returns stale) when leadership cannot be confirmed.
    pub async fn linearizable_read(&self) -> Result<(), ConsensusError> {
        let started = Instant::now();
        let deadline = started + self.inner.request_timeout;
        let index = match self.route(Forwarded::ReadIndex, deadline).await? {
            Reply::ReadIndex(i) => i,
            other => return Err(unexpected(other)),
        };
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.wait_status(remaining, |s| s.applied_index >= index)
            .await
            .map_err(|_| ConsensusError::Timeout(format!("local apply to reach index {index}")))?;
        self.inner.proposals.read_index(started.elapsed());
        Ok(())
    }

    /// Runs `f` on the state machine after a [`linearizable_read`](Self::linearizable_read).
    pub async fn read<R>(&self, f: impl FnOnce(&SM) -> R) -> Result<R, ConsensusError> {
        self.linearizable_read().await?;
        Ok(f(&self.sm.0.read()))
    }

    /// Captures a backup of the state machine ([`crate::backup`]): a read barrier (leadership
    /// confirmed with a quorum, then this node's applies caught up with it, so the image holds
    /// every write committed before the call), then a point-in-time view taken between applies,
    /// with the header naming the last log index it reflects. Write it with
    /// [`backup::write`](crate::backup::write) or [`backup::write_file`](crate::backup::write_file)
    /// (blocking, off the runtime); applies continue meanwhile when the state machine has a
    /// [`StateMachine::snapshot_view`], else they pause while it serializes. Fails like
    /// [`linearizable_read`](Self::linearizable_read).
    pub async fn backup(
        &self,
    ) -> Result<(crate::backup::BackupHeader, Box<dyn crate::SnapshotView>), ConsensusError> {
        self.check_running()?;
        self.linearizable_read().await?;
        let sm = self.sm.clone();
        let status = self.inner.status.clone();
        let (view, index) = tokio::task::spawn_blocking(move || {
            let guard = sm.0.read();
            let view = match guard.snapshot_view() {
                Some(view) => view,
                None => {
                    let mut bytes = Vec::new();
                    guard.snapshot_to(&mut bytes).map_err(|e| {
                        ConsensusError::Internal(format!("state machine snapshot failed: {e}"))
                    })?;
                    crate::serialized_view(bytes)
                }
            };
            // Under the read lock nothing applies: the last command applied, or a later index
            // the status has reached (entries that are not commands change no state).
            let index =
                sm.1.load(Ordering::SeqCst)
                    .max(status.borrow().applied_index);
            drop(guard);
            Ok::<_, ConsensusError>((view, index))
        })
        .await
        .map_err(|e| ConsensusError::Internal(format!("backup capture: {e}")))??;
        Ok((
            crate::backup::BackupHeader {
                cluster_id: self.inner.cluster_id.clone(),
                node_id: self.inner.id,
                index,
                created_unix_ms: crate::data_dir::now_unix_ms(),
            },
            view,
        ))
    }

    /// Runs `f` on the local state machine without a barrier: fast, possibly stale.
    pub fn read_local<R>(&self, f: impl FnOnce(&SM) -> R) -> R {
        f(&self.sm.0.read())
    }

    /// Adds `id` (reachable at `addr`) as a non-voting learner that receives the log. Returns
    /// once it is a member, before it has caught up: watch the leader's
    /// [`Status::replication`] (or call [`change_voters`](Self::change_voters), which waits
    /// a while for it) before promoting it.
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), ConsensusError> {
        self.admin(Forwarded::AddLearner(id, addr)).await
    }

    /// Makes `voters` the voting set (joint consensus where the engine needs it). Members that
    /// are dropped stay as learners until [`remove_node`](Self::remove_node). A learner named
    /// in `voters` must have caught up with the leader's commit index first: the leader waits
    /// up to half the request timeout for it, then refuses with `InvalidRequest` saying how
    /// far behind it is (nothing changed).
    pub async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ConsensusError> {
        if voters.is_empty() {
            return Err(ConsensusError::InvalidRequest(
                "the voter set must not be empty".into(),
            ));
        }
        self.admin(Forwarded::ChangeVoters(voters)).await
    }

    /// Removes `id` from the cluster (voter or learner).
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.admin(Forwarded::RemoveNode(id)).await
    }

    /// Asks the leader to hand leadership to `to`; returns once `to` is leader (as this node
    /// sees it) or the request deadline passes.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), ConsensusError> {
        self.admin(Forwarded::TransferLeader(to)).await?;
        self.wait_status(self.inner.request_timeout, |s| s.leader == Some(to))
            .await
            .map(|_| ())
            .map_err(|_| ConsensusError::Timeout(format!("leadership to move to node {to}")))
    }

    /// The snapshot transfers this node runs or ran last with each peer (bytes, chunks,
    /// elapsed time, outcome).
    pub fn snapshot_transfers(&self) -> Vec<crate::TransferProgress> {
        self.inner.engine.snapshot_transfers()
    }

    /// Takes a snapshot on this node now and compacts its log; returns the snapshot index, which
    /// covers everything applied when the call was made (even if a snapshot was being built).
    pub async fn snapshot_now(&self) -> Result<u64, ConsensusError> {
        self.check_running()?;
        self.inner.engine.snapshot_now().await
    }

    /// Stops the engine (flushing storage) and the transport. Idempotent.
    pub async fn shutdown(&self) -> Result<(), ConsensusError> {
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let result = self.inner.engine.shutdown().await;
        self.inner.transport.shutdown().await;
        result
    }

    /// The transport's bound address.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.inner.transport.local_addr()
    }

    /// Current members with their voting role, from the status: `(voters, learners)`.
    pub fn members(&self) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
        let st = self.status();
        (st.voters, st.learners)
    }

    async fn admin(&self, op: Forwarded) -> Result<(), ConsensusError> {
        let deadline = Instant::now() + self.inner.request_timeout;
        match self.route(op, deadline).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    fn check_running(&self) -> Result<(), ConsensusError> {
        if self.inner.stopped.load(Ordering::SeqCst) {
            Err(ConsensusError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Runs `op` on the leader: locally when this node leads, else forwarded once to the leader
    /// the engine names. Retries only what cannot have taken effect (a `NotLeader` answer, an
    /// undeliverable request, or an idempotent operation) until the deadline.
    async fn route(&self, op: Forwarded, deadline: Instant) -> Result<Reply, ConsensusError> {
        self.check_running()?;
        let name = op.name();
        let mut last_hint = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(match last_hint {
                    Some(e) => e,
                    None => ConsensusError::Timeout(name.into()),
                });
            }
            let local = tokio::time::timeout(
                remaining,
                run_local(&*self.inner.engine, op.clone(), deadline),
            )
            .await
            .unwrap_or_else(|_| Err(ConsensusError::Timeout(name.into())));
            let leader = match local {
                Err(ConsensusError::NotLeader {
                    leader: Some(leader),
                }) if leader != self.inner.id => leader,
                Err(e @ ConsensusError::NotLeader { .. }) => {
                    last_hint = Some(e);
                    self.pause(deadline).await;
                    continue;
                }
                other => return other,
            };
            last_hint = Some(ConsensusError::NotLeader {
                leader: Some(leader),
            });
            // A node that joined later may not have dialled the leader yet.
            let addr = self.inner.status.borrow().addresses.get(&leader).cloned();
            if let Some(addr) = addr {
                self.inner.forward.set_peer(leader, addr);
            }
            let frame = Bytes::from(codec::encode(&op)?);
            if matches!(op, Forwarded::Propose(_)) {
                self.inner.proposals.forwarded.increment(1);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            let call = self.inner.forward.call(leader, frame, remaining);
            // (Only when the view agrees with the engine's hint now, so that the two cannot race.)
            let view_agrees = self
                .inner
                .status
                .borrow()
                .leader
                .is_none_or(|l| l == leader);
            let result = if op.idempotent() && view_agrees {
                // A leader that died with the call in flight answers nothing until the transport
                // gives up on it; a repeatable request goes to its successor as soon as one is known.
                tokio::select! {
                    r = call => r,
                    () = self.leader_moves_from(leader) => {
                        tracing::debug!(leader, "a new leader is known; {name} goes to it");
                        continue;
                    }
                }
            } else {
                call.await
            };
            match result {
                Ok(answer) => {
                    match codec::decode::<Result<Reply, ConsensusError>>(&answer)? {
                        // The leader we knew has been deposed: it did not take the request.
                        Err(ConsensusError::NotLeader { .. }) => self.pause(deadline).await,
                        other => return other,
                    }
                }
                Err(e @ TransportError::FrameTooLarge { .. }) => return Err(e.into()),
                Err(e) if e.is_undelivered() || op.idempotent() => {
                    tracing::debug!(leader, "forwarding {name} failed, will retry: {e}");
                    last_hint = Some(e.into());
                    self.pause(deadline).await;
                }
                // Delivered, perhaps taken by the leader: a stop here leaves it unknown.
                Err(e) => return Err(ConsensusError::from(e).after_handoff()),
            }
        }
    }

    /// Returns once this node's view names a leader other than `leader`.
    async fn leader_moves_from(&self, leader: NodeId) {
        let mut rx = self.inner.status.clone();
        let moved = rx
            .wait_for(|s| s.leader.is_some_and(|l| l != leader))
            .await
            .is_ok();
        if !moved {
            // The engine stopped: the call's own outcome decides.
            std::future::pending::<()>().await;
        }
    }

    /// Waits for a status change (a new leader, say) or a short poll interval.
    async fn pause(&self, deadline: Instant) {
        let mut rx = self.inner.status.clone();
        rx.mark_unchanged();
        let wait = LEADER_POLL.min(deadline.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(wait, rx.changed()).await;
    }
}

/// The state machine's encoded outcome from the leader's answer to a proposal.
fn proposed(routed: Result<Reply, ConsensusError>) -> Result<Vec<u8>, ConsensusError> {
    match routed? {
        Reply::Proposed(out) => Ok(out),
        other => Err(unexpected(other)),
    }
}

/// Answers each proposal of a batch with its part of the outcome, or with the batch's error.
fn answer_batch(batch: Vec<Waiting>, routed: Result<Reply, ConsensusError>) {
    let parts = proposed(routed).and_then(|out| match batch::split(&out) {
        Ok(parts) if parts.len() == batch.len() => {
            Ok(parts.into_iter().map(<[u8]>::to_vec).collect::<Vec<_>>())
        }
        other => Err(ConsensusError::Internal(format!(
            "the outcome of a batch of {} commands does not match it: {:?}",
            batch.len(),
            other.map(|p| p.len())
        ))),
    });
    match parts {
        Ok(parts) => {
            for (w, part) in batch.into_iter().zip(parts) {
                let _ = w.answer.send(Ok(part));
            }
        }
        Err(e) => {
            for w in batch {
                let _ = w.answer.send(Err(e.clone()));
            }
        }
    }
}

fn unexpected(reply: Reply) -> ConsensusError {
    ConsensusError::Internal(format!("unexpected reply from the leader: {reply:?}"))
}

/// Initial members from `(id, addr)` pairs; a small helper for wiring code.
pub fn members<I, S>(pairs: I) -> BTreeMap<NodeId, String>
where
    I: IntoIterator<Item = (NodeId, S)>,
    S: Into<String>,
{
    pairs.into_iter().map(|(i, a)| (i, a.into())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// An engine that records what it was asked to run.
    struct Recording {
        status: watch::Sender<Status>,
        ran: Mutex<Vec<&'static str>>,
    }

    impl Recording {
        fn ran(&self, what: &'static str) {
            self.ran.lock().push(what);
        }
    }

    #[async_trait]
    impl Engine for Recording {
        async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError> {
            self.ran("propose");
            Ok(command)
        }
        async fn read_index(&self) -> Result<u64, ConsensusError> {
            self.ran("read index");
            Ok(1)
        }
        fn status(&self) -> watch::Receiver<Status> {
            self.status.subscribe()
        }
        async fn add_learner(&self, _: NodeId, _: String) -> Result<(), ConsensusError> {
            self.ran("add learner");
            Ok(())
        }
        async fn change_voters(&self, _: BTreeSet<NodeId>) -> Result<(), ConsensusError> {
            self.ran("change voters");
            Ok(())
        }
        async fn remove_node(&self, _: NodeId) -> Result<(), ConsensusError> {
            self.ran("remove node");
            Ok(())
        }
        async fn transfer_leader(&self, _: NodeId) -> Result<(), ConsensusError> {
            self.ran("transfer leader");
            Ok(())
        }
        async fn snapshot_now(&self) -> Result<u64, ConsensusError> {
            Ok(0)
        }
        fn snapshot_transfers(&self) -> Vec<crate::TransferProgress> {
            Vec::new()
        }
        async fn shutdown(&self) -> Result<(), ConsensusError> {
            Ok(())
        }
    }

    /// A handler on node 1 of voters {1, 2} and learner {3}.
    fn handler(authenticated: bool) -> (ForwardHandler, Arc<Recording>) {
        let mut status = Status::initial(1);
        status.voters = BTreeSet::from([1, 2]);
        status.learners = BTreeSet::from([3]);
        let engine = Arc::new(Recording {
            status: watch::channel(status).0,
            ran: Mutex::new(Vec::new()),
        });
        let h = ForwardHandler {
            engine: engine.clone(),
            status: engine.status(),
            authenticated,
            timeout: Duration::from_secs(5),
        };
        (h, engine)
    }

    async fn forward(h: &ForwardHandler, from: NodeId, op: Forwarded) -> Result<Reply, String> {
        let frame = Bytes::from(codec::encode(&op).map_err(|e| e.to_string())?);
        let reply = h.on_call(from, frame).await?;
        codec::decode::<Result<Reply, ConsensusError>>(&reply)
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn only_members_forward_and_only_authenticated_voters_change_membership() {
        let (h, engine) = handler(true);
        // A stranger (a removed node, any holder of a cluster certificate) runs nothing.
        for op in [Forwarded::Propose(b"x".to_vec()), Forwarded::RemoveNode(2)] {
            let e = forward(&h, 9, op).await.expect_err("stranger");
            assert!(e.contains("not a member"), "{e}");
        }
        // A learner may forward proposals and reads, not membership or leadership changes.
        assert!(forward(&h, 3, Forwarded::Propose(b"x".to_vec()))
            .await
            .is_ok());
        assert!(forward(&h, 3, Forwarded::ReadIndex).await.is_ok());
        for op in [
            Forwarded::RemoveNode(2),
            Forwarded::AddLearner(4, "a".into()),
            Forwarded::ChangeVoters(BTreeSet::from([3])),
            Forwarded::TransferLeader(3),
        ] {
            let e = forward(&h, 3, op).await.expect_err("learner");
            assert!(e.contains("only voters"), "{e}");
        }
        // A voter may.
        assert!(forward(&h, 2, Forwarded::RemoveNode(3)).await.is_ok());
        assert_eq!(
            *engine.ran.lock(),
            vec!["propose", "read index", "remove node"]
        );

        // Over a transport that does not prove identities, no claim is trusted for changes.
        let (h, engine) = handler(false);
        let e = forward(&h, 2, Forwarded::RemoveNode(3))
            .await
            .expect_err("unauthenticated");
        assert!(e.contains("unproven"), "{e}");
        assert!(forward(&h, 2, Forwarded::Propose(b"x".to_vec()))
            .await
            .is_ok());
        assert_eq!(*engine.ran.lock(), vec!["propose"]);
    }
}
