//! [`MetadataMachine`]: the replicated state machine of the metadata plane. Every rule here is
//! deterministic: the same records give the same image on every node.

use std::collections::{BTreeSet, VecDeque};

use consensus_api::{codec, StateMachine};

use crate::model::*;
use crate::placement::place;

/// Most changes kept for the feed; older readers restart from the image.
const FEED_CAPACITY: usize = 10_000;
/// Largest partition count of a topic.
const MAX_PARTITIONS: u32 = 10_000;

/// The metadata image plus a bounded feed of recent changes.
#[derive(Debug, Default)]
pub struct MetadataMachine {
    image: MetadataImage,
    feed: VecDeque<MetadataChange>,
    /// The feed holds every change after this offset (0 until changes were dropped or the
    /// image was restored from a snapshot).
    feed_floor: u64,
}

/// A feed reader asked for changes older than the feed keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("changes after offset {asked} are gone; the feed starts after {oldest}: read the image")]
pub struct FeedGap {
    /// The offset asked for.
    pub asked: u64,
    /// Changes after this offset are available.
    pub oldest: u64,
}

fn valid_topic_name(name: &str) -> Result<(), MetadataError> {
    let ok = !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(MetadataError::Invalid(format!(
            "topic name {name:?} must be 1-249 characters of [a-zA-Z0-9._-]"
        )))
    }
}

impl MetadataMachine {
    /// The current image.
    pub fn image(&self) -> &MetadataImage {
        &self.image
    }

    /// Changes applied after `offset`, oldest first, at most `max`.
    pub fn changes_since(&self, offset: u64, max: usize) -> Result<Vec<MetadataChange>, FeedGap> {
        let oldest = self.feed_floor;
        if offset < oldest {
            return Err(FeedGap {
                asked: offset,
                oldest,
            });
        }
        Ok(self
            .feed
            .iter()
            .filter(|c| c.offset > offset)
            .take(max)
            .cloned()
            .collect())
    }

    fn unfenced(&self) -> Vec<&BrokerRegistration> {
        self.image
            .brokers
            .values()
            .filter(|b| !b.fenced && !b.shutting_down)
            .collect()
    }

    fn broker(&self, id: BrokerId, epoch: u64) -> Result<&BrokerRegistration, MetadataError> {
        let b = self
            .image
            .brokers
            .get(&id)
            .ok_or(MetadataError::UnknownBroker(id))?;
        if b.epoch != epoch {
            return Err(MetadataError::StaleBrokerEpoch {
                broker_id: id,
                given: epoch,
                current: b.epoch,
            });
        }
        Ok(b)
    }

    /// Takes `gone` out of every ISR and elects new leaders where it led.
    fn evict(&mut self, gone: BrokerId) {
        let available: BTreeSet<BrokerId> = self
            .image
            .brokers
            .values()
            .filter(|b| b.broker_id != gone && !b.fenced && !b.shutting_down)
            .map(|b| b.broker_id)
            .collect();
        for topic in self.image.topics.values_mut() {
            let unclean = topic.unclean_election();
            for p in &mut topic.partitions {
                let before = p.clone();
                if p.isr.contains(&gone) && p.isr.len() > 1 {
                    p.isr.retain(|r| *r != gone);
                }
                if p.leader == Some(gone) || p.leader.is_none() {
                    p.leader = p
                        .replicas
                        .iter()
                        .copied()
                        .find(|r| p.isr.contains(r) && available.contains(r));
                    if p.leader.is_none() && unclean {
                        p.leader = p.replicas.iter().copied().find(|r| available.contains(r));
                        if let Some(l) = p.leader {
                            p.isr = vec![l];
                        }
                    }
                }
                bump(&before, p);
            }
        }
    }

    /// `back` is live again: it rejoins the ISR of its partitions (this plane has no data path,
    /// so a live replica counts as in sync) and leads partitions that had no leader.
    fn readmit(&mut self, back: BrokerId) {
        for topic in self.image.topics.values_mut() {
            for p in &mut topic.partitions {
                if !p.replicas.contains(&back) {
                    continue;
                }
                let before = p.clone();
                if !p.isr.contains(&back) {
                    p.isr.push(back);
                    let order = p.replicas.clone();
                    p.isr.sort_by_key(|r| order.iter().position(|x| x == r));
                }
                if p.leader.is_none() {
                    p.leader = Some(back);
                }
                bump(&before, p);
            }
        }
    }

