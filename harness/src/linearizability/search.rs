//! The search behind [`check`](super::check): operations reduced to register constraints, and
//! the just-in-time walk with memoization and backtracking.

use std::collections::{HashMap, HashSet};

use super::{Stuck, Violation};
use crate::history::{Event, Op, Outcome, ShowValue};

pub(super) type Value = usize;
pub(super) const NONE: Value = 0;

/// An operation reduced to what constrains the register. `None` in a field: unknown answer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Step {
    Put {
        value: Value,
        previous: Option<Value>,
    },
    Get {
        value: Value,
    },
    Cas {
        expected: Value,
        new: Value,
        swapped: Option<bool>,
    },
}

impl Step {
    /// The register after this operation applied to `state`, or `None` if its answer rules
    /// that out.
    fn apply(self, state: Value) -> Option<Value> {
        match self {
            Step::Put { value, previous } => previous.is_none_or(|p| p == state).then_some(value),
            Step::Get { value } => (value == state).then_some(state),
            Step::Cas {
                expected,
                new,
                swapped,
            } => {
                let holds = state == expected;
                swapped
                    .is_none_or(|s| s == holds)
                    .then_some(if holds { new } else { state })
            }
        }
    }

    /// Whether the operation leaves the register as it is wherever it fits.
    fn never_changes_the_register(self) -> bool {
        match self {
            Step::Get { .. }
            | Step::Cas {
                swapped: Some(false),
                ..
            } => true,
            Step::Put { value, previous } => previous == Some(value),
            Step::Cas { expected, new, .. } => expected == new,
        }
    }
}

/// The distinct values of one key.
#[derive(Default)]
pub(super) struct Values<'a> {
    index: HashMap<&'a str, Value>,
    names: Vec<&'a str>,
}

impl<'a> Values<'a> {
    fn of(&mut self, v: Option<&'a str>) -> Value {
        let Some(v) = v else { return NONE };
        let next = self.names.len() + 1;
        *self.index.entry(v).or_insert_with(|| {
            self.names.push(v);
            next
        })
    }

    fn name(&self, v: Value) -> Option<String> {
        self.names.get(v.checked_sub(1)?).map(|s| (*s).to_owned())
    }
}

/// Reduces `e` to its constraint on the register, naming values through `values`.
pub(super) fn compile<'a>(e: &'a Event, values: &mut Values<'a>) -> Step {
    match (&e.op, &e.outcome) {
        (Op::Put { value }, outcome) => Step::Put {
            value: values.of(Some(value)),
            previous: match outcome {
                Outcome::Put { previous } => Some(values.of(previous.as_deref())),
                _ => None,
            },
        },
        (Op::Get, outcome) => Step::Get {
            value: match outcome {
                Outcome::Get { value } => values.of(value.as_deref()),
                // Unknown reads were dropped and other outcomes rejected as malformed.
                _ => NONE,
            },
        },
        (Op::Cas { expected, new }, outcome) => Step::Cas {
            expected: values.of(expected.as_deref()),
            new: values.of(Some(new)),
            swapped: match outcome {
                Outcome::Cas { swapped } => Some(*swapped),
                _ => None,
            },
        },
    }
}

/// A fixed-size set of operation indexes, hashable for the memo.
#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w |= 1 << (i % 64);
        }
    }
    fn clear(&mut self, i: usize) {
        if let Some(w) = self.0.get_mut(i / 64) {
            *w &= !(1 << (i % 64));
        }
    }
}

/// The list node before the first entry.
const HEAD: usize = 0;

/// What trying to place an operation did.
enum Placed {
    /// Placed; the search goes on from the new configuration.
    New,
    /// Placed, and it was the last operation with a known outcome: linearizable.
    Done,
    /// Its answer does not fit the register.
    Refused,
    /// Fits, but the configuration it leads to was explored before.
    Seen,
}

/// A placed operation.
struct Frame {
    /// Its call entry.
    call: usize,
    /// The register before it.
    before: Value,
    /// Placed as a harmless operation (no alternative to try in its stead).
    forced: bool,
}

