//! [`SnapshotStore`]: the latest snapshot of a node, one file replaced atomically, written and
//! read as a stream ([`SnapshotSink`], [`SnapshotFile`]) so a large state never sits in memory
//! whole.
//!
//! Layout: `MAGIC (8) | meta_len: u32 LE | crc32(meta ++ data): u32 LE | meta | data`. The
//! engine's metadata (`meta`) is small; `data` is the state machine's snapshot, any size.
//!
//! A snapshot is built in a temporary file (`snapshot.<n>.tmp`), checksummed as it is written,
//! synced, and only then installed as `snapshot.bin` by a rename and a directory sync. A
//! snapshot received from a peer ([`crate::transfer`]) takes the same path: it is installed
//! only once all of it is there and its checksum holds. Temporary files left by a crash are
//! removed when the data directory's log opens.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;

use crate::aside::PendingRestore;
use crate::file::{sync_dir, write_atomic_parts};
use crate::fs::{FileHandle, FileSystem, OpenMode};
use crate::log::DirLock;
use crate::metrics::StorageMetrics;
use crate::{Result, StorageError};

pub(crate) const MAGIC: &[u8; 8] = b"CSNAP001";
const FILE: &str = "snapshot.bin";
pub(crate) const HEADER: usize = 16;
/// Size of the buffered writes and reads of a snapshot file.
pub(crate) const IO_BUF: usize = 256 << 10;
/// A snapshot file being written (built here or received from a leader) is synced every this
/// many bytes, so the disk never holds more of it unwritten. Without it the whole file sits in
/// the page cache until the final fsync, which then flushes it all at once, and every log
/// fsync on the same disk can wait behind that flush (with 1 GiB of state, up to seconds). The
/// total written is the same; it is only spread out. The size is what another node's log fsync
/// on the same disk may wait behind. Measured with the large-state bench (1 GiB, a learner's
/// catch-up while 4 clients put; four nodes on one disk; runs alternated in the same hour):
/// proposal p99 during the copy 9.5 and 8.6 ms with 4 MiB against 13.1 and 12.8 with 16 MiB
/// (openraft_grpc), 8.8 and 8.2 against 12.4 and 11.9 (tikv_grpc), and during raft-rs's build
/// of the learner's snapshot 5.1 and 4.8 against 8.4 and 8.6 ms; copy speed unchanged.
pub(crate) const WRITE_BEHIND: u64 = 4 << 20;

/// Temporary snapshot files get distinct names in a process (a build and a receipt may run at
/// once on one node, and the sim runs many nodes in one process).
static NEXT_TMP: AtomicU64 = AtomicU64::new(0);

/// Removes the temporary files a crash left in `dir` (a build or a receipt that never
/// finished). Called with the directory lock held.
pub(crate) fn remove_leftovers(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    let files = match fs.list_dir(dir) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StorageError::io("list", dir, e)),
    };
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with("snapshot.") && name.ends_with(".tmp") {
            tracing::debug!(file = %f.display(), "removing a leftover temporary snapshot file");
            fs.remove_file(&f)
                .map_err(|e| StorageError::io("remove", &f, e))?;
        }
    }
    Ok(())
}

/// Keeps the latest snapshot (the engine's metadata plus the state machine bytes).
///
/// Obtained from the data directory's log ([`Log::snapshot_store`](crate::Log::snapshot_store)),
/// whose directory lock every clone shares: the lock is released
/// only when the log has closed **and** no clone is left, so a save still running after its
/// node stopped can never race a node restarted on the same directory.
#[derive(Clone)]
pub struct SnapshotStore {
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    _lock: Arc<DirLock>,
    metrics: StorageMetrics,
}

impl std::fmt::Debug for SnapshotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotStore")
            .field("dir", &self.dir)
            .field("fs", &self.fs)
            .finish()
    }
}

