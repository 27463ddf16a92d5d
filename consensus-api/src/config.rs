//! [`NodeConfig`]: one configuration every backend maps onto its engine's settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{ConsensusError, NodeId};

/// The largest snapshot-transfer chunk: 1 MiB less 4 KiB, so that a chunk with its headers in
/// every layer (transfer, transport framing) stays below the allocator's 1 MiB mapping threshold
/// ([`crate::process::release_large_buffers`]). Buffers above it get a fresh mapping each, whose
/// pages are faulted in and zeroed anew for every chunk (measured with the large-state bench:
/// about 60% of the sender's CPU during a transfer); below it they are reused from the heap.
pub const MAX_SNAPSHOT_CHUNK_BYTES: usize = (1 << 20) - 4096;

/// Everything a node needs to start. Timing defaults suit a LAN / loopback cluster: a heartbeat
/// every 100 ms, an election after 0.5-1 s of silence, so a failover takes about a second.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct NodeConfig {
    /// This node's id; unique in the cluster, never reused for another machine.
    pub id: NodeId,
    /// Carried in every connection handshake; peers of another cluster are refused.
    pub cluster_id: String,
    /// Where the log, vote, and snapshots live. Created if missing.
    pub data_dir: PathBuf,
    /// The voters of a brand-new cluster with their addresses. Written once, when the data dir
    /// is fresh and this node is one of them; ignored on restart. Leave empty for a node that
    /// joins later through `add_learner`.
    pub initial_members: BTreeMap<NodeId, String>,
    /// Interval between leader heartbeats (raft-rs: one tick).
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomized election timeout.
    pub election_timeout_min: Duration,
    /// Upper bound of the randomized election timeout.
    pub election_timeout_max: Duration,
    /// Take a snapshot (and compact the log) after this many applied entries since the last one.
    pub snapshot_threshold: u64,
    /// Also wait until the entries applied since the last snapshot carry this percentage of
    /// that snapshot's size in bytes (snapshots under 1 MiB are exempt; 0 turns it off), so a
    /// large state is not rewritten for every `snapshot_threshold` small writes: snapshot bytes
    /// stay at most `100 / snapshot_log_percent` times the log bytes. See
    /// [`crate::backend_support::SnapshotPacer`].
    pub snapshot_log_percent: u32,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers avoid a snapshot.
    pub keep_logs_after_snapshot: u64,
    /// At most this many bytes of entry data kept behind a snapshot, whatever
    /// `keep_logs_after_snapshot` allows: the log's live entries are held in memory, and a
    /// thousand large commands would otherwise stay resident next to the state they built.
    /// 0 keeps none.
    pub keep_log_bytes_after_snapshot: u64,
    /// Most entries sent in one replication message. openraft: `max_payload_entries`. raft-rs
    /// has no entry-count limit; it bounds a message by bytes instead (`max_size_per_msg`, a
    /// quarter of `transport.max_frame_bytes`, clamped to 64 KiB..1 MiB), so this setting has no
    /// effect on the raft-rs backend.
    pub max_entries_per_message: u64,
    /// Default deadline of a proposal, read or membership change, forwarding included.
    pub request_timeout: Duration,
    /// Deadline of one engine RPC to a peer (append, vote); each chunk of a snapshot transfer
    /// gets 4x, the install call that follows it 10x.
    pub rpc_timeout: Duration,
    /// The transport settings of this node.
    pub transport: TransportConfig,
    /// What to do with a data directory that has no identity record yet (a new or a wiped
    /// one): refuse (the default), create the cluster, or join one. See [`crate::data_dir`].
    pub new_data_dir: crate::data_dir::NewDataDir,
}

impl NodeConfig {
    /// A configuration with the documented defaults.
    pub fn new(id: NodeId, cluster_id: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            cluster_id: cluster_id.into(),
            data_dir: data_dir.into(),
            initial_members: BTreeMap::new(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_millis(1000),
            snapshot_threshold: 10_000,
            snapshot_log_percent: 100,
            keep_logs_after_snapshot: 1_000,
            keep_log_bytes_after_snapshot: 8 << 20,
            max_entries_per_message: 256,
            request_timeout: Duration::from_secs(5),
            rpc_timeout: Duration::from_millis(1000),
            transport: TransportConfig::default(),
            new_data_dir: crate::data_dir::NewDataDir::Refuse,
        }
    }

    /// The longest command (encoded) a proposal may carry: `transport.max_frame_bytes` less
    /// room for the envelope of one replication message (4 KiB, or half the frame limit when
    /// that is smaller). Both engines refuse a longer one with `InvalidRequest` before
    /// appending anything, on the leader and through a follower.
    pub fn max_command_bytes(&self) -> usize {
        let frame = self.transport.max_frame_bytes;
        frame - (frame / 2).min(4096)
    }

