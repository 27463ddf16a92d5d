//! openraft outcomes mapped onto the shared [`ConsensusError`] at this crate's boundary.

use std::collections::BTreeMap;

use consensus_api::backend_support::ReplicationTracker;
use consensus_api::{ConsensusError, NodeId, ReplicaProgress, Role, Status};
use openraft::errors::{
    ChangeMembershipError, ClientWriteError, Fatal, LinearizableReadError, RaftError,
};
use openraft::{Instant as _, RaftMetrics, ServerState};

use crate::types::C;

/// Maps a fatal engine error.
pub(crate) fn fatal(e: Fatal<C>) -> ConsensusError {
    match e {
        Fatal::Stopped => ConsensusError::ShuttingDown,
        Fatal::StorageError(s) => ConsensusError::Storage(s.to_string()),
        Fatal::Panicked => ConsensusError::Internal("the openraft core task panicked".into()),
    }
}

/// Maps the error of a write that openraft has taken (it may be in the log): a stop or a
/// failure leaves its outcome unknown ([`ConsensusError::after_handoff`]).
pub(crate) fn write_handed(e: RaftError<C, ClientWriteError<C>>) -> ConsensusError {
    write(e).after_handoff()
}

/// Maps a write (proposal or membership change) error.
pub(crate) fn write(e: RaftError<C, ClientWriteError<C>>) -> ConsensusError {
    match e {
        RaftError::Fatal(f) => fatal(f),
        RaftError::APIError(api) => match api {
            ClientWriteError::ForwardToLeader(f) => ConsensusError::NotLeader {
                leader: f.leader_id,
            },
            // The entry was appended and then replaced by another leader's log: it may or may
            // not commit. Same kind as a proposal timeout: outcome unknown.
            ClientWriteError::LogEntryDiscarded(f) => ConsensusError::Timeout(format!(
                "the proposal's outcome (leadership moved to {:?} before it committed)",
                f.leader_id
            )),
            ClientWriteError::ChangeMembershipError(c) => membership(c),
            ClientWriteError::PreconditionFailed(p) => {
                ConsensusError::InvalidRequest(p.to_string())
            }
        },
    }
}

fn membership(
    e: ChangeMembershipError<openraft::type_config::alias::CommittedLeaderIdOf<C>, u64>,
) -> ConsensusError {
    match e {
        ChangeMembershipError::LearnerNotFound(l) => ConsensusError::InvalidRequest(format!(
            "node {} must be added as a learner before it can become a voter",
            l.node_id
        )),
        other => ConsensusError::InvalidRequest(format!("membership change refused: {other}")),
    }
}

/// Maps a linearizable read error.
pub(crate) fn read(e: RaftError<C, LinearizableReadError<C>>) -> ConsensusError {
    match e {
        RaftError::Fatal(f) => fatal(f),
        RaftError::APIError(LinearizableReadError::ForwardToLeader(f)) => {
            ConsensusError::NotLeader {
                leader: f.leader_id,
            }
        }
        RaftError::APIError(LinearizableReadError::QuorumNotEnough(q)) => {
            ConsensusError::Timeout(format!("a quorum to confirm leadership ({q})"))
        }
    }
}

/// The leader's replication view from openraft's replication and heartbeat metrics (both
/// `Some` only on the leader).
pub(crate) fn replication(
    m: &RaftMetrics<C>,
    tracker: &mut ReplicationTracker,
) -> BTreeMap<NodeId, ReplicaProgress> {
    let Some(replication) = &m.replication else {
        tracker.clear();
        return BTreeMap::new();
    };
    for (id, at) in m.heartbeat.iter().flatten() {
        if let Some(at) = at {
            tracker.heard_from_ago(*id, at.elapsed());
        }
    }
    let commit = m.local_committed.map(|l| l.index).unwrap_or(0);
    let matched = replication
        .iter()
        .filter(|(id, _)| **id != m.id)
        .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)));
    tracker.progress(commit, matched)
}

/// Builds the shared status from openraft's metrics.
pub(crate) fn status(m: &RaftMetrics<C>) -> Status {
    let membership = m.membership_config.membership();
    let voters = membership.voter_ids().collect();
    let learners = membership.learner_ids().collect();
    let mut status = Status::initial(m.id);
    status.role = match m.state {
        ServerState::Leader => Role::Leader,
        ServerState::Candidate => Role::Candidate,
        ServerState::Follower => Role::Follower,
        ServerState::Learner => Role::Learner,
        ServerState::Shutdown => Role::Shutdown,
    };
    status.term = m.current_term;
    status.leader = m.current_leader;
    status.commit_index = m.local_committed.map(|l| l.index).unwrap_or(0);
    status.applied_index = m.last_applied.map(|l| l.index).unwrap_or(0);
    status.last_log_index = m.last_log_index.unwrap_or(0);
    status.snapshot_index = m.snapshot.map(|l| l.index).unwrap_or(0);
    status.purged_index = m.purged.map(|l| l.index).unwrap_or(0);
    status.voters = voters;
    status.learners = learners;
    status.addresses = membership
        .nodes()
        .map(|(id, node)| (*id, node.addr.clone()))
        .collect();
    // An orderly stop is `Fatal::Stopped`; anything else is the failure that stopped openraft.
    status.stopped = match &m.running_state {
        Ok(()) | Err(openraft::errors::Fatal::Stopped) => None,
        Err(e) => Some(format!("the openraft engine stopped: {e}")),
    };
    status
}
