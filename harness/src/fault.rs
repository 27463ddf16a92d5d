//! Fault injection around any real transport, driven by a seed: partitions, loss, delay, call
//! duplication and reordering, calls that fail after delivery, and node pauses.
//!
//! [`FaultyTransport`] implements [`Transport`](consensus_api::Transport) by wrapping one (the
//! tower idea: same interface, added behaviour); it never replaces the real network. All nodes
//! of a test cluster share one [`Faults`] plan, and each node's wrapper filters its own outbound
//! traffic, so a partition cuts both directions.
//!
//! # What stays within the transport contract
//! One-way frames are only ever lost, delayed or held: those to one peer keep their order and
//! are never duplicated. Calls may be lost, delayed, overtaken, duplicated, or delivered with
//! their answer thrown away; every such failure is [`TransportError::Timeout`] (outcome
//! unknown). No fault ever returns an error for which
//! [`TransportError::is_undelivered`] is true: that would be a transport lying about delivery.
//!
//! # Replay
//! Every random choice comes from one rng seeded by [`Faults::new`], drawn under a lock when a
//! frame or call is handed to the wrapper. A run replays its choices when its traffic reaches
//! the wrappers in the same order; with real tasks and sockets that order is close to, not
//! exactly, the same.

#[cfg(test)]
mod tests;
mod transport;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{NodeId, TransportError};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

pub use transport::FaultyTransport;

/// How many faults a plan has injected so far, across every node sharing it. Counts are
/// cumulative: [`Faults::heal`] stops new faults but keeps the counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    /// Frames and calls (requests or answers) lost to a partition.
    pub cut: u64,
    /// Frames and calls (requests or answers) lost to the drop rate.
    pub dropped: u64,
    /// Frames and calls given a non-zero delay by [`Faults::set_delay`].
    pub delayed: u64,
    /// Calls delivered a second time ([`Faults::set_duplicate_rate`]).
    pub duplicated: u64,
    /// Calls given an extra delay so later ones overtake them ([`Faults::set_reorder_rate`]).
    pub reordered: u64,
    /// Calls delivered whose answer was replaced by an ambiguous error
    /// ([`Faults::set_fail_after_delivery_rate`]).
    pub failed_after_delivery: u64,
    /// Frames and calls (requests or answers) that had to wait for a paused node to resume.
    pub held: u64,
    /// Calls that failed with `Timeout` because their deadline passed while held by a pause.
    pub expired_while_held: u64,
}

impl FaultStats {
    /// The sum of every count: zero means the run injected no fault at all.
    pub fn total(&self) -> u64 {
        self.cut
            + self.dropped
            + self.delayed
            + self.duplicated
            + self.reordered
            + self.failed_after_delivery
            + self.held
            + self.expired_while_held
    }
}

impl fmt::Display for FaultStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} cut, {} dropped, {} delayed, {} duplicated, {} reordered, \
             {} failed after delivery, {} held by pause ({} expired)",
            self.cut,
            self.dropped,
            self.delayed,
            self.duplicated,
            self.reordered,
            self.failed_after_delivery,
            self.held,
            self.expired_while_held
        )
    }
}

/// A probability together with a duration bound (the lag of a duplicate, the most extra delay
/// of a reordered call).
#[derive(Clone, Copy)]
struct RateWithin {
    rate: f64,
    max: Duration,
}

struct State {
    blocked: HashSet<(NodeId, NodeId)>,
    drop_rate: f64,
    delay: Option<(Duration, Duration)>,
    duplicate: Option<RateWithin>,
    reorder: Option<RateWithin>,
    fail_after_delivery: f64,
    paused: HashSet<NodeId>,
    stats: FaultStats,
    rng: StdRng,
}

impl State {
    /// Whether a draw with probability `rate` hits (no draw at all when `rate` is zero, so an
    /// unused fault does not shift the rng stream of the others).
    fn hit(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.gen_bool(rate)
    }

    fn draw(&mut self, lo: Duration, hi: Duration) -> Duration {
        if hi > lo {
            self.rng.gen_range(lo..=hi)
        } else {
            lo
        }
    }

    /// Whether a frame or call from `from` to `to` is lost (and counts why).
    fn lost(&mut self, from: NodeId, to: NodeId) -> bool {
        if self.blocked.contains(&(from, to)) {
            self.stats.cut += 1;
            return true;
        }
        let rate = self.drop_rate;
        if self.hit(rate) {
            self.stats.dropped += 1;
            return true;
        }
        false
    }

