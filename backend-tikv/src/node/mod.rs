//! The decisions of one node as plain synchronous code: what to propose, what a `Ready` means,
//! which waiter an applied entry completes. No network, no timers, no tasks: the driver
//! ([`crate::driver`]) feeds it and ships what it produces, and unit tests drive several cores
//! against each other directly (the quinn-proto idea: a state machine you can test by calling
//! it).
//!
//! # Inputs, outputs, and the order of calls
//!
//! [`Core`] has four kinds of methods, like quinn-proto's `Connection`:
//! - **inputs** record something that happened, and never block: [`Core::step`] (a peer's
//!   message), [`Core::tick`] (one heartbeat interval; time only ever enters as ticks),
//!   [`Core::persisted`] (a durability notice from [`PersistEvents`]),
//!   [`Core::snapshot_saved`] (a [`SaveJob`] finished), [`Core::report_unreachable`] and
//!   [`Core::report_snapshot`] (send outcomes), [`Core::learn_addresses`] (a peer's address
//!   book);
//! - **requests** from the engine handle, each with a [`Reply`] answered now (refusals) or
//!   later (through [`Core::deliver`]): [`Core::propose`], [`Core::read_index`],
//!   [`Core::add_learner`], [`Core::change_voters`], [`Core::remove_node`],
//!   [`Core::snapshot_now`]; [`Core::transfer_leader`] answers at once;
//! - **the mutator** [`Core::cycle`]: handles one raft-rs `Ready`; call it until it returns
//!   `false`;
//! - **outputs**, drained by the caller: [`Core::take_peer_changes`] (transport peers to add or
//!   forget), [`Core::take_outbox`] (messages, in order), [`Core::take_save_job`] (a snapshot
//!   to write off the loop), [`Core::status`], and [`Core::deliver`] (the answers decided).
//!
//! After each batch of inputs and requests, the caller:
//! 1. ships: `take_peer_changes` first (a peer is known before a message to it), then
//!    `take_outbox` (messages released by durability notices come first);
//! 2. runs `cycle` until it returns `false`, shipping after each one;
//! 3. runs the `take_save_job` job, if any, off the loop and hands it back to
//!    `snapshot_saved`;
//! 4. publishes `status`, then calls `deliver`, so a client that sees its answer also sees the
//!    status that reflects it.
//!
//! At shutdown, or when the log fails, [`Core::fail_all`] answers everything still waiting.
//!
//! # One Ready cycle
//!
//! A cycle ([`Core::cycle`], in `cycle.rs`) never waits for the disk (raft-rs's asynchronous
//! persistence, as TiKV uses it):
//! 1. take the messages that may leave before persisting (a leader's appends: replication runs
//!    in parallel with the leader's own write); install a snapshot if any; apply the committed
//!    entries (raft-rs only hands out entries that are committed *and* durable here) and complete
//!    their proposals; hand out read states;
//! 2. queue the new entries and hard state to the log, with a durability callback that carries
//!    the Ready's number and its persisted messages (votes, append responses), then
//!    `advance_append_async` and `advance_apply`;
//! 3. later, when the log has synced, [`Core::persisted`] releases those messages and calls
//!    `on_persist_ready`, which lets the leader count its own copy and the commit index move.
//!
//! So while one `fdatasync` runs, the node keeps stepping messages and accepting proposals; the
//! log writer batches everything queued meanwhile into the next sync (group commit). Readies
//! are persisted in order, so a Ready that writes nothing still waits behind the writes before
//! it when any are in flight.
//!
//! The other concerns live beside it: `waiters.rs` (which answer an event completes),
//! `membership.rs` (conf changes and the address book), `snapshots.rs` (taking, saving,
//! compacting, installing); raft-rs config and status mapping are in [`crate::mapping`].

mod cycle;
pub(crate) mod guard;
mod membership;
mod snapshots;
mod waiters;

use std::collections::BTreeMap;
use std::sync::Arc;

use consensus_api::backend_support::{RefusedMessages, ReplicationTracker, SnapshotPacer};
use consensus_api::{ByteStateMachine, ConsensusError, NodeConfig, NodeId, Status};
use raft::eraftpb::{ConfState, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::mpsc;

pub(crate) use cycle::{PersistEvents, Persisted};
#[cfg(test)]
pub(crate) use membership::voter_changes;
pub(crate) use snapshots::SaveJob;
pub(crate) use waiters::Reply;

use crate::mapping;
use crate::storage::{DiskStorage, SnapshotData};
use membership::AddressBook;
use waiters::Waiters;

/// Entry context marking a user command (raft-rs's own entries have an empty context), so even
/// a command that encodes to zero bytes is told apart from a new leader's empty entry.
const COMMAND_CONTEXT: &[u8] = b"c";

/// Knobs of the core, derived from [`NodeConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Entries kept behind a snapshot.
    pub(crate) keep_logs_after_snapshot: u64,
    /// Most bytes of entry data kept behind a snapshot.
    pub(crate) keep_log_bytes_after_snapshot: u64,
    /// Largest command accepted (it must fit in one transport frame).
    pub(crate) max_command_bytes: usize,
    /// Re-issue a read-index request after this many ticks without an answer (raft-rs drops
    /// one silently while a new leader has not committed in its term yet).
    pub(crate) read_retry_ticks: u64,
}

