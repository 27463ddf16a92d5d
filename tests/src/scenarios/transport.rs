//! Transport-level scenarios, run for every transport: ordering, deadlines, size limits, the
//! per-peer memory budget, cluster identity, and garbage on the socket.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{
    InboundHandler, NodeConfig, NodeId, Transport, TransportError, TransportFactory,
};
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The transport family, declared once: the suite macros run every scenario in it.
#[doc(hidden)]
#[macro_export]
macro_rules! __transport_family {
    ($make:ident) => {
        $crate::__tests!($make, transport;
            one_way_frames_arrive_in_order,
            a_call_fails_at_its_deadline,
            oversized_frames_are_refused,
            a_peer_from_another_cluster_is_refused,
            a_peer_with_the_wrong_certificate_is_refused,
            garbage_on_the_socket_is_survived,
            a_restarted_peer_is_reconnected,
            frames_queued_for_an_unreachable_peer_are_not_delivered_after_it_returns,
            a_failure_that_promises_non_delivery_was_not_delivered,
            a_peer_cannot_hold_more_call_bytes_than_its_budget
        );
    };
}

/// Records one-way frames; answers calls by echoing, or sleeps when asked to.
#[derive(Default)]
struct Recorder {
    frames: Mutex<Vec<(NodeId, Bytes)>>,
    calls: Mutex<u64>,
}

#[async_trait]
impl InboundHandler for Recorder {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        self.frames.lock().push((from, frame));
    }
    async fn on_call(&self, _from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        *self.calls.lock() += 1;
        if frame.as_ref() == b"sleep" {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        Ok(frame)
    }
}

async fn pair(
    factory: &dyn TransportFactory,
    clusters: (&str, &str),
    limits: (usize, usize),
) -> (
    Arc<dyn Transport>,
    Arc<dyn Transport>,
    Arc<Recorder>,
    tempfile::TempDir,
) {
    crate::init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = crate::test_tls(dir.path());
    let mut a = NodeConfig::new(1, clusters.0, dir.path());
    a.transport.max_frame_bytes = limits.0;
    a.transport.tls = tls.clone();
    let mut b = NodeConfig::new(2, clusters.1, dir.path());
    b.transport.max_frame_bytes = limits.1;
    b.transport.tls = tls;
    let ta = factory.bind(&a).await.expect("bind a");
    let tb = factory.bind(&b).await.expect("bind b");
    let rec = Arc::new(Recorder::default());
    tb.set_handler(rec.clone());
    ta.set_handler(Arc::new(Recorder::default()));
    ta.set_peer(2, tb.local_addr().to_string());
    tb.set_peer(1, ta.local_addr().to_string());
    (ta, tb, rec, dir)
}

const SECOND: Duration = Duration::from_secs(1);

