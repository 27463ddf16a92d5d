//! [`Log`]: the in-memory view of the log plus a writer thread that makes it durable.
//!
//! # The file
//!
//! The log of a data directory is one file, `raft.log`, holding a sequence of records in the
//! format of [`crate::record`] (`len | crc32 | kind | fields`), one record per change:
//!
//! - an entry (index, term, the engine's bytes), replacing any entry at its index or above;
//! - a truncate (index): entries at and above it are gone;
//! - a purge (index, term, note): entries at and below it are gone, and the position is kept
//!   (the engine needs the term of the last purged entry);
//! - a meta (key, bytes): the latest value of one of the engine's small variables (vote, hard
//!   state, committed index...).
//!
//! Replaying the records in order rebuilds the log ([`index`]). The file may end in zeros:
//! space preallocated ahead of the last record ([`LogOptions::preallocate_bytes`]). Once the
//! file is large and mostly dead it is rewritten as just the records of the live state (metas,
//! the purged position, the live entries), atomically ([`LogOptions::rewrite_min_bytes`]).
//!
//! # Durability
//!
//! - A write is visible to readers as soon as it is accepted, and its callback runs only after
//!   an `fdatasync` that covers it ([`writer`]: group commit). Nothing is acknowledged earlier.
//! - Writes reach the file in acceptance order, so a crash keeps a prefix of them.
//! - On open ([`replay`]) a damaged record with nothing valid after it is a torn, never
//!   acknowledged write and is truncated; damage followed by a valid record is corruption and
//!   the log refuses to open; a zeroed tail is the clean end.
//! - The first failed write stops the writer: later writes fail with
//!   [`StorageError::Stopped`] instead of leaving a hole in the file.
//! - One open log per data directory, enforced by a lock file (`LOCK`) held by the writer.

mod index;
mod replay;
pub(crate) use replay::replay;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::file::sync_dir;
use crate::fs::{FileSystem, LockGuard, OpenMode};
use crate::metrics::StorageMetrics;
use crate::record::Record;
use crate::{Result, SnapshotStore, StorageError};
use index::Index;
use writer::{Op, Writer};

/// Name of the log file inside the data directory.
const LOG_FILE: &str = "raft.log";
/// Name of the lock file inside the data directory.
const LOCK_FILE: &str = "LOCK";
/// Rewrite the file once it is this large and mostly dead (purged or truncated records).
const DEFAULT_REWRITE_MIN_BYTES: u64 = 64 << 20;
/// Zero-filled space kept ahead of the last record (see [`LogOptions::preallocate_bytes`]).
const DEFAULT_PREALLOCATE_BYTES: u64 = 1 << 20;

/// Tuning of a [`Log`]; [`LogOptions::default`] is what [`Log::open`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Rewrite the file (keeping only live records) once it is at least this large and mostly
    /// dead: purged or truncated records.
    pub rewrite_min_bytes: u64,
    /// Keep this much zero-filled space ahead of the last record, extended a step at a time.
    ///
    /// Overwriting blocks that already exist lets `fdatasync` flush only the data: appending
    /// changes the file size, so every sync of an appended file also commits the file-system
    /// journal. On ext4 that halves the sync latency of a small write. Replay treats a zeroed
    /// tail as the clean end of the log. `0` turns it off (plain appends).
    pub preallocate_bytes: u64,
    /// The node id the log's metrics are labelled with (`node="<id>"`; empty when `None`):
    /// fsync latency, bytes, batch sizes, snapshot builds (see the crate's metrics table).
    pub metrics_node: Option<consensus_api::NodeId>,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            rewrite_min_bytes: DEFAULT_REWRITE_MIN_BYTES,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
            metrics_node: None,
        }
    }
}

/// One log entry: the engine's encoding of it in `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Log index.
    pub index: u64,
    /// Term the entry was proposed in.
    pub term: u64,
    /// The engine's encoding of the entry.
    pub data: Bytes,
}

/// Called once the writes queued before it are durable (or failed).
pub type SyncCallback = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;

/// The bounds of the log.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LogState {
    /// Index of the first live entry (when the log has entries).
    pub first_index: Option<u64>,
    /// Index of the last live entry.
    pub last_index: Option<u64>,
    /// The last purged entry: index, term and the engine's note about it.
    pub purged: Option<(u64, u64, Bytes)>,
}

