//! [`OpenraftEngine`]: the consensus-api `Engine` on top of `openraft::Raft`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::backend_support::{RefusedMessages, ReplicationTracker};
use consensus_api::{ConsensusError, Engine, EngineContext, NodeId, Role, Status, Transport};
use consensus_storage::transfer::{SnapshotReceiver, SnapshotSender, Transfers};
use consensus_storage::Log;
use openraft::async_runtime::WatchReceiver;
use openraft::{BasicNode, ChangeMembers, Config, Raft, ReadPolicy, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::log_store::{LogStore, META_BOOTSTRAPPED};
use crate::mapping;
use crate::network::{NetworkFactory, RaftHandler, StreamRoutes};
use crate::state_machine::StateMachineStore;
use crate::types::Request;
use crate::OpenRaft;

/// How often `snapshot_now` repeats its trigger while no snapshot covers its index yet.
const SNAPSHOT_RETRIGGER: std::time::Duration = std::time::Duration::from_millis(200);
/// Longest wait of a write's answer for the status watch to show it applied. openraft's
/// metrics follow the apply within microseconds; this only bounds a stalled forwarder.
const STATUS_PUBLISH_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Deadline of one snapshot-chunk call, in multiples of `rpc_timeout`: a chunk (up to 1 MiB) is
/// written on the receiver before it answers, and up to
/// [`consensus_storage::transfer::WINDOW`] are in flight.
const SNAPSHOT_CHUNK_TIMEOUT_RPCS: u32 = 4;

fn ms(d: std::time::Duration) -> u64 {
    d.as_millis().max(1) as u64
}

/// Maps the shared config onto openraft's.
pub(crate) fn raft_config(c: &consensus_api::NodeConfig) -> Result<Config, ConsensusError> {
    let cap = crate::network::MAX_ENTRIES_PER_MESSAGE as u64;
    if c.max_entries_per_message > cap {
        return Err(ConsensusError::InvalidRequest(format!(
            "max_entries_per_message {} is above {cap}, the most a follower accepts in one message",
            c.max_entries_per_message
        )));
    }
    Config {
        cluster_name: c.cluster_id.clone(),
        heartbeat_interval: ms(c.heartbeat_interval),
        election_timeout_min: ms(c.election_timeout_min),
        election_timeout_max: ms(c.election_timeout_max),
        install_snapshot_timeout: ms(c.rpc_timeout * 10),
        max_payload_entries: c.max_entries_per_message,
        // Automatic snapshots follow the shared `SnapshotPacer`, triggered by the engine.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: c.keep_logs_after_snapshot,
        purge_batch_size: 64,
        enable_pre_vote: Some(true),
        // A restarted leader must win a new election, as in standard Raft. openraft's default
        // lets it resume leading in its old term; after a power cut that lost the unsynced tail
        // of its log (entries it had already sent, and a majority had committed), it then
        // appends different entries at the same (index, term), and followers that match on
        // the term keep the old ones: the state machines diverge. Found by
        // `openraft_quic::linearizable_under_random_faults`, CONFORMANCE_SEED=3187594150413273320.
        enable_leader_restore: Some(false),
        ..Default::default()
    }
    .validate()
    .map_err(|e| ConsensusError::InvalidRequest(format!("openraft config: {e}")))
}

/// A running openraft node.
pub struct OpenraftEngine {
    id: NodeId,
    raft: OpenRaft,
    /// Kept alive here: the transport channel holds it weakly. It also keeps the snapshot
    /// channel's receiver alive until shutdown.
    handler: Arc<RaftHandler>,
    /// Progress of the snapshot transfers, sending and receiving.
    transfers: Transfers,
    /// Longest command `propose` accepts ([`consensus_api::NodeConfig::max_command_bytes`]).
    max_command_bytes: usize,
    log: Log,
    transport: Arc<dyn Transport>,
    status: watch::Receiver<Status>,
    status_task: JoinHandle<()>,
    /// Triggers the snapshots the pacer asks for.
    snapshot_task: JoinHandle<()>,
    /// Purges the entries behind each new snapshot beyond `keep_log_bytes_after_snapshot`.
    purge_task: JoinHandle<()>,
    stopped: AtomicBool,
}

impl Drop for OpenraftEngine {
    fn drop(&mut self) {
        // Dropped without `shutdown`: the helper tasks must not outlive the handle.
        self.status_task.abort();
        self.snapshot_task.abort();
        self.purge_task.abort();
    }
}

impl OpenraftEngine {
    /// Opens storage, starts openraft, bootstraps a fresh cluster once, serves the transport.
    pub(crate) async fn start(ctx: EngineContext) -> Result<Self, ConsensusError> {
        let EngineContext {
            config,
            state_machine,
            transport,
            snapshot_transport,
        } = ctx;
        let id = config.id;
        let storage = |e: consensus_storage::StorageError| ConsensusError::Storage(e.to_string());
        let dir = config.data_dir.clone();
        let (log, snapshots) = tokio::task::spawn_blocking(move || {
            let options = consensus_storage::LogOptions {
                metrics_node: Some(id),
                ..Default::default()
            };
            let log = Log::open_with(&dir, options)?;
            let snapshots = log.snapshot_store()?;
            Ok::<_, consensus_storage::StorageError>((log, snapshots))
        })
        .await
        .map_err(|e| ConsensusError::Internal(e.to_string()))?
        .map_err(storage)?;
        let log_store = LogStore::new(log.clone(), config.max_command_bytes() as u64);
        // Opening the state machine restores it from the snapshot file (streamed, possibly
        // large: off the runtime); freshness is derived from it.
        let preparing = state_machine.clone();
        let (sm_snapshots, sm) = (snapshots.clone(), state_machine);
        let (sm, snapshot_due) =
            tokio::task::spawn_blocking(move || StateMachineStore::open(sm, sm_snapshots))
                .await
                .map_err(|e| ConsensusError::Internal(e.to_string()))?
                .map_err(|e| ConsensusError::Storage(e.to_string()))?
                .paced(&config);
        let fresh = log_store.is_fresh() && !sm.has_snapshot();
        let transfers = Transfers::default();
        let receiver = SnapshotReceiver::install(&snapshot_transport, snapshots, transfers.clone());
        // A snapshot's file holds the state machine's bytes only: they go to it as they arrive.
        receiver.restore_while_receiving(Arc::new(move |source| preparing.prepare_restore(source)));
        let sender = Arc::new(SnapshotSender::new(
            snapshot_transport,
            transfers.clone(),
            config.snapshot_chunk_bytes(),
            config.rpc_timeout * SNAPSHOT_CHUNK_TIMEOUT_RPCS,
        ));
        let routes = StreamRoutes::new();
        let network = NetworkFactory::new(
            id,
            transport.clone(),
            config.rpc_timeout,
            routes.clone(),
            sender,
        );
        let raft = Raft::new(id, Arc::new(raft_config(&config)?), network, log_store, sm)
            .await
            .map_err(mapping::fatal)?;
        let refused = RefusedMessages::new(id);
        let handler = Arc::new(RaftHandler::new(
            raft.clone(),
            transport.clone(),
            routes,
            receiver,
            refused.clone(),
        ));
        transport.set_handler(handler.clone());

        if fresh && config.initial_members.contains_key(&id) {
            let members: BTreeMap<NodeId, BasicNode> = config
                .initial_members
                .iter()
                .map(|(i, a)| (*i, BasicNode::new(a)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(id, "bootstrapped a new cluster"),
                // Another member's leader already reached us: the cluster exists.
                Err(openraft::errors::RaftError::APIError(e)) => {
                    tracing::info!(id, "not bootstrapping: {e}")
                }
                Err(openraft::errors::RaftError::Fatal(f)) => return Err(mapping::fatal(f)),
            }
            log.set_meta(META_BOOTSTRAPPED, Bytes::from_static(b"1"), None)
                .map_err(storage)?;
        }

        let trigger = raft.clone();
        let snapshot_task = tokio::spawn(async move {
            loop {
                snapshot_due.notified().await;
                // Dropped by openraft when a build is already running; that one resets the pacer.
                if trigger.trigger().snapshot().await.is_err() {
                    break;
                }
            }
        });

        let mut metrics = raft.metrics();
        let mut refusals = refused.subscribe();
        let tracker = parking_lot::Mutex::new(ReplicationTracker::new());
        let current = move |m: &openraft::RaftMetrics<crate::types::C>| {
            let mut st = mapping::status(m);
            st.refused_messages = refused.count();
            st.replication = mapping::replication(m, &mut tracker.lock());
            st
        };
        let (tx, status) = watch::channel(current(&metrics.borrow_watched()));
        let status_task = tokio::spawn(async move {
            loop {
                // A refusal changes no metric: it wakes the publisher itself.
                let woke = tokio::select! {
                    m = metrics.changed() => m.is_ok(),
                    r = refusals.changed() => r.is_ok(),
                };
                if !woke {
                    break;
                }
                let st = current(&metrics.borrow_watched());
                tx.send_if_modified(|cur| {
                    let changed = *cur != st;
                    *cur = st;
                    changed
                });
            }
            tx.send_modify(|s| s.role = Role::Shutdown);
        });
        let purge_task = tokio::spawn(purge_by_bytes(
            raft.clone(),
            log.clone(),
            status.clone(),
            config.keep_logs_after_snapshot,
            config.keep_log_bytes_after_snapshot,
        ));
        Ok(Self {
            id,
            raft,
            handler,
            transfers,
            max_command_bytes: config.max_command_bytes(),
            log,
            transport,
            status,
            status_task,
            snapshot_task,
            purge_task,
            stopped: AtomicBool::new(false),
        })
    }

    fn running(&self) -> Result<(), ConsensusError> {
        if self.stopped.load(Ordering::SeqCst) {
            Err(ConsensusError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Waits until the status watch shows `index` applied: the contract publishes status
    /// before answers, but openraft answers a write from its state-machine worker, a moment
    /// before its metrics (and so our status) move.
    async fn published(&self, index: u64) {
        let mut rx = self.status.clone();
        let _ = tokio::time::timeout(
            STATUS_PUBLISH_WAIT,
            rx.wait_for(|s| s.applied_index >= index),
        )
        .await;
    }

    fn not_leader(&self) -> ConsensusError {
        ConsensusError::NotLeader {
            leader: self.status.borrow().leader.filter(|l| *l != self.id),
        }
    }
}

#[async_trait]
impl Engine for OpenraftEngine {
    async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError> {
        self.running()?;
        // The one size rule: openraft would append it and then fail to replicate it.
        if command.len() > self.max_command_bytes {
            return Err(ConsensusError::InvalidRequest(format!(
                "command of {} bytes exceeds the limit of {} bytes (max_command_bytes, from \
                 transport.max_frame_bytes)",
                command.len(),
                self.max_command_bytes
            )));
        }
        let resp = self
            .raft
            .client_write(Request(command))
            .await
            .map_err(mapping::write_handed)?;
        self.published(resp.log_id.index()).await;
        Ok(resp.data.0)
    }

    async fn read_index(&self) -> Result<u64, ConsensusError> {
        self.running()?;
        let read = self
            .raft
            .ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(mapping::read)?;
        Ok(read.index())
    }

    fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), ConsensusError> {
        self.running()?;
        self.transport.set_peer(id, addr.clone());
        let resp = self
            .raft
            .add_learner(id, BasicNode::new(addr), false)
            .await
            .map_err(mapping::write_handed)?;
        self.published(resp.log_id.index()).await;
        Ok(())
    }

    async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ConsensusError> {
        self.running()?;
        let resp = self
            .raft
            .change_membership(ChangeMembers::ReplaceAllVoters(voters), true)
            .await
            .map_err(mapping::write_handed)?;
        self.published(resp.log_id.index()).await;
        Ok(())
    }

    async fn remove_node(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.running()?;
        let st = self.status.borrow().clone();
        let change = if st.voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else if st.learners.contains(&id) {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        } else if st.is_leader() {
            // Idempotent: already gone (a retried removal, whose first answer was lost when
            // the leader removed itself, lands here).
            return Ok(());
        } else {
            return Err(self.not_leader());
        };
        let resp = self
            .raft
            .change_membership(change, false)
            .await
            .map_err(mapping::write_handed)?;
        self.published(resp.log_id.index()).await;
        Ok(())
    }

    async fn transfer_leader(&self, to: NodeId) -> Result<(), ConsensusError> {
        self.running()?;
        let st = self.status.borrow().clone();
        if !st.is_leader() {
            return Err(self.not_leader());
        }
        if !st.voters.contains(&to) {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {to} is not a voter; only voters can lead"
            )));
        }
        if to == self.id {
            return Ok(());
        }
        self.raft
            .trigger()
            .transfer_leader(to)
            .await
            .map_err(mapping::fatal)
    }

    fn snapshot_transfers(&self) -> Vec<consensus_api::TransferProgress> {
        self.transfers.list()
    }

    async fn snapshot_now(&self) -> Result<u64, ConsensusError> {
        self.running()?;
        let applied = self.status.borrow().applied_index;
        let mut rx = self.status.clone();
        loop {
            // openraft ignores a trigger while it is building a snapshot: one that started
            // earlier (paced by the log's size) may end below `applied`, so the trigger is
            // repeated until a snapshot covers it.
            self.raft
                .trigger()
                .snapshot()
                .await
                .map_err(mapping::fatal)?;
            let snap = rx.borrow_and_update().snapshot_index;
            if snap >= applied {
                return Ok(snap);
            }
            match tokio::time::timeout(SNAPSHOT_RETRIGGER, rx.changed()).await {
                Ok(Err(_)) => return Err(ConsensusError::ShuttingDown),
                Ok(Ok(())) | Err(_) => self.running()?,
            }
        }
    }

    async fn shutdown(&self) -> Result<(), ConsensusError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        // Inbound replication streams first, so none feeds a stopping openraft; inbound
        // snapshot transfers too, so the receiver's hold on the data dir goes.
        self.handler.stop();
        let result = self
            .raft
            .shutdown()
            .await
            .map_err(|e| ConsensusError::Internal(format!("openraft shutdown: {e}")));
        self.status_task.abort();
        self.snapshot_task.abort();
        self.purge_task.abort();
        let log = self.log.clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        result
    }
}

/// openraft keeps `max_in_snapshot_log_to_keep` entries behind a snapshot, whatever their size;
/// the log holds its live entries in memory, so after each new snapshot this asks openraft to
/// purge further, leaving at most `keep_bytes` of entry data at or below the snapshot (openraft
/// purges only what a snapshot covers, and waits for replication still reading those entries).
async fn purge_by_bytes(
    raft: OpenRaft,
    log: Log,
    mut status: watch::Receiver<Status>,
    keep_entries: u64,
    keep_bytes: u64,
) {
    let (mut asked, mut seen) = (0u64, 0u64);
    loop {
        let (snap, purged) = {
            let s = status.borrow_and_update();
            (s.snapshot_index, s.purged_index)
        };
        // Only a new snapshot moves the bound: status changes with every commit.
        if snap > seen {
            seen = snap;
            let by_count = snap.saturating_sub(keep_entries);
            let bound = log.purge_bound_keeping(snap, keep_bytes).unwrap_or(0);
            if bound > by_count && bound > purged && bound > asked {
                if raft.trigger().purge_log(bound).await.is_err() {
                    return;
                }
                asked = bound;
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}
