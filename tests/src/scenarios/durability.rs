//! Durability: acknowledged writes survive crashes and full restarts from disk; snapshots compact
//! the log and bring lagging nodes back. Raft paper §5.1 (persistent state, Figure 2) and §7 (log
//! compaction).

use std::time::Duration;

use consensus_harness::snapshot_hold::{SnapshotHold, HOLD_KEY};
use tokio::time::Instant;

use super::{ELECTION, FAILOVER_LIMIT, SETTLE};
use crate::{Cluster, Combo};

/// The durability family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __durability_family {
    ($make:ident) => {
        $crate::__tests!($make, durability;
            acknowledged_write_survives_leader_crash,
            full_cluster_restart_recovers_state_from_disk,
            snapshot_compacts_and_restart_restores_from_it,
            lagging_node_catches_up_by_snapshot,
            a_stopped_nodes_data_dir_reads_back_what_it_stored,
            a_new_cluster_restored_from_a_backup_serves_its_image,
            snapshot_now_during_a_build_covers_what_was_applied_at_the_call,
            the_log_kept_behind_a_snapshot_is_bounded_by_bytes
        );
    };
}

/// Kill the leader without shutdown: a new leader within the failover limit, every
/// acknowledged write still there, and the killed node catches up after restart.
///
/// Reference: Raft paper §5.4 (Leader Completeness).
pub async fn acknowledged_write_survives_leader_crash(combo: Combo) {
    let mut c = Cluster::start(&combo, "acknowledged_write_survives_leader_crash", 3).await;
    let old = c.wait_leader(ELECTION).await;
    let mut acked = Vec::new();
    for i in 0..30u64 {
        let via = 1 + i % 3;
        let key = format!("k{i}");
        c.put(via, &key, &format!("v{i}"))
            .await
            .expect("write before the crash");
        acked.push((key, format!("v{i}")));
    }
    let crashed_at = Instant::now();
    c.crash(old);
    let survivors = c.live();
    let new = c.wait_leader_among(&survivors, ELECTION).await;
    let failover = crashed_at.elapsed();
    println!("{}: failover took {failover:?}", combo.name());
    assert_ne!(new, old);
    assert!(
        failover <= FAILOVER_LIMIT,
        "failover took {failover:?}, the promise is {FAILOVER_LIMIT:?}"
    );
    for (k, v) in &acked {
        for id in &survivors {
            assert_eq!(
                c.get(*id, k).await.expect("read after failover"),
                Some(v.clone())
            );
        }
    }
    c.put(survivors[0], "after", "crash")
        .await
        .expect("write after failover");
    c.restart(old).await;
    let commit = c.statuses()[&new].commit_index;
    c.wait_applied(&[old], commit, SETTLE).await;
    let m = c.machine(old);
    for (k, v) in &acked {
        assert_eq!(m.get(k).as_ref(), Some(v), "restarted node lost {k}");
    }
}

