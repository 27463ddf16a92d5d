//! Partition leadership and ISR: compare-and-set changes, leader election when a broker goes
//! away or comes back, and the epochs that let readers tell one state from the next.
//!
//! - The leader epoch moves on every leader change, the partition epoch on any change of leader
//!   or ISR ([`bump`]). A [`MetadataCommand::ChangePartition`] names the partition epoch it was
//!   computed from, and is refused once that epoch is stale.
//! - A broker that goes away leaves every ISR it is in, except as the last member (the last
//!   in-sync replica is the one that must lead when the partition comes back). Partitions it led
//!   elect the first replica that is in the ISR and available; if none is and the topic allows
//!   unclean election, the first available replica leads with an ISR of itself.
//! - A broker that is unfenced rejoins the ISR of its partitions that have a leader (this plane
//!   has no data path, so a live replica with a leader to follow counts as in sync). An offline
//!   partition comes back only through its last ISR member, which leads again (and the other
//!   live replicas rejoin its ISR); an out-of-sync replica leads it only with unclean election
//!   allowed, as Kafka does: otherwise it could lead without the last acknowledged writes.

use std::collections::BTreeSet;

use super::brokers;
use crate::model::*;

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

/// Takes `gone` out of every ISR and elects new leaders where it led.
pub(super) fn evict(image: &mut MetadataImage, gone: BrokerId) {
    let available: BTreeSet<BrokerId> = brokers::available(image)
        .filter(|b| b.broker_id != gone)
        .map(|b| b.broker_id)
        .collect();
    for topic in image.topics.values_mut() {
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

/// `back` is live again: partitions with a leader take it into their ISR (in replica order);
/// an offline partition is led by it only if it is in the ISR (the last member) or the topic
/// allows unclean election, and then every available replica rejoins the ISR.
pub(super) fn readmit(image: &mut MetadataImage, back: BrokerId) {
    let available: BTreeSet<BrokerId> = brokers::available(image).map(|b| b.broker_id).collect();
    for topic in image.topics.values_mut() {
        let unclean = topic.unclean_election();
        for p in &mut topic.partitions {
            if !p.replicas.contains(&back) {
                continue;
            }
            let before = p.clone();
            let joining: Vec<BrokerId> = if p.leader.is_some() {
                vec![back]
            } else if p.isr.contains(&back) {
                p.leader = Some(back);
                p.replicas.clone()
            } else if unclean {
                p.leader = Some(back);
                p.isr = vec![back];
                p.replicas.clone()
            } else {
                // Offline until its last in-sync replica returns.
                Vec::new()
            };
            for r in joining {
                if available.contains(&r) && !p.isr.contains(&r) {
                    p.isr.push(r);
                }
            }
            let order = p.replicas.clone();
            p.isr.sort_by_key(|r| order.iter().position(|x| x == r));
            bump(&before, p);
        }
    }
}

/// The check of [`elect_preferred`]: every named topic exists.
pub(super) fn check_elect_preferred(
    image: &MetadataImage,
    topics: &[String],
) -> Result<(), MetadataError> {
    match topics.iter().find(|t| !image.topics.contains_key(*t)) {
        Some(t) => Err(MetadataError::UnknownTopic(t.clone())),
        None => Ok(()),
    }
}

/// [`MetadataCommand::ElectPreferredLeaders`]: partitions of `topics` (every topic when empty)
/// whose first replica is in the ISR and available, but does not lead, are led by it again.
pub(super) fn elect_preferred(
    image: &mut MetadataImage,
    topics: &[String],
) -> Result<MetadataResponse, MetadataError> {
    check_elect_preferred(image, topics)?;
    let available: BTreeSet<BrokerId> = brokers::available(image).map(|b| b.broker_id).collect();
    let mut moved = 0;
    for (name, topic) in image.topics.iter_mut() {
        if !topics.is_empty() && !topics.contains(name) {
            continue;
        }
        for p in &mut topic.partitions {
            let Some(&preferred) = p.replicas.first() else {
                continue;
            };
            if p.leader != Some(preferred)
                && p.isr.contains(&preferred)
                && available.contains(&preferred)
            {
                let before = p.clone();
                p.leader = Some(preferred);
                bump(&before, p);
                moved += 1;
            }
        }
    }
    Ok(MetadataResponse::LeadersElected { moved })
}

/// [`MetadataCommand::ChangePartition`]: sets the leader and ISR if `partition_epoch` is
/// current, the ISR is a non-empty set of replicas and the leader is an available ISR member.
pub(super) fn change_partition(
    image: &mut MetadataImage,
    topic: &str,
    partition: u32,
    partition_epoch: u64,
    leader: Option<BrokerId>,
    isr: &[BrokerId],
) -> Result<MetadataResponse, MetadataError> {
    let available: BTreeSet<BrokerId> = brokers::available(image).map(|b| b.broker_id).collect();
    let t = image
        .topics
        .get_mut(topic)
        .ok_or_else(|| MetadataError::UnknownTopic(topic.to_string()))?;
    let p = t.partitions.get_mut(partition as usize).ok_or_else(|| {
        MetadataError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        }
    })?;
    if p.partition_epoch != partition_epoch {
        return Err(MetadataError::StalePartitionEpoch {
            topic: topic.to_string(),
            partition,
            given: partition_epoch,
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
        if !isr.contains(&l) {
            return Err(MetadataError::Invalid(format!(
                "leader {l} is not in the new ISR"
            )));
        }
        if !available.contains(&l) {
            return Err(MetadataError::Invalid(format!(
                "leader {l} is fenced or unknown"
            )));
        }
    }
    let before = p.clone();
    p.isr = isr.to_vec();
    p.leader = leader;
    bump(&before, p);
    if *p == before {
        // Nothing changed, still a successful CAS: the epoch moves so a second
        // writer with the same view fails.
        p.partition_epoch += 1;
    }
    Ok(MetadataResponse::Ok)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::testing::M;
    use super::*;

    fn state(leader: Option<BrokerId>, isr: Vec<BrokerId>) -> PartitionState {
        PartitionState {
            replicas: vec![1, 2, 3],
            isr,
            leader,
            leader_epoch: 4,
            partition_epoch: 9,
        }
    }

    #[test]
    fn a_leader_change_moves_both_epochs_an_isr_change_only_the_partition_epoch() {
        let before = state(Some(1), vec![1, 2, 3]);
        let mut p = state(Some(2), vec![1, 2, 3]);
        bump(&before, &mut p);
        assert_eq!((p.leader_epoch, p.partition_epoch), (5, 10));
        let mut p = state(Some(1), vec![1, 2]);
        bump(&before, &mut p);
        assert_eq!((p.leader_epoch, p.partition_epoch), (4, 10));
        let mut p = before.clone();
        bump(&before, &mut p);
        assert_eq!(p, before, "no change, no epoch moves");
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
            metadata_offset: m.caught_up(),
        });
        assert!(m.partition("t", 0).isr.contains(&victim));
    }

    #[test]
    fn a_readmitted_replica_rejoins_the_isr_in_replica_order_and_leads_a_leaderless_partition() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        let replicas = m.partition("t", 0).replicas;
        let (first, second) = (replicas[0], replicas[1]);
        // The first replica leaves, then the second: offline, the second is the last ISR member.
        m.fence(&[first, second], &epochs);
        assert_eq!(m.partition("t", 0).leader, None);
        assert_eq!(m.partition("t", 0).isr, vec![second]);
        // The first one back is out of sync: without unclean election it does not lead.
        m.ok(MetadataCommand::Heartbeat {
            broker_id: first,
            epoch: epochs[&first],
            metadata_offset: m.caught_up(),
        });
        let st = m.partition("t", 0);
        assert_eq!(st.leader, None, "an out-of-ISR replica led: {st:?}");
        assert_eq!(
            st.isr,
            vec![second],
            "an offline partition's ISR took it in"
        );
        // The last in-sync replica returns: it leads, and the live first one rejoins.
        m.ok(MetadataCommand::Heartbeat {
            broker_id: second,
            epoch: epochs[&second],
            metadata_offset: m.caught_up(),
        });
        let st = m.partition("t", 0);
        assert_eq!(st.leader, Some(second), "the last ISR member leads again");
        assert_eq!(st.isr, replicas, "the ISR keeps the replica order");
    }

    #[test]
    fn an_out_of_sync_replica_leads_an_offline_partition_on_unfence_only_with_unclean_election() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        m.ok(MetadataCommand::AlterTopicConfig {
            name: "t".into(),
            set: [(
                "unclean.leader.election.enable".to_string(),
                "true".to_string(),
            )]
            .into(),
            remove: vec![],
        });
        let replicas = m.partition("t", 0).replicas;
        let (first, second) = (replicas[0], replicas[1]);
        m.fence(&[first, second], &epochs);
        // Fencing the second left no available replica: still offline, ISR [second].
        assert_eq!(m.partition("t", 0).leader, None);
        m.ok(MetadataCommand::Heartbeat {
            broker_id: first,
            epoch: epochs[&first],
            metadata_offset: m.caught_up(),
        });
        let st = m.partition("t", 0);
        assert_eq!(st.leader, Some(first), "unclean election lets it lead");
        assert_eq!(st.isr, vec![first]);
    }

    #[test]
    fn preferred_leader_election_moves_leadership_back_to_the_first_live_in_sync_replica() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        m.topic("t", 3, 3);
        m.topic("u", 1, 3);
        // Every partition's preferred leader leaves and comes back: leaders are skewed.
        let preferred: Vec<BrokerId> = (0..3).map(|p| m.partition("t", p).replicas[0]).collect();
        for id in [1, 2, 3] {
            m.ok(MetadataCommand::FenceBroker {
                broker_id: id,
                epoch: epochs[&id],
            });
            m.ok(MetadataCommand::Heartbeat {
                broker_id: id,
                epoch: epochs[&id],
                metadata_offset: m.caught_up(),
            });
        }
        let skewed = (0..3)
            .filter(|p| m.partition("t", *p).leader != Some(preferred[*p]))
            .count();
        assert!(skewed > 0, "the test needs skewed leaders");
        assert!(matches!(
            m.err(MetadataCommand::ElectPreferredLeaders {
                topics: vec!["t".into(), "missing".into()],
            }),
            MetadataError::UnknownTopic(_)
        ));
        let before_u = m.partition("u", 0);
        let r = m.ok(MetadataCommand::ElectPreferredLeaders {
            topics: vec!["t".into()],
        });
        assert_eq!(
            r,
            MetadataResponse::LeadersElected {
                moved: skewed as u64
            }
        );
        for (p, want) in preferred.iter().enumerate() {
            assert_eq!(m.partition("t", p).leader, Some(*want), "partition {p}");
        }
        assert_eq!(m.partition("u", 0), before_u, "only the named topic moved");
        // Nothing left to move: a second election moves nothing.
        let r = m.ok(MetadataCommand::ElectPreferredLeaders { topics: vec![] });
        let moved_u = u64::from(before_u.leader != Some(before_u.replicas[0]));
        assert_eq!(r, MetadataResponse::LeadersElected { moved: moved_u });
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
    fn an_unchanged_partition_change_still_moves_the_partition_epoch() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        let st = m.partition("t", 0);
        let same = MetadataCommand::ChangePartition {
            topic: "t".into(),
            partition: 0,
            partition_epoch: st.partition_epoch,
            leader: st.leader,
            isr: st.isr.clone(),
        };
        m.ok(same.clone());
        let after = m.partition("t", 0);
        assert_eq!(after.partition_epoch, st.partition_epoch + 1);
        assert_eq!(after.leader_epoch, st.leader_epoch);
        // A second writer with the same view now fails.
        assert!(matches!(
            m.err(same),
            MetadataError::StalePartitionEpoch { .. }
        ));
    }
}
