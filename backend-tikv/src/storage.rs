//! raft-rs [`Storage`] over the shared durable log ([`consensus_storage::Log`]) and snapshot
//! file ([`SnapshotStore`]).
//!
//! - Entries are stored as their protobuf encoding, one CRC-checked log record each.
//! - The hard state is a metadata record; the conf state lives in the snapshot's metadata, the
//!   way etcd's storage keeps it: conf changes after the snapshot are replayed from the log.
//! - Every write is queued to the log's writer thread; [`DiskStorage::durable`] reports when
//!   all of them reached the disk (one `fdatasync` for the batch).
//! - Opening reconciles a crash between writing a snapshot and compacting the log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use consensus_api::{codec, ConsensusError, NodeId, SnapshotView};
use consensus_storage::{Log, SnapshotFile, SnapshotStore, StorageError as DiskError};
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, Storage, StorageError};

/// Metadata key of the hard state.
pub(crate) const META_HARD_STATE: u8 = 1;

/// Index and term of the snapshot every initial member writes when it bootstraps a cluster.
/// Starting above zero means a node that joins later never replays the log from index 1 (it
/// would miss the initial voters, which are not a log entry): it installs a snapshot instead.
pub(crate) const BOOTSTRAP_INDEX: u64 = 1;
const BOOTSTRAP_TERM: u64 = 1;

/// What a snapshot's data holds besides the user's state: the members' addresses, so a node
/// restored from it can reach everyone without replaying the conf changes that named them.
///
/// Layout: `u32` big-endian length of the codec-encoded address map, the map, then the state
/// machine's bytes as they are (serde would encode a byte vector element by element).
pub(crate) struct SnapshotData;

impl SnapshotData {
    /// Encodes the addresses and the state into one buffer (one copy of the state).
    pub(crate) fn encode(
        addresses: &BTreeMap<NodeId, String>,
        state: &[u8],
    ) -> Result<Vec<u8>, ConsensusError> {
        let book = codec::encode(addresses)?;
        let len = u32::try_from(book.len())
            .map_err(|_| ConsensusError::Internal("address book too large".into()))?;
        let mut out = Vec::with_capacity(4 + book.len() + state.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&book);
        out.extend_from_slice(state);
        Ok(out)
    }

    /// Writes the addresses ahead of the state (which the caller streams after them).
    pub(crate) fn write_book(
        sink: &mut dyn Write,
        addresses: &BTreeMap<NodeId, String>,
    ) -> Result<(), ConsensusError> {
        let book = codec::encode(addresses)?;
        let len = u32::try_from(book.len())
            .map_err(|_| ConsensusError::Internal("address book too large".into()))?;
        let io = |e: std::io::Error| ConsensusError::Storage(format!("writing a snapshot: {e}"));
        sink.write_all(&len.to_be_bytes()).map_err(io)?;
        sink.write_all(&book).map_err(io)
    }

    /// Reads the addresses from the start of snapshot data; `source` is then at the state.
    pub(crate) fn read_book(
        source: &mut dyn Read,
    ) -> Result<BTreeMap<NodeId, String>, ConsensusError> {
        let bad = |e: std::io::Error| {
            ConsensusError::Storage(format!("snapshot data is truncated or unreadable: {e}"))
        };
        let mut len = [0u8; 4];
        source.read_exact(&mut len).map_err(bad)?;
        let len = u32::from_be_bytes(len) as u64;
        if len > MAX_BOOK_BYTES {
            return Err(ConsensusError::Storage(format!(
                "snapshot address book of {len} bytes is implausible; the snapshot is damaged"
            )));
        }
        let mut book = Vec::with_capacity(len as usize);
        source.take(len).read_to_end(&mut book).map_err(bad)?;
        if book.len() as u64 != len {
            return Err(ConsensusError::Storage("snapshot data is truncated".into()));
        }
        Ok(codec::decode(&book)?)
    }
}

