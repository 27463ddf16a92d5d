//! What a backend implements: an [`Engine`] driving one Raft engine, started by a [`Backend`].
//!
//! Engines are leader-local: a follower answers `NotLeader { leader }` and the node handle above
//! ([`Consensus`](crate::Consensus)) forwards. This keeps the forwarding policy in one place.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    ByteStateMachine, ConsensusError, NodeConfig, NodeId, Status, TransferProgress, Transport,
};

/// Everything an engine gets at start.
pub struct EngineContext {
    /// The node's configuration (validated).
    pub config: NodeConfig,
    /// The user's state machine, behind the byte interface.
    pub state_machine: Arc<dyn ByteStateMachine>,
    /// A transport channel reserved for the engine's own messages.
    ///
    /// **It holds the handler the engine installs weakly**: the engine must keep its
    /// [`InboundHandler`](crate::InboundHandler) alive itself (for example in the `Arc` the
    /// backend returns) for as long as it wants frames. A strong reference here would make a
    /// cycle (handler -> engine -> transport -> handler) that keeps a crashed node's storage
    /// open; a dropped handler means inbound engine frames are refused.
    pub transport: Arc<dyn Transport>,
    /// A second channel of the same transport, for snapshot transfers
    /// ([`channel::SNAPSHOT`](crate::channel::SNAPSHOT)): the chunks of a snapshot file travel
    /// here, each a call within the frame limit, so a large transfer never holds up the
    /// engine's own frames. Its handler is held weakly too.
    pub snapshot_transport: Arc<dyn Transport>,
}

/// Starts engines of one kind; what a program names once, at wiring time.
///
/// A backend's `start` must: open (or create) the node's durable state under
/// `config.data_dir`, refusing a data dir another running node holds ("in use"); bootstrap
/// `config.initial_members` exactly once, on a fresh data dir, and never again on restart;
/// install its inbound handler on `ctx.transport` and keep it alive; map every
/// [`NodeConfig`] setting onto its engine, or document per setting what it does instead.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name used in test names and logs (`tikv`, `openraft`).
    fn name(&self) -> &'static str;
    /// Opens (or creates) the node's durable state in `ctx.config.data_dir`, bootstraps a fresh
    /// cluster exactly once, and starts the engine.
    async fn start(&self, ctx: EngineContext) -> Result<Arc<dyn Engine>, ConsensusError>;

    /// Engine-channel payloads in this engine's wire format, each with a short description,
    /// that a conforming node must refuse (before its engine sees them, counting each in
    /// [`Status::refused_messages`], changing nothing else) when `leader`, an authenticated
    /// member, sends them to `to`, whose current status is `to_status`: a commit index beyond
    /// its log, entries out of log order, a leader or candidate that is not the sender, message
    /// kinds peers never send. For the conformance suite's hostile-input scenario, which sends
    /// them over the real transport with `leader`'s certificate. The default is none; the
    /// scenario then checks only the generic (undecodable) frames every backend must refuse.
    fn hostile_frames(
        &self,
        leader: NodeId,
        to: NodeId,
        to_status: &Status,
    ) -> Vec<(&'static str, bytes::Bytes)> {
        let _ = (leader, to, to_status);
        Vec::new()
    }

    /// Reads the durable state in `data_dir` without starting a node, taking no lock and
    /// changing nothing, for offline inspection (`broker debug dump`): the hard state (term,
    /// vote, commit), the membership, the log's bounds and up to `max_entries` of its last
    /// entries, and the snapshot's metadata, decoded from this engine's formats. The default
    /// says the backend cannot.
    fn inspect(
        &self,
        data_dir: &std::path::Path,
        max_entries: usize,
    ) -> Result<DataDirReport, ConsensusError> {
        let _ = (data_dir, max_entries);
        Err(ConsensusError::InvalidRequest(format!(
            "the {} backend cannot inspect a data dir offline",
            self.name()
        )))
    }

    /// Disaster recovery, **unsafe**: rewrites the durable state in `data_dir` of the stopped
    /// node `me` so that, started again, it runs with exactly `voters` as the voting set,
    /// after a permanent loss of a quorum of the old one (hashicorp raft's `RecoverCluster`).
    /// Every entry in this node's log counts as committed from then on: entries the cluster
    /// had not committed may commit, and entries only the lost nodes had are gone. Run it on
    /// each survivor with the same `voters` (or on the most up-to-date survivor with itself
    /// alone, then add the others back), start them, and replace the lost nodes.
    ///
    /// Obligations: refuse a running node's data dir (its lock is held: "in use"), a `voters`
    /// without `me`, and a voter that is not a member in the stored membership
    /// (`InvalidRequest`), changing nothing; otherwise write the new configuration durably, in
    /// the engine's own formats, so a plain restart uses it. Returns a description of what was
    /// written, for the operator's record. The default says the backend cannot.
    fn force_voters(
        &self,
        data_dir: &std::path::Path,
        me: NodeId,
        voters: &BTreeSet<NodeId>,
    ) -> Result<String, ConsensusError> {
        let _ = (data_dir, me, voters);
        Err(ConsensusError::InvalidRequest(format!(
            "the {} backend has no forced recovery",
            self.name()
        )))
    }
    /// Writes the durable state of node `me` of a **new** cluster into the empty directory
    /// `data_dir`, as if that cluster, with `members` (id to transport address) as its voters,
    /// had committed and compacted everything up to log index `index` (at least 1) into a
    /// snapshot whose state is `image` (read to its end; what the state machine's
    /// `snapshot_to` writes, as in a [`crate::backup`] file). For
    /// [`backup::restore_data_dir`](crate::backup::restore_data_dir), which adds the identity
    /// record.
    ///
    /// Obligations: refuse a directory that holds any durable state (`InvalidRequest`); write
    /// the engine's own formats durably (fsync) and stream the image (never whole in memory);
    /// write the same log state on every member given the same `members`, `index` and image, so
    /// they agree on the log up to `index` (the same entry at `index`, in a term every member
    /// knows); after it, a plain start of `me` restores `image` into its state machine, reports
    /// `applied_index` >= `index` and the voters `members`, elects a leader among the members,
    /// appends after `index`, and sends the image as a snapshot to nodes added later. The
    /// default says the backend cannot.
    fn seed(
        &self,
        data_dir: &std::path::Path,
        me: NodeId,
        members: &std::collections::BTreeMap<NodeId, String>,
        index: u64,
        image: &mut dyn std::io::Read,
    ) -> Result<String, ConsensusError> {
        let _ = (data_dir, me, members, index, image);
        Err(ConsensusError::InvalidRequest(format!(
            "the {} backend cannot restore a data dir from a backup",
            self.name()
        )))
    }
}