impl Settings {
    pub(crate) fn from_config(c: &NodeConfig) -> Self {
        Self {
            keep_logs_after_snapshot: c.keep_logs_after_snapshot,
            keep_log_bytes_after_snapshot: c.keep_log_bytes_after_snapshot,
            max_command_bytes: c.max_command_bytes(),
            read_retry_ticks: 3,
        }
    }
}

/// One node's raft-rs state plus the requests waiting on it.
pub(crate) struct Core {
    id: NodeId,
    raw: RawNode<DiskStorage>,
    sm: Arc<dyn ByteStateMachine>,
    settings: Settings,
    applied: u64,
    /// Member addresses, and the transport peer changes they imply.
    book: AddressBook,
    /// Requests waiting on the log, and answers not yet delivered.
    waiters: Waiters,
    ticks: u64,
    outbox: Vec<Message>,
    /// Index of the snapshot being written, if any.
    saving: Option<u64>,
    /// A snapshot taken and not yet handed to a writer.
    save_job: Option<SaveJob>,
    /// The files of the `MsgSnapshot`s stepped and not yet installed, by (index, term), for
    /// the Ready that installs one of them. More than one when a second snapshot message (a
    /// retry, or a new leader's) is stepped before the Ready of the first: raft-rs may keep
    /// either pending, so each keeps its file until a snapshot at or past it is installed.
    incoming: std::collections::BTreeMap<(u64, u64), consensus_storage::SnapshotFile>,
    /// Sends durability notices from the log writer to [`PersistEvents`].
    persist_tx: mpsc::UnboundedSender<Persisted>,
    /// Readies whose durability notice has not come back yet.
    in_flight: usize,
    /// When the next automatic snapshot is due.
    pacer: SnapshotPacer,
    /// Peer messages refused before raft-rs saw them (shared with the transport's handler).
    refused: RefusedMessages,
    /// When each member last answered and was last caught up (while this node leads), for
    /// the status's replication view. Behind a lock because the status is built from `&self`.
    replication: parking_lot::Mutex<ReplicationTracker>,
}

fn not_leader_hint(leader: u64, me: NodeId) -> Option<NodeId> {
    (leader != raft::INVALID_ID && leader != me).then_some(leader)
}

impl Core {
    /// Builds the node from its opened storage: bootstraps a fresh initial member exactly once,
    /// restores the state machine from the latest snapshot otherwise.
    pub(crate) fn new(
        config: &NodeConfig,
        mut storage: DiskStorage,
        sm: Arc<dyn ByteStateMachine>,
        logger: &slog::Logger,
    ) -> Result<(Self, PersistEvents), ConsensusError> {
        let id = config.id;
        let storage_err = |e: raft::Error| ConsensusError::Storage(e.to_string());
        if storage.is_fresh() && config.initial_members.contains_key(&id) {
            let data = SnapshotData::encode(&config.initial_members, &sm.snapshot()?)?;
            storage
                .bootstrap(config.initial_members.keys().copied().collect(), data)
                .map_err(storage_err)?;
            tracing::info!(id, voters = ?config.initial_members.keys(), "bootstrapped a new cluster");
        }
        let (snap_index, _) = storage.snapshot_position();
        let mut addresses = BTreeMap::new();
        let file = storage.snapshot_file().cloned();
        let pacer = SnapshotPacer::new(config, file.as_ref().map(|f| f.data_len()).unwrap_or(0));
        if snap_index > 0 {
            let file = file.ok_or_else(|| {
                ConsensusError::Storage(format!(
                    "the snapshot at index {snap_index} has no file in {}",
                    config.data_dir.display()
                ))
            })?;
            let mut source = file.data();
            addresses = SnapshotData::read_book(&mut source)?;
            sm.restore_from(&mut source)?;
        }
        let cfg = mapping::raft_config(config, snap_index)?;
        let raw = RawNode::new(&cfg, storage, logger).map_err(|e| mapping::raft(e, None))?;
        let (persist_tx, persist_events) = mpsc::unbounded_channel();
        let core = Self {
            id,
            raw,
            sm,
            settings: Settings::from_config(config),
            applied: snap_index,
            book: AddressBook::restored(addresses),
            waiters: Waiters::default(),
            ticks: 0,
            outbox: Vec::new(),
            saving: None,
            save_job: None,
            incoming: Default::default(),
            persist_tx,
            in_flight: 0,
            pacer,
            refused: RefusedMessages::new(id),
            replication: Default::default(),
        };
        Ok((core, persist_events))
    }

    fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    fn leader_hint(&self) -> Option<NodeId> {
        not_leader_hint(self.raw.raft.leader_id, self.id)
    }

