//! The decisions of one node as plain synchronous code: what to propose, what a `Ready` means,
//! which waiter an applied entry completes. No network, no timers, no tasks: the driver
//! ([`crate::driver`]) feeds it and ships what it produces, and unit tests drive several cores
//! against each other directly (the quinn-proto idea: a state machine you can test by calling
//! it).
//!
//! One Ready cycle ([`Core::cycle`]) never waits for the disk (raft-rs's asynchronous
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
//! The module, by concern: this file holds the Ready cycle and the apply loop at the centre;
//! [`waiters`] the requests answered later; [`membership`] conf changes; [`snapshots`] taking,
//! saving and installing snapshots. Configuration and status mapping live in
//! [`crate::mapping`].
//!
//! Inputs (call in any order, between cycles): [`Core::tick`], [`Core::step`], the request
//! methods (`propose`, `read_index`, `add_learner`, ...), [`Core::persisted`] (a durability
//! notice), [`Core::snapshot_saved`], `report_unreachable` / `report_snapshot`. Then
//! [`Core::cycle`] until it reports no progress. Outputs, after each cycle: `take_outbox`
//! (messages to send), `take_peer_changes` (addresses to set or drop), `take_save_job` (a
//! snapshot file to write), [`Core::status`] (publish it first), then [`Core::deliver`] (the
//! answers).

mod membership;
mod snapshots;
mod waiters;

use std::collections::BTreeMap;
use std::sync::Arc;

