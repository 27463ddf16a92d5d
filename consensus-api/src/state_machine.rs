//! The replicated state machine: the one trait an embedder implements.

use std::sync::Arc;

use parking_lot::RwLock;
use serde::{de::DeserializeOwned, Serialize};

use crate::{codec, ConsensusError};

/// A deterministic state machine replicated by consensus.
///
/// Every node applies the same commands in the same order; `apply` must give the same result and
/// the same state on every node (no clocks, no randomness, no I/O whose outcome can differ).
pub trait StateMachine: Send + Sync + 'static {
    /// A command proposed by a client.
    type Command: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What applying a command returns to the proposer.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Applies a committed command at log `index`.
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Response;

    /// Serializes the whole state (called between applies, so it is consistent).
    fn snapshot(&self) -> Result<Vec<u8>, String>;

    /// Replaces the whole state with a snapshot produced by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}

/// The byte-level view of a state machine that engines drive. Engines never see the user's types.
pub trait ByteStateMachine: Send + Sync + 'static {
    /// Applies an encoded command; returns the encoded outcome (the response, or a decode error
    /// that every node reaches identically).
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8>;
    /// Serializes the whole state.
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError>;
    /// Restores the whole state.
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError>;
}

/// The outcome of applying one command, as carried back to the proposer.
pub(crate) type ApplyOutcome<R> = Result<R, String>;

/// A user's state machine shared between the engine (which applies) and the node handle (which
/// reads after a barrier).
pub(crate) struct Shared<SM>(pub(crate) Arc<RwLock<SM>>);

impl<SM> Clone for Shared<SM> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<SM: StateMachine> ByteStateMachine for Shared<SM> {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome: ApplyOutcome<SM::Response> = match codec::decode::<SM::Command>(command) {
            Ok(cmd) => Ok(self.0.write().apply(index, cmd)),
            Err(e) => Err(format!(
                "command at index {index} could not be decoded: {e}"
            )),
        };
        // Encoding our own response type cannot fail short of a serde bug; keep it deterministic.
        codec::encode(&outcome).unwrap_or_default()
    }

    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        self.0
            .read()
            .snapshot()
            .map_err(|e| ConsensusError::Internal(format!("state machine snapshot failed: {e}")))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        self.0
            .write()
            .restore(snapshot)
            .map_err(|e| ConsensusError::Storage(format!("state machine restore failed: {e}")))
    }
}
