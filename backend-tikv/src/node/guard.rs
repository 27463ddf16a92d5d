//! What a peer's message must satisfy before raft-rs sees it.
//!
//! raft-rs 0.7 trusts its peers: a message that breaks the protocol's invariants reaches a
//! `fatal!` (a panic) or an out-of-bounds slice, and the node's driver dies. Any holder of a
//! cluster certificate can send one, and a follower whose disk lost an acknowledged tail gets
//! one from a legitimate leader (a heartbeat committing past its log). [`check`] refuses every
//! message that could reach one of those panics from `RawNode::step`, and a few more that a
//! protocol-following peer never sends; a refused message changes nothing.
//!
//! The panics it keeps out (raft-rs 0.7 `raft.rs` / `raft_log.rs` / `log_unstable.rs`):
//! - `commit_to` "to_commit is out of range": a heartbeat whose commit is beyond the last
//!   index; an append whose previous entry has term 0 beyond the log (`term()` answers 0 for
//!   an absent index, so it "matches"), whose commit then passes the log's end;
//! - `maybe_append` "conflict with committed entry" and `ents[start..]` with an underflowed
//!   start: entries that do not start right after `m.index` or are not contiguous;
//!   `truncate_and_append` "out of bound": entries appended past a gap;
//! - `step_leader` "stepped empty MsgProp" and `m.entries[0]` of an empty `MsgReadIndex`:
//!   those types (and `MsgTransferLeader`, `MsgReadIndexResp`, `MsgRequestSnapshot`) are
//!   never sent between nodes of this backend (proposals, reads and transfers are decided on
//!   the leader), so they are refused outright; they would otherwise also let a peer append
//!   arbitrary entries on the leader;
//! - `send` "term should be set": a vote request with term 0 (term 0 also makes raft-rs treat
//!   a message as local, skipping every term check: a candidate stepping an append of term 0
//!   would go back to term 0);
//! - `maybe_decr_to`'s `match_hint + 1` overflow: an append rejection whose hint is beyond its
//!   index;
//! - `restore` "unable to restore config" / "invalid restore" and `commit_to`: a snapshot whose
//!   `ConfState` is not a valid configuration, or whose term is 0.

use std::collections::BTreeSet;

use raft::eraftpb::{ConfState, Message, MessageType};
use raft::{Raft, StateRole, Storage, INVALID_ID};

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// A heartbeat commits past the end of the local log. From the leader this node follows,
    /// this means its log lost entries it had acknowledged: see [`lost_tail_answers`].
    CommitBeyondLog { commit: u64, last: u64 },
    /// Anything else.
    Invalid(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::CommitBeyondLog { commit, last } => write!(
                f,
                "heartbeat commits index {commit} but the local log ends at {last}"
            ),
            Refusal::Invalid(why) => f.write_str(why),
        }
    }
}

fn invalid(why: String) -> Result<(), Refusal> {
    Err(Refusal::Invalid(why))
}

