//! Topic configs: a known set with Kafka's names and typed values.
//!
//! A topic's configs are checked against [`TOPIC_CONFIGS`] before anything is proposed and
//! again when the record is applied (deterministically, on every node): an unknown key (a typo
//! of `unclean.leader.election.enable` used to be stored and silently ignored), a value of the
//! wrong type or out of range, too many keys or an oversized value are refused with a reason
//! that names the key and what it accepts.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::MetadataError;

/// Most configs one topic may carry.
pub const MAX_CONFIGS: usize = 64;
/// Longest config value, in bytes.
pub const MAX_CONFIG_VALUE_LEN: usize = 4096;

/// What values a config accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ConfigType {
    /// `true` or `false`.
    Boolean,
    /// A whole number in `min..=max`.
    Long {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
    },
    /// One of the listed words.
    OneOf {
        /// The accepted values.
        values: &'static [&'static str],
    },
    /// A comma-separated, non-empty list of the listed words.
    ListOf {
        /// The accepted items.
        values: &'static [&'static str],
    },
}

/// One known topic config.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ConfigSpec {
    /// Kafka's name.
    pub name: &'static str,
    /// Its values.
    #[serde(flatten)]
    pub kind: ConfigType,
    /// The value a topic without it behaves as having.
    pub default: &'static str,
    /// What it does.
    pub doc: &'static str,
}

const MAX_LONG: i64 = i64::MAX;

/// Every config a topic may carry (Kafka's topic-level names).
pub const TOPIC_CONFIGS: &[ConfigSpec] = &[
    ConfigSpec {
        name: "cleanup.policy",
        kind: ConfigType::ListOf {
            values: &["delete", "compact"],
        },
        default: "delete",
        doc: "delete old segments, compact by key, or both",
    },
    ConfigSpec {
        name: "compression.type",
        kind: ConfigType::OneOf {
            values: &["producer", "uncompressed", "gzip", "snappy", "lz4", "zstd"],
        },
        default: "producer",
        doc: "the compression of stored batches",
    },
    ConfigSpec {
        name: "delete.retention.ms",
        kind: ConfigType::Long {
            min: 0,
            max: MAX_LONG,
        },
        default: "86400000",
        doc: "how long delete markers are kept in compacted topics",
    },
    ConfigSpec {
        name: "max.message.bytes",
        kind: ConfigType::Long {
            min: 0,
            max: i32::MAX as i64,
        },
        default: "1048588",
        doc: "the largest record batch the topic accepts",
    },
    ConfigSpec {
        name: "message.timestamp.type",
        kind: ConfigType::OneOf {
            values: &["CreateTime", "LogAppendTime"],
        },
        default: "CreateTime",
        doc: "which timestamp records carry",
    },
    ConfigSpec {
        name: "min.compaction.lag.ms",
        kind: ConfigType::Long {
            min: 0,
            max: MAX_LONG,
        },
        default: "0",
        doc: "the least time a record stays uncompacted",
    },
    ConfigSpec {
        name: "min.insync.replicas",
        kind: ConfigType::Long {
            min: 1,
            max: i32::MAX as i64,
        },
        default: "1",
        doc: "in-sync replicas an acks=all write needs",
    },
    ConfigSpec {
        name: "retention.bytes",
        kind: ConfigType::Long {
            min: -1,
            max: MAX_LONG,
        },
        default: "-1",
        doc: "bytes kept per partition before old segments go (-1: no limit)",
    },
    ConfigSpec {
        name: "retention.ms",
        kind: ConfigType::Long {
            min: -1,
            max: MAX_LONG,
        },
        default: "604800000",
        doc: "how long records are kept (-1: forever)",
    },
    ConfigSpec {
        name: "segment.bytes",
        kind: ConfigType::Long {
            min: 14,
            max: i32::MAX as i64,
        },
        default: "1073741824",
        doc: "the size of one log segment file",
    },
    ConfigSpec {
        name: "segment.ms",
        kind: ConfigType::Long {
            min: 1,
            max: MAX_LONG,
        },
        default: "604800000",
        doc: "how long before a segment is rolled",
    },
    ConfigSpec {
        name: UNCLEAN_LEADER_ELECTION,
        kind: ConfigType::Boolean,
        default: "false",
        doc: "whether an out-of-sync replica may lead when no in-sync one is available (data loss)",
    },
];

