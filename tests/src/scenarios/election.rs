//! Leader election: a fresh cluster elects one leader per term and agrees on it, in any start
//! order. Raft paper §5.2.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{NodeId, Role};
use parking_lot::Mutex;

use super::{ELECTION, SETTLE};
use crate::kv::{put, KvResponse};
use crate::{Cluster, Combo};

/// The election family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __election_family {
    ($make:ident) => {
        $crate::__tests!($make, election;
            single_node_bootstrap_and_propose,
            three_nodes_elect_exactly_one_leader,
            nodes_started_one_after_another_form_a_cluster
        );
    };
}

/// One node bootstraps alone, leads, and applies proposals with the state machine's answers.
pub async fn single_node_bootstrap_and_propose(combo: Combo) {
    let c = Cluster::start(&combo, "single_node_bootstrap_and_propose", 1).await;
    assert_eq!(c.wait_leader(ELECTION).await, 1);
    let first = c
        .on(1, |n| async move { n.propose(put("k", "v1")).await })
        .await
        .expect("first proposal");
    assert_eq!(first, KvResponse::Previous(None));
    let second = c
        .on(1, |n| async move { n.propose(put("k", "v2")).await })
        .await
        .expect("second proposal");
    assert_eq!(second, KvResponse::Previous(Some("v1".into())));
    assert_eq!(c.get(1, "k").await.expect("read"), Some("v2".into()));
    assert_eq!(c.statuses()[&1].voters, BTreeSet::from([1]));
}

/// Three nodes elect exactly one leader per term, and all agree on it.
///
/// Reference: Raft paper §5.2 (Election Safety: at most one leader per term).
pub async fn three_nodes_elect_exactly_one_leader(combo: Combo) {
    let c = Cluster::start(&combo, "three_nodes_elect_exactly_one_leader", 3).await;
    let claims: Arc<Mutex<BTreeMap<u64, BTreeSet<NodeId>>>> = Arc::default();
    let mut watchers = Vec::new();
    for id in c.live() {
        let mut rx = c.node(id).watch();
        let claims = claims.clone();
        watchers.push(tokio::spawn(async move {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if s.role == Role::Leader {
                        claims.lock().entry(s.term).or_default().insert(s.id);
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }));
    }
    let leader = c.wait_leader(ELECTION).await;
    c.put(leader, "x", "1").await.expect("leader commits");
    let st = c.statuses();
    let leaders: Vec<_> = st.values().filter(|s| s.role == Role::Leader).collect();
    assert_eq!(
        leaders.len(),
        1,
        "exactly one node claims leadership: {st:#?}"
    );
    assert!(st.values().all(|s| s.leader == Some(leader)));
    for w in watchers {
        w.abort();
    }
    for (term, ids) in claims.lock().iter() {
        assert!(ids.len() <= 1, "term {term} had several leaders: {ids:?}");
    }
}

/// The nodes of a new cluster started one after another, seconds apart, form one cluster: the
/// first waits without quorum (running, not leading, not exiting), the second makes a quorum
/// with it, the third joins and catches up.
pub async fn nodes_started_one_after_another_form_a_cluster(combo: Combo) {
    let mut c = Cluster::planned(&combo, "nodes_started_one_after_another_form_a_cluster", 3).await;
    // The interval between starts is the scenario's input, not a wait for a condition.
    let gap = Duration::from_secs(2);
    c.start_node(1).await;
    tokio::time::sleep(gap).await;
    let alone = c.statuses()[&1].clone();
    assert_ne!(
        alone.role,
        Role::Shutdown,
        "the lone node gave up: {alone:?}"
    );
    assert!(
        !alone.is_leader(),
        "one node of three became leader: {alone:?}"
    );
    c.start_node(2).await;
    let leader = c.wait_leader_among(&[1, 2], ELECTION).await;
    c.put(leader, "first", "1")
        .await
        .expect("write with two of three");
    tokio::time::sleep(gap).await;
    c.start_node(3).await;
    let leader = c.wait_leader(ELECTION).await;
    c.put(leader, "second", "2")
        .await
        .expect("write with all three");
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[1, 2, 3], commit, SETTLE).await;
    for id in [1, 2, 3] {
        let m = c.machine(id);
        assert_eq!(m.get("first"), Some("1".into()), "node {id}");
        assert_eq!(m.get("second"), Some("2".into()), "node {id}");
    }
}
