//! Mapping gRPC outcomes onto [`TransportError`].

use std::time::Duration;

use consensus_api::{NodeId, TransportError};
use tonic::{Code, Status};

use crate::NOT_DELIVERED_HEADER;

/// Maps the status of a failed call. `Unreachable` is reserved for failures that prove the
/// request was not delivered, so callers may retry it safely: our server marks "no handler
/// yet" with [`NOT_DELIVERED_HEADER`]; a failed TCP connect is recognised by hyper-util's
/// "tcp connect error" under `Unavailable` (tonic exposes no structured connect-error kind; the
/// looser "connect" this matched before also caught "connection reset" after sending).
/// Every other failure (a connection lost after the request went out included) is `Remote` or
/// `Timeout`: outcome unknown.
pub(crate) fn call_error(peer: NodeId, status: Status, timeout: Duration) -> TransportError {
    let msg = status.message().to_string();
    let marked = status.metadata().get(NOT_DELIVERED_HEADER).is_some();
    match status.code() {
        Code::Unavailable if marked || msg.contains("tcp connect error") => {
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
