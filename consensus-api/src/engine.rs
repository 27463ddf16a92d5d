//! What a backend implements: an [`Engine`] driving one Raft engine, started by a [`Backend`].
//!
//! Engines are leader-local: a follower answers `NotLeader { leader }` and the node handle above
//! ([`Consensus`](crate::Consensus)) forwards. This keeps the forwarding policy in one place.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{ByteStateMachine, ConsensusError, NodeConfig, NodeId, Status, Transport};

/// Everything an engine gets at start.
pub struct EngineContext {
    /// The node's configuration (validated).
    pub config: NodeConfig,
    /// The user's state machine, behind the byte interface.
    pub state_machine: Arc<dyn ByteStateMachine>,
    /// A transport channel reserved for the engine's own messages. It holds the handler the
    /// engine installs weakly: the engine must keep that handler alive itself.
    pub transport: Arc<dyn Transport>,
}

/// Starts engines of one kind; what a program names once, at wiring time.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name used in test names and logs (`tikv`, `openraft`).
    fn name(&self) -> &'static str;
    /// Opens (or creates) the node's durable state in `ctx.config.data_dir`, bootstraps a fresh
    /// cluster exactly once, and starts the engine.
    async fn start(&self, ctx: EngineContext) -> Result<Arc<dyn Engine>, ConsensusError>;
}

/// One running Raft node, driven by a backend. Every method maps engine outcomes onto
/// [`ConsensusError`].
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Replicates `command`; returns the state machine's encoded response once the entry is
    /// committed and applied on this node. Not the leader: `NotLeader`.
    async fn propose(&self, command: Vec<u8>) -> Result<Vec<u8>, ConsensusError>;
    /// Confirms leadership with a quorum and returns the read index: once a node has applied
    /// up to it, its state reflects every write committed before the call. Not the leader (or
    /// deposed): an error, never a stale index.
    async fn read_index(&self) -> Result<u64, ConsensusError>;
    /// Current status, updated on every change.
    fn status(&self) -> watch::Receiver<Status>;
    /// Adds a non-voting member and starts replicating to it (leader only).
    async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), ConsensusError>;
    /// Makes `voters` the voting set; current members not in it become learners, which
    /// `remove_node` then drops (leader only).
    async fn change_voters(&self, voters: BTreeSet<NodeId>) -> Result<(), ConsensusError>;
    /// Removes a member (voter or learner) from the cluster entirely (leader only).
    async fn remove_node(&self, id: NodeId) -> Result<(), ConsensusError>;
    /// Hands leadership to `to` (leader only); returns once the request is made.
    async fn transfer_leader(&self, to: NodeId) -> Result<(), ConsensusError>;
    /// Takes a snapshot now and compacts the log; returns the snapshot's last index.
    async fn snapshot_now(&self) -> Result<u64, ConsensusError>;
    /// Stops the engine and flushes its storage. Idempotent.
    async fn shutdown(&self) -> Result<(), ConsensusError>;
}