/// What the handles and the writer share under one lock.
#[derive(Default)]
struct State {
    /// Every accepted write, durable or not yet.
    index: Index,
    /// The writer's first failure; once set, every write is refused with it.
    failed: Option<String>,
}

struct Shared {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    /// The directory lock, owned by the writer and by every [`SnapshotStore`] handed out.
    lock: Weak<DirLock>,
    path: PathBuf,
    state: Arc<Mutex<State>>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    metrics: StorageMetrics,
}

/// A durable Raft log with metadata, shared by reference (`Clone` is cheap).
///
/// Reads see every accepted write at once; a write's [`SyncCallback`] runs only after it reached
/// the disk. Writes are applied to the file in the order they were accepted. A write without a
/// callback is not synced on its own: it becomes durable with the next write that has one (or
/// [`Log::sync`], [`Log::on_durable`], [`Log::close`]), since a sync covers everything before it.
#[derive(Clone)]
pub struct Log {
    shared: Arc<Shared>,
}

impl Log {
    /// Opens (or creates) the log in `dir`, replaying and checking every record. The file
    /// layer is the one serving `dir` ([`crate::fs::for_path`]: the real file system unless a
    /// test mounted another).
    pub fn open(dir: &Path) -> Result<Log> {
        Self::open_with(dir, LogOptions::default())
    }

    /// Like [`Log::open`], with explicit [`LogOptions`].
    pub fn open_with(dir: &Path, options: LogOptions) -> Result<Log> {
        Self::open_in(crate::fs::for_path(dir), dir, options)
    }

    /// Like [`Log::open_with`], on the file layer `fs`.
    pub fn open_in(fs: Arc<dyn FileSystem>, dir: &Path, options: LogOptions) -> Result<Log> {
        fs.create_dir_all(dir)
            .map_err(|e| StorageError::io("create directory", dir, e))?;
        let lock = Arc::new(lock_dir(&*fs, dir)?);
        // Nobody else writes here while we hold the lock: temporary files are leftovers of a
        // crash (a snapshot being built or received) and are never read.
        crate::snapshot::remove_leftovers(&*fs, dir)?;
        let path = dir.join(LOG_FILE);
        let existed = fs
            .exists(&path)
            .map_err(|e| StorageError::io("stat", &path, e))?;
        let (index, valid_len) = if existed {
            replay::replay(&*fs, &path)?
        } else {
            (Index::default(), 0)
        };
        // Records are written at the end of the valid data, which may lie inside zero-filled
        // preallocated space: explicit offsets, never an append mode.
        let file = fs
            .open(&path, OpenMode::Create)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let allocated = file
            .size()
            .map_err(|e| StorageError::io("stat", &path, e))?
            .max(valid_len);
        // What replay read may still sit in the page cache only (the previous process died,
        // the machine did not): make it durable before the writer treats it as synced.
        file.sync_all()
            .map_err(|e| StorageError::io("fsync", &path, e))?;
        if !existed {
            sync_dir(&*fs, dir)?;
        }
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(State {
            index,
            failed: None,
        }));
        let metrics = StorageMetrics::new(options.metrics_node);
        let shared = Arc::new(Shared {
            fs: fs.clone(),
            dir: dir.to_path_buf(),
            lock: Arc::downgrade(&lock),
            path: path.clone(),
            state: state.clone(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
            metrics: metrics.clone(),
        });
        // The writer owns the directory lock (with the snapshot stores handed out) and never
        // holds `Shared`: the lock is released once the writer has exited and no snapshot
        // store is left, and dropping the last handle joins the writer.
        let writer = Writer {
            state,
            _lock: lock,
            fs,
            path,
            file,
            len: valid_len,
            synced: valid_len,
            marked: None,
            allocated,
            options,
            metrics,
        };
        let handle = writer
            .spawn(rx)
            .map_err(|e| StorageError::io("spawn writer thread", dir, e))?;
        *shared.writer.lock() = Some(handle);
        Ok(Log { shared })
    }

    /// The bounds of the log.
    pub fn state(&self) -> LogState {
        let s = self.shared.state.lock();
        LogState {
            first_index: s.index.first_index(),
            last_index: s.index.last_index(),
            purged: s.index.purged().cloned(),
        }
    }

