//! Deterministic, rack-aware replica placement.
//!
//! The live brokers are laid out rack by rack in turn (the first broker of every rack, then the
//! second of every rack, ...), so neighbours in the layout sit in different racks whenever the
//! racks allow it. Partition `p` of a topic starts at position `seed + p` and takes the next
//! `rf` brokers: replicas of one partition spread over racks, and leaders (the first replica)
//! rotate over all brokers, partition after partition and topic after topic (the seed is the
//! topic id).

use std::collections::BTreeMap;

use crate::model::BrokerId;

/// The rack-interleaved layout of `live` (sorted by rack, then id, inside).
fn layout(live: &[(BrokerId, Option<String>)]) -> Vec<BrokerId> {
    let mut racks: BTreeMap<&str, Vec<BrokerId>> = BTreeMap::new();
    for (id, rack) in live {
        racks
            .entry(rack.as_deref().unwrap_or(""))
            .or_default()
            .push(*id);
    }
    for ids in racks.values_mut() {
        ids.sort_unstable();
    }
    let longest = racks.values().map(Vec::len).max().unwrap_or(0);
    let mut out = Vec::with_capacity(live.len());
    for round in 0..longest {
        for ids in racks.values() {
            if let Some(id) = ids.get(round) {
                out.push(*id);
            }
        }
    }
    out
}

/// The replicas of partition `partition` of the topic seeded `seed`: `rf` distinct brokers,
/// preferred leader first. `rf` must not exceed `live.len()`.
pub(crate) fn place(
    live: &[(BrokerId, Option<String>)],
    seed: u64,
    partition: u32,
    rf: usize,
) -> Vec<BrokerId> {
    let order = layout(live);
    let n = order.len();
    if n == 0 {
        return Vec::new();
    }
    let start = ((seed % n as u64) as usize + partition as usize) % n;
    (0..rf.min(n)).map(|k| order[(start + k) % n]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn brokers(spec: &[(BrokerId, &str)]) -> Vec<(BrokerId, Option<String>)> {
        spec.iter()
            .map(|(i, r)| (*i, Some(r.to_string())))
            .collect()
    }

    #[test]
    fn replicas_are_distinct_and_span_racks() {
        let live = brokers(&[(1, "a"), (2, "a"), (3, "b"), (4, "b"), (5, "c"), (6, "c")]);
        let rack = |id: BrokerId| live.iter().find(|b| b.0 == id).and_then(|b| b.1.clone());
        for seed in 0..7 {
            for p in 0..12 {
                let r = place(&live, seed, p, 3);
                assert_eq!(r.iter().collect::<BTreeSet<_>>().len(), 3, "{r:?}");
                let racks: BTreeSet<_> = r.iter().map(|i| rack(*i)).collect();
                assert_eq!(
                    racks.len(),
                    3,
                    "partition {p} seed {seed}: {r:?} not rack-spread"
                );
            }
        }
    }

    #[test]
    fn leaders_rotate_over_every_broker() {
        let live = brokers(&[(1, "a"), (2, "b"), (3, "c")]);
        let leaders: BTreeSet<BrokerId> = (0..3).map(|p| place(&live, 10, p, 2)[0]).collect();
        assert_eq!(leaders, BTreeSet::from([1, 2, 3]));
    }

    #[test]
    fn placement_is_deterministic() {
        let live = brokers(&[(3, "x"), (1, "y"), (2, "x")]);
        let again: Vec<_> = live.iter().rev().cloned().collect();
        for p in 0..5 {
            assert_eq!(place(&live, 42, p, 2), place(&again, 42, p, 2));
        }
    }
}