    /// The size of one snapshot-transfer chunk: the frame limit less room for the chunk's
    /// header, at most [`MAX_SNAPSHOT_CHUNK_BYTES`] (bigger chunks do not go faster, they only
    /// hold more memory).
    pub fn snapshot_chunk_bytes(&self) -> usize {
        let frame = self.transport.max_frame_bytes;
        (frame - (frame / 2).min(4096)).min(MAX_SNAPSHOT_CHUNK_BYTES)
    }

    /// Checks the settings relate sensibly; returns what to fix otherwise.
    pub fn validate(&self) -> Result<(), ConsensusError> {
        let bad = |m: &str| Err(ConsensusError::InvalidRequest(format!("config: {m}")));
        if self.cluster_id.is_empty() {
            return bad("cluster_id must not be empty");
        }
        if self.heartbeat_interval.is_zero() {
            return bad("heartbeat_interval must be > 0");
        }
        if self.election_timeout_min < self.heartbeat_interval * 3 {
            return bad("election_timeout_min must be at least 3 heartbeat intervals");
        }
        if self.election_timeout_max <= self.election_timeout_min {
            return bad("election_timeout_max must exceed election_timeout_min");
        }
        if self.snapshot_threshold == 0 || self.max_entries_per_message == 0 {
            return bad("snapshot_threshold and max_entries_per_message must be > 0");
        }
        if self.transport.max_frame_bytes < 1024 {
            return bad("transport.max_frame_bytes must be at least 1 KiB");
        }
        Ok(())
    }
}

/// Transport settings shared by every transport implementation.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TransportConfig {
    /// Address to listen on; port 0 picks a free port (read it back with `local_addr`).
    pub listen_addr: SocketAddr,
    /// Frames larger than this are refused on send and on receive.
    pub max_frame_bytes: usize,
    /// Bytes of inbound calls one peer may have in this node's memory at once (being read or
    /// waiting for their handler's answer); a call beyond it waits, unread, until earlier ones
    /// are answered, so the peer is slowed by flow control instead of growing this node's
    /// memory. At least one frame always fits (the effective budget is the larger of this and
    /// `max_frame_bytes`). Default 64 MiB. Enforced per connection by both transports
    /// (transport-grpc charges a call for the whole message its gRPC prefix declares before
    /// reading it and holds that until the answer, and allows a connection 4 one-way streams,
    /// each holding at most one frame). A call beyond the budget waits, unread, for earlier
    /// ones to be answered (backpressure, not an error); the conformance scenario
    /// `a_peer_cannot_hold_more_call_bytes_than_its_budget` checks it on every transport.
    pub max_inflight_bytes_per_peer: usize,
    /// Bounded per-peer queue of one-way frames; when full, new frames are dropped.
    pub peer_queue_capacity: usize,
    /// Deadline to establish a connection.
    pub connect_timeout: Duration,
    /// First reconnect delay after a failure; doubles up to `reconnect_backoff_max`.
    pub reconnect_backoff_min: Duration,
    /// Largest reconnect delay.
    pub reconnect_backoff_max: Duration,
    /// Transport security.
    pub tls: TlsConfig,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            max_frame_bytes: 16 << 20,
            max_inflight_bytes_per_peer: 64 << 20,
            peer_queue_capacity: 4096,
            connect_timeout: Duration::from_secs(2),
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_secs(2),
            tls: TlsConfig::Unset,
        }
    }
}

/// How a transport secures its connections. Secure is the default: with nothing configured
/// ([`TlsConfig::Unset`]) a transport refuses to start and says what to configure.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsConfig {
    /// Nothing configured (the default): starting a transport fails with an error naming the
    /// choices. TLS is never off unless [`TlsConfig::InsecurePlaintext`] is chosen.
    #[default]
    Unset,
    /// No TLS at all, for local experiments only: traffic is readable and unauthenticated, so
    /// anyone who reaches the port can claim to be any member. A transport started with it logs
    /// a warning saying so, and reports [`Transport::authenticates_peers`](crate::Transport)
    /// `false`: identity claims are not trusted (forwarded membership changes are refused). QUIC
    /// does not support it.
    InsecurePlaintext,
    /// Mutual TLS with PEM files: the cluster CA, this node's certificate and key. A peer's
    /// certificate must be signed by the CA and name the node id it claims.
    Files {
        /// The cluster CA certificate (PEM).
        ca_cert: PathBuf,
        /// This node's certificate (PEM), signed by the CA.
        node_cert: PathBuf,
        /// This node's private key (PEM).
        node_key: PathBuf,
    },
    /// Generate (once) a development CA and node certificates into this directory.
    DevCerts {
        /// Directory holding the generated material.
        dir: PathBuf,
    },
}
