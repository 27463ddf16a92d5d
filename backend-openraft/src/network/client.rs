//! The leader-side client: [`NetworkFactory`] makes a [`PeerClient`] per peer, which answers
//! openraft's [`RaftNetworkV2`] with one [`Transport::call`] per RPC (through the one helper
//! [`PeerClient::rpc`]), with a [`Pipeline`] over one-way frames for replication, and for a full
//! snapshot with a chunked transfer of the snapshot file ([`SnapshotSender`]) followed by one
//! small call naming the transferred file.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::{codec, NodeId, Transport};
use consensus_storage::transfer::SnapshotSender;
use futures::Stream;
use openraft::base::{BoxFuture, BoxStream};
use openraft::errors::{RPCError, ReplicationClosed, StreamingError};
use openraft::network::{stream_append_sequential, RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend, RPCTypes};

use super::pipeline::Pipeline;
use super::routes::StreamRoutes;
use super::wire::{CallError, FromReply, Rpc, RpcReply};
use crate::types::{SnapshotData, C};

/// Creates per-peer clients; registers each peer's address (from the membership) with the
/// transport, so a restarted node knows its peers from its own log.
pub(crate) struct NetworkFactory {
    me: NodeId,
    transport: Arc<dyn Transport>,
    rpc_timeout: Duration,
    routes: Arc<StreamRoutes>,
    /// The node's one snapshot sender (one transfer per peer at a time), shared by every client.
    snapshots: Arc<SnapshotSender>,
}

impl NetworkFactory {
    /// A factory for node `me`: RPCs wait at most `rpc_timeout` (per request on a stream),
    /// streams register in `routes`, which the node's [`super::RaftHandler`] must share, and
    /// snapshot files go to followers through `snapshots` (over the snapshot channel).
    pub(crate) fn new(
        me: NodeId,
        transport: Arc<dyn Transport>,
        rpc_timeout: Duration,
        routes: Arc<StreamRoutes>,
        snapshots: Arc<SnapshotSender>,
    ) -> Self {
        Self {
            me,
            transport,
            rpc_timeout,
            routes,
            snapshots,
        }
    }

    fn client(&self, target: NodeId, node: &BasicNode, pipelined: bool) -> PeerClient {
        self.transport.set_peer(target, node.addr.clone());
        PeerClient::new(
            self.me,
            target,
            self.transport.clone(),
            self.rpc_timeout,
            self.routes.clone(),
            pipelined,
        )
        .with_snapshots(self.snapshots.clone())
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
pub(crate) struct PeerClient {
    me: NodeId,
    target: NodeId,
    transport: Arc<dyn Transport>,
    rpc_timeout: Duration,
    routes: Arc<StreamRoutes>,
    /// Whether `stream_append` pipelines over one-way frames (replication clients) or sends one
    /// call per request (heartbeat clients).
    pipelined: bool,
    /// Streams snapshot files to the target; `None` in clients that never send one (tests).
    snapshots: Option<Arc<SnapshotSender>>,
}

impl PeerClient {
    /// The client of node `me` for `target`; see [`NetworkFactory::new`] for `rpc_timeout` and
    /// `routes`.
    pub(crate) fn new(
        me: NodeId,
        target: NodeId,
        transport: Arc<dyn Transport>,
        rpc_timeout: Duration,
        routes: Arc<StreamRoutes>,
        pipelined: bool,
    ) -> Self {
        Self {
            me,
            target,
            transport,
            rpc_timeout,
            routes,
            pipelined,
            snapshots: None,
        }
    }

    /// The same client, sending full snapshots through `snapshots`.
    pub(crate) fn with_snapshots(mut self, snapshots: Arc<SnapshotSender>) -> Self {
        self.snapshots = Some(snapshots);
        self
    }

    /// One RPC as one call: encodes `rpc`, waits at most `timeout` for the answer, and returns
    /// it as the response type `R` that `action` expects. Every failure (encoding, transport,
    /// a malformed or mismatched answer, the receiver's own error) becomes `action`'s
    /// [`RPCError`].
    async fn rpc<R: FromReply>(
        &self,
        rpc: &Rpc,
        timeout: Duration,
        action: RPCTypes,
    ) -> Result<R, RPCError<C>> {
        let call = async {
            let frame = codec::encode(rpc).map_err(|e| CallError::Network(e.to_string()))?;
            let answer = self
                .transport
                .call(self.target, Bytes::from(frame), timeout)
                .await
                .map_err(CallError::from_transport)?;
            let reply = codec::decode::<Result<RpcReply, String>>(&answer)
                .map_err(|e| CallError::Network(format!("malformed reply: {e}")))?
                .map_err(CallError::Unreachable)?;
            R::from_reply(reply)
                .ok_or_else(|| CallError::Network(format!("unexpected reply to {action:?}")))
        };
        call.await
            .map_err(|e| e.into_rpc(self.me, self.target, action))
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
        self.rpc(&Rpc::Append(rpc), timeout, RPCTypes::AppendEntries)
            .await
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
        let pipeline = Pipeline::open(
            self.me,
            self.target,
            self.transport.clone(),
            self.routes.clone(),
            input,
            timeout,
        );
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
        self.rpc(&Rpc::Vote(rpc), option.hard_ttl(), RPCTypes::Vote)
            .await
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        self.rpc(&Rpc::PreVote(rpc), option.hard_ttl(), RPCTypes::Vote)
            .await
    }

    /// Streams the snapshot file to the target in chunks over the snapshot channel (resuming
    /// an interrupted transfer of the same file), then sends one small `Rpc::Snapshot` naming
    /// the transferred file by its ticket, which the target installs. Stops as soon as
    /// `cancel` fires.
    ///
    /// A failed transfer is `Unreachable` (openraft backs off, then sends the snapshot again,
    /// and the transfer resumes where it stopped); the final call fails as any RPC does.
    async fn full_snapshot(
        &mut self,
        vote: VoteOf<C>,
        snapshot: SnapshotOf<C, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<C>, StreamingError<C>> {
        let (me, target) = (self.me, self.target);
        let Some(sender) = self.snapshots.clone() else {
            return Err(
                CallError::Unreachable("this client sends no snapshots".into())
                    .into_rpc(me, target, RPCTypes::InstallSnapshot)
                    .into(),
            );
        };
        // Installing a large state on the target takes long: the answer gets openraft's own
        // snapshot deadline.
        let timeout = option.hard_ttl().max(self.rpc_timeout);
        let send = async {
            let ticket =
                sender.send(target, &snapshot.snapshot).await.map_err(|e| {
                    CallError::Unreachable(format!("snapshot transfer to node {target}: {e}"))
                        .into_rpc(me, target, RPCTypes::InstallSnapshot)
                })?;
            let rpc = Rpc::Snapshot {
                vote,
                meta: snapshot.meta,
                ticket: ticket.encode(),
            };
            self.rpc(&rpc, timeout, RPCTypes::InstallSnapshot).await
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(Into::into),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<C>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<C>, RPCError<C>> {
        self.rpc(
            &Rpc::TransferLeader(req),
            option.hard_ttl(),
            RPCTypes::TransferLeader,
        )
        .await
    }
}
