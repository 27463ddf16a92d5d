//! What an inbound engine RPC must satisfy before openraft sees it: the node it names as leader
//! or candidate is the authenticated sender, and its log ids are in the order a
//! protocol-following cluster produces.
//!
//! The transport authenticates the sending node (its certificate names its id); openraft
//! trusts the ids inside the request. Without these checks, any member could speak as another:
//! replicate as the leader (or make this node believe *it* was elected, with a committed vote
//! naming it), ask for votes in another's name, or hand leadership over. Beyond identity, some
//! decodable requests reach assertions inside openraft 0.10.0-alpha.37 that stop the node
//! (`RaftCore` panics, every later call fails with `Fatal::Panicked`):
//! - `FollowingHandler::install_full_snapshot` asserts (also in release builds) that the
//!   snapshot's last log id is not beyond the leader's vote and, when it is above the local
//!   commit, at a greater index;
//! - `Engine::following_handler` debug-asserts that the vote carried by an append is committed;
//!   `FollowingHandler::append_entries` / `do_append_entries` debug-assert that the entries start
//!   right after `prev_log_id` and go up one by one (in release builds a gap or a log id out of
//!   order silently corrupts the in-memory log id list);
//! - a `leader_commit` of a term beyond the vote would let `min(accepted, committed)` choose the
//!   accepted log id, committing entries the leader never said were committed.

use consensus_api::NodeId;
use openraft::raft::{AppendEntriesRequest, TransferLeaderRequest, VoteRequest};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, VoteOf};

use crate::types::C;

type LogId = LogIdOf<C>;

/// The term a log id was written in (`None`: before the first entry).
fn term_of(id: Option<&LogId>) -> u64 {
    id.map(|l| l.leader_id.term).unwrap_or(0)
}

fn show(id: Option<&LogId>) -> String {
    id.map(|l| format!("{}-{}", l.leader_id.term, l.index))
        .unwrap_or_else(|| "none".into())
}

/// The vote of a leader (`committed`) or candidate (not) that `from` sent, naming `from`.
fn check_vote_of(
    me: NodeId,
    from: NodeId,
    what: &str,
    vote: &VoteOf<C>,
    committed: bool,
) -> Result<(), String> {
    let named = vote.leader_id.voted_for;
    if from == me {
        return Err(format!("{what} from this node itself"));
    }
    if named != from {
        return Err(format!(
            "{what} from node {from} names node {named} as its {}",
            if committed { "leader" } else { "candidate" }
        ));
    }
    if vote.committed != committed {
        return Err(format!(
            "{what} from node {from} carries {} vote (term {})",
            if vote.committed {
                "an elected leader's"
            } else {
                "a candidate's"
            },
            vote.leader_id.term
        ));
    }
    Ok(())
}

/// An AppendEntries (call or stream) from `from` to `me`.
pub(crate) fn check_append(
    me: NodeId,
    from: NodeId,
    req: &AppendEntriesRequest<C>,
) -> Result<(), String> {
    check_vote_of(me, from, "AppendEntries", &req.vote, true)?;
    let term = req.vote.leader_id.term;
    let prev = req.prev_log_id.as_ref();
    if term_of(prev) > term {
        return Err(format!(
            "AppendEntries in term {term} after log id {}",
            show(prev)
        ));
    }
    // The index due next (`None`: past the largest index).
    let mut due = match prev {
        Some(p) => p.index.checked_add(1),
        None => Some(0),
    };
    let mut last_term = term_of(prev);
    for e in &req.entries {
        let id = &e.log_id;
        if due != Some(id.index) {
            return Err(format!(
                "AppendEntries entries not contiguous: index {} where {} was due (after {})",
                id.index,
                due.map(|d| d.to_string()).unwrap_or_else(|| "none".into()),
                show(prev)
            ));
        }
        if id.leader_id.term < last_term || id.leader_id.term > term {
            return Err(format!(
                "AppendEntries entry {} of term {} after term {last_term}, from a leader of term {term}",
                id.index, id.leader_id.term
            ));
        }
        last_term = id.leader_id.term;
        due = id.index.checked_add(1);
    }
    if term_of(req.leader_commit.as_ref()) > term {
        return Err(format!(
            "AppendEntries in term {term} commits log id {}",
            show(req.leader_commit.as_ref())
        ));
    }
    Ok(())
}