    fn apply_command(&mut self, index: u64, cmd: &MetadataCommand) -> MetadataResponse {
        match self.try_apply(index, cmd) {
            Ok(r) => r,
            Err(e) => MetadataResponse::Error(e),
        }
    }

    fn try_apply(
        &mut self,
        index: u64,
        cmd: &MetadataCommand,
    ) -> Result<MetadataResponse, MetadataError> {
        use MetadataCommand as C;
        match cmd {
            C::RegisterBroker {
                broker_id,
                incarnation,
                endpoints,
                rack,
            } => {
                if let Some(b) = self.image.brokers.get(broker_id) {
                    if b.incarnation == *incarnation {
                        return Ok(MetadataResponse::Registered { epoch: b.epoch });
                    }
                    // A restarted process: whatever the old one held is given up first.
                    let id = *broker_id;
                    if let Some(b) = self.image.brokers.get_mut(&id) {
                        b.fenced = true;
                    }
                    self.evict(id);
                }
                self.image.brokers.insert(
                    *broker_id,
                    BrokerRegistration {
                        broker_id: *broker_id,
                        incarnation: *incarnation,
                        epoch: index,
                        endpoints: endpoints.clone(),
                        rack: rack.clone(),
                        fenced: true,
                        shutting_down: false,
                        last_heartbeat_offset: index,
                    },
                );
                Ok(MetadataResponse::Registered { epoch: index })
            }
            C::UnregisterBroker { broker_id } => {
                if !self.image.brokers.contains_key(broker_id) {
                    return Err(MetadataError::UnknownBroker(*broker_id));
                }
                if let Some(b) = self.image.brokers.get_mut(broker_id) {
                    b.fenced = true;
                }
                self.evict(*broker_id);
                self.image.brokers.remove(broker_id);
                Ok(MetadataResponse::Ok)
            }
            C::Heartbeat {
                broker_id,
                epoch,
                metadata_offset,
            } => {
                let b = self.broker(*broker_id, *epoch)?;
                let unfence = b.fenced && !b.shutting_down && *metadata_offset >= b.epoch;
                if let Some(b) = self.image.brokers.get_mut(broker_id) {
                    b.last_heartbeat_offset = index;
                    if unfence {
                        b.fenced = false;
                    }
                }
                if unfence {
                    self.readmit(*broker_id);
                }
                Ok(MetadataResponse::Ok)
            }
            C::FenceBroker { broker_id, epoch } => {
                self.broker(*broker_id, *epoch)?;
                if let Some(b) = self.image.brokers.get_mut(broker_id) {
                    b.fenced = true;
                }
                self.evict(*broker_id);
                Ok(MetadataResponse::Ok)
            }
            C::BeginControlledShutdown { broker_id, epoch } => {
                self.broker(*broker_id, *epoch)?;
                if let Some(b) = self.image.brokers.get_mut(broker_id) {
                    b.shutting_down = true;
                }
                self.evict(*broker_id);
                Ok(MetadataResponse::Ok)
            }
            C::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => {
                valid_topic_name(name)?;
                if self.image.topics.contains_key(name) {
                    return Err(MetadataError::DuplicateTopic(name.clone()));
                }
                if *partitions == 0 || *partitions > MAX_PARTITIONS {
                    return Err(MetadataError::InvalidPartitions(format!(
                        "{partitions} (must be 1..={MAX_PARTITIONS})"
                    )));
                }
                let live: Vec<(BrokerId, Option<String>)> = self
                    .unfenced()
                    .iter()
                    .map(|b| (b.broker_id, b.rack.clone()))
                    .collect();
                if *replication_factor == 0 || usize::from(*replication_factor) > live.len() {
                    return Err(MetadataError::InvalidReplicationFactor {
                        requested: *replication_factor,
                        available: live.len(),
                    });
                }
                let assignment: Vec<Vec<BrokerId>> = (0..*partitions)
                    .map(|p| place(&live, index, p, usize::from(*replication_factor)))
                    .collect();
                let topic = Topic {
                    id: index,
                    name: name.clone(),
                    partitions: assignment
                        .iter()
                        .map(|replicas| PartitionState {
                            replicas: replicas.clone(),
                            isr: replicas.clone(),
                            leader: replicas.first().copied(),
                            leader_epoch: 0,
                            partition_epoch: 0,
                        })
                        .collect(),
                    configs: configs.clone(),
                };
                self.image.topics.insert(name.clone(), topic);
                Ok(MetadataResponse::TopicCreated {
                    topic_id: index,
                    assignment,
                })
            }
            C::CreatePartitions { name, total } => {
                let live: Vec<(BrokerId, Option<String>)> = self
                    .unfenced()
                    .iter()
                    .map(|b| (b.broker_id, b.rack.clone()))
                    .collect();
                let topic = self
                    .image
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| MetadataError::UnknownTopic(name.clone()))?;
                let current = topic.partitions.len() as u32;
                if *total <= current || *total > MAX_PARTITIONS {
                    return Err(MetadataError::InvalidPartitions(format!(
                        "{total} (must exceed the current {current} and be at most {MAX_PARTITIONS})"
                    )));
                }
                let rf = topic
                    .partitions
                    .first()
                    .map(|p| p.replicas.len())
                    .unwrap_or(1);
                if rf > live.len() {
                    return Err(MetadataError::InvalidReplicationFactor {
                        requested: rf as u16,
                        available: live.len(),
                    });
                }
                for p in current..*total {
                    let replicas = place(&live, topic.id, p, rf);
                    topic.partitions.push(PartitionState {
                        isr: replicas.clone(),
                        leader: replicas.first().copied(),
                        replicas,
                        leader_epoch: 0,
                        partition_epoch: 0,
                    });
                }
                Ok(MetadataResponse::Ok)
            }
            C::DeleteTopic { name } => {
                self.image
                    .topics
                    .remove(name)
                    .ok_or_else(|| MetadataError::UnknownTopic(name.clone()))?;
                Ok(MetadataResponse::Ok)
            }
            C::ChangePartition {
                topic,
                partition,
                partition_epoch,
                leader,
                isr,
            } => {
                let available: BTreeSet<BrokerId> =
                    self.unfenced().iter().map(|b| b.broker_id).collect();
                let t = self
                    .image
                    .topics
                    .get_mut(topic)
                    .ok_or_else(|| MetadataError::UnknownTopic(topic.clone()))?;
                let p = t.partitions.get_mut(*partition as usize).ok_or_else(|| {
                    MetadataError::UnknownPartition {
                        topic: topic.clone(),
                        partition: *partition,
                    }
                })?;
                if p.partition_epoch != *partition_epoch {
                    return Err(MetadataError::StalePartitionEpoch {
                        topic: topic.clone(),
                        partition: *partition,
                        given: *partition_epoch,
                        current: p.partition_epoch,
                    });
                }
                let unique: BTreeSet<&BrokerId> = isr.iter().collect();
                if isr.is_empty() || unique.len() != isr.len() {
                    return Err(MetadataError::Invalid(
                        "the ISR must be non-empty and without duplicates".into(),
                    ));
                }
                if let Some(r) = isr.iter().find(|r| !p.replicas.contains(r)) {
                    return Err(MetadataError::Invalid(format!(
                        "broker {r} is not a replica of {topic}-{partition}"
                    )));
                }
                if let Some(l) = leader {
                    if !isr.contains(l) {
                        return Err(MetadataError::Invalid(format!(
                            "leader {l} is not in the new ISR"
                        )));
                    }
                    if !available.contains(l) {
                        return Err(MetadataError::Invalid(format!(
                            "leader {l} is fenced or unknown"
                        )));
                    }
                }
                let before = p.clone();
                p.isr = isr.clone();
                p.leader = *leader;
                bump(&before, p);
                if *p == before {
                    // Nothing changed, still a successful CAS: the epoch moves so a second
                    // writer with the same view fails.
                    p.partition_epoch += 1;
                }
                Ok(MetadataResponse::Ok)
            }
            C::AlterTopicConfig { name, set, remove } => {
                if set.keys().chain(remove.iter()).any(|k| k.is_empty()) {
                    return Err(MetadataError::Invalid(
                        "config names must not be empty".into(),
                    ));
                }
                let t = self
                    .image
                    .topics
                    .get_mut(name)
                    .ok_or_else(|| MetadataError::UnknownTopic(name.clone()))?;
                for k in remove {
                    t.configs.remove(k);
                }
                for (k, v) in set {
                    t.configs.insert(k.clone(), v.clone());
                }
                Ok(MetadataResponse::Ok)
            }
        }
    }
}

