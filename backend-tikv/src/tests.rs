//! Ready-cycle tests without a network: several [`Core`]s on real data dirs, their outboxes
//! routed by hand, time advanced one tick at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use consensus_api::{codec, ByteStateMachine, ConsensusError, ErrorKind, NodeConfig, NodeId};
use parking_lot::Mutex;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, MessageType};
use raft::Storage as _;
use tokio::sync::oneshot;

use crate::node::{voter_changes, Core, PersistEvents, Reply};
use crate::storage::DiskStorage;

/// Appends every command; answers with the number applied so far.
#[derive(Default)]
struct Journal(Mutex<Vec<(u64, Vec<u8>)>>);

impl ByteStateMachine for Journal {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        let mut j = self.0.lock();
        j.push((index, command.to_vec()));
        (j.len() as u64).to_be_bytes().to_vec()
    }
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        Ok(codec::encode(&*self.0.lock())?)
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        *self.0.lock() = codec::decode(snapshot)?;
        Ok(())
    }
}

impl Journal {
    fn commands(&self) -> Vec<Vec<u8>> {
        self.0.lock().iter().map(|(_, c)| c.clone()).collect()
    }
}

struct Node {
    core: Core,
    sm: Arc<Journal>,
    persisted: PersistEvents,
}

impl Node {
    /// Waits for every queued write to be durable and hands the notices to the core.
    fn sync(&mut self) {
        while self.core.in_flight() > 0 {
            let p = self.persisted.blocking_recv().expect("log writer alive");
            self.core.persisted(p).expect("durable");
        }
    }

    /// Runs Ready cycles, each followed by its disk write, until raft-rs has nothing more.
    /// Whether anything happened.
    fn run_cycles(&mut self) -> bool {
        let mut moved = false;
        loop {
            while self.core.cycle().expect("cycle") {
                moved = true;
            }
            if self.core.in_flight() == 0 {
                return moved;
            }
            self.sync();
        }
    }
}

struct Net {
    dir: tempfile::TempDir,
    nodes: BTreeMap<NodeId, Node>,
    /// Nodes whose traffic is dropped both ways.
    cut: BTreeSet<NodeId>,
}

fn config(dir: &std::path::Path, id: NodeId, members: &[NodeId]) -> NodeConfig {
    let mut c = NodeConfig::new(id, "unit", dir.join(format!("n{id}")));
    c.initial_members = members.iter().map(|m| (*m, format!("n{m}"))).collect();
    c.snapshot_threshold = 50;
    c.keep_logs_after_snapshot = 5;
    c
}

fn open(cfg: &NodeConfig) -> Node {
    let sm = Arc::new(Journal::default());
    let storage = DiskStorage::open(&cfg.data_dir).expect("open storage");
    let (core, persisted) =
        Core::new(cfg, storage, sm.clone(), &crate::logger::logger(cfg.id)).expect("core");
    Node {
        core,
        sm,
        persisted,
    }
}

fn reply<T>() -> (Reply<T>, oneshot::Receiver<Result<T, ConsensusError>>) {
    oneshot::channel()
}

