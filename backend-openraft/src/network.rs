//! openraft's network over the byte transport.
//!
//! - **Replication** (`stream_append`) is pipelined over ordered one-way frames
//!   ([`Transport::send`]): up to [`MAX_IN_FLIGHT`] AppendEntries requests are in flight to a
//!   follower at once, and the follower feeds them, in order, to [`openraft::Raft::stream_append`].
//! - **Everything else** (vote, pre-vote, full snapshot, transfer-leader, and the heartbeat
//!   worker's single appends) is one [`Transport::call`], answered by [`RaftHandler::on_call`].
//!
//! # The stream protocol
//!
//! Calls are not used for replication because inbound calls may run concurrently (each QUIC call
//! is its own task), so two appends could reach openraft out of order. One-way frames to a peer
//! arrive in order or not at all, which is exactly what a pipeline needs: a gap is detectable.
//!
//! Every stream frame is a bincode `(STREAM_FRAME_TAG, StreamFrame)` pair on the engine channel's
//! one-way path (`on_message`); the call path (`on_call`) only ever carries [`Rpc`] values.
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
//!   output stream with an [`RPCError`]; openraft then reports the error and starts a new stream.
//!   When the leader drops a stream it sends `Close { session }` so the follower frees it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{codec, InboundHandler, NodeId, Transport, TransportError};
use futures::{Stream, StreamExt};
use openraft::async_runtime::WatchReceiver;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf, WatchReceiverOf};
use openraft::{BasicNode, OptionalSend, RPCTypes, RaftMetrics, Snapshot};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::types::{SnapshotData, C};
use crate::OpenRaft;

/// Most AppendEntries requests in flight on one replication stream; also the capacity of the
/// follower's per-stream queue. With `max_payload_entries` entries per request, this bounds the
/// unacknowledged data per follower.
pub(crate) const MAX_IN_FLIGHT: usize = 64;

/// First value of every stream frame: tells a replication frame from anything else that might
/// arrive one-way on the engine channel (and versions the stream protocol).
const STREAM_FRAME_TAG: u8 = 0x5A;

/// How long a follower waits for its membership to name a leader whose address its transport
/// does not know yet (a learner that joined later), before giving up on one reply.
const LEADER_ADDRESS_WAIT: Duration = Duration::from_millis(200);

// ---------------------------------------------------------------------------------------------
// Wire types
// ---------------------------------------------------------------------------------------------

/// One engine RPC on the wire (the call path).
#[derive(Serialize, Deserialize)]
enum Rpc {
    Append(AppendEntriesRequest<C>),
    Vote(VoteRequest<C>),
    PreVote(VoteRequest<C>),
    Snapshot {
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        data: SnapshotData,
    },
    TransferLeader(TransferLeaderRequest<C>),
}

/// The answer to an [`Rpc`]; `Err` carries the receiver's failure as text.
#[derive(Serialize, Deserialize)]
enum RpcReply {
    Append(AppendEntriesResponse<C>),
    Vote(VoteResponse<C>),
    Snapshot(SnapshotResponse<C>),
    TransferLeader(TransferLeaderResponse<C>),
}

/// One frame of a replication stream, sent one-way (the stream path).
#[derive(Serialize, Deserialize)]
enum StreamFrame {
    /// Leader to follower: opens stream `session` with its request 0, replacing the stream this
    /// leader had open on the follower. `reply_to` is the leader's address, for a follower whose
    /// transport does not know it yet.
    Open {
        session: u64,
        reply_to: Option<String>,
        req: AppendEntriesRequest<C>,
    },
    /// Leader to follower: request `seq` (1, 2, ...) of stream `session`.
    Append {
        session: u64,
        seq: u64,
        req: AppendEntriesRequest<C>,
    },
    /// Leader to follower: the leader dropped stream `session`.
    Close { session: u64 },
    /// Follower to leader: openraft's answer to request `seq` of `session`, or the text of the
    /// fatal error that stopped the follower's openraft.
    Reply {
        session: u64,
        seq: u64,
        result: Result<StreamAppendResult<C>, String>,
    },
    /// Follower to leader: the follower dropped stream `session` (a gap, a full queue, a stream it
    /// does not have).
    Reset { session: u64, reason: String },
}

fn encode_frame(frame: &StreamFrame) -> Result<Bytes, codec::CodecError> {
    codec::encode(&(STREAM_FRAME_TAG, frame)).map(Bytes::from)
}

