//! Large state: a key-value state many times the transport's frame limit still reaches a node
//! that lags behind a compacted log, a new learner and a replacement node (by a snapshot sent in
//! chunks within the frame limit), and commands are held to the one command-size rule: one byte
//! over is refused before anything is appended, commands at the limit replicate and reach a
//! lagging node from the log. Every cluster here runs with [`SMALL_FRAME_BYTES`] frames; the
//! state is [`LargeState::DEFAULT`] (1.25 MiB of values, twenty frames), drawn from the test's
//! seed (printed). Raft paper §7 (log compaction, InstallSnapshot sent in chunks) and §6 (new
//! servers catch up as non-voting members).

use std::collections::BTreeSet;
use std::time::Duration;

use consensus_api::{ErrorKind, NodeId};
use consensus_harness::large_state::{
    encoded_len, sized_put, small_frame_command_limit, small_frames_compacting,
    small_frames_keeping_log, LargeState, SMALL_FRAME_BYTES,
};
use tokio::time::Instant;

use super::{CATCH_UP, ELECTION, SETTLE};
use crate::{Cluster, Combo};

/// The large-state family, declared once: [`conformance_suite!`](crate::conformance_suite)
/// runs every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __large_state_family {
    ($make:ident) => {
        $crate::__tests!($make, large_state;
            lagging_node_catches_up_on_a_large_state_by_snapshot,
            learner_joins_with_a_large_state_and_is_promoted,
            replacement_node_catches_up_on_a_large_state,
            command_over_the_limit_is_refused_before_it_is_appended,
            commands_at_the_limit_replicate_and_a_lagging_node_gets_them_from_the_log
        );
    };
}

