//! The leader-side client: [`NetworkFactory`] makes a [`PeerClient`] per peer, which answers
//! openraft's [`RaftNetworkV2`] with one [`Transport::call`] per RPC (through the one helper
//! [`PeerClient::rpc`]) or, for replication, with a [`Pipeline`] over one-way frames.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::{codec, NodeId, Transport};
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
}

impl NetworkFactory {
    /// A factory for node `me`: RPCs wait at most `rpc_timeout` (per request on a stream), and
    /// streams register in `routes`, which the node's [`super::RaftHandler`] must share.
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
        PeerClient::new(
            self.me,
            target,
            self.transport.clone(),
            self.rpc_timeout,
            self.routes.clone(),
            pipelined,
        )
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
        }
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
            r = self.rpc(&rpc, timeout, RPCTypes::InstallSnapshot) => r.map_err(Into::into),
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