/// All nodes killed at once and restarted from their data dirs keep every write, the term never
/// goes back, and the cluster works again.
///
/// Reference: Raft paper Figure 2 (persistent state on all servers).
pub async fn full_cluster_restart_recovers_state_from_disk(combo: Combo) {
    let mut c = Cluster::start(&combo, "full_cluster_restart_recovers_state_from_disk", 3).await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..20 {
        c.put(1 + i % 3, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write");
    }
    let term_before = c.statuses()[&leader].term;
    for id in c.live() {
        c.crash(id);
    }
    for id in 1..=3 {
        c.restart(id).await;
    }
    let leader = c.wait_leader(ELECTION).await;
    assert!(
        c.statuses()[&leader].term >= term_before,
        "term went back after restart"
    );
    for i in 0..20 {
        for id in 1..=3 {
            assert_eq!(
                c.get(id, &format!("k{i}"))
                    .await
                    .expect("read after restart"),
                Some(format!("v{i}"))
            );
        }
    }
    c.put(leader, "after", "restart")
        .await
        .expect("write after restart");
}

/// A snapshot taken on demand compacts the log and a restarted node recovers from it.
///
/// Reference: Raft paper §7 (log compaction).
pub async fn snapshot_compacts_and_restart_restores_from_it(combo: Combo) {
    let mut c = Cluster::start_with(
        &combo,
        "snapshot_compacts_and_restart_restores_from_it",
        3,
        |cfg| cfg.keep_logs_after_snapshot = 0,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..50 {
        c.put(leader, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write");
    }
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), commit, SETTLE).await;
    let follower = c.follower_of(leader);
    let index = c
        .on(follower, |n| async move { n.snapshot_now().await })
        .await
        .expect("snapshot");
    assert!(
        index >= commit,
        "snapshot at {index} does not cover applied {commit}"
    );
    c.crash(follower);
    c.restart(follower).await;
    c.on(follower, move |n| async move {
        n.wait_status(SETTLE, |s| {
            s.snapshot_index >= commit && s.applied_index >= commit
        })
        .await
    })
    .await
    .expect("restart loads the snapshot");
    assert_eq!(c.machine(follower).get("k49"), Some("v49".into()));
    assert_eq!(
        c.get(follower, "k0").await.expect("read"),
        Some("v0".into())
    );
}

/// A node that was down while the leader compacted its log past the node's position catches up
/// by installing the leader's snapshot.
///
/// Reference: Raft paper §7 (InstallSnapshot).
pub async fn lagging_node_catches_up_by_snapshot(combo: Combo) {
    let mut c = Cluster::start_with(&combo, "lagging_node_catches_up_by_snapshot", 3, |cfg| {
        cfg.keep_logs_after_snapshot = 0
    })
    .await;
    let leader = c.wait_leader(ELECTION).await;
    c.put(leader, "early", "1").await.expect("write");
    let lagging = c.follower_of(leader);
    let early = c.statuses()[&leader].commit_index;
    c.wait_applied(&[lagging], early, SETTLE).await;
    c.crash(lagging);
    for i in 0..100 {
        c.put(leader, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write while lagging");
    }
    // Compact the leader's log past the lagging node's position. An engine may postpone the
    // purge while it still retries the dead follower, so ask again until it has happened.
    let deadline = Instant::now() + SETTLE;
    let snap = loop {
        let snap = c
            .on(leader, |n| async move { n.snapshot_now().await })
            .await
            .expect("leader snapshot");
        if c.statuses()[&leader].purged_index > early {
            break snap;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never compacted its log: {:#?}",
            c.statuses()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        snap >= early + 100,
        "snapshot at {snap} does not cover the writes"
    );
    c.restart(lagging).await;
    let leader_status = c.statuses()[&leader].clone();
    c.on(lagging, move |n| async move {
        n.wait_status(SETTLE, |s| {
            s.snapshot_index >= snap && s.applied_index >= leader_status.commit_index
        })
        .await
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the lagging node did not install the snapshot and catch up ({e}): {:#?}",
            c.statuses()
        )
    });
    assert_eq!(c.machine(lagging), c.machine(leader));
    c.put(lagging, "after", "catch-up")
        .await
        .expect("write through the caught-up node");
}

/// The backend's offline inspection (`Backend::inspect`, behind `broker debug dump`) of a
/// stopped node's data dir reports what the node had: its term, its membership, a commit index
/// and log end matching its last status, the commands it stored; and it changes nothing (the
/// node restarts on the dir and catches up).
///
/// Reference: Raft paper §5.1, Figure 2 (the persistent state: current term, voted for, log).
pub async fn a_stopped_nodes_data_dir_reads_back_what_it_stored(combo: Combo) {
    let mut c = Cluster::start(
        &combo,
        "a_stopped_nodes_data_dir_reads_back_what_it_stored",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..8 {
        c.put(leader, &format!("k{i}"), "v").await.expect("write");
    }
    let follower = c.others(leader)[0];
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[follower], commit, SETTLE).await;
    let last = c.statuses()[&follower].clone();
    c.stop(follower).await;
    let r = combo
        .backend
        .inspect(&c.data_dir(follower), 1_000)
        .unwrap_or_else(|e| panic!("inspect node {follower}: {e}"));
    assert_eq!(r.backend, combo.backend.name());
    assert_eq!(r.term, last.term, "stored term: {r:?}");
    assert_eq!(r.voters, last.voters, "membership: {r:?}");
    assert!(r.learners.is_empty(), "{r:?}");
    assert!(
        r.commit_index > 0 && r.commit_index <= last.commit_index,
        "stored commit {} against the status's {}: {r:?}",
        r.commit_index,
        last.commit_index
    );
    assert_eq!(
        r.log_bounds.map(|b| b.1),
        Some(last.last_log_index),
        "log end: {r:?}"
    );
    let commands = r.entries.iter().filter(|e| e.kind == "command").count();
    assert!(commands >= 8, "the 8 writes are commands in the log: {r:?}");
    assert!(r.notes.is_empty(), "nothing unusual: {:?}", r.notes);
    let none = combo
        .backend
        .inspect(&c.data_dir(follower), 0)
        .unwrap_or_else(|e| panic!("inspect without entries: {e}"));
    assert!(none.entries.is_empty(), "no entry was asked for: {none:?}");
    assert_eq!(none.log_bounds, r.log_bounds);
    c.restart(follower).await;
    c.put(leader, "after", "inspection").await.expect("write");
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&[follower], commit, SETTLE).await;
}

/// A backup taken through a follower holds every write acknowledged before it and none after;
/// a damaged copy is refused; a new cluster restored from it (three fresh data dirs, another
/// cluster id) elects a leader, serves the image on every node, continues the log after the
/// backup's index, survives a restart, sends the image to a node added later, and refuses a
/// second restore over a data dir it wrote.
///
/// Reference: etcd's `snapshot save` / `snapshot restore` (disaster recovery: a new cluster
/// from a backup, its members restored from the same file).
pub async fn a_new_cluster_restored_from_a_backup_serves_its_image(combo: Combo) {
    use consensus_api::backup::{self, Backup};
    use consensus_api::ErrorKind;
    let name = "a_new_cluster_restored_from_a_backup_serves_its_image";
    let mut c = Cluster::start(&combo, name, 3).await;
    let leader = c.wait_leader(ELECTION).await;
    for i in 0..20 {
        c.put(leader, &format!("k{i}"), &format!("v{i}"))
            .await
            .expect("write");
    }
    let acked = c.statuses()[&leader].applied_index;
    let follower = c.others(leader)[0];
    let path = c.root().join("image.backup");
    let p = path.clone();
    let info = c
        .on(follower, move |n| async move {
            let (header, view) = n.backup().await?;
            tokio::task::spawn_blocking(move || backup::write_file(&p, header, view))
                .await
                .map_err(|e| consensus_api::ConsensusError::Internal(e.to_string()))?
        })
        .await
        .unwrap_or_else(|e| panic!("backup through node {follower}: {e}"));
    println!("{}: backup {info:?}", combo.name());
    assert_eq!(info.header.cluster_id, c.cluster_id());
    assert!(
        info.header.index >= acked,
        "the backup reflects index {} but writes were acknowledged up to {acked}",
        info.header.index
    );
    c.put(leader, "after", "the backup").await.expect("write");
    c.stop_all().await;

    let bytes = std::fs::read(&path).expect("read the backup");
    let damaged = c.root().join("damaged.backup");
    let mut flipped = bytes.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x40;
    std::fs::write(&damaged, flipped).expect("write a damaged copy");
    let e = Backup::open(&damaged).expect_err("a damaged backup");
    assert_eq!(e.kind(), ErrorKind::InvalidRequest, "{e}");
    let b = Backup::open(&path).unwrap_or_else(|e| panic!("the backup: {e}"));
    assert_eq!(b.info(), &info);

    let mut r = Cluster::planned(&combo, &format!("{name}_restored"), 3).await;
    for done in r
        .restore_from(&b)
        .unwrap_or_else(|e| panic!("restore: {e}"))
    {
        println!("{}: restored: {done}", combo.name());
    }
    let again = r
        .restore_from(&b)
        .expect_err("a second restore over the same dirs");
    assert_eq!(again.kind(), ErrorKind::InvalidRequest, "{again}");
    for id in [1, 2, 3] {
        r.start_node(id).await;
    }
    let new_leader = r.wait_leader(ELECTION).await;
    for id in [1, 2, 3] {
        for i in [0, 7, 19] {
            assert_eq!(
                r.get(id, &format!("k{i}")).await.expect("read"),
                Some(format!("v{i}")),
                "node {id} of the restored cluster lacks k{i}"
            );
        }
        assert_eq!(
            r.get(id, "after").await.expect("read"),
            None,
            "a write after the backup is in the restored image"
        );
    }
    r.put(new_leader, "restored", "yes").await.expect("write");
    let st = r.statuses()[&new_leader].clone();
    assert!(
        st.commit_index > info.header.index,
        "the restored log continues after the backup's index {}: {st:?}",
        info.header.index
    );
    let restarted = r.others(new_leader)[0];
    r.stop(restarted).await;
    r.restart(restarted).await;
    assert_eq!(
        r.get(restarted, "k3").await.expect("read after restart"),
        Some("v3".into())
    );
    let leader_now = r.wait_leader(ELECTION).await;
    let addr = r.add_fresh_node(4).await;
    r.on(leader_now, move |n| async move {
        n.add_learner(4, addr.to_string()).await
    })
    .await
    .expect("add a learner to the restored cluster");
    let commit = r.statuses()[&leader_now].commit_index;
    r.wait_applied(&[4], commit, SETTLE).await;
    assert_eq!(r.machine(4).get("k11"), Some("v11".into()));
    assert_eq!(r.machine(4).get("restored"), Some("yes".into()));
}

/// How long a `snapshot_now` made while a build is held gets to make its request before the
/// build is released. Not a wait for an outcome: the call cannot answer rightly while the hold
/// lasts (no snapshot can cover its index yet), so this only gives it the time to reach the
/// engine; an answer within it is checked like any other.
const REQUEST_GRACE: Duration = Duration::from_millis(300);

/// `snapshot_now` made while another snapshot is being built (held mid-write with a
/// [`SnapshotHold`], applies going on meanwhile) answers only with a snapshot covering what was
/// applied when it was called: an engine that ignores a snapshot request while it builds one
/// must take another after it, not leave the caller waiting or hand it the older one. The held
/// build itself finishes and covers what was applied when it started.
///
/// Reference: Raft paper §7 (each server snapshots independently, covering committed entries).
pub async fn snapshot_now_during_a_build_covers_what_was_applied_at_the_call(combo: Combo) {
    let test = "snapshot_now_during_a_build_covers_what_was_applied_at_the_call";
    let c = Cluster::start(&combo, test, 3).await;
    let leader = c.wait_leader(ELECTION).await;
    let hold = SnapshotHold::new(c.root().display().to_string());
    c.put(leader, HOLD_KEY, hold.name())
        .await
        .expect("putting the hold in the state");
    for i in 0..10 {
        c.put(leader, &format!("before{i}"), "v")
            .await
            .expect("write before the first snapshot");
    }
    let node = c.remote(leader).expect("the leader runs");
    let first_applied = c.statuses()[&leader].applied_index;
    let first =
        tokio::spawn(async move { node.run(|n| async move { n.snapshot_now().await }).await });
    hold.wait_held(1, SETTLE).await.unwrap_or_else(|e| {
        panic!("the first snapshot_now's build never started writing from a view: {e}")
    });

    // Applies go on while the build is held.
    for i in 0..10 {
        c.put(leader, &format!("during{i}"), "v")
            .await
            .expect("write while a snapshot is being built");
    }
    let applied = c.statuses()[&leader].applied_index;
    assert!(applied > first_applied, "{applied} <= {first_applied}");
    let node = c.remote(leader).expect("the leader runs");
    let mut second =
        tokio::spawn(async move { node.run(|n| async move { n.snapshot_now().await }).await });
    if let Ok(early) = tokio::time::timeout(REQUEST_GRACE, &mut second).await {
        let early = early.expect("the second snapshot_now task");
        panic!(
            "snapshot_now answered {early:?} while the only build was held below its applied \
             index {applied}"
        );
    }
    println!(
        "{test}: first build held at applied {first_applied}, second call at applied {applied}; \
         releasing ({} writes reached the hold)",
        hold.reached()
    );
    hold.release();

    let first = tokio::time::timeout(SETTLE, first)
        .await
        .unwrap_or_else(|_| panic!("the held snapshot_now never returned after the release"))
        .expect("the first snapshot_now task")
        .expect("the first snapshot_now");
    assert!(
        first >= first_applied,
        "the first snapshot ends at {first}, below its call's applied {first_applied}"
    );
    let second = tokio::time::timeout(SETTLE, second)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "snapshot_now called during a build (applied {applied}) never returned: the \
                 engine dropped its request; statuses {:#?}",
                c.statuses()
            )
        })
        .expect("the second snapshot_now task")
        .expect("the second snapshot_now");
    assert!(
        second >= applied,
        "snapshot_now called at applied {applied} answered a snapshot ending at {second}"
    );
    let status = &c.statuses()[&leader];
    assert!(
        status.snapshot_index >= applied,
        "the node's snapshot index {} is below {applied}",
        status.snapshot_index
    );
    c.put(leader, "after", "v")
        .await
        .expect("write after both snapshots");
}

