//! # backend-tikv: tikv's raft-rs behind the consensus contract
//!
//! raft-rs is a Raft *library*: it decides, the embedder must store, send, tick and apply. This
//! crate does all of that so the classic integration failures cannot happen:
//!
//! | failure seen in hand-written integrations | what this crate does |
//! |---|---|
//! | no voters at bootstrap | a fresh initial member writes the initial `ConfState` (voters = `initial_members`) as a snapshot at index 1, durably, exactly once; a restarted node never re-initializes |
//! | no Ready loop | [`TikvBackend::start`] spawns the driver: ticks every `heartbeat_interval`, runs every Ready cycle |
//! | messages never sent | every `Ready` / `LightReady` message goes through the [`Transport`](consensus_api::Transport); persisted messages only after the fsync; a snapshot's file streamed in chunks within the frame limit ([`consensus_storage::transfer`]), then the `MsgSnapshot` (carrying the transfer's ticket, not the data) as a call whose outcome is reported with `report_snapshot`; send failures with `report_unreachable` |
//! | proposals before a leader exists | a proposal on a non-leader answers `NotLeader { leader }` at once; the node handle forwards or retries until its deadline |
//! | nodes that cannot start one after another | a node without quorum keeps ticking and campaigning (pre-vote) until peers appear; nothing exits |
//! | logs only in `MemStorage` | [`consensus_storage::Log`]: CRC-checked records, group-committed `fdatasync` before anything is acknowledged, snapshots in an atomic file, restart rebuilds from disk |
//!
//! Engine settings: `pre_vote` and `check_quorum` on, `ReadOnlySafe` read-index reads,
//! `skip_bcast_commit` (followers learn a new commit index from the next append or heartbeat),
//! membership by `ConfChangeV2` (joint consensus when several voters change, left
//! automatically), leader transfer by `transfer_leader`, log compaction after
//! `snapshot_threshold` applied entries. New nodes (learners) start empty and catch up by
//! snapshot, which also carries every member's address.
//!
//! Large state: a snapshot is written from the state machine's point-in-time view
//! ([`ByteStateMachine::capture`](consensus_api::ByteStateMachine::capture)) off the driver,
//! straight into the snapshot file; the leader's `Storage::snapshot` hands raft-rs only the
//! metadata, and the follower steps a `MsgSnapshot` only once its file has arrived complete and
//! checked, then restores the state machine streaming from that file. Appends are bounded by
//! the command limit (`max_size_per_msg`), so every message fits in one frame.

#![warn(missing_docs, unreachable_pub)]

mod driver;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod logger;
mod mapping;
mod node;
mod storage;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use consensus_api::{Backend, ConsensusError, Engine, EngineContext, NodeId, Status};
use tokio::sync::{mpsc, oneshot, watch};

use consensus_storage::transfer::{SnapshotReceiver, SnapshotSender, Transfers};

use crate::driver::{Command, Driver, RaftHandler};
use crate::node::{Core, Reply};
use crate::storage::DiskStorage;

/// Requests queued for the driver before callers wait (back-pressure beyond that).
const COMMAND_QUEUE: usize = 8192;
/// Inbound raft messages queued for the driver before new ones are dropped.
const MESSAGE_QUEUE: usize = 8192;

/// Starts raft-rs engines; the value a program names at wiring time.
#[derive(Debug, Clone, Copy, Default)]
pub struct TikvBackend;

#[async_trait]
impl Backend for TikvBackend {
    fn name(&self) -> &'static str {
        "tikv"
    }

    async fn start(&self, ctx: EngineContext) -> Result<Arc<dyn Engine>, ConsensusError> {
        Ok(Arc::new(TikvEngine::start(ctx).await?))
    }

    fn inspect(
        &self,
        data_dir: &std::path::Path,
        max_entries: usize,
    ) -> Result<consensus_api::DataDirReport, ConsensusError> {
        inspect::inspect(data_dir, max_entries)
    }

    fn force_voters(
        &self,
        data_dir: &std::path::Path,
        me: NodeId,
        voters: &std::collections::BTreeSet<NodeId>,
    ) -> Result<String, ConsensusError> {
        inspect::force_voters(data_dir, me, voters)
    }

    fn seed(
        &self,
        data_dir: &std::path::Path,
        me: NodeId,
        members: &BTreeMap<NodeId, String>,
        index: u64,
        image: &mut dyn std::io::Read,
    ) -> Result<String, ConsensusError> {
        inspect::seed(data_dir, me, members, index, image)
    }

    fn hostile_frames(
        &self,
        leader: NodeId,
        to: NodeId,
        to_status: &Status,
    ) -> Vec<(&'static str, bytes::Bytes)> {
        driver::hostile_frames(leader, to, to_status)
    }
}

