//! # consensus-api: one contract, any Raft engine, any transport
//!
//! This crate is everything a program (or the broker) needs to use replicated consensus without
//! naming an engine or a network: a typed node handle ([`Consensus`]), the state machine an
//! embedder implements ([`StateMachine`]), the byte-level [`Transport`], one error type
//! ([`ConsensusError`]) and one configuration ([`NodeConfig`]). Backends implement [`Backend`] /
//! [`Engine`]; transports implement [`Transport`] / [`TransportFactory`]. This crate depends on
//! neither.
//!
//! ```text
//!  program ──> Consensus<SM> ──(forwarding, typed codec)──> dyn Engine ──> raft-rs | openraft
//!                    │                                          │
//!                    └──────── Mux: channel 1 (forward) ────────┴── channel 0 (engine) ──> dyn Transport
//! ```
//!
//! ## Who uses what
//! | audience | items |
//! |---|---|
//! | embedder | [`Consensus`], [`StateMachine`], [`NodeConfig`], [`ConsensusError`] / [`ErrorKind`], [`Status`], [`Wiring`], [`process`] |
//! | backend author | [`Backend`], [`Engine`], [`EngineContext`], [`ByteStateMachine`], [`backend_support`], [`codec`] |
//! | transport author | [`Transport`], [`TransportFactory`], [`InboundHandler`], [`TransportError`], [`TransportLayer`] (wrappers) |
//!
//! Each trait states the obligations of an implementation on itself.
//!
//! ## Embedding
//! ```text
//! let transport = transport_grpc::GrpcFactory.bind(&config).await?;      // the wiring line
//! let node = Consensus::start(&backend_openraft::OpenraftBackend, config, MyMachine::default(), transport).await?;
//! let response = node.propose(MyCommand::Put { key, value }).await?;     // committed and applied
//! let value = node.read(|sm| sm.get(&key)).await?;                        // linearizable
//! ```
//!
//! ## How each engine implements the contract
//!
//! | contract | raft-rs (`raft` 0.7, `backend-tikv`) | openraft (0.10, `backend-openraft`) |
//! |---|---|---|
//! | start / bootstrap | a driver task owns `RawNode`; on a fresh data dir an initial member writes the voters as the `ConfState` of a snapshot at index 1, once (a node that joins later starts empty and installs a snapshot); restart rebuilds `Storage` from disk | `Raft::new` over our `RaftLogStorage` + `RaftStateMachine`; `initialize(voters)` only when the log is empty and no vote exists, so restart never re-initializes |
//! | [`Engine::propose`] | `RawNode::propose`, the driver remembers `(index, term) -> waiter`; the waiter is completed with the state machine response when the entry applies; a different term at that index = `Timeout` (outcome unknown, like openraft's `LogEntryDiscarded`); `ProposalDropped` = `NotLeader` | `Raft::client_write`; `ForwardToLeader` maps to `NotLeader { leader }` |
//! | [`Engine::read_index`] | `RawNode::read_index(ctx)` (`ReadOnlySafe`); the `ReadState` with our ctx gives the index; re-issued while a new leader has not committed in its term; pending reads fail with `NotLeader` when the node stops leading | `Raft::ensure_linearizable` (heartbeat quorum), the returned read log id's index |
//! | [`Consensus::linearizable_read`] | forward read-index to the leader, wait until the local applied index reaches it | same |
//! | [`Engine::status`] / [`Consensus::watch`] | built by the driver after each Ready from the raft state, `raft_log.committed`, the applied index and the `ConfState`; published before the cycle's answers are delivered | `Raft::metrics()` watch mapped to [`Status`] |
//! | [`Engine::add_learner`] | `ConfChangeV2` with `AddLearnerNode`, address carried in the change's context; answers once the learner matched the change's index | `Raft::add_learner(id, BasicNode{addr}, blocking=true)` |
//! | [`Engine::change_voters`] | `ConfChangeV2` of several `AddNode`/`AddLearnerNode` changes: joint consensus, left automatically | `Raft::change_membership(ReplaceAllVoters(set), retain=true)` (joint then uniform) |
//! | [`Engine::remove_node`] | `ConfChangeV2` `RemoveNode` | `change_membership(RemoveNodes/RemoveVoters)` |
//! | [`Engine::transfer_leader`] | `RawNode::transfer_leader(to)` (MsgTimeoutNow) | `raft.trigger().transfer_leader(to)` |
//! | [`Engine::snapshot_now`] | state machine snapshot at the applied index into the snapshot file, then compact the log | `raft.trigger().snapshot()` and wait for the snapshot metric; purge follows the snapshot policy |
//! | [`Engine::shutdown`] | stop the driver loop, flush the log | `Raft::shutdown` |
//! | pre-vote / check-quorum | `Config { pre_vote: true, check_quorum: true }` | `Config { enable_elect: true, ... }` leader lease + pre-vote of 0.10 |
//! | transport | one-way [`Transport::send`] of protobuf `Message`s (a snapshot: its file in chunks on the snapshot channel, then the `MsgSnapshot` with the transfer's ticket as a [`Transport::call`], outcome to `report_snapshot`); `report_unreachable` on send failures; a periodic address book lets an empty new node answer before its snapshot | replication pipelined over one-way [`Transport::send`] (sessions of sequenced AppendEntries fed in order to `Raft::stream_append`); [`Transport::call`] for vote, heartbeats, and the install-snapshot call that follows the file's chunked transfer |
//!
//! Errors: both engines' errors are mapped at the backend boundary to [`ConsensusError`], so the
//! same scenario gives the same [`ErrorKind`] on either engine.