/// One-way frames to a peer arrive complete and in the order they were sent.
pub async fn one_way_frames_arrive_in_order(factory: Arc<dyn TransportFactory>) {
    let (a, _b, rec, _dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    let n = 2000u32;
    for i in 0..n {
        // A full queue drops frames by design; the test sends slower than that.
        while let Err(TransportError::QueueFull(_)) =
            a.send(2, Bytes::from(i.to_le_bytes().to_vec()))
        {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + 10 * SECOND;
    while rec.frames.lock().len() < n as usize {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} frames arrived",
            rec.frames.lock().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got: Vec<u32> = rec
        .frames
        .lock()
        .iter()
        .map(|(from, f)| {
            assert_eq!(*from, 1, "sender id");
            u32::from_le_bytes(f[..4].try_into().expect("4 bytes"))
        })
        .collect();
    assert_eq!(got, (0..n).collect::<Vec<_>>());
}

/// A call whose answer does not come within its deadline fails with `Timeout`, promptly.
pub async fn a_call_fails_at_its_deadline(factory: Arc<dyn TransportFactory>) {
    let (a, _b, _rec, _dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    assert_eq!(
        a.call(2, Bytes::from_static(b"hi"), 5 * SECOND)
            .await
            .expect("echo"),
        Bytes::from_static(b"hi")
    );
    let started = Instant::now();
    let err = a
        .call(2, Bytes::from_static(b"sleep"), Duration::from_millis(200))
        .await
        .expect_err("must time out");
    assert!(matches!(err, TransportError::Timeout(_)), "{err}");
    assert!(
        started.elapsed() < 4 * SECOND,
        "deadline ignored: {:?}",
        started.elapsed()
    );
}

/// Frames above the limit are refused with `FrameTooLarge` by the sender and refused by a
/// receiver with a smaller limit; the receiver keeps serving.
pub async fn oversized_frames_are_refused(factory: Arc<dyn TransportFactory>) {
    let (a, b, rec, _dir) = pair(&*factory, ("c", "c"), (1 << 20, 64 << 10)).await;
    let big = Bytes::from(vec![7u8; 2 << 20]);
    assert!(matches!(
        a.send(2, big.clone()),
        Err(TransportError::FrameTooLarge { .. })
    ));
    assert!(matches!(
        a.call(2, big, 5 * SECOND).await,
        Err(TransportError::FrameTooLarge { .. })
    ));
    let medium = Bytes::from(vec![7u8; 256 << 10]);
    let err = a
        .call(2, medium, 5 * SECOND)
        .await
        .expect_err("receiver limit");
    assert!(
        !matches!(err, TransportError::Timeout(_)),
        "refusal must be explicit, got {err}"
    );
    assert_eq!(
        *rec.calls.lock(),
        0,
        "the oversized call reached the handler"
    );
    assert_eq!(
        a.call(2, Bytes::from_static(b"ok"), 5 * SECOND)
            .await
            .expect("small call still works"),
        Bytes::from_static(b"ok")
    );
    drop(b);
}

/// A peer of another cluster is refused before its frames reach the handler.
pub async fn a_peer_from_another_cluster_is_refused(factory: Arc<dyn TransportFactory>) {
    let (a, _b, rec, _dir) = pair(&*factory, ("blue", "green"), (1 << 20, 1 << 20)).await;
    let err = a
        .call(2, Bytes::from_static(b"hello"), 5 * SECOND)
        .await
        .expect_err("must be refused");
    assert!(matches!(err, TransportError::Refused(_)), "{err}");
    let _ = a.send(2, Bytes::from_static(b"one-way"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(*rec.calls.lock(), 0);
    assert!(
        rec.frames.lock().is_empty(),
        "a foreign frame was delivered"
    );
}

/// Mutual TLS: a peer whose certificate comes from another CA, or names another node than the
/// id it claims, is refused before anything reaches the handler.
pub async fn a_peer_with_the_wrong_certificate_is_refused(factory: Arc<dyn TransportFactory>) {
    let (_a, b, rec, dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    let target = b.local_addr().to_string();
    // Another cluster CA altogether.
    let other = tempfile::tempdir().expect("temp dir");
    let mut foreign = NodeConfig::new(1, "c", other.path());
    foreign.transport.tls = consensus_api::TlsConfig::DevCerts {
        dir: other.path().join("certs"),
    };
    // The right CA, but node 3's certificate while claiming to be node 1.
    let certs = dir.path().join("certs");
    let mut impostor = NodeConfig::new(1, "c", dir.path());
    impostor.transport.tls = consensus_api::TlsConfig::DevCerts { dir: certs.clone() };
    let mut node3 = impostor.clone();
    node3.id = 3;
    drop(
        factory
            .bind(&node3)
            .await
            .expect("generate node 3's certificate"),
    );
    impostor.transport.tls = consensus_api::TlsConfig::Files {
        ca_cert: certs.join("ca.pem"),
        node_cert: certs.join("node-3.pem"),
        node_key: certs.join("node-3.key"),
    };
    for (what, cfg) in [("foreign CA", foreign), ("impostor", impostor)] {
        let t = factory.bind(&cfg).await.expect("bind");
        t.set_handler(Arc::new(Recorder::default()));
        t.set_peer(2, target.clone());
        let r = t
            .call(2, Bytes::from_static(b"let me in"), 3 * SECOND)
            .await;
        assert!(r.is_err(), "{what}: a call got through: {r:?}");
        let _ = t.send(2, Bytes::from_static(b"one-way"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        t.shutdown().await;
    }
    assert_eq!(
        *rec.calls.lock(),
        0,
        "a refused peer's call reached the handler"
    );
    assert!(
        rec.frames.lock().is_empty(),
        "a refused peer's frame was delivered"
    );
}

/// Garbage bytes on the listening socket (TCP and UDP, whichever the transport uses) are
/// dropped; the node keeps serving real peers.
pub async fn garbage_on_the_socket_is_survived(factory: Arc<dyn TransportFactory>) {
    let (a, b, _rec, _dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    if let Ok(u) = tokio::net::UdpSocket::bind("127.0.0.1:0").await {
        for size in [1usize, 40, 1200, 1500] {
            let _ = u.send_to(&vec![0xc3; size], b.local_addr()).await;
        }
        // A long-header-looking datagram with a bogus version and connection ids.
        let mut fake = vec![0xc0, 0, 0, 0, 1, 8];
        fake.extend_from_slice(&[7; 8]);
        fake.push(8);
        fake.extend_from_slice(&[9; 8]);
        fake.resize(1200, 0xee);
        let _ = u.send_to(&fake, b.local_addr()).await;
    }
    for _ in 0..3 {
        if let Ok(mut s) = tokio::net::TcpStream::connect(b.local_addr()).await {
            let _ = s.write_all(&[0xff; 4096]).await;
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
            let _ = s.shutdown().await;
        }
    }
    assert_eq!(
        a.call(2, Bytes::from_static(b"still"), 5 * SECOND)
            .await
            .expect("serving"),
        Bytes::from_static(b"still")
    );
}

/// A peer that restarts on the same address is reached again without intervention.
pub async fn a_restarted_peer_is_reconnected(factory: Arc<dyn TransportFactory>) {
    let (a, b, _rec, dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    let addr = b.local_addr();
    a.call(2, Bytes::from_static(b"1"), 5 * SECOND)
        .await
        .expect("first");
    b.shutdown().await;
    drop(b);
    let _b2 = rebind(&*factory, dir.path(), addr, Arc::new(Recorder::default())).await;
    let deadline = Instant::now() + 10 * SECOND;
    loop {
        match a.call(2, Bytes::from_static(b"2"), SECOND).await {
            Ok(v) => {
                assert_eq!(v, Bytes::from_static(b"2"));
                break;
            }
            Err(e) => {
                assert!(Instant::now() < deadline, "never reconnected: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Node 2 again, on `addr` with the same certificates (same cluster CA) as before its restart.
async fn rebind(
    factory: &dyn TransportFactory,
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    handler: Arc<Recorder>,
) -> Arc<dyn Transport> {
    let mut cfg = NodeConfig::new(2, "c", dir);
    cfg.transport.listen_addr = addr;
    cfg.transport.tls = crate::test_tls(dir);
    let deadline = Instant::now() + 10 * SECOND;
    let b = loop {
        match factory.bind(&cfg).await {
            Ok(t) => break t,
            Err(e) => {
                assert!(Instant::now() < deadline, "rebind failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    b.set_handler(handler);
    b
}

/// One-way frames sent while a peer is down are never delivered to the process that comes
/// back on its address: they were queued for a connection that failed, and a Raft message that
/// is seconds old (an append read before a log compaction, a vote of an older term) must not
/// reach the restarted node as if it were fresh. Only frames sent after it is back arrive.
pub async fn frames_queued_for_an_unreachable_peer_are_not_delivered_after_it_returns(
    factory: Arc<dyn TransportFactory>,
) {
    let (a, b, rec, dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    let addr = b.local_addr();
    a.send(2, Bytes::from_static(b"before"))
        .expect("queue a frame");
    let deadline = Instant::now() + 10 * SECOND;
    while rec.frames.lock().is_empty() {
        assert!(Instant::now() < deadline, "the first frame never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    b.shutdown().await;
    drop(b);

    // Frames sent while node 2 is gone, across several failed connection attempts; a failed
    // call after the last of them shows an attempt failed after it was sent.
    let mut stale = 0u32;
    let mut refused_sends = 0u32;
    let down_since = Instant::now();
    loop {
        if a.send(2, Bytes::from(format!("stale-{stale}"))).is_err() {
            refused_sends += 1;
        }
        stale += 1;
        let probe = a.call(2, Bytes::from_static(b"probe"), SECOND).await;
        assert!(probe.is_err(), "node 2 is down, yet a call was answered");
        if down_since.elapsed() >= Duration::from_millis(600) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{stale} frames sent while node 2 was down, {refused_sends} refused at once");

    let back = Arc::new(Recorder::default());
    let _b2 = rebind(&*factory, dir.path(), addr, back.clone()).await;
    let deadline = Instant::now() + 10 * SECOND;
    let mut fresh = 0u32;
    while back.frames.lock().is_empty() {
        assert!(
            Instant::now() < deadline,
            "no frame reached the restarted node 2"
        );
        let _ = a.send(2, Bytes::from(format!("fresh-{fresh}")));
        fresh += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Frames to one peer arrive in order: anything stale still deliverable came before this.
    let got: Vec<String> = back
        .frames
        .lock()
        .iter()
        .map(|(_, f)| String::from_utf8_lossy(f).into_owned())
        .collect();
    let delivered_stale: Vec<&String> = got.iter().filter(|f| f.starts_with("stale")).collect();
    assert!(
        delivered_stale.is_empty(),
        "frames sent while node 2 was down reached its restarted process: {delivered_stale:?} \
         (all received: {got:?})"
    );
}

/// A failed call whose error promises non-delivery ([`TransportError::is_undelivered`]) was
/// really not delivered, and a call that reached the peer's handler never fails with such an
/// error, even when the peer goes away before answering: the node handle retries proposals
/// only on the promise, so a broken one would duplicate them.
pub async fn a_failure_that_promises_non_delivery_was_not_delivered(
    factory: Arc<dyn TransportFactory>,
) {
    let (a, b, rec, _dir) = pair(&*factory, ("c", "c"), (1 << 20, 1 << 20)).await;
    let unknown = a
        .call(9, Bytes::from_static(b"hi"), SECOND)
        .await
        .expect_err("no such peer");
    assert!(
        matches!(unknown, TransportError::UnknownPeer(9)),
        "{unknown}"
    );
    assert!(unknown.is_undelivered());
    a.call(2, Bytes::from_static(b"hi"), 5 * SECOND)
        .await
        .expect("echo");
    let before = *rec.calls.lock();
    // Delivered, then the peer goes away before it answers.
    let pending = tokio::spawn({
        let a = a.clone();
        async move { a.call(2, Bytes::from_static(b"sleep"), 3 * SECOND).await }
    });
    let deadline = Instant::now() + 5 * SECOND;
    while *rec.calls.lock() == before {
        assert!(Instant::now() < deadline, "the call never reached the peer");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.shutdown().await;
    let outcome = pending.await.expect("call task");
    if let Err(e) = &outcome {
        assert!(
            !e.is_undelivered(),
            "a delivered call failed with an error that promises non-delivery: {e:?}"
        );
    }
    // The peer is gone: whatever the error, if it promises non-delivery, nothing arrived.
    let after_stop = *rec.calls.lock();
    match a.call(2, Bytes::from_static(b"hi"), SECOND).await {
        Err(e) if e.is_undelivered() => assert_eq!(*rec.calls.lock(), after_stop, "{e:?}"),
        Err(_) => {}
        Ok(_) => panic!("a stopped peer answered"),
    }
}

/// Holds every call until the test opens the gate; counts the calls that reached it.
struct Gate {
    entered: std::sync::atomic::AtomicUsize,
    open: tokio::sync::Semaphore,
}

#[async_trait]
impl InboundHandler for Gate {
    fn on_message(&self, _from: NodeId, _frame: Bytes) {}
    async fn on_call(&self, _from: NodeId, _frame: Bytes) -> Result<Bytes, String> {
        self.entered
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let permit = self.open.acquire().await.map_err(|e| e.to_string())?;
        permit.forget();
        Ok(Bytes::from_static(b"ok"))
    }
}

/// One peer cannot make the receiver hold more bytes of calls than
/// `max_inflight_bytes_per_peer`: with a 128 KiB budget, two 60 KiB calls reach the handler
/// and two more wait, unread, until the first are answered; then every call completes (none is
/// refused or lost, and calls that each hold part of the budget cannot deadlock).
pub async fn a_peer_cannot_hold_more_call_bytes_than_its_budget(
    factory: Arc<dyn TransportFactory>,
) {
    use std::sync::atomic::Ordering;
    crate::init_logging();
    let dir = tempfile::tempdir().expect("temp dir");
    let tls = crate::test_tls(dir.path());
    let config = |id: NodeId| {
        let mut c = NodeConfig::new(id, "c", dir.path());
        c.transport.max_frame_bytes = 64 << 10;
        c.transport.max_inflight_bytes_per_peer = 128 << 10;
        c.transport.tls = tls.clone();
        c
    };
    let a = factory.bind(&config(1)).await.expect("bind a");
    let b = factory.bind(&config(2)).await.expect("bind b");
    let gate = Arc::new(Gate {
        entered: Default::default(),
        open: tokio::sync::Semaphore::new(0),
    });
    b.set_handler(gate.clone());
    a.set_handler(Arc::new(Recorder::default()));
    a.set_peer(2, b.local_addr().to_string());
    let calls: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move {
                a.call(2, Bytes::from(vec![7u8; 60 << 10]), 20 * SECOND)
                    .await
            })
        })
        .collect();
    let deadline = Instant::now() + 10 * SECOND;
    while gate.entered.load(Ordering::SeqCst) < 2 {
        assert!(Instant::now() < deadline, "no call arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A window in which a transport without the budget lets the other two in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        gate.entered.load(Ordering::SeqCst),
        2,
        "the receiver holds more call bytes than the budget"
    );
    gate.open.add_permits(4);
    for c in calls {
        let reply = c.await.expect("task").expect("call within the budget");
        assert_eq!(reply.as_ref(), b"ok");
    }
    assert_eq!(gate.entered.load(Ordering::SeqCst), 4);
    a.shutdown().await;
    b.shutdown().await;
}