use consensus_api::backend_support::SnapshotPacer;
use consensus_api::{ByteStateMachine, ConsensusError, NodeConfig, NodeId, Status};
use raft::eraftpb::{ConfState, Entry, EntryType, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::mpsc;

use crate::mapping::{self, raft_config, Settings};
use crate::storage::{DiskStorage, SnapshotData};

use membership::is_joint;
#[cfg(test)]
pub(crate) use membership::voter_changes;
pub(crate) use snapshots::SaveJob;
pub(crate) use waiters::Reply;
use waiters::{discarded, not_leader_hint, Pending, PendingRead};

/// Entry context marking a user command (raft-rs's own entries have an empty context), so even
/// a command that encodes to zero bytes is told apart from a new leader's empty entry.
const COMMAND_CONTEXT: &[u8] = b"c";

/// A Ready's writes became durable (or failed): what [`Core::persisted`] needs.
pub(crate) struct Persisted {
    number: u64,
    messages: Vec<Message>,
    outcome: Result<(), String>,
}

/// Where durability notices arrive; the driver waits on it next to its other inputs.
pub(crate) type PersistEvents = mpsc::UnboundedReceiver<Persisted>;

/// One node's raft-rs state plus the requests waiting on it.
pub(crate) struct Core {
    id: NodeId,
    raw: RawNode<DiskStorage>,
    sm: Arc<dyn ByteStateMachine>,
    settings: Settings,
    applied: u64,
    addresses: BTreeMap<NodeId, String>,
    /// Proposals by log index.
    pending: BTreeMap<u64, Pending>,
    /// Membership changes that entered a joint configuration, waiting for it to be left.
    joint_waits: Vec<Reply<()>>,
    /// Added learners the leader waits to see caught up to the change's index.
    learner_waits: Vec<(NodeId, u64, Reply<()>)>,
    reads: BTreeMap<u64, PendingRead>,
    next_read: u64,
    ticks: u64,
    outbox: Vec<Message>,
    peer_changes: Vec<(NodeId, Option<String>)>,
    /// Answers produced by a cycle, delivered by [`Core::deliver`] once the status that
    /// reflects them is published (a client that sees its answer also sees the new status).
    deferred: Vec<Box<dyn FnOnce() + Send>>,
    /// Index of the snapshot being written, if any.
    saving: Option<u64>,
    /// A snapshot taken and not yet handed to a writer.
    save_job: Option<SaveJob>,
    /// `snapshot_now` callers: the applied index when they asked, and where the answer goes.
    snapshot_waiters: Vec<(u64, Reply<u64>)>,
    /// Sends durability notices from the log writer to [`PersistEvents`].
    persist_tx: mpsc::UnboundedSender<Persisted>,
    /// Readies whose durability notice has not come back yet.
    in_flight: usize,
    /// When the next automatic snapshot is due.
    pacer: SnapshotPacer,
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
        let pacer = SnapshotPacer::new(config, storage.latest_snapshot().data.len() as u64);
        if snap_index > 0 {
            let (book, state) = SnapshotData::decode(&storage.latest_snapshot().data)?;
            sm.restore(state)?;
            addresses = book;
        }
        let cfg = raft_config(config, snap_index)?;
        let raw = RawNode::new(&cfg, storage, logger).map_err(|e| mapping::raft(e, None))?;
        let peer_changes = addresses
            .iter()
            .map(|(i, a)| (*i, Some(a.clone())))
            .collect();
        let (persist_tx, persist_events) = mpsc::unbounded_channel();
        let core = Self {
            id,
            raw,
            sm,
            settings: Settings::from_config(config),
            applied: snap_index,
            addresses,
            pending: BTreeMap::new(),
            joint_waits: Vec::new(),
            learner_waits: Vec::new(),
            reads: BTreeMap::new(),
            next_read: 1,
            ticks: 0,
            outbox: Vec::new(),
            peer_changes,
            deferred: Vec::new(),
            saving: None,
            save_job: None,
            snapshot_waiters: Vec::new(),
            persist_tx,
            in_flight: 0,
            pacer,
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

    /// Delivers the answers of the last cycles (call after publishing the status).
    pub(crate) fn deliver(&mut self) {
        for f in self.deferred.drain(..) {
            f();
        }
    }

    /// Messages to send, in order.
    pub(crate) fn take_outbox(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outbox)
    }

    /// Peers to add (`Some(addr)`) or forget (`None`) on the transport.
    pub(crate) fn take_peer_changes(&mut self) -> Vec<(NodeId, Option<String>)> {
        std::mem::take(&mut self.peer_changes)
    }

    /// Adds addresses a peer told us about for members we cannot reach yet (a node that joined
    /// empty learns the cluster this way). Known addresses are never overridden: those come
    /// from the log.
    pub(crate) fn learn_addresses(&mut self, book: BTreeMap<NodeId, String>) {
        for (id, addr) in book {
            if id != self.id && !self.addresses.contains_key(&id) {
                self.peer_changes.push((id, Some(addr.clone())));
                self.addresses.insert(id, addr);
            }
        }
    }

    /// The member addresses this node knows.
    pub(crate) fn address_book(&self) -> BTreeMap<NodeId, String> {
        self.addresses.clone()
    }

    /// One clock tick (a heartbeat interval).
    pub(crate) fn tick(&mut self) {
        self.raw.tick();
        self.ticks += 1;
        if let Err(e) = self.maybe_snapshot() {
            tracing::warn!(id = self.id, "snapshot failed: {e}");
        }
        if self.is_leader() {
            let retry = self.settings.read_retry_ticks;
            let due: Vec<u64> = self
                .reads
                .iter()
                .filter(|(_, r)| self.ticks - r.issued_tick >= retry)
                .map(|(c, _)| *c)
                .collect();
            for ctx in due {
                self.raw.read_index(ctx.to_be_bytes().to_vec());
                if let Some(r) = self.reads.get_mut(&ctx) {
                    r.issued_tick = self.ticks;
                }
            }
        }
        self.after_progress();
    }

    /// A message from a peer.
    pub(crate) fn step(&mut self, msg: Message) {
        let (from, ty) = (msg.from, msg.get_msg_type());
        if let Err(e) = self.raw.step(msg) {
            tracing::debug!(id = self.id, from, ?ty, "message not stepped: {e}");
        }
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

    /// Handles one Ready without waiting for the disk (see the module docs). `false`: there was
    /// nothing to do.
    pub(crate) fn cycle(&mut self) -> Result<bool, ConsensusError> {
        if !self.raw.has_ready() {
            return Ok(false);
        }
        let storage = |e: raft::Error| ConsensusError::Storage(e.to_string());
        let mut rd = self.raw.ready();
        self.outbox.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        self.apply(rd.take_committed_entries())?;
        self.complete_reads(rd.take_read_states());
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries()).map_err(storage)?;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs).map_err(storage)?;
        }
        // raft-rs: without new entries, a snapshot, or a new term or vote (a hard state that
        // only moved the commit index), the write may complete asynchronously: it rides on the
        // next sync instead of holding this Ready's messages back.
        let wrote = rd.must_sync();
        let number = rd.number();
        let messages = rd.take_persisted_messages();
        self.raw.advance_append_async(rd);
        self.report_applied();
        if wrote || self.in_flight > 0 {
            let tx = self.persist_tx.clone();
            self.raw
                .store()
                .on_durable(Box::new(move |outcome| {
                    let _ = tx.send(Persisted {
                        number,
                        messages,
                        outcome,
                    });
                }))
                .map_err(storage)?;
            self.in_flight += 1;
        } else {
            // Nothing written and nothing in flight: durable already.
            self.outbox.extend(messages);
            self.raw.on_persist_ready(number);
        }
        self.maybe_snapshot()?;
        self.after_progress();
        Ok(true)
    }

    /// Readies whose writes are not yet known durable.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A Ready's writes are durable: its persisted messages may leave, and raft-rs learns how
    /// far the log is stable (for a leader, its own vote towards the commit index).
    pub(crate) fn persisted(&mut self, p: Persisted) -> Result<(), ConsensusError> {
        self.in_flight = self.in_flight.saturating_sub(1);
        p.outcome.map_err(ConsensusError::Storage)?;
        self.outbox.extend(p.messages);
        self.raw.on_persist_ready(p.number);
        self.report_applied();
        Ok(())
    }

    /// Tells raft-rs what the state machine has applied, as far as raft-rs allows: an installed
    /// snapshot counts only once its Ready is persisted.
    fn report_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.raw.advance_apply_to(to);
        }
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ConsensusError> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.pacer.applied(e.data.len());
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let out = (e.context.as_ref() == COMMAND_CONTEXT)
                        .then(|| self.sm.apply(e.index, &e.data));
                    self.applied = e.index;
                    match self.take_pending(e.index, e.term) {
                        Some(Pending::Command { reply, .. }) => {
                            self.later(reply, Ok(out.unwrap_or_default()))
                        }
                        Some(other) => self.fail_later(
                            other,
                            ConsensusError::Internal(
                                "a membership change was answered by a command entry".into(),
                            ),
                        ),
                        None => {}
                    }
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let outcome = self.apply_conf(&e);
                    self.applied = e.index;
                    let leader = self.is_leader();
                    match (self.take_pending(e.index, e.term), &outcome) {
                        (Some(Pending::Conf { reply, learner, .. }), Ok(cs)) => {
                            if is_joint(cs) {
                                self.joint_waits.push(reply);
                            } else if let (Some(l), true) = (learner, leader) {
                                self.learner_waits.push((l, e.index, reply));
                            } else {
                                self.later(reply, Ok(()));
                            }
                        }
                        (Some(p), Err(err)) => self.fail_later(p, err.clone()),
                        (Some(other), Ok(_)) => self.fail_later(
                            other,
                            ConsensusError::Internal(
                                "a command was answered by a membership entry".into(),
                            ),
                        ),
                        (None, _) => {}
                    }
                    if outcome.as_ref().is_ok_and(|cs| !is_joint(cs)) {
                        for r in std::mem::take(&mut self.joint_waits) {
                            self.later(r, Ok(()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The shared status of this node.
    pub(crate) fn status(&self) -> Status {
        mapping::status(
            self.id,
            &self.raw,
            self.applied,
            &self.addresses,
            &self.conf_state(),
        )
    }

    /// The storage, to flush and close at shutdown.
    pub(crate) fn storage(&self) -> &DiskStorage {
        self.raw.store()
    }
}
