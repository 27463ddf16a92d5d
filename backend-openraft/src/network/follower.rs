//! The follower side of replication streams: [`InboundStreams`] keeps the stream each leader
//! node has open here ([`FollowerSessions`]), feeds its requests in order to
//! `Raft::stream_append` on a task per stream ([`SessionCtx`]), and sends the answers (or a
//! `Reset`) back. What to accept is decided by [`FollowerStream`] and [`FollowerAnswers`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use consensus_api::{NodeId, Transport, TransportError};
use futures::StreamExt;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::AppendEntriesRequest;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::routes::{address_in, wait_for_address};
use super::stream::{FollowerAnswers, FollowerStream, ResetReason, MAX_IN_FLIGHT};
use super::wire::{encode_frame, StreamFrame};
use crate::types::C;
use crate::OpenRaft;

/// How long a follower waits for its membership to name a leader whose address its transport
/// does not know yet (a learner that joined later), before giving up on one reply.
const LEADER_ADDRESS_WAIT: Duration = Duration::from_millis(200);

/// The replication streams leader nodes have open on this node, and what serves them.
pub(crate) struct InboundStreams {
    raft: OpenRaft,
    transport: Arc<dyn Transport>,
    sessions: Arc<FollowerSessions>,
    runtime: Handle,
}

impl InboundStreams {
    /// Streams into node `raft`, answered on `transport`.
    ///
    /// Must be called inside a tokio runtime: the streams' tasks run on it.
    pub(crate) fn new(raft: OpenRaft, transport: Arc<dyn Transport>) -> Self {
        Self {
            raft,
            transport,
            sessions: Arc::default(),
            runtime: Handle::current(),
        }
    }

    /// Ends every stream now; their answers are no longer wanted.
    pub(crate) fn stop_all(&self) {
        self.sessions.abort_all();
    }

    /// `from` opens stream `session` with its request 0, replacing the stream it had open here.
    pub(crate) fn on_open(
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
    /// else the leader is told (and the current stream dropped, if the frame was of it).
    pub(crate) fn on_append(
        &self,
        from: NodeId,
        session: u64,
        seq: u64,
        req: AppendEntriesRequest<C>,
    ) {
        let fed = {
            let mut by_leader = self.sessions.by_leader.lock();
            let fed = match by_leader.get_mut(&from) {
                Some(s) => s.feed(session, seq, req),
                None => Err(ResetReason::NoStream { session }),
            };
            if fed.as_ref().is_err_and(ResetReason::ends_current_stream) {
                if let Some(dead) = by_leader.remove(&from) {
                    dead.task.abort();
                }
            }
            fed
        };
        if let Err(reason) = fed {
            tracing::debug!(
                leader = from,
                session,
                seq,
                "replication stream reset: {reason}"
            );
            self.reset(from, session, reason.to_string());
        }
    }

    /// A request of `from`'s stream `session` was refused before openraft saw it: the stream is
    /// dropped (if it is the current one) as after a gap, and the leader told why.
    pub(crate) fn refuse(&self, from: NodeId, session: u64, reason: String) {
        {
            let mut by_leader = self.sessions.by_leader.lock();
            if by_leader
                .get(&from)
                .is_some_and(|s| s.stream.session() == session)
            {
                if let Some(dead) = by_leader.remove(&from) {
                    dead.task.abort();
                }
            }
        }
        self.reset(from, session, reason);
    }

    /// The leader dropped its stream: close its input, so openraft answers what it already has
    /// and the stream's task ends.
    pub(crate) fn on_close(&self, from: NodeId, session: u64) {
        let mut by_leader = self.sessions.by_leader.lock();
        if by_leader
            .get(&from)
            .is_some_and(|s| s.stream.session() == session)
        {
            by_leader.remove(&from);
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
            stream: FollowerStream::opened(session),
            generation,
            tx,
            task: self.runtime.spawn(ctx.serve(rx)),
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

/// The stream one leader node has open on this follower.
struct FollowerSession {
    /// Which requests of the leader's frames are accepted.
    stream: FollowerStream,
    /// Tells this session from a later one with the same id (a restarted leader).
    generation: u64,
    /// Feeds `Raft::stream_append`; bounded by [`MAX_IN_FLIGHT`].
    tx: mpsc::Sender<AppendEntriesRequest<C>>,
    task: JoinHandle<()>,
}

impl FollowerSession {
    /// Queues request `seq` of stream `session` (the `Open` frame was request 0); an error says
    /// why the leader must be told to reset.
    fn feed(
        &mut self,
        session: u64,
        seq: u64,
        req: AppendEntriesRequest<C>,
    ) -> Result<(), ResetReason> {
        // Accepting advances the expected sequence number before the request is queued; that is
        // the same as after it, because a request that cannot be queued drops the stream.
        self.stream.on_append(session, seq)?;
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ResetReason::QueueFull,
            mpsc::error::TrySendError::Closed(_) => ResetReason::Ended,
        })
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
        let mut answers = FollowerAnswers::new(self.session);
        while let Some(item) = output.next().await {
            let (reply, last) = answers.on_answer(item);
            if let Err(e) = self.send(&reply).await {
                tracing::debug!(
                    leader = self.leader,
                    session = self.session,
                    "cannot answer on the replication stream; dropping it: {e}"
                );
                break;
            }
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
