//! [`FaultyTransport`]: the wrapper that applies a [`Faults`] plan to one node's outbound traffic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{NodeId, Transport, TransportError, TransportLayer};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{unknown_outcome, Faults};

/// Most delayed or held one-way frames queued for one peer; more are dropped (as a congested
/// link would).
const LANE_CAPACITY: usize = 10_000;

/// A one-way frame waiting in a [`Lane`]: when it may leave, and whether a pause already
/// counted it as held.
struct Queued {
    at: Instant,
    frame: Bytes,
    counted: bool,
}

/// The delayed one-way frames to one peer, released in order by one task.
struct Lane {
    tx: mpsc::Sender<Queued>,
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

    /// Sends `frame` to `to` after `delay`, behind every frame already queued for `to`; a frame
    /// that finds this node or `to` paused when its time comes waits for the resume.
    fn send_delayed(
        &self,
        to: NodeId,
        frame: Bytes,
        delay: Duration,
    ) -> Result<(), TransportError> {
        let me = self.local_id();
        let mut lanes = self.lanes.lock();
        let now = Instant::now();
        let lane = lanes.entry(to).or_insert_with(|| {
            let (tx, mut rx) = mpsc::channel::<Queued>(LANE_CAPACITY);
            let queued = Arc::new(AtomicUsize::new(0));
            let inner = self.inner.clone();
            let faults = self.faults.clone();
            let done = queued.clone();
            tokio::spawn(async move {
                while let Some(q) = rx.recv().await {
                    tokio::time::sleep_until(q.at).await;
                    if faults.held(me, to) {
                        if !q.counted {
                            faults.count(|s| s.held += 1);
                        }
                        faults.wait_resumed(me, to, None).await;
                    }
                    let _ = inner.send(to, q.frame);
                    done.fetch_sub(1, Ordering::SeqCst);
                }
            });
            Lane {
                tx,
                last: now,
                queued,
            }
        });
        let held = self.faults.held(me, to);
        if delay.is_zero() && lane.queued.load(Ordering::SeqCst) == 0 && !held {
            return self.inner.send(to, frame);
        }
        let at = (now + delay).max(lane.last);
        lane.queued.fetch_add(1, Ordering::SeqCst);
        let queued = Queued {
            at,
            frame,
            counted: held,
        };
        if lane.tx.try_send(queued).is_err() {
            // Full (or the lane task is gone): the frame is lost, as on a congested link.
            lane.queued.fetch_sub(1, Ordering::SeqCst);
            self.faults.count(|s| s.dropped += 1);
            return Ok(());
        }
        lane.last = at;
        if held {
            self.faults.count(|s| s.held += 1);
        }
        Ok(())
    }

    /// Waits while this node or `to` is paused, at most until `deadline`: false when the
    /// deadline passed first.
    async fn hold(&self, to: NodeId, deadline: Instant) -> bool {
        let me = self.local_id();
        if !self.faults.held(me, to) {
            return true;
        }
        self.faults.count(|s| s.held += 1);
        let free = self.faults.wait_resumed(me, to, Some(deadline)).await;
        if !free {
            self.faults.count(|s| s.expired_while_held += 1);
        }
        free
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
        let deadline = Instant::now() + timeout;
        // A paused end holds the request; past the deadline it is never delivered.
        if !self.hold(to, deadline).await {
            return Err(unknown_outcome(timeout));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let plan = self.faults.plan_call(self.local_id(), to, left);
        let delay = match plan.delay {
            Some(d) if d < left => d,
            // A cut link (or a delay past the deadline) looks like a silent network: the
            // caller waits out its deadline.
            _ => {
                tokio::time::sleep_until(deadline).await;
                return Err(unknown_outcome(timeout));
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        // Only engine traffic: Raft messages are idempotent for the engines, while a forwarded
        // client operation must be delivered at most once (as real transports do).
        let engine_call = frame.first() == Some(&consensus_api::channel::ENGINE);
        if let Some(lag) = plan.duplicate_after.filter(|_| engine_call) {
            self.faults.count(|s| s.duplicated += 1);
            let inner = self.inner.clone();
            let copy = frame.clone();
            tokio::spawn(async move {
                tokio::time::sleep(lag).await;
                let _ = inner.call(to, copy, timeout).await;
            });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let answer = self.inner.call(to, frame, remaining).await?;
        if plan.fail_after_delivery {
            self.faults.count(|s| s.failed_after_delivery += 1);
            return Err(unknown_outcome(timeout));
        }
        // A paused end cannot send or take the answer.
        if !self.hold(to, deadline).await {
            return Err(unknown_outcome(timeout));
        }
        // The answer crosses the link the other way and may be lost there.
        if self.faults.answer_lost(self.local_id(), to) {
            return Err(unknown_outcome(timeout));
        }
        Ok(answer)
    }
}