/// The just-in-time search over one key: a doubly-linked list of call and return entries in
/// time order, from which placed operations are lifted (and put back on backtracking, in reverse
/// order, dancing-links style). The candidates for the next place are the calls before the first
/// remaining return: that operation must take effect before it completes.
pub(super) struct Search {
    steps_of: Vec<Step>,
    known: Vec<bool>,
    harmless: Vec<bool>,
    invoked: Vec<u64>,
    deadline: Vec<u64>,
    /// Per list node: the operation it belongs to, whether it is the call, and for a call the
    /// node of its return. Node [`HEAD`] and the last node (`tail`) are sentinels.
    op: Vec<usize>,
    is_call: Vec<bool>,
    partner: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
    tail: usize,
    max_steps: u64,
    pub(super) steps: u64,
    /// The configuration: operations placed, in order, the set of them and the register.
    stack: Vec<Frame>,
    placed: Bits,
    state: Value,
    known_total: usize,
    known_left: usize,
    /// Configurations explored, so none is explored twice.
    seen: HashSet<(Bits, Value)>,
    /// The best partial linearization found: operations in order, the register after them, and
    /// how many known operations it places.
    best: Vec<usize>,
    best_state: Value,
    best_known: usize,
}

impl Search {
    pub(super) fn new(events: &[&Event], steps_of: Vec<Step>, max_steps: u64) -> Self {
        let n = events.len();
        let invoked: Vec<u64> = events.iter().map(|e| e.invoked).collect();
        let deadline: Vec<u64> = events.iter().map(|e| e.deadline()).collect();
        let known: Vec<bool> = events
            .iter()
            .map(|e| e.outcome != Outcome::Unknown)
            .collect();
        let harmless = steps_of
            .iter()
            .zip(&known)
            .map(|(s, k)| *k && s.never_changes_the_register())
            .collect();
        let known_total = known.iter().filter(|k| **k).count();
        // Calls sort before returns at equal times: touching intervals count as concurrent.
        let mut entries: Vec<(u64, bool, usize)> = (0..n)
            .flat_map(|i| [(invoked[i], false, i), (deadline[i], true, i)])
            .collect();
        entries.sort_unstable();
        let tail = 2 * n + 1;
        let mut op = vec![usize::MAX; tail + 1];
        let mut is_call = vec![false; tail + 1];
        let mut partner = vec![0; tail + 1];
        let mut call_node = vec![0; n];
        for (k, &(_, is_return, i)) in entries.iter().enumerate() {
            let node = k + 1;
            op[node] = i;
            is_call[node] = !is_return;
            if is_return {
                partner[call_node[i]] = node;
            } else {
                call_node[i] = node;
            }
        }
        Search {
            steps_of,
            known,
            harmless,
            invoked,
            deadline,
            op,
            is_call,
            partner,
            next: (1..=tail + 1).collect(),
            prev: (0..=tail).map(|k| k.saturating_sub(1)).collect(),
            tail,
            max_steps,
            steps: 0,
            stack: Vec::new(),
            placed: Bits::new(n),
            state: NONE,
            known_total,
            known_left: known_total,
            seen: HashSet::new(),
            best: Vec::new(),
            best_state: NONE,
            best_known: 0,
        }
    }

