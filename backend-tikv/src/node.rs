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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use consensus_api::{
    codec, ByteStateMachine, ConsensusError, NodeConfig, NodeId, Role, SnapshotPacer, Status,
};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    Message, Snapshot,
};
use raft::{RawNode, ReadOnlyOption, ReadState, SnapshotStatus, StateRole};
use tokio::sync::{mpsc, oneshot};

use crate::mapping;
use crate::storage::{DiskStorage, SnapshotData, SnapshotWriter};

/// Where the answer to a request goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ConsensusError>>;

/// Entry context marking a user command (raft-rs's own entries have an empty context), so even
/// a command that encodes to zero bytes is told apart from a new leader's empty entry.
const COMMAND_CONTEXT: &[u8] = b"c";

/// Knobs of the core, derived from [`NodeConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Entries kept behind a snapshot.
    pub(crate) keep_logs_after_snapshot: u64,
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
            max_command_bytes: c.transport.max_frame_bytes / 2,
            read_retry_ticks: 3,
        }
    }
}

/// raft-rs settings from the shared configuration: one tick per heartbeat interval.
pub(crate) fn raft_config(c: &NodeConfig, applied: u64) -> Result<raft::Config, ConsensusError> {
    let hb = c.heartbeat_interval.as_micros().max(1);
    let ticks = |d: std::time::Duration| d.as_micros().div_ceil(hb) as usize;
    let election = ticks(c.election_timeout_min).max(3);
    let cfg = raft::Config {
        id: c.id,
        heartbeat_tick: 1,
        election_tick: election,
        min_election_tick: election,
        // Exclusive upper bound: timeouts are drawn from [min, max).
        max_election_tick: ticks(c.election_timeout_max).max(election) + 1,
        applied,
        max_size_per_msg: (c.transport.max_frame_bytes as u64 / 4).clamp(64 << 10, 1 << 20),
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| ConsensusError::InvalidRequest(format!("raft-rs config: {e}")))?;
    Ok(cfg)
}

enum Pending {
    Command {
        term: u64,
        reply: Reply<Vec<u8>>,
    },
    Conf {
        term: u64,
        reply: Reply<()>,
        learner: Option<NodeId>,
    },
}

impl Pending {
    fn term(&self) -> u64 {
        match self {
            Pending::Command { term, .. } | Pending::Conf { term, .. } => *term,
        }
    }

    fn fail(self, e: ConsensusError) {
        match self {
            Pending::Command { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Pending::Conf { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

struct PendingRead {
    reply: Reply<u64>,
    issued_tick: u64,
}

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

/// A snapshot to make durable off the driver: run [`SaveJob::run`] anywhere, then hand the job
/// back to [`Core::snapshot_saved`].
pub(crate) struct SaveJob {
    snap: Snapshot,
    compact_to: u64,
    writer: SnapshotWriter,
}

impl SaveJob {
    /// Writes the snapshot file with fsync (blocking).
    pub(crate) fn run(&self) -> Result<(), String> {
        self.writer
            .save(&self.snap)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn not_leader_hint(leader: u64, me: NodeId) -> Option<NodeId> {
    (leader != raft::INVALID_ID && leader != me).then_some(leader)
}

fn discarded() -> ConsensusError {
    // Same kind as the openraft backend's `LogEntryDiscarded`: the caller cannot tell whether
    // another leader's log holds an equal command, so the outcome counts as unknown.
    ConsensusError::Timeout(
        "the proposal's outcome (leadership moved before it committed and its entry was replaced)"
            .into(),
    )
}

fn members(cs: &ConfState) -> BTreeSet<NodeId> {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next)
        .copied()
        .collect()
}

fn is_joint(cs: &ConfState) -> bool {
    !cs.voters_outgoing.is_empty()
}

fn single(id: NodeId, ty: ConfChangeType) -> ConfChangeSingle {
    let mut s = ConfChangeSingle {
        node_id: id,
        ..Default::default()
    };
    s.set_change_type(ty);
    s
}

/// The changes that turn `cs` into a configuration whose voters are exactly `voters`: learners
/// in `voters` are promoted, voters not in it are demoted to learners. Every new voter must
/// already be a member (added as a learner first, so it has caught up).
pub(crate) fn voter_changes(
    cs: &ConfState,
    voters: &BTreeSet<NodeId>,
) -> Result<Vec<ConfChangeSingle>, ConsensusError> {
    if voters.is_empty() {
        return Err(ConsensusError::InvalidRequest(
            "the voter set must not be empty".into(),
        ));
    }
    let current: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
    let learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
    let mut changes = Vec::new();
    for id in voters {
        if current.contains(id) {
            continue;
        }
        if !learners.contains(id) {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {id} must be added as a learner before it can become a voter"
            )));
        }
        changes.push(single(*id, ConfChangeType::AddNode));
    }
    for id in current.difference(voters) {
        changes.push(single(*id, ConfChangeType::AddLearnerNode));
    }
    Ok(changes)
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

    fn later<T: Send + 'static>(&mut self, reply: Reply<T>, v: Result<T, ConsensusError>) {
        self.deferred.push(Box::new(move || {
            let _ = reply.send(v);
        }));
    }

    fn fail_later(&mut self, p: Pending, e: ConsensusError) {
        match p {
            Pending::Command { reply, .. } => self.later(reply, Err(e)),
            Pending::Conf { reply, .. } => self.later(reply, Err(e)),
        }
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
                self.pending.insert(index, Pending::Command { term, reply });
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
        let ctx = self.next_read;
        self.next_read += 1;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                issued_tick: self.ticks,
            },
        );
    }