/// Checks a forced voter set against the stored membership (for
/// [`Backend::force_voters`] implementations): `me` must be in it and every voter a member.
pub fn check_forced_voters(
    me: NodeId,
    voters: &BTreeSet<NodeId>,
    members: &BTreeSet<NodeId>,
) -> Result<(), ConsensusError> {
    if !voters.contains(&me) {
        return Err(ConsensusError::InvalidRequest(format!(
            "node {me} must be one of the forced voters: run the recovery on each survivor \
             that is to vote"
        )));
    }
    if let Some(stranger) = voters.iter().find(|v| !members.contains(v)) {
        return Err(ConsensusError::InvalidRequest(format!(
            "node {stranger} is not a member in this data dir's membership {members:?}: only \
             survivors that hold the log can be forced voters; add new nodes afterwards"
        )));
    }
    Ok(())
}

/// What [`Backend::inspect`] finds in a data directory.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataDirReport {
    /// The backend that read it.
    pub backend: String,
    /// The current term, as stored.
    pub term: u64,
    /// Whom this node voted for in `term`.
    pub vote: Option<NodeId>,
    /// The commit index as stored (engines may store a lower bound of it).
    pub commit_index: u64,
    /// Voters of the latest membership in the log or snapshot.
    pub voters: BTreeSet<NodeId>,
    /// Learners of that membership.
    pub learners: BTreeSet<NodeId>,
    /// First and last live log index (`None`: no entries).
    pub log_bounds: Option<(u64, u64)>,
    /// The last entry compacted away: index and term.
    pub purged: Option<(u64, u64)>,
    /// The last entries (at most the number asked for), oldest first.
    pub entries: Vec<EntryReport>,
    /// The stored snapshot, if any.
    pub snapshot: Option<SnapshotReport>,
    /// Anything unusual (a torn tail in the log file, an entry that does not decode).
    pub notes: Vec<String>,
}

/// One log entry in a [`DataDirReport`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EntryReport {
    /// Log index.
    pub index: u64,
    /// Term it was proposed in.
    pub term: u64,
    /// `command`, `membership` or `blank` (a new leader's empty entry).
    pub kind: String,
    /// Size of the command (or of the engine's payload), in bytes.
    pub bytes: usize,
    /// For membership entries, the change.
    pub detail: Option<String>,
}

/// The stored snapshot in a [`DataDirReport`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotReport {
    /// The last index it covers.
    pub index: u64,
    /// The term of that entry.
    pub term: u64,
    /// Size of the state machine's data in it.
    pub data_bytes: u64,
    /// Voters of the membership it records.
    pub voters: BTreeSet<NodeId>,
    /// Learners of that membership.
    pub learners: BTreeSet<NodeId>,
}