impl SnapshotStore {
    pub(crate) fn new(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        lock: Arc<DirLock>,
        metrics: StorageMetrics,
    ) -> Self {
        Self {
            fs,
            dir: dir.to_path_buf(),
            _lock: lock,
            metrics,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// A fresh temporary path in the data directory.
    pub(crate) fn temp_path(&self, what: &str) -> PathBuf {
        let n = NEXT_TMP.fetch_add(1, Ordering::Relaxed);
        self.dir.join(format!("snapshot.{what}-{n}.tmp"))
    }

    /// The file layer the store runs on.
    pub(crate) fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.fs
    }

    /// Replaces the stored snapshot atomically with one small enough to be in memory; durable
    /// when it returns.
    pub fn save(&self, meta: &[u8], data: &[u8]) -> Result<()> {
        let mut h = crc32fast::Hasher::new();
        h.update(meta);
        h.update(data);
        let header = header(meta.len(), h.finalize())?;
        let started = std::time::Instant::now();
        // Written in parts: a large state is never copied into one more buffer.
        write_atomic_parts(&*self.fs, &self.path(), &[&header, meta, data])
            .map_err(|e| e.into_inner())?;
        self.metrics
            .snapshot_build_seconds
            .record(started.elapsed());
        self.metrics
            .snapshot_bytes
            .set((HEADER + meta.len() + data.len()) as f64);
        self.metrics.snapshots_installed.increment(1);
        Ok(())
    }

    /// The stored snapshot as `(meta, data)` in memory, or `None` when there is none. A damaged
    /// file is an error: snapshots are written atomically, so damage is never a torn write.
    /// For small states; [`SnapshotStore::current`] streams instead.
    pub fn load(&self) -> Result<Option<(Bytes, Bytes)>> {
        load(&*self.fs, &self.path())
    }

    /// Reads the snapshot stored in data directory `dir` without taking its lock (for
    /// inspection: offline dumps, tests). A node may be replacing it meanwhile; what is read is
    /// then either the old or the new snapshot, never a mix.
    pub fn peek(dir: &Path) -> Result<Option<(Bytes, Bytes)>> {
        load(&*crate::fs::for_path(dir), &dir.join(FILE))
    }

    /// The snapshot stored in data directory `dir`, opened read-only and checked (one pass over
    /// the file, nothing held in memory but its metadata), without taking the directory's lock:
    /// for offline inspection. `None` when there is none.
    pub fn peek_file(dir: &Path) -> Result<Option<SnapshotFile>> {
        let fs = crate::fs::for_path(dir);
        let path = dir.join(FILE);
        let handle = match fs.open(&path, OpenMode::Existing) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("open", &path, e)),
        };
        SnapshotFile::verify(fs, handle, &path, None).map(Some)
    }

    /// The stored snapshot, opened for streaming and checked (one pass over the file), or
    /// `None` when there is none. The returned file stays readable after a newer snapshot
    /// replaces it.
    pub fn current(&self) -> Result<Option<SnapshotFile>> {
        let path = self.path();
        let handle = match self.fs.open(&path, OpenMode::Existing) {
            Ok(h) => h,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("open", &path, e)),
        };
        SnapshotFile::verify(self.fs.clone(), handle, &path, None).map(Some)
    }

    /// Starts building a new snapshot with the engine's metadata `meta`: write the state
    /// machine's bytes to the sink, then [`SnapshotSink::seal`] it and
    /// [`install`](Self::install) what it returns.
    pub fn create(&self, meta: &[u8]) -> Result<SnapshotSink> {
        let path = self.temp_path("build");
        let handle = self
            .fs
            .open(&path, OpenMode::Truncate)
            .map_err(|e| StorageError::io("create", &path, e))?;
        let mut sink = SnapshotSink {
            handle: Some(handle),
            fs: self.fs.clone(),
            path,
            buf: Vec::with_capacity(IO_BUF),
            at: HEADER as u64,
            synced: 0,
            hasher: crc32fast::Hasher::new(),
            meta_len: meta.len(),
            meta: Bytes::copy_from_slice(meta),
            started: std::time::Instant::now(),
            metrics: self.metrics.clone(),
        };
        // Header goes last (it carries the checksum); the metadata starts the body.
        sink.write_all(meta)
            .map_err(|e| StorageError::io("write", &sink.path, e))?;
        Ok(sink)
    }

    /// Copies `file` (of another store: another node's, a backup) into a temporary file of this
    /// store, synced and checked, not yet installed: what a transfer from a peer yields,
    /// without the network (tests, offline restores).
    pub fn import(&self, file: &SnapshotFile) -> Result<SnapshotFile> {
        let path = self.temp_path("import");
        let io = |op, e| StorageError::io(op, &path, e);
        let handle = self
            .fs
            .open(&path, OpenMode::Truncate)
            .map_err(|e| io("create", e))?;
        let mut buf = vec![0u8; IO_BUF];
        let mut at = 0u64;
        while at < file.len() {
            let n = file.read_at(&mut buf, at).map_err(|e| io("read", e))?;
            if n == 0 {
                return Err(corrupt(&path, "source snapshot ends early"));
            }
            handle
                .write_all_at(&buf[..n], at)
                .map_err(|e| io("write", e))?;
            at += n as u64;
        }
        handle.sync_all().map_err(|e| io("fsync", e))?;
        SnapshotFile::verify(self.fs.clone(), handle, &path, Some(path.clone()))
    }

    /// Makes `file` (sealed from a [`SnapshotSink`], or received from a peer) the stored
    /// snapshot: rename over `snapshot.bin`, then sync the directory. Durable when it returns.
    /// A file that is already installed is left as it is. The caller decides whether it is
    /// newer than the current one.
    pub fn install(&self, file: &SnapshotFile) -> Result<()> {
        let mut pending = file.inner.pending.lock();
        let Some(tmp) = pending.as_ref() else {
            return Ok(());
        };
        if tmp.parent() != Some(self.dir.as_path()) {
            return Err(StorageError::Invalid(format!(
                "snapshot file {} belongs to another data dir; import it first",
                tmp.display()
            )));
        }
        let path = self.path();
        self.fs
            .rename(tmp, &path)
            .map_err(|e| StorageError::io("rename", &path, e))?;
        *pending = None;
        sync_dir(&*self.fs, &self.dir)?;
        self.metrics.snapshots_installed.increment(1);
        Ok(())
    }
}

