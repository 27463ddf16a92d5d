//! Membership and leadership: learners join and are promoted, voters are removed, leadership moves
//! on request. Raft paper §6 (cluster membership changes); leadership transfer: Ongaro's thesis
//! §3.10.

use std::collections::BTreeSet;

use consensus_api::{ErrorKind, NodeId};

use super::{ELECTION, SETTLE};
use crate::{Cluster, Combo};

/// The membership family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __membership_family {
    ($make:ident) => {
        $crate::__tests!($make, membership;
            add_learner_promote_it_and_remove_a_voter,
            a_learner_that_cannot_be_reached_is_added_but_not_promoted,
            a_wiped_initial_member_does_not_come_back_as_a_voter,
            forced_recovery_brings_back_a_cluster_that_lost_its_majority,
            leadership_transfers_to_the_named_node
        );
    };
}

/// A fresh node joins as a learner, is promoted to voter, and a voter is removed; the cluster
/// keeps committing through the new configuration.
///
/// Reference: Raft paper §6 (joint consensus; new servers join as non-voting members first).
pub async fn add_learner_promote_it_and_remove_a_voter(combo: Combo) {
    let mut c = Cluster::start(&combo, "add_learner_promote_it_and_remove_a_voter", 3).await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..10 {
        c.put(leader, &format!("k{i}"), "v").await.expect("write");
    }
    let addr = c.add_fresh_node(4).await;
    let via = c
        .live()
        .into_iter()
        .find(|i| *i != leader && *i != 4)
        .expect("follower");
    c.on(via, move |n| async move {
        n.add_learner(4, addr.to_string()).await
    })
    .await
    .expect("add learner through a follower");
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[4], commit, SETTLE).await;
    assert_eq!(
        c.machine(4).get("k9"),
        Some("v".into()),
        "learner caught up"
    );
    assert!(c.statuses()[&leader].learners.contains(&4));

    let all = BTreeSet::from([1, 2, 3, 4]);
    let voters = all.clone();
    c.on(
        leader,
        move |n| async move { n.change_voters(voters).await },
    )
    .await
    .expect("promote the learner");
    c.wait_members(&all, &BTreeSet::new(), SETTLE).await;

    let removed = *[1u64, 2, 3]
        .iter()
        .find(|i| **i != leader && **i != via)
        .unwrap_or(&via);
    let remaining: BTreeSet<NodeId> = all.iter().copied().filter(|i| *i != removed).collect();
    let voters = remaining.clone();
    c.on(4, move |n| async move {
        n.change_voters(voters).await?;
        n.remove_node(removed).await
    })
    .await
    .expect("remove a voter");
    let leader = c
        .wait_leader_among(&remaining.iter().copied().collect::<Vec<_>>(), ELECTION)
        .await;
    c.wait_statuses(SETTLE, |st| {
        remaining
            .iter()
            .all(|id| st[id].voters == remaining && !st[id].learners.contains(&removed))
    })
    .await
    .unwrap_or_else(|e| panic!("membership did not converge: {e}"));
    c.put(4, "after", "change")
        .await
        .expect("write through the promoted node");
    assert_eq!(
        c.get(leader, "after").await.expect("read"),
        Some("change".into())
    );
}

