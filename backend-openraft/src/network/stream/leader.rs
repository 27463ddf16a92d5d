//! The leader's side of one replication stream.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use consensus_api::NodeId;
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};

use super::MAX_IN_FLIGHT;
use crate::network::wire::{CallError, StreamFrame};
use crate::types::C;

/// One answer of the leader's output stream: openraft's result for the oldest request in
/// flight, or the error that ends the stream.
pub(crate) type Answer = Result<StreamAppendResult<C>, CallError>;

/// The leader's side of one replication stream to `target`, as a state machine.
///
/// Methods come in three kinds, as in `quinn-proto`'s `Connection`:
/// - getters: [`session`](Self::session), [`timeout`](Self::timeout),
///   [`oldest_unanswered`](Self::oldest_unanswered),
///   [`wants_request`](Self::wants_request) (the window has room and openraft's input is open);
/// - inputs (`on_*`): [`on_request`](Self::on_request) (openraft produced a request; returns
///   the frame to send), [`on_send_failed`](Self::on_send_failed),
///   [`on_input_end`](Self::on_input_end), [`on_reply`](Self::on_reply),
///   [`on_reset`](Self::on_reset), [`on_route_closed`](Self::on_route_closed) and
///   [`on_timeout(now)`](Self::on_timeout);
/// - outputs (`poll_*`): [`poll_finished`](Self::poll_finished) (nothing more to yield),
///   [`poll_timeout`](Self::poll_timeout) (when to call `on_timeout`) and
///   [`poll_close`](Self::poll_close) (the frame that tells the follower the stream is gone).
///
/// A driver loops:
/// 1. if `poll_finished()`, end the output stream;
/// 2. wait for whichever comes first, preferring the follower's messages: a follower message,
///    a request from openraft (only if `wants_request()`), the instant `poll_timeout()`;
/// 3. feed it in: `on_reply`/`on_reset`/`on_route_closed`, each of which yields one item of the
///    output stream; `on_request`, whose frame it sends (reporting a failure with
///    `on_send_failed`, whose error is the last item), or `on_input_end`; `on_timeout(now)`,
///    whose `Some` error is the last item.
///
/// When the driver drops the stream it sends `poll_close()`'s frame, if there is one.
pub(crate) struct LeaderStream {
    target: NodeId,
    session: u64,
    /// This leader's address, sent with the stream's first request.
    reply_to: Option<String>,
    /// How long each request may wait for its reply.
    timeout: Duration,
    /// Deadlines of the requests sent and not answered yet, oldest first; the oldest is request
    /// `next_reply`.
    in_flight: VecDeque<Instant>,
    /// Sequence number of the next request to send.
    next_seq: u64,
    /// Sequence number of the next reply expected.
    next_reply: u64,
    /// Set once openraft's input ended.
    input_ended: bool,
    /// Set once the stream yielded its last item (an error, or an answer that ends it).
    done: bool,
}

impl LeaderStream {
    /// Stream `session` to `target`, announcing `reply_to` with its first request; each request
    /// may wait `timeout` for its reply.
    pub(crate) fn new(
        target: NodeId,
        session: u64,
        reply_to: Option<String>,
        timeout: Duration,
    ) -> Self {
        Self {
            target,
            session,
            reply_to,
            timeout,
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            next_seq: 0,
            next_reply: 0,
            input_ended: false,
            done: false,
        }
    }

    /// The stream's session id.
    pub(crate) fn session(&self) -> u64 {
        self.session
    }

    /// How long each request may wait for its reply.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sequence number of the oldest request not answered yet (the one a timeout is about).
    pub(crate) fn oldest_unanswered(&self) -> u64 {
        self.next_reply
    }

    /// Whether the driver should take another request from openraft now: the stream goes on,
    /// openraft's input is open, and fewer than [`MAX_IN_FLIGHT`] requests wait for a reply.
    pub(crate) fn wants_request(&self) -> bool {
        !self.done && !self.input_ended && self.in_flight.len() < MAX_IN_FLIGHT
    }

    /// Input: openraft's next request, sent at `now`. Returns the frame that carries it: `Open`
    /// for request 0, `Append` after that. The request counts as in flight from here on; if the
    /// frame cannot be sent, say so with [`on_send_failed`](Self::on_send_failed).
    pub(crate) fn on_request(&mut self, req: AppendEntriesRequest<C>, now: Instant) -> StreamFrame {
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
        self.next_seq += 1;
        self.in_flight.push_back(now + self.timeout);
        frame
    }

    /// Input: the frame of the last [`on_request`](Self::on_request) was not sent, because of
    /// `e`. The request is no longer in flight, and the stream ends with `e`.
    pub(crate) fn on_send_failed(&mut self, e: CallError) -> CallError {
        self.in_flight.pop_back();
        self.next_seq = self.next_seq.saturating_sub(1);
        self.fail(e)
    }

    /// Input: openraft's input ended; the stream finishes once every request in flight is
    /// answered.
    pub(crate) fn on_input_end(&mut self) {
        self.input_ended = true;
    }

