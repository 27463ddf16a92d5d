//! openraft's RPC-style network over the byte transport: each RPC is one `Transport::call`, and
//! inbound calls are dispatched to the local `Raft`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{codec, InboundHandler, NodeId, Transport, TransportError};
use openraft::errors::{
    NetworkError, RPCError, RaftError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::type_config::alias::{SnapshotMetaOf, SnapshotOf, VoteOf};
use openraft::{BasicNode, OptionalSend, RPCTypes, Snapshot};
use serde::{Deserialize, Serialize};

use crate::types::{SnapshotData, C};
use crate::OpenRaft;

/// One engine RPC on the wire.
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

/// Creates per-peer clients; registers each peer's address (from the membership) with the
/// transport, so a restarted node knows its peers from its own log.
pub struct NetworkFactory {
    pub(crate) me: NodeId,
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) rpc_timeout: Duration,
}

impl RaftNetworkFactory<C> for NetworkFactory {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        self.transport.set_peer(target, node.addr.clone());
        PeerClient {
            me: self.me,
            target,
            transport: self.transport.clone(),
            rpc_timeout: self.rpc_timeout,
        }
    }
}

/// The client side of RPCs to one peer.
pub struct PeerClient {
    me: NodeId,
    target: NodeId,
    transport: Arc<dyn Transport>,
    rpc_timeout: Duration,
}

enum CallError {
    Timeout(Duration),
    Unreachable(String),
    Network(String),
}

impl CallError {
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

impl PeerClient {
    async fn call(&self, rpc: &Rpc, timeout: Duration) -> Result<RpcReply, CallError> {
        let frame = codec::encode(rpc).map_err(|e| CallError::Network(e.to_string()))?;
        let answer = self
            .transport
            .call(self.target, Bytes::from(frame), timeout)
            .await
            .map_err(|e| match e {
                TransportError::Timeout(d) => CallError::Timeout(d),
                e @ (TransportError::Unreachable { .. }
                | TransportError::UnknownPeer(_)
                | TransportError::Closed
                | TransportError::Refused(_)) => CallError::Unreachable(e.to_string()),
                e => CallError::Network(e.to_string()),
            })?;
        codec::decode::<Result<RpcReply, String>>(&answer)
            .map_err(|e| CallError::Network(format!("malformed reply: {e}")))?
            .map_err(CallError::Unreachable)
    }

    fn unexpected<T>(&self, action: RPCTypes) -> Result<T, RPCError<C>> {
        Err(
            CallError::Network(format!("unexpected reply to {action:?}")).into_rpc(
                self.me,
                self.target,
                action,
            ),
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
            Ok(_) => self.unexpected(RPCTypes::AppendEntries),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::AppendEntries)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<C>,
        option: RPCOption,
    ) -> Result<VoteResponse<C>, RPCError<C>> {
        match self.call(&Rpc::Vote(rpc), option.hard_ttl()).await {
            Ok(RpcReply::Vote(r)) => Ok(r),
            Ok(_) => self.unexpected(RPCTypes::Vote),
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
            Ok(_) => self.unexpected(RPCTypes::Vote),
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
                Ok(_) => Err(self.unexpected::<()>(RPCTypes::InstallSnapshot).unwrap_err().into()),
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
            Ok(_) => self.unexpected(RPCTypes::TransferLeader),
            Err(e) => Err(e.into_rpc(self.me, self.target, RPCTypes::TransferLeader)),
        }
    }
}

/// Dispatches inbound engine RPCs to the local `Raft`.
pub struct RaftHandler {
    pub(crate) raft: OpenRaft,
}

fn fatal<E: std::fmt::Display>(e: E) -> String {
    format!("receiver failed: {e}")
}

impl RaftHandler {
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
}

#[async_trait]
impl InboundHandler for RaftHandler {
    fn on_message(&self, from: NodeId, _frame: Bytes) {
        tracing::debug!(from, "openraft uses calls only; ignoring a one-way frame");
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
