//! The driver: one tokio task per node that owns the [`Core`] (and so the `RawNode`), ticks it on
//! a timer, feeds it requests and peer messages, runs Ready cycles and ships what they produce.
//!
//! Batching: after waking up, the driver drains every request and message already queued before
//! it runs a cycle, so all proposals that arrived meanwhile share one Ready and one log append.
//! Cycles never wait for the disk: the log writer syncs in the background (everything queued
//! during one `fdatasync` shares the next one) and its notices come back on the
//! [`PersistEvents`] channel, next to requests, messages and ticks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::backend_support::RefusedMessages;
use consensus_api::{ConsensusError, InboundHandler, NodeId, Role, Status, Transport};
use consensus_storage::transfer::{SnapshotReceiver, SnapshotSender, Ticket};
use consensus_storage::SnapshotFile;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType, SnapshotMetadata};
use tokio::sync::{mpsc, oneshot, watch};

use crate::node::{Core, PersistEvents, Persisted, Reply, SaveJob};

/// Requests from the engine handle.
pub(crate) enum Command {
    Propose(Vec<u8>, Reply<Vec<u8>>),
    ReadIndex(Reply<u64>),
    AddLearner(NodeId, String, Reply<()>),
    ChangeVoters(BTreeSet<NodeId>, Reply<()>),
    RemoveNode(NodeId, Reply<()>),
    TransferLeader(NodeId, Reply<()>),
    Snapshot(Reply<u64>),
    Shutdown(oneshot::Sender<()>),
}

/// Most queued items taken per wake-up, so ticks are never starved.
const MAX_BATCH: usize = 4096;
/// Frame tag: a protobuf raft-rs `Message` follows.
pub(crate) const FRAME_RAFT: u8 = 0;
/// Frame tag: the sender's address book (codec-encoded `BTreeMap<NodeId, String>`) follows.
const FRAME_ADDRESSES: u8 = 1;
/// Ticks between address-book broadcasts.
const ADDRESS_BOOK_TICKS: u64 = 10;

/// What arrives on the engine channel.
pub(crate) enum Inbound {
    Raft(Message),
    /// A `MsgSnapshot` with the file its transfer delivered (complete and checked).
    Snapshot(Message, SnapshotFile),
    Addresses(BTreeMap<NodeId, String>),
}

/// See [`Backend::hostile_frames`](consensus_api::Backend::hostile_frames): raft-rs messages
/// from `leader` to follower `to` that would panic raft-rs or break its invariants.
pub(crate) fn hostile_frames(
    leader: NodeId,
    to: NodeId,
    st: &consensus_api::Status,
) -> Vec<(&'static str, Bytes)> {
    let (term, last) = (st.term, st.last_log_index);
    let msg = |ty: MessageType, term: u64| {
        let mut m = Message::default();
        m.set_msg_type(ty);
        (m.from, m.to, m.term) = (leader, to, term);
        m
    };
    let entry = |index: u64, term: u64| raft::eraftpb::Entry {
        index,
        term,
        ..Default::default()
    };
    let mut out = Vec::new();
    let mut m = msg(MessageType::MsgHeartbeat, term);
    m.commit = last + 1_000;
    out.push(("a heartbeat committing beyond the log", m));
    let mut m = msg(MessageType::MsgAppend, term);
    (m.index, m.log_term, m.commit) = (last, term, last + 3);
    m.set_entries(vec![entry(last + 1, term), entry(last + 3, term)].into());
    out.push(("an append with a gap between its entries", m));
    let mut m = msg(MessageType::MsgAppend, term);
    (m.index, m.log_term, m.commit) = (last + 10, 0, last + 10);
    out.push(("an append whose previous entry is beyond the log", m));
    let mut m = msg(MessageType::MsgRequestVote, 0);
    (m.index, m.log_term) = (last + 10, term);
    out.push(("a vote request of term 0", m));
    out.push(("an empty proposal", msg(MessageType::MsgPropose, 0)));
    out.push((
        "an empty read-index request",
        msg(MessageType::MsgReadIndex, 0),
    ));
    let mut m = msg(MessageType::MsgHeartbeat, term);
    m.from = leader.wrapping_add(1_000);
    out.push(("a message naming another sender", m));
    out.into_iter()
        .filter_map(|(what, m)| raft_frame(&m).ok().map(|f| (what, f)))
        .collect()
}