fn decode_frame(bytes: &[u8]) -> Result<StreamFrame, String> {
    let (tag, frame): (u8, StreamFrame) = codec::decode(bytes).map_err(|e| e.to_string())?;
    if tag != STREAM_FRAME_TAG {
        return Err(format!("unknown one-way frame tag {tag:#04x}"));
    }
    Ok(frame)
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// A failed exchange with a peer, before it is typed for one openraft RPC.
enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

impl CallError {
    /// Classifies a transport failure: `Unreachable` (openraft backs off) when the peer cannot be
    /// reached at all, `Network` (openraft retries at once) otherwise.
    fn from_transport(e: TransportError) -> Self {
        match e {
            TransportError::Timeout(d) => CallError::Timeout(d),
            e @ (TransportError::Unreachable { .. }
            | TransportError::UnknownPeer(_)
            | TransportError::Closed
            | TransportError::Refused(_)) => CallError::Unreachable(e.to_string()),
            e => CallError::Network(e.to_string()),
        }
    }

    fn into_rpc(self, me: NodeId, target: NodeId, action: RPCTypes) -> RPCError<C> {
        match self {
            CallError::Timeout(timeout) => RPCError::Timeout(Timeout {
                action,
                id: me,
                target,
                timeout,
            }),
            CallError::Unreachable(m) => RPCError::Unreachable(Unreachable::from_string(m)),
            CallError::Network(m) => RPCError::Network(NetworkError::from_string(m)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Leader side: the factory, the per-peer client, and the stream routes
// ---------------------------------------------------------------------------------------------

/// What the leader side of a stream receives from its follower.
enum Inbound {
    Reply {
        seq: u64,
        result: Result<StreamAppendResult<C>, String>,
    },
    Reset {
        reason: String,
    },
}

/// Where the replies of one open stream go.
struct Route {
    target: NodeId,
    tx: mpsc::Sender<Inbound>,
}

/// The replication streams this node has open as a leader, by session id.
///
/// Shared by [`NetworkFactory`], whose clients open streams, and [`RaftHandler`], which delivers
/// the replies arriving on the transport to them.
pub(crate) struct StreamRoutes {
    routes: Mutex<HashMap<u64, Route>>,
    next_session: AtomicU64,
    /// This node's metrics (set by [`RaftHandler::new`]), to announce its own address, as its
    /// membership records it, to the followers it opens streams to.
    metrics: OnceLock<WatchReceiverOf<C, RaftMetrics<C>>>,
}

impl StreamRoutes {
    /// An empty set of routes. Session ids start from the clock, so a restarted leader does not
    /// reuse the ids its previous process used with the same followers.
    pub(crate) fn new() -> Arc<Self> {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            routes: Mutex::default(),
            next_session: AtomicU64::new(seed),
            metrics: OnceLock::new(),
        })
    }

    /// The address node `me` has in its own membership, once the metrics are known.
    fn own_address(&self, me: NodeId) -> Option<String> {
        address_in(&self.metrics.get()?.borrow_watched(), me)
    }

    /// Registers a new stream to `target`; returns its session id and its reply queue.
    fn open(&self, target: NodeId) -> (u64, mpsc::Receiver<Inbound>) {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        // At most one reply per request in flight, plus a `Reset`.
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT + 1);
        self.routes.lock().insert(session, Route { target, tx });
        (session, rx)
    }

    fn close(&self, session: u64) {
        self.routes.lock().remove(&session);
    }

    /// Hands a follower's answer to the stream it belongs to; never blocks.
    fn deliver(&self, from: NodeId, session: u64, msg: Inbound) {
        let routes = self.routes.lock();
        match routes.get(&session) {
            Some(route) if route.target == from => {
                // Full only if the follower answers more than was sent: the stream then sees a
                // gap and fails.
                if route.tx.try_send(msg).is_err() {
                    tracing::debug!(from, session, "stream reply queue full; reply dropped");
                }
            }
            Some(route) => tracing::warn!(
                from,
                session,
                expected = route.target,
                "stream reply from a node that is not the stream's target; dropped"
            ),
            None => tracing::trace!(from, session, "reply for a closed stream; dropped"),
        }
    }
}

/// Creates per-peer clients; registers each peer's address (from the membership) with the
/// transport, so a restarted node knows its peers from its own log.
pub struct NetworkFactory {
    me: NodeId,
    transport: Arc<dyn Transport>,
    rpc_timeout: Duration,
    routes: Arc<StreamRoutes>,
}

impl NetworkFactory {
    /// A factory for node `me`: RPCs wait at most `rpc_timeout` (per request on a stream), and
    /// streams register in `routes`, which the node's [`RaftHandler`] must share.
    pub(crate) fn new(
        me: NodeId,
        transport: Arc<dyn Transport>,
        rpc_timeout: Duration,
        routes: Arc<StreamRoutes>,
    ) -> Self {
        Self {
            me,
            transport,
            rpc_timeout,
            routes,
        }
    }

    fn client(&self, target: NodeId, node: &BasicNode, pipelined: bool) -> PeerClient {
        self.transport.set_peer(target, node.addr.clone());
        PeerClient {
            me: self.me,
            target,
            transport: self.transport.clone(),
            rpc_timeout: self.rpc_timeout,
            routes: self.routes.clone(),
            pipelined,
        }
    }
}

impl RaftNetworkFactory<C> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        self.client(target, node, true)
    }

    /// Heartbeats are single-request streams: they go as one call each, so they never open (and
    /// replace) the replication stream on the follower, and never queue behind it.
    async fn new_heartbeat_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        self.client(target, node, false)
    }
}

