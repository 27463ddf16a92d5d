//! openraft's network over the byte transport.
//!
//! - **Replication** (`stream_append`) is pipelined over ordered one-way frames
//!   ([`Transport::send`](consensus_api::Transport::send)): up to [`stream::MAX_IN_FLIGHT`]
//!   AppendEntries requests are in flight to a follower at once, and the follower feeds them, in
//!   order, to [`openraft::Raft::stream_append`]. Each AppendEntries is one frame; the log store bounds the entries it carries by bytes
//!   ([`crate::LogStore::new`]), so a frame stays within the transport's limit.
//! - **Full snapshots** go in two steps. The snapshot file is copied to the follower in
//!   chunks over the node's snapshot channel (`EngineContext::snapshot_transport`) by the
//!   engine's one [`SnapshotSender`](consensus_storage::transfer::SnapshotSender), a few
//!   chunk calls in flight, each within the frame limit; an interrupted copy of the same file
//!   resumes. The follower's [`SnapshotReceiver`](consensus_storage::transfer::SnapshotReceiver)
//!   writes the chunks to a temporary file and checks its size and checksum. Then one small
//!   `Rpc::Snapshot { vote, meta, ticket }` call names the copy; the handler takes the checked
//!   file for that ticket and hands it to `Raft::install_full_snapshot` (the state machine
//!   installs it, then restores from it). A ticket whose file is not there is an error:
//!   openraft sends the snapshot again later. openraft's `cancel` stops the copy at once.
//! - **Everything else** (vote, pre-vote, transfer-leader, and the heartbeat worker's single
//!   appends) is one [`Transport::call`](consensus_api::Transport::call), answered by
//!   [`RaftHandler`]'s `on_call`.
//!
//! # Files
//!
//! - `wire.rs`: the wire types ([`wire::Rpc`], [`wire::RpcReply`], [`wire::StreamFrame`] and
//!   its tag) and [`wire::CallError`], how a failed exchange maps onto openraft's errors;
//! - `client.rs`: the leader-side client, [`NetworkFactory`] and its per-peer `PeerClient`
//!   (openraft's `RaftNetworkV2`), with one generic call helper for every RPC and the snapshot
//!   sender;
//! - `stream/`: the stream protocol as plain state machines, no I/O and no clock: the
//!   leader's [`stream::LeaderStream`] (`leader.rs`), the follower's [`stream::FollowerStream`]
//!   and [`stream::FollowerAnswers`] (`follower.rs`);
//! - `pipeline.rs`: [`pipeline::Pipeline`], the async driver of a `LeaderStream` over the
//!   transport;
//! - `routes.rs`: [`StreamRoutes`], which hands follower replies to the leader's open streams,
//!   and where a peer's address comes from when the transport lacks it;
//! - `follower.rs`: the follower's streams (one per leader node) and the tasks that feed them
//!   to openraft;
//! - `handler.rs`: [`RaftHandler`], the transport's inbound handler, which also keeps the
//!   snapshot receiver;
//! - `guard.rs`: what an inbound request must satisfy before openraft sees it (the leader or
//!   candidate it names is the authenticated sender; log ids in protocol order).
//!
//! # The stream protocol
//!
//! Calls are not used for replication because inbound calls may run concurrently (each QUIC call
//! is its own task), so two appends could reach openraft out of order. One-way frames to a peer
//! arrive in order or not at all, which is exactly what a pipeline needs: a gap is detectable.
//!
//! Every stream frame is a bincode `(STREAM_FRAME_TAG, StreamFrame)` pair on the engine channel's
//! one-way path (`on_message`); the call path (`on_call`) only ever carries `Rpc` values.
//!
//! - The leader opens a stream per `stream_append` call with a fresh session id: request 0 goes
//!   as `Open { session, reply_to, req }`, which replaces whatever stream the same leader node had
//!   open on the follower, and requests 1, 2, ... as `Append { session, seq, req }`. `reply_to`
//!   is the leader's address from its own membership: a learner that joined later may not know
//!   it, and unlike a call, a one-way answer needs it.
//! - The follower hands requests of the current stream, strictly in sequence, to a bounded
//!   channel feeding `Raft::stream_append`, and sends each answer back as
//!   `Reply { session, seq, result }`. A gap, a full channel, or a frame of a stream it does not
//!   have makes it drop the stream and answer `Reset { session, reason }`.
//! - The leader matches replies to its in-flight queue and yields them in order. A reply out of
//!   sequence, a `Reset`, a per-request timeout (`rpc_timeout`), or a transport error ends the
//!   output stream with an `RPCError`; openraft then reports the error and starts a new stream.
//!   When the leader drops a stream it sends `Close { session }` so the follower frees it.

mod client;
mod follower;
mod guard;
mod handler;
mod pipeline;
mod routes;
mod stream;
mod wire;

pub(crate) use client::NetworkFactory;
pub(crate) use guard::{fuzz, hostile_frames};
pub(crate) use handler::RaftHandler;
pub(crate) use routes::StreamRoutes;
pub(crate) use wire::MAX_ENTRIES_PER_MESSAGE;
