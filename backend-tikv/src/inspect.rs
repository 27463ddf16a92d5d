//! [`Backend::inspect`](consensus_api::Backend::inspect) for raft-rs data dirs: the hard state
//! record, the conf state of the snapshot with the conf changes after it replayed, and the
//! entries' protobuf encodings, read without a lock and without changing anything.

use std::collections::BTreeSet;
use std::path::Path;

use consensus_api::{ConsensusError, DataDirReport, EntryReport, NodeId, SnapshotReport};
use consensus_storage::{LogView, SnapshotStore};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    HardState, SnapshotMetadata,
};

use crate::storage::META_HARD_STATE;

fn storage(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Storage(e.to_string())
}

/// Applies one change to a voters/learners view.
fn apply(voters: &mut BTreeSet<NodeId>, learners: &mut BTreeSet<NodeId>, c: &ConfChangeSingle) {
    let id = c.node_id;
    match c.get_change_type() {
        ConfChangeType::AddNode => {
            learners.remove(&id);
            voters.insert(id);
        }
        ConfChangeType::AddLearnerNode => {
            voters.remove(&id);
            learners.insert(id);
        }
        ConfChangeType::RemoveNode => {
            voters.remove(&id);
            learners.remove(&id);
        }
    }
}

fn describe(changes: &[ConfChangeSingle]) -> String {
    if changes.is_empty() {
        return "leave the joint configuration".into();
    }
    changes
        .iter()
        .map(|c| {
            let what = match c.get_change_type() {
                ConfChangeType::AddNode => "voter",
                ConfChangeType::AddLearnerNode => "learner",
                ConfChangeType::RemoveNode => "remove",
            };
            format!("{what} {}", c.node_id)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The membership changes an entry carries, if it is a conf change.
fn conf_changes(e: &Entry) -> Option<Result<Vec<ConfChangeSingle>, String>> {
    match e.get_entry_type() {
        EntryType::EntryConfChangeV2 => Some(
            ConfChangeV2::parse_from_carllerche_bytes(&e.data)
                .map(|cc| cc.changes.to_vec())
                .map_err(|err| err.to_string()),
        ),
        EntryType::EntryConfChange => Some(
            ConfChange::parse_from_carllerche_bytes(&e.data)
                .map(|cc| {
                    let mut s = ConfChangeSingle {
                        node_id: cc.node_id,
                        ..Default::default()
                    };
                    s.set_change_type(cc.get_change_type());
                    vec![s]
                })
                .map_err(|err| err.to_string()),
        ),
        EntryType::EntryNormal => None,
    }
}

pub(crate) fn inspect(dir: &Path, max_entries: usize) -> Result<DataDirReport, ConsensusError> {
    let mut report = DataDirReport {
        backend: "tikv".into(),
        ..Default::default()
    };
    let mut conf = ConfState::default();
    if let Some(file) = SnapshotStore::peek_file(dir).map_err(storage)? {
        let meta = SnapshotMetadata::parse_from_bytes(file.meta()).map_err(storage)?;
        conf = meta.get_conf_state().clone();
        report.snapshot = Some(SnapshotReport {
            index: meta.index,
            term: meta.term,
            data_bytes: file.data_len(),
            voters: conf
                .voters
                .iter()
                .chain(&conf.voters_outgoing)
                .copied()
                .collect(),
            learners: conf
                .learners
                .iter()
                .chain(&conf.learners_next)
                .copied()
                .collect(),
        });
    }
    let mut voters: BTreeSet<NodeId> = conf.voters.iter().copied().collect();
    let mut learners: BTreeSet<NodeId> = conf.learners.iter().copied().collect();
    let Some(log) = LogView::read(dir).map_err(storage)? else {
        report.notes.push("no log file".into());
        report.voters = voters;
        report.learners = learners;
        return Ok(report);
    };
    report.notes.extend(log.torn_note());
    if let Some(b) = log.meta(META_HARD_STATE) {
        let hs = HardState::parse_from_bytes(&b).map_err(storage)?;
        report.term = hs.term;
        report.vote = (hs.vote != 0).then_some(hs.vote);
        report.commit_index = hs.commit;
    }
    report.purged = log.purged();
    report.log_bounds = log.bounds();
    let snapshot_index = report.snapshot.as_ref().map_or(0, |s| s.index);
    if let Some((first, last)) = report.log_bounds {
        let shown_from = last
            .saturating_sub((max_entries as u64).saturating_sub(1))
            .max(first);
        for stored in log.entries(first, last + 1) {
            let e = match Entry::parse_from_carllerche_bytes(&stored.data) {
                Ok(e) => e,
                Err(err) => {
                    report
                        .notes
                        .push(format!("entry {}: undecodable: {err}", stored.index));
                    continue;
                }
            };
            let changes = conf_changes(&e);
            // The membership as of the commit index: conf changes apply once committed.
            if let Some(Ok(c)) = &changes {
                if e.index > snapshot_index && e.index <= report.commit_index {
                    for single in c {
                        apply(&mut voters, &mut learners, single);
                    }
                }
            }
            if stored.index < shown_from || max_entries == 0 {
                continue;
            }
            let (kind, detail) = match &changes {
                Some(Ok(c)) => ("membership", Some(describe(c))),
                Some(Err(err)) => ("membership", Some(format!("undecodable: {err}"))),
                None if e.data.is_empty() => ("blank", None),
                None => ("command", None),
            };
            report.entries.push(EntryReport {
                index: e.index,
                term: e.term,
                kind: kind.into(),
                bytes: e.data.len(),
                detail,
            });
        }
    }
    report.voters = voters;
    report.learners = learners;
    Ok(report)
}

/// The membership as of the end of the log: the snapshot's conf state with every conf change
/// after it applied (a forced recovery commits the whole log).
fn membership_at_log_end(
    dir: &Path,
) -> Result<(BTreeSet<NodeId>, BTreeSet<NodeId>), ConsensusError> {
    let mut voters = BTreeSet::new();
    let mut learners = BTreeSet::new();
    let mut snapshot_index = 0;
    if let Some(file) = SnapshotStore::peek_file(dir).map_err(storage)? {
        let meta = SnapshotMetadata::parse_from_bytes(file.meta()).map_err(storage)?;
        let cs = meta.get_conf_state();
        voters = cs
            .voters
            .iter()
            .chain(&cs.voters_outgoing)
            .copied()
            .collect();
        learners = cs
            .learners
            .iter()
            .chain(&cs.learners_next)
            .copied()
            .collect();
        snapshot_index = meta.index;
    }
    if let Some(log) = LogView::read(dir).map_err(storage)? {
        if let Some((first, last)) = log.bounds() {
            for stored in log.entries(first.max(snapshot_index + 1), last + 1) {
                let e = Entry::parse_from_carllerche_bytes(&stored.data).map_err(storage)?;
                if let Some(changes) = conf_changes(&e) {
                    for c in changes.map_err(storage)? {
                        apply(&mut voters, &mut learners, &c);
                    }
                }
            }
        }
    }
    Ok((voters, learners))
}

/// See [`consensus_api::Backend::force_voters`]: appends one single-node conf change per voter
/// to remove or learner to promote, in a term above every stored one, and a hard state that
/// votes for this node and commits the whole log. raft-rs applies the changes on restart (a
/// simple change each, no joint configuration that the lost nodes would have to leave).
pub(crate) fn force_voters(
    dir: &Path,
    me: NodeId,
    voters: &BTreeSet<NodeId>,
) -> Result<String, ConsensusError> {
    use raft::Storage as _;
    // Takes the data dir's lock: a running node's dir is refused ("in use").
    let mut st = crate::storage::DiskStorage::open_for(Some(me), dir).map_err(storage)?;
    let (current, learners) = membership_at_log_end(dir)?;
    let members: BTreeSet<NodeId> = current.union(&learners).copied().collect();
    consensus_api::check_forced_voters(me, voters, &members)?;
    let last = st.last_index().map_err(storage)?;
    let last_term = st.term(last).map_err(storage)?;
    let mut hs = st.hard_state().clone();
    let term = hs.term.max(last_term) + 1;
    let mut changes = Vec::new();
    for id in current.difference(voters) {
        changes.push((*id, ConfChangeType::RemoveNode));
    }
    for id in voters.difference(&current) {
        changes.push((*id, ConfChangeType::AddNode));
    }
    let mut entries = Vec::new();
    for (i, (id, ty)) in changes.iter().enumerate() {
        let mut cc = ConfChange {
            node_id: *id,
            ..Default::default()
        };
        cc.set_change_type(*ty);
        let mut e = Entry {
            index: last + 1 + i as u64,
            term,
            data: cc.write_to_bytes().map_err(storage)?.into(),
            ..Default::default()
        };
        e.set_entry_type(EntryType::EntryConfChange);
        entries.push(e);
    }
    st.append(&entries).map_err(storage)?;
    hs.term = term;
    hs.vote = me;
    hs.commit = last + entries.len() as u64;
    st.set_hard_state(&hs).map_err(storage)?;
    st.log().sync().map_err(storage)?;
    Ok(format!(
        "forced voters {voters:?} (were {current:?}): {} conf change(s) at {}..={} in term {term}; \
         the log through index {} now counts as committed",
        entries.len(),
        last + 1,
        last + entries.len() as u64,
        hs.commit
    ))
}

/// See [`consensus_api::Backend::seed`]: a snapshot at `index` with the image and the members'
/// addresses, its conf state naming them voters, and a hard state committing it: what an
/// initial member writes when it bootstraps, at the backup's index.
pub(crate) fn seed(
    dir: &Path,
    me: NodeId,
    members: &std::collections::BTreeMap<NodeId, String>,
    index: u64,
    image: &mut dyn std::io::Read,
) -> Result<String, ConsensusError> {
    let mut st = crate::storage::DiskStorage::open_for(Some(me), dir).map_err(storage)?;
    if !st.is_fresh() {
        return Err(ConsensusError::InvalidRequest(format!(
            "{} already holds a node's state: a restore writes only a new data dir",
            dir.display()
        )));
    }
    let index = index.max(1);
    st.seed(members, index, image).map_err(storage)?;
    let bytes = st.snapshot_file().map_or(0, |f| f.data_len());
    st.log().close();
    Ok(format!(
        "a snapshot at index {index} (term 1) of {bytes} bytes with voters {:?}, committed",
        members.keys().collect::<Vec<_>>()
    ))
}
