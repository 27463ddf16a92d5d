//! Fault injection around any real transport: partitions, loss and delay, driven by a seed.
//!
//! [`FaultyTransport`] implements [`Transport`] by wrapping one (the tower idea: same interface,
//! added behaviour); it never replaces the real network. All nodes of a test cluster share one
//! [`Faults`] controller, and each node's wrapper filters its own outbound traffic, so a
//! partition cuts both directions.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{NodeId, Transport, TransportError, TransportLayer};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Most delayed one-way frames held for one peer; more are dropped (as a lossy link would).
const LANE_CAPACITY: usize = 10_000;

struct State {
    blocked: HashSet<(NodeId, NodeId)>,
    drop_rate: f64,
    delay: Option<(Duration, Duration)>,
    rng: StdRng,
}

/// The fault plan shared by the nodes of one cluster. Cheap to clone.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    seed: u64,
}

impl Faults {
    /// A plan with no faults whose random choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                blocked: HashSet::new(),
                drop_rate: 0.0,
                delay: None,
                rng: StdRng::seed_from_u64(seed),
            })),
            seed,
        }
    }

    /// The seed, to replay a failing run.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Cuts every link between different groups (both directions).
    pub fn partition(&self, groups: &[Vec<NodeId>]) {
        let mut s = self.state.lock();
        for (i, a) in groups.iter().enumerate() {
            for (j, b) in groups.iter().enumerate() {
                if i != j {
                    for x in a {
                        for y in b {
                            s.blocked.insert((*x, *y));
                        }
                    }
                }
            }
        }
    }

    /// Cuts `node` off from every node in `others`.
    pub fn isolate(&self, node: NodeId, others: impl IntoIterator<Item = NodeId>) {
        let rest: Vec<NodeId> = others.into_iter().filter(|o| *o != node).collect();
        self.partition(&[vec![node], rest]);
    }

    /// Restores every link and removes loss and delay.
    pub fn heal(&self) {
        let mut s = self.state.lock();
        s.blocked.clear();
        s.drop_rate = 0.0;
        s.delay = None;
    }

    /// Drops this fraction of one-way frames and calls.
    pub fn set_drop_rate(&self, rate: f64) {
        self.state.lock().drop_rate = rate.clamp(0.0, 1.0);
    }

    /// Delays every frame by a random duration in `[min, max]`. One-way frames to one peer keep
    /// their order, as the transport contract promises: a frame drawn a shorter delay waits
    /// behind the one before it. Calls are independent of each other and may overtake.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.state.lock().delay = Some((min, max.max(min)));
    }

    /// What happens to a frame from `from` to `to`: `None` = lost, `Some(d)` = delivered after d.
    fn fate(&self, from: NodeId, to: NodeId) -> Option<Duration> {
        let mut s = self.state.lock();
        if s.blocked.contains(&(from, to)) {
            return None;
        }
        let rate = s.drop_rate;
        if rate > 0.0 && s.rng.gen_bool(rate) {
            return None;
        }
        let delay = s.delay;
        Some(match delay {
            Some((lo, hi)) if hi > lo => s.rng.gen_range(lo..=hi),
            Some((lo, _)) => lo,
            None => Duration::ZERO,
        })
    }
}

/// The delayed one-way frames to one peer, released in order by one task.
struct Lane {
    tx: mpsc::Sender<(Instant, Bytes)>,
    /// Release time of the last frame queued: later frames never leave before it.
    last: Instant,
    /// Frames queued and not yet handed to the inner transport.
    queued: Arc<AtomicUsize>,
}

/// A transport whose outbound traffic obeys a [`Faults`] plan.
pub struct FaultyTransport {
    inner: Arc<dyn Transport>,
    faults: Faults,
    lanes: Mutex<HashMap<NodeId, Lane>>,
}

impl FaultyTransport {
    /// Wraps `inner`.
    pub fn wrap(inner: Arc<dyn Transport>, faults: Faults) -> Arc<dyn Transport> {
        Arc::new(Self {
            inner,
            faults,
            lanes: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `frame` to `to` after `delay`, behind every frame already delayed for `to`.
    fn send_delayed(
        &self,
        to: NodeId,
        frame: Bytes,
        delay: Duration,
    ) -> Result<(), TransportError> {
        let mut lanes = self.lanes.lock();
        let now = Instant::now();
        let lane = lanes.entry(to).or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(LANE_CAPACITY);
            let queued = Arc::new(AtomicUsize::new(0));
            let inner = self.inner.clone();
            let done = queued.clone();
            tokio::spawn(async move {
                while let Some((at, frame)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    let _ = inner.send(to, frame);
                    done.fetch_sub(1, Ordering::SeqCst);
                }
            });
            Lane {
                tx,
                last: now,
                queued,
            }
        });
        if delay.is_zero() && lane.queued.load(Ordering::SeqCst) == 0 {
            return self.inner.send(to, frame);
        }
        let at = (now + delay).max(lane.last);
        lane.queued.fetch_add(1, Ordering::SeqCst);
        if lane.tx.try_send((at, frame)).is_err() {
            // Full (or the lane task is gone): the frame is lost, as on a congested link.
            lane.queued.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        lane.last = at;
        Ok(())
    }
}

#[async_trait]
impl TransportLayer for FaultyTransport {
    fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }

    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        match self.faults.fate(self.local_id(), to) {
            None => Ok(()),
            Some(d) => self.send_delayed(to, frame, d),
        }
    }

    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        match self.faults.fate(self.local_id(), to) {
            // A cut link looks like a silent network: the caller waits out its deadline.
            None => {
                tokio::time::sleep(timeout).await;
                Err(TransportError::Timeout(timeout))
            }
            Some(d) => {
                if d >= timeout {
                    tokio::time::sleep(timeout).await;
                    return Err(TransportError::Timeout(timeout));
                }
                tokio::time::sleep(d).await;
                let answer = self.inner.call(to, frame, timeout - d).await?;
                // The answer crosses the link the other way and may be lost there.
                match self.faults.fate(to, self.local_id()) {
                    Some(_) => Ok(answer),
                    None => Err(TransportError::Timeout(timeout)),
                }
            }
        }
    }
}
