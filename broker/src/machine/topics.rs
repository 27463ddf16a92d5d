//! Topic records: create and delete topics, grow their partitions, alter their configs.
//!
//! Replicas are placed by [`place`] on the available brokers (not fenced, not shutting down),
//! seeded by the topic id (the offset of the record that created it), so every node computes
//! the same assignment. A new partition starts with all its replicas in the ISR and the first
//! one leading, at epoch 0.

use std::collections::BTreeMap;

use super::brokers;
use crate::model::*;
use crate::placement::place;

/// Longest topic name: Kafka's limit, since a partition's data lives in a directory named
/// `<topic>-<partition>` that must fit the 255-byte file-name limit of common file systems.
pub(super) const MAX_TOPIC_NAME_LEN: usize = 249;
/// Largest partition count of a topic.
pub(super) const MAX_PARTITIONS: u32 = 10_000;

/// Whether `c` may appear in a topic name: Kafka's `[a-zA-Z0-9._-]`.
fn is_topic_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks Kafka's topic-name rules: 1 to [`MAX_TOPIC_NAME_LEN`] characters of
/// `[a-zA-Z0-9._-]`, and not `.` or `..` (which name directories).
fn valid_topic_name(name: &str) -> Result<(), MetadataError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_LEN
        && name != "."
        && name != ".."
        && name.chars().all(is_topic_name_char);
    if ok {
        Ok(())
    } else {
        Err(MetadataError::Invalid(format!(
            "topic name {name:?} must be 1-{MAX_TOPIC_NAME_LEN} characters of [a-zA-Z0-9._-]"
        )))
    }
}

/// The brokers replicas may be placed on, with their racks.
fn placement_candidates(image: &MetadataImage) -> Vec<(BrokerId, Option<String>)> {
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
    valid_topic_name(name)?;
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

/// [`MetadataCommand::CreatePartitions`]: grows the topic to `total` partitions with the
/// replication factor of its first partition.
pub(super) fn create_partitions(
    image: &mut MetadataImage,
    name: &str,
    total: u32,
) -> Result<MetadataResponse, MetadataError> {
    let live = placement_candidates(image);
    let topic = image
        .topics
        .get_mut(name)
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
    if rf > live.len() {
        return Err(MetadataError::InvalidReplicationFactor {
            requested: rf as u16,
            available: live.len(),
        });
    }
    for p in current..total {
        topic
            .partitions
            .push(new_partition(place(&live, topic.id, p, rf)));
    }
    Ok(MetadataResponse::Ok)
}

/// [`MetadataCommand::DeleteTopic`].
pub(super) fn delete_topic(
    image: &mut MetadataImage,
    name: &str,
) -> Result<MetadataResponse, MetadataError> {
    image
        .topics
        .remove(name)
        .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
    Ok(MetadataResponse::Ok)
}

/// [`MetadataCommand::AlterTopicConfig`]: removes `remove`, then sets `set` (so a key in both
/// ends up set).
pub(super) fn alter_topic_config(
    image: &mut MetadataImage,
    name: &str,
    set: &BTreeMap<String, String>,
    remove: &[String],
) -> Result<MetadataResponse, MetadataError> {
    if set.keys().chain(remove.iter()).any(|k| k.is_empty()) {
        return Err(MetadataError::Invalid(
            "config names must not be empty".into(),
        ));
    }
    let t = image
        .topics
        .get_mut(name)
        .ok_or_else(|| MetadataError::UnknownTopic(name.to_string()))?;
    for k in remove {
        t.configs.remove(k);
    }
    for (k, v) in set {
        t.configs.insert(k.clone(), v.clone());
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
            assert_eq!(valid_topic_name(ok), Ok(()), "{ok:?}");
        }
        let too_long = "x".repeat(MAX_TOPIC_NAME_LEN + 1);
        for bad in ["", ".", "..", "a b", "a/b", "ü", too_long.as_str()] {
            assert!(valid_topic_name(bad).is_err(), "{bad:?}");
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
        m.ok(alter(&[("a", "1"), ("b", "2")], &[]));
        m.ok(alter(&[("b", "3")], &["a", "b"]));
        let configs = &m.m.image.topics["t"].configs;
        assert_eq!(
            configs,
            &BTreeMap::from([("b".to_string(), "3".to_string())])
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