/// One running raft-rs node: a handle to its driver task.
pub struct TikvEngine {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<Status>,
    stopped: AtomicBool,
    transfers: Transfers,
    /// Kept alive here: the transport channels hold their handlers weakly (the snapshot
    /// receiver is held by this handler).
    _handler: Arc<RaftHandler>,
}

impl TikvEngine {
    /// Opens the data dir, bootstraps a fresh initial member, and starts the driver.
    pub async fn start(ctx: EngineContext) -> Result<Self, ConsensusError> {
        let EngineContext {
            config,
            state_machine,
            transport,
            snapshot_transport,
        } = ctx;
        config.validate()?;
        let id = config.id;
        let cfg = config.clone();
        let preparing = state_machine.clone();
        let (core, persisted) = tokio::task::spawn_blocking(move || {
            let storage = DiskStorage::open_for(Some(cfg.id), &cfg.data_dir)
                .map_err(|e| ConsensusError::Storage(e.to_string()))?;
            Core::new(&cfg, storage, state_machine, &logger::logger(cfg.id))
        })
        .await
        .map_err(|e| ConsensusError::Internal(format!("opening the node: {e}")))??;
        let (cmd_tx, commands) = mpsc::channel(COMMAND_QUEUE);
        let (msg_tx, messages) = mpsc::channel(MESSAGE_QUEUE);
        let transfers = Transfers::default();
        let receiver = SnapshotReceiver::install(
            &snapshot_transport,
            core.storage().snapshot_store(),
            transfers.clone(),
        );
        // A snapshot's data is the address book, then the state machine's bytes: those go to
        // it as they arrive.
        receiver.restore_while_receiving(Arc::new(move |source| {
            storage::SnapshotData::read_book(source)?;
            preparing.prepare_restore(source)
        }));
        let sender = Arc::new(SnapshotSender::new(
            snapshot_transport,
            transfers.clone(),
            config.snapshot_chunk_bytes(),
            config.rpc_timeout * 4,
        ));
        let handler = Arc::new(RaftHandler {
            id,
            messages: msg_tx,
            snapshots: receiver,
            refused: core.refusals(),
        });
        transport.set_handler(handler.clone());
        let (status_tx, status) = watch::channel(core.status());
        let status_tx = Arc::new(status_tx);
        let driver = Driver {
            core,
            transport,
            commands,
            messages,
            persisted,
            status: status_tx.clone(),
            tick: config.heartbeat_interval,
            snapshot_timeout: config.rpc_timeout * 10,
            snapshots: sender,
        };
        tokio::spawn(driver::supervise(id, tokio::spawn(driver.run()), status_tx));
        Ok(Self {
            commands: cmd_tx,
            status,
            stopped: AtomicBool::new(false),
            transfers,
            _handler: handler,
        })
    }

    /// Hands a command to the driver; its answer comes on the returned channel.
    async fn hand<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<oneshot::Receiver<Result<T, ConsensusError>>, ConsensusError> {
        if self.stopped.load(Ordering::SeqCst) {
            return Err(ConsensusError::ShuttingDown);
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| ConsensusError::ShuttingDown)?;
        Ok(rx)
    }

    /// A request that changes nothing if it fails (a read, a snapshot, a leader transfer).
    async fn request<T>(
        &self,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, ConsensusError> {
        let rx = self.hand(make).await?;
        rx.await.map_err(|_| ConsensusError::ShuttingDown)?
    }

    /// A request that appends to the log (a proposal, a membership change): once the driver
    /// has taken it, a stop or failure leaves its outcome unknown.
    async fn write<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ConsensusError> {
        let rx = self.hand(make).await?;
        rx.await
            .map_err(|_| ConsensusError::ShuttingDown.after_handoff())?
    }
}

#[async_trait]
impl Engine for TikvEngine {
    async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError> {
        self.write(|r| Command::Propose(command, r)).await
    }

    async fn read_index(&self) -> Result<u64, ConsensusError> {
        self.request(Command::ReadIndex).await
    }

    fn status(&self) -> watch::Receiver<Status> {
        self.status.clone()
    }

    async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), ConsensusError> {
        self.write(|r| Command::AddLearner(id, addr, r)).await
    }

    async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ConsensusError> {
        self.write(|r| Command::ChangeVoters(voters, r)).await
    }

    async fn remove_node(&self, id: NodeId) -> Result<(), ConsensusError> {
        self.write(|r| Command::RemoveNode(id, r)).await
    }

    async fn transfer_leader(&self, to: NodeId) -> Result<(), ConsensusError> {
        self.request(|r| Command::TransferLeader(to, r)).await
    }

    async fn snapshot_now(&self) -> Result<u64, ConsensusError> {
        self.request(Command::Snapshot).await
    }

    fn snapshot_transfers(&self) -> Vec<consensus_api::TransferProgress> {
        self.transfers.list()
    }

    async fn shutdown(&self) -> Result<(), ConsensusError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        Ok(())
    }
}
