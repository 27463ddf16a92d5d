use super::*;
use std::collections::HashMap;

use crate::history::History;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Hand-written histories: every op on key `k` unless `on` says otherwise; times are given.
#[derive(Default)]
struct H {
    events: Vec<Event>,
    key: String,
}

fn s(v: Option<&str>) -> Option<String> {
    v.map(str::to_owned)
}

impl H {
    fn new() -> Self {
        H {
            events: Vec::new(),
            key: "k".into(),
        }
    }
    fn on(mut self, key: &str) -> Self {
        self.key = key.into();
        self
    }
    fn raw(mut self, client: usize, op: Op, span: (u64, u64), outcome: Outcome) -> Self {
        self.events.push(Event {
            id: self.events.len(),
            client,
            key: self.key.clone(),
            op,
            invoked: span.0,
            completed: Some(span.1),
            outcome,
        });
        self
    }
    fn put(self, client: usize, value: &str, span: (u64, u64), prev: Option<&str>) -> Self {
        let op = Op::Put {
            value: value.into(),
        };
        self.raw(client, op, span, Outcome::Put { previous: s(prev) })
    }
    fn put_unknown(self, client: usize, value: &str, invoked: u64) -> Self {
        let op = Op::Put {
            value: value.into(),
        };
        self.raw(client, op, (invoked, invoked + 1), Outcome::Unknown)
    }
    fn put_failed(self, client: usize, value: &str, span: (u64, u64)) -> Self {
        let op = Op::Put {
            value: value.into(),
        };
        self.raw(client, op, span, Outcome::Failed)
    }
    fn get(self, client: usize, span: (u64, u64), value: Option<&str>) -> Self {
        self.raw(client, Op::Get, span, Outcome::Get { value: s(value) })
    }
    fn cas(
        self,
        client: usize,
        expected: Option<&str>,
        new: &str,
        span: (u64, u64),
        swapped: bool,
    ) -> Self {
        let op = Op::Cas {
            expected: s(expected),
            new: new.into(),
        };
        self.raw(client, op, span, Outcome::Cas { swapped })
    }
    fn check(&self) -> Report {
        check(&self.events, DEFAULT_MAX_STEPS)
    }
}

#[track_caller]
fn accepted(h: H) {
    let r = h.check();
    assert!(r.is_ok(), "should be linearizable:\n{r}");
}

#[track_caller]
fn rejected(h: H) -> Violation {
    let r = h.check();
    let v: Vec<&Violation> = r.violations().collect();
    assert_eq!(v.len(), 1, "should be one violation:\n{r}");
    println!("{r}");
    v[0].clone()
}

// ---- accepted ----

#[test]
fn an_empty_history_is_linearizable() {
    let r = check(&[], 10);
    assert!(r.is_ok() && r.keys.is_empty());
}

#[test]
fn a_sequential_history_is_linearizable() {
    accepted(
        H::new()
            .get(0, (0, 1), None)
            .put(0, "a", (2, 3), None)
            .get(1, (4, 5), Some("a"))
            .put(1, "b", (6, 7), Some("a"))
            .cas(0, Some("b"), "c", (8, 9), true)
            .get(0, (10, 11), Some("c")),
    );
}

#[test]
fn overlapping_writes_may_take_effect_in_either_order() {
    // Both writes overlap each other and the reads; either order explains the answers.
    let a_first = H::new()
        .put(0, "a", (0, 10), None)
        .put(1, "b", (1, 11), Some("a"))
        .get(2, (2, 12), Some("a"))
        .get(2, (13, 14), Some("b"));
    accepted(a_first);
    let b_first = H::new()
        .put(0, "a", (0, 10), Some("b"))
        .put(1, "b", (1, 11), None)
        .get(2, (2, 12), Some("b"))
        .get(2, (13, 14), Some("a"));
    accepted(b_first);
}

#[test]
fn a_read_overlapping_a_write_may_see_either_value() {
    for seen in [None, Some("a")] {
        accepted(
            H::new()
                .put(0, "a", (0, 10), None)
                .get(1, (2, 4), seen)
                .get(1, (11, 12), Some("a")),
        );
    }
}