    /// Input: the follower's answer to request `seq`. Yields it if it is the oldest request in
    /// flight; anything else means a frame was lost, and ends the stream. An answer that is a
    /// conflict or a higher vote is yielded and ends the stream, as it does in openraft; a
    /// follower whose openraft stopped (`Err`) ends it as unreachable.
    pub(crate) fn on_reply(
        &mut self,
        seq: u64,
        result: Result<StreamAppendResult<C>, String>,
    ) -> Answer {
        if seq != self.next_reply || self.in_flight.pop_front().is_none() {
            let (target, expected) = (self.target, self.next_reply);
            return Err(self.fail(CallError::Network(format!(
                "reply {seq} from node {target} out of sequence (expected {expected}): \
                 a frame was lost"
            ))));
        }
        self.next_reply += 1;
        match result {
            Ok(r) => {
                if r.is_err() {
                    self.done = true;
                }
                Ok(r)
            }
            // The follower's openraft stopped: like a call whose receiver failed.
            Err(fatal) => Err(self.fail(CallError::Unreachable(fatal))),
        }
    }

    /// Input: the follower dropped the stream (`Reset`); the stream ends.
    pub(crate) fn on_reset(&mut self, reason: &str) -> CallError {
        let target = self.target;
        self.fail(CallError::Network(format!(
            "node {target} dropped the replication stream: {reason}"
        )))
    }

    /// Input: the driver's queue of follower messages closed; the stream ends.
    pub(crate) fn on_route_closed(&mut self) -> CallError {
        self.fail(CallError::Network("the stream's reply route closed".into()))
    }

    /// Input: the time is `now`. If the oldest request in flight is past its deadline, the
    /// stream ends with a timeout; otherwise nothing happens.
    pub(crate) fn on_timeout(&mut self, now: Instant) -> Option<CallError> {
        match self.in_flight.front() {
            Some(&deadline) if !self.done && deadline <= now => {
                Some(self.fail(CallError::Timeout(self.timeout)))
            }
            _ => None,
        }
    }

    /// Output: whether the stream has nothing more to yield (it ended, or openraft's input
    /// ended and every request was answered). Once true, it stays true.
    pub(crate) fn poll_finished(&mut self) -> bool {
        if self.input_ended && self.in_flight.is_empty() {
            self.done = true;
        }
        self.done
    }

