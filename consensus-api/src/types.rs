//! Identity and status types.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A node's id; unique within a cluster.
pub type NodeId = u64;

/// The role a node currently plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Role {
    /// Accepts proposals and replicates them.
    Leader,
    /// Campaigning for leadership (or pre-campaigning).
    Candidate,
    /// A voter following a leader.
    Follower,
    /// A non-voting member receiving the log.
    Learner,
    /// Stopped.
    Shutdown,
}

/// Which way a snapshot transfer goes, seen from the node that reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TransferDirection {
    /// This node streams its snapshot file to the peer.
    Sending,
    /// This node receives a snapshot file from the peer.
    Receiving,
}

/// Progress of one snapshot transfer (in flight, or the last one with a peer), as reported by
/// [`Engine::snapshot_transfers`](crate::Engine::snapshot_transfers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TransferProgress {
    /// The other node.
    pub peer: NodeId,
    /// Sending or receiving.
    pub direction: TransferDirection,
    /// Size of the snapshot file in bytes (0 while a snapshot streamed as it is written is
    /// still running: its size is known at its end).
    pub total_bytes: u64,
    /// Bytes acknowledged (sending) or written (receiving) so far in this transfer.
    pub bytes: u64,
    /// Chunks acknowledged or written so far.
    pub chunks: u64,
    /// Bytes the receiver already had from an interrupted transfer of the same file, not sent
    /// again (a resumed transfer).
    pub resumed_bytes: u64,
    /// Time since the transfer started, in milliseconds.
    pub elapsed_ms: u64,
    /// Whether it has ended (then `error` says how).
    pub done: bool,
    /// `None` while in flight or after success; what went wrong otherwise.
    pub error: Option<String>,
}

impl TransferProgress {
    /// A transfer that has just started: nothing moved yet.
    pub fn new(peer: NodeId, direction: TransferDirection, total_bytes: u64) -> Self {
        Self {
            peer,
            direction,
            total_bytes,
            bytes: 0,
            chunks: 0,
            resumed_bytes: 0,
            elapsed_ms: 0,
            done: false,
            error: None,
        }
    }
}

/// A point-in-time view of one node, published on every change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Its role.
    pub role: Role,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of, if any.
    pub leader: Option<NodeId>,
    /// Highest log index known committed.
    pub commit_index: u64,
    /// Highest log index applied to the state machine.
    pub applied_index: u64,
    /// Highest index in the local log.
    pub last_log_index: u64,
    /// Index covered by the latest snapshot (0 if none).
    pub snapshot_index: u64,
    /// Entries at or below this index have been compacted out of the log (0 if none).
    pub purged_index: u64,
    /// Voting members (in a joint configuration: the union of both sets).
    pub voters: BTreeSet<NodeId>,
    /// Non-voting members.
    pub learners: BTreeSet<NodeId>,
    /// The transport address of every member, as recorded in the membership.
    pub addresses: BTreeMap<NodeId, String>,
    /// Once the engine has stopped (role `Shutdown`) because of a failure, what failed (a
    /// storage error, an engine panic); `None` while running and after an orderly shutdown.
    pub stopped: Option<String>,
    /// Peer messages this node refused before its engine saw them, because they would break
    /// the engine's invariants (a sender naming another node, a commit index beyond the local
    /// log, entries that are not contiguous, ...). A rising count means a faulty or hostile
    /// member, or a node whose disk lost acknowledged entries.
    pub refused_messages: u64,
    /// On the leader: how far each other member (voter or learner) has replicated the log and
    /// when it last answered; empty on every other node. The same fields on every engine
    /// (built with [`backend_support::ReplicationTracker`](crate::backend_support::ReplicationTracker)).
    #[serde(default)]
    pub replication: BTreeMap<NodeId, ReplicaProgress>,
}

/// One member's replication, as its leader sees it (see [`Status::replication`]). Times are
/// wall-clock milliseconds since the Unix epoch, rounded down to
/// [`CONTACT_RESOLUTION_MS`], so that a status does not change on every heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplicaProgress {
    /// Highest log index known to be on the member (0: nothing confirmed yet).
    pub matched: u64,
    /// When the member last answered this leader; `None`: not since it became leader.
    pub last_contact_unix_ms: Option<u64>,
    /// When the member last had every entry this leader had committed (its `matched` at or
    /// past the commit index); `None`: not since it became leader. Kafka's
    /// `LastCaughtUpTimestamp`: now minus this is the member's lag in time.
    pub caught_up_unix_ms: Option<u64>,
}

/// The resolution of the times in [`ReplicaProgress`], in milliseconds.
pub const CONTACT_RESOLUTION_MS: u64 = 100;

impl Status {
    /// The status of a node that has not started yet.
    pub fn initial(id: NodeId) -> Self {
        Self {
            id,
            role: Role::Follower,
            term: 0,
            leader: None,
            commit_index: 0,
            applied_index: 0,
            last_log_index: 0,
            snapshot_index: 0,
            purged_index: 0,
            voters: BTreeSet::new(),
            learners: BTreeSet::new(),
            addresses: BTreeMap::new(),
            stopped: None,
            refused_messages: 0,
            replication: BTreeMap::new(),
        }
    }

    /// Whether this node believes it is the leader.
    pub fn is_leader(&self) -> bool {
        self.role == Role::Leader
    }
}