#[test]
fn an_unknown_write_may_take_effect_long_after_its_client_gave_up() {
    accepted(
        H::new()
            .put_unknown(0, "a", 0)
            .get(1, (5, 6), None)
            .put(1, "b", (7, 8), None)
            .get(1, (9, 10), Some("a"))
            .get(2, (11, 12), Some("a")),
    );
}

#[test]
fn an_unknown_write_never_observed_may_never_have_taken_effect() {
    accepted(
        H::new()
            .put(1, "b", (0, 1), None)
            .put_unknown(0, "a", 2)
            .get(1, (5, 6), Some("b"))
            .get(1, (7, 8), Some("b")),
    );
}

#[test]
fn an_unknown_read_and_a_failed_write_constrain_nothing() {
    accepted(
        H::new()
            .put(0, "a", (0, 1), None)
            .raw(1, Op::Get, (2, 3), Outcome::Unknown)
            .put_failed(1, "b", (4, 5))
            .get(0, (6, 7), Some("a")),
    );
}

#[test]
fn an_operation_still_in_flight_counts_as_unknown() {
    let h = History::new();
    h.invoke(0, "k", Op::Get)
        .complete(Outcome::Get { value: None });
    let _in_flight = h.invoke(1, "k", Op::Put { value: "a".into() });
    h.invoke(2, "k", Op::Get).complete(Outcome::Get {
        value: Some("a".into()),
    });
    let r = check(&h.events(), DEFAULT_MAX_STEPS);
    assert!(r.is_ok(), "{r}");
}

#[test]
fn a_chain_of_compare_and_sets_is_linearizable() {
    accepted(
        H::new()
            .cas(0, None, "a", (0, 1), true)
            .cas(1, Some("a"), "b", (2, 3), true)
            .cas(2, Some("a"), "c", (4, 5), false)
            .cas(0, None, "d", (6, 7), false)
            .cas(2, Some("b"), "c", (8, 9), true)
            .get(1, (10, 11), Some("c")),
    );
}

#[test]
fn an_unknown_compare_and_set_may_have_swapped_or_not() {
    let cas_unknown = |h: H| {
        let op = Op::Cas {
            expected: Some("a".into()),
            new: "b".into(),
        };
        h.raw(1, op, (2, 3), Outcome::Unknown)
    };
    for seen in ["a", "b"] {
        accepted(cas_unknown(H::new().put(0, "a", (0, 1), None)).get(2, (10, 11), Some(seen)));
    }
    // It can only have swapped while the register held "a".
    rejected(
        cas_unknown(H::new().put(0, "a", (0, 1), None))
            .put(0, "c", (4, 5), Some("a"))
            .get(2, (10, 11), Some("b")),
    );
}

#[test]
fn of_concurrent_compare_and_sets_on_one_value_one_wins() {
    for (first, second) in [(true, false), (false, true)] {
        accepted(
            H::new()
                .cas(0, None, "a", (0, 10), first)
                .cas(1, None, "b", (1, 11), second)
                .get(2, (12, 13), Some(if first { "a" } else { "b" })),
        );
    }
}

#[test]
fn intervals_that_touch_count_as_concurrent() {
    // The read is invoked at the instant the write completes, so it may precede it.
    accepted(H::new().put(0, "a", (0, 5), None).get(1, (5, 6), None));
}

#[test]
fn keys_are_independent_registers() {
    let r = H::new()
        .put(0, "a", (0, 1), None)
        .on("other")
        .get(0, (2, 3), None)
        .put(0, "b", (4, 5), None)
        .on("k")
        .get(1, (6, 7), Some("a"))
        .on("other")
        .get(1, (8, 9), Some("a"))
        .check();
    assert!(matches!(
        r.key("k").map(|k| &k.verdict),
        Some(Verdict::Linearizable)
    ));
    assert!(matches!(
        r.key("other").map(|k| &k.verdict),
        Some(Verdict::Violation(_))
    ));
    assert!(!r.is_ok());
}