/// A follower that lost power before a large state was written, while the leader and the other
/// follower compacted their logs past it, restarts and catches up by snapshot (a snapshot
/// twenty frames large, so it must travel in chunks) to the leader's applied index and exactly
/// its key-value state; the cluster keeps committing meanwhile, and through the caught-up node
/// afterwards.
///
/// Reference: Raft paper §7 (InstallSnapshot, sent in chunks).
pub async fn lagging_node_catches_up_on_a_large_state_by_snapshot(combo: Combo) {
    let test = "lagging_node_catches_up_on_a_large_state_by_snapshot";
    let mut c = Cluster::start_with(&combo, test, 3, small_frames_compacting).await;
    let leader = c.wait_leader(ELECTION).await;
    c.put(leader, "early", "1").await.expect("first write");
    let early = c.statuses()[&leader].commit_index;
    let lagging = c.follower_of(leader);
    let other = *c
        .others(leader)
        .iter()
        .find(|i| **i != lagging)
        .expect("a second follower");
    c.wait_applied(&[lagging], early, SETTLE).await;
    c.crash(lagging);

    let state = LargeState::DEFAULT;
    println!(
        "{test}: node {lagging} down; writing {} keys of {} bytes (seed {}) through leader {leader}",
        state.keys,
        state.value_bytes,
        c.seed()
    );
    c.write_large_state(leader, state, c.seed())
        .await
        .unwrap_or_else(|e| panic!("writing the large state with node {lagging} down: {e}"));
    let snap = c
        .compact_past(leader, early, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the leader's log was not compacted: {e}"));
    c.on(other, |n| async move { n.snapshot_now().await })
        .await
        .unwrap_or_else(|e| panic!("snapshot on the other follower {other}: {e}"));

    c.restart(lagging).await;
    // The cluster keeps committing while the lagging node catches up: one write per poll.
    let deadline = Instant::now() + CATCH_UP;
    let mut during = 0u64;
    loop {
        c.put(leader, &format!("during-{during}"), "w")
            .await
            .unwrap_or_else(|e| {
                panic!("write {during} while node {lagging} catches up was not committed: {e}")
            });
        during += 1;
        if c.statuses()
            .get(&lagging)
            .is_some_and(|s| s.applied_index >= snap)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node {lagging} did not catch up on a {}-byte state within {CATCH_UP:?} (the leader's \
             snapshot at {snap} is {}x the {SMALL_FRAME_BYTES}-byte frame limit: it must be sent \
             in chunks): {:#?}",
            state.bytes(),
            state.bytes() / SMALL_FRAME_BYTES,
            c.statuses()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("{test}: node {lagging} reached the snapshot at {snap}; {during} writes meanwhile");
    let all = [leader, other, lagging];
    let same = c
        .wait_same_state(&all, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the caught-up node's state: {e}"));
    assert!(
        same.data_bytes() >= 8 * SMALL_FRAME_BYTES && same.get("early").is_some(),
        "the state is not the large one this scenario means ({} bytes)",
        same.data_bytes()
    );
    let lagging_status = c.statuses()[&lagging].clone();
    assert!(
        lagging_status.snapshot_index > early,
        "node {lagging} caught up without installing a snapshot (snapshot index {}), though \
         the leader's log was compacted past {early}",
        lagging_status.snapshot_index
    );
    let transfer = c
        .wait_chunked_transfer(lagging, SMALL_FRAME_BYTES, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("snapshot_transfers() must report the chunked install: {e}"));
    println!("{test}: transfer {transfer:?}");
    c.put(lagging, "after", "catch-up")
        .await
        .expect("write through the caught-up node");
}

/// A fresh node added as a learner to a cluster whose large state is behind a compacted log
/// receives it by snapshot (in chunks) and holds exactly the leader's state; once promoted, it
/// counts in the quorum: with one original follower down, writes commit only with its vote.
///
/// Reference: Raft paper §6 (new servers join as non-voting members and catch up) and §7.
pub async fn learner_joins_with_a_large_state_and_is_promoted(combo: Combo) {
    let test = "learner_joins_with_a_large_state_and_is_promoted";
    let mut c = Cluster::start_with(&combo, test, 3, small_frames_compacting).await;
    let leader = c.wait_leader(ELECTION).await;
    let state = LargeState::DEFAULT;
    println!(
        "{test}: writing {} keys of {} bytes (seed {}) through leader {leader}",
        state.keys,
        state.value_bytes,
        c.seed()
    );
    c.write_large_state(leader, state, c.seed())
        .await
        .unwrap_or_else(|e| panic!("writing the large state: {e}"));
    let written = c.statuses()[&leader].commit_index;
    c.compact_past(leader, written - 1, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the leader's log was not compacted: {e}"));

    let learner: NodeId = 4;
    let addr = c.add_fresh_node(learner).await;
    c.on(leader, move |n| async move {
        n.add_learner(learner, addr.to_string()).await
    })
    .await
    .unwrap_or_else(|e| panic!("adding node {learner} as a learner: {e}"));
    let target = c.statuses()[&leader].commit_index;
    c.wait_statuses(CATCH_UP, |st| {
        st.get(&learner).is_some_and(|s| s.applied_index >= target)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "learner {learner} did not catch up on a {}-byte state ({}x the frame limit, so the \
             snapshot must be sent in chunks) to index {target}: {e}",
            state.bytes(),
            state.bytes() / SMALL_FRAME_BYTES
        )
    });
    let all = [1, 2, 3, learner];
    c.wait_same_state(&all, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the learner's state: {e}"));
    assert!(
        c.statuses()[&leader].learners.contains(&learner),
        "node {learner} is not a learner"
    );
    let transfer = c
        .wait_chunked_transfer(learner, SMALL_FRAME_BYTES, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("snapshot_transfers() must report the chunked install: {e}"));
    println!("{test}: transfer {transfer:?}");

    let voters = BTreeSet::from(all);
    let set = voters.clone();
    c.on(leader, move |n| async move { n.change_voters(set).await })
        .await
        .unwrap_or_else(|e| panic!("promoting learner {learner}: {e}"));
    c.wait_members(&voters, &BTreeSet::new(), SETTLE).await;
    // Four voters need three for a quorum: with a follower down, every commit needs node 4.
    let down = *c
        .others(leader)
        .iter()
        .find(|i| **i != learner)
        .expect("an original follower");
    c.crash(down);
    for i in 0..5 {
        c.put(learner, &format!("after-promotion-{i}"), "1")
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "write {i} needing the promoted node {learner}'s vote (node {down} down): {e}"
                )
            });
    }
    let up: Vec<NodeId> = all.iter().copied().filter(|i| *i != down).collect();
    c.wait_same_state(&up, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("after the promotion: {e}"));
}

/// A voter lost for good (power cut, its data gone) is replaced by a machine with an empty data
/// dir under a new id, as the replace-a-node fault of the random family does: the newcomer
/// joins as a learner, receives the large state by snapshot (in chunks) from a compacted
/// leader, is promoted in the lost voter's place, the lost voter is removed, and the
/// newcomer's vote carries commits.
///
/// Reference: Raft paper §6 (membership changes) and §7.
pub async fn replacement_node_catches_up_on_a_large_state(combo: Combo) {
    let test = "replacement_node_catches_up_on_a_large_state";
    let mut c = Cluster::start_with(&combo, test, 3, small_frames_compacting).await;
    let leader = c.wait_leader(ELECTION).await;
    let state = LargeState::DEFAULT;
    println!(
        "{test}: writing {} keys of {} bytes (seed {}) through leader {leader}",
        state.keys,
        state.value_bytes,
        c.seed()
    );
    c.write_large_state(leader, state, c.seed())
        .await
        .unwrap_or_else(|e| panic!("writing the large state: {e}"));
    let lost = c.follower_of(leader);
    let kept = *c
        .others(leader)
        .iter()
        .find(|i| **i != lost)
        .expect("a second follower");
    c.crash(lost);
    c.put(leader, "after-loss", "1")
        .await
        .expect("write with one voter lost");
    let written = c.statuses()[&leader].commit_index;
    c.compact_past(leader, written - 1, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the leader's log was not compacted: {e}"));
    c.on(kept, |n| async move { n.snapshot_now().await })
        .await
        .unwrap_or_else(|e| panic!("snapshot on follower {kept}: {e}"));

    let newcomer: NodeId = 4;
    println!("{test}: node {lost} lost; node {newcomer} replaces it with an empty data dir");
    let addr = c.add_fresh_node(newcomer).await;
    c.on(leader, move |n| async move {
        n.add_learner(newcomer, addr.to_string()).await
    })
    .await
    .unwrap_or_else(|e| panic!("adding the replacement {newcomer} as a learner: {e}"));
    let target = c.statuses()[&leader].commit_index;
    c.wait_statuses(CATCH_UP, |st| {
        st.get(&newcomer).is_some_and(|s| s.applied_index >= target)
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the replacement {newcomer} did not catch up on a {}-byte state ({}x the frame \
             limit, so the snapshot must be sent in chunks) to index {target}: {e}",
            state.bytes(),
            state.bytes() / SMALL_FRAME_BYTES
        )
    });
    c.wait_same_state(&[leader, kept, newcomer], SETTLE)
        .await
        .unwrap_or_else(|e| panic!("the replacement's state: {e}"));
    let transfer = c
        .wait_chunked_transfer(newcomer, SMALL_FRAME_BYTES, SETTLE)
        .await
        .unwrap_or_else(|e| panic!("snapshot_transfers() must report the chunked install: {e}"));
    println!("{test}: transfer {transfer:?}");

    let voters = BTreeSet::from([leader, kept, newcomer]);
    let set = voters.clone();
    c.on(leader, move |n| async move {
        n.change_voters(set).await?;
        n.remove_node(lost).await
    })
    .await
    .unwrap_or_else(|e| panic!("replacing voter {lost} by {newcomer}: {e}"));
    c.wait_members(&voters, &BTreeSet::new(), SETTLE).await;
    // Of three voters, two are a quorum: with the other original follower down, every commit
    // needs the replacement.
    c.crash(kept);
    for i in 0..5 {
        c.put(newcomer, &format!("after-replacement-{i}"), "1")
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "write {i} needing the replacement {newcomer}'s vote (node {kept} down): {e}"
                )
            });
    }
    c.wait_same_state(&[leader, newcomer], SETTLE)
        .await
        .unwrap_or_else(|e| panic!("after the replacement: {e}"));
}

