//! Each fault mode against an in-process stub transport that records what reaches it, on
//! tokio's paused clock (time advances only when every task waits, so delays cost nothing).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{InboundHandler, NodeId, Transport, TransportError};
use parking_lot::Mutex;
use tokio::time::{sleep, Instant};

use super::{FaultStats, Faults, FaultyTransport};

/// What reached the stub's peer: a one-way frame or a call, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Delivery {
    call: bool,
    frame: Bytes,
    at: Instant,
}

/// A transport that delivers at once to a peer that answers every call with `re:<request>`.
struct Stub {
    id: NodeId,
    log: Mutex<Vec<Delivery>>,
}

impl Stub {
    fn record(&self, call: bool, frame: Bytes) {
        self.log.lock().push(Delivery {
            call,
            frame,
            at: Instant::now(),
        });
    }

    fn delivered(&self, call: bool) -> Vec<Bytes> {
        let log = self.log.lock();
        log.iter()
            .filter(|d| d.call == call)
            .map(|d| d.frame.clone())
            .collect()
    }

    fn calls(&self) -> Vec<Bytes> {
        self.delivered(true)
    }

    fn frames(&self) -> Vec<Bytes> {
        self.delivered(false)
    }
}

#[async_trait]
impl Transport for Stub {
    fn local_id(&self) -> NodeId {
        self.id
    }
    fn local_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }
    fn set_peer(&self, _id: NodeId, _addr: String) {}
    fn remove_peer(&self, _id: NodeId) {}
    fn send(&self, _to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        self.record(false, frame);
        Ok(())
    }
    async fn call(
        &self,
        _to: NodeId,
        frame: Bytes,
        _timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.record(true, frame.clone());
        Ok(answer_to(&frame))
    }
    fn set_handler(&self, _handler: Arc<dyn InboundHandler>) {}
    async fn shutdown(&self) {}
}

fn answer_to(request: &Bytes) -> Bytes {
    Bytes::from([b"re:".as_slice(), request].concat())
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn frame(s: &str) -> Bytes {
    Bytes::from(s.to_owned())
}

fn numbered(n: usize) -> Vec<Bytes> {
    (0..n).map(|i| frame(&i.to_string())).collect()
}

/// Node 1's faulty transport over a stub; tests call and send to node 2.
fn node(faults: &Faults) -> (Arc<Stub>, Arc<dyn Transport>) {
    let stub = Arc::new(Stub {
        id: 1,
        log: Mutex::default(),
    });
    let t = FaultyTransport::wrap(stub.clone(), faults.clone());
    (stub, t)
}

#[tokio::test(start_paused = true)]
async fn duplicated_engine_call_is_delivered_twice_and_answered_once() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_duplicate_rate(1.0, ms(10));
    let req = tagged(consensus_api::channel::ENGINE, "req");
    let answer = t.call(2, req.clone(), ms(1000)).await;
    assert_eq!(answer, Ok(answer_to(&req)));
    sleep(ms(20)).await;
    assert_eq!(stub.calls(), vec![req.clone(), req]);
    assert_eq!(faults.stats().duplicated, 1);
}

#[tokio::test(start_paused = true)]
async fn a_forwarded_client_call_is_never_duplicated() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_duplicate_rate(1.0, ms(10));
    let req = tagged(consensus_api::channel::FORWARD, "propose");
    let answer = t.call(2, req.clone(), ms(1000)).await;
    assert_eq!(answer, Ok(answer_to(&req)));
    sleep(ms(20)).await;
    assert_eq!(stub.calls(), vec![req]);
    assert_eq!(faults.stats().duplicated, 0);
}

/// A frame as the node's shared transport sends it: channel tag first.
fn tagged(channel: u8, s: &str) -> Bytes {
    let mut v = vec![channel];
    v.extend_from_slice(s.as_bytes());
    Bytes::from(v)
}

