//! One error type for every backend: the same scenario gives the same [`ErrorKind`] everywhere.

use serde::{Deserialize, Serialize};

use crate::NodeId;

/// What went wrong with a consensus operation. Backends map their engine's errors onto these
/// variants at their boundary; callers never see an engine type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ConsensusError {
    /// This node is not the leader and the request could not be forwarded; retry on `leader`
    /// (when known) or later.
    #[error(
        "not the leader (leader hint: {leader:?}); retry on the leader or once one is elected"
    )]
    NotLeader {
        /// The leader this node believes in, if any.
        leader: Option<NodeId>,
    },
    /// No quorum answered in time. For a proposal the outcome is unknown: it may still commit.
    #[error("timed out waiting for {0}; the cluster may have no quorum")]
    Timeout(String),
    /// The node is shutting down or has stopped, and the request was not taken: nothing was
    /// appended, so it is safe to send it to another node.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The durable store failed; the node stops accepting writes. Check the disk and the log.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A peer could not be reached or refused the connection.
    #[error("transport failure: {0}")]
    Transport(String),
    /// The request is invalid in the current state (unknown node, change in progress, ...);
    /// nothing was changed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An engine failure that fits no other kind; the message says what happened.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request was handed to the engine (it may be in the log and may still commit), but
    /// the node stopped or failed before its outcome was known. Unlike `ShuttingDown`, a blind
    /// retry may apply it twice: check whether it took effect first (as after a `Timeout`).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
}

/// The kind of a [`ConsensusError`], for matching without the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// See [`ConsensusError::NotLeader`].
    NotLeader,
    /// See [`ConsensusError::Timeout`].
    Timeout,
    /// See [`ConsensusError::ShuttingDown`].
    ShuttingDown,
    /// See [`ConsensusError::Storage`].
    Storage,
    /// See [`ConsensusError::Transport`].
    Transport,
    /// See [`ConsensusError::InvalidRequest`].
    InvalidRequest,
    /// See [`ConsensusError::Internal`].
    Internal,
    /// See [`ConsensusError::OutcomeUnknown`].
    OutcomeUnknown,
}

impl ConsensusError {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotLeader { .. } => ErrorKind::NotLeader,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::ShuttingDown => ErrorKind::ShuttingDown,
            Self::Storage(_) => ErrorKind::Storage,
            Self::Transport(_) => ErrorKind::Transport,
            Self::InvalidRequest(_) => ErrorKind::InvalidRequest,
            Self::Internal(_) => ErrorKind::Internal,
            Self::OutcomeUnknown(_) => ErrorKind::OutcomeUnknown,
        }
    }

    /// Whether a proposal that failed with this error may still commit (`Timeout`,
    /// `OutcomeUnknown`): the caller must find out before retrying a non-idempotent command.
    pub fn is_outcome_unknown(&self) -> bool {
        matches!(self, Self::Timeout(_) | Self::OutcomeUnknown(_))
    }

    /// This error for a request that was already handed to the engine: a stop or failure
    /// (`ShuttingDown`, `Storage`, `Internal`) leaves its outcome unknown; other kinds keep
    /// their meaning.
    pub fn after_handoff(self) -> Self {
        match self {
            Self::ShuttingDown => Self::OutcomeUnknown(
                "the node stopped after the request was handed to the engine".into(),
            ),
            Self::Storage(why) | Self::Internal(why) => Self::OutcomeUnknown(format!(
                "the node failed after the request was handed to the engine: {why}"
            )),
            other => other,
        }
    }
}

impl From<crate::codec::CodecError> for ConsensusError {
    fn from(e: crate::codec::CodecError) -> Self {
        Self::InvalidRequest(e.to_string())
    }
}

impl From<TransportError> for ConsensusError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Timeout(d) => Self::Timeout(format!("a peer's answer ({d:?})")),
            TransportError::Closed => Self::ShuttingDown,
            e @ TransportError::FrameTooLarge { .. } => Self::InvalidRequest(e.to_string()),
            other => Self::Transport(other.to_string()),
        }
    }
}

/// Errors of the byte-level [`Transport`](crate::Transport).
///
/// Four variants promise that the frame was **not delivered** to the peer's handler
/// ([`is_undelivered`](Self::is_undelivered)): `UnknownPeer`, `Unreachable`, `QueueFull` and
/// `FrameTooLarge`. A transport returns them only when it knows that; any failure after the
/// frame may have been handed to the peer is `Timeout` (or `Remote`, when the peer answered an
/// error): the outcome of such a call is unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// No address is known for the peer; add it with `set_peer` (membership changes do). Not
    /// delivered.
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// The request was not delivered: connecting failed, or the connection was lost before the
    /// frame was handed to the peer. Never used once the frame may have reached the peer.
    #[error("peer {peer} unreachable: {reason}")]
    Unreachable {
        /// The peer.
        peer: NodeId,
        /// Why.
        reason: String,
    },
    /// No answer within the deadline, or the connection failed after the request may have been
    /// delivered: the outcome is unknown.
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The frame exceeds the configured size limit and was not sent. Not delivered.
    #[error("frame of {size} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// Size of the refused frame.
        size: usize,
        /// The configured limit (`TransportConfig::max_frame_bytes`).
        limit: usize,
    },
    /// The per-peer send queue is full; the frame was dropped (Raft retransmits). Not delivered.
    #[error("send queue to peer {0} is full; frame dropped")]
    QueueFull(NodeId),
    /// The peer refused us (wrong cluster id, bad identity, malformed request).
    #[error("refused by peer: {0}")]
    Refused(String),
    /// The peer's handler answered with an error.
    #[error("remote handler error: {0}")]
    Remote(String),
    /// The transport has been shut down.
    #[error("transport is shut down")]
    Closed,
    /// Setting up the transport failed (bind, TLS material, ...).
    #[error("transport setup failed: {0}")]
    Setup(String),
}

impl TransportError {
    /// Whether this failure proves the frame never reached the peer's handler, so that even a
    /// non-idempotent request may be retried (see the type's docs).
    pub fn is_undelivered(&self) -> bool {
        matches!(
            self,
            TransportError::UnknownPeer(_)
                | TransportError::Unreachable { .. }
                | TransportError::QueueFull(_)
                | TransportError::FrameTooLarge { .. }
        )
    }

    /// The send-side size check every transport makes before anything leaves:
    /// `FrameTooLarge` when `size` exceeds `limit`.
    pub fn check_frame(size: usize, limit: usize) -> Result<(), TransportError> {
        if size > limit {
            Err(TransportError::FrameTooLarge { size, limit })
        } else {
            Ok(())
        }
    }

    /// A bounded per-peer queue refused a frame for `peer`: full (`QueueFull`) or gone (`Closed`).
    pub fn from_queue<T>(peer: NodeId, e: tokio::sync::mpsc::error::TrySendError<T>) -> Self {
        match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => TransportError::QueueFull(peer),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => TransportError::Closed,
        }
    }
}