/// A Vote or PreVote request from `from` to `me`.
pub(crate) fn check_vote(me: NodeId, from: NodeId, req: &VoteRequest<C>) -> Result<(), String> {
    check_vote_of(me, from, "vote request", &req.vote, false)?;
    let term = req.vote.leader_id.term;
    if term_of(req.last_log_id.as_ref()) > term {
        return Err(format!(
            "vote request for term {term} claims a last log id {}",
            show(req.last_log_id.as_ref())
        ));
    }
    Ok(())
}

/// A TransferLeader request: only the leader it names may hand its leadership over.
pub(crate) fn check_transfer(
    me: NodeId,
    from: NodeId,
    req: &TransferLeaderRequest<C>,
) -> Result<(), String> {
    check_vote_of(me, from, "TransferLeader", req.from_leader(), true)
}

/// An install-snapshot call from `from`, given this node's `committed` log id (as its metrics
/// last showed it: it only grows, so a stale one lets through at most what openraft then
/// finds already covered).
pub(crate) fn check_snapshot(
    me: NodeId,
    from: NodeId,
    vote: &VoteOf<C>,
    meta: &SnapshotMetaOf<C>,
    committed: Option<&LogId>,
) -> Result<(), String> {
    check_vote_of(me, from, "snapshot", vote, true)?;
    let term = vote.leader_id.term;
    // A snapshot of nothing is below anything committed: openraft ignores it.
    let Some(last) = meta.last_log_id.as_ref() else {
        return Ok(());
    };
    if last.leader_id.term > term {
        return Err(format!(
            "snapshot up to {} from a leader of term {term}",
            show(Some(last))
        ));
    }
    if let Some(c) = committed {
        if last > c && last.index <= c.index {
            return Err(format!(
                "snapshot up to {} contradicts the committed log id {}",
                show(Some(last)),
                show(Some(c))
            ));
        }
    }
    Ok(())
}

