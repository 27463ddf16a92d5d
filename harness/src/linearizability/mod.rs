//! A linearizability checker for [`history`](crate::history)s of registers: did the cluster behave
//! as one copy of the data that applies each operation atomically at some instant between its
//! invocation and its completion?
//!
//! Each key is an independent register whose initial value is `None`, so [`check`] splits the
//! history by key and searches each part for a linearization: an order of the operations that
//! respects real time (A before B whenever A completed before B was invoked) in which every
//! answer is what a single register would have given. The search is Wing & Gong's, with Lowe's
//! "just-in-time" refinement (only an operation invoked before the earliest completion among
//! those not yet placed can go next) and memoization of `(set of placed operations, register
//! value)` as in porcupine, so a configuration reached along two paths is explored once. One
//! reduction of our own: an operation that never changes the register (a read, a CAS that did not
//! swap) is placed as soon as it fits, without trying other orders of it.
//!
//! A second one: an [`Outcome::Unknown`] write whose value no operation observes (no read returns
//! it, no put reports it as the previous value, no CAS expects it) is first set aside, as if it
//! never took effect. Such writes are typically requests lost before they reached the log, and
//! each one left in stays a candidate for every place up to the end of the history, multiplying
//! the search by the subsets of them. Setting them aside is sound (never taking effect is one of
//! their allowed outcomes, so a linearization without them is one of the whole history); it can
//! miss a linearization only where a CAS that did not swap relied on the lost write having
//! changed the register, so when the history without them is not shown linearizable the search is
//! run again on every operation.
//!
//! How outcomes constrain the search:
//! - [`Outcome::Failed`] operations had no effect and are removed first.
//! - A known `Put` must see `previous` equal to the register; a `Get` must read the register; a
//!   `Cas` must report `swapped` exactly when the register held `expected`, then sets it.
//! - An [`Outcome::Unknown`] operation may take effect at any instant after its invocation, or
//!   never; its own answer constrains nothing (so an unknown `Get` is dropped).
//!
//! The search is exponential in the worst case, so it takes a step budget per key and answers
//! [`Verdict::Inconclusive`] when that runs out instead of hanging a test.
//!
//! What the test writing the history owes the checker:
//! - Write values that are unique per key, so a read names the one write it saw. Repeated values
//!   are allowed but weaken the check (a write applied twice can hide behind a second write of the
//!   same value) and make the search branch more.
//! - Record [`Outcome::Failed`] only when the operation certainly never reached the log; when in
//!   doubt (timeouts, lost connections, errors after a forward) record [`Outcome::Unknown`], or a
//!   correct cluster can be reported as violating.
//! - Stamp as [`History`](crate::history::History) documents: invoke before sending, complete after
//!   the answer arrives.

use std::collections::BTreeMap;
use std::fmt;

use crate::history::{Event, Op, Outcome, ShowValue};

mod search;
#[cfg(test)]
mod tests;

use search::{compile, Search, Step, Values};

/// A step budget per key for [`check`]: about a second of search in a debug build, far more than
/// a few hundred operations per key with tens of them concurrent need.
pub const DEFAULT_MAX_STEPS: u64 = 1_000_000;

/// How many of the last placed operations a violation's `Display` shows (the whole
/// linearization stays in [`Violation::linearized`]).
pub const SHOWN_TAIL: usize = 20;

/// What the search concluded for one key.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Some order of the operations explains every answer.
    Linearizable,
    /// No order does; says how far the search got.
    Violation(Box<Violation>),
    /// The step budget ran out first; neither linearizability nor a violation is shown.
    Inconclusive,
}

/// Why a key's history is not linearizable, in terms a test log reader can follow.
#[derive(Debug, Clone)]
pub struct Violation {
    /// The key.
    pub key: String,
    /// The longest partial linearization found (most operations with a known outcome placed),
    /// in linearization order.
    pub linearized: Vec<Event>,
    /// The register's value after `linearized`.
    pub state: Option<String>,
    /// The operation whose completion forced the search to stop: one of `stuck` had to take
    /// effect before it completed. `None` when the history is malformed.
    pub due: Option<Event>,
    /// The operations that could have gone next after `linearized`, each with why it cannot (or,
    /// if it can, that nothing continues from there). For a malformed history: the malformed
    /// operations.
    pub stuck: Vec<Stuck>,
    /// How many operations with a known outcome `linearized` leaves out.
    pub unplaced: usize,
}

