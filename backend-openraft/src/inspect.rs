//! [`Backend::inspect`](consensus_api::Backend::inspect) for openraft data dirs: the vote and
//! committed log id records, the entries (openraft's own `Entry`, encoded with the shared
//! codec) and the snapshot's metadata, read without a lock and without changing anything.

use std::collections::BTreeSet;
use std::path::Path;

use consensus_api::{codec, ConsensusError, DataDirReport, EntryReport, NodeId, SnapshotReport};
use consensus_storage::{LogView, SnapshotStore};
use openraft::type_config::alias::{EntryOf, LogIdOf, SnapshotMetaOf, VoteOf};
use openraft::EntryPayload;

use crate::log_store::{META_COMMITTED, META_VOTE};
use crate::types::C;

fn storage(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Storage(e.to_string())
}

fn members<'a>(
    voters: impl Iterator<Item = NodeId>,
    learners: impl Iterator<Item = NodeId> + 'a,
) -> (BTreeSet<NodeId>, BTreeSet<NodeId>) {
    (voters.collect(), learners.collect())
}

pub(crate) fn inspect(dir: &Path, max_entries: usize) -> Result<DataDirReport, ConsensusError> {
    let mut report = DataDirReport {
        backend: "openraft".into(),
        ..Default::default()
    };
    if let Some(file) = SnapshotStore::peek_file(dir).map_err(storage)? {
        let meta: SnapshotMetaOf<C> = codec::decode(file.meta()).map_err(storage)?;
        let m = meta.last_membership.membership();
        let (voters, learners) = members(m.voter_ids(), m.learner_ids());
        report.voters = voters.clone();
        report.learners = learners.clone();
        report.snapshot = Some(SnapshotReport {
            index: meta.last_log_id.map_or(0, |l| l.index),
            term: meta.last_log_id.map_or(0, |l| l.leader_id.term),
            data_bytes: file.data_len(),
            voters,
            learners,
        });
    }
    let Some(log) = LogView::read(dir).map_err(storage)? else {
        report.notes.push("no log file".into());
        return Ok(report);
    };
    if let Some(reason) = &log.torn {
        report.notes.push(format!(
            "torn tail: {} bytes after offset {} ({reason}); a start truncates it",
            log.file_bytes - log.valid_bytes,
            log.valid_bytes
        ));
    }
    if let Some(b) = log.meta(META_VOTE) {
        let vote: VoteOf<C> = codec::decode(&b).map_err(storage)?;
        report.term = vote.leader_id.term;
        report.vote = Some(vote.leader_id.voted_for);
    }
    if let Some(b) = log.meta(META_COMMITTED) {
        let committed: Option<LogIdOf<C>> = codec::decode(&b).map_err(storage)?;
        report.commit_index = committed.map_or(0, |l| l.index);
    }
    report.purged = log.purged();
    report.log_bounds = log.bounds();
    if let Some((first, last)) = report.log_bounds {
        let shown_from = last.saturating_sub(max_entries as u64 - 1).max(first);
        for stored in log.entries(first, last + 1) {
            let e: EntryOf<C> = match codec::decode(&stored.data) {
                Ok(e) => e,
                Err(err) => {
                    report
                        .notes
                        .push(format!("entry {}: undecodable: {err}", stored.index));
                    continue;
                }
            };
            // openraft uses a membership as soon as it is in the log.
            let (kind, bytes, detail) = match &e.payload {
                EntryPayload::Blank => ("blank", 0, None),
                EntryPayload::Normal(r) => ("command", r.0.len(), None),
                EntryPayload::Membership(m) => {
                    let (voters, learners) = members(m.voter_ids(), m.learner_ids());
                    let detail = format!("voters {voters:?}, learners {learners:?}");
                    report.voters = voters;
                    report.learners = learners;
                    ("membership", stored.data.len(), Some(detail))
                }
            };
            if stored.index < shown_from || max_entries == 0 {
                continue;
            }
            report.entries.push(EntryReport {
                index: e.log_id.index,
                term: e.log_id.leader_id.term,
                kind: kind.into(),
                bytes,
                detail,
            });
        }
    }
    Ok(report)
}