/// What `stream_append` yields: one answer per request, in request order (the trait's
/// `BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>`, named to keep signatures short).
type AppendOutput<'s> = BoxStream<'s, Result<StreamAppendResult<C>, RPCError<C>>>;

/// The client side of RPCs to one peer.
pub struct PeerClient {
    me: NodeId,
    target: NodeId,
    transport: Arc<dyn Transport>,
    rpc_timeout: Duration,
    routes: Arc<StreamRoutes>,
    /// Whether `stream_append` pipelines over one-way frames (replication clients) or sends one
    /// call per request (heartbeat clients).
    pipelined: bool,
}

impl PeerClient {
    async fn call(&self, rpc: &Rpc, timeout: Duration) -> Result<RpcReply, CallError> {
        let frame = codec::encode(rpc).map_err(|e| CallError::Network(e.to_string()))?;
        let answer = self
            .transport
            .call(self.target, Bytes::from(frame), timeout)
            .await
            .map_err(CallError::from_transport)?;
        codec::decode::<Result<RpcReply, String>>(&answer)
            .map_err(|e| CallError::Network(format!("malformed reply: {e}")))?
            .map_err(CallError::Unreachable)
    }

    fn unexpected(&self, action: RPCTypes) -> RPCError<C> {
        CallError::Network(format!("unexpected reply to {action:?}")).into_rpc(
            self.me,
            self.target,
            action,
        )
    }
}

impl RaftNetworkV2<C> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<C>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<C>, RPCError<C>> {
        // openraft does not bound replication RPCs itself; the peer fsyncs before answering.
        let timeout = option.hard_ttl().max(self.rpc_timeout);
        match self.call(&Rpc::Append(rpc), timeout).await {
            Ok(RpcReply::Append(r)) => Ok(r),
            Ok(_) => Err(self.unexpected(RPCTypes::AppendEntries)),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::AppendEntries)),
        }
    }

    /// Pipelines `input` to the target over one-way frames (see the module docs); heartbeat
    /// clients send each request as one call instead.
    ///
    /// Each request must be answered within `max(rpc_timeout, option.soft_ttl())` of being sent.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<AppendOutput<'s>, RPCError<C>>>
    where
        S: Stream<Item = AppendEntriesRequest<C>> + OptionalSend + Unpin + 'static,
    {
        if !self.pipelined {
            return stream_append_sequential(self, input, option);
        }
        let timeout = self.rpc_timeout.max(option.soft_ttl());
        let pipeline = Pipeline::open(self, input, timeout);
        Box::pin(async move {
            let output: AppendOutput<'s> = Box::pin(pipeline.into_stream());
            Ok(output)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(&Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcReply::Vote(r)) => Ok(r),
            Ok(_) => Err(self.unexpected(RPCTypes::Vote)),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::Vote)),
        }
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(&Rpc::PreVote(rpc), option.hard_ttl()).await {
            Ok(RpcReply::Vote(r)) => Ok(r),
            Ok(_) => Err(self.unexpected(RPCTypes::Vote)),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::Vote)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let rpc = Rpc::Snapshot {
            vote,
            meta: snapshot.meta,
            data: snapshot.snapshot,
        };
        let timeout = option.hard_ttl().max(self.rpc_timeout);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = self.call(&rpc, timeout) => match r {
                Ok(RpcReply::Snapshot(r)) => Ok(r),
                Ok(_) => Err(self.unexpected(RPCTypes::InstallSnapshot).into()),
                Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::InstallSnapshot).into()),
            },
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        match self
            .call(&Rpc::TransferLeader(req), option.hard_ttl())
            .await
        {
            Ok(RpcReply::TransferLeader(r)) => Ok(r),
            Ok(_) => Err(self.unexpected(RPCTypes::TransferLeader)),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::TransferLeader)),
        }
    }
}

