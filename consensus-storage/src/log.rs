//! [`Log`]: the in-memory view of the log plus a writer thread that makes it durable.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::file::{sync_dir, write_atomic};
use crate::record::{parse_at, valid_record_after, Parsed, Record};
use crate::{Result, StorageError};

/// Name of the log file inside the data directory.
const LOG_FILE: &str = "raft.log";
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
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            rewrite_min_bytes: DEFAULT_REWRITE_MIN_BYTES,
            preallocate_bytes: DEFAULT_PREALLOCATE_BYTES,
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

#[derive(Default)]
struct State {
    entries: VecDeque<Entry>,
    purged: Option<(u64, u64, Bytes)>,
    metas: HashMap<u8, Bytes>,
    live_bytes: u64,
    failed: Option<String>,
}

impl State {
    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.index >= index) {
            if let Some(e) = self.entries.pop_back() {
                self.live_bytes -= entry_bytes(&e);
            }
        }
    }

    fn purge_upto(&mut self, index: u64, term: u64, data: Bytes) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            if let Some(e) = self.entries.pop_front() {
                self.live_bytes -= entry_bytes(&e);
            }
        }
        if self.purged.as_ref().is_none_or(|p| p.0 <= index) {
            self.purged = Some((index, term, data));
        }
    }

    /// Checks that `index` may be appended (replacing anything at or above it).
    fn check_append(&self, index: u64) -> std::result::Result<(), String> {
        if let Some((p, _, _)) = &self.purged {
            if index <= *p {
                return Err(format!(
                    "append at {index} is at or below the purged index {p}"
                ));
            }
        }
        let next = match (self.last_index(), &self.purged) {
            (Some(last), _) => last + 1,
            (None, Some((p, _, _))) => p + 1,
            (None, None) => return Ok(()),
        };
        if index > next {
            return Err(format!("append at {index} leaves a gap after {}", next - 1));
        }
        Ok(())
    }

    fn push(&mut self, e: Entry) -> std::result::Result<(), String> {
        self.check_append(e.index)?;
        self.truncate_from(e.index);
        self.live_bytes += entry_bytes(&e);
        self.entries.push_back(e);
        Ok(())
    }

    fn apply(&mut self, r: Record) -> std::result::Result<(), String> {
        match r {
            Record::Entry { index, term, data } => {
                // Replaying a rewrite race may repeat entries already purged: harmless.
                if self.purged.as_ref().is_some_and(|p| index <= p.0) {
                    return Ok(());
                }
                self.push(Entry { index, term, data })?;
            }
            Record::Truncate { index } => self.truncate_from(index),
            Record::Purge { index, term, data } => self.purge_upto(index, term, data),
            Record::Meta { key, data } => {
                self.metas.insert(key, data);
            }
        }
        Ok(())
    }

    fn position(&self, index: u64) -> Option<usize> {
        let first = self.first_index()?;
        let pos = index.checked_sub(first)? as usize;
        (pos < self.entries.len()).then_some(pos)
    }

    /// Every record needed to rebuild this state.
    fn encode_all(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.live_bytes as usize + 1024);
        let mut metas: Vec<_> = self.metas.iter().collect();
        metas.sort_by_key(|(k, _)| **k);
        for (key, data) in metas {
            Record::Meta {
                key: *key,
                data: data.clone(),
            }
            .encode_into(&mut out);
        }
        if let Some((index, term, data)) = &self.purged {
            Record::Purge {
                index: *index,
                term: *term,
                data: data.clone(),
            }
            .encode_into(&mut out);
        }
        for e in &self.entries {
            Record::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            }
            .encode_into(&mut out);
        }
        out
    }
}

fn entry_bytes(e: &Entry) -> u64 {
    e.data.len() as u64 + 25
}

enum Op {
    Write(Vec<u8>, Option<SyncCallback>),
    Stop(mpsc::Sender<()>),
}

struct Shared {
    path: PathBuf,
    state: Arc<Mutex<State>>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
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
    /// Opens (or creates) the log in `dir`, replaying and checking every record.
    pub fn open(dir: &Path) -> Result<Log> {
        Self::open_with(dir, LogOptions::default())
    }

