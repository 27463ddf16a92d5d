//! Randomized faults with a linearizability check, on every combination: the scenario over
//! [`random_faults_run`] (which says what a run does).
//!
//! Reference: Raft paper §5.2 (election safety), §5.4 (log matching, leader completeness,
//! state machine safety), §8 (linearizable semantics for clients).

use crate::random_faults::{random_faults_run, RunConfig};
use crate::Combo;

/// The random family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __random_family {
    ($make:ident) => {
        $crate::__tests!($make, random;
            linearizable_under_random_faults
        );
    };
}

/// Random faults in the middle of traffic leave a linearizable history, one leader per term, a
/// commit index that never goes back, identical applied histories, and a cluster that commits
/// again once the faults heal. Runs `RANDOM_FAULTS_RUNS` seeds (default 2) of
/// `RANDOM_FAULTS_SECS` seconds of faults; the first seed is the test's (printed;
/// `CONFORMANCE_SEED` replays it), the next ones follow from it.
///
/// Reference: Raft paper §5.2, §5.4 and §8.
pub async fn linearizable_under_random_faults(combo: Combo) {
    let first = consensus_harness::seed("linearizable_under_random_faults");
    let runs: u64 = std::env::var("RANDOM_FAULTS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    for i in 0..runs {
        let seed = first.wrapping_add(i);
        let report = random_faults_run(combo.clone(), RunConfig::for_test(seed)).await;
        println!("{}: {}", combo.name(), report.summary());
        assert!(report.violations.is_empty(), "{}", report.explain());
    }
}