/// The leader side of one replication stream: sends requests as they come, keeps their
/// deadlines in order, and turns the follower's replies back into openraft's output stream.
struct Pipeline<S> {
    me: NodeId,
    target: NodeId,
    session: u64,
    transport: Arc<dyn Transport>,
    routes: Arc<StreamRoutes>,
    /// openraft's requests; `None` once openraft ended them.
    input: Option<S>,
    /// This leader's address, sent with the stream's first request.
    reply_to: Option<String>,
    replies: mpsc::Receiver<Inbound>,
    /// Deadlines of the requests sent and not answered yet, oldest first; the oldest is request
    /// `next_reply`.
    in_flight: VecDeque<Instant>,
    /// Sequence number of the next request to send.
    next_seq: u64,
    /// Sequence number of the next reply expected.
    next_reply: u64,
    /// How long each request may wait for its reply.
    timeout: Duration,
    /// Set once the stream yielded its last item (an error, or the end).
    done: bool,
}

impl<S> Pipeline<S>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Unpin + Send + 'static,
{
    fn open(client: &PeerClient, input: S, timeout: Duration) -> Self {
        let (session, replies) = client.routes.open(client.target);
        tracing::debug!(peer = client.target, session, "replication stream opened");
        Self {
            me: client.me,
            target: client.target,
            session,
            transport: client.transport.clone(),
            routes: client.routes.clone(),
            input: Some(input),
            reply_to: client.routes.own_address(client.me),
            replies,
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            next_seq: 0,
            next_reply: 0,
            timeout,
            done: false,
        }
    }

    fn into_stream(
        self,
    ) -> impl Stream<Item = Result<StreamAppendResult<C>, RPCError<C>>> + Send + 'static {
        futures::stream::unfold(self, |mut p| async move {
            let item = p.next_item().await?;
            Some((item, p))
        })
    }

    /// The next answer in request order, after sending whatever openraft has for the window.
    /// `None` once openraft's requests ended and all were answered, or after an error.
    async fn next_item(&mut self) -> Option<Result<StreamAppendResult<C>, RPCError<C>>> {
        loop {
            if self.done {
                return None;
            }
            if self.input.is_none() && self.in_flight.is_empty() {
                self.done = true;
                return None;
            }
            let window_open = self.in_flight.len() < MAX_IN_FLIGHT;
            let deadline = self.in_flight.front().copied();
            // Every branch is cancel-safe: an mpsc receive, a stream's `next`, a sleep.
            tokio::select! {
                biased;
                msg = self.replies.recv() => return Some(self.on_reply(msg)),
                req = next_request(&mut self.input), if window_open => match req {
                    Some(req) => {
                        if let Err(e) = self.send(req) {
                            return Some(Err(e));
                        }
                    }
                    None => self.input = None,
                },
                () = sleep_until(deadline) => {
                    tracing::debug!(
                        peer = self.target,
                        session = self.session,
                        seq = self.next_reply,
                        "no reply within {:?}",
                        self.timeout
                    );
                    return Some(Err(self.fail(CallError::Timeout(self.timeout))));
                }
            }
        }
    }

    fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<(), RPCError<C>> {
        let frame = if self.next_seq == 0 {
            StreamFrame::Open {
                session: self.session,
                reply_to: self.reply_to.take(),
                req,
            }
        } else {
            StreamFrame::Append {
                session: self.session,
                seq: self.next_seq,
                req,
            }
        };
        let bytes = encode_frame(&frame)
            .map_err(|e| self.fail(CallError::Network(format!("cannot encode an append: {e}"))))?;
        self.transport
            .send(self.target, bytes)
            .map_err(|e| self.fail(CallError::from_transport(e)))?;
        self.next_seq += 1;
        self.in_flight.push_back(Instant::now() + self.timeout);
        Ok(())
    }

    fn on_reply(&mut self, msg: Option<Inbound>) -> Result<StreamAppendResult<C>, RPCError<C>> {
        let target = self.target;
        match msg {
            // The route holds the sender until this pipeline drops it.
            None => Err(self.fail(CallError::Network("the stream's reply route closed".into()))),
            Some(Inbound::Reset { reason }) => Err(self.fail(CallError::Network(format!(
                "node {target} dropped the replication stream: {reason}"
            )))),
            Some(Inbound::Reply { seq, result }) => {
                if seq != self.next_reply || self.in_flight.pop_front().is_none() {
                    let expected = self.next_reply;
                    return Err(self.fail(CallError::Network(format!(
                        "reply {seq} from node {target} out of sequence (expected {expected}): \
                         a frame was lost"
                    ))));
                }
                self.next_reply += 1;
                match result {
                    Ok(r) => {
                        // A conflict or a higher vote ends the stream, as it does in openraft.
                        if r.is_err() {
                            self.done = true;
                        }
                        Ok(r)
                    }
                    // The follower's openraft stopped: like a call whose receiver failed.
                    Err(fatal) => Err(self.fail(CallError::Unreachable(fatal))),
                }
            }
        }
    }

    /// Ends the stream with `e`.
    fn fail(&mut self, e: CallError) -> RPCError<C> {
        self.done = true;
        e.into_rpc(self.me, self.target, RPCTypes::AppendEntries)
    }
}

