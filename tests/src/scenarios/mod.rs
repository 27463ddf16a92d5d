//! The scenarios, one file per family. Each scenario is written once against [`Combo`](crate::Combo)
//! (or a transport factory) and states the promise it checks in its name; its family's list is
//! declared once, beside it, in the family's `__<family>_family!` macro, which
//! [`conformance_suite!`](crate::conformance_suite) and
//! [`transport_suite!`](crate::transport_suite) expand for every combination. A unit test of
//! this crate checks that every public scenario is in its family's list, so none can exist
//! without running.

use std::time::Duration;

pub mod broker;
pub mod durability;
pub mod election;
pub mod errors;
pub mod faults;
pub mod hostile;
pub mod large_state;
pub mod membership;
pub mod random;
pub mod replication;
pub mod transport;

/// Deadline for a first election on a freshly started cluster (generous for loaded CI).
pub const ELECTION: Duration = Duration::from_secs(10);
/// The promise of the default timing: a crashed leader is replaced within this.
pub const FAILOVER_LIMIT: Duration = Duration::from_secs(3);
/// Deadline for replication to settle.
pub const SETTLE: Duration = Duration::from_secs(15);
/// Deadline for a node to catch up on a large state (a snapshot of a few MiB sent in chunks, or
/// a log of commands at the size limit); a working engine needs a few seconds.
pub const CATCH_UP: Duration = Duration::from_secs(20);

#[cfg(test)]
mod registration {
    /// `(file text, family name)` of every family.
    const FAMILIES: &[(&str, &str)] = &[
        (include_str!("broker.rs"), "broker"),
        (include_str!("durability.rs"), "durability"),
        (include_str!("election.rs"), "election"),
        (include_str!("errors.rs"), "errors"),
        (include_str!("faults.rs"), "faults"),
        (include_str!("hostile.rs"), "hostile"),
        (include_str!("large_state.rs"), "large_state"),
        (include_str!("membership.rs"), "membership"),
        (include_str!("random.rs"), "random"),
        (include_str!("replication.rs"), "replication"),
        (include_str!("transport.rs"), "transport"),
    ];

    fn scenarios(text: &str) -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix("pub async fn "))
            .filter_map(|rest| rest.split('(').next())
            .map(str::to_string)
            .collect()
    }

    fn listed(text: &str, family: &str) -> Vec<String> {
        let start = format!("$crate::__tests!($make, {family};");
        let Some(at) = text.find(&start) else {
            return Vec::new();
        };
        let rest = &text[at + start.len()..];
        let end = rest.find(')').unwrap_or(rest.len());
        rest[..end]
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    }

    #[test]
    fn every_scenario_is_in_its_familys_list() {
        for (text, family) in FAMILIES {
            let mut defined = scenarios(text);
            let mut run = listed(text, family);
            assert!(!run.is_empty(), "family {family} has no list");
            defined.sort();
            run.sort();
            assert_eq!(defined, run, "family {family}: defined vs listed scenarios");
        }
    }

    #[test]
    fn the_suites_expand_every_family() {
        let lib = include_str!("../lib.rs");
        for (_, family) in FAMILIES {
            assert!(
                lib.contains(&format!("$crate::__{family}_family!(")),
                "a suite macro must expand family {family}"
            );
        }
    }
}
