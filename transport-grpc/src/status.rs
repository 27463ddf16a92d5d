//! Mapping gRPC outcomes onto [`TransportError`].

use std::time::Duration;

use consensus_api::{NodeId, TransportError};
use tonic::{Code, Status};

/// Maps the status of a failed call. `Unreachable` is reserved for failures that prove the
/// request was not delivered (connect failed, no handler yet), so callers may retry it safely.
pub(crate) fn call_error(peer: NodeId, status: Status, timeout: Duration) -> TransportError {
    let msg = status.message().to_string();
    match status.code() {
        Code::Unavailable if msg.contains("connect") || msg.starts_with("node not ready") => {
            TransportError::Unreachable { peer, reason: msg }
        }
        Code::DeadlineExceeded => TransportError::Timeout(timeout),
        Code::Cancelled if msg.contains("Timeout") => TransportError::Timeout(timeout),
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