    fn propose_conf(
        &mut self,
        changes: Vec<ConfChangeSingle>,
        addresses: BTreeMap<NodeId, String>,
        learner: Option<NodeId>,
        reply: Reply<()>,
    ) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        // raft-rs would silently turn a second concurrent change into an empty entry: refuse it
        // here instead, like openraft refuses a change while one is in progress.
        if self.raw.raft.has_pending_conf() || is_joint(&self.conf_state()) {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(
                "membership change refused: another change is in progress; retry once it completes"
                    .into(),
            )));
            return;
        }
        if changes.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(changes.into());
        if !addresses.is_empty() {
            match codec::encode(&addresses) {
                Ok(b) => cc.context = b.into(),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                self.pending.insert(
                    index,
                    Pending::Conf {
                        term,
                        reply,
                        learner,
                    },
                );
            }
            Err(e) => {
                let _ = reply.send(Err(mapping::raft(e, self.leader_hint())));
            }
        }
    }

    /// Adds `id` as a learner; `reply` fires once it is a member and has caught up to the
    /// change (or this node stopped leading, the change being committed).
    pub(crate) fn add_learner(&mut self, id: NodeId, addr: String, reply: Reply<()>) {
        let cs = self.conf_state();
        if members(&cs).contains(&id) {
            // Idempotent: already a member (a retried request lands here).
            let _ = reply.send(self.check_leader());
            return;
        }
        if self.is_leader() {
            self.peer_changes.push((id, Some(addr.clone())));
        }
        let changes = vec![single(id, ConfChangeType::AddLearnerNode)];
        self.propose_conf(changes, BTreeMap::from([(id, addr)]), Some(id), reply);
    }

    /// Makes `voters` the voting set (several changes go through joint consensus).
    pub(crate) fn change_voters(&mut self, voters: BTreeSet<NodeId>, reply: Reply<()>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        match voter_changes(&self.conf_state(), &voters) {
            Ok(changes) => self.propose_conf(changes, BTreeMap::new(), None, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Removes a voter or learner entirely.
    pub(crate) fn remove_node(&mut self, id: NodeId, reply: Reply<()>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        let cs = self.conf_state();
        if !members(&cs).contains(&id) {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "node {id} is not a member"
            ))));
            return;
        }
        if cs.voters == [id] {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "node {id} is the last voter"
            ))));
            return;
        }
        let changes = vec![single(id, ConfChangeType::RemoveNode)];
        self.propose_conf(changes, BTreeMap::new(), None, reply);
    }

    /// Asks raft-rs to hand leadership to `to`.
    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), ConsensusError> {
        self.check_leader()?;
        if !self.conf_state().voters.contains(&to) {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {to} is not a voter; only voters can lead"
            )));
        }
        if to != self.id {
            self.raw.transfer_leader(to);
        }
        Ok(())
    }

    /// Asks for a snapshot covering everything applied now; `reply` gets the snapshot's index
    /// once its file is durable and the log compacted.
    pub(crate) fn snapshot_now(&mut self, reply: Reply<u64>) {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_none() && self.applied <= snap_index {
            let to = snap_index.saturating_sub(self.settings.keep_logs_after_snapshot);
            let r = self
                .raw
                .mut_store()
                .compact(to)
                .map(|()| snap_index)
                .map_err(|e| mapping::raft(e, None));
            self.later(reply, r);
            return;
        }
        self.snapshot_waiters.push((self.applied, reply));
        if let Err(e) = self.start_snapshot() {
            for (_, r) in std::mem::take(&mut self.snapshot_waiters) {
                self.later(r, Err(e.clone()));
            }
        }
    }

    /// Takes the state machine's snapshot at the applied index (it must be consistent, so here,
    /// between applies) and hands writing it to [`Core::take_save_job`]'s taker; one at a time.
    fn start_snapshot(&mut self) -> Result<(), ConsensusError> {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_some() || self.applied <= snap_index {
            return Ok(());
        }
        let applied = self.applied;
        let term = self
            .raw
            .raft
            .raft_log
            .term(applied)
            .map_err(|e| mapping::raft(e, None))?;
        let data = SnapshotData::encode(&self.addresses, &self.sm.snapshot()?)?;
        self.pacer.taken(data.len());
        let mut snap = Snapshot::default();
        snap.mut_metadata().set_conf_state(self.conf_state());
        snap.mut_metadata().index = applied;
        snap.mut_metadata().term = term;
        snap.data = data.into();
        self.saving = Some(applied);
        self.save_job = Some(SaveJob {
            snap,
            compact_to: applied.saturating_sub(self.settings.keep_logs_after_snapshot),
            writer: self.raw.store().snapshot_writer(),
        });
        Ok(())
    }

    /// A snapshot to write off the driver (file + fsync), if one was started.
    pub(crate) fn take_save_job(&mut self) -> Option<SaveJob> {
        self.save_job.take()
    }

    /// The outcome of a [`SaveJob`]: record the snapshot, compact, answer the waiters it
    /// covers, and start the next one if a waiter needs a newer snapshot.
    pub(crate) fn snapshot_saved(&mut self, job: SaveJob, outcome: Result<(), String>) {
        self.saving = None;
        let index = job.snap.get_metadata().index;
        let recorded = outcome.map_err(ConsensusError::Storage).and_then(|()| {
            self.raw
                .mut_store()
                .snapshot_saved(job.snap, job.compact_to)
                .map_err(|e| mapping::raft(e, None))
        });
        if let Err(e) = recorded {
            tracing::warn!(id = self.id, index, "snapshot not saved: {e}");
            for (_, r) in std::mem::take(&mut self.snapshot_waiters) {
                self.later(r, Err(e.clone()));
            }
            return;
        }
        tracing::debug!(id = self.id, index, "took a snapshot");
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.snapshot_waiters)
            .into_iter()
            .partition(|(min, _)| *min <= index);
        for (_, r) in done {
            self.later(r, Ok(index));
        }
        self.snapshot_waiters = waiting;
        if !self.snapshot_waiters.is_empty() {
            if let Err(e) = self.start_snapshot() {
                for (_, r) in std::mem::take(&mut self.snapshot_waiters) {
                    self.later(r, Err(e.clone()));
                }
            }
        }
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

    /// Snapshots when the [`SnapshotPacer`] says so, or when raft-rs asked for a fresher
    /// snapshot to send.
    fn maybe_snapshot(&mut self) -> Result<(), ConsensusError> {
        let requested = self.raw.store().take_snapshot_request();
        if requested || self.pacer.due() {
            self.start_snapshot()?;
        }
        Ok(())
    }

    fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), ConsensusError> {
        let (index, term) = {
            let m = snap.get_metadata();
            (m.index, m.term)
        };
        let (book, state) = SnapshotData::decode(&snap.data)?;
        self.sm.restore(state)?;
        self.raw
            .mut_store()
            .apply_snapshot(snap)
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        tracing::info!(id = self.id, index, term, "installed a snapshot");
        self.applied = index;
        for gone in self.addresses.keys().filter(|i| !book.contains_key(i)) {
            self.peer_changes.push((*gone, None));
        }
        for (i, a) in &book {
            self.peer_changes.push((*i, Some(a.clone())));
        }
        self.addresses = book;
        while let Some(e) = self.pending.first_entry() {
            if *e.key() > index {
                break;
            }
            let p = e.remove();
            self.fail_later(p, discarded());
        }
        Ok(())
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

    /// Applies a committed membership entry: records the addresses it carries, then lets
    /// raft-rs switch configuration. Every node reaches the same outcome.
    fn apply_conf(&mut self, e: &Entry) -> Result<ConfState, ConsensusError> {
        let undecodable = |err: protobuf::ProtobufError| {
            ConsensusError::Internal(format!("undecodable conf change at {}: {err}", e.index))
        };
        // raft-rs only proposes V2 for us; a V1 entry is still applied as such.
        let (context, applied) = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let cc = ConfChangeV2::parse_from_carllerche_bytes(&e.data).map_err(undecodable)?;
            (cc.context.clone(), self.raw.apply_conf_change(&cc))
        } else {
            let cc = ConfChange::parse_from_carllerche_bytes(&e.data).map_err(undecodable)?;
            (cc.context.clone(), self.raw.apply_conf_change(&cc))
        };
        let cs = applied.map_err(|err| {
            tracing::warn!(
                id = self.id,
                index = e.index,
                "conf change not applied: {err}"
            );
            mapping::raft(err, None)
        })?;
        if !context.is_empty() {
            match codec::decode::<BTreeMap<NodeId, String>>(&context) {
                Ok(addrs) => {
                    for (i, a) in addrs {
                        self.peer_changes.push((i, Some(a.clone())));
                        self.addresses.insert(i, a);
                    }
                }
                Err(err) => tracing::warn!(index = e.index, "conf change context: {err}"),
            }
        }
        let now = members(&cs);
        let gone: Vec<NodeId> = self
            .addresses
            .keys()
            .filter(|i| !now.contains(i) && **i != self.id)
            .copied()
            .collect();
        for i in gone {
            self.addresses.remove(&i);
            self.peer_changes.push((i, None));
        }
        tracing::info!(id = self.id, index = e.index, conf = ?cs, "membership changed");
        Ok(cs)
    }

    /// Takes the proposal at `index` if it was made in `term`; proposals below it (or made in
    /// another term at it) were replaced by another leader's entries and fail.
    fn take_pending(&mut self, index: u64, term: u64) -> Option<Pending> {
        let mut found = None;
        while let Some(e) = self.pending.first_entry() {
            if *e.key() > index {
                break;
            }
            let at = *e.key();
            let p = e.remove();
            if at == index && p.term() == term {
                found = Some(p);
            } else {
                self.fail_later(p, discarded());
            }
        }
        found
    }

    fn complete_reads(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(r) = self.reads.remove(&u64::from_be_bytes(ctx)) {
                self.later(r.reply, Ok(rs.index));
            }
        }
    }

    /// Housekeeping after anything moved: waiters that depend on the role, learner catch-up,
    /// and leaving a joint configuration a previous leader entered.
    fn after_progress(&mut self) {
        if !self.is_leader() {
            let leader = self.leader_hint();
            for (_, r) in std::mem::take(&mut self.reads) {
                self.later(r.reply, Err(ConsensusError::NotLeader { leader }));
            }
            // The learner is a member (the change committed); catching up is the new
            // leader's business.
            for (_, _, r) in std::mem::take(&mut self.learner_waits) {
                self.later(r, Ok(()));
            }
            return;
        }
        let mut waiting = Vec::new();
        for (id, index, reply) in std::mem::take(&mut self.learner_waits) {
            match self.raw.raft.prs().get(id) {
                Some(p) if p.matched < index => waiting.push((id, index, reply)),
                _ => self.later(reply, Ok(())),
            }
        }
        self.learner_waits = waiting;
        if is_joint(&self.conf_state()) && !self.raw.raft.has_pending_conf() {
            // raft-rs leaves a joint config automatically only if the leader that entered it
            // applied it; a later leader must propose the leave itself.
            if let Err(e) = self
                .raw
                .propose_conf_change(Vec::new(), ConfChangeV2::default())
            {
                tracing::debug!(
                    id = self.id,
                    "could not propose leaving the joint config: {e}"
                );
            }
        }
    }

    /// Fails every waiting request (the node is stopping or its storage failed).
    pub(crate) fn fail_all(&mut self, e: &ConsensusError) {
        self.deliver();
        for (_, p) in std::mem::take(&mut self.pending) {
            p.fail(e.clone());
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            let _ = r.reply.send(Err(e.clone()));
        }
        for r in self.joint_waits.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        for (_, _, r) in self.learner_waits.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        for (_, r) in self.snapshot_waiters.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
    }

    /// The shared status of this node.
    pub(crate) fn status(&self) -> Status {
        let raft = &self.raw.raft;
        let cs = self.conf_state();
        let voters: BTreeSet<NodeId> = cs
            .voters
            .iter()
            .chain(&cs.voters_outgoing)
            .copied()
            .collect();
        let learners: BTreeSet<NodeId> = cs
            .learners
            .iter()
            .chain(&cs.learners_next)
            .copied()
            .collect();
        let role = match raft.state {
            StateRole::Leader => Role::Leader,
            StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
            StateRole::Follower if voters.contains(&self.id) => Role::Follower,
            StateRole::Follower => Role::Learner,
        };
        let store = self.raw.store();
        Status {
            id: self.id,
            role,
            term: raft.term,
            leader: (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id),
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            last_log_index: raft.raft_log.last_index(),
            snapshot_index: store.snapshot_position().0,
            purged_index: store.purged_index(),
            addresses: self
                .addresses
                .iter()
                .filter(|(i, _)| voters.contains(i) || learners.contains(i))
                .map(|(i, a)| (*i, a.clone()))
                .collect(),
            voters,
            learners,
        }
    }

    /// The storage, to flush and close at shutdown.
    pub(crate) fn storage(&self) -> &DiskStorage {
        self.raw.store()
    }
}