    /// Like [`Log::open`], with explicit [`LogOptions`].
    pub fn open_with(dir: &Path, options: LogOptions) -> Result<Log> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::io("create directory", dir, e))?;
        let lock = lock_dir(dir)?;
        let path = dir.join(LOG_FILE);
        let existed = path.exists();
        let (state, valid_len) = if existed {
            replay(&path)?
        } else {
            (State::default(), 0)
        };
        // Not `append`: records are written at the end of the valid data, which may lie inside
        // zero-filled preallocated space (and `pwrite` ignores offsets on an `O_APPEND` file).
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| StorageError::io("open", &path, e))?;
        let allocated = file
            .metadata()
            .map_err(|e| StorageError::io("stat", &path, e))?
            .len()
            .max(valid_len);
        if !existed {
            file.sync_all()
                .map_err(|e| StorageError::io("fsync", &path, e))?;
            sync_dir(dir)?;
        }
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(state));
        let shared = Arc::new(Shared {
            path: path.clone(),
            state: state.clone(),
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(None),
        });
        // The writer owns the directory lock and never holds `Shared`: the lock is released
        // exactly when the writer has exited, and dropping the last handle joins it.
        let writer = Writer {
            state,
            _lock: lock,
            path,
            file,
            len: valid_len,
            allocated,
            options,
        };
        let handle = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StorageError::io("spawn writer thread", dir, e))?;
        *shared.writer.lock() = Some(handle);
        Ok(Log { shared })
    }

    /// The bounds of the log.
    pub fn state(&self) -> LogState {
        let s = self.shared.state.lock();
        LogState {
            first_index: s.first_index(),
            last_index: s.last_index(),
            purged: s.purged.clone(),
        }
    }

    /// The entry at `index`, if it is live.
    pub fn entry(&self, index: u64) -> Option<Entry> {
        let s = self.shared.state.lock();
        s.position(index).map(|p| s.entries[p].clone())
    }

    /// The term of the entry at `index`: live entries and the last purged one.
    pub fn term(&self, index: u64) -> Option<u64> {
        let s = self.shared.state.lock();
        if let Some(p) = s.position(index) {
            return Some(s.entries[p].term);
        }
        s.purged.as_ref().filter(|p| p.0 == index).map(|p| p.1)
    }

    /// Live entries with index in `[lo, hi)`, at most `max_bytes` of data (at least one entry).
    pub fn entries(&self, lo: u64, hi: u64, max_bytes: Option<u64>) -> Vec<Entry> {
        let s = self.shared.state.lock();
        let mut out = Vec::new();
        let Some(first) = s.first_index() else {
            return out;
        };
        let start = lo.max(first);
        let mut size = 0u64;
        for index in start..hi {
            let Some(p) = s.position(index) else { break };
            let e = &s.entries[p];
            size += e.data.len() as u64;
            if !out.is_empty() && max_bytes.is_some_and(|m| size > m) {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// The metadata value under `key`.
    pub fn meta(&self, key: u8) -> Option<Bytes> {
        self.shared.state.lock().metas.get(&key).cloned()
    }

    /// Appends entries (replacing any at or above the first one); `done` runs once durable.
    pub fn append(&self, entries: Vec<Entry>, done: Option<SyncCallback>) -> Result<()> {
        let mut buf = Vec::new();
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        // Validate first so a bad batch changes nothing.
        if let Some(first) = entries.first() {
            s.check_append(first.index).map_err(StorageError::Invalid)?;
            for w in entries.windows(2) {
                if w[1].index != w[0].index + 1 {
                    return Err(StorageError::Invalid(format!(
                        "entries not contiguous: {} then {}",
                        w[0].index, w[1].index
                    )));
                }
            }
        }
        for e in entries {
            Record::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            }
            .encode_into(&mut buf);
            s.push(e).map_err(StorageError::Invalid)?;
        }
        self.enqueue(&s, buf, done)
    }

    /// Removes entries at `index` and above; `done` runs once durable.
    pub fn truncate(&self, index: u64, done: Option<SyncCallback>) -> Result<()> {
        let mut s = self.shared.state.lock();
        check_failed(&s)?;
        s.truncate_from(index);
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
        s.purge_upto(index, term, note.clone());
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
        s.metas.insert(key, data.clone());
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

/// Takes the data directory's lock so two processes (or a crashed and a restarted node in one
/// process) never write the same log.
fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join("LOCK");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| StorageError::io("open", &path, e))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(StorageError::Locked(dir.display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(StorageError::io("lock", &path, e)),
    }
}

fn check_failed(s: &State) -> Result<()> {
    match &s.failed {
        Some(e) => Err(StorageError::Stopped(e.clone())),
        None => Ok(()),
    }
}

/// Reads and checks every record; truncates a torn tail; refuses mid-file corruption.
fn replay(path: &Path) -> Result<(State, u64)> {
    let buf = std::fs::read(path).map_err(|e| StorageError::io("read", path, e))?;
    let mut state = State::default();
    let mut pos = 0usize;
    loop {
        match parse_at(&buf, pos) {
            Parsed::Ok(record, next) => {
                state
                    .apply(record)
                    .map_err(|reason| StorageError::Corrupt {
                        path: path.display().to_string(),
                        offset: pos as u64,
                        reason,
                    })?;
                pos = next;
            }
            Parsed::End => break,
            // Preallocated space that was never written: the clean end of the log.
            Parsed::Bad { .. } if buf[pos..].iter().all(|b| *b == 0) => break,
            Parsed::Bad { reason, next } => {
                if valid_record_after(&buf, next.unwrap_or(pos + 1)) {
                    return Err(StorageError::Corrupt {
                        path: path.display().to_string(),
                        offset: pos as u64,
                        reason,
                    });
                }
                tracing::warn!(
                    path = %path.display(),
                    offset = pos,
                    dropped = buf.len() - pos,
                    "torn write at the log tail ({reason}); truncating it"
                );
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| StorageError::io("open", path, e))?;
                f.set_len(pos as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| StorageError::io("truncate torn tail of", path, e))?;
                break;
            }
        }
    }
    Ok((state, pos as u64))
}

struct Writer {
    state: Arc<Mutex<State>>,
    /// Exclusive lock on the data directory, held for as long as the writer runs.
    _lock: File,
    path: PathBuf,
    file: File,
    /// End of the valid records: where the next write goes.
    len: u64,
    /// The file's size: zeros between `len` and here.
    allocated: u64,
    options: LogOptions,
}

/// Source of zeros for preallocation.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            ops.extend(rx.try_iter());
            let mut callbacks = Vec::with_capacity(ops.len());
            let mut stop = None;
            let mut buf = Vec::new();
            for op in ops {
                match op {
                    Op::Write(bytes, cb) => {
                        if buf.is_empty() {
                            buf = bytes;
                        } else {
                            buf.extend_from_slice(&bytes);
                        }
                        callbacks.extend(cb);
                    }
                    Op::Stop(done) => stop = Some(done),
                }
            }
            // Nobody waits on a batch without callbacks: write it, and let the next sync (or
            // the one at close) make it durable.
            let sync = !callbacks.is_empty() || stop.is_some();
            let result = match &failed {
                Some(e) => Err(e.clone()),
                None => self.write(&buf, sync),
            };
            if let Err(e) = &result {
                if failed.is_none() {
                    tracing::error!(path = %self.path.display(), "log write failed: {e}");
                    failed = Some(e.clone());
                    self.state.lock().failed = Some(e.clone());
                }
            }
            for cb in callbacks {
                cb(result.clone());
            }
            if let Some(done) = stop {
                let _ = done.send(());
                return;
            }
            if failed.is_none() {
                if let Err(e) = self.maybe_rewrite() {
                    tracing::warn!(path = %self.path.display(), "log rewrite failed, keeping the old file: {e}");
                }
            }
        }
    }

    fn write(&mut self, buf: &[u8], sync: bool) -> std::result::Result<(), String> {
        if !buf.is_empty() {
            let end = self.len + buf.len() as u64;
            if end > self.allocated && self.options.preallocate_bytes > 0 {
                // Extend by whole steps past what this write needs; the same sync below makes
                // the zeros and the new size durable together with the records.
                let step = self.options.preallocate_bytes;
                let target = end.next_multiple_of(step) + step;
                self.zero_fill(self.allocated, target)
                    .map_err(|e| format!("preallocate {}: {e}", self.path.display()))?;
                self.allocated = target;
            }
            self.file
                .write_all_at(buf, self.len)
                .map_err(|e| format!("write {}: {e}", self.path.display()))?;
            self.len = end;
            self.allocated = self.allocated.max(end);
        }
        if !sync {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| format!("fdatasync {}: {e}", self.path.display()))
    }

    fn zero_fill(&self, from: u64, to: u64) -> std::io::Result<()> {
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Replaces the file by the live records when most of it is dead.
    fn maybe_rewrite(&mut self) -> Result<()> {
        if self.len < self.options.rewrite_min_bytes {
            return Ok(());
        }
        let state = self.state.lock();
        if state.live_bytes * 2 > self.len {
            return Ok(());
        }
        // Holding the state lock: writes queued but not yet written are already in `state`, and
        // replay treats their records as idempotent when they follow the rewritten file.
        let bytes = state.encode_all();
        write_atomic(&self.path, &bytes)?;
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| StorageError::io("reopen", &self.path, e))?;
        tracing::info!(path = %self.path.display(), from = self.len, to = bytes.len(), "log rewritten");
        self.len = bytes.len() as u64;
        self.allocated = self.len;
        Ok(())
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