pub(crate) fn header(meta_len: usize, crc: u32) -> Result<[u8; HEADER]> {
    let meta_len = u32::try_from(meta_len)
        .map_err(|_| StorageError::Invalid("snapshot metadata over 4 GiB".into()))?;
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&meta_len.to_le_bytes());
    h[12..16].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

pub(crate) fn load(fs: &dyn FileSystem, path: &Path) -> Result<Option<(Bytes, Bytes)>> {
    let buf = match fs.read(path) {
        Ok(b) => Bytes::from(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageError::io("read", path, e)),
    };
    let corrupt = |reason: &str| corrupt(path, reason);
    if buf.len() < HEADER || &buf[..8] != MAGIC {
        return Err(corrupt("not a snapshot file (bad magic or too short)"));
    }
    let meta_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if HEADER + meta_len > buf.len() {
        return Err(corrupt("metadata length runs past the end"));
    }
    if crc32fast::hash(&buf[HEADER..]) != crc {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(Some((
        buf.slice(HEADER..HEADER + meta_len),
        buf.slice(HEADER + meta_len..),
    )))
}

fn corrupt(path: &Path, reason: &str) -> StorageError {
    StorageError::Corrupt {
        path: path.display().to_string(),
        offset: 0,
        reason: reason.to_string(),
    }
}

/// A snapshot being written: the state machine's bytes go in through [`Write`], buffered and
/// checksummed on the way; [`SnapshotSink::seal`] makes the file durable and checked. Dropped
/// unsealed, its temporary file is removed.
pub struct SnapshotSink {
    handle: Option<Box<dyn FileHandle>>,
    fs: Arc<dyn FileSystem>,
    path: PathBuf,
    buf: Vec<u8>,
    at: u64,
    /// Up to where the file was last synced (see [`WRITE_BEHIND`]).
    synced: u64,
    hasher: crc32fast::Hasher,
    meta_len: usize,
    meta: Bytes,
    /// When [`SnapshotStore::create`] made it, for the build-duration metric.
    started: std::time::Instant,
    metrics: StorageMetrics,
}

impl SnapshotSink {
    /// Syncs what was written once [`WRITE_BEHIND`] bytes are unsynced.
    fn write_behind(&mut self) -> io::Result<()> {
        if self.at - self.synced >= WRITE_BEHIND {
            if let Some(handle) = self.handle.as_ref() {
                handle.sync_data()?;
            }
            self.synced = self.at;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let handle = self
            .handle
            .as_ref()
            .ok_or_else(|| io::Error::other("snapshot sink already sealed"))?;
        handle.write_all_at(&self.buf, self.at)?;
        self.at += self.buf.len() as u64;
        self.buf.clear();
        self.write_behind()
    }

    /// Bytes written so far (metadata and state, without the header).
    pub fn written(&self) -> u64 {
        self.at - HEADER as u64 + self.buf.len() as u64
    }

    /// Writes the header, syncs the file and returns it, checked but not yet installed (see
    /// [`SnapshotStore::install`]).
    pub fn seal(mut self) -> Result<SnapshotFile> {
        let io = |op, path: &Path, e| StorageError::io(op, path, e);
        self.flush_buf().map_err(|e| io("write", &self.path, e))?;
        let crc = self.hasher.clone().finalize();
        let header = header(self.meta_len, crc)?;
        let Some(handle) = self.handle.take() else {
            return Err(StorageError::Invalid("snapshot sink already sealed".into()));
        };
        let path = self.path.clone();
        handle
            .write_all_at(&header, 0)
            .map_err(|e| io("write", &path, e))?;
        handle.sync_all().map_err(|e| io("fsync", &path, e))?;
        let len = self.at;
        self.metrics
            .snapshot_build_seconds
            .record(self.started.elapsed());
        self.metrics.snapshot_bytes.set(len as f64);
        Ok(SnapshotFile {
            inner: Arc::new(FileInner {
                fs: self.fs.clone(),
                handle: Some(handle),
                meta: self.meta.clone(),
                len,
                crc,
                pending: Mutex::new(Some(path)),
                prepared: Mutex::new(None),
            }),
        })
    }
}

impl Write for SnapshotSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        if self.buf.len() + data.len() > IO_BUF {
            self.flush_buf()?;
        }
        if data.len() >= IO_BUF {
            let handle = self
                .handle
                .as_ref()
                .ok_or_else(|| io::Error::other("snapshot sink already sealed"))?;
            handle.write_all_at(data, self.at)?;
            self.at += data.len() as u64;
            self.write_behind()?;
        } else {
            self.buf.extend_from_slice(data);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()
    }
}

impl Drop for SnapshotSink {
    fn drop(&mut self) {
        if self.handle.take().is_some() {
            let _ = self.fs.remove_file(&self.path);
        }
    }
}

struct FileInner {
    fs: Arc<dyn FileSystem>,
    /// Always set while the file is alive; taken by `drop` (see [`close_later`]).
    handle: Option<Box<dyn FileHandle>>,
    meta: Bytes,
    len: u64,
    crc: u32,
    /// The temporary path while not yet installed.
    pending: Mutex<Option<PathBuf>>,
    /// A received file's state, built aside while it arrived ([`crate::aside`]).
    prepared: Mutex<Option<PendingRestore>>,
}

impl Drop for FileInner {
    /// A file never installed (a build overtaken by a newer snapshot, a received file the
    /// engine did not install) is removed with its last handle, not left to the next open.
    /// The handle itself is closed on another thread ([`close_later`]).
    fn drop(&mut self) {
        if let Some(tmp) = self.pending.get_mut().take() {
            if let Err(e) = self.fs.remove_file(&tmp) {
                tracing::debug!(file = %tmp.display(), "cannot remove an unused snapshot file: {e}");
            }
        }
        if let Some(handle) = self.handle.take() {
            close_later(handle);
        }
    }
}

impl FileInner {
    fn handle(&self) -> io::Result<&dyn FileHandle> {
        self.handle
            .as_deref()
            .ok_or_else(|| io::Error::other("the snapshot file is closed"))
    }
}

/// Closes `handle` on the `file-closer` thread (started on first use; inline if it cannot be).
///
/// A replaced or removed snapshot file is already unlinked while a handle keeps it readable, so
/// closing the last handle is what frees the file: its blocks and every page of it in the page
/// cache go in that `close`. For a snapshot of 1 GiB that took 750-1200 ms on the bench
/// machine, and raft-rs's driver, which drops the previous snapshot when it records a new one,
/// sent no heartbeats meanwhile: the followers elected another leader, whose next snapshot did
/// the same (the large-state bench voided every tikv run that way on a slow disk).
pub(crate) fn close_later(handle: Box<dyn FileHandle>) {
    use std::sync::mpsc::{channel, Sender};
    type Closer = Mutex<Sender<Box<dyn FileHandle>>>;
    static CLOSER: std::sync::OnceLock<Option<Closer>> = std::sync::OnceLock::new();
    let closer = CLOSER.get_or_init(|| {
        let (tx, rx) = channel::<Box<dyn FileHandle>>();
        let started = consensus_api::process::spawn_background("file-closer", move || {
            for handle in rx {
                drop(handle);
            }
        });
        match started {
            Ok(()) => Some(Mutex::new(tx)),
            Err(e) => {
                tracing::warn!("no file-closer thread ({e}): large files are closed inline");
                None
            }
        }
    });
    match closer {
        Some(tx) => {
            if let Err(back) = tx.lock().send(handle) {
                drop(back.0);
            }
        }
        None => drop(handle),
    }
}

/// A complete, checked snapshot file, read through an open handle: it stays readable (and the
/// same) after a newer snapshot replaces it. Cheap to clone.
#[derive(Clone)]
pub struct SnapshotFile {
    inner: Arc<FileInner>,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("len", &self.inner.len)
            .field("crc", &self.inner.crc)
            .field("installed", &self.is_installed())
            .finish()
    }
}

