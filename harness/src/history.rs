//! A thread-safe record of the operations concurrent clients ran, for the
//! [`linearizability`](crate::linearizability) checker to judge.
//!
//! Every timestamp comes from one shared [`AtomicU64`] counter, so real-time order between
//! operations is exact rather than subject to clock skew: operation A precedes B iff
//! `A.completed < B.invoked`.
//!
//! Call order, per operation: [`History::invoke`] just before sending the request (that takes the
//! invocation time), then [`Pending::complete`] as soon as the answer is known (that takes the
//! completion time). Anything between the two stamps counts as concurrent, so stamping late on
//! invocation or early on completion would hide real overlaps and make the checker report a
//! false violation. A [`Pending`] dropped without completing records [`Outcome::Unknown`], so a
//! client task that panics or is cancelled leaves an honest record.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// What a client asked of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set the key to `value`.
    Put {
        /// The value written.
        value: String,
    },
    /// Read the key.
    Get,
    /// Set the key to `new` if it holds `expected` (`None`: absent).
    Cas {
        /// The value the key must hold.
        expected: Option<String>,
        /// The value to set.
        new: String,
    },
}

/// What a client learned about an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `Put` took effect; `previous` is the value it replaced.
    Put {
        /// The value before the write.
        previous: Option<String>,
    },
    /// A `Get` read `value`.
    Get {
        /// The value read (`None`: absent).
        value: Option<String>,
    },
    /// A `Cas` took effect and reported whether it swapped.
    Cas {
        /// Whether the expected value held.
        swapped: bool,
    },
    /// The operation definitely had no effect (rejected before it could be proposed). Record this
    /// only when that is certain: a timeout after sending is [`Outcome::Unknown`].
    Failed,
    /// The operation may or may not have taken effect, at any time after its invocation
    /// (a timeout, a lost connection, a leader change while waiting).
    Unknown,
}

impl Outcome {
    /// Whether this outcome is the answer to `op` (a `Put` answered by `Outcome::Put`, ...);
    /// `Failed` and `Unknown` answer anything.
    pub fn answers(&self, op: &Op) -> bool {
        matches!(
            (op, self),
            (_, Outcome::Failed | Outcome::Unknown)
                | (Op::Put { .. }, Outcome::Put { .. })
                | (Op::Get, Outcome::Get { .. })
                | (Op::Cas { .. }, Outcome::Cas { .. })
        )
    }
}

/// One recorded operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the history, in invocation order; names the operation in reports.
    pub id: usize,
    /// The client that ran it.
    pub client: usize,
    /// The key it addressed.
    pub key: String,
    /// What was asked.
    pub op: Op,
    /// Logical time just before the request was sent.
    pub invoked: u64,
    /// Logical time the client stopped waiting; `None` while still in flight. For an
    /// [`Outcome::Unknown`] the operation may take effect after this, so the checker treats its
    /// completion as +infinity.
    pub completed: Option<u64>,
    /// What the client learned; [`Outcome::Unknown`] while in flight.
    pub outcome: Outcome,
}

impl Event {
    /// The latest logical time the operation can take effect at: its completion, or `u64::MAX`
    /// when the outcome is unknown (or still in flight).
    pub fn deadline(&self) -> u64 {
        match (&self.outcome, self.completed) {
            (Outcome::Unknown, _) | (_, None) => u64::MAX,
            (_, Some(t)) => t,
        }
    }
}

/// A value as reports show it: quoted, or `none` for an absent key.
pub(crate) struct ShowValue<'a>(pub(crate) Option<&'a str>);

impl fmt::Display for ShowValue<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(v) => write!(f, "{v:?}"),
            None => f.write_str("none"),
        }
    }
}

/// One line: `#12 c3 [40,47] put(k, "v1") -> prev none`; an unknown completion shows as `∞`.
impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} c{} [{},", self.id, self.client, self.invoked)?;
        match self.deadline() {
            u64::MAX => f.write_str("∞)")?,
            t => write!(f, "{t}]")?,
        }
        match &self.op {
            Op::Put { value } => write!(f, " put({}, {value:?})", self.key)?,
            Op::Get => write!(f, " get({})", self.key)?,
            Op::Cas { expected, new } => write!(
                f,
                " cas({}, {} -> {new:?})",
                self.key,
                ShowValue(expected.as_deref())
            )?,
        }
        match &self.outcome {
            Outcome::Put { previous } => write!(f, " -> prev {}", ShowValue(previous.as_deref())),
            Outcome::Get { value } => write!(f, " -> {}", ShowValue(value.as_deref())),
            Outcome::Cas { swapped: true } => f.write_str(" -> swapped"),
            Outcome::Cas { swapped: false } => f.write_str(" -> not swapped"),
            Outcome::Failed => f.write_str(" -> failed"),
            Outcome::Unknown if self.completed.is_none() => f.write_str(" -> in flight"),
            Outcome::Unknown => f.write_str(" -> unknown"),
        }
    }
}