/// Encodes a raft-rs message behind its tag, in one buffer.
fn raft_frame(msg: &Message) -> Result<Bytes, protobuf::ProtobufError> {
    let mut buf = Vec::with_capacity(1 + msg.compute_size() as usize);
    buf.push(FRAME_RAFT);
    msg.write_to_vec(&mut buf)?;
    Ok(Bytes::from(buf))
}

pub(crate) struct Driver {
    pub(crate) core: Core,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) messages: mpsc::Receiver<Inbound>,
    pub(crate) persisted: PersistEvents,
    pub(crate) status: Arc<watch::Sender<Status>>,
    pub(crate) tick: Duration,
    pub(crate) snapshot_timeout: Duration,
    /// Streams snapshot files to followers (one transfer per follower at a time).
    pub(crate) snapshots: Arc<SnapshotSender>,
}

enum Flow {
    Continue,
    Stop(Option<oneshot::Sender<()>>),
    /// The log failed: stop, failing every waiter.
    Fail(ConsensusError),
}

/// What woke the driver's loop.
enum Woke {
    Command(Option<Command>),
    Message(Inbound),
    Persisted(Persisted),
    Report(NodeId, bool),
    Saved(SaveJob, Result<(), String>),
    Tick,
}

impl Woke {
    fn name(&self) -> &'static str {
        match self {
            Woke::Command(_) => "command",
            Woke::Message(_) => "message",
            Woke::Persisted(_) => "persisted",
            Woke::Report(..) => "snapshot report",
            Woke::Saved(..) => "snapshot saved",
            Woke::Tick => "tick",
        }
    }
}

/// A driver step longer than this is logged: heartbeats and acknowledgements wait for it.
const SLOW_STEP: Duration = Duration::from_millis(200);

impl Driver {
    pub(crate) async fn run(mut self) {
        let (report_tx, mut reports) = mpsc::unbounded_channel::<(NodeId, bool)>();
        let (saved_tx, mut saved) = mpsc::unbounded_channel::<(SaveJob, Result<(), String>)>();
        let mut ticks = 0u64;
        let mut last_tick = std::time::Instant::now();
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.ship(&report_tx);
        self.publish();
        let mut failure = None;
        let stop = loop {
            // What woke the loop is handled below, inside the timed step: a slow handler
            // (of a command, a message, a saved snapshot) shows in the warning as well.
            let woke = tokio::select! {
                cmd = self.commands.recv() => Woke::Command(cmd),
                Some(m) = self.messages.recv() => Woke::Message(m),
                Some(p) = self.persisted.recv() => Woke::Persisted(p),
                Some((to, ok)) = reports.recv() => Woke::Report(to, ok),
                Some((job, outcome)) = saved.recv() => Woke::Saved(job, outcome),
                _ = ticker.tick() => Woke::Tick,
            };
            let started = std::time::Instant::now();
            let event = woke.name();
            let flow = match woke {
                Woke::Command(Some(c)) => self.handle(c),
                // The engine handle is gone: nobody can ask anything any more.
                Woke::Command(None) => Flow::Stop(None),
                Woke::Message(m) => {
                    self.inbound(m);
                    Flow::Continue
                }
                Woke::Persisted(p) => match self.core.persisted(p) {
                    Ok(()) => Flow::Continue,
                    Err(e) => Flow::Fail(e),
                },
                Woke::Report(to, ok) => {
                    self.core.report_snapshot(to, ok);
                    Flow::Continue
                }
                Woke::Saved(job, outcome) => {
                    self.core.snapshot_saved(job, outcome);
                    Flow::Continue
                }
                Woke::Tick => {
                    let gap = last_tick.elapsed();
                    last_tick = started;
                    if gap > self.tick * 3 + SLOW_STEP {
                        // A slow step (warned about below) or a runtime that did not run
                        // this task: the election clock stood still, and heartbeats and
                        // answers waited as long.
                        tracing::warn!(
                            id = self.status.borrow().id,
                            gap_ms = gap.as_millis() as u64,
                            "raft-rs driver ticked late"
                        );
                    }
                    self.core.tick();
                    ticks += 1;
                    if ticks.is_multiple_of(ADDRESS_BOOK_TICKS) {
                        self.send_address_book(None);
                    }
                    Flow::Continue
                }
            };
            let handled = started.elapsed();
            let flow = match flow {
                Flow::Continue => self.drain(),
                other => other,
            };
            let drained = started.elapsed() - handled;
            let flow = match flow {
                Flow::Continue => match self.cycles(&report_tx) {
                    Ok(()) => Flow::Continue,
                    Err(e) => Flow::Fail(e),
                },
                other => other,
            };
            if started.elapsed() > SLOW_STEP {
                tracing::warn!(
                    id = self.status.borrow().id,
                    event,
                    handle_ms = handled.as_millis() as u64,
                    drain_ms = drained.as_millis() as u64,
                    total_ms = started.elapsed().as_millis() as u64,
                    "slow raft-rs driver step: heartbeats wait for it"
                );
            }
            match flow {
                Flow::Continue => {}
                Flow::Stop(done) => break done,
                Flow::Fail(e) => {
                    tracing::error!(id = self.status.borrow().id, "stopping the node: {e}");
                    self.core.fail_all(&e);
                    failure = Some(e.to_string());
                    break None;
                }
            }
            if let Some(job) = self.core.take_save_job() {
                // Writing and fsyncing a snapshot file must not stall the Ready loop, nor take
                // the CPU from it.
                // The job stays reachable here in case no thread can be started.
                let slot = Arc::new(parking_lot::Mutex::new(Some(job)));
                let run = |slot: &parking_lot::Mutex<Option<SaveJob>>,
                           tx: &mpsc::UnboundedSender<_>| {
                    if let Some(mut job) = slot.lock().take() {
                        let outcome = job.run();
                        let _ = tx.send((job, outcome));
                    }
                };
                let (s, tx) = (slot.clone(), saved_tx.clone());
                let started =
                    consensus_api::process::spawn_background("snapshot-save", move || run(&s, &tx));
                if let Err(e) = started {
                    tracing::warn!("no snapshot thread ({e}); writing the snapshot inline");
                    run(&slot, &saved_tx);
                }
            }
            self.publish();
            self.core.deliver();
        };
        self.core.fail_all(&ConsensusError::ShuttingDown);
        self.transport.shutdown().await;
        let log = self.core.storage().log().clone();
        let _ = tokio::task::spawn_blocking(move || log.close()).await;
        self.status.send_modify(|s| {
            s.role = Role::Shutdown;
            s.leader = None;
            s.stopped = failure;
        });
        if let Some(done) = stop {
            let _ = done.send(());
        }
    }

