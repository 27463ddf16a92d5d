//! The follower's side of one replication stream: which requests it accepts, and how it
//! numbers its answers.

use std::fmt;

use openraft::raft::StreamAppendResult;

use crate::network::wire::StreamFrame;
use crate::types::C;

/// Why a follower drops a stream; its text goes to the leader in the `Reset` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ResetReason {
    /// A request arrived out of sequence: the frames in between were lost.
    Gap { expected: u64, got: u64 },
    /// The follower's per-stream queue (of [`super::MAX_IN_FLIGHT`]) is full.
    QueueFull,
    /// openraft already ended the stream on the follower.
    Ended,
    /// The frame belongs to a stream the follower does not have.
    NoStream { session: u64 },
}

impl ResetReason {
    /// Whether the follower drops the stream it has open for the frame's leader: yes for a
    /// frame of that stream it cannot accept; no for a frame of another (stale) session, which
    /// leaves the current stream alone.
    pub(crate) fn ends_current_stream(&self) -> bool {
        !matches!(self, ResetReason::NoStream { .. })
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Gap { expected, got } => write!(
                f,
                "expected request {expected} of the stream, got {got}: a frame was lost"
            ),
            ResetReason::QueueFull => f.write_str("the follower's stream queue is full"),
            ResetReason::Ended => f.write_str("the stream already ended on the follower"),
            ResetReason::NoStream { session } => write!(
                f,
                "no open stream {session} (dropped, or this node restarted)"
            ),
        }
    }
}

/// The follower's side of the stream one leader has open on it: which requests it accepts.
///
/// Input: [`on_append`](Self::on_append) for every `Append` frame of that leader; `Ok` means
/// queue the request for openraft, an error means send `Reset` with it (and drop this stream,
/// if [`ResetReason::ends_current_stream`]).
/// (A `Close` frees the stream only if [`session`](Self::session) matches; an `Open` replaces
/// it with a new one.)
#[derive(Debug)]
pub(crate) struct FollowerStream {
    session: u64,
    /// Sequence number of the next request expected.
    next_seq: u64,
}

impl FollowerStream {
    /// Stream `session`, whose `Open` frame carried request 0.
    pub(crate) fn opened(session: u64) -> Self {
        Self {
            session,
            next_seq: 1,
        }
    }

    /// The stream's session id.
    pub(crate) fn session(&self) -> u64 {
        self.session
    }

    /// Input: request `seq` of stream `session` arrived from this stream's leader. It is
    /// accepted only as the next request of this very stream.
    pub(crate) fn on_append(&mut self, session: u64, seq: u64) -> Result<(), ResetReason> {
        if session != self.session {
            return Err(ResetReason::NoStream { session });
        }
        if seq != self.next_seq {
            return Err(ResetReason::Gap {
                expected: self.next_seq,
                got: seq,
            });
        }
        self.next_seq += 1;
        Ok(())
    }
}

/// How a follower answers on one stream: openraft's answers in order, numbered from 0, until
/// one ends the stream.
pub(crate) struct FollowerAnswers {
    session: u64,
    next_seq: u64,
}

impl FollowerAnswers {
    /// The answers of stream `session`.
    pub(crate) fn new(session: u64) -> Self {
        Self {
            session,
            next_seq: 0,
        }
    }

    /// Input: openraft's next answer (or the fatal error that stopped it). Returns the `Reply`
    /// frame to send and whether it is the stream's last (a conflict, a higher vote, or a fatal
    /// error end the stream).
    pub(crate) fn on_answer<E: fmt::Display>(
        &mut self,
        answer: Result<StreamAppendResult<C>, E>,
    ) -> (StreamFrame, bool) {
        let (result, last) = match answer {
            Ok(r) => {
                let last = r.is_err();
                (Ok(r), last)
            }
            Err(fatal) => (Err(format!("receiver failed: {fatal}")), true),
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let frame = StreamFrame::Reply {
            session: self.session,
            seq,
            result,
        };
        (frame, last)
    }
}

#[cfg(test)]
mod tests {
    use openraft::raft::StreamAppendError;
    use openraft::Vote;

    use super::*;

    #[test]
    fn the_follower_accepts_requests_strictly_in_sequence_after_open() {
        let mut f = FollowerStream::opened(9);
        assert_eq!(f.session(), 9);
        assert_eq!(f.on_append(9, 1), Ok(()));
        assert_eq!(f.on_append(9, 2), Ok(()));
        assert_eq!(
            f.on_append(9, 2),
            Err(ResetReason::Gap {
                expected: 3,
                got: 2
            }),
            "a repeated request is out of sequence too"
        );
    }

    #[test]
    fn a_gap_on_the_follower_resets_with_what_it_expected() {
        let mut f = FollowerStream::opened(9);
        let reason = f.on_append(9, 2).expect_err("request 1 is missing");
        assert_eq!(
            reason,
            ResetReason::Gap {
                expected: 1,
                got: 2
            }
        );
        assert!(reason.ends_current_stream());
        assert_eq!(
            reason.to_string(),
            "expected request 1 of the stream, got 2: a frame was lost"
        );
    }

    #[test]
    fn a_frame_of_a_stale_session_resets_and_leaves_the_current_one_alone() {
        let mut f = FollowerStream::opened(9);
        assert_eq!(f.on_append(8, 1), Err(ResetReason::NoStream { session: 8 }));
        assert!(!ResetReason::NoStream { session: 8 }.ends_current_stream());
        assert_eq!(f.on_append(9, 1), Ok(()), "the current stream goes on");
        assert_eq!(
            ResetReason::NoStream { session: 8 }.to_string(),
            "no open stream 8 (dropped, or this node restarted)"
        );
    }

    #[test]
    fn follower_answers_are_numbered_from_0_and_a_conflict_or_fatal_error_is_the_last() {
        let mut a = FollowerAnswers::new(4);
        let (frame, last) = a.on_answer::<String>(Ok(Ok(None)));
        assert!(!last);
        assert!(matches!(
            frame,
            StreamFrame::Reply {
                session: 4,
                seq: 0,
                result: Ok(Ok(None))
            }
        ));
        let (frame, last) =
            a.on_answer::<String>(Ok(Err(StreamAppendError::HigherVote(Vote::new(2, 3)))));
        assert!(last, "a higher vote ends the stream");
        assert!(matches!(
            frame,
            StreamFrame::Reply {
                seq: 1,
                result: Ok(Err(_)),
                ..
            }
        ));

        let mut a = FollowerAnswers::new(4);
        let (frame, last) = a.on_answer(Err("stopped"));
        assert!(last, "a fatal error ends the stream");
        assert!(matches!(
            frame,
            StreamFrame::Reply { seq: 0, result: Err(ref m), .. } if m == "receiver failed: stopped"
        ));
    }
}