/// How many operations a history holds, by kind of outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// All operations invoked.
    pub ops: usize,
    /// Completed with a known answer.
    pub ok: usize,
    /// Completed as [`Outcome::Unknown`] (including dropped [`Pending`]s).
    pub unknown: usize,
    /// Completed as [`Outcome::Failed`].
    pub failed: usize,
    /// Not completed yet.
    pub in_flight: usize,
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ops: {} ok, {} unknown, {} failed, {} in flight",
            self.ops, self.ok, self.unknown, self.failed, self.in_flight
        )
    }
}

struct Inner {
    clock: AtomicU64,
    events: Mutex<Vec<Event>>,
}

impl Inner {
    fn tick(&self) -> u64 {
        // SeqCst: a stamp taken after another thread's stamp (in real time) must be larger.
        self.clock.fetch_add(1, Ordering::SeqCst)
    }
}

/// The shared record of a run's operations. Cheap to clone: clones share the clock and the record,
/// so each client task takes its own.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("History")
            .field("counts", &self.counts())
            .finish()
    }
}

impl History {
    /// An empty history whose clock starts at 0.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                clock: AtomicU64::new(0),
                events: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Records that `client` is about to run `op` on `key`; call it just before sending the
    /// request, and complete the returned [`Pending`] once the answer is known.
    pub fn invoke(&self, client: usize, key: impl Into<String>, op: Op) -> Pending {
        let key = key.into();
        let mut events = self.inner.events.lock();
        // Stamped under the lock, so ids follow invocation order.
        let invoked = self.inner.tick();
        let id = events.len();
        events.push(Event {
            id,
            client,
            key,
            op,
            invoked,
            completed: None,
            outcome: Outcome::Unknown,
        });
        Pending {
            history: self.clone(),
            id,
            done: false,
        }
    }

    /// A copy of every operation so far, in invocation order; operations still in flight appear
    /// with `completed: None` and [`Outcome::Unknown`].
    pub fn events(&self) -> Vec<Event> {
        self.inner.events.lock().clone()
    }

    /// How many operations there are, by kind of outcome.
    pub fn counts(&self) -> Counts {
        let events = self.inner.events.lock();
        let mut c = Counts {
            ops: events.len(),
            ..Counts::default()
        };
        for e in events.iter() {
            match (&e.outcome, e.completed) {
                (_, None) => c.in_flight += 1,
                (Outcome::Unknown, _) => c.unknown += 1,
                (Outcome::Failed, _) => c.failed += 1,
                _ => c.ok += 1,
            }
        }
        c
    }

    fn finish(&self, id: usize, outcome: Outcome) {
        let completed = self.inner.tick();
        if let Some(e) = self.inner.events.lock().get_mut(id) {
            e.completed = Some(completed);
            e.outcome = outcome;
        }
    }
}

/// An invoked operation waiting for its outcome. Dropping it without [`Pending::complete`]
/// records [`Outcome::Unknown`].
#[must_use = "complete the operation with its outcome; dropping it records Outcome::Unknown"]
pub struct Pending {
    history: History,
    id: usize,
    done: bool,
}

impl fmt::Debug for Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pending").field("id", &self.id).finish()
    }
}

impl Pending {
    /// The operation's [`Event::id`].
    pub fn id(&self) -> usize {
        self.id
    }