    /// Takes what is already queued, without waiting.
    fn drain(&mut self) -> Flow {
        for _ in 0..MAX_BATCH {
            match self.commands.try_recv() {
                Ok(c) => {
                    if let stop @ Flow::Stop(_) = self.handle(c) {
                        return stop;
                    }
                }
                Err(_) => break,
            }
        }
        for _ in 0..MAX_BATCH {
            match self.messages.try_recv() {
                Ok(m) => self.inbound(m),
                Err(_) => break,
            }
        }
        while let Ok(p) = self.persisted.try_recv() {
            if let Err(e) = self.core.persisted(p) {
                return Flow::Fail(e);
            }
        }
        Flow::Continue
    }

    fn inbound(&mut self, m: Inbound) {
        match m {
            Inbound::Raft(m) => self.core.step(m),
            Inbound::Snapshot(m, file) => self.core.step_snapshot(m, file),
            Inbound::Addresses(book) => self.core.learn_addresses(book),
        }
    }

    /// Tells peers every member address this node knows, so a node that joined empty can
    /// answer the leader before a snapshot names everyone. `to`: one new peer, or all.
    fn send_address_book(&self, to: Option<NodeId>) {
        let book = self.core.address_book();
        let Ok(body) = consensus_api::codec::encode(&book) else {
            return;
        };
        let mut frame = Vec::with_capacity(1 + body.len());
        frame.push(FRAME_ADDRESSES);
        frame.extend_from_slice(&body);
        let frame = Bytes::from(frame);
        let me = self.status.borrow().id;
        let targets: Vec<NodeId> = match to {
            Some(id) => vec![id],
            None => book.keys().copied().filter(|i| *i != me).collect(),
        };
        for id in targets {
            let _ = self.transport.send(id, frame.clone());
        }
    }

    fn handle(&mut self, cmd: Command) -> Flow {
        match cmd {
            Command::Propose(data, reply) => self.core.propose(data, reply),
            Command::ReadIndex(reply) => self.core.read_index(reply),
            Command::AddLearner(id, addr, reply) => self.core.add_learner(id, addr, reply),
            Command::ChangeVoters(voters, reply) => self.core.change_voters(voters, reply),
            Command::RemoveNode(id, reply) => self.core.remove_node(id, reply),
            Command::TransferLeader(to, reply) => {
                let _ = reply.send(self.core.transfer_leader(to));
            }
            Command::Snapshot(reply) => self.core.snapshot_now(reply),
            Command::Shutdown(done) => return Flow::Stop(Some(done)),
        }
        Flow::Continue
    }