// ---- rejected ----

#[test]
fn a_stale_read_after_a_completed_write_is_a_violation() {
    let v = rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .put(0, "b", (2, 3), Some("a"))
            .get(1, (4, 5), Some("a")),
    );
    assert_eq!(v.key, "k");
    assert_eq!(v.state.as_deref(), Some("b"));
    assert_eq!(v.linearized.len(), 2);
    assert_eq!(v.due.as_ref().map(|e| e.id), Some(2));
    assert_eq!(v.stuck.len(), 1);
    assert_eq!(v.stuck[0].event.id, 2);
    assert_eq!(v.stuck[0].why, "read \"a\" but the register holds \"b\"");
}

#[test]
fn a_read_of_a_value_never_written_is_a_violation() {
    rejected(
        H::new()
            .put(0, "a", (0, 10), None)
            .get(1, (1, 11), Some("z")),
    );
}

#[test]
fn a_read_of_a_failed_write_is_a_violation() {
    rejected(
        H::new()
            .put_failed(0, "a", (0, 1))
            .get(1, (2, 3), Some("a")),
    );
}

#[test]
fn a_lost_acknowledged_write_is_a_violation() {
    // b was acknowledged, yet the next write replaced a: b never took effect.
    let v = rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .put(1, "b", (2, 3), Some("a"))
            .put(2, "c", (4, 5), Some("a")),
    );
    assert!(
        v.stuck[0].why.contains("reported previous value \"a\""),
        "{v}"
    );
}

#[test]
fn a_read_that_goes_back_to_before_an_acknowledged_write_is_a_violation() {
    rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .get(1, (2, 3), Some("a"))
            .get(1, (4, 5), None),
    );
}

#[test]
fn a_write_applied_twice_is_a_violation() {
    // The unknown write of a may take effect once (before b replaced it), not twice.
    rejected(
        H::new()
            .put_unknown(0, "a", 0)
            .put(1, "b", (3, 4), Some("a"))
            .get(1, (5, 6), Some("b"))
            .get(2, (7, 8), Some("a")),
    );
    // The same with an acknowledged write.
    rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .put(1, "b", (3, 4), Some("a"))
            .get(1, (5, 6), Some("b"))
            .get(2, (7, 8), Some("a")),
    );
}

#[test]
fn a_compare_and_set_that_swapped_although_the_expected_value_did_not_hold_is_a_violation() {
    let v = rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .cas(1, None, "b", (2, 3), true),
    );
    assert!(v.stuck[0].why.contains("reported swapped"), "{v}");
    // And the converse: it held, but the CAS says it did not swap.
    rejected(
        H::new()
            .put(0, "a", (0, 1), None)
            .cas(1, Some("a"), "b", (2, 3), false),
    );
}

#[test]
fn reads_that_are_not_monotonic_across_clients_are_a_violation() {
    // Client 1 saw a, then (strictly later) client 2 saw the value before a.
    rejected(
        H::new()
            .put(0, "a", (0, 20), None)
            .get(1, (2, 3), Some("a"))
            .get(2, (4, 5), None),
    );
}

#[test]
fn an_outcome_that_does_not_answer_its_operation_is_a_violation() {
    let v = rejected(H::new().raw(0, Op::Get, (0, 1), Outcome::Put { previous: None }));
    assert!(v.due.is_none());
    assert!(v.to_string().contains("malformed"), "{v}");
}

