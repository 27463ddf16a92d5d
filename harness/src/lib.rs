//! # consensus-harness: local clusters of real nodes
//!
//! The one harness the conformance suite, the broker demo and the kvstore example start their
//! clusters with (the idea of raft-rs's `harness` crate). Nodes are real: real transports on
//! 127.0.0.1 with port 0, real data dirs with fsync. By default each node runs on its own tokio
//! runtime, so [`LocalCluster::crash`] kills every task, connection and timer of a node at once;
//! tests ([`ClusterOptions::for_test`]) give each node a simulated disk
//! ([`consensus_storage::fs::SimFs`], [`StorageChoice::PowerLoss`]) so a crash is also a power
//! cut that loses whatever was not made durable.
//!
//! - [`Combo`]: a backend and a transport, what a cluster runs.
//! - [`NodeKind`]: what runs on each node: a plain [`Consensus`](consensus_api::Consensus) handle
//!   ([`Machines`]) or a program's own node (the broker's combined-mode node).
//! - [`LocalCluster`]: start, crash, stop, restart, add nodes, wait for leaders and indexes.
//! - [`fault`]: a [`Transport`](consensus_api::Transport) wrapper for partitions, loss, delay,
//!   call duplication and reordering, calls failed after delivery and node pauses, driven by a
//!   seed and counted.
//! - [`kv`]: the key-value state machine the scenarios replicate (streamed snapshots, a
//!   point-in-time view that costs one reference count).
//! - [`large_state`]: a key-value state many frames large, the small-frame settings, commands
//!   sized against the command limit, and waits on one state everywhere and chunked transfers.
//! - [`history`]: a thread-safe record of what concurrent clients asked and learned, stamped by
//!   one logical clock.
//! - [`linearizability`]: judges such a history: is there one order of the operations, consistent
//!   with real time, that a single register per key would have answered the same way?

#![warn(missing_docs, unreachable_pub)]

mod cluster;
mod combo;
pub mod fault;
pub mod history;
pub mod kv;
pub mod large_state;
pub mod linearizability;
mod node;
mod options;
mod run;
pub mod snapshot_hold;
mod waits;

pub use cluster::{LocalCluster, Remote};
pub use combo::Combo;
pub use node::{Machines, NodeKind};
pub use options::{ClusterOptions, Runtimes, StorageChoice, TlsChoice};
pub use run::{init_logging, seed};

/// A cluster of plain consensus nodes replicating `SM`.
pub type SmCluster<SM> = LocalCluster<Machines<SM>>;

/// A cluster of the key-value test machine, what most scenarios use.
pub type Cluster = SmCluster<kv::KvMachine>;

/// The node handle the key-value scenarios use.
pub type Node = consensus_api::Consensus<kv::KvMachine>;