    /// The entry at `index`, if it is live.
    pub fn entry(&self, index: u64) -> Option<Entry> {
        self.shared.state.lock().index.entry(index).cloned()
    }

    /// The term of the entry at `index`: live entries and the last purged one.
    pub fn term(&self, index: u64) -> Option<u64> {
        self.shared.state.lock().index.term(index)
    }

    /// The highest index up to which purging leaves at most `max_bytes` of entry data at or
    /// below `upto` (for a byte bound on the entries kept behind a snapshot at `upto`); `None`
    /// when no entry is live.
    pub fn purge_bound_keeping(&self, upto: u64, max_bytes: u64) -> Option<u64> {
        self.shared
            .state
            .lock()
            .index
            .purge_bound_keeping(upto, max_bytes)
    }

    /// Live entries with index in `[lo, hi)`, at most `max_bytes` of data (at least one entry).
    pub fn entries(&self, lo: u64, hi: u64, max_bytes: Option<u64>) -> Vec<Entry> {
        self.shared.state.lock().index.entries(lo, hi, max_bytes)
    }

    /// The metadata value under `key`.
    pub fn meta(&self, key: u8) -> Option<Bytes> {
        self.shared.state.lock().index.meta(key).cloned()
    }

    /// Appends entries (replacing any at or above the first one); `done` runs once durable.
    pub fn append(&self, entries: Vec<Entry>, done: Option<SyncCallback>) -> Result<()> {
        let mut buf = Vec::new();
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        // Validate first so a bad batch changes nothing.
        s.index
            .check_batch(&entries)
            .map_err(StorageError::Invalid)?;
        for e in entries {
            Record::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            }
            .encode_into(&mut buf);
            s.index.push(e).map_err(StorageError::Invalid)?;
        }
        self.enqueue(&s, buf, done)
    }

    /// Removes entries at `index` and above; `done` runs once durable.
    pub fn truncate(&self, index: u64, done: Option<SyncCallback>) -> Result<()> {
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        s.index.truncate_from(index);
        let mut buf = Vec::new();
        Record::Truncate { index }.encode_into(&mut buf);
        self.enqueue(&s, buf, done)
    }

    /// Removes entries at `index` and below, remembering `(index, term, note)` as the purged
    /// position; `done` runs once durable.
    pub fn purge(
        &self,
        index: u64,
        term: u64,
        note: Bytes,
        done: Option<SyncCallback>,
    ) -> Result<()> {
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        s.index.purge_upto(index, term, note.clone());
        let mut buf = Vec::new();
        Record::Purge {
            index,
            term,
            data: note,
        }
        .encode_into(&mut buf);
        self.enqueue(&s, buf, done)
    }

    /// Sets metadata `key`; `done` runs once durable.
    pub fn set_meta(&self, key: u8, data: Bytes, done: Option<SyncCallback>) -> Result<()> {
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        s.index.set_meta(key, data.clone());
        let mut buf = Vec::new();
        Record::Meta { key, data }.encode_into(&mut buf);
        self.enqueue(&s, buf, done)
    }

    /// Runs `done` once everything accepted so far is durable, without blocking the caller.
    pub fn on_durable(&self, done: SyncCallback) -> Result<()> {
        let s = self.shared.state.lock();
        check_failed(&s)?;
        self.enqueue(&s, Vec::new(), Some(done))
    }

    /// Blocks until everything accepted so far is durable.
    pub fn sync(&self) -> Result<()> {
        let (tx, rx) = mpsc::channel();
        {
            let s = self.shared.state.lock();
            self.enqueue(
                &s,
                Vec::new(),
                Some(Box::new(move |r| {
                    let _ = tx.send(r);
                })),
            )?;
        }
        rx.recv()
            .map_err(|_| StorageError::Stopped("writer exited".into()))?
            .map_err(StorageError::Stopped)
    }

    /// Flushes and stops the writer thread. Later writes fail with `Stopped`.
    pub fn close(&self) {
        let tx = self.shared.tx.lock().take();
        if let Some(tx) = tx {
            let (done_tx, done_rx) = mpsc::channel();
            if tx.send(Op::Stop(done_tx)).is_ok() {
                let _ = done_rx.recv();
            }
        }
        if let Some(h) = self.shared.writer.lock().take() {
            let _ = h.join();
        }
    }

    /// The snapshot store of this log's data directory, on the same file layer. It shares the
    /// directory lock: the lock outlives the log's writer until every store handed out is
    /// dropped. Fails once the writer has exited.
    pub fn snapshot_store(&self) -> Result<SnapshotStore> {
        let lock = self
            .shared
            .lock
            .upgrade()
            .ok_or_else(|| StorageError::Stopped("log is closed".into()))?;
        Ok(SnapshotStore::new(
            self.shared.fs.clone(),
            &self.shared.dir,
            lock,
            self.shared.metrics.clone(),
        ))
    }

    /// The log file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn enqueue(&self, _held: &State, buf: Vec<u8>, done: Option<SyncCallback>) -> Result<()> {
        // Called with the state lock held so file order equals acceptance order.
        let tx = self.shared.tx.lock();
        match tx.as_ref() {
            Some(tx) => tx
                .send(Op::Write(buf, done))
                .map_err(|_| StorageError::Stopped("writer thread is gone".into())),
            None => Err(StorageError::Stopped("log is closed".into())),
        }
    }
}