#[tokio::test(start_paused = true)]
async fn call_failed_after_delivery_was_delivered_once_and_does_not_claim_non_delivery() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_fail_after_delivery_rate(1.0);
    let err = match t.call(2, frame("req"), ms(1000)).await {
        Ok(answer) => panic!("the answer should have been thrown away, got {answer:?}"),
        Err(e) => e,
    };
    assert!(
        !err.is_undelivered(),
        "a delivered call must not fail as undelivered: {err}"
    );
    assert!(matches!(err, TransportError::Timeout(_)), "{err}");
    sleep(ms(1000)).await;
    assert_eq!(stub.calls(), vec![frame("req")]);
    assert_eq!(faults.stats().failed_after_delivery, 1);
}

#[tokio::test(start_paused = true)]
async fn reordered_call_is_overtaken_by_a_later_one_and_still_answered() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_reorder_rate(1.0, ms(500));
    let first = tokio::spawn({
        let t = t.clone();
        async move { t.call(2, frame("first"), ms(1000)).await }
    });
    // Let the first call draw its plan and start waiting before the second is made.
    tokio::task::yield_now().await;
    faults.set_reorder_rate(0.0, ms(500));
    let second = t.call(2, frame("second"), ms(1000)).await;
    assert_eq!(second, Ok(answer_to(&frame("second"))));
    let first = first
        .await
        .unwrap_or_else(|e| panic!("first call task: {e}"));
    assert_eq!(first, Ok(answer_to(&frame("first"))));
    assert_eq!(stub.calls(), vec![frame("second"), frame("first")]);
    assert_eq!(faults.stats().reordered, 1);
}

#[tokio::test(start_paused = true)]
async fn one_way_frames_stay_ordered_and_single_under_every_call_fault() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_duplicate_rate(1.0, ms(5));
    faults.set_reorder_rate(1.0, ms(50));
    faults.set_fail_after_delivery_rate(1.0);
    faults.set_delay(ms(0), ms(20));
    for f in numbered(100) {
        assert_eq!(t.send(2, f), Ok(()));
    }
    sleep(ms(100)).await;
    assert_eq!(stub.frames(), numbered(100));
    let s = faults.stats();
    assert_eq!(
        (s.duplicated, s.reordered, s.failed_after_delivery),
        (0, 0, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn paused_node_holds_its_traffic_and_releases_it_in_order_on_resume() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    assert_eq!(t.send(2, frame("before")), Ok(()));
    faults.pause(1);
    assert!(faults.is_paused(1));
    for f in numbered(5) {
        assert_eq!(t.send(2, f), Ok(()));
    }
    let call = tokio::spawn({
        let t = t.clone();
        async move { t.call(2, frame("held call"), ms(10_000)).await }
    });
    sleep(ms(1000)).await;
    assert_eq!(
        stub.frames(),
        vec![frame("before")],
        "nothing leaves a paused node"
    );
    assert!(stub.calls().is_empty(), "nothing leaves a paused node");
    let resumed_at = Instant::now();
    faults.resume(1);
    let answer = call.await.unwrap_or_else(|e| panic!("call task: {e}"));
    assert_eq!(answer, Ok(answer_to(&frame("held call"))));
    sleep(ms(1)).await;
    let mut expected = vec![frame("before")];
    expected.extend(numbered(5));
    assert_eq!(stub.frames(), expected, "held frames leave in order, once");
    assert_eq!(stub.calls(), vec![frame("held call")]);
    assert!(stub.log.lock()[1..].iter().all(|d| d.at >= resumed_at));
    assert_eq!(faults.stats().held, 6);
}

#[tokio::test(start_paused = true)]
async fn calls_to_a_paused_node_wait_for_its_resume() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.pause(2);
    let call = tokio::spawn({
        let t = t.clone();
        async move { t.call(2, frame("req"), ms(10_000)).await }
    });
    sleep(ms(1000)).await;
    assert!(stub.calls().is_empty());
    faults.resume(2);
    let answer = call.await.unwrap_or_else(|e| panic!("call task: {e}"));
    assert_eq!(answer, Ok(answer_to(&frame("req"))));
}