    /// Runs Ready cycles until raft-rs has nothing more, shipping messages as they become
    /// sendable.
    fn cycles(
        &mut self,
        reports: &mpsc::UnboundedSender<(NodeId, bool)>,
    ) -> Result<(), ConsensusError> {
        // Messages released by durability notices go first, then each Ready's own.
        self.ship(reports);
        while self.core.cycle()? {
            self.ship(reports);
        }
        Ok(())
    }

    /// Applies peer changes to the transport, then sends the outbox. A snapshot goes in two
    /// steps off the driver: its file is streamed in chunks ([`SnapshotSender`]), then the
    /// `MsgSnapshot` (metadata and the transfer's ticket instead of the data) as a call; the
    /// outcome is reported to raft-rs.
    fn ship(&mut self, reports: &mpsc::UnboundedSender<(NodeId, bool)>) {
        for (id, addr) in self.core.take_peer_changes() {
            match addr {
                Some(a) => {
                    self.transport.set_peer(id, a);
                    // Ordered per peer: the book arrives before any raft message to it.
                    self.send_address_book(Some(id));
                }
                None => self.transport.remove_peer(id),
            }
        }
        for msg in self.core.take_outbox() {
            let to = msg.to;
            if msg.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(msg, reports);
                continue;
            }
            let frame = match raft_frame(&msg) {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(to, "cannot encode a raft message: {e}");
                    continue;
                }
            };
            if let Err(e) = self.transport.send(to, frame) {
                tracing::debug!(to, "raft message not sent: {e}");
                self.core.report_unreachable(to);
            }
        }
    }

    /// Streams the snapshot file `msg` names, then sends `msg` with the transfer's ticket.
    fn send_snapshot(&self, mut msg: Message, reports: &mpsc::UnboundedSender<(NodeId, bool)>) {
        let to = msg.to;
        let index = msg.get_snapshot().get_metadata().index;
        let file = self
            .core
            .storage()
            .snapshot_file()
            .filter(|_| self.core.storage().snapshot_position().0 == index)
            .cloned();
        // The stored snapshot's file, or a view captured for this peer (streamed, no file).
        let source = match file {
            Some(file) => Ok(file),
            None => match self.core.storage().take_streamable(index) {
                Some(s) => Err(s),
                None => {
                    tracing::warn!(to, index, "no snapshot file for a snapshot message");
                    let _ = reports.send((to, false));
                    return;
                }
            },
        };
        let (transport, sender) = (self.transport.clone(), self.snapshots.clone());
        let (reports, timeout) = (reports.clone(), self.snapshot_timeout);
        tokio::spawn(async move {
            let outcome = async {
                let ticket = match source {
                    Ok(file) => sender.send(to, &file).await?,
                    Err(s) => {
                        let meta = s
                            .snapshot
                            .get_metadata()
                            .write_to_bytes()
                            .map_err(|e| e.to_string())?;
                        sender
                            .send_stream(to, Bytes::from(meta), Box::new(move |w| s.write(w)))
                            .await?
                    }
                };
                msg.mut_snapshot().data = Bytes::from(ticket.encode());
                let frame = raft_frame(&msg).map_err(|e| e.to_string())?;
                transport
                    .call(to, frame, timeout)
                    .await
                    .map_err(|e| e.to_string())
            }
            .await;
            if let Err(e) = &outcome {
                tracing::warn!(to, index, "snapshot not delivered: {e}");
            }
            let _ = reports.send((to, outcome.is_ok()));
        });
    }

    fn publish(&self) {
        let st = self.core.status();
        self.status.send_if_modified(|cur| {
            let changed = *cur != st;
            if changed {
                *cur = st;
            }
            changed
        });
    }
}

/// Watches the driver task. raft-rs treats some broken invariants as fatal and panics; the node
/// then publishes a terminal status that says why (instead of freezing at its last one, say
/// Leader), and every call fails with `ShuttingDown` since the command queue is gone.
pub(crate) async fn supervise(
    id: NodeId,
    task: tokio::task::JoinHandle<()>,
    status: Arc<watch::Sender<Status>>,
) {
    let Err(e) = task.await else { return };
    if !e.is_panic() {
        return;
    }
    let payload = e.into_panic();
    let why = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    tracing::error!(
        id,
        "the raft-rs engine failed and the node is out of service: {why}"
    );
    status.send_modify(|s| {
        s.role = Role::Shutdown;
        s.leader = None;
        s.stopped = Some(format!("the raft-rs engine panicked: {why}"));
    });
}

