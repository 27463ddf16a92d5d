//! raft-rs outcomes mapped onto the shared [`ConsensusError`] at this crate's boundary, the same
//! kinds the openraft backend gives for the same situations.

use consensus_api::{ConsensusError, NodeId};

/// Maps a raft-rs error; `leader` is the hint for errors that mean "not (or no longer) the
/// leader".
pub(crate) fn raft(e: raft::Error, leader: Option<NodeId>) -> ConsensusError {
    use raft::Error as E;
    match e {
        // Dropped before it entered the log (not the leader, a transfer in progress, the
        // uncommitted-size limit): it cannot have taken effect, so a retry is safe.
        E::ProposalDropped => ConsensusError::NotLeader { leader },
        E::Store(s) => ConsensusError::Storage(s.to_string()),
        E::Io(io) => ConsensusError::Storage(io.to_string()),
        E::ConfChangeError(m) => {
            ConsensusError::InvalidRequest(format!("membership change refused: {m}"))
        }
        e @ (E::Exists { .. } | E::NotExists { .. }) => {
            ConsensusError::InvalidRequest(format!("membership change refused: {e}"))
        }
        E::ConfigInvalid(m) => ConsensusError::InvalidRequest(format!("raft-rs config: {m}")),
        e @ (E::CodecError(_)
        | E::StepLocalMsg
        | E::StepPeerNotFound
        | E::RequestSnapshotDropped) => ConsensusError::Internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus_api::ErrorKind;

    #[test]
    fn every_raft_error_has_the_shared_kind() {
        let cases = [
            (raft::Error::ProposalDropped, ErrorKind::NotLeader),
            (
                raft::Error::Store(raft::StorageError::Unavailable),
                ErrorKind::Storage,
            ),
            (
                raft::Error::ConfChangeError("joint".into()),
                ErrorKind::InvalidRequest,
            ),
            (
                raft::Error::Exists {
                    id: 3,
                    set: "voters",
                },
                ErrorKind::InvalidRequest,
            ),
            (raft::Error::StepPeerNotFound, ErrorKind::Internal),
        ];
        for (e, kind) in cases {
            assert_eq!(raft(e, Some(2)).kind(), kind);
        }
    }
}