impl Net {
    fn new(n: u64) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ids: Vec<NodeId> = (1..=n).collect();
        let nodes = ids
            .iter()
            .map(|id| (*id, open(&config(dir.path(), *id, &ids))))
            .collect();
        Self {
            dir,
            nodes,
            cut: BTreeSet::new(),
        }
    }

    /// Runs Ready cycles and delivers messages until everything is quiet.
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut moved = false;
            let mut mail = Vec::new();
            for (id, n) in self.nodes.iter_mut() {
                moved |= n.run_cycles();
                if let Some(mut job) = n.core.take_save_job() {
                    moved = true;
                    let outcome = job.run();
                    n.core.snapshot_saved(job, outcome);
                }
                n.core.deliver();
                n.core.take_peer_changes();
                for m in n.core.take_outbox() {
                    mail.push((*id, m));
                }
            }
            for (from, m) in mail {
                moved = true;
                if self.cut.contains(&from) || self.cut.contains(&m.to) {
                    continue;
                }
                let (to, snapshot) = (m.to, m.get_msg_type() == MessageType::MsgSnapshot);
                // What the transfer would deliver: a copy of the sender's snapshot file, or
                // the file a stream of a view captured for this peer makes.
                let sent = if snapshot {
                    let index = m.get_snapshot().get_metadata().index;
                    self.nodes.get(&from).and_then(|n| {
                        let st = n.core.storage();
                        match st.snapshot_file() {
                            Some(f) if st.snapshot_position().0 == index => Some(Ok(f.clone())),
                            _ => st.take_streamable(index).map(Err),
                        }
                    })
                } else {
                    None
                };
                if let Some(n) = self.nodes.get_mut(&to) {
                    match sent {
                        Some(Ok(f)) => {
                            let copy = n.core.storage().import(&f).expect("copy the snapshot");
                            n.core.step_snapshot(m, copy);
                        }
                        Some(Err(stream)) => {
                            let meta = stream
                                .snapshot
                                .get_metadata()
                                .write_to_bytes()
                                .expect("metadata");
                            let store = n.core.storage().snapshot_store();
                            let mut sink = store.create(&meta).expect("create");
                            stream.write(&mut sink).expect("stream");
                            n.core.step_snapshot(m, sink.seal().expect("seal"));
                        }
                        None => n.core.step(m),
                    }
                }
                if snapshot {
                    if let Some(n) = self.nodes.get_mut(&from) {
                        n.core.report_snapshot(to, true);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the cluster never settled");
    }

    fn tick(&mut self, ticks: usize) {
        for _ in 0..ticks {
            for n in self.nodes.values_mut() {
                n.core.tick();
            }
            self.settle();
        }
    }

    fn leaders(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.core.status().is_leader())
            .map(|(id, _)| *id)
            .collect()
    }

    fn elect(&mut self) -> NodeId {
        for _ in 0..100 {
            self.tick(1);
            if let [l] = self.leaders()[..] {
                return l;
            }
        }
        panic!("no single leader after 100 ticks: {:?}", self.leaders());
    }

    fn core(&mut self, id: NodeId) -> &mut Core {
        &mut self.nodes.get_mut(&id).expect("node").core
    }

    fn propose(&mut self, id: NodeId, cmd: &[u8]) -> Result<Vec<u8>, ConsensusError> {
        let (tx, mut rx) = reply();
        self.core(id).propose(cmd.to_vec(), tx);
        for _ in 0..50 {
            self.settle();
            if let Ok(r) = rx.try_recv() {
                return r;
            }
            self.tick(1);
        }
        panic!("proposal on {id} never answered");
    }
}

#[test]
fn three_cores_elect_one_leader_and_apply_in_order() {
    let mut net = Net::new(3);
    let leader = net.elect();
    for i in 0..20u64 {
        let out = net
            .propose(leader, format!("c{i}").as_bytes())
            .expect("commit");
        assert_eq!(out, (i + 1).to_be_bytes().to_vec(), "answer of command {i}");
    }
    net.tick(2);
    let expected = net.nodes[&leader].sm.commands();
    assert_eq!(expected.len(), 20);
    for (id, n) in &net.nodes {
        assert_eq!(
            n.sm.commands(),
            expected,
            "node {id} applied another sequence"
        );
    }
}

#[test]
fn a_follower_refuses_with_the_leader_hint() {
    let mut net = Net::new(3);
    let leader = net.elect();
    let follower = *net.nodes.keys().find(|i| **i != leader).expect("follower");
    let e = net.propose(follower, b"x").expect_err("follower proposal");
    assert!(
        matches!(e, ConsensusError::NotLeader { leader: Some(l) } if l == leader),
        "{e}"
    );
    let (tx, mut rx) = reply();
    net.core(follower).read_index(tx);
    assert_eq!(
        rx.try_recv()
            .expect("answered at once")
            .expect_err("read")
            .kind(),
        ErrorKind::NotLeader
    );
}