/// An operation the search could not place next, and why.
#[derive(Debug, Clone)]
pub struct Stuck {
    /// The operation.
    pub event: Event,
    /// Why it cannot go next.
    pub why: String,
}

/// The verdict on one key.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// The key.
    pub key: String,
    /// Operations checked (failed ones and unknown reads are not).
    pub ops: usize,
    /// Search steps spent (both searches when the first, without unobserved unknown writes, did
    /// not show the history linearizable).
    pub steps: u64,
    /// Unknown writes no operation observed, set aside by the first search (see the module
    /// documentation).
    pub set_aside: usize,
    /// What the search concluded.
    pub verdict: Verdict,
}

/// The verdicts of a whole history, one per key, in key order.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// One report per key.
    pub keys: Vec<KeyReport>,
}

impl Report {
    /// Whether every key was shown linearizable (an inconclusive key is not ok).
    pub fn is_ok(&self) -> bool {
        self.keys
            .iter()
            .all(|k| matches!(k.verdict, Verdict::Linearizable))
    }

    /// The keys shown not linearizable.
    pub fn violations(&self) -> impl Iterator<Item = &Violation> {
        self.keys.iter().filter_map(|k| match &k.verdict {
            Verdict::Violation(v) => Some(v.as_ref()),
            _ => None,
        })
    }

    /// The keys whose search ran out of steps.
    pub fn inconclusive(&self) -> impl Iterator<Item = &KeyReport> {
        self.keys
            .iter()
            .filter(|k| matches!(k.verdict, Verdict::Inconclusive))
    }