/// A data directory's exclusive lock; released when the last owner drops it.
pub(crate) struct DirLock {
    _guard: Box<dyn LockGuard>,
}

/// Takes the data directory's lock so two processes (or a crashed and a restarted node in one
/// process) never write the same log.
fn lock_dir(fs: &dyn FileSystem, dir: &Path) -> Result<DirLock> {
    let path = dir.join(LOCK_FILE);
    match fs.lock(&path) {
        Ok(Some(guard)) => Ok(DirLock { _guard: guard }),
        Ok(None) => Err(StorageError::Locked(dir.display().to_string())),
        Err(e) => Err(StorageError::io("lock", &path, e)),
    }
}

fn check_failed(s: &State) -> Result<()> {
    match &s.failed {
        Some(e) => Err(StorageError::Stopped(e.clone())),
        None => Ok(()),
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Last handle gone: let the writer finish what was queued.
        self.tx.lock().take();
        if let Some(h) = self.writer.lock().take() {
            let _ = h.join();
        }
    }
}

/// A read-only view of a data directory's log, for offline inspection (`broker debug dump`):
/// reads and checks every record like [`Log::open`], but takes no lock and changes nothing (a
/// torn tail is reported, not truncated), so it also works on the directory of a running node
/// (then it shows the file as it was when read).
#[derive(Debug)]
pub struct LogView {
    index: Index,
    /// Size of the file and the end of its valid records.
    pub file_bytes: u64,
    /// End of the valid records (a torn tail starts here).
    pub valid_bytes: u64,
    /// Why the tail after `valid_bytes` is not valid, when it is torn.
    pub torn: Option<String>,
}

impl LogView {
    /// Reads the log of data directory `dir`; `None` when it has no log file.
    pub fn read(dir: &Path) -> Result<Option<LogView>> {
        let path = dir.join(LOG_FILE);
        let buf = match crate::fs::for_path(dir).read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("read", &path, e)),
        };
        let scan = replay::scan(&buf).map_err(|c| StorageError::Corrupt {
            path: path.display().to_string(),
            offset: c.offset,
            reason: c.reason,
        })?;
        Ok(Some(LogView {
            index: scan.index,
            file_bytes: buf.len() as u64,
            valid_bytes: scan.valid_len,
            torn: scan.torn,
        }))
    }

    /// A line for an operator about the torn tail, if there is one.
    pub fn torn_note(&self) -> Option<String> {
        self.torn.as_ref().map(|reason| {
            format!(
                "torn tail: {} bytes after offset {} ({reason}); a start truncates it",
                self.file_bytes - self.valid_bytes,
                self.valid_bytes
            )
        })
    }

    /// First and last live index (`None` when no entry is live).
    pub fn bounds(&self) -> Option<(u64, u64)> {
        Some((self.index.first_index()?, self.index.last_index()?))
    }

    /// The last purged entry's index and term.
    pub fn purged(&self) -> Option<(u64, u64)> {
        self.index.purged().map(|(i, t, _)| (*i, *t))
    }

    /// Live entries in `[lo, hi)`.
    pub fn entries(&self, lo: u64, hi: u64) -> Vec<Entry> {
        self.index.entries(lo, hi, None)
    }

    /// The metadata stored under `key`.
    pub fn meta(&self, key: u8) -> Option<Bytes> {
        self.index.meta(key).cloned()
    }
}