#[test]
fn read_index_needs_a_quorum() {
    let mut net = Net::new(3);
    let leader = net.elect();
    net.propose(leader, b"w").expect("write");
    let (tx, mut rx) = reply();
    net.core(leader).read_index(tx);
    net.settle();
    net.core(leader).deliver();
    let index = rx.try_recv().expect("answered").expect("read index");
    assert!(index >= net.core(leader).status().commit_index);
    // Cut the leader off: its read is never confirmed, and once check-quorum deposes it the
    // read fails instead of returning a stale index.
    net.cut = net.nodes.keys().copied().filter(|i| *i != leader).collect();
    let (tx, mut rx) = reply();
    net.core(leader).read_index(tx);
    net.settle();
    assert!(
        rx.try_recv().is_err(),
        "a read was confirmed without a quorum"
    );
    net.tick(30);
    let e = rx.try_recv().expect("answered").expect_err("deposed");
    assert_eq!(e.kind(), ErrorKind::NotLeader, "{e}");
}

#[test]
fn persisted_messages_wait_for_the_disk() {
    // A vote may only be granted once it is durable: a cycle that writes the vote holds the
    // response back until the log writer's notice comes.
    let mut net = Net::new(3);
    for _ in 0..100 {
        for n in net.nodes.values_mut() {
            n.core.tick();
        }
        let mut mail = Vec::new();
        for (id, n) in net.nodes.iter_mut() {
            loop {
                let mut moved = false;
                loop {
                    let hs = |n: &Node| n.core.storage().initial_state().expect("state").hard_state;
                    let before = hs(n);
                    if !n.core.cycle().expect("cycle") {
                        break;
                    }
                    moved = true;
                    // A cycle that records a new vote must hold the granting response back
                    // until the log writer says the vote is durable.
                    let after = hs(n);
                    let new_vote = (after.vote, after.term) != (before.vote, before.term);
                    let early = n.core.take_outbox();
                    assert!(
                        !new_vote
                            || early.iter().all(|m| {
                                m.get_msg_type() != MessageType::MsgRequestVoteResponse
                                    || m.reject
                                    || m.to != after.vote
                            }),
                        "a vote response left before the vote was persisted"
                    );
                    mail.extend(early.into_iter().map(|m| (*id, m)));
                }
                if !moved && n.core.in_flight() == 0 {
                    break;
                }
                n.sync();
                mail.extend(n.core.take_outbox().into_iter().map(|m| (*id, m)));
            }
        }
        for (_, m) in mail {
            if let Some(n) = net.nodes.get_mut(&m.to) {
                n.core.step(m);
            }
        }
        if net.leaders().len() == 1 {
            return;
        }
    }
    panic!("no leader");
}

#[test]
fn a_learner_catches_up_by_snapshot_and_is_promoted() {
    let mut net = Net::new(3);
    let leader = net.elect();
    for i in 0..60u64 {
        net.propose(leader, format!("c{i}").as_bytes())
            .expect("write");
    }
    assert!(
        net.core(leader).status().purged_index > 1,
        "leader compacted"
    );
    // Node 4 starts empty (not an initial member) and joins as a learner.
    let cfg = config(net.dir.path(), 4, &[]);
    net.nodes.insert(4, open(&cfg));
    let (tx, mut rx) = reply();
    net.core(leader).add_learner(4, "n4".into(), tx);
    net.tick(5);
    rx.try_recv().expect("answered").expect("learner added");
    assert_eq!(
        net.nodes[&4].sm.commands(),
        net.nodes[&leader].sm.commands()
    );
    assert!(
        net.core(4).status().snapshot_index > 1,
        "caught up by snapshot"
    );
    // Promote it and demote another: two changes, so joint consensus, left automatically.
    let other = *net
        .nodes
        .keys()
        .find(|i| **i != leader && **i != 4)
        .expect("voter");
    let voters: BTreeSet<NodeId> = [leader, 4]
        .into_iter()
        .chain(
            net.nodes
                .keys()
                .copied()
                .filter(|i| *i != leader && *i != 4 && *i != other),
        )
        .collect();
    let (tx, mut rx) = reply();
    net.core(leader).change_voters(voters.clone(), tx);
    net.tick(5);
    let answer = rx.try_recv();
    if answer.is_err() {
        for (id, n) in &net.nodes {
            eprintln!("{id}: {:?}", n.core.status());
        }
    }
    answer.expect("answered").expect("voters changed");
    for (id, n) in &net.nodes {
        let st = n.core.status();
        assert_eq!(st.voters, voters, "voters on {id}");
        assert_eq!(st.learners, BTreeSet::from([other]), "learners on {id}");
    }
}