/// Whether `m`, from a peer, may be stepped into `raft`.
pub(crate) fn check<T: Storage>(raft: &Raft<T>, m: &Message) -> Result<(), Refusal> {
    use MessageType::*;
    let ty = m.get_msg_type();
    match ty {
        MsgAppend
        | MsgAppendResponse
        | MsgRequestVote
        | MsgRequestVoteResponse
        | MsgRequestPreVote
        | MsgRequestPreVoteResponse
        | MsgSnapshot
        | MsgHeartbeat
        | MsgHeartbeatResponse
        | MsgTimeoutNow => {}
        _ => return invalid(format!("{ty:?} is never sent between nodes")),
    }
    if m.from == INVALID_ID || m.from == raft.id {
        return invalid(format!("{ty:?} claims to come from node {}", m.from));
    }
    if m.term == 0 {
        return invalid(format!("{ty:?} without a term"));
    }
    let current = m.term >= raft.term;
    let leader_message = matches!(ty, MsgAppend | MsgHeartbeat | MsgSnapshot | MsgTimeoutNow);
    if leader_message && m.term == raft.term {
        if raft.state == StateRole::Leader {
            return invalid(format!(
                "{ty:?} from node {} as leader of term {}, which this node leads",
                m.from, m.term
            ));
        }
        if raft.leader_id != INVALID_ID && raft.leader_id != m.from {
            return invalid(format!(
                "{ty:?} from node {} as leader of term {}, whose leader is node {}",
                m.from, m.term, raft.leader_id
            ));
        }
    }
    match ty {
        MsgHeartbeat => {
            let last = raft.raft_log.last_index();
            if current && m.commit > last {
                return Err(Refusal::CommitBeyondLog {
                    commit: m.commit,
                    last,
                });
            }
        }
        MsgAppend => check_append(m)?,
        MsgAppendResponse => {
            if m.reject && m.reject_hint > m.index {
                return invalid(format!(
                    "append rejection at {} with a hint beyond it ({})",
                    m.index, m.reject_hint
                ));
            }
            let last = raft.raft_log.last_index();
            if !m.reject && raft.state == StateRole::Leader && m.term == raft.term && m.index > last
            {
                return invalid(format!(
                    "append acknowledged up to {} but this leader's log ends at {last}",
                    m.index
                ));
            }
        }
        MsgRequestVote | MsgRequestPreVote if m.log_term > m.term || m.commit_term > m.term => {
            return invalid(format!(
                "{ty:?} for term {} claims a log of term {} (commit term {})",
                m.term, m.log_term, m.commit_term
            ));
        }
        MsgSnapshot => {
            let meta = m.get_snapshot().get_metadata();
            if meta.term == 0 || meta.index == 0 || meta.term > m.term {
                return invalid(format!(
                    "snapshot at {} of term {} sent in term {}",
                    meta.index, meta.term, m.term
                ));
            }
            check_conf_state(meta.get_conf_state()).map_err(Refusal::Invalid)?;
        }
        MsgTimeoutNow if m.term != raft.term || raft.leader_id != m.from => {
            return invalid(format!(
                "leadership handed over by node {} in term {}, which is not this node's \
                 leader (node {} in term {})",
                m.from, m.term, raft.leader_id, raft.term
            ));
        }
        _ => {}
    }
    Ok(())
}

/// An append's entries follow `m.index` one by one, with terms that never decrease from the
/// previous entry's and never exceed the leader's.
fn check_append(m: &Message) -> Result<(), Refusal> {
    if m.log_term > m.term {
        return invalid(format!(
            "append in term {} after an entry of term {}",
            m.term, m.log_term
        ));
    }
    if m.index > 0 && m.log_term == 0 {
        return invalid(format!("append after index {} of term 0", m.index));
    }
    let mut prev = (m.index, m.log_term);
    for e in m.get_entries() {
        let Some(next) = prev.0.checked_add(1) else {
            return invalid("append past the largest index".into());
        };
        if e.index != next {
            return invalid(format!(
                "append entries not contiguous: index {} after {}",
                e.index, prev.0
            ));
        }
        if e.term < prev.1 || e.term == 0 || e.term > m.term {
            return invalid(format!(
                "append entry {} of term {} after term {} in a leader's term {}",
                e.index, e.term, prev.1, m.term
            ));
        }
        prev = (e.index, e.term);
    }
    Ok(())
}

/// A configuration raft-rs can restore: no id twice in a set, learners apart from voters,
/// staged learners only among the outgoing voters, and joint-only fields only when joint.
fn check_conf_state(cs: &ConfState) -> Result<(), String> {
    fn set(name: &str, ids: &[u64]) -> Result<BTreeSet<u64>, String> {
        let s: BTreeSet<u64> = ids.iter().copied().collect();
        if s.len() != ids.len() || s.contains(&INVALID_ID) {
            return Err(format!("snapshot configuration repeats an id in {name}"));
        }
        Ok(s)
    }
    let voters = set("voters", cs.get_voters())?;
    let learners = set("learners", cs.get_learners())?;
    let outgoing = set("outgoing voters", cs.get_voters_outgoing())?;
    let next = set("staged learners", cs.get_learners_next())?;
    let bad = if !voters.is_disjoint(&learners) || !outgoing.is_disjoint(&learners) {
        "has a learner that is also a voter"
    } else if !next.is_subset(&outgoing) || !next.is_disjoint(&voters) {
        "stages a learner that is not only an outgoing voter"
    } else if outgoing.is_empty() && cs.auto_leave {
        "auto-leaves a configuration that is not joint"
    } else if !outgoing.is_empty() && voters.is_empty() {
        "is joint with no incoming voters"
    } else {
        return Ok(());
    };
    Err(format!("snapshot configuration {bad}: {cs:?}"))
}