impl<S> Drop for Pipeline<S> {
    fn drop(&mut self) {
        self.routes.close(self.session);
        if self.next_seq > 0 {
            // Best effort: a lost `Close` leaves the follower's stream idle until the next one
            // from this leader replaces it.
            if let Ok(frame) = encode_frame(&StreamFrame::Close {
                session: self.session,
            }) {
                let _ = self.transport.send(self.target, frame);
            }
        }
        tracing::debug!(
            peer = self.target,
            session = self.session,
            "replication stream closed"
        );
    }
}

/// The next request of `input`, or never once it ended.
async fn next_request<S>(input: &mut Option<S>) -> Option<S::Item>
where
    S: Stream + Unpin,
{
    match input {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------------
// Follower side: inbound streams and the handler
// ---------------------------------------------------------------------------------------------

/// The stream one leader node has open on this follower.
struct FollowerSession {
    session: u64,
    /// Tells this session from a later one with the same id (a restarted leader).
    generation: u64,
    /// Sequence number of the next request expected.
    next_seq: u64,
    /// Feeds `Raft::stream_append`; bounded by [`MAX_IN_FLIGHT`].
    tx: mpsc::Sender<AppendEntriesRequest<C>>,
    task: JoinHandle<()>,
}

impl FollowerSession {
    /// Queues request `seq` (the `Open` frame was request 0); an error says why the stream must
    /// be dropped.
    fn feed(&mut self, seq: u64, req: AppendEntriesRequest<C>) -> Result<(), String> {
        if seq != self.next_seq {
            return Err(format!(
                "expected request {} of the stream, got {seq}: a frame was lost",
                self.next_seq
            ));
        }
        match self.tx.try_send(req) {
            Ok(()) => {
                self.next_seq += 1;
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                Err("the follower's stream queue is full".into())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err("the stream already ended on the follower".into())
            }
        }
    }
}

/// The streams open on this node as a follower, one per leader node.
#[derive(Default)]
struct FollowerSessions {
    by_leader: Mutex<HashMap<NodeId, FollowerSession>>,
    generations: AtomicU64,
}

impl FollowerSessions {
    /// Ends every stream at once; their answers are no longer wanted.
    fn abort_all(&self) {
        for (_, s) in self.by_leader.lock().drain() {
            s.task.abort();
        }
    }
}

impl Drop for FollowerSessions {
    fn drop(&mut self) {
        for (_, s) in self.by_leader.get_mut().drain() {
            s.task.abort();
        }
    }
}

/// What a follower's stream task needs: where answers go and how to deregister.
struct SessionCtx {
    raft: OpenRaft,
    transport: Arc<dyn Transport>,
    sessions: Weak<FollowerSessions>,
    leader: NodeId,
    /// The address the leader announced when it opened the stream.
    reply_to: Option<String>,
    session: u64,
    generation: u64,
}

impl SessionCtx {
    /// Feeds the stream's requests to openraft in order and sends every answer back, until
    /// openraft ends the stream (an error, or the input closed) or an answer cannot be sent.
    async fn serve(self, rx: mpsc::Receiver<AppendEntriesRequest<C>>) {
        let input =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|req| (req, rx)) },
            );
        let output = self.raft.stream_append(input);
        let mut output = std::pin::pin!(output);
        let mut seq = 0u64;
        while let Some(item) = output.next().await {
            let (result, last) = match item {
                Ok(r) => {
                    let last = r.is_err();
                    (Ok(r), last)
                }
                Err(fatal) => (Err(format!("receiver failed: {fatal}")), true),
            };
            let reply = StreamFrame::Reply {
                session: self.session,
                seq,
                result,
            };
            if let Err(e) = self.send(&reply).await {
                tracing::debug!(
                    leader = self.leader,
                    session = self.session,
                    "cannot answer on the replication stream; dropping it: {e}"
                );
                break;
            }
            seq += 1;
            if last {
                break;
            }
        }
        self.deregister();
    }

    async fn send(&self, frame: &StreamFrame) -> Result<(), String> {
        let bytes = encode_frame(frame).map_err(|e| e.to_string())?;
        match self.transport.send(self.leader, bytes.clone()) {
            Err(TransportError::UnknownPeer(_)) => {
                let addr = match &self.reply_to {
                    Some(addr) => Some(addr.clone()),
                    None => wait_for_address(&self.raft, self.leader, LEADER_ADDRESS_WAIT).await,
                }
                .ok_or_else(|| format!("no address known for leader {}", self.leader))?;
                self.transport.set_peer(self.leader, addr);
                self.transport
                    .send(self.leader, bytes)
                    .map_err(|e| e.to_string())
            }
            other => other.map_err(|e| e.to_string()),
        }
    }

    /// Forgets this session unless a newer one already replaced it.
    fn deregister(&self) {
        let Some(sessions) = self.sessions.upgrade() else {
            return;
        };
        let mut by_leader = sessions.by_leader.lock();
        if by_leader
            .get(&self.leader)
            .is_some_and(|s| s.generation == self.generation)
        {
            by_leader.remove(&self.leader);
        }
    }
}