#[test]
fn the_explanation_names_the_key_the_placed_ops_and_the_stuck_one() {
    let r = H::new()
        .on("acct")
        .put(4, "x1", (0, 1), None)
        .get(7, (2, 3), Some("x0"))
        .check();
    let text = r.to_string();
    for needle in [
        "key \"acct\": NOT linearizable",
        "#0 c4 [0,1] put(acct, \"x1\") -> prev none",
        "#1 c7 [2,3] get(acct) -> \"x0\": read \"x0\" but the register holds \"x1\"",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn a_search_out_of_steps_is_inconclusive_not_a_verdict() {
    let mut h = H::new();
    for c in 0..12 {
        h = h.put(c, &format!("v{c}"), (c as u64, 100), None);
    }
    let r = check(&h.events, 5);
    assert_eq!(r.inconclusive().count(), 1, "{r}");
    assert!(!r.is_ok());
    assert_eq!(r.keys[0].steps, 6);
    assert!(r.to_string().contains("inconclusive"));
}

// ---- generated histories ----

enum Client {
    Idle,
    Invoked(crate::history::Pending, String, Op),
    Applied(crate::history::Pending, Outcome),
}

fn apply(reg: &mut HashMap<String, String>, key: &str, op: &Op) -> Outcome {
    match op {
        Op::Put { value } => Outcome::Put {
            previous: reg.insert(key.to_owned(), value.clone()),
        },
        Op::Get => Outcome::Get {
            value: reg.get(key).cloned(),
        },
        Op::Cas { expected, new } => {
            let swapped = reg.get(key) == expected.as_ref();
            if swapped {
                reg.insert(key.to_owned(), new.clone());
            }
            Outcome::Cas { swapped }
        }
    }
}

/// A history of `ops` operations by `clients` concurrent clients on `keys` keys, recorded
/// through [`History`] while a simulated register applies each operation at one instant
/// between its invocation and completion: linearizable by construction. Some operations
/// fail before taking effect, some end unknown (applied before the client gave up, later,
/// or never).
fn simulated(seed: u64, ops: usize, clients: usize, keys: usize) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    let history = History::new();
    let mut reg: HashMap<String, String> = HashMap::new();
    let mut state: Vec<Client> = (0..clients).map(|_| Client::Idle).collect();
    // Unknown operations that may still take effect.
    let mut zombies: Vec<(String, Op)> = Vec::new();
    let (mut invoked, mut written) = (0, 0);
    while invoked < ops || state.iter().any(|c| !matches!(c, Client::Idle)) {
        if !zombies.is_empty() && rng.gen_bool(0.05) {
            let (key, op) = zombies.swap_remove(rng.gen_range(0..zombies.len()));
            if rng.gen_bool(0.5) {
                apply(&mut reg, &key, &op);
            }
        }
        let c = rng.gen_range(0..clients);
        state[c] = match std::mem::replace(&mut state[c], Client::Idle) {
            Client::Idle if invoked < ops => {
                invoked += 1;
                let key = format!("k{}", rng.gen_range(0..keys));
                let op = match rng.gen_range(0..100) {
                    0..40 => {
                        written += 1;
                        Op::Put {
                            value: format!("v{written}"),
                        }
                    }
                    40..75 => Op::Get,
                    _ => {
                        written += 1;
                        let expected = match rng.gen_range(0..10) {
                            0..6 => reg.get(&key).cloned(),
                            6..8 => None,
                            _ => Some(format!("v{}", rng.gen_range(0..written))),
                        };
                        Op::Cas {
                            expected,
                            new: format!("v{written}"),
                        }
                    }
                };
                Client::Invoked(history.invoke(c, key.clone(), op.clone()), key, op)
            }
            Client::Idle => Client::Idle,
            Client::Invoked(pending, key, op) => match rng.gen_range(0..100) {
                0..3 => {
                    pending.complete(Outcome::Failed);
                    Client::Idle
                }
                3..6 => {
                    drop(pending);
                    zombies.push((key, op));
                    Client::Idle
                }
                _ => {
                    let outcome = apply(&mut reg, &key, &op);
                    Client::Applied(pending, outcome)
                }
            },
            Client::Applied(pending, outcome) => {
                if rng.gen_bool(0.03) {
                    drop(pending);
                } else {
                    pending.complete(outcome);
                }
                Client::Idle
            }
        };
    }
    history.events()
}

#[test]
fn a_generated_linearizable_history_is_accepted_and_one_altered_read_is_rejected() {
    let seed = crate::seed("linearizability::generated");
    let events = simulated(seed, 500, 8, 3);
    let unknown = events
        .iter()
        .filter(|e| e.outcome == Outcome::Unknown)
        .count();
    let failed = events
        .iter()
        .filter(|e| e.outcome == Outcome::Failed)
        .count();
    assert!(
        unknown > 0 && failed > 0,
        "seed {seed}: the history should exercise both"
    );
    let started = std::time::Instant::now();
    let report = check(&events, DEFAULT_MAX_STEPS);
    println!(
        "{} events ({unknown} unknown) checked in {:?}:\n{report}",
        events.len(),
        started.elapsed()
    );
    assert!(report.is_ok(), "seed {seed}:\n{report}");

    // Alter the completed read nearest the middle, so the search has to rule out every
    // linearization of the first half before it can give up.
    let mut altered = events.clone();
    let middle = altered.len() / 2;
    let Some(read) = altered
        .iter_mut()
        .filter(|e| matches!(e.outcome, Outcome::Get { .. }))
        .min_by_key(|e| e.id.abs_diff(middle))
    else {
        panic!("seed {seed}: no completed read to alter");
    };
    read.outcome = Outcome::Get {
        value: Some("never-written".into()),
    };
    let key = read.key.clone();
    let started = std::time::Instant::now();
    let report = check(&altered, DEFAULT_MAX_STEPS);
    println!("altered read checked in {:?}:\n{report}", started.elapsed());
    let verdicts: Vec<(&str, bool)> = report
        .keys
        .iter()
        .map(|k| (k.key.as_str(), matches!(k.verdict, Verdict::Violation(_))))
        .collect();
    for (k, violated) in verdicts {
        assert_eq!(violated, k == key, "seed {seed}, key {k}:\n{report}");
    }
}

#[test]
fn many_concurrent_clients_on_one_key_check_within_budget() {
    let seed = crate::seed("linearizability::crowded");
    let events = simulated(seed, 300, 24, 1);
    let report = check(&events, DEFAULT_MAX_STEPS);
    println!("{report}");
    assert!(report.is_ok(), "seed {seed}:\n{report}");
}

/// A run of acknowledged writes with `lost` unknown writes invoked at the start and never
/// observed (requests lost before they reached the log): linearizable.
fn with_lost_writes(acknowledged: usize, lost: usize) -> H {
    let mut h = H::new();
    for c in 0..lost {
        h = h.put_unknown(100 + c, &format!("lost{c}"), 0);
    }
    let mut previous: Option<String> = None;
    for i in 0..acknowledged {
        let value = format!("v{i}");
        let t = 10 + 2 * i as u64;
        h = h.put(0, &value, (t, t + 1), previous.as_deref());
        previous = Some(value);
    }
    h
}

#[test]
fn unknown_writes_nobody_observed_do_not_exhaust_the_search() {
    // Each lost write stays a candidate up to the end of the history: without setting them aside
    // the search tries the subsets of them at every place (measured: out of a million steps).
    let report = with_lost_writes(300, 16).check();
    println!("{report}");
    assert!(report.is_ok(), "{report}");
    let key = &report.keys[0];
    assert_eq!(key.set_aside, 16);
    assert!(key.steps < 10_000, "{report}");
}

#[test]
fn a_write_set_aside_is_brought_back_when_a_cas_that_did_not_swap_needs_it() {
    // The CAS saw something other than "a", which only the unknown write "u" explains, although
    // no operation observed "u" itself.
    let h = H::new()
        .put(0, "a", (0, 1), None)
        .put_unknown(1, "u", 2)
        .cas(2, Some("a"), "b", (3, 4), false);
    let report = h.check();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.keys[0].set_aside, 1);
    // Without the unknown write the same history is a violation.
    let without = H::new()
        .put(0, "a", (0, 1), None)
        .cas(2, Some("a"), "b", (3, 4), false);
    rejected(without);
}

#[test]
fn setting_aside_unobserved_writes_does_not_hide_a_violation() {
    let mut h = with_lost_writes(50, 8);
    // A read of a value nobody wrote, after the last write.
    h = h.get(0, (1_000, 1_001), Some("nowhere"));
    rejected(h);
}
