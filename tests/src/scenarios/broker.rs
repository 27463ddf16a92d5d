//! The broker metadata plane's scenarios, on real clusters of every combination: registration
//! and fencing, topic assignment, partition-leader failover from the ISR, consensus-leader
//! failover without lost metadata or mass fencing, stale-epoch refusal, feed order.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use broker::{
    BrokerAgent, BrokerId, Controller, ControllerError, LivenessConfig, MetadataCommand,
    MetadataError, MetadataImage, MetadataMachine,
};
use consensus_api::NodeId;
use tokio::time::Instant;

use super::{ELECTION, SETTLE};
use crate::{Combo, SmCluster};

/// The broker family, declared once: the suite macros run every scenario in it.
#[doc(hidden)]
#[macro_export]
macro_rules! __broker_family {
    ($make:ident) => {
        $crate::__tests!($make, broker;
            broker_registration_and_fencing,
            broker_topic_creation_has_a_valid_assignment,
            broker_partition_leader_fails_over,
            broker_metadata_survives_consensus_leader_failover,
            broker_stale_epochs_are_refused,
            broker_metadata_feed_is_ordered
        );
    };
}

type Metadata = SmCluster<MetadataMachine>;

/// Short sessions so fencing happens within a test.
fn liveness() -> LivenessConfig {
    LivenessConfig {
        session_timeout: Duration::from_secs(2),
        heartbeat_interval: Duration::from_millis(300),
        check_interval: Duration::from_millis(100),
    }
}

/// A controller on every running node, started on the node's own runtime.
async fn controllers(c: &Metadata) -> BTreeMap<NodeId, Controller> {
    let mut out = BTreeMap::new();
    for id in c.live() {
        let ctl = c
            .on(id, |n| async move { Ok(Controller::start(n, liveness())) })
            .await
            .expect("controller");
        out.insert(id, ctl);
    }
    out
}

/// A broker agent heartbeating through node `via`, running on that node's runtime (it dies
/// with the node, like the broker half of a combined-mode process).
async fn agent(c: &Metadata, ctl: &Controller, via: NodeId, broker: BrokerId) -> BrokerAgent {
    let ctl = ctl.clone();
    c.on(via, move |_| async move {
        Ok(BrokerAgent::start(
            ctl,
            broker,
            u64::from(broker) * 1000 + 1,
            vec![format!("broker-{broker}:9092")],
            Some(format!("rack-{}", broker % 3)),
        ))
    })
    .await
    .expect("agent")
}

async fn image(ctl: &Controller) -> MetadataImage {
    ctl.image().await.expect("linearizable image")
}

