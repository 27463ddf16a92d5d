//! The metadata records (commands), their answers, and the metadata image they build.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A broker's id (Kafka's `node.id` of a broker).
pub type BrokerId = u32;
/// A topic's id: the log offset of the record that created it (unique, deterministic).
pub type TopicId = u64;

/// A command appended to the metadata log. Applying one is deterministic: no clocks, no
/// randomness; anything time-based is decided by the controller before it proposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataCommand {
    /// A broker process announces itself. A new `incarnation` (a restarted process) gets a new
    /// broker epoch; the same incarnation again gets its existing epoch back (idempotent).
    RegisterBroker {
        /// The broker.
        broker_id: BrokerId,
        /// Random per process start, chosen by the broker.
        incarnation: u64,
        /// Where clients reach it (`host:port` strings).
        endpoints: Vec<String>,
        /// Rack, for rack-aware replica placement.
        rack: Option<String>,
    },
    /// Removes a broker's registration.
    UnregisterBroker {
        /// The broker.
        broker_id: BrokerId,
    },
    /// A heartbeat: the broker is alive at `epoch` and has caught up to `metadata_offset`.
    /// Unfences the broker once it has caught up to its own registration.
    Heartbeat {
        /// The broker.
        broker_id: BrokerId,
        /// The epoch it was registered with.
        epoch: u64,
        /// The metadata offset the broker has applied.
        metadata_offset: u64,
    },
    /// Fences a broker (session expired or asked by an operator): it leaves every ISR and every
    /// partition it led gets a new leader from its ISR.
    FenceBroker {
        /// The broker.
        broker_id: BrokerId,
        /// Must equal the broker's current epoch.
        epoch: u64,
    },
    /// Moves leadership and ISR membership away before a broker stops.
    BeginControlledShutdown {
        /// The broker.
        broker_id: BrokerId,
        /// Must equal the broker's current epoch.
        epoch: u64,
    },
    /// Creates a topic; replicas are placed deterministically on the unfenced brokers.
    CreateTopic {
        /// Topic name.
        name: String,
        /// Number of partitions (> 0).
        partitions: u32,
        /// Replicas per partition (> 0, at most the number of unfenced brokers).
        replication_factor: u16,
        /// Topic configs (e.g. `unclean.leader.election.enable`).
        configs: BTreeMap<String, String>,
    },
    /// Grows a topic to `total` partitions.
    CreatePartitions {
        /// Topic name.
        name: String,
        /// The new partition count (greater than the current one).
        total: u32,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Topic name.
        name: String,
    },
    /// Changes a partition's leader and ISR, compare-and-set on the partition epoch.
    ChangePartition {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// The partition epoch the change was computed from.
        partition_epoch: u64,
        /// The new leader (must be in the new ISR), `None` for offline.
        leader: Option<BrokerId>,
        /// The new ISR (replicas of the partition).
        isr: Vec<BrokerId>,
    },
    /// Sets and removes topic configs.
    AlterTopicConfig {
        /// Topic name.
        name: String,
        /// Configs to set.
        set: BTreeMap<String, String>,
        /// Configs to remove.
        remove: Vec<String>,
    },
    /// Moves the leadership of every partition of `topics` (all topics when empty) whose first
    /// replica (the preferred leader) is in the ISR and available but does not lead, back to
    /// it: Kafka's preferred-leader election.
    ElectPreferredLeaders {
        /// Topic names; empty for every topic.
        topics: Vec<String>,
    },
    /// Ends a broker's controlled shutdown before it stopped (it will not stop after all):
    /// it is available again, and rejoins ISRs and leads as an unfenced broker does.
    CancelControlledShutdown {
        /// The broker.
        broker_id: BrokerId,
        /// Must equal the broker's current epoch.
        epoch: u64,
    },
}

/// Why a command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MetadataError {
    /// No topic of that name.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// A topic of that name exists.
    #[error("topic {0:?} already exists")]
    DuplicateTopic(String),
    /// No such partition.
    #[error("topic {topic:?} has no partition {partition}")]
    UnknownPartition {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
    },
    /// Bad partition count.
    #[error("invalid partition count: {0}")]
    InvalidPartitions(String),
    /// More replicas than live brokers, or zero.
    #[error("replication factor {requested} is invalid with {available} unfenced brokers")]
    InvalidReplicationFactor {
        /// Requested factor.
        requested: u16,
        /// Unfenced brokers.
        available: usize,
    },
    /// No broker of that id is registered.
    #[error("unknown broker {0}")]
    UnknownBroker(BrokerId),
    /// The broker epoch in the request is not the current one.
    #[error(
        "stale broker epoch for broker {broker_id}: request has {given}, current is {current}"
    )]
    StaleBrokerEpoch {
        /// The broker.
        broker_id: BrokerId,
        /// Epoch in the request.
        given: u64,
        /// Current epoch.
        current: u64,
    },
    /// The partition epoch in the request is not the current one.
    #[error(
        "stale partition epoch for {topic}-{partition}: request has {given}, current is {current}"
    )]
    StalePartitionEpoch {
        /// Topic name.
        topic: String,
        /// Partition index.
        partition: u32,
        /// Epoch in the request.
        given: u64,
        /// Current epoch.
        current: u64,
    },
    /// Anything else that is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Well-formed, but the current state does not allow it (cancelling a shutdown that is
    /// not in progress).
    #[error("conflicts with the current state: {0}")]
    Conflict(String),
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataResponse {
    /// Applied.
    Ok,
    /// The broker's epoch (the offset of its registration).
    Registered {
        /// Broker epoch.
        epoch: u64,
    },
    /// A topic was created.
    TopicCreated {
        /// Its id.
        topic_id: TopicId,
        /// Replicas per partition, in partition order.
        assignment: Vec<Vec<BrokerId>>,
    },
    /// Nothing changed.
    Error(MetadataError),
    /// Preferred leaders elected.
    LeadersElected {
        /// Partitions whose leader moved.
        moved: u64,
    },
}