#[test]
fn a_restarted_core_replays_to_the_same_state() {
    let mut net = Net::new(3);
    let leader = net.elect();
    for i in 0..70u64 {
        net.propose(leader, format!("c{i}").as_bytes())
            .expect("write");
    }
    let before = net.nodes[&leader].sm.commands();
    let ids: Vec<NodeId> = net.nodes.keys().copied().collect();
    let cfg = config(net.dir.path(), leader, &ids);
    if let Some(n) = net.nodes.remove(&leader) {
        n.core.storage().log().close();
    }
    let mut n = open(&cfg);
    assert!(n.core.take_save_job().is_none());
    n.run_cycles();
    assert_eq!(
        n.sm.commands(),
        before,
        "snapshot plus replay rebuilt the state"
    );
}

#[test]
fn voter_changes_promote_learners_and_demote_voters() {
    let cs = ConfState {
        voters: vec![1, 2, 3],
        learners: vec![4],
        ..Default::default()
    };
    let ch = voter_changes(&cs, &BTreeSet::from([1, 2, 4])).expect("valid");
    let got: Vec<(u64, i32)> = ch
        .iter()
        .map(|c| (c.node_id, c.get_change_type() as i32))
        .collect();
    assert_eq!(
        got,
        vec![
            (4, raft::eraftpb::ConfChangeType::AddNode as i32),
            (3, raft::eraftpb::ConfChangeType::AddLearnerNode as i32)
        ]
    );
    assert_eq!(
        voter_changes(&cs, &BTreeSet::from([1, 7]))
            .expect_err("unknown node")
            .kind(),
        ErrorKind::InvalidRequest
    );
    assert!(voter_changes(&cs, &BTreeSet::new()).is_err());
    assert!(voter_changes(&cs, &BTreeSet::from([1, 2, 3]))
        .expect("no-op")
        .is_empty());
}

/// A transport that only keeps the handler the engine installs (the test plays every peer).
#[derive(Default)]
struct HandlerOnly(Mutex<Option<Arc<dyn consensus_api::InboundHandler>>>);

#[async_trait::async_trait]
impl consensus_api::Transport for HandlerOnly {
    fn local_id(&self) -> NodeId {
        1
    }
    fn local_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 1))
    }
    fn set_peer(&self, _id: NodeId, _addr: String) {}
    fn remove_peer(&self, _id: NodeId) {}
    fn send(&self, _to: NodeId, _frame: bytes::Bytes) -> Result<(), consensus_api::TransportError> {
        Ok(())
    }
    async fn call(
        &self,
        to: NodeId,
        _frame: bytes::Bytes,
        _timeout: std::time::Duration,
    ) -> Result<bytes::Bytes, consensus_api::TransportError> {
        Err(consensus_api::TransportError::UnknownPeer(to))
    }
    fn set_handler(&self, handler: Arc<dyn consensus_api::InboundHandler>) {
        *self.0.lock() = Some(handler);
    }
    async fn shutdown(&self) {}
}

/// A state machine that panics on the command `boom` (a user's bug): the driver task dies.
#[derive(Default)]
struct Boom(Journal);