/// Receives raft-rs messages from the transport and queues them for the driver.
pub(crate) struct RaftHandler {
    pub(crate) id: NodeId,
    pub(crate) messages: mpsc::Sender<Inbound>,
    /// Where streamed snapshot files arrive; a `MsgSnapshot` is passed on only with its file.
    pub(crate) snapshots: Arc<SnapshotReceiver>,
    /// Counts frames refused here (undecodable, or naming another sender); the driver's core
    /// counts what it refuses into the same total.
    pub(crate) refused: RefusedMessages,
}

/// Most entries one inbound raft message may carry. A message is decoded in place (entry
/// payloads share the frame's buffer), but every entry is a struct of its own, about 100 bytes
/// for 2 bytes of wire: without a cap a frame of empty entries would decode to ~50x its size.
/// 2^17 entries bound a message's decoded size to about 13 MiB beyond its frame, whatever the
/// frame limit; raft-rs sends at most `max_size_per_msg` bytes of entries, far fewer.
pub(crate) const MAX_ENTRIES_PER_MESSAGE: usize = 1 << 17;
/// Largest snapshot field of an inbound raft message: it carries metadata only (the data
/// travels as a file), whose membership lists would decode to 8 bytes per 1-byte number.
pub(crate) const MAX_SNAPSHOT_FIELD_BYTES: u32 = 1 << 20;

/// Checks an encoded `eraftpb::Message` against the decoded-size bounds
/// ([`MAX_ENTRIES_PER_MESSAGE`], [`MAX_SNAPSHOT_FIELD_BYTES`]) by walking its fields, before
/// anything is decoded; returns its number of entries.
pub(crate) fn check_decoded_size(bytes: &[u8]) -> Result<usize, String> {
    use protobuf::wire_format::WireType;
    const ENTRIES: u32 = 7;
    const SNAPSHOT: u32 = 9;
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    let mut entries = 0usize;
    while !input.eof().map_err(|e| e.to_string())? {
        let (field, wire) = input.read_tag_unpack().map_err(|e| e.to_string())?;
        if wire != WireType::WireTypeLengthDelimited {
            input.skip_field(wire).map_err(|e| e.to_string())?;
            continue;
        }
        let len = input.read_raw_varint32().map_err(|e| e.to_string())?;
        if field == ENTRIES {
            entries += 1;
            if entries > MAX_ENTRIES_PER_MESSAGE {
                return Err(format!(
                    "more than {MAX_ENTRIES_PER_MESSAGE} entries in one message"
                ));
            }
        }
        if field == SNAPSHOT && len > MAX_SNAPSHOT_FIELD_BYTES {
            return Err(format!(
                "a {len}-byte snapshot field (at most {MAX_SNAPSHOT_FIELD_BYTES})"
            ));
        }
        input.skip_raw_bytes(len).map_err(|e| e.to_string())?;
    }
    Ok(entries)
}

/// Why an inbound frame was not passed on.
enum NotPassed {
    /// Malformed or lying about its sender: counted as a refused message.
    Refused(&'static str, String),
    /// Not yet usable (a snapshot whose file has not arrived): the leader sends it again.
    Later(String),
}

impl RaftHandler {
    fn decode(&self, from: NodeId, frame: &Bytes) -> Result<Inbound, NotPassed> {
        match frame.first() {
            Some(&FRAME_RAFT) => {}
            Some(&FRAME_ADDRESSES) => {
                return consensus_api::codec::decode(&frame[1..])
                    .map(Inbound::Addresses)
                    .map_err(|e| {
                        NotPassed::Refused(
                            "address book",
                            format!("undecodable address book from {from}: {e}"),
                        )
                    });
            }
            _ => {
                return Err(NotPassed::Refused(
                    "frame",
                    format!("unknown engine frame from {from}"),
                ))
            }
        }
        check_decoded_size(&frame[1..]).map_err(|e| {
            NotPassed::Refused(
                "raft message",
                format!("raft message from {from} would decode too large: {e}"),
            )
        })?;
        let msg = Message::parse_from_carllerche_bytes(&frame.slice(1..)).map_err(|e| {
            NotPassed::Refused(
                "raft message",
                format!("undecodable raft message from {from}: {e}"),
            )
        })?;
        if msg.from != from || msg.to != self.id {
            return Err(NotPassed::Refused(
                "raft message",
                format!(
                    "raft message {}->{} arrived on the connection of {from} at {}",
                    msg.from, msg.to, self.id
                ),
            ));
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            return self.with_file(from, msg);
        }
        Ok(Inbound::Raft(msg))
    }