/// A registered broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BrokerRegistration {
    /// The broker.
    pub broker_id: BrokerId,
    /// The process incarnation that registered.
    pub incarnation: u64,
    /// Broker epoch: the offset of the registration record.
    pub epoch: u64,
    /// Client endpoints.
    pub endpoints: Vec<String>,
    /// Rack.
    pub rack: Option<String>,
    /// Fenced brokers lead nothing and are in no ISR.
    pub fenced: bool,
    /// In controlled shutdown.
    pub shutting_down: bool,
    /// Offset of the last applied heartbeat.
    pub last_heartbeat_offset: u64,
}

/// One partition's replicas, leader and ISR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionState {
    /// Assigned replicas, preferred leader first.
    pub replicas: Vec<BrokerId>,
    /// In-sync replicas.
    pub isr: Vec<BrokerId>,
    /// Current leader; `None` when offline.
    pub leader: Option<BrokerId>,
    /// Bumped on every leader change.
    pub leader_epoch: u64,
    /// Bumped on every change of the partition.
    pub partition_epoch: u64,
}

/// A topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topic {
    /// Topic id.
    pub id: TopicId,
    /// Name.
    pub name: String,
    /// Partitions by index.
    pub partitions: Vec<PartitionState>,
    /// Configs.
    pub configs: BTreeMap<String, String>,
}

impl Topic {
    /// Whether an out-of-sync replica may be elected when no ISR member is available.
    pub fn unclean_election(&self) -> bool {
        self.configs
            .get(crate::configs::UNCLEAN_LEADER_ELECTION)
            .is_some_and(|v| v == "true")
    }
}

/// Longest topic name: Kafka's limit, since a partition's data lives in a directory named
/// `<topic>-<partition>` that must fit the 255-byte file-name limit of common file systems.
pub const MAX_TOPIC_NAME_LEN: usize = 249;

/// Whether `c` may appear in a topic name: Kafka's `[a-zA-Z0-9._-]`.
fn is_topic_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks Kafka's topic-name rules: 1 to [`MAX_TOPIC_NAME_LEN`] characters of
/// `[a-zA-Z0-9._-]`, and not `.` or `..` (which name directories). The admin CLI checks names
/// with this before sending them; the controller before proposing and when applying.
pub fn check_topic_name(name: &str) -> Result<(), MetadataError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_TOPIC_NAME_LEN
        && name != "."
        && name != ".."
        && name.chars().all(is_topic_name_char);
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        let more = if name.chars().count() > 64 { "..." } else { "" };
        Err(MetadataError::Invalid(format!(
            "topic name {shown:?}{more} must be 1-{MAX_TOPIC_NAME_LEN} characters of [a-zA-Z0-9._-]"
        )))
    }
}

/// The whole metadata image at an offset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataImage {
    /// The offset of the last applied record.
    pub offset: u64,
    /// Registered brokers.
    pub brokers: BTreeMap<BrokerId, BrokerRegistration>,
    /// Topics by name.
    pub topics: BTreeMap<String, Topic>,
}

impl MetadataImage {
    /// The partitions (topic name, index) whose state satisfies `pred`, in topic order.
    pub fn partitions_where(
        &self,
        mut pred: impl FnMut(&PartitionState) -> bool,
    ) -> Vec<(String, usize)> {
        let mut out = Vec::new();
        for t in self.topics.values() {
            for (i, p) in t.partitions.iter().enumerate() {
                if pred(p) {
                    out.push((t.name.clone(), i));
                }
            }
        }
        out
    }
}

/// One entry of the metadata feed: what a record at `offset` changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataChange {
    /// Log offset of the record.
    pub offset: u64,
    /// The record.
    pub command: MetadataCommand,
    /// Its outcome.
    pub response: MetadataResponse,
}
