//! The replication stream protocol as plain state machines: no transport, no runtime, no clock.
//!
//! - [`LeaderStream`] (`leader.rs`): the leader's side of one stream (sequence numbers, the
//!   in-flight window of [`MAX_IN_FLIGHT`] requests with their deadlines, matching replies,
//!   ending on a gap, a reset or a timeout). [`super::pipeline`] drives it over the transport.
//! - [`FollowerStream`] (`follower.rs`): what the follower decides about the requests of the
//!   stream it has open for one leader (the next sequence number expected; a gap or a foreign
//!   session resets, for a [`ResetReason`]).
//! - [`FollowerAnswers`] (`follower.rs`): how the follower numbers openraft's answers and when
//!   it stops.
//!
//! Time is a parameter (`now`), so their tests need no clock and no network.

mod follower;
mod leader;

pub(crate) use follower::{FollowerAnswers, FollowerStream, ResetReason};
pub(crate) use leader::LeaderStream;

/// Most AppendEntries requests in flight on one replication stream; also the capacity of the
/// follower's per-stream queue. With `max_payload_entries` entries per request, this bounds the
/// unacknowledged data per follower.
pub(crate) const MAX_IN_FLIGHT: usize = 64;
