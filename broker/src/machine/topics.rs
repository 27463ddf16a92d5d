//! Topic records: create and delete topics, grow their partitions, alter their configs.
//!
//! Replicas are placed by [`place`] on the available brokers (not fenced, not shutting down),
//! seeded by the topic id (the offset of the record that created it), so every node computes
//! the same assignment. A new partition starts with all its replicas in the ISR and the first
//! one leading, at epoch 0.

use std::collections::BTreeMap;

use super::brokers;
use crate::configs;
use crate::model::*;
use crate::placement::place;

/// Largest partition count of a topic.
pub(super) const MAX_PARTITIONS: u32 = 10_000;

/// Brokers replicas may be placed on, with their racks.
type Candidates = Vec<(BrokerId, Option<String>)>;

/// The brokers replicas may be placed on, with their racks.
fn placement_candidates(image: &MetadataImage) -> Candidates {
    brokers::available(image)
        .map(|b| (b.broker_id, b.rack.clone()))
        .collect()
}

/// A new partition on `replicas`: all in sync, the first one leading.
fn new_partition(replicas: Vec<BrokerId>) -> PartitionState {
    PartitionState {
        isr: replicas.clone(),
        leader: replicas.first().copied(),
        replicas,
        leader_epoch: 0,
        partition_epoch: 0,
    }
}

/// The checks of [`create_topic`]; returns the brokers replicas may be placed on.
pub(super) fn check_create_topic(
    image: &MetadataImage,
    name: &str,
    partitions: u32,
    replication_factor: u16,
    configs: &BTreeMap<String, String>,
) -> Result<Candidates, MetadataError> {
    check_topic_name(name)?;
    if image.topics.contains_key(name) {
        return Err(MetadataError::DuplicateTopic(name.to_string()));
    }
    if partitions == 0 || partitions > MAX_PARTITIONS {
        return Err(MetadataError::InvalidPartitions(format!(
            "{partitions} (must be 1..={MAX_PARTITIONS})"
        )));
    }
    let live = placement_candidates(image);
    if replication_factor == 0 || usize::from(replication_factor) > live.len() {
        return Err(MetadataError::InvalidReplicationFactor {
            requested: replication_factor,
            available: live.len(),
        });
    }
    configs::check_all(configs)?;
    Ok(live)
}

/// [`MetadataCommand::CreateTopic`]: a topic with id `index`, `partitions` partitions of
/// `replication_factor` replicas each.
pub(super) fn create_topic(
    image: &mut MetadataImage,
    index: u64,
    name: &str,
    partitions: u32,
    replication_factor: u16,
    configs: &BTreeMap<String, String>,
) -> Result<MetadataResponse, MetadataError> {
    let live = check_create_topic(image, name, partitions, replication_factor, configs)?;
    let assignment: Vec<Vec<BrokerId>> = (0..partitions)
        .map(|p| place(&live, index, p, usize::from(replication_factor)))
        .collect();
    let topic = Topic {
        id: index,
        name: name.to_string(),
        partitions: assignment.iter().cloned().map(new_partition).collect(),
        configs: configs.clone(),
    };
    image.topics.insert(name.to_string(), topic);
    Ok(MetadataResponse::TopicCreated {
        topic_id: index,
        assignment,
    })
}

/// The checks of [`create_partitions`]; returns the placement candidates, the replication
/// factor and the current partition count.
pub(super) fn check_create_partitions(
    image: &MetadataImage,
    name: &str,
    total: u32,
) -> Result<(Candidates, usize, u32), MetadataError> {
    let topic = image
        .topics
        .get(name)
        .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
    let current = topic.partitions.len() as u32;
    if total <= current || total > MAX_PARTITIONS {
        return Err(MetadataError::InvalidPartitions(format!(
            "{total} (must exceed the current {current} and be at most {MAX_PARTITIONS})"
        )));
    }
    let rf = topic
        .partitions
        .first()
        .map(|p| p.replicas.len())
        .unwrap_or(1);
    let live = placement_candidates(image);
    if rf > live.len() {
        return Err(MetadataError::InvalidReplicationFactor {
            requested: rf as u16,
            available: live.len(),
        });
    }
    Ok((live, rf, current))
}

/// [`MetadataCommand::CreatePartitions`]: grows the topic to `total` partitions with the
/// replication factor of its first partition.
pub(super) fn create_partitions(
    image: &mut MetadataImage,
    name: &str,
    total: u32,
) -> Result<MetadataResponse, MetadataError> {
    let (live, rf, current) = check_create_partitions(image, name, total)?;
    let topic = image
        .topics
        .get_mut(name)
        .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
    for p in current..total {
        topic
            .partitions
            .push(new_partition(place(&live, topic.id, p, rf)));
    }
    Ok(MetadataResponse::Ok)
}

/// The check of [`delete_topic`].
pub(super) fn check_delete_topic(image: &MetadataImage, name: &str) -> Result<(), MetadataError> {
    if image.topics.contains_key(name) {
        Ok(())
    } else {
        Err(MetadataError::UnknownTopic(name.to_string()))
    }
}

/// [`MetadataCommand::DeleteTopic`].
pub(super) fn delete_topic(
    image: &mut MetadataImage,
    name: &str,
) -> Result<MetadataResponse, MetadataError> {
    check_delete_topic(image, name)?;
    image.topics.remove(name);
    Ok(MetadataResponse::Ok)
}