    fn check_leader(&self) -> Result<(), ConsensusError> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(ConsensusError::NotLeader {
                leader: self.leader_hint(),
            })
        }
    }

    fn conf_state(&self) -> ConfState {
        self.raw.raft.prs().conf().to_conf_state()
    }

    // ---- outputs -------------------------------------------------------------------------

    /// Delivers the answers of the last cycles (call after publishing the status).
    pub(crate) fn deliver(&mut self) {
        self.waiters.deliver();
    }

    /// Messages to send, in order.
    pub(crate) fn take_outbox(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Peers to add (`Some(addr)`) or forget (`None`) on the transport.
    pub(crate) fn take_peer_changes(&mut self) -> Vec<(NodeId, Option<String>)> {
        self.book.take_changes()
    }

    /// The shared status of this node.
    pub(crate) fn status(&self) -> Status {
        let mut st = mapping::status(&self.raw, self.applied, self.book.known());
        st.refused_messages = self.refused.count();
        let mut tracker = self.replication.lock();
        if self.is_leader() {
            let prs = self.raw.raft.prs();
            let matched = prs
                .iter()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, p)| (*id, p.matched));
            st.replication = tracker.progress(st.commit_index, matched);
        } else {
            tracker.clear();
        }
        st
    }

    /// The count of refused peer messages, for the transport's handler to record into.
    pub(crate) fn refusals(&self) -> RefusedMessages {
        self.refused.clone()
    }

    // ---- inputs --------------------------------------------------------------------------

    /// One clock tick (a heartbeat interval).
    pub(crate) fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        if let Err(e) = self.maybe_snapshot() {
            tracing::warn!(id = self.id, "snapshot failed: {e}");
        }
        if self.is_leader() {
            let retry = self.settings.read_retry_ticks;
            for ctx in self.waiters.reads_to_retry(self.ticks, retry) {
                self.raw.read_index(ctx);
            }
        }
        self.after_progress();
    }

    /// A message from a peer. One that would break raft-rs's invariants is refused (counted,
    /// logged, and otherwise without effect; see `guard.rs`), except that a heartbeat from the
    /// leader committing past this log is answered with rejections that make the leader
    /// re-send the missing tail.
    pub(crate) fn step(&mut self, msg: Message) {
        if self.refuse(&msg) {
            return;
        }
        let (from, ty) = (msg.from, msg.get_msg_type());
        if self.is_leader() && msg.term == self.raw.raft.term {
            self.replication.lock().heard_from(from);
        }
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(id = self.id, from, ?ty, "message not stepped: {e}");
        }
    }

    /// Checks a peer's message before raft-rs sees it; `true` if it was refused.
    fn refuse(&mut self, msg: &Message) -> bool {
        let Err(why) = guard::check(&self.raw.raft, msg) else {
            return false;
        };
        if matches!(why, guard::Refusal::CommitBeyondLog { .. })
            && guard::from_followed_leader(&self.raw.raft, msg)
        {
            self.outbox
                .extend(guard::lost_tail_answers(&self.raw.raft, msg));
        }
        let kind = format!("{:?}", msg.get_msg_type());
        self.refused.record(msg.from, &kind, why);
        true
    }

    /// The transport could not deliver to `to`.
    pub(crate) fn report_unreachable(&mut self, to: NodeId) {
        self.raw.report_unreachable(to);
    }

    /// Outcome of sending a snapshot to `to`.
    pub(crate) fn report_snapshot(&mut self, to: NodeId, delivered: bool) {
        if !delivered {
            self.raw.report_unreachable(to);
        }
        let status = if delivered {
            SnapshotStatus::Finish
        } else {
            SnapshotStatus::Failure
        };
        self.raw.report_snapshot(to, status);
    }

    // ---- requests ------------------------------------------------------------------------

    /// Proposes a user command; `reply` gets the state machine's answer once it is applied.
    pub(crate) fn propose(&mut self, command: Vec<u8>, reply: Reply<Vec<u8>>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        if command.len() > self.settings.max_command_bytes {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "command of {} bytes exceeds the limit of {} (half the transport frame limit)",
                command.len(),
                self.settings.max_command_bytes
            ))));
            return;
        }
        match self.raw.propose(COMMAND_CONTEXT.to_vec(), command) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                self.waiters.command_proposed(index, term, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(mapping::raft(e, self.leader_hint())));
            }
        }
    }

    /// Starts a linearizable read: `reply` gets the read index once a quorum confirmed this
    /// node still leads.
    pub(crate) fn read_index(&mut self, reply: Reply<u64>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        let ctx = self.waiters.read_started(reply, self.ticks);
        self.raw.read_index(ctx);
    }

    // ---- shutdown ------------------------------------------------------------------------

    /// Fails every waiting request (the node is stopping or its storage failed).
    pub(crate) fn fail_all(&mut self, e: &ConsensusError) {
        self.waiters.fail_all(e);
    }

    /// The storage, to flush and close at shutdown.
    pub(crate) fn storage(&self) -> &DiskStorage {
        self.raw.store()
    }
}