#![warn(missing_docs, unreachable_pub)]

pub mod backup;
pub mod batch;
pub mod codec;

/// The channel tags of a node's shared transport: every frame a [`Consensus`] node sends
/// starts with one byte naming who it is for, so wrappers below the node (fault injection,
/// metrics) can tell engine traffic from forwarded client operations without decoding them.
pub mod channel {
    /// Engine traffic (Raft messages): engines tolerate its loss, delay and duplication.
    pub const ENGINE: u8 = 0;
    /// Forwarded client operations: each must be delivered at most once.
    pub const FORWARD: u8 = 1;
    /// Snapshot transfers: chunks of snapshot files, sent as calls; idempotent (a chunk says
    /// where it goes), so loss, delay and duplication only cost a retry.
    pub const SNAPSHOT: u8 = 2;
}

mod config;
pub mod data_dir;
mod engine;
mod error;
#[doc(hidden)]
pub mod fuzzing;
mod layer;
pub mod metrics;
mod mux;
mod node;
mod pacer;
pub mod process;
mod refusals;
mod replication;
mod state_machine;
mod transport;
pub mod transport_support;
mod types;
mod wiring;

/// Helpers for backend implementations; embedders never need this.
pub mod backend_support {
    pub use crate::pacer::SnapshotPacer;
    pub use crate::refusals::{RefusedMessages, REFUSAL_LOG_EVERY};
    pub use crate::replication::ReplicationTracker;
}

pub use config::{NodeConfig, TlsConfig, TransportConfig, MAX_SNAPSHOT_CHUNK_BYTES};
pub use data_dir::NewDataDir;
pub use engine::{
    check_forced_voters, Backend, DataDirReport, Engine, EngineContext, EntryReport, SnapshotReport,
};
pub use error::{ConsensusError, ErrorKind, TransportError};
pub use layer::TransportLayer;
pub use node::{members, Consensus};
pub use state_machine::{
    serialized_view, ByteStateMachine, PreparedRestore, SnapshotView, StateMachine,
};
pub use transport::{InboundHandler, Transport, TransportFactory};
pub use types::{
    NodeId, ReplicaProgress, Role, Status, TransferDirection, TransferProgress,
    CONTACT_RESOLUTION_MS,
};
pub use wiring::Wiring;