    /// Output: the deadline of the oldest request in flight, if any: when to call
    /// [`on_timeout`](Self::on_timeout).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight.front().copied()
    }

    /// Output, once the stream is dropped: the `Close` frame, if any frame of the stream was
    /// sent (a follower that never saw the stream has nothing to free).
    pub(crate) fn poll_close(&self) -> Option<StreamFrame> {
        (self.next_seq > 0).then_some(StreamFrame::Close {
            session: self.session,
        })
    }

    fn fail(&mut self, e: CallError) -> CallError {
        self.done = true;
        e
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::StreamAppendError;
    use openraft::Vote;

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn request() -> AppendEntriesRequest<C> {
        AppendEntriesRequest {
            vote: Vote::new(1, 1),
            prev_log_id: None,
            entries: vec![],
            leader_commit: None,
        }
    }

    fn stream() -> LeaderStream {
        LeaderStream::new(2, 7, Some("10.0.0.1:1".into()), TIMEOUT)
    }

    fn ok() -> Result<StreamAppendResult<C>, String> {
        Ok(Ok(None))
    }

    /// Sends `n` requests at `now`.
    fn send(s: &mut LeaderStream, n: usize, now: Instant) {
        for _ in 0..n {
            s.on_request(request(), now);
        }
    }

    #[test]
    fn request_0_opens_the_stream_with_the_leader_address_and_later_ones_append_in_sequence() {
        let mut s = stream();
        let now = Instant::now();
        assert!(matches!(
            s.on_request(request(), now),
            StreamFrame::Open { session: 7, reply_to: Some(ref a), .. } if a == "10.0.0.1:1"
        ));
        assert!(matches!(
            s.on_request(request(), now),
            StreamFrame::Append {
                session: 7,
                seq: 1,
                ..
            }
        ));
        assert!(matches!(
            s.on_request(request(), now),
            StreamFrame::Append {
                session: 7,
                seq: 2,
                ..
            }
        ));
    }

    #[test]
    fn in_order_replies_are_yielded_and_the_stream_finishes_when_input_ends_and_all_are_answered() {
        let mut s = stream();
        send(&mut s, 3, Instant::now());
        s.on_input_end();
        assert!(!s.wants_request(), "no requests after the input ended");
        for seq in 0..3 {
            assert!(!s.poll_finished(), "request {seq} is still unanswered");
            assert_eq!(s.on_reply(seq, ok()), Ok(Ok(None)));
        }
        assert!(s.poll_finished());
        assert!(s.poll_timeout().is_none());
    }

    #[test]
    fn the_window_is_full_at_max_in_flight_and_a_reply_reopens_it() {
        let mut s = stream();
        let now = Instant::now();
        send(&mut s, MAX_IN_FLIGHT - 1, now);
        assert!(s.wants_request());
        send(&mut s, 1, now);
        assert!(
            !s.wants_request(),
            "{MAX_IN_FLIGHT} requests in flight fill the window"
        );
        assert_eq!(s.on_reply(0, ok()), Ok(Ok(None)));
        assert!(s.wants_request(), "an answer frees a slot");
    }

    #[test]
    fn a_gap_in_the_replies_ends_the_stream() {
        let mut s = stream();
        send(&mut s, 3, Instant::now());
        assert_eq!(s.on_reply(0, ok()), Ok(Ok(None)));
        assert!(matches!(
            s.on_reply(2, ok()),
            Err(CallError::Network(m)) if m.contains("out of sequence (expected 1)")
        ));
        assert!(s.poll_finished());
        assert!(!s.wants_request());
    }

    #[test]
    fn a_reply_with_nothing_in_flight_ends_the_stream() {
        let mut s = stream();
        assert!(matches!(s.on_reply(0, ok()), Err(CallError::Network(_))));
        assert!(s.poll_finished());
    }

    #[test]
    fn a_reset_from_the_follower_ends_the_stream() {
        let mut s = stream();
        send(&mut s, 2, Instant::now());
        assert!(matches!(
            s.on_reset("queue full"),
            CallError::Network(m) if m == "node 2 dropped the replication stream: queue full"
        ));
        assert!(s.poll_finished());
    }

    #[test]
    fn a_closed_reply_route_ends_the_stream() {
        let mut s = stream();
        send(&mut s, 1, Instant::now());
        assert!(matches!(s.on_route_closed(), CallError::Network(_)));
        assert!(s.poll_finished());
    }

    #[test]
    fn the_oldest_request_times_out_at_its_deadline_and_ends_the_stream() {
        let mut s = stream();
        let t0 = Instant::now();
        send(&mut s, 1, t0);
        send(&mut s, 1, t0 + Duration::from_millis(30));
        assert_eq!(s.poll_timeout(), Some(t0 + TIMEOUT), "the oldest deadline");
        assert_eq!(s.on_timeout(t0 + TIMEOUT - Duration::from_millis(1)), None);
        assert!(!s.poll_finished(), "an early wake-up changes nothing");
        assert_eq!(
            s.on_timeout(t0 + TIMEOUT),
            Some(CallError::Timeout(TIMEOUT))
        );
        assert!(s.poll_finished());
    }

    #[test]
    fn an_answer_moves_the_deadline_to_the_next_request() {
        let mut s = stream();
        let t0 = Instant::now();
        send(&mut s, 1, t0);
        send(&mut s, 1, t0 + Duration::from_millis(30));
        assert_eq!(s.on_reply(0, ok()), Ok(Ok(None)));
        assert_eq!(s.oldest_unanswered(), 1);
        assert_eq!(
            s.poll_timeout(),
            Some(t0 + Duration::from_millis(30) + TIMEOUT)
        );
        assert_eq!(s.on_timeout(t0 + TIMEOUT), None);
    }

    #[test]
    fn nothing_in_flight_never_times_out() {
        let mut s = stream();
        assert_eq!(s.poll_timeout(), None);
        assert_eq!(s.on_timeout(Instant::now() + TIMEOUT * 10), None);
        assert!(!s.poll_finished());
    }

    #[test]
    fn a_conflict_is_yielded_and_ends_the_stream() {
        let mut s = stream();
        send(&mut s, 2, Instant::now());
        let conflict: StreamAppendResult<C> = Err(StreamAppendError::HigherVote(Vote::new(2, 3)));
        assert_eq!(s.on_reply(0, Ok(conflict.clone())), Ok(conflict));
        assert!(
            s.poll_finished(),
            "openraft opens a new stream after a conflict"
        );
    }

    #[test]
    fn a_follower_whose_openraft_stopped_is_unreachable() {
        let mut s = stream();
        send(&mut s, 1, Instant::now());
        assert_eq!(
            s.on_reply(0, Err("receiver failed: stopped".into())),
            Err(CallError::Unreachable("receiver failed: stopped".into()))
        );
        assert!(s.poll_finished());
    }

    #[test]
    fn a_stream_closes_on_the_follower_only_once_a_frame_was_sent() {
        let mut s = stream();
        assert!(s.poll_close().is_none(), "nothing sent, nothing to close");
        let now = Instant::now();
        s.on_request(request(), now);
        let e = s.on_send_failed(CallError::Unreachable("down".into()));
        assert_eq!(e, CallError::Unreachable("down".into()));
        assert!(s.poll_finished());
        assert!(
            s.poll_timeout().is_none(),
            "an unsent request is not in flight"
        );
        assert!(
            s.poll_close().is_none(),
            "the follower never saw the stream"
        );

        let mut s = stream();
        s.on_request(request(), now);
        assert!(matches!(
            s.poll_close(),
            Some(StreamFrame::Close { session: 7 })
        ));
    }

    #[test]
    fn a_failed_append_keeps_the_frames_sent_before_it_closable() {
        let mut s = stream();
        let now = Instant::now();
        send(&mut s, 2, now);
        s.on_send_failed(CallError::Network("encode".into()));
        assert!(matches!(
            s.poll_close(),
            Some(StreamFrame::Close { session: 7 })
        ));
        assert!(!s.wants_request());
    }
}
