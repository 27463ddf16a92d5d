//! The mappings at this crate's boundary: [`NodeConfig`] onto raft-rs's `Config` and the core's
//! [`Settings`], and raft-rs outcomes onto the shared [`ConsensusError`], the same kinds the
//! openraft backend gives for the same situations.

use std::collections::{BTreeMap, BTreeSet};

use consensus_api::{ConsensusError, NodeConfig, NodeId, Role, Status};
use raft::eraftpb::ConfState;
use raft::{RawNode, StateRole};

use crate::storage::DiskStorage;
use raft::ReadOnlyOption;

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

/// The shared [`Status`] of a node from raft-rs's state, the applied index and the address
/// book (only members' addresses are shown).
pub(crate) fn status(
    id: NodeId,
    raw: &RawNode<DiskStorage>,
    applied: u64,
    addresses: &BTreeMap<NodeId, String>,
    cs: &ConfState,
) -> Status {
    let raft = &raw.raft;
    let voters: BTreeSet<NodeId> = cs
        .voters
        .iter()
        .chain(&cs.voters_outgoing)
        .copied()
        .collect();
    let learners: BTreeSet<NodeId> = cs
        .learners
        .iter()
        .chain(&cs.learners_next)
        .copied()
        .collect();
    let role = match raft.state {
        StateRole::Leader => Role::Leader,
        StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
        StateRole::Follower if voters.contains(&id) => Role::Follower,
        StateRole::Follower => Role::Learner,
    };
    let store = raw.store();
    let mut status = Status::initial(id);
    status.role = role;
    status.term = raft.term;
    status.leader = (raft.leader_id != raft::INVALID_ID).then_some(raft.leader_id);
    status.commit_index = raft.raft_log.committed;
    status.applied_index = applied;
    status.last_log_index = raft.raft_log.last_index();
    status.snapshot_index = store.snapshot_position().0;
    status.purged_index = store.purged_index();
    status.addresses = addresses
        .iter()
        .filter(|(i, _)| voters.contains(i) || learners.contains(i))
        .map(|(i, a)| (*i, a.clone()))
        .collect();
    status.voters = voters;
    status.learners = learners;
    status
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

/// Knobs of the core, derived from [`NodeConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// Entries kept behind a snapshot.
    pub(crate) keep_logs_after_snapshot: u64,
    /// Largest command accepted (it must fit in one transport frame).
    pub(crate) max_command_bytes: usize,
    /// Re-issue a read-index request after this many ticks without an answer (raft-rs drops
    /// one silently while a new leader has not committed in its term yet).
    pub(crate) read_retry_ticks: u64,
}

impl Settings {
    pub(crate) fn from_config(c: &NodeConfig) -> Self {
        Self {
            keep_logs_after_snapshot: c.keep_logs_after_snapshot,
            max_command_bytes: c.transport.max_frame_bytes / 2,
            read_retry_ticks: 3,
        }
    }
}

/// raft-rs settings from the shared configuration: one tick per heartbeat interval.
pub(crate) fn raft_config(c: &NodeConfig, applied: u64) -> Result<raft::Config, ConsensusError> {
    let hb = c.heartbeat_interval.as_micros().max(1);
    let ticks = |d: std::time::Duration| d.as_micros().div_ceil(hb) as usize;
    let election = ticks(c.election_timeout_min).max(3);
    let cfg = raft::Config {
        id: c.id,
        heartbeat_tick: 1,
        election_tick: election,
        min_election_tick: election,
        // Exclusive upper bound: timeouts are drawn from [min, max).
        max_election_tick: ticks(c.election_timeout_max).max(election) + 1,
        applied,
        max_size_per_msg: (c.transport.max_frame_bytes as u64 / 4).clamp(64 << 10, 1 << 20),
        max_inflight_msgs: 256,
        check_quorum: true,
        pre_vote: true,
        read_only_option: ReadOnlyOption::Safe,
        ..Default::default()
    };
    cfg.validate()
        .map_err(|e| ConsensusError::InvalidRequest(format!("raft-rs config: {e}")))?;
    Ok(cfg)
}