/// A command one byte longer (encoded) than `max_command_bytes()` is refused with
/// `InvalidRequest` on the leader and through a follower, before anything is appended: the
/// leader's log does not grow, no state holds it, and the next write commits right after it.
pub async fn command_over_the_limit_is_refused_before_it_is_appended(combo: Combo) {
    let test = "command_over_the_limit_is_refused_before_it_is_appended";
    let c = Cluster::start_with(&combo, test, 3, small_frames_keeping_log).await;
    let leader = c.wait_leader(ELECTION).await;
    let follower = c.follower_of(leader);
    c.put(leader, "before", "1").await.expect("first write");
    let first = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), first, SETTLE).await;

    let limit = small_frame_command_limit();
    let seed = c.seed();
    let mut refused = Vec::new();
    for over in [1, 4096, SMALL_FRAME_BYTES] {
        let len = limit + over;
        let key = format!("too-long-{over}");
        let command = sized_put(&key, len, seed ^ over as u64)
            .unwrap_or_else(|| panic!("no put of exactly {len} encoded bytes"));
        assert_eq!(encoded_len(&command), len);
        refused.push(key);
        let before = c.statuses()[&leader].clone();
        for (via, role) in [(leader, "leader"), (follower, "follower")] {
            let e = c
                .propose(via, command.clone())
                .await
                .expect_err("a command over max_command_bytes() must be refused");
            assert_eq!(
                e.kind(),
                ErrorKind::InvalidRequest,
                "a command of {len} encoded bytes (limit {limit}) through the {role} {via}: {e}"
            );
        }
        let after = c.statuses()[&leader].clone();
        assert_eq!(
            after.last_log_index, before.last_log_index,
            "the leader's log grew with refused commands of {len} bytes: {before:#?} -> {after:#?}"
        );
    }
    let before = c.statuses()[&leader].clone();
    c.put(follower, "after", "refusal")
        .await
        .expect("write after the refusals");
    let m = c.machine(leader);
    if c.statuses()[&leader].term == before.term {
        assert_eq!(
            m.last_index,
            before.last_log_index + 1,
            "the write after the refused commands is not the next entry: something was appended"
        );
    } else {
        println!("{test}: the term changed, so a leader's entry may lie between");
    }
    let same = c
        .wait_same_state(&c.live(), SETTLE)
        .await
        .unwrap_or_else(|e| panic!("after the refusals: {e}"));
    for key in &refused {
        assert_eq!(same.get(key), None, "refused command {key} was applied");
    }
    assert_eq!(same.get("after").as_deref(), Some("refusal"));
}