/// Adding a learner returns once it is a member, even when nothing answers at its address;
/// the leader's replication view shows it behind (and every voter with its progress), and a
/// promotion of it is refused with a reason while the voters stay as they were and the cluster
/// keeps committing. Removing it then works.
///
/// Reference: Raft paper §6 and Ongaro's thesis §4.2.1 (a new server catches up as a
/// non-voting member before it counts toward quorums).
pub async fn a_learner_that_cannot_be_reached_is_added_but_not_promoted(combo: Combo) {
    let c = Cluster::start(
        &combo,
        "a_learner_that_cannot_be_reached_is_added_but_not_promoted",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..5 {
        c.put(leader, &format!("k{i}"), "v").await.expect("write");
    }
    // An address nothing listens on (over TCP or UDP): bound, then released.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free local port");
    let started = std::time::Instant::now();
    c.on(leader, move |n| async move {
        n.add_learner(4, dead.to_string()).await
    })
    .await
    .expect("adding a learner does not wait for it to answer");
    let took = started.elapsed();
    let st = c.statuses()[&leader].clone();
    assert!(st.learners.contains(&4), "node 4 is a learner: {st:?}");
    let voters: BTreeSet<NodeId> = [1, 2, 3].into();
    assert_eq!(st.voters, voters);
    // Every other member is in the leader's view; the voters have matched something.
    c.wait_statuses(SETTLE, |all| {
        let r = &all[&leader].replication;
        voters.iter().filter(|v| **v != leader).all(|v| {
            r.get(v)
                .is_some_and(|p| p.matched > 0 && p.last_contact_unix_ms.is_some())
        })
    })
    .await
    .unwrap_or_else(|e| panic!("the leader's replication view lacks its voters: {e}"));
    let commit = st.commit_index;
    let matched = |c: &Cluster| {
        c.statuses()[&leader]
            .replication
            .get(&4)
            .map_or(0, |p| p.matched)
    };
    assert!(
        matched(&c) < commit,
        "the unreachable learner is shown behind"
    );

    let with_it: BTreeSet<NodeId> = [1, 2, 3, 4].into();
    let refused = c
        .on(
            leader,
            move |n| async move { n.change_voters(with_it).await },
        )
        .await
        .expect_err("promoting a learner that never answered");
    assert_eq!(refused.kind(), ErrorKind::InvalidRequest, "{refused}");
    assert!(
        refused.to_string().contains("node 4"),
        "the refusal names the learner: {refused}"
    );
    let st = c.statuses()[&leader].clone();
    assert_eq!(st.voters, voters, "the refused promotion changed nothing");
    assert!(st.learners.contains(&4));
    c.put(leader, "after", "refusal")
        .await
        .expect("the cluster keeps committing");
    c.on(leader, |n| async move { n.remove_node(4).await })
        .await
        .expect("remove the learner");
    c.wait_statuses(SETTLE, |all| !all[&leader].learners.contains(&4))
        .await
        .unwrap_or_else(|e| panic!("the learner was not removed: {e}"));
    eprintln!("added an unreachable learner in {took:?}");
}

/// A voter whose data dir is lost cannot come back empty under its id (it would have forgotten
/// its vote, and would count toward quorums for entries it no longer has): restarted as an
/// operator restarts a node (neither creating nor joining a cluster), it is refused with a
/// reason and records nothing, the membership is unchanged and the two others keep committing.
/// It is then replaced under a new id, which catches up and becomes a voter.
///
/// Reference: Ongaro's thesis §3.8 (the vote must be durable); Kafka's storage format step
/// (`kafka-storage format`) and KIP-853's directory ids.
pub async fn a_wiped_initial_member_does_not_come_back_as_a_voter(combo: Combo) {
    let mut c = Cluster::start(
        &combo,
        "a_wiped_initial_member_does_not_come_back_as_a_voter",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..5 {
        c.put(leader, &format!("k{i}"), "v").await.expect("write");
    }
    let lost = c.others(leader)[0];
    c.stop(lost).await;
    c.wipe(lost).expect("wipe the data dir");
    let refused = c
        .try_restart(lost)
        .await
        .expect_err("an empty data dir under a voter's id must not start");
    assert_eq!(refused.kind(), ErrorKind::InvalidRequest, "{refused}");
    assert!(
        refused.to_string().contains("replace"),
        "the refusal says what to do: {refused}"
    );
    let st = c.statuses()[&leader].clone();
    assert!(st.voters.contains(&lost), "nothing changed the membership");
    c.put(leader, "after", "loss")
        .await
        .expect("the two others keep committing");

    // The replacement: a new id, added as a learner, promoted, the lost node removed.
    let addr = c.add_fresh_node(4).await;
    c.on(leader, move |n| async move {
        n.add_learner(4, addr.to_string()).await
    })
    .await
    .expect("add the replacement");
    let voters: BTreeSet<NodeId> = [1, 2, 3, 4].into_iter().filter(|i| *i != lost).collect();
    let set = voters.clone();
    c.on(leader, move |n| async move {
        n.change_voters(set).await?;
        n.remove_node(lost).await
    })
    .await
    .expect("promote the replacement and remove the lost node");
    c.wait_members(&voters, &BTreeSet::new(), SETTLE).await;
    c.put(4, "replaced", "yes")
        .await
        .expect("write through the replacement");
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[4], commit, SETTLE).await;
    assert_eq!(
        c.machine(4).get("k4"),
        Some("v".into()),
        "the replacement caught up"
    );
}

/// Disaster recovery: two of three voters are lost for good, so the survivor cannot commit.
/// The forced recovery (`Backend::force_voters`, unsafe) is refused while the survivor runs and
/// for a voter set without it or with a stranger; on its stopped data dir it makes the survivor
/// the only voter, and restarted, the survivor leads and commits, with every acknowledged write
/// still there. A replacement then joins it as usual.
///
/// Reference: hashicorp raft's `RecoverCluster` (manual recovery after a permanent loss of
/// quorum); etcd's `--force-new-cluster`.
pub async fn forced_recovery_brings_back_a_cluster_that_lost_its_majority(combo: Combo) {
    let mut c = Cluster::start(
        &combo,
        "forced_recovery_brings_back_a_cluster_that_lost_its_majority",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..10 {
        c.put(leader, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write");
    }
    let survivor = c.others(leader)[0];
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[survivor], commit, SETTLE).await;
    let dir = c.data_dir(survivor);
    let alone = BTreeSet::from([survivor]);
    let refused = combo
        .backend
        .force_voters(&dir, survivor, &alone)
        .expect_err("a running node's data dir");
    assert!(refused.to_string().contains("in use"), "{refused}");
    for lost in [1, 2, 3].into_iter().filter(|i| *i != survivor) {
        c.stop(lost).await;
    }
    c.stop(survivor).await;
    let other = [1u64, 2, 3]
        .into_iter()
        .find(|i| *i != survivor)
        .unwrap_or(1);
    let without_me = BTreeSet::from([other]);
    let e = combo
        .backend
        .force_voters(&dir, survivor, &without_me)
        .expect_err("a voter set without this node");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let e = combo
        .backend
        .force_voters(&dir, survivor, &BTreeSet::from([survivor, 9]))
        .expect_err("a stranger as voter");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let done = combo
        .backend
        .force_voters(&dir, survivor, &alone)
        .unwrap_or_else(|e| panic!("forced recovery: {e}"));
    eprintln!("node {survivor}: {done}");
    c.restart(survivor).await;
    assert_eq!(c.wait_leader_among(&[survivor], ELECTION).await, survivor);
    c.wait_statuses(SETTLE, |st| st[&survivor].voters == alone)
        .await
        .unwrap_or_else(|e| panic!("the survivor is not the only voter: {e}"));
    c.put(survivor, "after", "recovery")
        .await
        .expect("the survivor commits alone");
    for i in 0..10 {
        assert_eq!(
            c.get(survivor, &format!("k{i}")).await.expect("read"),
            Some(format!("v{i}")),
            "an acknowledged write was lost in the recovery"
        );
    }
    // Back to three: a new node joins the recovered cluster the usual way.
    let addr = c.add_fresh_node(4).await;
    c.on(survivor, move |n| async move {
        n.add_learner(4, addr.to_string()).await?;
        n.change_voters(BTreeSet::from([survivor, 4])).await
    })
    .await
    .expect("grow the recovered cluster");
    c.put(survivor, "grown", "yes").await.expect("write");
}

/// Leadership moves to the node named in a transfer request, and it commits.
///
/// Reference: Ongaro, Consensus: Bridging Theory and Practice, §3.10 (leadership transfer).
pub async fn leadership_transfers_to_the_named_node(combo: Combo) {
    let c = Cluster::start(&combo, "leadership_transfers_to_the_named_node", 3).await;
    let leader = c.wait_leader(ELECTION).await;
    let others: Vec<NodeId> = c.others(leader);
    let (target, via) = (others[0], others[1]);
    c.on(via, move |n| async move { n.transfer_leader(target).await })
        .await
        .expect("transfer through a follower");
    assert_eq!(c.wait_leader(ELECTION).await, target);
    c.put(target, "t", "1").await.expect("new leader commits");
    let bad = c
        .on(target, |n| async move { n.transfer_leader(99).await })
        .await
        .expect_err("transfer to a non-member");
    assert_eq!(bad.kind(), ErrorKind::InvalidRequest, "{bad}");
}