/// Largest address book a snapshot may carry.
const MAX_BOOK_BYTES: u64 = 64 << 20;

/// Errors of the storage layer, as raft-rs wants them.
fn other(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

fn disk(e: DiskError) -> raft::Error {
    other(e)
}

/// Writes snapshot files from any thread, never replacing a newer snapshot with an older one
/// (a snapshot taken here may still be saving when a newer one arrives from the leader). It
/// holds the log, and so the data-dir lock: a save in flight keeps the directory owned.
#[derive(Clone)]
pub(crate) struct SnapshotWriter {
    store: SnapshotStore,
    newest: Arc<Mutex<u64>>,
    _log: Log,
}

impl SnapshotWriter {
    /// Saves a small in-memory `snap` durably unless a newer snapshot was saved already (the
    /// bootstrap snapshot); whether it was written.
    fn save(&self, snap: &Snapshot) -> raft::Result<bool> {
        let mut newest = self.newest.lock();
        let index = snap.get_metadata().index;
        if index < *newest {
            return Ok(false);
        }
        let meta = snap.get_metadata().write_to_bytes().map_err(other)?;
        self.store.save(&meta, &snap.data).map_err(disk)?;
        *newest = index;
        Ok(true)
    }

    /// Streams a snapshot file from `view` (blocking: run it off the driver): the metadata, the
    /// address book, then the state. Returns the installed file, or `None` when a newer
    /// snapshot was installed meanwhile (the built one is then dropped).
    pub(crate) fn build(
        &self,
        meta: &SnapshotMetadata,
        addresses: &BTreeMap<NodeId, String>,
        view: Box<dyn SnapshotView>,
    ) -> Result<Option<SnapshotFile>, String> {
        let meta_bytes = meta.write_to_bytes().map_err(|e| e.to_string())?;
        let mut sink = self.store.create(&meta_bytes).map_err(|e| e.to_string())?;
        SnapshotData::write_book(&mut sink, addresses).map_err(|e| e.to_string())?;
        view.write_to(&mut sink)
            .map_err(|e| format!("state machine snapshot failed: {e}"))?;
        let file = sink.seal().map_err(|e| e.to_string())?;
        let kept = self.keep(meta.index, &file).map_err(|e| e.to_string())?;
        Ok(kept.then_some(file))
    }

    /// Installs `file` (the snapshot at `index`) unless a newer one is installed; whether it was.
    fn keep(&self, index: u64, file: &SnapshotFile) -> raft::Result<bool> {
        let mut newest = self.newest.lock();
        if index < *newest {
            return Ok(false);
        }
        self.store.install(file).map_err(disk)?;
        *newest = index;
        Ok(true)
    }
}

/// Durable raft-rs storage.
pub(crate) struct DiskStorage {
    log: Log,
    writer: SnapshotWriter,
    hard_state: HardState,
    /// The latest snapshot's metadata (its data stays on disk, in `file`); default (index 0)
    /// when there is none.
    snapshot: Snapshot,
    /// The latest snapshot's file.
    file: Option<SnapshotFile>,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve (too old, or taken
    /// before the receiving node joined): the core captures one to stream
    /// ([`DiskStorage::set_streamable`]) and raft-rs asks again.
    wanted: AtomicBool,
    /// A snapshot captured for a peer the stored one cannot serve, streamed to it from memory
    /// (no file written here): raft-rs is given its metadata, the driver takes it to send.
    streamable: Mutex<Option<Streamable>>,
}

/// A snapshot to stream to a peer from a point-in-time view of the state
/// ([`DiskStorage::set_streamable`]).
pub(crate) struct Streamable {
    /// Metadata only (index, term, configuration).
    pub(crate) snapshot: Snapshot,
    /// The address book at the capture.
    pub(crate) book: BTreeMap<NodeId, String>,
    /// The state at the capture.
    pub(crate) view: Box<dyn SnapshotView>,
}

impl Streamable {
    /// Writes the snapshot's data (the address book, then the state), as a file would hold it.
    pub(crate) fn write(self, sink: &mut dyn Write) -> Result<(), String> {
        SnapshotData::write_book(sink, &self.book).map_err(|e| e.to_string())?;
        self.view.write_to(sink)
    }
}

impl DiskStorage {
    /// Opens the storage in `dir`, checking every record and repairing a snapshot that is ahead
    /// of the log (a crash between saving the snapshot and compacting the log).
    #[cfg(test)]
    pub(crate) fn open(dir: &Path) -> raft::Result<Self> {
        Self::open_for(None, dir)
    }

    /// [`open`](Self::open), with the store's metrics labelled with node `id`.
    pub(crate) fn open_for(id: Option<consensus_api::NodeId>, dir: &Path) -> raft::Result<Self> {
        let options = consensus_storage::LogOptions {
            metrics_node: id,
            ..Default::default()
        };
        let log = Log::open_with(dir, options).map_err(disk)?;
        let snapshots = log.snapshot_store().map_err(disk)?;
        let hard_state = match log.meta(META_HARD_STATE) {
            Some(b) => HardState::parse_from_bytes(&b).map_err(other)?,
            None => HardState::default(),
        };
        let file = snapshots.current().map_err(disk)?;
        let mut snapshot = Snapshot::default();
        if let Some(f) = &file {
            snapshot.set_metadata(SnapshotMetadata::parse_from_bytes(f.meta()).map_err(other)?);
        }
        let writer = SnapshotWriter {
            store: snapshots,
            newest: Arc::new(Mutex::new(snapshot.get_metadata().index)),
            _log: log.clone(),
        };
        let mut me = Self {
            log,
            writer,
            hard_state,
            snapshot,
            file,
            wanted: AtomicBool::new(false),
            streamable: Mutex::new(None),
        };
        me.reconcile()?;
        Ok(me)
    }

    fn reconcile(&mut self) -> raft::Result<()> {
        let (index, term) = self.snapshot_position();
        if index == 0 {
            return Ok(());
        }
        let purged = self.log.state().purged.map(|p| p.0).unwrap_or(0);
        if purged < index {
            tracing::warn!(
                index,
                purged,
                "snapshot is ahead of the log (crash during compaction); compacting now"
            );
            self.discard_log_through(index, term)?;
        }
        if self.hard_state.commit < index || self.hard_state.term < term {
            let mut hs = self.hard_state.clone();
            hs.commit = hs.commit.max(index);
            hs.term = hs.term.max(term);
            self.set_hard_state(&hs)?;
        }
        self.log.sync().map_err(disk)
    }

    /// Drops the log up to `index`, keeping later entries only if they extend the snapshot.
    fn discard_log_through(&mut self, index: u64, term: u64) -> raft::Result<()> {
        if self.log.term(index) != Some(term) {
            self.log.truncate(index + 1, None).map_err(disk)?;
        }
        self.log
            .purge(index, term, Bytes::new(), None)
            .map_err(disk)
    }

    /// No log, no vote, no snapshot: this data dir never belonged to a cluster.
    pub(crate) fn is_fresh(&self) -> bool {
        let st = self.log.state();
        self.hard_state == HardState::default()
            && st.last_index.is_none()
            && st.purged.is_none()
            && self.snapshot_position().0 == 0
    }

    /// Writes the initial configuration of a brand-new cluster as a snapshot at
    /// [`BOOTSTRAP_INDEX`], durably. Only for a fresh data dir.
    pub(crate) fn bootstrap(&mut self, voters: Vec<NodeId>, data: Vec<u8>) -> raft::Result<()> {
        let cs = ConfState {
            voters,
            ..Default::default()
        };
        let mut snap = Snapshot::default();
        snap.mut_metadata().set_conf_state(cs);
        snap.mut_metadata().index = BOOTSTRAP_INDEX;
        snap.mut_metadata().term = BOOTSTRAP_TERM;
        snap.data = data.into();
        self.apply_snapshot(snap)?;
        let hs = HardState {
            term: BOOTSTRAP_TERM,
            commit: BOOTSTRAP_INDEX,
            ..Default::default()
        };
        self.set_hard_state(&hs)?;
        self.log.sync().map_err(disk)
    }

    /// Writes the state of a cluster restored from a backup: a snapshot file at `index` (in
    /// [`BOOTSTRAP_TERM`], the same on every member) whose data is `addresses` and the image
    /// streamed from `image`, with `addresses`' ids as its voters, and a hard state committing
    /// it, durably. Only for a fresh data dir.
    pub(crate) fn seed(
        &mut self,
        addresses: &BTreeMap<NodeId, String>,
        index: u64,
        image: &mut dyn Read,
    ) -> raft::Result<()> {
        let mut meta = SnapshotMetadata::default();
        meta.set_conf_state(ConfState {
            voters: addresses.keys().copied().collect(),
            ..Default::default()
        });
        meta.index = index;
        meta.term = BOOTSTRAP_TERM;
        let meta_bytes = meta.write_to_bytes().map_err(other)?;
        let mut sink = self.writer.store.create(&meta_bytes).map_err(disk)?;
        SnapshotData::write_book(&mut sink, addresses).map_err(other)?;
        std::io::copy(image, &mut sink)
            .map_err(|e| other(format!("reading the backup's image: {e}")))?;
        let file = sink.seal().map_err(disk)?;
        if !self.writer.keep(index, &file)? {
            return Err(other("a snapshot appeared in the data dir being restored"));
        }
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        self.record(snap, Some(file))?;
        let hs = HardState {
            term: BOOTSTRAP_TERM,
            commit: index,
            ..Default::default()
        };
        self.set_hard_state(&hs)?;
        self.log.sync().map_err(disk)
    }

    /// Index and term of the latest snapshot (0, 0 when there is none).
    pub(crate) fn snapshot_position(&self) -> (u64, u64) {
        let m = self.snapshot.get_metadata();
        (m.index, m.term)
    }

    /// The latest snapshot's file (`None` before the first).
    pub(crate) fn snapshot_file(&self) -> Option<&SnapshotFile> {
        self.file.as_ref()
    }

    /// Copies another store's snapshot file into this data dir, not yet installed (what a
    /// transfer would have produced; for tests that move messages by hand).
    #[cfg(test)]
    pub(crate) fn import(&self, file: &SnapshotFile) -> raft::Result<SnapshotFile> {
        self.writer.store.import(file).map_err(disk)
    }

    /// The snapshot store of the data dir.
    pub(crate) fn snapshot_store(&self) -> SnapshotStore {
        self.writer.store.clone()
    }

    /// The index of the last entry removed by compaction (0 if none).
    pub(crate) fn purged_index(&self) -> u64 {
        self.log.state().purged.map(|p| p.0).unwrap_or(0)
    }

    /// Appends entries from a `Ready`, replacing any conflicting suffix.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> raft::Result<()> {
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            out.push(consensus_storage::Entry {
                index: e.index,
                term: e.term,
                data: Bytes::from(e.write_to_bytes().map_err(other)?),
            });
        }
        self.log.append(out, None).map_err(disk)
    }

    /// The stored hard state.
    pub(crate) fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Persists a new hard state.
    pub(crate) fn set_hard_state(&mut self, hs: &HardState) -> raft::Result<()> {
        let bytes = hs.write_to_bytes().map_err(other)?;
        self.log
            .set_meta(META_HARD_STATE, Bytes::from(bytes), None)
            .map_err(disk)?;
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Installs a small in-memory snapshot (the bootstrap snapshot): saves it with fsync, then
    /// drops the log it covers.
    pub(crate) fn apply_snapshot(&mut self, mut snap: Snapshot) -> raft::Result<()> {
        self.writer.save(&snap)?;
        let file = self.writer.store.current().map_err(disk)?;
        snap.data = Bytes::new();
        self.record(snap, file)
    }

    /// Installs a snapshot file received from the leader (checked, not yet installed):
    /// renames it into place durably, then drops the log it covers.
    pub(crate) fn install_file(
        &mut self,
        meta: SnapshotMetadata,
        file: SnapshotFile,
    ) -> raft::Result<()> {
        if !self.writer.keep(meta.index, &file)? {
            return Err(other(format!(
                "refusing to install snapshot {}: a newer one is installed",
                meta.index
            )));
        }
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        self.record(snap, Some(file))
    }

    fn record(&mut self, snap: Snapshot, file: Option<SnapshotFile>) -> raft::Result<()> {
        let (index, term) = {
            let m = snap.get_metadata();
            (m.index, m.term)
        };
        self.snapshot = snap;
        self.file = file;
        self.discard_log_through(index, term)
    }

    /// A handle that saves snapshot files off this thread.
    pub(crate) fn snapshot_writer(&self) -> SnapshotWriter {
        self.writer.clone()
    }

    /// Records a snapshot this node took once its file is installed, then compacts the log up
    /// to `compact_to` (at most the snapshot's index). An older one than the current is ignored.
    pub(crate) fn snapshot_saved(
        &mut self,
        meta: SnapshotMetadata,
        file: SnapshotFile,
        compact_to: u64,
    ) -> raft::Result<()> {
        let index = meta.index;
        if index <= self.snapshot_position().0 {
            return Ok(());
        }
        self.snapshot = Snapshot::default();
        self.snapshot.set_metadata(meta);
        self.file = Some(file);
        self.compact(compact_to.min(index))
    }

    /// Removes entries up to `to` (which must be applied and covered by a snapshot).
    pub(crate) fn compact(&mut self, to: u64) -> raft::Result<()> {
        if to <= self.purged_index() {
            return Ok(());
        }
        let Some(term) = self.log.term(to) else {
            return Ok(());
        };
        self.log.purge(to, term, Bytes::new(), None).map_err(disk)
    }

    /// Runs `done` once every write queued so far is durable.
    pub(crate) fn on_durable(&self, done: consensus_storage::SyncCallback) -> raft::Result<()> {
        self.log.on_durable(done).map_err(disk)
    }

    /// Offers `s` to raft-rs for peers the stored snapshot cannot serve (replacing an older
    /// one not yet sent).
    pub(crate) fn set_streamable(&self, s: Streamable) {
        *self.streamable.lock() = Some(s);
    }

    /// The snapshot to stream whose metadata raft-rs sent at `index`; taken once (the next
    /// peer that needs one gets a fresh capture).
    pub(crate) fn take_streamable(&self, index: u64) -> Option<Streamable> {
        let mut slot = self.streamable.lock();
        if slot.as_ref()?.snapshot.get_metadata().index == index {
            slot.take()
        } else {
            None
        }
    }

    /// Drops a snapshot offered for streaming and never sent (its view keeps old state alive).
    pub(crate) fn drop_streamable(&self) {
        self.streamable.lock().take();
    }

    /// Whether raft-rs asked for a fresher snapshot since the last call.
    pub(crate) fn take_snapshot_request(&self) -> bool {
        self.wanted.swap(false, Ordering::SeqCst)
    }

    /// The shared log handle (to flush and close it at shutdown).
    pub(crate) fn log(&self) -> &Log {
        &self.log
    }

    fn first(&self) -> u64 {
        let st = self.log.state();
        match (st.purged, st.first_index) {
            (Some(p), _) => p.0 + 1,
            (None, Some(f)) => f,
            (None, None) => 1,
        }
    }

    fn last(&self) -> u64 {
        let st = self.log.state();
        match (st.last_index, st.purged) {
            (Some(l), _) => l,
            (None, Some(p)) => p.0,
            (None, None) => 0,
        }
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state.clone(),
            conf_state: self.snapshot.get_metadata().get_conf_state().clone(),
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let stored = self.log.entries(low, high, max_size.into());
        let mut out = Vec::with_capacity(stored.len());
        for e in stored {
            out.push(Entry::parse_from_carllerche_bytes(&e.data).map_err(other)?);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snap_index, snap_term) = self.snapshot_position();
        if idx == snap_index {
            return Ok(snap_term);
        }
        if let Some(t) = self.log.term(idx) {
            return Ok(t);
        }
        if idx == 0 && self.purged_index() == 0 {
            return Ok(0);
        }
        if idx < self.first() {
            Err(raft::Error::Store(StorageError::Compacted))
        } else {
            Err(raft::Error::Store(StorageError::Unavailable))
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // raft-rs refuses to restore a snapshot whose configuration does not name it.
        let serves = |s: &Snapshot| {
            let meta = s.get_metadata();
            let cs = meta.get_conf_state();
            meta.index >= request_index
                && [
                    &cs.voters,
                    &cs.learners,
                    &cs.voters_outgoing,
                    &cs.learners_next,
                ]
                .iter()
                .any(|ids| ids.contains(&to))
        };
        // Metadata only: the driver streams the file (or the captured view) and puts the
        // transfer's ticket here.
        if serves(&self.snapshot) {
            return Ok(self.snapshot.clone());
        }
        if let Some(s) = self
            .streamable
            .lock()
            .as_ref()
            .filter(|s| serves(&s.snapshot))
        {
            return Ok(s.snapshot.clone());
        }
        self.wanted.store(true, Ordering::SeqCst);
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::from(format!("e{index}")),
            ..Default::default()
        }
    }

    fn sync(s: &DiskStorage) {
        s.log.sync().expect("sync");
    }

    #[test]
    fn bootstrap_entries_and_hard_state_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = DiskStorage::open(dir.path()).expect("open");
            assert!(s.is_fresh());
            s.bootstrap(vec![1, 2, 3], b"init".to_vec())
                .expect("bootstrap");
            assert_eq!(s.first(), 2);
            assert_eq!(s.last(), 1);
            assert_eq!(s.term(1).expect("term"), 1);
            s.append(&[entry(2, 2), entry(3, 2)]).expect("append");
            let hs = HardState {
                term: 2,
                vote: 1,
                commit: 3,
                ..Default::default()
            };
            s.set_hard_state(&hs).expect("hs");
            sync(&s);
        }
        let s = DiskStorage::open(dir.path()).expect("reopen");
        assert!(!s.is_fresh());
        let st = s.initial_state().expect("state");
        assert_eq!(st.hard_state.vote, 1);
        assert_eq!(st.hard_state.commit, 3);
        assert_eq!(st.conf_state.voters, vec![1, 2, 3]);
        let got = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .expect("entries");
        assert_eq!(got, vec![entry(2, 2), entry(3, 2)]);
        let file = s.snapshot_file().expect("the bootstrap snapshot's file");
        assert_eq!(file.read_data().expect("data"), b"init");
    }

    #[test]
    fn compaction_and_snapshot_install_move_the_first_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = DiskStorage::open(dir.path()).expect("open");
        s.bootstrap(vec![1], Vec::new()).expect("bootstrap");
        s.append(&(2..=10).map(|i| entry(i, 2)).collect::<Vec<_>>())
            .expect("append");
        s.compact(5).expect("compact");
        assert_eq!(s.first(), 6);
        assert!(matches!(
            s.entries(4, 7, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(s.term(5).expect("term of the purged index"), 2);
        // A snapshot from another leader's history replaces the whole log.
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 8;
        snap.mut_metadata().term = 3;
        s.apply_snapshot(snap).expect("install");
        assert_eq!((s.first(), s.last()), (9, 8));
        assert_eq!(s.term(8).expect("term"), 3);
        sync(&s);
        drop(s);
        let s = DiskStorage::open(dir.path()).expect("reopen");
        assert_eq!((s.first(), s.last()), (9, 8));
        assert_eq!(s.snapshot_position(), (8, 3));
    }
}
