//! Mapping QUIC outcomes onto [`TransportError`].
//!
//! The line that matters is whether the request may have reached the peer's handler:
//! `Unreachable` (and `Refused`) promise it did not, so a caller may retry safely; once a single
//! byte of a request was written, a failure is `Remote` (outcome unknown) or the call deadline's
//! `Timeout`.

use bytes::Bytes;
use consensus_api::{NodeId, TransportError};
use quinn::{ConnectionError, ReadError, WriteError};

use crate::wire::{self, FrameError, Reply, SendError, Status, CLOSE_REFUSED, STOP_TOO_LARGE};

/// A failure while connecting, shaking hands, or opening a stream: nothing was delivered.
pub(crate) fn connect_error(peer: NodeId, addr: &str, e: &ConnectionError) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_REFUSED => {
            TransportError::Refused(format!("peer {peer} at {addr}: {}", wire::text(&c.reason)))
        }
        ConnectionError::ConnectionClosed(c) if wire::is_tls_alert(c.error_code) => {
            TransportError::Refused(format!(
                "peer {peer} at {addr} rejected this node's certificate: {c}"
            ))
        }
        ConnectionError::TransportError(t) if wire::is_tls_alert(t.code) => {
            TransportError::Refused(format!(
                "the server at {addr} failed TLS authentication as peer {peer}: {t}"
            ))
        }
        other => TransportError::Unreachable {
            peer,
            reason: format!("connection to {addr} failed: {other}"),
        },
    }
}

/// The connection failed while a call was in flight: the handler may have run.
pub(crate) fn in_flight_error(peer: NodeId, e: &ConnectionError) -> TransportError {
    match e {
        ConnectionError::ApplicationClosed(c) if c.error_code == CLOSE_REFUSED => {
            TransportError::Refused(wire::text(&c.reason))
        }
        other => TransportError::Remote(format!(
            "connection to peer {peer} lost during the call (the request may have been \
             processed): {other}"
        )),
    }
}

/// Maps a reply onto the call's result.
pub(crate) fn reply_result(peer: NodeId, reply: Reply) -> Result<Bytes, TransportError> {
    match reply.status {
        Status::Ok => Ok(reply.body),
        Status::Failed => Err(TransportError::Remote(wire::text(&reply.body))),
        Status::Refused => Err(TransportError::Refused(format!(
            "peer {peer}: {}",
            wire::text(&reply.body)
        ))),
        Status::NotReady => Err(TransportError::Unreachable {
            peer,
            reason: wire::text(&reply.body),
        }),
    }
}

/// The reply could not be read after the request was (at least partly) sent.
pub(crate) fn reply_error(peer: NodeId, e: FrameError) -> TransportError {
    match e {
        FrameError::Read(ReadError::ConnectionLost(c)) => in_flight_error(peer, &c),
        FrameError::TooLarge { size, limit } => TransportError::Remote(format!(
            "the answer of peer {peer} ({size} bytes) exceeds this node's limit of {limit} bytes"
        )),
        other => TransportError::Remote(format!("peer {peer} gave no usable answer: {other}")),
    }
}

/// The request could not be written and no reply explains why.
pub(crate) fn request_error(peer: NodeId, e: SendError) -> TransportError {
    match e {
        SendError::Write(WriteError::ConnectionLost(c)) => in_flight_error(peer, &c),
        SendError::Write(WriteError::Stopped(code)) if code == STOP_TOO_LARGE => {
            TransportError::Refused(format!("peer {peer} refused the frame size"))
        }
        other => TransportError::Remote(format!(
            "sending the request to peer {peer} failed: {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quinn::{ApplicationClose, VarInt};

    fn app_close(code: VarInt, reason: &'static [u8]) -> ConnectionError {
        ConnectionError::ApplicationClosed(ApplicationClose {
            error_code: code,
            reason: Bytes::from_static(reason),
        })
    }

    #[test]
    fn a_refusal_close_is_a_refusal_whenever_it_comes() {
        let e = app_close(CLOSE_REFUSED, b"wrong cluster");
        assert!(
            matches!(connect_error(2, "a:1", &e), TransportError::Refused(m) if m.contains("wrong cluster"))
        );
        assert!(matches!(in_flight_error(2, &e), TransportError::Refused(_)));
    }

    #[test]
    fn connect_failures_are_unreachable_and_in_flight_failures_are_not() {
        let e = ConnectionError::TimedOut;
        assert!(matches!(
            connect_error(2, "a:1", &e),
            TransportError::Unreachable { peer: 2, .. }
        ));
        assert!(matches!(in_flight_error(2, &e), TransportError::Remote(_)));
        assert!(matches!(
            reply_error(2, FrameError::Read(ReadError::ConnectionLost(e))),
            TransportError::Remote(_)
        ));
    }

    #[test]
    fn reply_statuses_map_onto_the_shared_errors() {
        let reply = |status, body: &'static [u8]| Reply {
            status,
            body: Bytes::from_static(body),
        };
        assert_eq!(
            reply_result(2, reply(Status::Ok, b"x")),
            Ok(Bytes::from_static(b"x"))
        );
        assert_eq!(
            reply_result(2, reply(Status::Failed, b"boom")),
            Err(TransportError::Remote("boom".into()))
        );
        assert!(matches!(
            reply_result(2, reply(Status::Refused, b"too big")),
            Err(TransportError::Refused(_))
        ));
        assert!(matches!(
            reply_result(2, reply(Status::NotReady, b"no handler")),
            Err(TransportError::Unreachable { peer: 2, .. })
        ));
    }
}