impl SnapshotFile {
    /// Opens `handle` (the file at `path` on `fs`) as a snapshot: checks the header and the
    /// checksum of the whole body in one streaming pass. `pending`: the temporary path of a
    /// file not yet installed (removed if the file is dropped uninstalled).
    pub(crate) fn verify(
        fs: Arc<dyn FileSystem>,
        handle: Box<dyn FileHandle>,
        path: &Path,
        pending: Option<PathBuf>,
    ) -> Result<Self> {
        Self::check(fs, handle, path, pending, None)
    }

    /// [`verify`](Self::verify) for a file whose body (everything after the header) was
    /// already hashed to `body_crc` by a reader of the same bytes (the build aside of a
    /// received file, [`crate::aside`]): the header is checked against it and the metadata
    /// read, but the body is not read again.
    pub(crate) fn verify_hashed(
        fs: Arc<dyn FileSystem>,
        handle: Box<dyn FileHandle>,
        path: &Path,
        pending: Option<PathBuf>,
        body_crc: u32,
    ) -> Result<Self> {
        Self::check(fs, handle, path, pending, Some(body_crc))
    }

    fn check(
        fs: Arc<dyn FileSystem>,
        handle: Box<dyn FileHandle>,
        path: &Path,
        pending: Option<PathBuf>,
        body_crc: Option<u32>,
    ) -> Result<Self> {
        let io = |e| StorageError::io("read", path, e);
        let len = handle.size().map_err(io)?;
        let mut head = [0u8; HEADER];
        if len < HEADER as u64 || read_exact_at(&*handle, &mut head, 0).is_err() {
            return Err(corrupt(path, "not a snapshot file (too short)"));
        }
        if &head[..8] != MAGIC {
            return Err(corrupt(path, "not a snapshot file (bad magic)"));
        }
        let meta_len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as u64;
        let crc = u32::from_le_bytes([head[12], head[13], head[14], head[15]]);
        if HEADER as u64 + meta_len > len {
            return Err(corrupt(path, "metadata length runs past the end"));
        }
        let mut meta = vec![0u8; meta_len as usize];
        read_exact_at(&*handle, &mut meta, HEADER as u64).map_err(io)?;
        let body = match body_crc {
            Some(hashed) => hashed,
            None => {
                let mut h = crc32fast::Hasher::new();
                let mut buf = vec![0u8; IO_BUF];
                let mut at = HEADER as u64;
                while at < len {
                    let n = handle.read_at(&mut buf, at).map_err(io)?;
                    if n == 0 {
                        return Err(corrupt(path, "file shorter than its size"));
                    }
                    h.update(&buf[..n]);
                    at += n as u64;
                }
                h.finalize()
            }
        };
        if body != crc {
            return Err(corrupt(path, "checksum mismatch"));
        }
        Ok(Self {
            inner: Arc::new(FileInner {
                fs,
                handle: Some(handle),
                meta: Bytes::from(meta),
                len,
                crc,
                pending: Mutex::new(pending),
                prepared: Mutex::new(None),
            }),
        })
    }