/// See [`Backend::hostile_frames`](consensus_api::Backend::hostile_frames): engine RPCs from
/// `leader` to `to` that name another node, or whose log ids are out of order.
pub(crate) fn hostile_frames(
    leader: NodeId,
    to: NodeId,
    st: &consensus_api::Status,
) -> Vec<(&'static str, bytes::Bytes)> {
    use openraft::impls::{Entry, EntryPayload};
    use openraft::Vote;

    use super::wire::Rpc;

    let (term, last) = (st.term.max(1), st.last_log_index);
    let other = leader.wrapping_add(1_000);
    let blank = |term: u64, index: u64| Entry {
        log_id: openraft::LogId::new_term_index(term, index),
        payload: EntryPayload::Blank,
    };
    let append = |vote, prev, entries, leader_commit| {
        Rpc::Append(AppendEntriesRequest {
            vote,
            prev_log_id: prev,
            entries,
            leader_commit,
        })
    };
    let prev = Some(openraft::LogId::new_term_index(term, last));
    let frames = vec![
        (
            "an append naming another node as the leader",
            append(Vote::new_committed(term, other), None, Vec::new(), None),
        ),
        (
            "an append naming the receiver as the leader",
            append(Vote::new_committed(term, to), None, Vec::new(), None),
        ),
        (
            "an append with a gap between its entries",
            append(
                Vote::new_committed(term, leader),
                prev,
                vec![blank(term, last + 1), blank(term, last + 3)],
                None,
            ),
        ),
        (
            "an append whose entries are of a later term than its leader",
            append(
                Vote::new_committed(term, leader),
                prev,
                vec![blank(term + 1, last + 1)],
                None,
            ),
        ),
        (
            "a vote request for another candidate",
            Rpc::Vote(VoteRequest::new(
                Vote::new(term + 1, other),
                Some(openraft::LogId::new_term_index(term, last + 10)),
            )),
        ),
        (
            "a pre-vote request for another candidate",
            Rpc::PreVote(VoteRequest::new(
                Vote::new(term + 1, other),
                Some(openraft::LogId::new_term_index(term, last + 10)),
            )),
        ),
    ];
    let mut out: Vec<(&'static str, bytes::Bytes)> = frames
        .into_iter()
        .filter_map(|(what, rpc)| {
            consensus_api::codec::encode(&rpc)
                .ok()
                .map(|f| (what, bytes::Bytes::from(f)))
        })
        .collect();
    out.push((
        "an undecodable RPC",
        bytes::Bytes::from_static(b"\xff\xfe not an engine RPC"),
    ));
    out
}

/// See [`crate::fuzzing`]: `data` as an engine RPC and as a stream frame from node 2 to node 1,
/// decoded and checked; nothing may panic.
pub(crate) fn fuzz(data: &[u8]) {
    use super::wire::{decode_frame, Rpc, StreamFrame};
    let (me, from) = (1, 2);
    if let Ok(rpc) = consensus_api::codec::decode::<Rpc>(data) {
        let _ = match &rpc {
            Rpc::Append(r) => check_append(me, from, r),
            Rpc::Vote(r) | Rpc::PreVote(r) => check_vote(me, from, r),
            Rpc::TransferLeader(r) => check_transfer(me, from, r),
            Rpc::Snapshot { vote, meta, ticket } => {
                let _ = consensus_storage::transfer::Ticket::decode(ticket);
                check_snapshot(me, from, vote, meta, None)
            }
        };
    }
    if let Ok(StreamFrame::Open { req, .. } | StreamFrame::Append { req, .. }) = decode_frame(data)
    {
        let _ = check_append(me, from, &req);
    }
}

#[cfg(test)]
mod tests {
    use openraft::impls::{Entry, EntryPayload};
    use openraft::Vote;

    use super::*;

    fn id(term: u64, index: u64) -> LogId {
        LogId::new_term_index(term, index)
    }

    fn append(
        leader: NodeId,
        term: u64,
        prev: Option<LogId>,
        ids: &[(u64, u64)],
    ) -> AppendEntriesRequest<C> {
        AppendEntriesRequest {
            vote: Vote::new_committed(term, leader),
            prev_log_id: prev,
            entries: ids
                .iter()
                .map(|(t, i)| Entry {
                    log_id: id(*t, *i),
                    payload: EntryPayload::Blank,
                })
                .collect(),
            leader_commit: None,
        }
    }

    #[test]
    fn an_append_must_come_from_the_leader_it_names_with_entries_in_log_order() {
        assert!(check_append(1, 2, &append(2, 3, Some(id(2, 4)), &[(2, 5), (3, 6)])).is_ok());
        assert!(check_append(1, 2, &append(2, 3, None, &[(1, 0), (1, 1)])).is_ok());
        assert!(
            check_append(1, 2, &append(3, 3, None, &[])).is_err(),
            "names node 3"
        );
        assert!(
            check_append(1, 1, &append(1, 3, None, &[])).is_err(),
            "from itself"
        );
        let mut uncommitted = append(2, 3, None, &[]);
        uncommitted.vote = Vote::new(3, 2);
        assert!(
            check_append(1, 2, &uncommitted).is_err(),
            "a candidate's vote"
        );
        let gap = append(2, 3, Some(id(2, 4)), &[(2, 6)]);
        assert!(check_append(1, 2, &gap).is_err(), "entries not after prev");
        let hole = append(2, 3, Some(id(2, 4)), &[(2, 5), (2, 7)]);
        assert!(check_append(1, 2, &hole).is_err(), "a hole between entries");
        let down = append(2, 3, Some(id(2, 4)), &[(3, 5), (2, 6)]);
        assert!(check_append(1, 2, &down).is_err(), "terms going down");
        let ahead = append(2, 3, Some(id(2, 4)), &[(4, 5)]);
        assert!(
            check_append(1, 2, &ahead).is_err(),
            "a term past the leader's"
        );
        let mut commit = append(2, 3, None, &[]);
        commit.leader_commit = Some(id(9, 1));
        assert!(check_append(1, 2, &commit).is_err(), "commits a later term");
    }

    #[test]
    fn a_vote_request_must_come_from_the_candidate_it_names() {
        assert!(check_vote(1, 2, &VoteRequest::new(Vote::new(4, 2), Some(id(3, 9)))).is_ok());
        assert!(check_vote(1, 2, &VoteRequest::new(Vote::new(4, 3), None)).is_err());
        assert!(check_vote(1, 2, &VoteRequest::new(Vote::new(4, 1), None)).is_err());
        assert!(check_vote(1, 2, &VoteRequest::new(Vote::new_committed(4, 2), None)).is_err());
        assert!(check_vote(1, 2, &VoteRequest::new(Vote::new(4, 2), Some(id(5, 1)))).is_err());
        let req = TransferLeaderRequest::new(Vote::new_committed(4, 3), 1, None);
        assert!(
            check_transfer(1, 2, &req).is_err(),
            "node 2 hands over node 3's leadership"
        );
        let req = TransferLeaderRequest::new(Vote::new_committed(4, 2), 1, None);
        assert!(check_transfer(1, 2, &req).is_ok());
    }
}
