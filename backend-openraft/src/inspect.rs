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
    report.notes.extend(log.torn_note());
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
        let shown_from = last
            .saturating_sub((max_entries as u64).saturating_sub(1))
            .max(first);
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

/// See [`consensus_api::Backend::force_voters`]: appends a membership entry with `voters` (the
/// current learners stay learners; the addresses are the stored ones) in a term above every
/// stored one, votes for this node in that term and records the entry as committed. openraft
/// uses a membership as soon as it is in the log, so a restart runs with the new voters.
pub(crate) fn force_voters(
    dir: &Path,
    me: NodeId,
    voters: &BTreeSet<NodeId>,
) -> Result<String, ConsensusError> {
    use openraft::entry::RaftEntry as _;
    // Takes the data dir's lock: a running node's dir is refused ("in use").
    let log = consensus_storage::Log::open(dir).map_err(storage)?;
    // The last membership: of the last membership entry in the log, else of the snapshot.
    let mut last_membership: Option<openraft::Membership<NodeId, openraft::BasicNode>> = None;
    if let Some(file) = SnapshotStore::peek_file(dir).map_err(storage)? {
        let meta: SnapshotMetaOf<C> = codec::decode(file.meta()).map_err(storage)?;
        last_membership = Some(meta.last_membership.membership().clone());
    }
    let st = log.state();
    let (mut last, mut last_term) = st.purged.map_or((0, 0), |p| (p.0, p.1));
    if let Some(l) = st.last_index {
        last = l;
        last_term = log.term(l).unwrap_or(0);
        let first = st.first_index.unwrap_or(l);
        for stored in log.entries(first, l + 1, None) {
            let e: EntryOf<C> = codec::decode(&stored.data).map_err(storage)?;
            if let EntryPayload::Membership(m) = e.payload {
                last_membership = Some(m);
            }
        }
    }
    let Some(current) = last_membership else {
        return Err(ConsensusError::InvalidRequest(
            "this data dir holds no membership: nothing to recover".into(),
        ));
    };
    let nodes: std::collections::BTreeMap<NodeId, openraft::BasicNode> =
        current.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let members: BTreeSet<NodeId> = nodes.keys().copied().collect();
    consensus_api::check_forced_voters(me, voters, &members)?;
    let old_voters: BTreeSet<NodeId> = current.voter_ids().collect();
    let learners: BTreeSet<NodeId> = current.learner_ids().collect();
    let kept: std::collections::BTreeMap<NodeId, openraft::BasicNode> = nodes
        .into_iter()
        .filter(|(id, _)| voters.contains(id) || learners.contains(id))
        .collect();
    let membership = openraft::Membership::new(vec![voters.clone()], kept).map_err(storage)?;
    let vote: Option<VoteOf<C>> = match log.meta(META_VOTE) {
        Some(b) => Some(codec::decode(&b).map_err(storage)?),
        None => None,
    };
    let term = vote.map_or(0, |v| v.leader_id.term).max(last_term) + 1;
    let log_id: LogIdOf<C> = openraft::LogId::new_term_index(term, last + 1);
    let entry = EntryOf::<C>::new_membership(log_id, membership);
    let sync = |r: consensus_storage::Result<()>| r.map_err(storage);
    sync(log.append(
        vec![consensus_storage::Entry {
            index: last + 1,
            term,
            data: codec::encode(&entry).map_err(storage)?.into(),
        }],
        None,
    ))?;
    let vote: VoteOf<C> = openraft::Vote::new(term, me);
    sync(log.set_meta(
        META_VOTE,
        codec::encode(&vote).map_err(storage)?.into(),
        None,
    ))?;
    let committed: Option<LogIdOf<C>> = Some(log_id);
    sync(log.set_meta(
        META_COMMITTED,
        codec::encode(&committed).map_err(storage)?.into(),
        None,
    ))?;
    sync(log.sync())?;
    log.close();
    Ok(format!(
        "forced voters {voters:?} (were {old_voters:?}): a membership entry at index {} in term \
         {term}; the log through it now counts as committed",
        last + 1
    ))
}

/// See [`consensus_api::Backend::seed`]: a snapshot file at log id (term 1, `index`) with the
/// image and a membership of `members` as voters (the same on every member), the log purged up
/// to that id and it recorded as committed, so openraft starts from the snapshot as after a
/// compaction.
pub(crate) fn seed(
    dir: &Path,
    members: &std::collections::BTreeMap<NodeId, String>,
    index: u64,
    image: &mut dyn std::io::Read,
) -> Result<String, ConsensusError> {
    // Takes the data dir's lock.
    let log = consensus_storage::Log::open(dir).map_err(storage)?;
    let store = crate::log_store::LogStore::new(log.clone(), u64::MAX);
    let snapshots = log.snapshot_store().map_err(storage)?;
    if !store.is_fresh() || snapshots.current().map_err(storage)?.is_some() {
        log.close();
        return Err(ConsensusError::InvalidRequest(format!(
            "{} already holds a node's state: a restore writes only a new data dir",
            dir.display()
        )));
    }
    let index = index.max(1);
    let log_id: LogIdOf<C> = openraft::LogId::new_term_index(1, index);
    let nodes: std::collections::BTreeMap<NodeId, openraft::BasicNode> = members
        .iter()
        .map(|(id, addr)| (*id, openraft::BasicNode::new(addr)))
        .collect();
    let voters: BTreeSet<NodeId> = nodes.keys().copied().collect();
    let membership = openraft::Membership::new(vec![voters], nodes).map_err(storage)?;
    let meta: SnapshotMetaOf<C> = openraft::SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: openraft::StoredMembership::new(Some(log_id), membership),
    };
    let written = (|| {
        let mut sink = snapshots
            .create(&codec::encode(&meta).map_err(storage)?)
            .map_err(storage)?;
        std::io::copy(image, &mut sink)
            .map_err(|e| storage(format!("reading the backup's image: {e}")))?;
        let file = sink.seal().map_err(storage)?;
        snapshots.install(&file).map_err(storage)?;
        let note = bytes::Bytes::from(codec::encode(&log_id).map_err(storage)?);
        log.purge(index, 1, note, None).map_err(storage)?;
        let committed: Option<LogIdOf<C>> = Some(log_id);
        log.set_meta(
            META_COMMITTED,
            codec::encode(&committed).map_err(storage)?.into(),
            None,
        )
        .map_err(storage)?;
        log.sync().map_err(storage)?;
        Ok::<_, ConsensusError>(file.data_len())
    })();
    log.close();
    let bytes = written?;
    Ok(format!(
        "a snapshot at index {index} (term 1) of {bytes} bytes with voters {:?}, committed",
        members.keys().collect::<Vec<_>>()
    ))
}