impl ByteStateMachine for Boom {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        assert!(
            command != b"boom",
            "the state machine refuses to apply `boom`"
        );
        self.0.apply(index, command)
    }
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        self.0.snapshot()
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        self.0.restore(snapshot)
    }
}

/// Starts a single-node engine on `dir` whose transport only records the handler, and waits
/// until it leads.
async fn lone_engine(
    dir: &std::path::Path,
    sm: Arc<dyn ByteStateMachine>,
) -> (crate::TikvEngine, Arc<HandlerOnly>, consensus_api::Status) {
    use consensus_api::{Engine, EngineContext, Role};
    let mut config = NodeConfig::new(1, "guard-test", dir);
    config.initial_members = BTreeMap::from([(1, "127.0.0.1:1".to_string())]);
    let transport = Arc::new(HandlerOnly::default());
    let engine = crate::TikvEngine::start(EngineContext {
        config,
        state_machine: sm,
        transport: transport.clone(),
        snapshot_transport: Arc::new(HandlerOnly::default()),
    })
    .await
    .expect("engine starts");
    let mut status = engine.status();
    let st = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|s| s.role == Role::Leader),
    )
    .await
    .expect("a single node elects itself")
    .expect("status watch")
    .clone();
    (engine, transport, st)
}

fn raft_frame(m: &raft::eraftpb::Message) -> bytes::Bytes {
    use protobuf::Message as _;
    let mut frame = vec![crate::driver::FRAME_RAFT];
    frame.extend(m.write_to_bytes().expect("encode"));
    bytes::Bytes::from(frame)
}

/// An engine whose driver panics (here: the user's state machine) publishes a terminal status
/// that says why, and every call fails with `ShuttingDown`, instead of the status freezing at
/// its last value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicked_engine_publishes_a_terminal_status_and_refuses_calls() {
    use consensus_api::{Engine, Role};
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, _transport, _) = lone_engine(dir.path(), Arc::new(Boom::default())).await;
    let mut status = engine.status();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        engine.propose(b"boom".to_vec()),
    )
    .await;
    let st = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|s| s.role == Role::Shutdown),
    )
    .await
    .expect("the status must turn terminal, not stay frozen")
    .expect("status watch")
    .clone();
    assert_eq!(st.leader, None);
    let why = st.stopped.unwrap_or_default();
    assert!(why.contains("panicked"), "the status says why: {why:?}");
    let err = engine
        .propose(b"x".to_vec())
        .await
        .expect_err("a dead engine");
    assert_eq!(err.kind(), ErrorKind::ShuttingDown, "{err}");
}

/// A heartbeat from an authenticated peer that commits past the end of the log (raft-rs's
/// `commit_to` is fatal on it) is refused and counted at the transport's door, and the node
/// keeps leading and committing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_committing_past_the_log_does_not_stop_the_engine() {
    use consensus_api::{Engine, Role};
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, transport, st) = lone_engine(dir.path(), Arc::new(Journal::default())).await;
    let mut hb = raft::eraftpb::Message::default();
    hb.set_msg_type(MessageType::MsgHeartbeat);
    hb.from = 2;
    hb.to = 1;
    hb.term = st.term + 1;
    hb.commit = st.last_log_index + 1_000;
    let handler = transport.0.lock().clone().expect("handler installed");
    handler.on_message(2, raft_frame(&hb));
    // A frame lying about its sender is refused by the handler itself.
    handler.on_message(3, raft_frame(&hb));

    let mut status = engine.status();
    let seen = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        status.wait_for(|s| s.refused_messages >= 2 || s.role == Role::Shutdown),
    )
    .await
    .expect("the refusals show in the status")
    .expect("status watch")
    .clone();
    assert_eq!(seen.role, Role::Leader, "still leading: {:?}", seen.stopped);
    assert_eq!(seen.refused_messages, 2);
    assert_eq!(seen.term, st.term, "a refused message moves no term");
    engine
        .propose(b"after".to_vec())
        .await
        .expect("still commits");
}

