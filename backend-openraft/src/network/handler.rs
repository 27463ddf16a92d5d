//! The inbound handler: [`RaftHandler`] answers engine calls with the local `Raft` and routes
//! one-way stream frames to the follower side ([`InboundStreams`]) or to this node's own leader
//! streams ([`StreamRoutes`]).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{codec, InboundHandler, NodeId, Transport};
use openraft::errors::RaftError;
use openraft::Snapshot;

use super::follower::InboundStreams;
use super::routes::{Inbound, StreamRoutes};
use super::wire::{decode_frame, Rpc, RpcReply, StreamFrame};
use crate::types::C;
use crate::OpenRaft;

/// Serves inbound engine traffic: RPC calls go to the local `Raft`; one-way stream frames feed
/// follower streams (`Open`, `Append`, `Close`) or answer this node's leader streams (`Reply`,
/// `Reset`).
pub(crate) struct RaftHandler {
    raft: OpenRaft,
    routes: Arc<StreamRoutes>,
    streams: InboundStreams,
}

fn fatal<E: std::fmt::Display>(e: E) -> String {
    format!("receiver failed: {e}")
}

impl RaftHandler {
    /// The handler of node `raft`, answering on `transport` (the engine channel the handler is
    /// installed on) and sharing `routes` with the node's [`super::NetworkFactory`].
    ///
    /// Must be called inside a tokio runtime: follower streams run on it.
    pub(crate) fn new(
        raft: OpenRaft,
        transport: Arc<dyn Transport>,
        routes: Arc<StreamRoutes>,
    ) -> Self {
        routes.set_metrics(raft.metrics());
        Self {
            streams: InboundStreams::new(raft.clone(), transport),
            raft,
            routes,
        }
    }

    /// Ends every follower stream now (engine shutdown); later frames open new ones only if
    /// openraft still runs.
    pub(crate) fn stop_streams(&self) {
        self.streams.stop_all();
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
}

#[async_trait]
impl InboundHandler for RaftHandler {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        match decode_frame(&frame) {
            Ok(StreamFrame::Open {
                session,
                reply_to,
                req,
            }) => self.streams.on_open(from, session, reply_to, req),
            Ok(StreamFrame::Append { session, seq, req }) => {
                self.streams.on_append(from, session, seq, req)
            }
            Ok(StreamFrame::Close { session }) => self.streams.on_close(from, session),
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
