//! Errors: the same situation gives the same error kind on every engine.

use std::collections::BTreeSet;

use consensus_api::{ConsensusError, ErrorKind};

use super::ELECTION;
use crate::kv::put;
use crate::{Cluster, Combo};

/// The errors family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __errors_family {
    ($make:ident) => {
        $crate::__tests!($make, errors;
            failures_have_the_shared_error_kinds
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