fn msg(ty: MessageType, from: NodeId, to: NodeId, term: u64) -> raft::eraftpb::Message {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(ty);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

fn entry(index: u64, term: u64) -> raft::eraftpb::Entry {
    raft::eraftpb::Entry {
        index,
        term,
        ..Default::default()
    }
}

/// The part of a status a refused message must not move.
fn engine_state(
    st: &consensus_api::Status,
) -> (consensus_api::Role, u64, Option<NodeId>, u64, u64) {
    (
        st.role,
        st.term,
        st.leader,
        st.commit_index,
        st.last_log_index,
    )
}

/// Every message raft-rs 0.7 would panic on (or that a protocol-following peer never sends) is
/// refused before raft-rs sees it: counted, changing nothing, and the cluster keeps committing
/// on every node.
#[test]
fn invariant_breaking_messages_from_a_member_are_refused_and_change_nothing() {
    let mut net = Net::new(3);
    let leader = net.elect();
    for i in 0..5u64 {
        net.propose(leader, format!("c{i}").as_bytes())
            .expect("write");
    }
    let f = *net
        .nodes
        .keys()
        .find(|i| **i != leader)
        .expect("a follower");
    let other = *net
        .nodes
        .keys()
        .find(|i| **i != leader && **i != f)
        .expect("another follower");
    let st = net.core(f).status();
    let (term, last) = (st.term, st.last_log_index);
    let last_term = net
        .core(f)
        .storage()
        .term(last)
        .expect("term of the last entry");

    let mut hostile = Vec::new();
    // raft-rs: "to_commit ... is out of range [last_index ...]".
    let mut m = msg(MessageType::MsgHeartbeat, leader, f, term);
    m.commit = last + 100;
    hostile.push((f, m));
    // The same from a node that is not this term's leader.
    let mut m = msg(MessageType::MsgHeartbeat, other, f, term);
    m.commit = last;
    hostile.push((f, m));
    // raft-rs: "entry 1 conflict with committed entry": entries not starting at index + 1.
    let mut m = msg(MessageType::MsgAppend, leader, f, term);
    (m.index, m.log_term, m.commit) = (last, last_term, last);
    m.set_entries(vec![entry(1, term)].into());
    hostile.push((f, m));
    // A gap between entries.
    let mut m = msg(MessageType::MsgAppend, leader, f, term);
    (m.index, m.log_term, m.commit) = (last, last_term, last + 3);
    m.set_entries(vec![entry(last + 1, term), entry(last + 3, term)].into());
    hostile.push((f, m));
    // Entry terms going down, or past the leader's.
    let mut m = msg(MessageType::MsgAppend, leader, f, term);
    (m.index, m.log_term) = (last, last_term);
    m.set_entries(vec![entry(last + 1, term), entry(last + 2, term - 1)].into());
    hostile.push((f, m));
    let mut m = msg(MessageType::MsgAppend, leader, f, term);
    (m.index, m.log_term) = (last, last_term);
    m.set_entries(vec![entry(last + 1, term + 1)].into());
    hostile.push((f, m));
    // A previous entry of term 0 beyond the log "matches" in raft-rs, then commits past it.
    let mut m = msg(MessageType::MsgAppend, leader, f, term);
    (m.index, m.log_term, m.commit) = (last + 10, 0, last + 10);
    hostile.push((f, m));
    // Term 0 skips raft-rs's term checks; a vote answer of term 0 is fatal to send.
    let mut m = msg(MessageType::MsgRequestVote, other, f, 0);
    (m.index, m.log_term) = (last + 10, term);
    hostile.push((f, m));
    // raft-rs: "stepped empty MsgProp"; and a peer's proposal would be appended as is.
    hostile.push((leader, msg(MessageType::MsgPropose, f, leader, 0)));
    let mut m = msg(MessageType::MsgPropose, f, leader, 0);
    m.set_entries(vec![entry(0, 0)].into());
    hostile.push((leader, m));
    // `m.entries[0]` of an empty read-index request.
    hostile.push((leader, msg(MessageType::MsgReadIndex, f, leader, 0)));
    // Leadership handed over by a node that does not lead.
    hostile.push((f, msg(MessageType::MsgTimeoutNow, other, f, term)));
    // An acknowledgement of entries the leader never had; a rejection hint past its index.
    let mut m = msg(MessageType::MsgAppendResponse, f, leader, term);
    m.index = last + 1_000;
    hostile.push((leader, m));
    let mut m = msg(MessageType::MsgAppendResponse, f, leader, term);
    (m.reject, m.index, m.reject_hint, m.log_term) = (true, last, u64::MAX, term);
    hostile.push((leader, m));

    let count = hostile.len() as u64;
    for (to, m) in hostile {
        let before = engine_state(&net.core(to).status());
        let refused = net.core(to).status().refused_messages;
        let what = format!("{m:?}");
        net.core(to).step(m);
        let after = net.core(to).status();
        assert_eq!(after.refused_messages, refused + 1, "refused: {what}");
        assert_eq!(engine_state(&after), before, "changes nothing: {what}");
    }
    let total: u64 = net
        .nodes
        .values()
        .map(|n| n.core.status().refused_messages)
        .sum();
    assert_eq!(total, count);
    net.settle();
    net.propose(leader, b"after")
        .expect("the cluster still commits");
    net.tick(3);
    for (id, n) in &net.nodes {
        assert_eq!(
            n.sm.commands().last().map(Vec::as_slice),
            Some(&b"after"[..]),
            "node {id} applied it"
        );
    }
}

/// A follower whose disk lost entries it had acknowledged (its log and hard state rolled back
/// to an earlier point) refuses the leader's heartbeats, which now commit past its log, and
/// answers them with rejections that make the leader re-send the lost tail: it catches up
/// without a new write, instead of staying behind (raft-rs's leader never lowers what it
/// believes a follower has).
#[test]
fn a_follower_that_lost_its_acknowledged_tail_catches_up() {
    let mut net = Net::new(3);
    let leader = net.elect();
    for i in 0..3u64 {
        net.propose(leader, format!("a{i}").as_bytes())
            .expect("write");
    }
    let f = *net
        .nodes
        .keys()
        .find(|i| **i != leader)
        .expect("a follower");
    let kept = net.core(f).status().commit_index;
    for i in 0..5u64 {
        net.propose(leader, format!("b{i}").as_bytes())
            .expect("write");
    }
    net.tick(2);
    let full = net.core(leader).status().last_log_index;
    assert_eq!(net.core(f).status().last_log_index, full);

    // The disk fault: the follower restarts with everything after `kept` gone.
    let ids: Vec<NodeId> = net.nodes.keys().copied().collect();
    let cfg = config(net.dir.path(), f, &ids);
    if let Some(n) = net.nodes.remove(&f) {
        let log = n.core.storage().log().clone();
        drop(n);
        log.close();
    }
    {
        let mut storage = DiskStorage::open(&cfg.data_dir).expect("reopen");
        let mut hs = storage.initial_state().expect("state").hard_state;
        storage.log().truncate(kept + 1, None).expect("truncate");
        hs.commit = hs.commit.min(kept);
        storage.set_hard_state(&hs).expect("hard state");
        storage.log().sync().expect("sync");
        storage.log().close();
    }
    let node = open(&cfg);
    assert_eq!(node.core.status().last_log_index, kept, "the tail is gone");
    net.nodes.insert(f, node);

    // No new write: heartbeats alone must bring it back.
    net.tick(30);
    let st = net.core(f).status();
    assert!(
        st.refused_messages > 0,
        "the heartbeats past its log were refused"
    );
    assert_eq!(st.last_log_index, full, "the lost tail was sent again");
    assert_eq!(
        net.nodes[&f].sm.commands(),
        net.nodes[&leader].sm.commands(),
        "and applied"
    );
    net.propose(leader, b"after")
        .expect("the cluster still commits");
}