    /// The delay [`Faults::set_delay`] gives one frame or call.
    fn delay(&mut self) -> Duration {
        let d = match self.delay {
            Some((lo, hi)) => self.draw(lo, hi),
            None => Duration::ZERO,
        };
        if !d.is_zero() {
            self.stats.delayed += 1;
        }
        d
    }
}

/// What happens to one call, decided when it is handed to the wrapper.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CallPlan {
    /// When the request reaches the peer, after the call starts; `None`: lost on the way.
    delay: Option<Duration>,
    /// A second copy is delivered this long after the first; its answer is discarded.
    duplicate_after: Option<Duration>,
    /// The answer is thrown away and the caller gets `Timeout`.
    fail_after_delivery: bool,
}

/// The fault plan shared by the nodes of one cluster. Cheap to clone.
///
/// Every fault is set by a method here and cleared by [`heal`](Self::heal); [`stats`](Self::stats)
/// counts what was injected.
#[derive(Clone)]
pub struct Faults {
    state: Arc<Mutex<State>>,
    /// Bumped on every resume, so traffic held by a pause re-checks whether it may go.
    resumed: Arc<watch::Sender<u64>>,
    seed: u64,
}

/// A probability from a caller's number: clamped to `[0, 1]`, NaN as zero.
fn probability(rate: f64) -> f64 {
    if rate.is_nan() {
        0.0
    } else {
        rate.clamp(0.0, 1.0)
    }
}