/// The checks of [`alter_topic_config`]; returns the topic's configs after the change.
pub(super) fn check_alter_topic_config(
    image: &MetadataImage,
    name: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<BTreeMap<String, String>, MetadataError> {
    if set.keys().chain(remove.iter()).any(|k| k.is_empty()) {
        return Err(MetadataError::Invalid(
            "config names must not be empty".into(),
        ));
    }
    let t = image
        .topics
        .get(name)
        .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
    let mut after = t.configs.clone();
    for k in remove {
        after.remove(k);
    }
    for (k, v) in set {
        after.insert(k.clone(), v.clone());
    }
    // Only what is set must be valid: a config stored before the known set existed may stay.
    set.iter().try_for_each(|(k, v)| configs::check(k, v))?;
    if after.len() > configs::MAX_CONFIGS {
        return Err(MetadataError::Invalid(format!(
            "{} configs; at most {} are allowed",
            after.len(),
            configs::MAX_CONFIGS
        )));
    }
    Ok(after)
}

/// [`MetadataCommand::AlterTopicConfig`]: removes `remove`, then sets `set` (so a key in both
/// ends up set).
pub(super) fn alter_topic_config(
    image: &mut MetadataImage,
    name: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<MetadataResponse, MetadataError> {
    let after = check_alter_topic_config(image, name, set, remove)?;
    if let Some(t) = image.topics.get_mut(name) {
        t.configs = after;
    }
    Ok(MetadataResponse::Ok)
}

#[cfg(test)]
mod tests {
    use super::super::testing::{create, M};
    use super::*;

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
    fn topic_names_follow_the_kafka_rules() {
        let longest = "x".repeat(MAX_TOPIC_NAME_LEN);
        for ok in ["a", "orders.v2_eu-1", "...", longest.as_str()] {
            assert_eq!(check_topic_name(ok), Ok(()), "{ok:?}");
        }
        let too_long = "x".repeat(MAX_TOPIC_NAME_LEN + 1);
        for bad in ["", ".", "..", "a b", "a/b", "ü", too_long.as_str()] {
            assert!(check_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn partition_counts_are_bounded_and_only_grow() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        assert!(matches!(
            m.err(create("big", MAX_PARTITIONS + 1, 1)),
            MetadataError::InvalidPartitions(_)
        ));
        m.topic("t", 2, 2);
        let grow = |total| MetadataCommand::CreatePartitions {
            name: "t".into(),
            total,
        };
        for total in [2, 1, MAX_PARTITIONS + 1] {
            assert!(matches!(
                m.err(grow(total)),
                MetadataError::InvalidPartitions(_)
            ));
        }
        m.ok(grow(5));
        let t = &m.m.image.topics["t"];
        assert_eq!(t.partitions.len(), 5);
        for p in &t.partitions {
            assert_eq!(p.replicas.len(), 2, "the topic's replication factor");
            assert_eq!(p.isr, p.replicas);
            assert_eq!(p.leader, p.replicas.first().copied());
        }
        assert!(matches!(
            m.err(MetadataCommand::CreatePartitions {
                name: "nope".into(),
                total: 3
            }),
            MetadataError::UnknownTopic(_)
        ));
    }

    #[test]
    fn growing_needs_as_many_available_brokers_as_the_replication_factor() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        m.ok(MetadataCommand::FenceBroker {
            broker_id: 2,
            epoch: epochs[&2],
        });
        assert!(matches!(
            m.err(MetadataCommand::CreatePartitions {
                name: "t".into(),
                total: 2
            }),
            MetadataError::InvalidReplicationFactor {
                requested: 2,
                available: 1
            }
        ));
    }

    #[test]
    fn configs_are_removed_then_set_and_empty_names_are_refused() {
        let mut m = M::new();
        m.live(&[(1, "a")]);
        m.topic("t", 1, 1);
        let alter = |set: &[(&str, &str)], remove: &[&str]| MetadataCommand::AlterTopicConfig {
            name: "t".into(),
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        };
        m.ok(alter(&[("retention.ms", "1"), ("segment.ms", "2")], &[]));
        m.ok(alter(
            &[("segment.ms", "3")],
            &["retention.ms", "segment.ms"],
        ));
        let configs = &m.m.image.topics["t"].configs;
        assert_eq!(
            configs,
            &BTreeMap::from([("segment.ms".to_string(), "3".to_string())])
        );
        // Unknown keys and bad values are refused and change nothing.
        let typo = m.err(alter(&[("unclean.leader.election.enabled", "true")], &[]));
        assert!(matches!(typo, MetadataError::Invalid(r) if r.contains("unknown topic config")));
        assert!(matches!(
            m.err(alter(&[("segment.ms", "soon")], &[])),
            MetadataError::Invalid(_)
        ));
        assert_eq!(
            m.m.image.topics["t"].configs,
            BTreeMap::from([("segment.ms".to_string(), "3".to_string())])
        );
        assert!(matches!(
            m.err(alter(&[("", "x")], &[])),
            MetadataError::Invalid(_)
        ));
        assert!(matches!(
            m.err(alter(&[], &[""])),
            MetadataError::Invalid(_)
        ));
    }

    #[test]
    fn a_deleted_topic_is_gone_and_its_name_is_free() {
        let mut m = M::new();
        m.live(&[(1, "a")]);
        m.topic("t", 1, 1);
        m.ok(MetadataCommand::DeleteTopic { name: "t".into() });
        assert!(!m.m.image.topics.contains_key("t"));
        m.topic("t", 2, 1);
        assert_eq!(m.m.image.topics["t"].partitions.len(), 2);
    }
}
