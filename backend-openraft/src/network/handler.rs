//! The inbound handler: [`RaftHandler`] answers engine calls with the local `Raft` and routes
//! one-way stream frames to the follower side ([`InboundStreams`]) or to this node's own leader
//! streams ([`StreamRoutes`]). A full snapshot's file arrives beforehand on the snapshot channel
//! ([`SnapshotReceiver`]); the snapshot call only names it.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::backend_support::RefusedMessages;
use consensus_api::{codec, InboundHandler, NodeId, Transport};
use consensus_storage::transfer::{SnapshotReceiver, Ticket};
use openraft::async_runtime::WatchReceiver;
use openraft::errors::RaftError;
use openraft::type_config::alias::{SnapshotMetaOf, VoteOf};
use openraft::Snapshot;
use parking_lot::Mutex;

use super::follower::InboundStreams;
use super::guard;
use super::routes::{Inbound, StreamRoutes};
use super::wire::{decode_frame, Rpc, RpcReply, StreamFrame};
use crate::types::C;
use crate::OpenRaft;

/// Serves inbound engine traffic: RPC calls go to the local `Raft`; one-way stream frames feed
/// follower streams (`Open`, `Append`, `Close`) or answer this node's leader streams (`Reply`,
/// `Reset`).
pub(crate) struct RaftHandler {
    id: NodeId,
    raft: OpenRaft,
    /// Counts the requests refused before openraft saw them (see `guard.rs`).
    refused: RefusedMessages,
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
    /// received snapshot files from `snapshots`; requests naming another node than their
    /// authenticated sender, or otherwise breaking openraft's invariants, are counted in
    /// `refused`.
    ///
    /// Must be called inside a tokio runtime: follower streams run on it.
    pub(crate) fn new(
        raft: OpenRaft,
        transport: Arc<dyn Transport>,
        routes: Arc<StreamRoutes>,
        snapshots: Arc<SnapshotReceiver>,
        refused: RefusedMessages,
    ) -> Self {
        routes.set_metrics(raft.metrics());
        let id = raft.metrics().borrow_watched().id;
        Self {
            id,
            refused,
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

    /// Counts and logs a refused request; the error its sender gets.
    fn refuse(&self, from: NodeId, kind: &str, why: String) -> String {
        self.refused.record(from, kind, &why);
        format!("refused: {why}")
    }

    /// Checks a call before openraft sees it.
    fn admit(&self, from: NodeId, rpc: &Rpc) -> Result<(), String> {
        let (kind, checked) = match rpc {
            Rpc::Append(r) => ("AppendEntries", guard::check_append(self.id, from, r)),
            Rpc::Vote(r) => ("Vote", guard::check_vote(self.id, from, r)),
            Rpc::PreVote(r) => ("PreVote", guard::check_vote(self.id, from, r)),
            Rpc::Snapshot { vote, meta, .. } => {
                let committed = self.raft.metrics().borrow_watched().local_committed;
                let checked = guard::check_snapshot(self.id, from, vote, meta, committed.as_ref());
                ("Snapshot", checked)
            }
            Rpc::TransferLeader(r) => ("TransferLeader", guard::check_transfer(self.id, from, r)),
        };
        checked.map_err(|why| self.refuse(from, kind, why))
    }

    async fn handle(&self, from: NodeId, rpc: Rpc) -> Result<RpcReply, String> {
        self.admit(from, &rpc)?;
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
        let frame = match decode_frame(&frame) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(
                    from,
                    "stream frame",
                    format!("malformed one-way engine frame: {e}"),
                );
                return;
            }
        };
        if let StreamFrame::Open { session, req, .. } | StreamFrame::Append { session, req, .. } =
            &frame
        {
            if let Err(why) = guard::check_append(self.id, from, req) {
                let why = self.refuse(from, "AppendEntries", why);
                self.streams.refuse(from, *session, why);
                return;
            }
        }
        match frame {
            StreamFrame::Open {
                session,
                reply_to,
                req,
            } => self.streams.on_open(from, session, reply_to, req),
            StreamFrame::Append { session, seq, req } => {
                self.streams.on_append(from, session, seq, req)
            }
            StreamFrame::Close { session } => self.streams.on_close(from, session),
            StreamFrame::Reply {
                session,
                seq,
                result,
            } => self
                .routes
                .deliver(from, session, Inbound::Reply { seq, result }),
            StreamFrame::Reset { session, reason } => {
                self.routes
                    .deliver(from, session, Inbound::Reset { reason })
            }
        }
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let reply = match codec::decode::<Rpc>(&frame) {
            Ok(rpc) => self.handle(from, rpc).await,
            Err(e) => Err(self.refuse(from, "RPC", format!("malformed engine RPC: {e}"))),
        };
        codec::encode(&reply)
            .map(Bytes::from)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use consensus_api::{
        ByteStateMachine, ConsensusError, Engine, EngineContext, NodeConfig, Role, TransportError,
    };
    use openraft::raft::{AppendEntriesRequest, VoteRequest};
    use openraft::Vote;

    use super::*;
    use crate::network::wire::encode_frame;

    /// A transport that only keeps the handler the engine installs (the test plays the peers).
    #[derive(Default)]
    struct HandlerOnly(Mutex<Option<Arc<dyn InboundHandler>>>);

    #[async_trait]
    impl Transport for HandlerOnly {
        fn local_id(&self) -> NodeId {
            1
        }
        fn local_addr(&self) -> std::net::SocketAddr {
            std::net::SocketAddr::from(([127, 0, 0, 1], 1))
        }
        fn set_peer(&self, _id: NodeId, _addr: String) {}
        fn remove_peer(&self, _id: NodeId) {}
        fn send(&self, _to: NodeId, _frame: Bytes) -> Result<(), TransportError> {
            Ok(())
        }
        async fn call(
            &self,
            to: NodeId,
            _frame: Bytes,
            _timeout: Duration,
        ) -> Result<Bytes, TransportError> {
            Err(TransportError::UnknownPeer(to))
        }
        fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
            *self.0.lock() = Some(handler);
        }
        async fn shutdown(&self) {}
    }

