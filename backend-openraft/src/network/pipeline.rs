//! The async driver of a leader's replication stream: [`Pipeline`] feeds openraft's requests,
//! the follower's replies and the clock into a [`LeaderStream`], sends the frames it returns,
//! and turns its answers into openraft's output stream. The decisions are all in the state
//! machine; this file is only I/O and task plumbing.

use std::sync::Arc;
use std::time::Duration;

use consensus_api::{NodeId, Transport};
use futures::{Stream, StreamExt};
use openraft::errors::RPCError;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use openraft::RPCTypes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::routes::{Inbound, StreamRoutes};
use super::stream::LeaderStream;
use super::wire::{encode_frame, CallError};
use crate::types::C;

/// The leader side of one replication stream over the transport.
pub(crate) struct Pipeline<S> {
    me: NodeId,
    target: NodeId,
    transport: Arc<dyn Transport>,
    routes: Arc<StreamRoutes>,
    /// openraft's requests; `None` once openraft ended them.
    input: Option<S>,
    replies: mpsc::Receiver<Inbound>,
    stream: LeaderStream,
}

impl<S> Pipeline<S>
where
    S: Stream<Item = AppendEntriesRequest<C>> + Unpin + Send + 'static,
{
    /// Opens a stream from node `me` to `target` in `routes`, for the requests of `input`;
    /// each may wait `timeout` for its reply.
    pub(crate) fn open(
        me: NodeId,
        target: NodeId,
        transport: Arc<dyn Transport>,
        routes: Arc<StreamRoutes>,
        input: S,
        timeout: Duration,
    ) -> Self {
        let (session, replies) = routes.open(target);
        tracing::debug!(peer = target, session, "replication stream opened");
        let stream = LeaderStream::new(target, session, routes.own_address(me), timeout);
        Self {
            me,
            target,
            transport,
            routes,
            input: Some(input),
            replies,
            stream,
        }
    }

    /// openraft's output stream: one answer per request, in request order.
    pub(crate) fn into_stream(
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
            if self.stream.poll_finished() {
                return None;
            }
            let wants_request = self.stream.wants_request();
            let deadline = self.stream.poll_timeout().map(Instant::from_std);
            // Every branch is cancel-safe: an mpsc receive, a stream's `next`, a sleep.
            tokio::select! {
                biased;
                msg = self.replies.recv() => {
                    let answer = match msg {
                        // The route holds the sender until this pipeline drops it.
                        None => Err(self.stream.on_route_closed()),
                        Some(Inbound::Reset { reason }) => Err(self.stream.on_reset(&reason)),
                        Some(Inbound::Reply { seq, result }) => self.stream.on_reply(seq, result),
                    };
                    return Some(answer.map_err(|e| self.rpc_error(e)));
                }
                req = next_request(&mut self.input), if wants_request => match req {
                    Some(req) => {
                        if let Err(e) = self.send(req) {
                            return Some(Err(self.rpc_error(e)));
                        }
                    }
                    None => {
                        self.input = None;
                        self.stream.on_input_end();
                    }
                },
                () = sleep_until(deadline) => {
                    if let Some(e) = self.stream.on_timeout(Instant::now().into_std()) {
                        tracing::debug!(
                            peer = self.target,
                            session = self.stream.session(),
                            seq = self.stream.oldest_unanswered(),
                            "no reply within {:?}",
                            self.stream.timeout()
                        );
                        return Some(Err(self.rpc_error(e)));
                    }
                }
            }
        }
    }

    /// Sends `req` as the stream's next frame.
    fn send(&mut self, req: AppendEntriesRequest<C>) -> Result<(), CallError> {
        let frame = self.stream.on_request(req, Instant::now().into_std());
        let sent = encode_frame(&frame)
            .map_err(|e| CallError::Network(format!("cannot encode an append: {e}")))
            .and_then(|bytes| {
                self.transport
                    .send(self.target, bytes)
                    .map_err(CallError::from_transport)
            });
        sent.map_err(|e| self.stream.on_send_failed(e))
    }

    fn rpc_error(&self, e: CallError) -> RPCError<C> {
        e.into_rpc(self.me, self.target, RPCTypes::AppendEntries)
    }
}

impl<S> Drop for Pipeline<S> {
    fn drop(&mut self) {
        let session = self.stream.session();
        self.routes.close(session);
        if let Some(close) = self.stream.poll_close() {
            // Best effort: a lost `Close` leaves the follower's stream idle until the next one
            // from this leader replaces it.
            if let Ok(frame) = encode_frame(&close) {
                let _ = self.transport.send(self.target, frame);
            }
        }
        tracing::debug!(peer = self.target, session, "replication stream closed");
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

#[cfg(test)]
mod tests {
    //! The leader side of the pipeline against a scripted follower (no openraft needed).

    use std::net::SocketAddr;

    use async_trait::async_trait;
    use bytes::Bytes;
    use consensus_api::{InboundHandler, TransportError};
    use openraft::network::{RPCOption, RaftNetworkV2};
    use parking_lot::Mutex;

    use super::super::client::PeerClient;
    use super::super::wire::{decode_frame, StreamFrame};
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

    fn client(
        follower: Follower,
        rpc_timeout: Duration,
    ) -> (PeerClient, Arc<ScriptedTransport>, Arc<StreamRoutes>) {
        let routes = StreamRoutes::new();
        let transport = Arc::new(ScriptedTransport {
            routes: routes.clone(),
            follower,
            held: Mutex::default(),
            closed: Mutex::default(),
        });
        let client = PeerClient::new(1, 2, transport.clone(), rpc_timeout, routes.clone(), true);
        (client, transport, routes)
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
        let (mut client, transport, routes) =
            client(Follower::AfterBurst(8), Duration::from_secs(2));
        let out = run(&mut client, 8).await;
        assert_eq!(out.len(), 8);
        assert!(out.iter().all(|r| matches!(r, Ok(Ok(None)))));
        assert_eq!(
            transport.closed.lock().len(),
            1,
            "a finished stream is closed"
        );
        assert_eq!(routes.open_streams(), 0, "its route is gone");
    }

    #[tokio::test]
    async fn a_lost_frame_ends_the_stream_with_an_error() {
        let (mut client, _transport, _routes) =
            client(Follower::SkipSecond, Duration::from_secs(2));
        let out = run(&mut client, 3).await;
        assert_eq!(out.len(), 2, "one answer, then the gap");
        assert!(matches!(out[0], Ok(Ok(None))));
        assert!(matches!(out[1], Err(RPCError::Network(_))));
    }

    #[tokio::test]
    async fn a_silent_follower_times_out() {
        let (mut client, _transport, _routes) = client(Follower::Silent, Duration::from_millis(20));
        let started = Instant::now();
        let out = run(&mut client, 2).await;
        assert_eq!(out.len(), 1);
        assert!(matches!(out[0], Err(RPCError::Timeout(_))));
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
