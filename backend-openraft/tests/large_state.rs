//! Large state on openraft with a small frame limit: a snapshot many times the frame limit
//! reaches a new learner as a chunked transfer, commands just under the size limit replicate
//! however many are due, and a longer command is refused before anything is appended.
//!
//! Two engines in one process over an in-memory transport that enforces the frame limit on
//! every frame, as the real transports do.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use backend_openraft::OpenraftBackend;
use bytes::Bytes;
use consensus_api::{
    Backend, ByteStateMachine, ConsensusError, Engine, EngineContext, ErrorKind, InboundHandler,
    NodeConfig, NodeId, Status, TransferDirection, TransferProgress, Transport, TransportError,
};
use parking_lot::Mutex;
use tokio::sync::mpsc;

const FRAME: usize = 64 << 10;
const WAIT: Duration = Duration::from_secs(20);

/// Every node's handlers by `(node, channel)`, held weakly as the real channels hold them.
#[derive(Default)]
struct Net {
    handlers: Mutex<HashMap<(NodeId, u8), Weak<dyn InboundHandler>>>,
    /// One ordered queue of one-way frames per `(from, to, channel)`.
    queues: Mutex<HashMap<(NodeId, NodeId, u8), mpsc::UnboundedSender<Bytes>>>,
    /// The largest frame seen on each channel.
    largest: Mutex<HashMap<u8, usize>>,
    /// Calls made on the snapshot channel.
    snapshot_calls: AtomicUsize,
    /// The snapshot channel goes down for [`OUTAGE`] at this call (`None`: never).
    outage_at: Mutex<Option<usize>>,
    /// Whether the snapshot channel is down.
    snapshot_down: Arc<AtomicBool>,
}

/// How long the snapshot channel stays down: longer than a chunk's retries, so the transfer
/// fails and openraft sends the snapshot again.
const OUTAGE: Duration = Duration::from_millis(500);

impl Net {
    fn handler(&self, to: NodeId, channel: u8) -> Result<Arc<dyn InboundHandler>, TransportError> {
        self.handlers
            .lock()
            .get(&(to, channel))
            .and_then(Weak::upgrade)
            .ok_or(TransportError::UnknownPeer(to))
    }

    fn check(&self, channel: u8, frame: &Bytes) -> Result<(), TransportError> {
        TransportError::check_frame(frame.len(), FRAME)?;
        let mut largest = self.largest.lock();
        let l = largest.entry(channel).or_default();
        *l = (*l).max(frame.len());
        Ok(())
    }
}

/// One node's view of one channel.
struct Endpoint {
    net: Arc<Net>,
    me: NodeId,
    channel: u8,
}

#[async_trait]
impl Transport for Endpoint {
    fn local_id(&self) -> NodeId {
        self.me
    }
    fn local_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.me as u16))
    }
    fn set_peer(&self, _id: NodeId, _addr: String) {}
    fn remove_peer(&self, _id: NodeId) {}
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        self.net.check(self.channel, &frame)?;
        let key = (self.me, to, self.channel);
        let mut queues = self.net.queues.lock();
        let tx = queues.entry(key).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
            let (net, from, channel) = (self.net.clone(), self.me, self.channel);
            tokio::spawn(async move {
                while let Some(frame) = rx.recv().await {
                    if let Ok(h) = net.handler(to, channel) {
                        h.on_message(from, frame);
                    }
                }
            });
            tx
        });
        tx.send(frame).map_err(|_| TransportError::Closed)
    }
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.net.check(self.channel, &frame)?;
        if self.channel == SNAPSHOT {
            let n = self.net.snapshot_calls.fetch_add(1, Ordering::SeqCst);
            if *self.net.outage_at.lock() == Some(n) {
                let down = self.net.snapshot_down.clone();
                down.store(true, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(OUTAGE).await;
                    down.store(false, Ordering::SeqCst);
                });
            }
            if self.net.snapshot_down.load(Ordering::SeqCst) {
                return Err(TransportError::Unreachable {
                    peer: to,
                    reason: "snapshot channel down".into(),
                });
            }
        }
        let handler = self.net.handler(to, self.channel)?;
        let answer = tokio::time::timeout(timeout, handler.on_call(self.me, frame))
            .await
            .map_err(|_| TransportError::Timeout(timeout))?
            .map_err(TransportError::Remote)?;
        self.net.check(self.channel, &answer)?;
        Ok(answer)
    }
    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        self.net
            .handlers
            .lock()
            .insert((self.me, self.channel), Arc::downgrade(&handler));
    }
    async fn shutdown(&self) {}
}