/// The one config the metadata plane itself acts on.
pub const UNCLEAN_LEADER_ELECTION: &str = "unclean.leader.election.enable";

/// The spec of `name`, if it is a known topic config.
pub fn spec(name: &str) -> Option<&'static ConfigSpec> {
    TOPIC_CONFIGS.iter().find(|c| c.name == name)
}

/// Checks one `name=value` pair.
pub fn check(name: &str, value: &str) -> Result<(), MetadataError> {
    let Some(spec) = spec(name) else {
        let known: Vec<&str> = TOPIC_CONFIGS.iter().map(|c| c.name).collect();
        return Err(MetadataError::Invalid(format!(
            "unknown topic config {name:?}; known: {}",
            known.join(", ")
        )));
    };
    if value.len() > MAX_CONFIG_VALUE_LEN {
        return Err(MetadataError::Invalid(format!(
            "the value of {name} is {} bytes; at most {MAX_CONFIG_VALUE_LEN} are allowed",
            value.len()
        )));
    }
    let ok = match spec.kind {
        ConfigType::Boolean => matches!(value, "true" | "false"),
        ConfigType::Long { min, max } => {
            value.parse::<i64>().is_ok_and(|v| (min..=max).contains(&v))
        }
        ConfigType::OneOf { values } => values.contains(&value),
        ConfigType::ListOf { values } => {
            !value.is_empty() && value.split(',').all(|v| values.contains(&v.trim()))
        }
    };
    if ok {
        return Ok(());
    }
    let accepts = match spec.kind {
        ConfigType::Boolean => "true or false".to_string(),
        ConfigType::Long { min, max } => format!("a whole number from {min} to {max}"),
        ConfigType::OneOf { values } => format!("one of {}", values.join(", ")),
        ConfigType::ListOf { values } => format!("a comma-separated list of {}", values.join(", ")),
    };
    Err(MetadataError::Invalid(format!(
        "{name}={value:?} is not valid: {name} takes {accepts}"
    )))
}

/// Checks a topic's whole config map as it would be after a change.
pub fn check_all(configs: &BTreeMap<String, String>) -> Result<(), MetadataError> {
    if configs.len() > MAX_CONFIGS {
        return Err(MetadataError::Invalid(format!(
            "{} configs; at most {MAX_CONFIGS} are allowed",
            configs.len()
        )));
    }
    configs.iter().try_for_each(|(k, v)| check(k, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_keys_with_valid_values_pass_and_everything_else_is_refused_with_a_reason() {
        for (k, v) in [
            ("unclean.leader.election.enable", "true"),
            ("retention.ms", "-1"),
            ("cleanup.policy", "compact,delete"),
            ("compression.type", "zstd"),
            ("min.insync.replicas", "2"),
        ] {
            assert_eq!(check(k, v), Ok(()), "{k}={v}");
        }
        let refused = [
            (
                "unclean.leader.election.enabled",
                "true",
                "unknown topic config",
            ),
            ("unclean.leader.election.enable", "yes", "true or false"),
            ("retention.ms", "-2", "from -1"),
            ("retention.ms", "soon", "whole number"),
            ("min.insync.replicas", "0", "from 1"),
            ("cleanup.policy", "", "comma-separated"),
            ("cleanup.policy", "compact,shred", "comma-separated"),
            ("compression.type", "brotli", "one of"),
        ];
        for (k, v, why) in refused {
            match check(k, v) {
                Err(MetadataError::Invalid(reason)) => {
                    assert!(reason.contains(why), "{k}={v}: {reason}")
                }
                other => panic!("{k}={v} gave {other:?}"),
            }
        }
        let long = "1".repeat(MAX_CONFIG_VALUE_LEN + 1);
        assert!(check("retention.ms", &long).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_CONFIGS)
            .map(|i| (format!("k{i}"), "v".to_string()))
            .collect();
        assert!(
            matches!(check_all(&many), Err(MetadataError::Invalid(r)) if r.contains("at most"))
        );
    }
}