    /// Pairs a `MsgSnapshot` with the file its ticket names; refused (the leader retries, and
    /// the transfer resumes) when the file is not here or is not the snapshot named.
    fn with_file(&self, from: NodeId, msg: Message) -> Result<Inbound, NotPassed> {
        let refused = |why: String| NotPassed::Refused("MsgSnapshot", why);
        let snap = msg.get_snapshot();
        let ticket = Ticket::decode(&snap.data).ok_or_else(|| {
            refused(format!(
                "snapshot message from {from} without a transfer ticket"
            ))
        })?;
        let file = self.snapshots.take(from, &ticket).ok_or_else(|| {
            NotPassed::Later(format!(
                "the snapshot file of transfer {:x} from {from} has not arrived",
                ticket.id
            ))
        })?;
        let meta = SnapshotMetadata::parse_from_bytes(file.meta()).map_err(|e| {
            refused(format!(
                "snapshot file from {from} has unreadable metadata: {e}"
            ))
        })?;
        let named = snap.get_metadata();
        if (meta.index, meta.term) != (named.index, named.term) {
            return Err(refused(format!(
                "snapshot file from {from} is at {}/{} but the message names {}/{}",
                meta.index, meta.term, named.index, named.term
            )));
        }
        Ok(Inbound::Snapshot(msg, file))
    }

    /// Decodes a frame, counting a refusal; the error says why it was not passed on.
    fn admit(&self, from: NodeId, frame: &Bytes) -> Result<Inbound, String> {
        self.decode(from, frame).map_err(|e| match e {
            NotPassed::Refused(kind, why) => {
                self.refused.record(from, kind, &why);
                why
            }
            NotPassed::Later(why) => why,
        })
    }
}

#[async_trait::async_trait]
impl InboundHandler for RaftHandler {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        match self.admit(from, &frame) {
            // Full: drop it; raft-rs retransmits what matters.
            Ok(m) => {
                if self.messages.try_send(m).is_err() {
                    tracing::debug!(from, "inbound raft queue full; message dropped");
                }
            }
            Err(e) => tracing::debug!("{e}"),
        }
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let m = self.admit(from, &frame)?;
        self.messages
            .send(m)
            .await
            .map_err(|_| "the node is shutting down".to_string())?;
        Ok(Bytes::new())
    }
}

#[cfg(test)]
mod decoded_size_tests {
    use super::*;
    use raft::eraftpb::{Entry, Snapshot};

    fn encoded(entries: usize, voters: usize) -> Vec<u8> {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = 2;
        m.set_entries(
            (0..entries)
                .map(|_| Entry::default())
                .collect::<Vec<_>>()
                .into(),
        );
        if voters > 0 {
            let mut snap = Snapshot::default();
            snap.mut_metadata().mut_conf_state().voters = (0..voters as u64).collect();
            m.set_snapshot(snap);
        }
        m.write_to_bytes().expect("encode")
    }

    #[test]
    fn messages_that_would_decode_too_large_are_refused_unread() {
        // What the bound in MAX_ENTRIES_PER_MESSAGE's documentation assumes.
        let entry = std::mem::size_of::<Entry>();
        assert!(entry <= 112, "an Entry is {entry} bytes");
        assert_eq!(check_decoded_size(&encoded(3, 3)), Ok(3));
        assert_eq!(
            check_decoded_size(&encoded(MAX_ENTRIES_PER_MESSAGE, 0)),
            Ok(MAX_ENTRIES_PER_MESSAGE)
        );
        let many = encoded(MAX_ENTRIES_PER_MESSAGE + 1, 0);
        assert!(many.len() < 1 << 20, "{} bytes", many.len());
        assert!(check_decoded_size(&many).is_err());
        assert!(check_decoded_size(&encoded(0, 1 << 20)).is_err());
        // Truncated or garbage input is an error too, never a panic.
        let ok = encoded(5, 3);
        assert!(check_decoded_size(&ok[..ok.len() - 1]).is_err());
        assert!(check_decoded_size(&[0xff; 16]).is_err());
    }
}