/// Appends every command to one byte string.
#[derive(Default)]
struct Concat(Mutex<Vec<u8>>);

impl ByteStateMachine for Concat {
    fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
        self.0.lock().extend_from_slice(command);
        Vec::new()
    }
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        Ok(self.0.lock().clone())
    }
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        *self.0.lock() = snapshot.to_vec();
        Ok(())
    }
}

const ENGINE: u8 = 0;
const SNAPSHOT: u8 = 2;

async fn start(
    net: &Arc<Net>,
    id: NodeId,
    dir: &std::path::Path,
    members: &[NodeId],
) -> (Arc<dyn Engine>, Arc<Concat>) {
    let mut config = NodeConfig::new(id, "large-state", dir);
    config.transport.max_frame_bytes = FRAME;
    config.initial_members = members
        .iter()
        .map(|m| (*m, format!("node-{m}")))
        .collect::<BTreeMap<_, _>>();
    // Nothing kept behind a snapshot: a new learner can only catch up from the snapshot.
    config.keep_logs_after_snapshot = 0;
    let sm = Arc::new(Concat::default());
    let endpoint = |channel| -> Arc<dyn Transport> {
        Arc::new(Endpoint {
            net: net.clone(),
            me: id,
            channel,
        })
    };
    let engine = OpenraftBackend
        .start(EngineContext {
            config,
            state_machine: sm.clone(),
            transport: endpoint(ENGINE),
            snapshot_transport: endpoint(SNAPSHOT),
        })
        .await
        .expect("engine starts");
    (engine, sm)
}

async fn wait(engine: &Arc<dyn Engine>, what: &str, pred: impl FnMut(&Status) -> bool) {
    let mut status = engine.status();
    tokio::time::timeout(WAIT, status.wait_for(pred))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("status watch");
}

/// Command `i`: `len` bytes, all of them `i`.
fn command(i: usize, len: usize) -> Vec<u8> {
    vec![i as u8; len]
}

fn max_command() -> usize {
    let mut c = NodeConfig::new(1, "c", "/unused");
    c.transport.max_frame_bytes = FRAME;
    c.max_command_bytes()
}

/// A single-voter leader holding about 1.2 MiB of state in a snapshot, its log purged (openraft
/// purges in batches of 64 entries); returns it, its state machine and the snapshot's index.
async fn leader_with_a_large_snapshot(
    net: &Arc<Net>,
    dir: &std::path::Path,
) -> (Arc<dyn Engine>, Arc<Concat>, u64) {
    let (leader, leader_sm) = start(net, 1, dir, &[1]).await;
    wait(&leader, "node 1 to lead", |s| s.is_leader()).await;
    for i in 0..100 {
        leader.propose(command(i, 12_000)).await.expect("propose");
    }
    let snap = leader.snapshot_now().await.expect("snapshot");
    assert!(snap >= 100, "snapshot at {snap}");
    wait(&leader, "the log to be purged", |s| s.purged_index >= 64).await;
    (leader, leader_sm, snap)
}

/// The last transfer `engine` made with `peer` in `direction`.
fn transfer(
    engine: &Arc<dyn Engine>,
    peer: NodeId,
    direction: TransferDirection,
) -> TransferProgress {
    engine
        .snapshot_transfers()
        .into_iter()
        .find(|t| t.peer == peer && t.direction == direction)
        .unwrap_or_else(|| panic!("no {direction:?} transfer with node {peer}"))
}