/// Moves the epochs of a partition that changed: the leader epoch on a leader change, the
/// partition epoch on any change.
fn bump(before: &PartitionState, p: &mut PartitionState) {
    if p.leader != before.leader {
        p.leader_epoch = before.leader_epoch + 1;
    }
    if p.leader != before.leader || p.isr != before.isr {
        p.partition_epoch = before.partition_epoch + 1;
    }
}

impl StateMachine for MetadataMachine {
    type Command = MetadataCommand;
    type Response = MetadataResponse;

    fn apply(&mut self, index: u64, command: MetadataCommand) -> MetadataResponse {
        let before_brokers = matches!(command, MetadataCommand::Heartbeat { .. }).then(|| {
            self.image
                .brokers
                .get(&heartbeat_id(&command))
                .map(|b| b.fenced)
        });
        let response = self.apply_command(index, &command);
        self.image.offset = index;
        // A heartbeat that changed nothing but the liveness offset stays out of the feed.
        let quiet_heartbeat = before_brokers.is_some_and(|fenced_before| {
            let fenced_now = self
                .image
                .brokers
                .get(&heartbeat_id(&command))
                .map(|b| b.fenced);
            fenced_before == fenced_now
        });
        if !quiet_heartbeat {
            if self.feed.len() == FEED_CAPACITY {
                if let Some(old) = self.feed.pop_front() {
                    self.feed_floor = old.offset;
                }
            }
            self.feed.push_back(MetadataChange {
                offset: index,
                command,
                response: response.clone(),
            });
        }
        response
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        codec::encode(&self.image).map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.image = codec::decode(snapshot).map_err(|e| e.to_string())?;
        self.feed.clear();
        self.feed_floor = self.image.offset;
        Ok(())
    }
}