#[tokio::test(start_paused = true)]
async fn call_held_past_its_deadline_times_out_and_is_never_delivered() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.pause(2);
    let started = Instant::now();
    let err = match t.call(2, frame("late"), ms(100)).await {
        Ok(answer) => panic!("a paused peer answered {answer:?}"),
        Err(e) => e,
    };
    assert_eq!(err, TransportError::Timeout(ms(100)));
    assert_eq!(started.elapsed(), ms(100), "never waits past the deadline");
    faults.resume(2);
    sleep(ms(1000)).await;
    assert!(stub.calls().is_empty());
    let s = faults.stats();
    assert_eq!((s.held, s.expired_while_held), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn heal_clears_every_fault_and_keeps_the_counts() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.set_drop_rate(1.0);
    faults.set_delay(ms(50), ms(50));
    faults.set_duplicate_rate(1.0, ms(5));
    faults.set_reorder_rate(1.0, ms(50));
    faults.set_fail_after_delivery_rate(1.0);
    faults.partition(&[vec![1], vec![2]]);
    faults.pause(1);
    faults.pause(2);
    assert_eq!(t.send(2, frame("cut")), Ok(()));
    faults.heal();
    assert!(!faults.is_paused(1) && !faults.is_paused(2));
    let before = faults.stats();
    assert_eq!(before.cut, 1);
    let started = Instant::now();
    assert_eq!(t.send(2, frame("frame")), Ok(()));
    assert_eq!(
        stub.frames(),
        vec![frame("frame")],
        "sent at once, not queued"
    );
    let answer = t.call(2, frame("req"), ms(1000)).await;
    assert_eq!(answer, Ok(answer_to(&frame("req"))));
    assert_eq!(started.elapsed(), Duration::ZERO, "no delay left");
    sleep(ms(1000)).await;
    assert_eq!(stub.calls(), vec![frame("req")], "delivered once");
    assert_eq!(faults.stats(), before, "no fault after heal");
}

#[tokio::test(start_paused = true)]
async fn stats_count_cut_dropped_and_delayed_traffic() {
    let faults = Faults::new(7);
    let (stub, t) = node(&faults);
    faults.isolate(1, [1, 2, 3]);
    assert_eq!(t.send(2, frame("cut frame")), Ok(()));
    let cut = t.call(3, frame("cut call"), ms(100)).await;
    assert_eq!(cut, Err(TransportError::Timeout(ms(100))));
    faults.heal();
    faults.set_drop_rate(1.0);
    assert_eq!(t.send(2, frame("dropped")), Ok(()));
    faults.heal();
    faults.set_delay(ms(10), ms(10));
    assert_eq!(t.send(2, frame("delayed")), Ok(()));
    sleep(ms(20)).await;
    assert_eq!(stub.frames(), vec![frame("delayed")]);
    let s = faults.stats();
    assert_eq!(
        s,
        FaultStats {
            cut: 2,
            dropped: 1,
            delayed: 1,
            ..FaultStats::default()
        }
    );
    assert_eq!(s.total(), 4);
    assert!(
        s.to_string().starts_with("2 cut, 1 dropped, 1 delayed"),
        "{s}"
    );
}

/// Runs the same sequential mix of calls and frames under `seed`; what reached the peer, when
/// (from the start), and the counts.
async fn mixed_run(seed: u64) -> (Vec<(bool, Bytes, Duration)>, Vec<bool>, FaultStats) {
    let faults = Faults::new(seed);
    let (stub, t) = node(&faults);
    faults.set_drop_rate(0.2);
    faults.set_delay(ms(0), ms(10));
    faults.set_duplicate_rate(0.3, ms(5));
    faults.set_reorder_rate(0.3, ms(50));
    faults.set_fail_after_delivery_rate(0.2);
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for (i, f) in numbered(40).into_iter().enumerate() {
        if i % 2 == 0 {
            outcomes.push(t.call(2, f, ms(200)).await.is_ok());
        } else {
            assert_eq!(t.send(2, f), Ok(()));
        }
    }
    sleep(ms(1000)).await;
    let log = stub
        .log
        .lock()
        .iter()
        .map(|d| (d.call, d.frame.clone(), d.at - start))
        .collect();
    (log, outcomes, faults.stats())
}

#[tokio::test(start_paused = true)]
async fn same_seed_replays_the_same_faults() {
    let a = mixed_run(42).await;
    let b = mixed_run(42).await;
    assert_eq!(a, b);
    assert!(a.2.total() > 0, "the mix injected nothing: {}", a.2);
    let other = mixed_run(43).await;
    assert_ne!(a, other, "another seed should choose differently");
}