/// What a follower answers, in raft-rs's stead, to a heartbeat it refused as
/// [`Refusal::CommitBeyondLog`]: append rejections that point the leader at the end of this
/// log, so it re-sends what is missing instead of believing the follower still has it.
///
/// raft-rs's leader never lowers a follower's `matched` and ignores a rejection at or below it
/// while replicating; it only re-probes on a rejection above `matched` (replicate state) or at
/// its `next - 1` (probe state). The heartbeat's commit is `min(matched, committed)`, so the
/// rejections at `commit + 1` (above `matched` once everything it matched is committed), at
/// `commit` and at this log's last index (a probe's `next - 1` before and after a partial
/// catch-up) cover those states; the leader ignores the others as stale. Each carries the
/// heartbeat's term (raft-rs drops answers of an older term) without this node adopting it.
pub(crate) fn lost_tail_answers<T: Storage>(raft: &Raft<T>, hb: &Message) -> Vec<Message> {
    let last = raft.raft_log.last_index();
    let last_term = raft.raft_log.term(last).unwrap_or(0);
    let mut at: Vec<u64> = vec![hb.commit.saturating_add(1), hb.commit, last];
    at.dedup();
    at.into_iter()
        .map(|index| {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppendResponse);
            m.from = raft.id;
            m.to = hb.from;
            m.term = hb.term;
            m.reject = true;
            m.index = index;
            m.reject_hint = last;
            m.log_term = last_term;
            m.commit = raft.raft_log.committed;
            m
        })
        .collect()
}

/// Whether `hb` comes from the leader this node would follow in its term (so answering it on
/// raft-rs's behalf helps, and tells nothing to a node that is not the leader).
pub(crate) fn from_followed_leader<T: Storage>(raft: &Raft<T>, hb: &Message) -> bool {
    hb.term >= raft.term
        && raft.state != StateRole::Leader
        && (raft.leader_id == INVALID_ID || raft.leader_id == hb.from || hb.term > raft.term)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs(voters: &[u64], learners: &[u64], outgoing: &[u64], next: &[u64]) -> ConfState {
        ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            voters_outgoing: outgoing.to_vec(),
            learners_next: next.to_vec(),
            ..Default::default()
        }
    }

    /// raft-rs's `restore` is fatal on a configuration its `Changer` refuses or that does not
    /// come back equal; those never reach it.
    #[test]
    fn only_restorable_snapshot_configurations_pass() {
        assert!(check_conf_state(&cs(&[1, 2, 3], &[4], &[], &[])).is_ok());
        assert!(check_conf_state(&cs(&[1, 2], &[], &[1, 2, 3], &[3])).is_ok());
        assert!(
            check_conf_state(&cs(&[1, 1, 2], &[], &[], &[])).is_err(),
            "repeated voter"
        );
        assert!(
            check_conf_state(&cs(&[1, 2], &[2], &[], &[])).is_err(),
            "voter and learner"
        );
        assert!(
            check_conf_state(&cs(&[1, 2], &[3], &[1, 3], &[])).is_err(),
            "outgoing learner"
        );
        assert!(
            check_conf_state(&cs(&[1, 2], &[], &[], &[3])).is_err(),
            "staged, not joint"
        );
        assert!(
            check_conf_state(&cs(&[], &[], &[1, 2], &[])).is_err(),
            "joint, no voters"
        );
        let mut auto = cs(&[1], &[], &[], &[]);
        auto.auto_leave = true;
        assert!(check_conf_state(&auto).is_err(), "auto-leave, not joint");
    }
}
