//! # backend-openraft: openraft behind the consensus contract
//!
//! [`OpenraftBackend`] starts an `openraft` 0.10 node (pinned `=0.10.0-alpha.37`: the 0.10 line
//! has leader transfer and pre-vote, which 0.9 lacks) with:
//! - storage v2 over `consensus-storage`: log entries, vote and committed id in one checksummed
//!   append-only file, fsynced before openraft is told they are durable (`IOFlushed` is completed
//!   by the log's writer thread after `fdatasync`); snapshots are files (openraft's
//!   `SnapshotData` is a [`consensus_storage::SnapshotFile`]), written from a point-in-time
//!   capture of the state machine off the apply path, installed atomically, restored as a stream:
//!   the state is never whole in memory;
//! - the network over any [`consensus_api::Transport`]: replication (`stream_append`) is
//!   pipelined over ordered one-way frames, up to 64 AppendEntries in flight per follower, fed
//!   in order to `Raft::stream_append` there; vote, pre-vote, transfer-leader and heartbeats
//!   are one `Transport::call` each; a full snapshot's file is streamed in chunks over the
//!   snapshot channel (`consensus_storage::transfer`, resuming an interrupted transfer), then
//!   one small call names it and the follower installs it;
//! - one size rule: `propose` refuses a command over
//!   [`NodeConfig::max_command_bytes`](consensus_api::NodeConfig::max_command_bytes) before
//!   anything is appended, and each AppendEntries carries at most that many bytes of entries
//!   (always at least one), so every message fits `transport.max_frame_bytes`;
//! - bootstrap exactly once: `Raft::initialize` runs only on a data dir with no log, vote or
//!   snapshot, and a marker records it; a restart never re-initializes;
//! - pre-vote on (`enable_pre_vote`), leader lease reads via `ensure_linearizable(ReadIndex)`,
//!   leader transfer via `trigger().transfer_leader`;
//! - every openraft error mapped onto [`consensus_api::ConsensusError`] in `mapping.rs`.

#![warn(missing_docs, unreachable_pub)]

mod engine;
#[doc(hidden)]
pub mod fuzzing;
mod inspect;
mod log_store;
mod mapping;
mod network;
mod state_machine;
mod types;

use std::sync::Arc;

use async_trait::async_trait;
use consensus_api::{Backend, ConsensusError, Engine, EngineContext, NodeId};

pub use engine::OpenraftEngine;
pub use log_store::LogStore;
pub use state_machine::StateMachineStore;
pub use types::{Request, Response, TypeConfig};

/// The openraft node type of this backend.
pub type OpenRaft = openraft::Raft<TypeConfig, StateMachineStore>;

/// Starts openraft engines; the value a program names at wiring time.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenraftBackend;

#[async_trait]
impl Backend for OpenraftBackend {
    fn name(&self) -> &'static str {
        "openraft"
    }

    async fn start(&self, ctx: EngineContext) -> Result<Arc<dyn Engine>, ConsensusError> {
        Ok(Arc::new(OpenraftEngine::start(ctx).await?))
    }

    fn inspect(
        &self,
        data_dir: &std::path::Path,
        max_entries: usize,
    ) -> Result<consensus_api::DataDirReport, ConsensusError> {
        inspect::inspect(data_dir, max_entries)
    }

    fn force_voters(
        &self,
        data_dir: &std::path::Path,
        me: NodeId,
        voters: &std::collections::BTreeSet<NodeId>,
    ) -> Result<String, ConsensusError> {
        inspect::force_voters(data_dir, me, voters)
    }

    fn seed(
        &self,
        data_dir: &std::path::Path,
        _me: NodeId,
        members: &std::collections::BTreeMap<NodeId, String>,
        index: u64,
        image: &mut dyn std::io::Read,
    ) -> Result<String, ConsensusError> {
        inspect::seed(data_dir, members, index, image)
    }

    fn hostile_frames(
        &self,
        leader: NodeId,
        to: NodeId,
        to_status: &consensus_api::Status,
    ) -> Vec<(&'static str, bytes::Bytes)> {
        network::hostile_frames(leader, to, to_status)
    }
}