/// The address the membership gives `node`, if any.
fn address_in(metrics: &RaftMetrics<C>, node: NodeId) -> Option<String> {
    metrics
        .membership_config
        .membership()
        .get_node(&node)
        .map(|n| n.addr.clone())
}

/// Waits up to `wait` for the membership to name `node`'s address (a learner that joined later
/// learns its leader's address from the log the leader is replicating to it).
async fn wait_for_address(raft: &OpenRaft, node: NodeId, wait: Duration) -> Option<String> {
    let mut metrics = raft.metrics();
    let deadline = Instant::now() + wait;
    loop {
        let found = address_in(&metrics.borrow_watched(), node);
        if found.is_some() {
            return found;
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

/// Serves inbound engine traffic: RPC calls go to the local `Raft`; one-way stream frames feed
/// follower streams (`Append`, `Close`) or answer this node's leader streams (`Reply`,
/// `Reset`).
pub struct RaftHandler {
    raft: OpenRaft,
    transport: Arc<dyn Transport>,
    routes: Arc<StreamRoutes>,
    sessions: Arc<FollowerSessions>,
    runtime: Handle,
}

fn fatal<E: std::fmt::Display>(e: E) -> String {
    format!("receiver failed: {e}")
}

impl RaftHandler {
    /// The handler of node `raft`, answering on `transport` (the engine channel the handler is
    /// installed on) and sharing `routes` with the node's [`NetworkFactory`].
    ///
    /// Must be called inside a tokio runtime: follower streams run on it.
    pub(crate) fn new(
        raft: OpenRaft,
        transport: Arc<dyn Transport>,
        routes: Arc<StreamRoutes>,
    ) -> Self {
        // Set once per node; a second handler for the same routes would announce the same node.
        let _ = routes.metrics.set(raft.metrics());
        Self {
            raft,
            transport,
            routes,
            sessions: Arc::default(),
            runtime: Handle::current(),
        }
    }

    /// Ends every follower stream now (engine shutdown); later frames open new ones only if
    /// openraft still runs.
    pub(crate) fn stop_streams(&self) {
        self.sessions.abort_all();
    }

    async fn handle(&self, rpc: Rpc) -> Result<RpcReply, String> {
        Ok(match rpc {
            Rpc::Append(r) => RpcReply::Append(
                self.raft
                    .append_entries(r)
                    .await
                    .map_err(|e: RaftError<C>| fatal(e))?,
            ),
            Rpc::Vote(r) => RpcReply::Vote(self.raft.vote(r).await.map_err(fatal)?),
            Rpc::PreVote(r) => RpcReply::Vote(self.raft.pre_vote(r).await.map_err(fatal)?),
            Rpc::Snapshot { vote, meta, data } => RpcReply::Snapshot(
                self.raft
                    .install_full_snapshot(
                        vote,
                        Snapshot {
                            meta,
                            snapshot: data,
                        },
                    )
                    .await
                    .map_err(fatal)?,
            ),
            Rpc::TransferLeader(r) => {
                RpcReply::TransferLeader(self.raft.handle_transfer_leader(r).await.map_err(fatal)?)
            }
        })
    }

    /// `from` opens stream `session` with its request 0, replacing the stream it had open here.
    fn on_open(
        &self,
        from: NodeId,
        session: u64,
        reply_to: Option<String>,
        req: AppendEntriesRequest<C>,
    ) {
        let opened = self.open_session(from, session, reply_to, req);
        if let Some(old) = self.sessions.by_leader.lock().insert(from, opened) {
            old.task.abort();
        }
        tracing::debug!(leader = from, session, "replication stream accepted");
    }

    /// Request `seq` of `from`'s stream `session`: it must be the next of the current stream,
    /// else the stream is dropped and the leader told.
    fn on_append(&self, from: NodeId, session: u64, seq: u64, req: AppendEntriesRequest<C>) {
        let reset = {
            let mut by_leader = self.sessions.by_leader.lock();
            let fed = match by_leader.get_mut(&from) {
                Some(s) if s.session == session => Some(s.feed(seq, req)),
                _ => None,
            };
            match fed {
                Some(Ok(())) => None,
                Some(Err(reason)) => {
                    if let Some(dead) = by_leader.remove(&from) {
                        dead.task.abort();
                    }
                    Some(reason)
                }
                None => Some(format!(
                    "no open stream {session} (dropped, or this node restarted)"
                )),
            }
        };
        if let Some(reason) = reset {
            tracing::debug!(
                leader = from,
                session,
                seq,
                "replication stream reset: {reason}"
            );
            self.reset(from, session, reason);
        }
    }

    /// Starts the task that serves a new stream, with `first` already queued.
    fn open_session(
        &self,
        leader: NodeId,
        session: u64,
        reply_to: Option<String>,
        first: AppendEntriesRequest<C>,
    ) -> FollowerSession {
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
        // A fresh channel has room for one request.
        let _ = tx.try_send(first);
        let generation = self.sessions.generations.fetch_add(1, Ordering::Relaxed);
        let ctx = SessionCtx {
            raft: self.raft.clone(),
            transport: self.transport.clone(),
            sessions: Arc::downgrade(&self.sessions),
            leader,
            reply_to,
            session,
            generation,
        };
        FollowerSession {
            session,
            generation,
            next_seq: 1,
            tx,
            task: self.runtime.spawn(ctx.serve(rx)),
        }
    }

    /// The leader dropped its stream: close its input, so openraft answers what it already has
    /// and the stream's task ends.
    fn on_close(&self, from: NodeId, session: u64) {
        let mut by_leader = self.sessions.by_leader.lock();
        if by_leader.get(&from).is_some_and(|s| s.session == session) {
            by_leader.remove(&from);
        }
    }

    /// Tells `to` that its stream `session` is gone; best effort, never blocks.
    fn reset(&self, to: NodeId, session: u64, reason: String) {
        let bytes = match encode_frame(&StreamFrame::Reset { session, reason }) {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(to, "cannot encode a stream reset: {e}");
                return;
            }
        };
        let sent = match self.transport.send(to, bytes.clone()) {
            Err(TransportError::UnknownPeer(_)) => {
                let addr = address_in(&self.raft.metrics().borrow_watched(), to);
                match addr {
                    Some(addr) => {
                        self.transport.set_peer(to, addr);
                        self.transport.send(to, bytes)
                    }
                    None => Err(TransportError::UnknownPeer(to)),
                }
            }
            other => other,
        };
        if let Err(e) = sent {
            tracing::debug!(to, session, "cannot send a stream reset: {e}");
        }
    }
}

#[async_trait]
impl InboundHandler for RaftHandler {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        match decode_frame(&frame) {
            Ok(StreamFrame::Open {
                session,
                reply_to,
                req,
            }) => self.on_open(from, session, reply_to, req),
            Ok(StreamFrame::Append { session, seq, req }) => {
                self.on_append(from, session, seq, req)
            }
            Ok(StreamFrame::Close { session }) => self.on_close(from, session),
            Ok(StreamFrame::Reply {
                session,
                seq,
                result,
            }) => self
                .routes
                .deliver(from, session, Inbound::Reply { seq, result }),
            Ok(StreamFrame::Reset { session, reason }) => {
                self.routes
                    .deliver(from, session, Inbound::Reset { reason })
            }
            Err(e) => tracing::warn!(from, "malformed one-way engine frame dropped: {e}"),
        }
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let reply = match codec::decode::<Rpc>(&frame) {
            Ok(rpc) => self.handle(rpc).await,
            Err(e) => {
                tracing::warn!(from, "malformed engine RPC refused: {e}");
                Err(format!("malformed engine RPC: {e}"))
            }
        };
        codec::encode(&reply)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    //! The leader side of the pipeline against a scripted follower (no openraft needed).

    use std::net::SocketAddr;

    use super::*;

    /// How the scripted follower answers.
    #[derive(Clone, Copy)]
    enum Follower {
        /// Holds every answer until this many requests arrived, then answers them all in
        /// order: only a pipeline with that many requests in flight gets any answer.
        AfterBurst(usize),
        /// Answers every request at once except request 1 (a lost frame).
        SkipSecond,
        /// Never answers.
        Silent,
    }

    struct ScriptedTransport {
        routes: Arc<StreamRoutes>,
        follower: Follower,
        held: Mutex<Vec<u64>>,
        closed: Mutex<Vec<u64>>,
    }

    impl ScriptedTransport {
        fn answer(&self, from: NodeId, session: u64, seq: u64) {
            let ok = |seq| Inbound::Reply {
                seq,
                result: Ok(Ok(None)),
            };
            match self.follower {
                Follower::AfterBurst(n) => {
                    let mut held = self.held.lock();
                    held.push(seq);
                    if held.len() == n {
                        for s in held.drain(..) {
                            self.routes.deliver(from, session, ok(s));
                        }
                    }
                }
                Follower::SkipSecond => {
                    if seq != 1 {
                        self.routes.deliver(from, session, ok(seq));
                    }
                }
                Follower::Silent => {}
            }
        }
    }

    #[async_trait]
    impl Transport for ScriptedTransport {
        fn local_id(&self) -> NodeId {
            1
        }
        fn local_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
        fn set_peer(&self, _id: NodeId, _addr: String) {}
        fn remove_peer(&self, _id: NodeId) {}
        fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
            match decode_frame(&frame) {
                Ok(StreamFrame::Open { session, .. }) => self.answer(to, session, 0),
                Ok(StreamFrame::Append { session, seq, .. }) => self.answer(to, session, seq),
                Ok(StreamFrame::Close { session }) => self.closed.lock().push(session),
                _ => {}
            }
            Ok(())
        }
        async fn call(
            &self,
            _to: NodeId,
            _frame: Bytes,
            _timeout: Duration,
        ) -> Result<Bytes, TransportError> {
            Err(TransportError::Closed)
        }
        fn set_handler(&self, _handler: Arc<dyn InboundHandler>) {}
        async fn shutdown(&self) {}
    }

    fn client(follower: Follower, rpc_timeout: Duration) -> (PeerClient, Arc<ScriptedTransport>) {
        let routes = StreamRoutes::new();
        let transport = Arc::new(ScriptedTransport {
            routes: routes.clone(),
            follower,
            held: Mutex::default(),
            closed: Mutex::default(),
        });
        let client = PeerClient {
            me: 1,
            target: 2,
            transport: transport.clone(),
            rpc_timeout,
            routes,
            pipelined: true,
        };
        (client, transport)
    }

    fn request() -> AppendEntriesRequest<C> {
        AppendEntriesRequest {
            vote: openraft::Vote::new(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }
    }

    async fn run(
        client: &mut PeerClient,
        n: usize,
    ) -> Vec<Result<StreamAppendResult<C>, RPCError<C>>> {
        let input = futures::stream::iter((0..n).map(|_| request()));
        let option = RPCOption::new(Duration::from_millis(40));
        match <PeerClient as RaftNetworkV2<C>>::stream_append(client, input, option).await {
            Ok(output) => output.collect().await,
            Err(e) => panic!("the stream did not open: {e}"),
        }
    }

    #[tokio::test]
    async fn keeps_many_requests_in_flight_and_answers_in_order() {
        let (mut client, transport) = client(Follower::AfterBurst(8), Duration::from_secs(2));
        let out = run(&mut client, 8).await;
        assert_eq!(out.len(), 8);
        assert!(out.iter().all(|r| matches!(r, Ok(Ok(None)))));
        assert_eq!(
            transport.closed.lock().len(),
            1,
            "a finished stream is closed"
        );
        assert!(client.routes.routes.lock().is_empty(), "its route is gone");
    }

    #[tokio::test]
    async fn a_lost_frame_ends_the_stream_with_an_error() {
        let (mut client, _transport) = client(Follower::SkipSecond, Duration::from_secs(2));
        let out = run(&mut client, 3).await;
        assert_eq!(out.len(), 2, "one answer, then the gap");
        assert!(matches!(out[0], Ok(Ok(None))));
        assert!(matches!(out[1], Err(RPCError::Network(_))));
    }

    #[tokio::test]
    async fn a_silent_follower_times_out() {
        let (mut client, _transport) = client(Follower::Silent, Duration::from_millis(20));
        let started = Instant::now();
        let out = run(&mut client, 2).await;
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(RPCError::Timeout(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn stream_frames_round_trip_and_other_tags_are_refused() {
        let frame = StreamFrame::Reset {
            session: 7,
            reason: "r".into(),
        };
        let bytes = encode_frame(&frame).expect("encode");
        assert!(matches!(
            decode_frame(&bytes),
            Ok(StreamFrame::Reset { session: 7, .. })
        ));
        let foreign = codec::encode(&(STREAM_FRAME_TAG.wrapping_add(1), &frame)).expect("encode");
        assert!(decode_frame(&foreign).is_err());
        assert!(decode_frame(&[0xff; 16]).is_err());
    }
}