    fn unlink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = n;
        self.prev[n] = p;
    }

    fn relink(&mut self, x: usize) {
        let (p, n) = (self.prev[x], self.next[x]);
        self.next[p] = x;
        self.prev[n] = x;
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.partner[call]);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(self.partner[call]);
        self.relink(call);
    }

    /// `Some(true)`: linearizable; `Some(false)`: not; `None`: out of steps.
    ///
    /// On arriving at a configuration, a candidate that can never change the register (a read,
    /// a CAS that did not swap, ...) and fits it is placed first and without alternatives: that
    /// configuration has a linearization iff it has one with that operation placed now, so
    /// trying other orders of harmless operations would only multiply the search. Only then are
    /// the candidates tried in invocation order, with backtracking.
    pub(super) fn run(&mut self) -> Option<bool> {
        if self.known_left == 0 {
            return Some(true);
        }
        let mut entry = self.next[HEAD];
        // Whether the configuration was just reached (not resumed after backtracking).
        let mut fresh = true;
        loop {
            let placed = if fresh {
                fresh = false;
                match self.harmless_candidate()? {
                    Some(call) => match self.place(call, true) {
                        Placed::New => Some(true),
                        Placed::Done => return Some(true),
                        // A harmless candidate that fits yet leads nowhere dooms the configuration.
                        Placed::Seen | Placed::Refused => Some(false),
                    },
                    None => None,
                }
            } else {
                self.tick()?;
                if entry != self.tail && self.is_call[entry] {
                    match self.place(entry, false) {
                        Placed::New => Some(true),
                        Placed::Done => return Some(true),
                        Placed::Seen | Placed::Refused => {
                            entry = self.next[entry];
                            None
                        }
                    }
                } else {
                    // The earliest remaining completion: something placed so far has to go.
                    Some(false)
                }
            };
            match placed {
                Some(true) => {
                    entry = self.next[HEAD];
                    fresh = true;
                }
                Some(false) => match self.backtrack() {
                    Some(resume) => entry = resume,
                    None => return Some(false),
                },
                None => {}
            }
        }
    }

    /// Counts one step; `None` once the budget is spent.
    fn tick(&mut self) -> Option<()> {
        self.steps += 1;
        (self.steps <= self.max_steps).then_some(())
    }

    /// The first candidate (a call before the first remaining return) that can never change the
    /// register and fits it now. `None` outside: out of steps.
    fn harmless_candidate(&mut self) -> Option<Option<usize>> {
        let mut entry = self.next[HEAD];
        while entry != self.tail && self.is_call[entry] {
            self.tick()?;
            let i = self.op[entry];
            if self.harmless[i] && self.steps_of[i].apply(self.state).is_some() {
                return Some(Some(entry));
            }
            entry = self.next[entry];
        }
        Some(None)
    }

    /// Tries to place the operation whose call entry is `call` next.
    fn place(&mut self, call: usize, forced: bool) -> Placed {
        let i = self.op[call];
        let Some(after) = self.steps_of[i].apply(self.state) else {
            return Placed::Refused;
        };
        self.placed.set(i);
        if !self.seen.insert((self.placed.clone(), after)) {
            self.placed.clear(i);
            return Placed::Seen;
        }
        self.stack.push(Frame {
            call,
            before: self.state,
            forced,
        });
        self.state = after;
        self.lift(call);
        if self.known[i] {
            self.known_left -= 1;
            if self.known_left == 0 {
                return Placed::Done;
            }
        }
        self.note_best();
        Placed::New
    }

    /// Takes back placed operations up to and including the last one placed by choice; answers
    /// the entry to try next in its stead, or `None` when no choice is left.
    fn backtrack(&mut self) -> Option<usize> {
        while let Some(frame) = self.stack.pop() {
            let i = self.op[frame.call];
            self.placed.clear(i);
            self.state = frame.before;
            self.unlift(frame.call);
            if self.known[i] {
                self.known_left += 1;
            }
            if !frame.forced {
                return Some(self.next[frame.call]);
            }
        }
        None
    }

    fn note_best(&mut self) {
        let known = self.known_total - self.known_left;
        if known > self.best_known {
            self.best_known = known;
            self.best = self.stack.iter().map(|f| self.op[f.call]).collect();
            self.best_state = self.state;
        }
    }

    /// Describes where the best partial linearization got stuck.
    pub(super) fn explain(&self, key: &str, events: &[&Event], values: &Values<'_>) -> Violation {
        let n = events.len();
        let mut in_best = vec![false; n];
        for &i in &self.best {
            in_best[i] = true;
        }
        let rest: Vec<usize> = (0..n).filter(|&i| !in_best[i]).collect();
        let due = rest
            .iter()
            .copied()
            .filter(|&i| self.known[i])
            .min_by_key(|&i| self.deadline[i]);
        let due_time = due.map_or(u64::MAX, |i| self.deadline[i]);
        let state = self.best_state;
        let show = |v: Value| ShowValue(values.name(v).as_deref()).to_string();
        let stuck = rest
            .iter()
            .copied()
            .filter(|&i| self.invoked[i] <= due_time)
            .map(|i| {
                let why = match (self.steps_of[i], self.steps_of[i].apply(state)) {
                    (_, Some(after)) => format!(
                        "could go next (the register would hold {}), but no linearization continues from there",
                        show(after)
                    ),
                    (Step::Put { previous, .. }, None) => format!(
                        "reported previous value {} but the register holds {}",
                        show(previous.unwrap_or(NONE)),
                        show(state)
                    ),
                    (Step::Get { value }, None) => format!(
                        "read {} but the register holds {}",
                        show(value),
                        show(state)
                    ),
                    (Step::Cas { expected, swapped, .. }, None) => format!(
                        "reported {} but the register holds {}, {} the expected {}",
                        if swapped == Some(true) { "swapped" } else { "not swapped" },
                        show(state),
                        if state == expected { "equal to" } else { "not" },
                        show(expected)
                    ),
                };
                Stuck {
                    event: events[i].clone(),
                    why,
                }
            })
            .collect();
        Violation {
            key: key.to_owned(),
            linearized: self.best.iter().map(|&i| events[i].clone()).collect(),
            state: values.name(state),
            due: due.map(|i| events[i].clone()),
            stuck,
            unplaced: rest.iter().filter(|&&i| self.known[i]).count(),
        }
    }
}