    /// Records the outcome and takes the completion time; call it as soon as the answer is known.
    /// The outcome must answer the invoked [`Op`] ([`Outcome::answers`]); the checker reports a
    /// mismatch as a violation.
    pub fn complete(mut self, outcome: Outcome) {
        self.done = true;
        self.history.finish(self.id, outcome);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            self.history.finish(self.id, Outcome::Unknown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(v: &str) -> Op {
        Op::Put { value: v.into() }
    }

    #[test]
    fn an_operation_completed_before_another_is_invoked_precedes_it() {
        let h = History::new();
        let a = h.invoke(0, "k", put("a"));
        a.complete(Outcome::Put { previous: None });
        let b = h.invoke(1, "k", Op::Get);
        b.complete(Outcome::Get {
            value: Some("a".into()),
        });
        let e = h.events();
        assert_eq!(e.len(), 2);
        assert!(e[0].invoked < e[0].deadline());
        assert!(e[0].deadline() < e[1].invoked, "{} then {}", e[0], e[1]);
    }

    #[test]
    fn overlapping_operations_have_overlapping_intervals() {
        let h = History::new();
        let a = h.invoke(0, "k", put("a"));
        let b = h.invoke(1, "k", Op::Get);
        a.complete(Outcome::Put { previous: None });
        b.complete(Outcome::Get { value: None });
        let e = h.events();
        assert!(e[1].invoked < e[0].deadline() && e[0].invoked < e[1].deadline());
    }

    #[test]
    fn a_dropped_pending_records_unknown_with_infinite_deadline() {
        let h = History::new();
        drop(h.invoke(3, "k", put("a")));
        let e = &h.events()[0];
        assert_eq!(e.outcome, Outcome::Unknown);
        assert!(e.completed.is_some());
        assert_eq!(e.deadline(), u64::MAX);
        assert_eq!(h.counts().unknown, 1);
    }

    #[test]
    fn an_operation_in_flight_shows_as_unknown_and_is_counted() {
        let h = History::new();
        let p = h.invoke(0, "k", Op::Get);
        let e = &h.events()[0];
        assert_eq!((e.completed, &e.outcome), (None, &Outcome::Unknown));
        assert_eq!(e.deadline(), u64::MAX);
        assert!(e.to_string().ends_with("in flight"), "{e}");
        assert_eq!(h.counts().in_flight, 1);
        p.complete(Outcome::Get { value: None });
        assert_eq!(h.counts().in_flight, 0);
    }

    #[test]
    fn counts_split_operations_by_outcome() {
        let h = History::new();
        h.invoke(0, "k", put("a"))
            .complete(Outcome::Put { previous: None });
        h.invoke(0, "k", put("b")).complete(Outcome::Failed);
        h.invoke(0, "k", put("c")).complete(Outcome::Unknown);
        let _in_flight = h.invoke(1, "k", Op::Get);
        assert_eq!(
            h.counts(),
            Counts {
                ops: 4,
                ok: 1,
                unknown: 1,
                failed: 1,
                in_flight: 1
            }
        );
    }

    #[test]
    fn concurrent_clients_lose_no_operation_and_share_one_clock() {
        let h = History::new();
        std::thread::scope(|s| {
            for client in 0..8 {
                let h = h.clone();
                s.spawn(move || {
                    for i in 0..200 {
                        h.invoke(client, format!("k{}", i % 3), Op::Get)
                            .complete(Outcome::Get { value: None });
                    }
                });
            }
        });
        let events = h.events();
        assert_eq!(events.len(), 1600);
        let mut stamps: Vec<u64> = events
            .iter()
            .flat_map(|e| [e.invoked, e.deadline()])
            .collect();
        stamps.sort_unstable();
        stamps.dedup();
        assert_eq!(stamps.len(), 3200, "every stamp is unique");
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e.id, i);
            assert!(e.invoked < e.deadline());
        }
        // Ids follow invocation order.
        assert!(events.windows(2).all(|w| w[0].invoked < w[1].invoked));
    }

    #[test]
    fn events_print_compactly() {
        let h = History::new();
        h.invoke(2, "x", put("v1"))
            .complete(Outcome::Put { previous: None });
        h.invoke(
            1,
            "x",
            Op::Cas {
                expected: Some("v1".into()),
                new: "v2".into(),
            },
        )
        .complete(Outcome::Cas { swapped: true });
        drop(h.invoke(0, "x", Op::Get));
        let lines: Vec<String> = h.events().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            [
                "#0 c2 [0,1] put(x, \"v1\") -> prev none",
                "#1 c1 [2,3] cas(x, \"v1\" -> \"v2\") -> swapped",
                "#2 c0 [4,∞) get(x) -> unknown",
            ]
        );
    }

    #[test]
    fn outcomes_answer_only_their_own_kind_of_operation() {
        assert!(Outcome::Put { previous: None }.answers(&put("a")));
        assert!(!Outcome::Get { value: None }.answers(&put("a")));
        assert!(!Outcome::Cas { swapped: true }.answers(&Op::Get));
        assert!(Outcome::Unknown.answers(&Op::Get));
        assert!(Outcome::Failed.answers(&Op::Get));
    }
}
