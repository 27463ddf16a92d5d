//! # broker: a KRaft-like metadata plane on the consensus contract
//!
//! The metadata library depends only on `consensus-api`: no engine, transport or CLI crate
//! appears in its dependencies. The node binary (`broker-node`: wiring, `serve`, `dev`, `demo`
//! and the admin CLI) is a separate crate, the one place that names engines and transports.
//!
//! - [`MetadataMachine`]: the replicated image (brokers, topics, partitions with replicas,
//!   leader, ISR, leader and partition epochs) and a bounded feed of changes by log offset.
//!   Every record is applied deterministically; refused records change nothing.
//! - [`Controller`]: typed calls that append records through any node (forwarded to the
//!   leader), linearizable image reads, a long-polling feed, and the liveness loop that fences a
//!   broker whose heartbeats stopped for the session timeout.
//! - [`BrokerAgent`]: what a broker process runs: register, heartbeat, re-register when its
//!   epoch went stale, controlled shutdown.

#![warn(missing_docs, unreachable_pub)]

pub mod admin;
pub mod admin_tls;
pub mod configs;
mod controller;
#[doc(hidden)]
pub mod fuzzing;
mod machine;
pub mod model;
mod placement;
pub mod quorum;
pub mod server;

pub use controller::{BrokerAgent, Controller, ControllerError, LivenessConfig, MetadataNode};
pub use machine::{FeedGap, MetadataMachine};
pub use model::*;