fn heartbeat_id(c: &MetadataCommand) -> BrokerId {
    match c {
        MetadataCommand::Heartbeat { broker_id, .. } => *broker_id,
        _ => BrokerId::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct M {
        m: MetadataMachine,
        next: u64,
    }

    impl M {
        fn new() -> Self {
            Self {
                m: MetadataMachine::default(),
                next: 1,
            }
        }
        fn apply(&mut self, c: MetadataCommand) -> MetadataResponse {
            let i = self.next;
            self.next += 1;
            self.m.apply(i, c)
        }
        fn ok(&mut self, c: MetadataCommand) -> MetadataResponse {
            let r = self.apply(c.clone());
            assert!(
                !matches!(r, MetadataResponse::Error(_)),
                "{c:?} refused: {r:?}"
            );
            r
        }
        fn err(&mut self, c: MetadataCommand) -> MetadataError {
            let before = self.m.image.clone();
            match self.apply(c) {
                MetadataResponse::Error(e) => {
                    let mut after = self.m.image.clone();
                    after.offset = before.offset;
                    assert_eq!(after, before, "a refused record changed the image");
                    e
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        /// Registers and unfences brokers with racks; returns their epochs.
        fn live(&mut self, brokers: &[(BrokerId, &str)]) -> BTreeMap<BrokerId, u64> {
            let mut epochs = BTreeMap::new();
            for (id, rack) in brokers {
                let MetadataResponse::Registered { epoch } =
                    self.ok(MetadataCommand::RegisterBroker {
                        broker_id: *id,
                        incarnation: 100 + u64::from(*id),
                        endpoints: vec![format!("b{id}:9092")],
                        rack: Some(rack.to_string()),
                    })
                else {
                    panic!("not registered")
                };
                self.ok(MetadataCommand::Heartbeat {
                    broker_id: *id,
                    epoch,
                    metadata_offset: epoch,
                });
                epochs.insert(*id, epoch);
            }
            epochs
        }
        fn topic(&mut self, name: &str, partitions: u32, rf: u16) -> Vec<Vec<BrokerId>> {
            match self.ok(create(name, partitions, rf)) {
                MetadataResponse::TopicCreated { assignment, .. } => assignment,
                other => panic!("{other:?}"),
            }
        }
        fn partition(&self, t: &str, p: usize) -> PartitionState {
            self.m.image.topics[t].partitions[p].clone()
        }
    }

    fn create(name: &str, partitions: u32, rf: u16) -> MetadataCommand {
        MetadataCommand::CreateTopic {
            name: name.into(),
            partitions,
            replication_factor: rf,
            configs: BTreeMap::new(),
        }
    }

    #[test]
    fn a_broker_is_unfenced_once_caught_up_to_its_registration() {
        let mut m = M::new();
        let MetadataResponse::Registered { epoch } = m.ok(MetadataCommand::RegisterBroker {
            broker_id: 1,
            incarnation: 7,
            endpoints: vec![],
            rack: None,
        }) else {
            panic!()
        };
        assert!(m.m.image.brokers[&1].fenced);
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: epoch - 1,
        });
        assert!(m.m.image.brokers[&1].fenced, "not caught up yet");
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: epoch,
        });
        assert!(!m.m.image.brokers[&1].fenced);
        // Same incarnation again: same epoch, nothing changes.
        assert_eq!(
            m.ok(MetadataCommand::RegisterBroker {
                broker_id: 1,
                incarnation: 7,
                endpoints: vec![],
                rack: None,
            }),
            MetadataResponse::Registered { epoch }
        );
        assert!(!m.m.image.brokers[&1].fenced);
        // A new incarnation: new epoch, fenced, and the old epoch is stale.
        m.ok(MetadataCommand::RegisterBroker {
            broker_id: 1,
            incarnation: 8,
            endpoints: vec![],
            rack: None,
        });
        let e = m.err(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: 99,
        });
        assert!(matches!(e, MetadataError::StaleBrokerEpoch { .. }), "{e}");
    }

    #[test]
    fn topics_get_valid_rack_aware_assignments() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        let a = m.topic("orders", 6, 3);
        assert_eq!(a.len(), 6);
        for (p, replicas) in a.iter().enumerate() {
            let mut uniq = replicas.clone();
            uniq.sort_unstable();
            uniq.dedup();
            assert_eq!(uniq, vec![1, 2, 3], "partition {p}: {replicas:?}");
            let st = m.partition("orders", p);
            assert_eq!(st.leader, Some(replicas[0]));
            assert_eq!(&st.isr, replicas);
        }
        let leaders: std::collections::BTreeSet<_> = a.iter().map(|r| r[0]).collect();
        assert_eq!(leaders.len(), 3, "leaders spread over the brokers");
    }

    #[test]
    fn bad_topic_requests_change_nothing() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 1);
        assert!(matches!(
            m.err(create("t", 1, 1)),
            MetadataError::DuplicateTopic(_)
        ));
        assert!(matches!(
            m.err(create("u", 0, 1)),
            MetadataError::InvalidPartitions(_)
        ));
        assert!(matches!(
            m.err(create("u", 1, 3)),
            MetadataError::InvalidReplicationFactor {
                requested: 3,
                available: 2
            }
        ));
        assert!(matches!(
            m.err(create("bad name", 1, 1)),
            MetadataError::Invalid(_)
        ));
        assert!(matches!(
            m.err(MetadataCommand::DeleteTopic {
                name: "nope".into()
            }),
            MetadataError::UnknownTopic(_)
        ));
        assert!(matches!(
            m.err(MetadataCommand::FenceBroker {
                broker_id: 9,
                epoch: 1
            }),
            MetadataError::UnknownBroker(9)
        ));
    }

    #[test]
    fn fencing_a_leader_elects_from_the_isr() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        let a = m.topic("t", 3, 3);
        let victim = a[0][0];
        let stale = m.err(MetadataCommand::FenceBroker {
            broker_id: victim,
            epoch: epochs[&victim] + 100,
        });
        assert!(matches!(stale, MetadataError::StaleBrokerEpoch { .. }));
        m.ok(MetadataCommand::FenceBroker {
            broker_id: victim,
            epoch: epochs[&victim],
        });
        for p in 0..3 {
            let st = m.partition("t", p);
            assert!(!st.isr.contains(&victim), "{st:?}");
            assert_ne!(st.leader, Some(victim));
            assert!(st.leader.is_some_and(|l| st.isr.contains(&l)));
        }
        let st = m.partition("t", 0);
        assert_eq!(st.leader_epoch, 1);
        assert_eq!(st.partition_epoch, 1);
        // Back: rejoins the ISRs.
        m.ok(MetadataCommand::Heartbeat {
            broker_id: victim,
            epoch: epochs[&victim],
            metadata_offset: 1000,
        });
        assert!(m.partition("t", 0).isr.contains(&victim));
    }

    #[test]
    fn the_last_isr_member_leaves_the_partition_offline_unless_unclean() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        let st = m.partition("t", 0);
        let (first, second) = (st.replicas[0], st.replicas[1]);
        m.ok(MetadataCommand::FenceBroker {
            broker_id: first,
            epoch: epochs[&first],
        });
        m.ok(MetadataCommand::FenceBroker {
            broker_id: second,
            epoch: epochs[&second],
        });
        let st = m.partition("t", 0);
        assert_eq!(st.leader, None);
        assert_eq!(st.isr, vec![second], "the last ISR member stays in the ISR");
        // With unclean election allowed, an out-of-sync live replica may lead instead.
        let mut m2 = M::new();
        let epochs = m2.live(&[(1, "a"), (2, "b"), (3, "c")]);
        m2.ok(MetadataCommand::CreateTopic {
            name: "u".into(),
            partitions: 1,
            replication_factor: 2,
            configs: BTreeMap::from([(
                "unclean.leader.election.enable".to_string(),
                "true".to_string(),
            )]),
        });
        let st = m2.partition("u", 0);
        let (a, b) = (st.replicas[0], st.replicas[1]);
        m2.ok(MetadataCommand::ChangePartition {
            topic: "u".into(),
            partition: 0,
            partition_epoch: st.partition_epoch,
            leader: Some(a),
            isr: vec![a],
        });
        m2.ok(MetadataCommand::FenceBroker {
            broker_id: a,
            epoch: epochs[&a],
        });
        let st = m2.partition("u", 0);
        assert_eq!(
            st.leader,
            Some(b),
            "unclean election picked the live replica"
        );
        assert_eq!(st.isr, vec![b]);
    }

    #[test]
    fn partition_changes_are_compare_and_set() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        m.topic("t", 1, 3);
        let st = m.partition("t", 0);
        let change = |epoch, leader, isr: Vec<BrokerId>| MetadataCommand::ChangePartition {
            topic: "t".into(),
            partition: 0,
            partition_epoch: epoch,
            leader,
            isr,
        };
        let new_leader = st.replicas[1];
        m.ok(change(0, Some(new_leader), st.replicas.clone()));
        let e = m.err(change(0, Some(st.replicas[2]), st.replicas.clone()));
        assert!(
            matches!(
                e,
                MetadataError::StalePartitionEpoch {
                    given: 0,
                    current: 1,
                    ..
                }
            ),
            "{e}"
        );
        let e = m.err(change(1, Some(st.replicas[0]), vec![st.replicas[1]]));
        assert!(
            matches!(e, MetadataError::Invalid(_)),
            "leader outside the ISR: {e}"
        );
        let e = m.err(change(1, None, vec![42]));
        assert!(matches!(e, MetadataError::Invalid(_)), "not a replica: {e}");
        let after = m.partition("t", 0);
        assert_eq!(
            (after.leader, after.leader_epoch, after.partition_epoch),
            (Some(new_leader), 1, 1)
        );
    }

    #[test]
    fn the_feed_is_ordered_and_restores_from_the_image() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 2, 2);
        // A heartbeat that changes nothing stays out of the feed.
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch: epochs[&1],
            metadata_offset: 50,
        });
        let feed = m.m.changes_since(0, 100).expect("feed");
        let offsets: Vec<u64> = feed.iter().map(|c| c.offset).collect();
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        assert_eq!(offsets, sorted);
        assert_eq!(
            feed.len(),
            5,
            "2 registrations, 2 unfencing heartbeats, 1 topic"
        );
        let tail = m.m.changes_since(offsets[2], 100).expect("tail");
        assert_eq!(tail.len(), 2);
        let snap = m.m.snapshot().expect("snapshot");
        let mut r = MetadataMachine::default();
        r.restore(&snap).expect("restore");
        assert_eq!(r.image(), m.m.image());
        assert!(
            r.changes_since(0, 10).is_err(),
            "older changes are gone after a restore"
        );
        assert_eq!(
            r.changes_since(r.image().offset, 10)
                .expect("from the image"),
            vec![]
        );
    }
}
