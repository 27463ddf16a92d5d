//! Log replication: proposals through any node are applied in one order everywhere, with the state
//! machine's answers. Raft paper §5.3 (log matching) and §8 (client interaction).

use std::sync::Arc;

use super::{ELECTION, SETTLE};
use crate::kv::{put, BatchedKv, KvCommand, KvResponse};
use crate::{Cluster, Combo, SmCluster};

/// The replication family, declared once: [`conformance_suite!`](crate::conformance_suite) runs
/// every scenario in it for each combination.
#[doc(hidden)]
#[macro_export]
macro_rules! __replication_family {
    ($make:ident) => {
        $crate::__tests!($make, replication;
            replicated_proposals_apply_in_the_same_order_everywhere,
            propose_and_read_through_a_follower,
            status_shows_a_write_applied_when_its_answer_arrives,
            batched_proposals_get_their_own_answers_in_order
        );
    };
}

/// 1,000 proposals from concurrent clients through every node are applied in the same order
/// on every node: identical state-machine snapshots, history hash included.
///
/// Reference: Raft paper §5.3 (Log Matching) and §5.4.3 (State Machine Safety).
pub async fn replicated_proposals_apply_in_the_same_order_everywhere(combo: Combo) {
    let c = Arc::new(
        Cluster::start(
            &combo,
            "replicated_proposals_apply_in_the_same_order_everywhere",
            3,
        )
        .await,
    );
    c.wait_leader(ELECTION).await;
    let clients = 10u64;
    let per_client = 100u64;
    let mut tasks = Vec::new();
    for client in 0..clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                let via = 1 + (client + i) % 3;
                let cmd = if i % 2 == 0 {
                    put(format!("c{client}-{i}"), format!("{i}"))
                } else {
                    KvCommand::Append {
                        key: "shared".into(),
                        suffix: format!("{client}.{i};"),
                    }
                };
                c.on(via, move |n| async move { n.propose(cmd).await })
                    .await
                    .unwrap_or_else(|e| panic!("proposal {client}/{i} via node {via}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let leader = c.wait_leader(ELECTION).await;
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), commit, SETTLE).await;
    let reference = c.machine(leader);
    assert_eq!(reference.applied, clients * per_client);
    for id in c.live() {
        assert_eq!(
            c.machine(id),
            reference,
            "node {id} diverged from the leader"
        );
    }
}

/// A proposal and a linearizable read sent to a follower are served by the leader.
///
/// Reference: Raft paper §8 (clients talk to the leader; followers redirect).
pub async fn propose_and_read_through_a_follower(combo: Combo) {
    let c = Cluster::start(&combo, "propose_and_read_through_a_follower", 3).await;
    let leader = c.wait_leader(ELECTION).await;
    let follower = c
        .live()
        .into_iter()
        .find(|id| *id != leader)
        .expect("a follower");
    let answer = c
        .on(follower, |n| async move { n.propose(put("f", "1")).await })
        .await
        .expect("proposal through a follower");
    assert_eq!(answer, KvResponse::Previous(None));
    assert_eq!(c.get(follower, "f").await.expect("read"), Some("1".into()));
    // The write was applied on the follower before its read returned, without waiting.
    assert_eq!(c.machine(follower).get("f"), Some("1".into()));
}

/// When a proposal's answer arrives, the node's status already shows the entry applied (the
/// contract's status-before-answers rule, on which the read barrier and every waiter on the
/// status rely).
pub async fn status_shows_a_write_applied_when_its_answer_arrives(combo: Combo) {
    let c = Cluster::start(
        &combo,
        "status_shows_a_write_applied_when_its_answer_arrives",
        3,
    )
    .await;
    let leader = c.wait_leader(ELECTION).await;
    let late = c
        .on(leader, |n| async move {
            let mut late = Vec::new();
            for i in 0..200 {
                n.propose(put("k", i.to_string())).await?;
                // One client, one write at a time: the machine's last index is this write's.
                let index = n.read_local(|sm| sm.last_index);
                let shown = n.status().applied_index;
                if shown < index {
                    late.push((index, shown));
                }
            }
            Ok(late)
        })
        .await
        .expect("proposals");
    assert!(
        late.is_empty(),
        "answers arrived before the status showed their entry (index, shown): {late:?}"
    );
}

/// With a state machine that batches ([`consensus_api::StateMachine::BATCHES`]), concurrent
/// proposals through every node share log entries, and each proposer still gets the answer of
/// its own command: every append's answer ends with its own suffix and is a prefix of the final
/// value (the answers follow the one order of the log), every acknowledged append is in the final
/// value exactly once, and every node holds the same state.
pub async fn batched_proposals_get_their_own_answers_in_order(combo: Combo) {
    let c = Arc::new(
        SmCluster::<BatchedKv>::start(
            &combo,
            "batched_proposals_get_their_own_answers_in_order",
            3,
        )
        .await,
    );
    let leader = c.wait_leader(ELECTION).await;
    let entries_before = c.statuses()[&leader].commit_index;
    let (clients, per_client) = (48u64, 5u64);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            for i in 0..per_client {
                let via = 1 + (client + i) % 3;
                let suffix = format!("{client}.{i};");
                let cmd = KvCommand::Append {
                    key: "log".into(),
                    suffix: suffix.clone(),
                };
                let answer = c
                    .on(via, move |n| async move { n.propose(cmd).await })
                    .await
                    .unwrap_or_else(|e| panic!("append {client}/{i} via node {via}: {e}"));
                answers.push((suffix, answer));
            }
            answers
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.extend(t.await.expect("client task"));
    }
    let leader = c.wait_leader(ELECTION).await;
    let commit = c.statuses()[&leader].commit_index;
    c.wait_applied(&c.live(), commit, SETTLE).await;
    let reference = c.machine(leader);
    let log = reference.0.data.get("log").cloned().unwrap_or_default();
    for (suffix, answer) in &answers {
        let KvResponse::Current(v) = answer else {
            panic!("append {suffix} answered {answer:?}");
        };
        assert!(
            v.ends_with(suffix.as_str()),
            "append {suffix} got another command's answer: {v:?}"
        );
        assert!(
            log.starts_with(v.as_str()),
            "the answer of append {suffix} is not a prefix of the final value"
        );
        assert_eq!(
            log.split_terminator(';')
                .filter(|s| format!("{s};") == *suffix)
                .count(),
            1,
            "append {suffix} is not in the final value exactly once"
        );
    }
    assert_eq!(reference.0.applied, clients * per_client);
    let entries = commit - entries_before;
    println!(
        "{}: {} appends in {entries} entries",
        combo.name(),
        clients * per_client
    );
    assert!(
        entries < clients * per_client,
        "{} concurrent appends took {entries} entries: nothing was batched",
        clients * per_client
    );
    for id in c.live() {
        assert_eq!(
            c.machine(id),
            reference,
            "node {id} diverged from the leader"
        );
    }
}