    /// The engine's metadata.
    pub fn meta(&self) -> &Bytes {
        &self.inner.meta
    }

    /// Size of the whole file in bytes (what a transfer moves).
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the file holds no state bytes (only the header and metadata).
    pub fn is_empty(&self) -> bool {
        self.data_len() == 0
    }

    /// Size of the state machine's bytes.
    pub fn data_len(&self) -> u64 {
        self.inner.len - HEADER as u64 - self.inner.meta.len() as u64
    }

    /// The checksum of the file's body (metadata and state), from its header.
    pub fn checksum(&self) -> u32 {
        self.inner.crc
    }

    /// Whether this is the store's `snapshot.bin` (or was, before a newer one replaced it),
    /// as opposed to a sealed or received file not yet installed.
    pub fn is_installed(&self) -> bool {
        self.inner.pending.lock().is_none()
    }

    /// Reads raw file bytes at `offset` (header included): what a transfer sends.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.inner.handle()?.read_at(buf, offset)
    }

    /// A buffered reader over the state machine's bytes, from the first to the last.
    pub fn data(&self) -> SnapshotReader {
        SnapshotReader {
            file: self.clone(),
            at: HEADER as u64 + self.inner.meta.len() as u64,
            buf: Vec::new(),
            pos: 0,
        }
    }

    /// The state built aside while this file was received ([`crate::aside`]), if any; taken
    /// once. An engine installing the file takes it and restores from the file only when
    /// [`PendingRestore::wait`] gives nothing.
    pub fn take_prepared(&self) -> Option<PendingRestore> {
        self.inner.prepared.lock().take()
    }

    /// Attaches the state being built aside from this (received) file.
    pub(crate) fn attach_prepared(&self, pending: PendingRestore) {
        *self.inner.prepared.lock() = Some(pending);
    }

    /// The state machine's bytes in one buffer (small states, tests).
    pub fn read_data(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.data_len() as usize);
        self.data()
            .read_to_end(&mut out)
            .map_err(|e| StorageError::Io {
                op: "read",
                path: "snapshot".into(),
                source: e,
            })?;
        Ok(out)
    }
}

