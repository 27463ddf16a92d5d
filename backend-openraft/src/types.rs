//! The openraft type configuration: opaque byte commands and responses.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An encoded command of the user's state machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Request(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "command({} bytes)", self.0.len())
    }
}

/// The encoded outcome of applying a command (empty for blank and membership entries).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Response(#[serde(with = "serde_bytes")] pub Vec<u8>);

openraft::declare_raft_types!(
    /// The openraft type configuration of this backend.
    ///
    /// Standard Raft leader ids (one leader per term, as raft-rs and the contract promise). The
    /// default "advanced" ids let several leaders share a term and make the bootstrap entry of
    /// each initial member differ (`T0-N1.0`, `T0-N2.0`, ...), so that concurrent bootstraps
    /// conflict and only the highest id can win the first election.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// Short alias used throughout the crate.
pub(crate) type C = TypeConfig;
/// Snapshot payload: a complete, checked snapshot file (metadata and state), read through an
/// open handle: the current snapshot, what a leader streams to followers in chunks, and what a
/// follower receives and installs. Never the state bytes in memory.
pub(crate) type SnapshotData = consensus_storage::SnapshotFile;

#[cfg(test)]
mod tests {
    use super::*;
    use consensus_api::codec;

    /// The byte-string encoding is the same bytes as the sequence of `u8` that logs written
    /// before it hold: old entries still decode.
    #[test]
    fn commands_encode_as_they_did_as_a_sequence_of_bytes() {
        let bytes: Vec<u8> = (0..=255u8).chain([7; 300]).collect();
        let before = codec::encode(&bytes).expect("encode");
        assert_eq!(
            codec::encode(&Request(bytes.clone())).expect("encode"),
            before
        );
        assert_eq!(
            codec::encode(&Response(bytes.clone())).expect("encode"),
            before
        );
        assert_eq!(
            codec::decode::<Request>(&before).expect("decode"),
            Request(bytes)
        );
    }
}