/// A run of commands each at or one or two bytes under `max_command_bytes()` (encoded) commits,
/// half through the leader and half forwarded by a follower, while another follower is down;
/// with the log kept, the restarted follower catches up from the log (no snapshot), and every
/// node ends with the same state.
///
/// Reference: Raft paper §5.3 (the leader brings a follower's log up to date).
pub async fn commands_at_the_limit_replicate_and_a_lagging_node_gets_them_from_the_log(
    combo: Combo,
) {
    let test = "commands_at_the_limit_replicate_and_a_lagging_node_gets_them_from_the_log";
    let mut c = Cluster::start_with(&combo, test, 3, small_frames_keeping_log).await;
    let leader = c.wait_leader(ELECTION).await;
    let down = c.follower_of(leader);
    let up = *c
        .others(leader)
        .iter()
        .find(|i| **i != down)
        .expect("a second follower");
    c.put(leader, "early", "1").await.expect("first write");
    let early = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), early, SETTLE).await;
    let down_snapshot = c.statuses()[&down].snapshot_index;
    c.crash(down);

    let limit = small_frame_command_limit();
    let seed = c.seed();
    let run = 24u64;
    println!(
        "{test}: {run} commands of {limit} bytes and just under (limit {limit}, seed {seed}), node \
         {down} down"
    );
    for i in 0..run {
        let len = limit - (i % 3) as usize;
        let command = sized_put(&format!("near-limit-{i:02}"), len, seed ^ i)
            .unwrap_or_else(|| panic!("no put of exactly {len} encoded bytes"));
        assert_eq!(encoded_len(&command), len);
        let via = if i % 2 == 0 { leader } else { up };
        c.propose(via, command).await.unwrap_or_else(|e| {
            panic!("command {i} of {len} encoded bytes (limit {limit}) through node {via}: {e}")
        });
    }
    let purged = c.statuses()[&leader].purged_index;
    assert!(
        purged <= early,
        "the leader compacted its log past {early} (to {purged}): this scenario means the log \
         path"
    );
    c.restart(down).await;
    let same = c
        .wait_same_state(&[leader, up, down], CATCH_UP)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "node {down} did not catch up from the log on {run} commands of up to {limit} \
                 bytes (a replication message must fit the {SMALL_FRAME_BYTES}-byte frame): {e}"
            )
        });
    assert_eq!(
        same.data
            .keys()
            .filter(|k| k.starts_with("near-limit-"))
            .count() as u64,
        run
    );
    let snapshot = c.statuses()[&down].snapshot_index;
    assert_eq!(
        snapshot, down_snapshot,
        "node {down} installed a snapshot, though the log it missed was kept"
    );
    c.put(down, "after", "catch-up")
        .await
        .expect("write through the caught-up node");
}