fn read_exact_at(handle: &dyn FileHandle, buf: &mut [u8], mut at: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = handle.read_at(&mut buf[done..], at)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "snapshot file ends early",
            ));
        }
        done += n;
        at += n as u64;
    }
    Ok(())
}

/// Streams a snapshot's state bytes ([`SnapshotFile::data`]).
pub struct SnapshotReader {
    file: SnapshotFile,
    at: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for SnapshotReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            let left = self.file.inner.len.saturating_sub(self.at);
            if left == 0 {
                return Ok(0);
            }
            let want = (left as usize).min(IO_BUF);
            self.buf.resize(want, 0);
            let n = self.file.inner.handle()?.read_at(&mut self.buf, self.at)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "snapshot file ends early",
                ));
            }
            self.buf.truncate(n);
            self.at += n as u64;
            self.pos = 0;
        }
        let n = (self.buf.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::SimFs;
    use crate::Log;

    fn store(fs: &Arc<SimFs>) -> (Log, SnapshotStore) {
        let dir = Path::new("/snap-test");
        let log = Log::open_in(fs.clone(), dir, Default::default()).expect("open");
        let s = log.snapshot_store().expect("store");
        (log, s)
    }

    #[test]
    fn a_streamed_snapshot_is_installed_only_when_told_and_reads_back() {
        let fs = Arc::new(SimFs::new(7));
        let (_log, s) = store(&fs);
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut sink = s.create(b"meta").expect("create");
        for part in data.chunks(70_001) {
            sink.write_all(part).expect("write");
        }
        let file = sink.seal().expect("seal");
        assert!(!file.is_installed());
        assert!(s.current().expect("current").is_none(), "not installed yet");
        s.install(&file).expect("install");
        assert!(file.is_installed());
        let cur = s.current().expect("current").expect("a snapshot");
        assert_eq!(cur.meta().as_ref(), b"meta");
        assert_eq!(cur.read_data().expect("data"), data);
        assert_eq!(cur.checksum(), file.checksum());
        let (meta, loaded) = s.load().expect("load").expect("some");
        assert_eq!((meta.as_ref(), loaded.as_ref()), (&b"meta"[..], &data[..]));
    }

    #[test]
    fn an_open_snapshot_stays_readable_after_a_newer_one_replaces_it() {
        let fs = Arc::new(SimFs::new(8));
        let (_log, s) = store(&fs);
        s.save(b"old", b"old state").expect("save");
        let old = s.current().expect("current").expect("some");
        s.save(b"new", b"new state").expect("save");
        assert_eq!(old.read_data().expect("data"), b"old state");
        let new = s.current().expect("current").expect("some");
        assert_eq!(new.read_data().expect("data"), b"new state");
    }

    #[test]
    fn a_snapshot_file_dropped_uninstalled_is_removed_and_an_installed_one_stays() {
        let fs = Arc::new(SimFs::new(10));
        let (_log, s) = store(&fs);
        let temporaries = || {
            fs.list_dir(Path::new("/snap-test"))
                .expect("list")
                .into_iter()
                .filter(|p| p.to_string_lossy().ends_with(".tmp"))
                .count()
        };
        let unused = s.create(b"a").expect("create").seal().expect("seal");
        assert_eq!(temporaries(), 1);
        drop(unused);
        assert_eq!(temporaries(), 0, "an unused sealed file is removed");
        let kept = s.create(b"b").expect("create").seal().expect("seal");
        s.install(&kept).expect("install");
        drop(kept);
        let cur = s
            .current()
            .expect("current")
            .expect("the installed file stays");
        assert_eq!(cur.meta().as_ref(), b"b");
    }

    #[test]
    fn a_damaged_snapshot_is_refused_and_leftover_temporaries_go_at_open() {
        let fs = Arc::new(SimFs::new(9));
        let dir = Path::new("/snap-test");
        {
            let (_log, s) = store(&fs);
            s.save(b"m", &[7u8; 10_000]).expect("save");
            let mut sink = s.create(b"x").expect("create");
            sink.write_all(&[1u8; 1000]).expect("write");
            let sealed = sink.seal().expect("seal");
            std::mem::forget(sealed);
        }
        fs.flip_byte(&dir.join(FILE), 5_000).expect("flip");
        let (_log, s) = store(&fs);
        let leftovers = fs
            .list_dir(dir)
            .expect("list")
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .count();
        assert_eq!(leftovers, 0, "temporary files are removed at open");
        let err = s.current().expect_err("damage is refused");
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
