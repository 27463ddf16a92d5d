//! Mapping gRPC outcomes onto [`TransportError`].
//!
//! The line that matters is whether the request may have reached the peer's handler.
//! `Unreachable` promises it did not, so a caller may retry it safely; it is given only when the
//! status proves so by its structure, never by its text:
//! - the channel could not connect: tonic wraps every connector failure (TCP connect, TLS
//!   handshake, connect timeout) in [`tonic::ConnectError`], kept in the status's source chain,
//!   and no request goes out before the connection exists;
//! - the server refused the call before any handler ran: it marks that status with the
//!   [`NOT_DELIVERED`] metadata key ([`not_delivered`]).
//!
//! Every other failure, `UNAVAILABLE` included (a keepalive timeout or a connection reset while
//! the request was in flight), is `Timeout` or `Remote`.

use std::error::Error;
use std::time::Duration;

use consensus_api::transport_support::NoHandler;
use consensus_api::{NodeId, TransportError};
use tonic::{Code, Status};

/// Metadata key a server sets on a refusal that no handler saw.
pub(crate) const NOT_DELIVERED: &str = "x-not-delivered";

/// The server's answer to a call that arrives before a handler is installed.
pub(crate) fn not_delivered(reason: NoHandler) -> Status {
    let mut status = Status::unavailable(reason.to_string());
    status.metadata_mut().insert(
        NOT_DELIVERED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// Maps the status of a failed call.
pub(crate) fn call_error(peer: NodeId, status: Status, timeout: Duration) -> TransportError {
    if undelivered(&status) {
        return TransportError::Unreachable {
            peer,
            reason: status.message().to_string(),
        };
    }
    let msg = status.message().to_string();
    match status.code() {
        Code::DeadlineExceeded => TransportError::Timeout(timeout),
        Code::Cancelled if deadline_expired(&status) => TransportError::Timeout(timeout),
        Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
            TransportError::Refused(msg)
        }
        Code::OutOfRange | Code::ResourceExhausted => {
            TransportError::Refused(format!("peer refused the frame size: {msg}"))
        }
        Code::Aborted => TransportError::Remote(msg),
        code => TransportError::Remote(format!("{code:?}: {msg}")),
    }
}

/// Whether the status proves the request reached no handler (see the module doc).
fn undelivered(status: &Status) -> bool {
    status.code() == Code::Unavailable
        && (caused_by::<tonic::ConnectError>(status)
            || status.metadata().contains_key(NOT_DELIVERED))
}

/// Whether the call was cancelled by a `grpc-timeout` deadline: tonic's own
/// [`tonic::TimeoutExpired`] on this side, or the server's, which reaches us only as the status
/// message tonic writes for it.
fn deadline_expired(status: &Status) -> bool {
    caused_by::<tonic::TimeoutExpired>(status)
        || status.message() == tonic::TimeoutExpired(()).to_string()
}

/// Whether an error of type `E` is in the status's source chain.
fn caused_by<E: Error + 'static>(status: &Status) -> bool {
    let mut source = status.source();
    while let Some(e) = source {
        if e.is::<E>() {
            return true;
        }
        source = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[test]
    fn a_connect_failure_is_unreachable() {
        let refused = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let status = Status::from_error(Box::new(tonic::ConnectError(Box::new(refused))));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(matches!(
            call_error(2, status, T),
            TransportError::Unreachable { peer: 2, .. }
        ));
    }

    #[test]
    fn a_refusal_before_the_handler_is_unreachable() {
        assert!(matches!(
            call_error(2, not_delivered(NoHandler), T),
            TransportError::Unreachable { peer: 2, .. }
        ));
    }

    #[test]
    fn an_unavailable_status_without_proof_is_not_unreachable() {
        // The message of a connection lost after the request went out mentions "connection";
        // matching on the text used to call this undelivered.
        for msg in [
            "connection closed before message completed",
            "connection error",
            "node not ready: no handler installed",
        ] {
            let e = call_error(2, Status::unavailable(msg), T);
            assert!(matches!(e, TransportError::Remote(_)), "{msg}: {e}");
        }
    }

    #[test]
    fn an_expired_grpc_deadline_is_a_timeout() {
        let local = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert_eq!(local.code(), Code::Cancelled);
        assert_eq!(call_error(2, local, T), TransportError::Timeout(T));
        let remote = Status::cancelled(tonic::TimeoutExpired(()).to_string());
        assert_eq!(call_error(2, remote, T), TransportError::Timeout(T));
        assert!(matches!(
            call_error(2, Status::cancelled("operation was canceled"), T),
            TransportError::Remote(_)
        ));
    }

    #[test]
    fn other_statuses_keep_their_mapping() {
        assert_eq!(
            call_error(2, Status::deadline_exceeded("late"), T),
            TransportError::Timeout(T)
        );
        assert!(matches!(
            call_error(2, Status::permission_denied("cluster"), T),
            TransportError::Refused(_)
        ));
        assert!(matches!(
            call_error(2, Status::out_of_range("size"), T),
            TransportError::Refused(_)
        ));
        assert_eq!(
            call_error(2, Status::aborted("handler says no"), T),
            TransportError::Remote("handler says no".into())
        );
    }
}
