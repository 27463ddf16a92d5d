//! What a node reports through the [`metrics`] facade: a no-op unless the program installs a
//! recorder (`broker serve` renders them on `/metrics`). The same names and labels on every
//! engine and transport, since they are recorded here, above both; every series has a `node`
//! label (several nodes may share a process). The log and snapshot store add theirs
//! (`consensus_log_*`, `consensus_snapshot_*`: see `consensus-storage`), and each transport
//! counts its reconnects as `consensus_transport_reconnects_total{node, peer}`.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `consensus_proposals_total` | counter | `outcome` | proposals made through this node: `ok`, `refused` (not taken: not leader, invalid, shutting down), `unknown` (timeout, outcome unknown), `failed` (storage, transport, internal) |
//! | `consensus_proposals_forwarded_total` | counter | | proposals this node forwarded to the leader (each attempt) |
//! | `consensus_proposal_duration_seconds` | histogram | | proposal to answer, successful ones |
//! | `consensus_read_index_duration_seconds` | histogram | | a linearizable read barrier, successful ones |
//! | `consensus_role` | gauge | `role` | 1 for the node's current role (`leader`, `candidate`, `follower`, `learner`, `shutdown`), 0 for the others |
//! | `consensus_term`, `consensus_commit_index`, `consensus_applied_index`, `consensus_last_log_index`, `consensus_snapshot_index` | gauge | | from the node's status |
//! | `consensus_voters`, `consensus_learners` | gauge | | members in the node's configuration |
//! | `consensus_leader_changes_total` | counter | | times the known leader changed to another node (as observed) |
//! | `consensus_refused_messages_total` | counter | | peer messages refused before the engine (see `Status::refused_messages`) |
//! | `consensus_replication_lag_entries` | gauge | `peer` | on the leader: the peer's lag behind the leader's last index |
//! | `consensus_replication_last_contact_seconds` | gauge | `peer` | on the leader: time since the peer last answered (-1: not since it leads) |
//! | `consensus_transport_frames_sent_total`, `consensus_transport_bytes_sent_total`, `consensus_transport_frames_received_total`, `consensus_transport_bytes_received_total` | counter | `channel` (`engine`, `forward`, `snapshot`) | frames and bytes through the node's transport |
//! | `consensus_transport_errors_total` | counter | `channel`, `kind` | failed sends and calls, by error kind |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{Counter, Gauge, Histogram};

use crate::{ConsensusError, NodeId, Role, Status, TransportError};

/// How often the status gauges are refreshed at most (status changes are coalesced).
pub(crate) const STATUS_REFRESH: Duration = Duration::from_millis(100);

/// A channel tag's label.
pub(crate) fn channel_name(tag: u8) -> &'static str {
    match tag {
        crate::channel::ENGINE => "engine",
        crate::channel::FORWARD => "forward",
        crate::channel::SNAPSHOT => "snapshot",
        _ => "other",
    }
}

/// A transport error's `kind` label.
pub(crate) fn transport_error_kind(e: &TransportError) -> &'static str {
    match e {
        TransportError::UnknownPeer(_) => "unknown_peer",
        TransportError::Unreachable { .. } => "unreachable",
        TransportError::Timeout(_) => "timeout",
        TransportError::FrameTooLarge { .. } => "frame_too_large",
        TransportError::QueueFull(_) => "queue_full",
        TransportError::Refused(_) => "refused",
        TransportError::Remote(_) => "remote",
        TransportError::Closed => "closed",
        TransportError::Setup(_) => "setup",
    }
}

/// The proposal counters and latency of one node.
pub(crate) struct ProposalMetrics {
    ok: Counter,
    refused: Counter,
    unknown: Counter,
    failed: Counter,
    pub(crate) forwarded: Counter,
    duration: Histogram,
    read_index: Histogram,
}

impl ProposalMetrics {
    pub(crate) fn new(node: NodeId) -> Self {
        let n = node.to_string();
        let outcome = |o: &'static str| metrics::counter!("consensus_proposals_total", "node" => n.clone(), "outcome" => o);
        Self {
            ok: outcome("ok"),
            refused: outcome("refused"),
            unknown: outcome("unknown"),
            failed: outcome("failed"),
            forwarded: metrics::counter!("consensus_proposals_forwarded_total", "node" => n.clone()),
            duration: metrics::histogram!("consensus_proposal_duration_seconds", "node" => n.clone()),
            read_index: metrics::histogram!("consensus_read_index_duration_seconds", "node" => n),
        }
    }

    /// Counts a finished proposal that took `took`.
    pub(crate) fn proposal<T>(&self, result: &Result<T, ConsensusError>, took: Duration) {
        match result {
            Ok(_) => {
                self.ok.increment(1);
                self.duration.record(took);
            }
            Err(
                ConsensusError::NotLeader { .. }
                | ConsensusError::InvalidRequest(_)
                | ConsensusError::ShuttingDown,
            ) => self.refused.increment(1),
            Err(ConsensusError::Timeout(_) | ConsensusError::OutcomeUnknown(_)) => {
                self.unknown.increment(1)
            }
            Err(_) => self.failed.increment(1),
        }
    }