/// Polls the image through `ctl` until `pred` holds.
async fn wait_image(
    ctl: &Controller,
    what: &str,
    pred: impl Fn(&MetadataImage) -> bool,
) -> MetadataImage {
    let deadline = Instant::now() + SETTLE;
    loop {
        if let Ok(img) = ctl.image().await {
            if pred(&img) {
                return img;
            }
            assert!(Instant::now() < deadline, "{what} never happened: {img:#?}");
        } else {
            assert!(
                Instant::now() < deadline,
                "{what}: no image within the deadline"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unfenced(img: &MetadataImage) -> BTreeSet<BrokerId> {
    img.brokers
        .values()
        .filter(|b| !b.fenced)
        .map(|b| b.broker_id)
        .collect()
}

/// Three consensus nodes, a controller on each, brokers 1..=3 heartbeating through `via`
/// (default: node 1), all unfenced.
async fn plane(
    combo: &Combo,
    test: &str,
    via: Option<NodeId>,
) -> (Metadata, BTreeMap<NodeId, Controller>, Vec<BrokerAgent>) {
    let c = Metadata::start(combo, test, 3).await;
    c.wait_leader(ELECTION).await;
    let ctls = controllers(&c).await;
    let via = via.unwrap_or(1);
    let mut agents = Vec::new();
    for b in 1..=3 {
        agents.push(agent(&c, &ctls[&via], via, b).await);
    }
    wait_image(&ctls[&via], "all brokers unfenced", |i| {
        unfenced(i).len() == 3
    })
    .await;
    (c, ctls, agents)
}

/// Brokers register fenced, are unfenced once caught up, and a broker whose heartbeats stop is
/// fenced after its session timeout while the others stay unfenced.
pub async fn broker_registration_and_fencing(combo: Combo) {
    let (_c, ctls, agents) = plane(&combo, "broker_registration_and_fencing", None).await;
    let ctl = &ctls[&1];
    let img = image(ctl).await;
    for b in img.brokers.values() {
        assert!(b.epoch > 0 && b.epoch <= img.offset, "{b:?}");
        assert_eq!(b.endpoints, vec![format!("broker-{}:9092", b.broker_id)]);
    }
    agents[1].kill();
    let started = Instant::now();
    let img = wait_image(ctl, "broker 2 fenced", |i| i.brokers[&2].fenced).await;
    let took = started.elapsed();
    assert!(
        took >= liveness().session_timeout - Duration::from_millis(500),
        "fenced after {took:?}, before its session could expire"
    );
    assert_eq!(unfenced(&img), BTreeSet::from([1, 3]));
}

/// A topic gets a complete, valid, rack-spread assignment; bad requests are refused with the
/// matching error and change nothing.
pub async fn broker_topic_creation_has_a_valid_assignment(combo: Combo) {
    let (_c, ctls, _agents) =
        plane(&combo, "broker_topic_creation_has_a_valid_assignment", None).await;
    let ctl = &ctls[&2];
    let (id, assignment) = ctl
        .create_topic("orders", 6, 3, BTreeMap::new())
        .await
        .expect("create");
    assert_eq!(assignment.len(), 6);
    for r in &assignment {
        assert_eq!(
            r.iter().collect::<BTreeSet<_>>(),
            BTreeSet::from([&1, &2, &3])
        );
    }
    let before = image(ctl).await;
    assert_eq!(before.topics["orders"].id, id);
    let refusals = [
        (
            ctl.create_topic("orders", 1, 1, BTreeMap::new()).await,
            "duplicate",
        ),
        (
            ctl.create_topic("wide", 1, 4, BTreeMap::new()).await,
            "replication factor above live brokers",
        ),
        (
            ctl.create_topic("empty", 0, 1, BTreeMap::new()).await,
            "zero partitions",
        ),
    ];
    for (r, what) in refusals {
        assert!(
            matches!(r, Err(ControllerError::Metadata(_))),
            "{what}: {r:?}"
        );
    }
    let e = ctl
        .submit(MetadataCommand::DeleteTopic {
            name: "missing".into(),
        })
        .await;
    assert!(matches!(
        e,
        Err(ControllerError::Metadata(MetadataError::UnknownTopic(_)))
    ));
    let after = image(ctl).await;
    assert_eq!(
        after.topics, before.topics,
        "refused requests changed topics"
    );
}

/// The broker leading a partition dies: it leaves every ISR and its partitions get new leaders
/// from their ISRs.
pub async fn broker_partition_leader_fails_over(combo: Combo) {
    let (_c, ctls, agents) = plane(&combo, "broker_partition_leader_fails_over", None).await;
    let ctl = &ctls[&3];
    let (_, assignment) = ctl
        .create_topic("events", 3, 3, BTreeMap::new())
        .await
        .expect("create");
    let victim = assignment[0][0];
    agents[(victim - 1) as usize].kill();
    let img = wait_image(ctl, "the dead broker's partitions moved", |i| {
        i.brokers[&victim].fenced
    })
    .await;
    for (p, st) in img.topics["events"].partitions.iter().enumerate() {
        assert!(!st.isr.contains(&victim), "partition {p} ISR {:?}", st.isr);
        let leader = st.leader.expect("a leader from the ISR");
        assert!(
            st.isr.contains(&leader) && leader != victim,
            "partition {p}: {st:?}"
        );
    }
    assert!(img.topics["events"].partitions[0].leader_epoch >= 1);
}

/// The consensus leader crashes: every acknowledged topic is on the survivors and on the
/// restarted node, and brokers that kept heartbeating are not fenced by the new leader.
pub async fn broker_metadata_survives_consensus_leader_failover(combo: Combo) {
    let c0 = Metadata::start(
        &combo,
        "broker_metadata_survives_consensus_leader_failover",
        3,
    )
    .await;
    let leader = c0.wait_leader(ELECTION).await;
    let via = *c0
        .live()
        .iter()
        .find(|i| **i != leader)
        .expect("a follower");
    let mut c = c0;
    let mut ctls = controllers(&c).await;
    let mut agents = Vec::new();
    for b in 1..=3 {
        agents.push(agent(&c, &ctls[&via], via, b).await);
    }
    wait_image(&ctls[&via], "all brokers unfenced", |i| {
        unfenced(i).len() == 3
    })
    .await;
    let mut created = Vec::new();
    for t in 0..5 {
        let name = format!("topic-{t}");
        ctls[&via]
            .create_topic(&name, 2, 2, BTreeMap::new())
            .await
            .expect("create");
        created.push(name);
    }
    c.crash(leader);
    // The crashed node's handles go with it (a held handle would keep its storage open).
    drop(ctls.remove(&leader));
    let survivors: Vec<NodeId> = c.live();
    c.wait_leader_among(&survivors, ELECTION).await;
    // A full session after the failover: nobody who kept heartbeating was fenced.
    tokio::time::sleep(liveness().session_timeout + Duration::from_secs(1)).await;
    let img = image(&ctls[&via]).await;
    assert_eq!(
        unfenced(&img),
        BTreeSet::from([1, 2, 3]),
        "mass fencing after failover"
    );
    for t in &created {
        assert!(img.topics.contains_key(t), "{t} lost on the survivors");
    }
    c.restart(leader).await;
    let restarted = c.node(leader);
    let deadline = Instant::now() + SETTLE;
    loop {
        let has_all =
            restarted.read_local(|m| created.iter().all(|t| m.image().topics.contains_key(t)));
        if has_all {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(agents);
}

/// Requests computed from an old broker epoch or partition epoch are refused, changing nothing.
pub async fn broker_stale_epochs_are_refused(combo: Combo) {
    let (_c, ctls, agents) = plane(&combo, "broker_stale_epochs_are_refused", None).await;
    let ctl = &ctls[&1];
    ctl.create_topic("t", 1, 3, BTreeMap::new())
        .await
        .expect("create");
    let epoch = agents[0].epoch().expect("registered");
    let e = ctl.heartbeat(1, epoch + 1000, 0).await;
    assert!(
        matches!(
            e,
            Err(ControllerError::Metadata(
                MetadataError::StaleBrokerEpoch { .. }
            ))
        ),
        "{e:?}"
    );
    let before = image(ctl).await.topics["t"].partitions[0].clone();
    let change = |epoch, leader| MetadataCommand::ChangePartition {
        topic: "t".into(),
        partition: 0,
        partition_epoch: epoch,
        leader: Some(leader),
        isr: before.replicas.clone(),
    };
    ctl.submit(change(before.partition_epoch, before.replicas[1]))
        .await
        .expect("first change");
    let e = ctl
        .submit(change(before.partition_epoch, before.replicas[2]))
        .await;
    assert!(
        matches!(
            e,
            Err(ControllerError::Metadata(
                MetadataError::StalePartitionEpoch { .. }
            ))
        ),
        "{e:?}"
    );
    let after = image(ctl).await.topics["t"].partitions[0].clone();
    assert_eq!(after.leader, Some(before.replicas[1]));
    assert_eq!(after.partition_epoch, before.partition_epoch + 1);
}

/// The feed gives changes in log order from any node, and a long poll returns as soon as a new
/// change is applied.
pub async fn broker_metadata_feed_is_ordered(combo: Combo) {
    let (mut c, ctls, _agents) = plane(&combo, "broker_metadata_feed_is_ordered", None).await;
    for t in 0..3 {
        ctls[&1]
            .create_topic(&format!("f{t}"), 1, 1, BTreeMap::new())
            .await
            .expect("create");
    }
    let img = image(&ctls[&1]).await;
    for id in [1, 2, 3] {
        let ctl = &ctls[&id];
        let deadline = Instant::now() + SETTLE;
        let feed = loop {
            let feed = ctl
                .changes_since(0, 1000, Duration::ZERO)
                .await
                .expect("feed");
            if feed.last().is_some_and(|c| c.offset >= img.offset) || Instant::now() > deadline {
                break feed;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let offsets: Vec<u64> = feed.iter().map(|c| c.offset).collect();
        assert!(
            offsets.windows(2).all(|w| w[0] < w[1]),
            "node {id}: {offsets:?}"
        );
        let topics: Vec<String> = feed
            .iter()
            .filter_map(|c| match &c.command {
                MetadataCommand::CreateTopic { name, .. } => Some(name.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(topics, vec!["f0", "f1", "f2"], "node {id}");
    }
    // Long poll: waits for the next change instead of returning empty.
    let ctl = ctls[&2].clone();
    let from = image(&ctl).await.offset;
    let poll =
        tokio::spawn(async move { ctl.changes_since(from, 10, Duration::from_secs(5)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctls[&1]
        .create_topic("late", 1, 1, BTreeMap::new())
        .await
        .expect("create");
    let got = poll.await.expect("poll task").expect("feed");
    assert!(
        got.iter().any(
            |c| matches!(&c.command, MetadataCommand::CreateTopic { name, .. } if name == "late")
        ),
        "{got:?}"
    );
    // On a node whose consensus stopped, a long poll fails at once instead of spinning until
    // its deadline and answering "no changes".
    let from = image(&ctls[&1]).await.offset;
    c.stop(3).await;
    let stopped = ctls[&3]
        .changes_since(from, 10, Duration::from_secs(3))
        .await;
    assert!(
        matches!(
            stopped,
            Err(ControllerError::Consensus(
                consensus_api::ConsensusError::ShuttingDown
            ))
        ),
        "a feed read on a stopped node: {stopped:?}"
    );
}