/// With room for a thousand entries behind a snapshot (`keep_logs_after_snapshot`) but only
/// 16 KiB of them (`keep_log_bytes_after_snapshot`), a snapshot after forty 4 KiB writes
/// leaves at most four entries at or below it on the node that took it, and at least one;
/// the cluster keeps committing.
///
/// Reference: Raft paper §7 (a server may discard the log up to its snapshot).
pub async fn the_log_kept_behind_a_snapshot_is_bounded_by_bytes(combo: Combo) {
    const KEEP_BYTES: u64 = 16 << 10;
    let test = "the_log_kept_behind_a_snapshot_is_bounded_by_bytes";
    let c = Cluster::start_with(&combo, test, 3, |cfg| {
        cfg.keep_logs_after_snapshot = 1_000;
        cfg.keep_log_bytes_after_snapshot = KEEP_BYTES;
    })
    .await;
    let leader = c.wait_leader(ELECTION).await;
    let value = "x".repeat(4096);
    for i in 0..40 {
        c.put(leader, &format!("k{i}"), &value)
            .await
            .expect("write before the snapshot");
    }
    for node in [leader, c.follower_of(leader)] {
        let snap = c
            .on(node, |n| async move { n.snapshot_now().await })
            .await
            .unwrap_or_else(|e| panic!("snapshot on node {node}: {e}"));
        let status = c
            .on(node, move |n| async move {
                n.wait_status(SETTLE, |s| s.purged_index + 4 >= snap).await
            })
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "node {node} kept more than 4 entries of 4 KiB behind its snapshot at \
                     {snap} with a 16 KiB bound ({e}): {:#?}",
                    c.statuses()[&node]
                )
            });
        println!(
            "{test}: node {node} snapshot at {snap}, purged to {}",
            status.purged_index
        );
        assert!(
            status.purged_index < snap,
            "node {node} purged its whole log to {} (snapshot {snap}): 16 KiB leave room for \
             an entry",
            status.purged_index
        );
    }
    c.put(leader, "after", "v")
        .await
        .expect("write after the purge");
}
