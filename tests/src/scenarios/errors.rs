//! Errors: the same situation gives the same error kind on every engine.

use std::collections::BTreeSet;

use consensus_api::{ConsensusError, ErrorKind};

use super::{ELECTION, SETTLE};
use crate::kv::put;
use crate::{Cluster, Combo};

/// The errors family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __errors_family {
    ($make:ident) => {
        $crate::__tests!($make, errors;
            failures_have_the_shared_error_kinds,
            a_proposal_in_flight_at_shutdown_has_an_unknown_outcome
        );
    };
}

/// Errors are the shared kinds: an invalid membership request is `InvalidRequest`, and a
/// stopped node answers `ShuttingDown`.
pub async fn failures_have_the_shared_error_kinds(combo: Combo) {
    let c = Cluster::start(&combo, "failures_have_the_shared_error_kinds", 1).await;
    c.wait_leader(ELECTION).await;
    let e = c
        .on(1, |n| async move {
            n.change_voters(BTreeSet::from([1, 7])).await
        })
        .await
        .expect_err("promoting an unknown node");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let node = c.node(1);
    c.on(1, |n| async move { n.shutdown().await })
        .await
        .expect("shutdown");
    let e: ConsensusError = node
        .propose(put("a", "b"))
        .await
        .expect_err("after shutdown");
    assert_eq!(e.kind(), ErrorKind::ShuttingDown, "{e}");
}

/// A proposal the leader has appended but not committed when it shuts down may still commit
/// (a later leader can finish it), so its caller hears `OutcomeUnknown`, never
/// `ShuttingDown`, whose promise is that nothing was taken and a retry elsewhere is safe.
pub async fn a_proposal_in_flight_at_shutdown_has_an_unknown_outcome(combo: Combo) {
    let test = "a_proposal_in_flight_at_shutdown_has_an_unknown_outcome";
    let mut c = Cluster::start(&combo, test, 3).await;
    let leader = c.wait_leader(ELECTION).await;
    c.put(leader, "before", "1").await.expect("a first write");
    // Without its followers the leader appends but cannot commit.
    for f in c.others(leader) {
        c.crash(f);
    }
    let appended = c.statuses()[&leader].last_log_index;
    let node = c.node(leader);
    let proposal = tokio::spawn(async move { node.propose(put("in-flight", "x")).await });
    c.wait_statuses(SETTLE, |st| {
        st.get(&leader).is_some_and(|s| s.last_log_index > appended)
    })
    .await
    .unwrap_or_else(|e| panic!("the leader never appended the proposal: {e}"));
    c.stop(leader).await;
    let outcome = proposal.await.expect("the proposal task");
    match outcome {
        Err(e) => assert!(
            e.is_outcome_unknown() && e.kind() != ErrorKind::ShuttingDown,
            "an appended proposal failed with {:?} ({e}): that promises it was not taken",
            e.kind()
        ),
        Ok(r) => panic!("committed without a quorum: {r:?}"),
    }
}