    /// Records a successful read barrier.
    pub(crate) fn read_index(&self, took: Duration) {
        self.read_index.record(took);
    }
}

/// The frame and byte counters of one channel of one node.
pub(crate) struct ChannelMetrics {
    node: String,
    channel: &'static str,
    pub(crate) frames_sent: Counter,
    pub(crate) bytes_sent: Counter,
    pub(crate) frames_received: Counter,
    pub(crate) bytes_received: Counter,
}

impl ChannelMetrics {
    pub(crate) fn new(node: NodeId, tag: u8) -> Self {
        let node = node.to_string();
        let channel = channel_name(tag);
        let l = [("node", node.clone()), ("channel", channel.to_string())];
        Self {
            frames_sent: metrics::counter!("consensus_transport_frames_sent_total", &l),
            bytes_sent: metrics::counter!("consensus_transport_bytes_sent_total", &l),
            frames_received: metrics::counter!("consensus_transport_frames_received_total", &l),
            bytes_received: metrics::counter!("consensus_transport_bytes_received_total", &l),
            node,
            channel,
        }
    }

    /// Counts a frame of `len` bytes going out, and the error if it failed.
    pub(crate) fn sent<T>(&self, len: usize, result: &Result<T, TransportError>) {
        self.frames_sent.increment(1);
        self.bytes_sent.increment(len as u64);
        if let Err(e) = result {
            metrics::counter!(
                "consensus_transport_errors_total",
                "node" => self.node.clone(),
                "channel" => self.channel,
                "kind" => transport_error_kind(e)
            )
            .increment(1);
        }
    }

    /// Counts a frame of `len` bytes coming in.
    pub(crate) fn received(&self, len: usize) {
        self.frames_received.increment(1);
        self.bytes_received.increment(len as u64);
    }
}

/// The status gauges of one node, refreshed from its status.
pub(crate) struct StatusMetrics {
    node: String,
    term: Gauge,
    commit: Gauge,
    applied: Gauge,
    last_log: Gauge,
    snapshot: Gauge,
    voters: Gauge,
    learners: Gauge,
    leader_changes: Counter,
    refused: Counter,
    last_leader: Option<NodeId>,
    peers: Vec<NodeId>,
}

const ROLES: [(Role, &str); 5] = [
    (Role::Leader, "leader"),
    (Role::Candidate, "candidate"),
    (Role::Follower, "follower"),
    (Role::Learner, "learner"),
    (Role::Shutdown, "shutdown"),
];

impl StatusMetrics {
    pub(crate) fn new(node: NodeId) -> Self {
        let n = node.to_string();
        let g = |name: &'static str| metrics::gauge!(name, "node" => n.clone());
        Self {
            term: g("consensus_term"),
            commit: g("consensus_commit_index"),
            applied: g("consensus_applied_index"),
            last_log: g("consensus_last_log_index"),
            snapshot: g("consensus_snapshot_index"),
            voters: g("consensus_voters"),
            learners: g("consensus_learners"),
            leader_changes: metrics::counter!("consensus_leader_changes_total", "node" => n.clone()),
            refused: metrics::counter!("consensus_refused_messages_total", "node" => n.clone()),
            node: n,
            last_leader: None,
            peers: Vec::new(),
        }
    }

    /// Sets every gauge from `st`.
    pub(crate) fn update(&mut self, st: &Status) {
        for (role, name) in ROLES {
            let on = if st.role == role { 1.0 } else { 0.0 };
            metrics::gauge!("consensus_role", "node" => self.node.clone(), "role" => name).set(on);
        }
        self.term.set(st.term as f64);
        self.commit.set(st.commit_index as f64);
        self.applied.set(st.applied_index as f64);
        self.last_log.set(st.last_log_index as f64);
        self.snapshot.set(st.snapshot_index as f64);
        self.voters.set(st.voters.len() as f64);
        self.learners.set(st.learners.len() as f64);
        self.refused.absolute(st.refused_messages);
        if let Some(l) = st.leader {
            if self.last_leader.is_some_and(|old| old != l) {
                self.leader_changes.increment(1);
            }
            self.last_leader = Some(l);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        // Peers no longer in the view (or every peer, off the leader) read 0 lag and -1
        // contact rather than keeping stale figures.
        for gone in self
            .peers
            .iter()
            .filter(|p| !st.replication.contains_key(p))
        {
            self.peer_gauges(*gone, 0.0, -1.0);
        }
        self.peers = st.replication.keys().copied().collect();
        for (peer, p) in &st.replication {
            let lag = st.last_log_index.saturating_sub(p.matched) as f64;
            let contact = p
                .last_contact_unix_ms
                .map_or(-1.0, |t| now.saturating_sub(t) as f64 / 1000.0);
            self.peer_gauges(*peer, lag, contact);
        }
    }

    fn peer_gauges(&self, peer: NodeId, lag: f64, contact: f64) {
        let l = [("node", self.node.clone()), ("peer", peer.to_string())];
        metrics::gauge!("consensus_replication_lag_entries", &l).set(lag);
        metrics::gauge!("consensus_replication_last_contact_seconds", &l).set(contact);
    }
}