    #[derive(Default)]
    struct Nothing;

    impl ByteStateMachine for Nothing {
        fn apply(&self, _index: u64, _command: &[u8]) -> Vec<u8> {
            Vec::new()
        }
        fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
            Ok(Vec::new())
        }
        fn restore(&self, _snapshot: &[u8]) -> Result<(), ConsensusError> {
            Ok(())
        }
    }

    async fn call(handler: &Arc<dyn InboundHandler>, from: NodeId, rpc: &Rpc) -> String {
        let frame = Bytes::from(codec::encode(rpc).expect("encode"));
        let reply = handler.on_call(from, frame).await.expect("an answer");
        match codec::decode::<Result<RpcReply, String>>(&reply).expect("decode") {
            Ok(RpcReply::Vote(v)) => format!("vote granted: {}", v.vote_granted),
            Ok(RpcReply::Append(a)) => format!("append answered: {a:?}"),
            Ok(_) => "answered".into(),
            Err(e) => e,
        }
    }

    /// Requests from authenticated node 2 that name node 3 (as leader or candidate), or whose
    /// entries are out of log order, are refused before openraft sees them: counted, answered
    /// with an error, and neither the vote nor the term nor the role of the receiver moves.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_naming_another_node_than_their_sender_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = NodeConfig::new(1, "guard-test", dir.path());
        config.initial_members = BTreeMap::from([(1, "127.0.0.1:1".to_string())]);
        let transport = Arc::new(HandlerOnly::default());
        let engine = crate::OpenraftEngine::start(EngineContext {
            config,
            state_machine: Arc::new(Nothing),
            transport: transport.clone(),
            snapshot_transport: Arc::new(HandlerOnly::default()),
        })
        .await
        .expect("engine starts");
        let mut status = engine.status();
        let wait = Duration::from_secs(10);
        let st = tokio::time::timeout(wait, status.wait_for(|s| s.role == Role::Leader))
            .await
            .expect("a single node elects itself")
            .expect("status watch")
            .clone();
        let handler = transport.0.lock().clone().expect("handler installed");
        let term = st.term;

        // A vote for node 3, sent by node 2, as a leadership transfer (which skips leases).
        let up_to_date = openraft::LogId::new_term_index(term + 4, 1_000);
        let mut vote = VoteRequest::new(Vote::new(term + 5, 3), Some(up_to_date));
        vote.leadership_transfer = true;
        let mut answers = vec![call(&handler, 2, &Rpc::Vote(vote)).await];
        // Node 2 replicating as leader node 3.
        let append = AppendEntriesRequest {
            vote: Vote::new_committed(term + 5, 3),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        answers.push(call(&handler, 2, &Rpc::Append(append.clone())).await);
        // The same on the stream path.
        let frame = StreamFrame::Open {
            session: 7,
            reply_to: None,
            req: append,
        };
        handler.on_message(2, encode_frame(&frame).expect("encode"));
        // Node 2 as itself, with a gap in its entries.
        let gap = AppendEntriesRequest {
            vote: Vote::new_committed(term + 5, 2),
            prev_log_id: None,
            entries: vec![openraft::impls::Entry {
                log_id: openraft::LogId::new_term_index(term + 5, 7),
                payload: openraft::impls::EntryPayload::Blank,
            }],
            leader_commit: None,
        };
        answers.push(call(&handler, 2, &Rpc::Append(gap)).await);

        let seen = tokio::time::timeout(wait, status.wait_for(|s| s.refused_messages >= 4))
            .await
            .map(|s| s.map(|s| s.clone()));
        let now = engine.status().borrow().clone();
        assert_eq!(
            now.term, term,
            "the receiver's term does not move: {answers:?}"
        );
        assert_eq!(now.role, Role::Leader, "{:?}", now.stopped);
        assert_eq!(now.leader, Some(1));
        for a in &answers {
            assert!(a.contains("refused"), "not granted, not appended: {a}");
        }
        let seen = seen
            .expect("the refusals show in the status")
            .expect("status watch");
        assert_eq!(seen.refused_messages, 4);
        engine
            .propose(b"after".to_vec())
            .await
            .expect("still commits");
        let _ = engine.shutdown().await;
    }
}
