//! # broker: a KRaft-like metadata plane on the consensus contract
//!
//! The metadata library depends only on `consensus-api`: no engine or transport type appears in
//! it. [`wiring`] is the one module that names them (behind this crate's cargo features, see
//! its docs); the `broker` binary turns `--backend` / `--transport` into a running node with
//! it.
//!
//! - [`MetadataMachine`]: the replicated image (brokers, topics, partitions with replicas,
//!   leader, ISR, leader and partition epochs) and a bounded feed of changes by log offset.
//!   Every record is applied deterministically; refused records change nothing.
//! - [`Controller`]: typed calls that append records through any node (forwarded to the
//!   leader), linearizable image reads, a long-polling feed, and the liveness loop that fences a
//!   broker whose heartbeats stopped for the session timeout.
//! - [`BrokerAgent`]: what a broker process runs: register, heartbeat, re-register when its
//!   epoch went stale, controlled shutdown.

#![warn(missing_docs)]

pub mod admin;
mod controller;
pub mod http;
mod machine;
pub mod model;
mod placement;
pub mod server;
pub mod wiring;

pub use controller::{BrokerAgent, Controller, ControllerError, LivenessConfig, MetadataNode};
pub use machine::{FeedGap, MetadataMachine};
pub use model::*;