/// A leader's snapshot of about 1.2 MiB reaches a new learner with 64 KiB frames, as a
/// chunked transfer; commands just under the limit, many due at once, then replicate to it; a
/// longer command is refused before anything is appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_many_frames_large_reaches_a_new_learner_in_chunks_and_big_commands_replicate() {
    let net = Arc::new(Net::default());
    let (d1, d2) = (
        tempfile::tempdir().expect("temp dir"),
        tempfile::tempdir().expect("temp dir"),
    );
    let (leader, leader_sm, snap) = leader_with_a_large_snapshot(&net, d1.path()).await;
    let max_command = max_command();

    // One size rule: refused before anything is appended.
    let before = leader.status().borrow().last_log_index;
    let err = leader
        .propose(command(0, max_command + 1))
        .await
        .expect_err("a command over the limit");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest, "{err}");
    assert_eq!(leader.status().borrow().last_log_index, before);

    let (learner, learner_sm) = start(&net, 2, d2.path(), &[]).await;
    tokio::time::timeout(WAIT, leader.add_learner(2, "node-2".into()))
        .await
        .expect("add_learner in time")
        .expect("add learner");
    wait(&learner, "the learner to catch up", |s| {
        s.applied_index >= snap
    })
    .await;
    assert_eq!(
        *learner_sm.0.lock(),
        *leader_sm.0.lock(),
        "the learner restored the leader's state"
    );
    let sent = transfer(&leader, 2, TransferDirection::Sending);
    assert!(sent.done && sent.error.is_none(), "{sent:?}");
    assert!(sent.total_bytes > 1 << 20, "{sent:?}");
    assert!(sent.chunks >= sent.total_bytes / FRAME as u64, "{sent:?}");
    let received = transfer(&learner, 1, TransferDirection::Receiving);
    assert!(received.done && received.error.is_none(), "{received:?}");

    // Commands each just under the limit, many due at once: each replication message is
    // bounded by bytes, so they reach the learner.
    let proposals = (0..12).map(|i| leader.propose(command(100 + i, max_command)));
    for r in futures::future::join_all(proposals).await {
        r.expect("a command at the limit");
    }
    let last = leader.status().borrow().applied_index;
    wait(&learner, "the learner to apply the big commands", |s| {
        s.applied_index >= last
    })
    .await;
    assert_eq!(*learner_sm.0.lock(), *leader_sm.0.lock());
    // Frames over the limit are refused (replication would stall above); this checks the
    // test came close to it.
    let largest = net.largest.lock().clone();
    assert!(largest[&ENGINE] > max_command, "{largest:?}");
    assert!(largest[&SNAPSHOT] > FRAME / 2, "{largest:?}");

    learner.shutdown().await.expect("shutdown");
    leader.shutdown().await.expect("shutdown");
}

/// A transfer cut off halfway (the snapshot channel down for longer than a chunk's retries)
/// fails; openraft sends the snapshot again and the transfer resumes from the chunks the
/// learner already has, instead of starting over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_snapshot_transfer_resumes_where_it_stopped() {
    let net = Arc::new(Net::default());
    let (d1, d2) = (
        tempfile::tempdir().expect("temp dir"),
        tempfile::tempdir().expect("temp dir"),
    );
    let (leader, leader_sm, snap) = leader_with_a_large_snapshot(&net, d1.path()).await;
    // The transfer's start, then ten chunks, then the outage.
    *net.outage_at.lock() = Some(net.snapshot_calls.load(Ordering::SeqCst) + 11);
    let (learner, learner_sm) = start(&net, 2, d2.path(), &[]).await;
    tokio::time::timeout(WAIT, leader.add_learner(2, "node-2".into()))
        .await
        .expect("add_learner in time")
        .expect("add learner");
    wait(&learner, "the learner to catch up", |s| {
        s.applied_index >= snap
    })
    .await;
    assert_eq!(*learner_sm.0.lock(), *leader_sm.0.lock());
    let sent = transfer(&leader, 2, TransferDirection::Sending);
    assert!(sent.done && sent.error.is_none(), "{sent:?}");
    let chunk = {
        let mut c = NodeConfig::new(1, "c", "/unused");
        c.transport.max_frame_bytes = FRAME;
        c.snapshot_chunk_bytes() as u64
    };
    assert!(
        sent.resumed_bytes >= 10 * chunk,
        "the second attempt resumed: {sent:?}"
    );
    assert!(
        sent.bytes + sent.resumed_bytes >= sent.total_bytes,
        "{sent:?}"
    );
    learner.shutdown().await.expect("shutdown");
    leader.shutdown().await.expect("shutdown");
}
