//! The inbound handler: [`RaftHandler`] answers engine calls with the local `Raft` and routes
//! one-way stream frames to the follower side ([`InboundStreams`]) or to this node's own leader
//! streams ([`StreamRoutes`]). A full snapshot's file arrives beforehand on the snapshot channel
//! ([`SnapshotReceiver`]); the snapshot call only names it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{codec, InboundHandler, NodeId, Transport};
use consensus_storage::transfer::{SnapshotReceiver, Ticket};
use openraft::errors::RaftError;
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use openraft::Snapshot;
use parking_lot::Mutex;

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
    /// The snapshot channel's handler, kept alive here (the channel holds it weakly) until
    /// [`RaftHandler::stop`]: it holds the data dir's snapshot store, whose lock a node
    /// restarted on the same directory needs.
    snapshots: Mutex<Option<Arc<SnapshotReceiver>>>,
}

fn fatal<E: std::fmt::Display>(e: E) -> String {
    format!("receiver failed: {e}")
}

impl RaftHandler {
    /// The handler of node `raft`, answering on `transport` (the engine channel the handler is
    /// installed on), sharing `routes` with the node's [`super::NetworkFactory`], and taking
    /// received snapshot files from `snapshots`.
    ///
    /// Must be called inside a tokio runtime: follower streams run on it.
    pub(crate) fn new(
        raft: OpenRaft,
        transport: Arc<dyn Transport>,
        routes: Arc<StreamRoutes>,
        snapshots: Arc<SnapshotReceiver>,
    ) -> Self {
        routes.set_metrics(raft.metrics());
        Self {
            streams: InboundStreams::new(raft.clone(), transport),
            raft,
            routes,
            snapshots: Mutex::new(Some(snapshots)),
        }
    }

    /// Ends every follower stream now and stops accepting snapshot files (engine shutdown);
    /// later frames open new streams only if openraft still runs.
    pub(crate) fn stop(&self) {
        self.streams.stop_all();
        self.snapshots.lock().take();
    }

    /// Installs the snapshot `meta` from the file `from` streamed under `ticket`. A file that is
    /// not (or no longer) here is an error: the leader sends the snapshot again, resuming the
    /// transfer.
    async fn install_snapshot(
        &self,
        from: NodeId,
        vote: VoteOf<C>,
        meta: SnapshotMetaOf<C>,
        ticket: &[u8],
    ) -> Result<RpcReply, String> {
        let ticket = Ticket::decode(ticket)
            .ok_or_else(|| format!("malformed snapshot ticket from node {from}"))?;
        let receiver = self
            .snapshots
            .lock()
            .clone()
            .ok_or_else(|| "this node is shutting down".to_string())?;
        let file = receiver.take(from, &ticket).ok_or_else(|| {
            format!(
                "snapshot transfer {:x} from node {from} is not complete here; send it again",
                ticket.id
            )
        })?;
        let snapshot = Snapshot {
            meta,
            snapshot: file,
        };
        let resp = self.raft.install_full_snapshot(vote, snapshot).await;
        Ok(RpcReply::Snapshot(resp.map_err(fatal)?))
    }

    async fn handle(&self, from: NodeId, rpc: Rpc) -> Result<RpcReply, String> {
        Ok(match rpc {
            Rpc::Append(r) => RpcReply::Append(
                self.raft
                    .append_entries(r)
                    .await
                    .map_err(|e: RaftError<C>| fatal(e))?,
            ),
            Rpc::Vote(r) => RpcReply::Vote(self.raft.vote(r).await.map_err(fatal)?),
            Rpc::PreVote(r) => RpcReply::Vote(self.raft.pre_vote(r).await.map_err(fatal)?),
            Rpc::Snapshot { vote, meta, ticket } => {
                return self.install_snapshot(from, vote, meta, &ticket).await
            }
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
            Ok(rpc) => self.handle(from, rpc).await,
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
