//! # broker: a KRaft-like metadata plane on the consensus contract
//!
//! Work in progress (see the broker issue): this crate has the metadata state machine, the
//! controller API with its liveness loop, and the broker agent. The admin HTTP API, the `broker`
//! binary (`serve`, `dev`, `demo`, admin commands) and metrics are not written yet.
//!
//! It depends only on `consensus-api`: no engine or transport type appears here.
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

mod controller;
mod machine;
pub mod model;
mod placement;

pub use controller::{BrokerAgent, Controller, ControllerError, LivenessConfig, MetadataNode};
pub use machine::{FeedGap, MetadataMachine};
pub use model::*;