/// One running Raft node, driven by a backend. Every method maps engine outcomes onto
/// [`ConsensusError`]; the conformance suite checks that both engines give the same kind in
/// the same situation.
///
/// # Obligations of an implementation
/// - **Leader-local.** Operations marked "leader only" answer `NotLeader { leader }` on any
///   other node, with the leader this node believes in (or `None`), having changed nothing:
///   the node handle forwards on exactly that error, so it must never mean "maybe applied".
/// - **Error kinds.** `InvalidRequest`: refused before anything was appended (unknown member,
///   a change while another is in progress, a command over the size limit). `Timeout`: the
///   deadline passed; for `propose` and membership changes the outcome is **unknown** (the
///   entry may still commit), as for a lost leadership after appending. `ShuttingDown`: the
///   engine has stopped (every method after [`shutdown`](Self::shutdown) or a fatal engine
///   error). `Storage`: the durable store failed; the node stops accepting writes.
/// - **Durability.** Nothing is acknowledged (a proposal answered, a vote granted, an append
///   acknowledged to the leader) before it is durable on this node's disk.
/// - **Status before answers.** The [`status`](Self::status) watch is published before the
///   answers of the same step are delivered: when `propose` returns, `status().applied_index`
///   already covers the entry; when a membership change returns, the status shows it.
/// - **One size rule.** A command longer than
///   [`NodeConfig::max_command_bytes`] is refused with `InvalidRequest` before anything is
///   appended; replication messages stay within `transport.max_frame_bytes` however many entries
///   are due (they are bounded by bytes as well as by count), so a run of commands each just
///   under the limit replicates.
/// - **Large state.** A snapshot never travels as one frame: the engine streams the snapshot
///   file in chunks within the frame limit over `snapshot_transport`, the receiver writes them
///   to a temporary file, checks its size and checksum, and installs it atomically (a partial
///   transfer is never installed). Snapshots are written from a point-in-time
///   [`ByteStateMachine::capture`] off the apply path and restored with
///   [`ByteStateMachine::restore_from`], so neither side holds a whole extra copy in memory.
/// - **Stopping.** When the engine stops (shutdown or a fatal error) its status watch stops
///   changing (`changed()` fails once the sender is dropped) and every call fails.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Replicates `command` (leader only); returns the state machine's encoded response once
    /// the entry is committed and applied on this node. `Timeout`: outcome unknown.
    async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError>;
    /// Confirms leadership with a quorum and returns the read index (leader only): once a node
    /// has applied up to it, its state reflects every write committed before the call. Not the
    /// leader, deposed, or no quorum in time: `NotLeader` or `Timeout`, never a stale index.
    async fn read_index(&self) -> Result<u64, ConsensusError>;
    /// Current status, updated on every change (see the status-before-answers rule). On the
    /// leader, [`Status::replication`] has an entry for every other member (voters and
    /// learners) with its matched index; empty on other nodes.
    fn status(&self) -> watch::Receiver<Status>;
    /// Adds a non-voting member and replicates to it (leader only). Returns once the learner
    /// is in the committed membership, without waiting for it to catch up (it may be far away
    /// or not running yet): the leader's [`Status::replication`] shows how far it has come,
    /// and [`Consensus::change_voters`](crate::Consensus::change_voters) refuses to promote it
    /// before it has caught up. An existing learner with the same address: `Ok` without a
    /// change.
    async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), ConsensusError>;
    /// Makes `voters` the voting set (leader only), through joint consensus where the engine
    /// needs it; returns once the final configuration is committed. Current members not in it
    /// become learners, which `remove_node` then drops. Ids that are not members:
    /// `InvalidRequest`.
    async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ConsensusError>;
    /// Removes a member (voter or learner) from the cluster entirely (leader only); returns
    /// once the configuration without it is committed. A node that is not a member: `Ok`
    /// without a change (the node handle retries a removal whose answer was lost, as when the
    /// leader removed itself). Removing the last voter: `InvalidRequest`.
    async fn remove_node(&self, id: NodeId) -> Result<(), ConsensusError>;
    /// Hands leadership to `to` (leader only); returns once the request is made, not when `to`
    /// leads (the node handle waits for that).
    async fn transfer_leader(&self, to: NodeId) -> Result<(), ConsensusError>;
    /// Takes a snapshot of this node's applied state now and compacts the log behind it (on
    /// any node); returns the snapshot's last index.
    ///
    /// Obligations: the snapshot returned covers at least every entry applied when the call was
    /// made, also when a snapshot is being built already (an engine that ignores requests
    /// during a build takes another one after it, rather than answer with the older snapshot
    /// or never answer); applies go on while a state machine's view is written; the call
    /// fails with `ShuttingDown` if the node stops first.
    async fn snapshot_now(&self) -> Result<u64, ConsensusError>;
    /// The snapshot transfers this node is running, sending or receiving, and the last one that
    /// ended with each peer and direction (with its outcome).
    fn snapshot_transfers(&self) -> Vec<TransferProgress>;
    /// Stops the engine and flushes its storage. Idempotent; later calls of every other method
    /// fail with `ShuttingDown`.
    async fn shutdown(&self) -> Result<(), ConsensusError>;
}