    /// The report of `key`, if the history touched it.
    pub fn key(&self, key: &str) -> Option<&KeyReport> {
        self.keys.iter().find(|k| k.key == key)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bad = self.violations().count();
        let unsure = self.inconclusive().count();
        writeln!(
            f,
            "linearizability: {} keys, {} linearizable, {bad} violated, {unsure} inconclusive",
            self.keys.len(),
            self.keys.len() - bad - unsure
        )?;
        for k in &self.keys {
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let size = format!(
            "{} ops, {} steps, {} unobserved unknown writes set aside",
            self.ops, self.steps, self.set_aside
        );
        match &self.verdict {
            Verdict::Linearizable => writeln!(f, "key {:?}: linearizable ({size})", self.key),
            Verdict::Inconclusive => writeln!(
                f,
                "key {:?}: inconclusive, step budget exhausted ({size})",
                self.key
            ),
            Verdict::Violation(v) => {
                writeln!(f, "key {:?}: NOT linearizable ({size})", self.key)?;
                write!(f, "{v}")
            }
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(due) = &self.due else {
            writeln!(f, "  malformed history of key {:?}:", self.key)?;
            for s in &self.stuck {
                writeln!(f, "    {}: {}", s.event, s.why)?;
            }
            return Ok(());
        };
        writeln!(
            f,
            "  longest linearization found for key {:?} ({} ops placed, {} with a known outcome left), after which the register holds {}:",
            self.key,
            self.linearized.len(),
            self.unplaced,
            ShowValue(self.state.as_deref())
        )?;
        let skip = self.linearized.len().saturating_sub(SHOWN_TAIL);
        if skip > 0 {
            writeln!(f, "    ... {skip} earlier ops")?;
        }
        for e in &self.linearized[skip..] {
            writeln!(f, "    {e}")?;
        }
        writeln!(
            f,
            "  one of these had to take effect before {due} completed, and none can:"
        )?;
        for s in &self.stuck {
            writeln!(f, "    {}: {}", s.event, s.why)?;
        }
        Ok(())
    }
}

/// Checks `events` (as [`History::events`](crate::history::History::events) returns them) key by
/// key, spending at most `max_steps` search steps on each key (then that key is
/// [`Verdict::Inconclusive`]). A step is one look at a candidate for the next place; a few hundred
/// operations per key with tens of them concurrent typically take thousands to a hundred thousand
/// ([`DEFAULT_MAX_STEPS`] is a million).
pub fn check(events: &[Event], max_steps: u64) -> Report {
    let mut by_key: BTreeMap<&str, Vec<&Event>> = BTreeMap::new();
    for e in events {
        by_key.entry(e.key.as_str()).or_default().push(e);
    }
    Report {
        keys: by_key
            .into_iter()
            .map(|(key, events)| check_key(key, &events, max_steps))
            .collect(),
    }
}

/// A value as the search sees it: an index into the key's distinct values, 0 for `None`.
/// Why `outcome` is not a well-formed answer of `e`, if it is not.
fn malformed(e: &Event) -> Option<String> {
    if !e.outcome.answers(&e.op) {
        return Some("the outcome does not answer this kind of operation".into());
    }
    match e.completed {
        Some(t) if t < e.invoked && e.outcome != Outcome::Unknown => {
            Some("completed before it was invoked".into())
        }
        _ => None,
    }
}

fn check_key(key: &str, events: &[&Event], max_steps: u64) -> KeyReport {
    let events: Vec<&Event> = events
        .iter()
        .copied()
        .filter(|e| match &e.outcome {
            Outcome::Failed => false,
            Outcome::Unknown => e.op != Op::Get,
            _ => true,
        })
        .collect();
    let bad: Vec<Stuck> = events
        .iter()
        .filter_map(|e| {
            malformed(e).map(|why| Stuck {
                event: (*e).clone(),
                why,
            })
        })
        .collect();
    let report = |steps, set_aside, verdict| KeyReport {
        key: key.to_owned(),
        ops: events.len(),
        steps,
        set_aside,
        verdict,
    };
    if !bad.is_empty() {
        let violation = Violation {
            key: key.to_owned(),
            linearized: Vec::new(),
            state: None,
            due: None,
            unplaced: events.len(),
            stuck: bad,
        };
        return report(0, 0, Verdict::Violation(Box::new(violation)));
    }
    let observed = observed_values(&events);
    let kept: Vec<&Event> = events
        .iter()
        .copied()
        .filter(|e| {
            e.outcome != Outcome::Unknown || written(e).is_none_or(|v| observed.contains(v))
        })
        .collect();
    let set_aside = events.len() - kept.len();
    let mut spent = 0;
    if set_aside > 0 {
        let (verdict, steps) = search(key, &kept, max_steps);
        spent = steps;
        if matches!(verdict, Verdict::Linearizable) {
            return report(spent, set_aside, verdict);
        }
    }
    let (verdict, steps) = search(key, &events, max_steps);
    report(spent + steps, set_aside, verdict)
}

/// The value `e` writes, if it is a write.
fn written(e: &Event) -> Option<&str> {
    match &e.op {
        Op::Put { value } => Some(value),
        Op::Cas { new, .. } => Some(new),
        Op::Get => None,
    }
}

/// The values some operation observed: read, reported as previous, or expected by a CAS (an
/// unknown CAS counts, since it may have swapped on that value).
fn observed_values<'a>(events: &[&'a Event]) -> std::collections::HashSet<&'a str> {
    let mut seen = std::collections::HashSet::new();
    for e in events {
        let v = match (&e.op, &e.outcome) {
            (_, Outcome::Get { value }) | (_, Outcome::Put { previous: value }) => value.as_deref(),
            (Op::Cas { expected, .. }, _) => expected.as_deref(),
            _ => None,
        };
        seen.extend(v);
    }
    seen
}

/// One search over `events` of `key`: its verdict and the steps it took.
fn search(key: &str, events: &[&Event], max_steps: u64) -> (Verdict, u64) {
    let mut values = Values::default();
    let steps: Vec<Step> = events.iter().map(|e| compile(e, &mut values)).collect();
    let mut search = Search::new(events, steps, max_steps);
    let verdict = match search.run() {
        Some(true) => Verdict::Linearizable,
        None => Verdict::Inconclusive,
        Some(false) => Verdict::Violation(Box::new(search.explain(key, events, &values))),
    };
    (verdict, search.steps)
}