impl Faults {
    /// A plan with no faults whose random choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                blocked: HashSet::new(),
                drop_rate: 0.0,
                delay: None,
                duplicate: None,
                reorder: None,
                fail_after_delivery: 0.0,
                paused: HashSet::new(),
                stats: FaultStats::default(),
                rng: StdRng::seed_from_u64(seed),
            })),
            resumed: Arc::new(watch::channel(0).0),
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

    /// Cuts the link between `a` and `b` (both directions), leaving every other link up: with a
    /// third node that sees both, a bridge partition.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        self.partition(&[vec![a], vec![b]]);
    }

    /// Clears every fault: restores every link, removes loss, delay, duplication, reordering
    /// and failures after delivery, and resumes every paused node (its held traffic leaves in
    /// order). Traffic already delayed still arrives late; the counts of
    /// [`stats`](Self::stats) are kept.
    pub fn heal(&self) {
        {
            let mut s = self.state.lock();
            s.blocked.clear();
            s.drop_rate = 0.0;
            s.delay = None;
            s.duplicate = None;
            s.reorder = None;
            s.fail_after_delivery = 0.0;
            s.paused.clear();
        }
        self.resumed.send_modify(|v| *v += 1);
    }

    /// Drops this fraction of one-way frames and calls.
    pub fn set_drop_rate(&self, rate: f64) {
        self.state.lock().drop_rate = probability(rate);
    }

    /// Delays every frame by a random duration in `[min, max]`. One-way frames to one peer keep
    /// their order, as the transport contract promises: a frame drawn a shorter delay waits
    /// behind the one before it. Calls are independent of each other and may overtake.
    pub fn set_delay(&self, min: Duration, max: Duration) {
        self.state.lock().delay = Some((min, max.max(min)));
    }

    /// Delivers this fraction of calls twice: the copy follows the first delivery after a
    /// random lag in `[0, max_lag]`, and its answer is discarded; the caller gets the first
    /// copy's answer. The copy goes even if a fault starts in between. One-way frames are never
    /// duplicated (the contract forbids it).
    ///
    /// Only engine calls (frames tagged [`consensus_api::channel::ENGINE`]) are duplicated: a forwarded client operation must be delivered
    /// at most once, as real transports deliver calls, and the node handle relies on it.
    pub fn set_duplicate_rate(&self, rate: f64, max_lag: Duration) {
        self.state.lock().duplicate = Some(RateWithin {
            rate: probability(rate),
            max: max_lag,
        });
    }

    /// Gives this fraction of calls an extra random delay, so calls made after them overtake
    /// them. The extra delay is at most `max_extra` and at most half the time the call has left
    /// after its ordinary delay, so a reordered call still fits its caller's timeout. One-way
    /// frames are never reordered (the contract forbids it).
    pub fn set_reorder_rate(&self, rate: f64, max_extra: Duration) {
        self.state.lock().reorder = Some(RateWithin {
            rate: probability(rate),
            max: max_extra,
        });
    }

    /// Delivers this fraction of calls, throws their answer away and fails them with
    /// [`TransportError::Timeout`] at once, as a connection reset after the request went out
    /// would: the request took effect, and the caller cannot know it. A correct caller treats
    /// the outcome as unknown (`is_undelivered()` is false) and never blindly retries a
    /// non-idempotent request.
    pub fn set_fail_after_delivery_rate(&self, rate: f64) {
        self.state.lock().fail_after_delivery = probability(rate);
    }

    /// Freezes `node`'s network, as a long GC pause or `SIGSTOP` would: its outbound frames and
    /// calls, frames and calls addressed to it, and answers to or from it are held (not
    /// dropped) until [`resume`](Self::resume) or [`heal`](Self::heal), then released, one-way
    /// frames in their order per peer. A held call whose deadline passes fails with
    /// [`TransportError::Timeout`] and is never delivered.
    ///
    /// Limits: only the network pauses. The node's engine keeps running, so its timers fire
    /// (a paused follower starts elections, a paused leader may step down by check-quorum,
    /// which a frozen process would not), and its local clients are still served. Frames
    /// already handed to the real transport still arrive. Held one-way frames share the delay
    /// queue's bound (10 000 per peer); beyond it they are lost.
    pub fn pause(&self, node: NodeId) {
        self.state.lock().paused.insert(node);
    }

    /// Ends [`pause`](Self::pause) for `node`: its held traffic leaves (unless another paused
    /// node is at the other end).
    pub fn resume(&self, node: NodeId) {
        let was = self.state.lock().paused.remove(&node);
        if was {
            self.resumed.send_modify(|v| *v += 1);
        }
    }

    /// Whether `node` is paused.
    pub fn is_paused(&self, node: NodeId) -> bool {
        self.state.lock().paused.contains(&node)
    }

    /// How many faults have been injected so far, to print with a test's outcome.
    pub fn stats(&self) -> FaultStats {
        self.state.lock().stats
    }

    /// What happens to a one-way frame from `from` to `to`: `None` = lost, `Some(d)` =
    /// delivered after `d` (behind earlier frames to `to`).
    fn fate(&self, from: NodeId, to: NodeId) -> Option<Duration> {
        let mut s = self.state.lock();
        if s.lost(from, to) {
            return None;
        }
        Some(s.delay())
    }

    /// What happens to a call from `from` to `to` that has `timeout` left.
    fn plan_call(&self, from: NodeId, to: NodeId, timeout: Duration) -> CallPlan {
        let mut s = self.state.lock();
        if s.lost(from, to) {
            return CallPlan {
                delay: None,
                duplicate_after: None,
                fail_after_delivery: false,
            };
        }
        let mut delay = s.delay();
        if let Some(r) = s.reorder {
            if s.hit(r.rate) {
                let room = timeout.saturating_sub(delay) / 2;
                delay += s.draw(Duration::ZERO, r.max.min(room));
                s.stats.reordered += 1;
            }
        }
        let duplicate = s.duplicate;
        let duplicate_after = match duplicate {
            Some(r) if s.hit(r.rate) => Some(s.draw(Duration::ZERO, r.max)),
            _ => None,
        };
        let rate = s.fail_after_delivery;
        let fail_after_delivery = s.hit(rate);
        CallPlan {
            delay: Some(delay),
            duplicate_after,
            fail_after_delivery,
        }
    }

    /// Whether the answer of a call from `from` to `to` is lost on its way back.
    fn answer_lost(&self, from: NodeId, to: NodeId) -> bool {
        self.state.lock().lost(to, from)
    }

    fn count(&self, f: impl FnOnce(&mut FaultStats)) {
        f(&mut self.state.lock().stats);
    }

    /// Whether traffic between `a` and `b` must wait for a pause to end.
    fn held(&self, a: NodeId, b: NodeId) -> bool {
        let s = self.state.lock();
        s.paused.contains(&a) || s.paused.contains(&b)
    }

    /// Waits until neither `a` nor `b` is paused, or until `deadline`: true when free to go.
    async fn wait_resumed(&self, a: NodeId, b: NodeId, deadline: Option<Instant>) -> bool {
        // Subscribed before checking, so a resume between the check and the wait is not lost.
        let mut rx = self.resumed.subscribe();
        loop {
            if !self.held(a, b) {
                return true;
            }
            match deadline {
                Some(at) => match tokio::time::timeout_at(at, rx.changed()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) | Err(_) => return !self.held(a, b),
                },
                // The sender lives as long as this plan, which the caller holds.
                None => {
                    if rx.changed().await.is_err() {
                        return !self.held(a, b);
                    }
                }
            }
        }
    }
}

/// The error every injected call failure returns: the outcome is unknown.
fn unknown_outcome(timeout: Duration) -> TransportError {
    TransportError::Timeout(timeout)
}
