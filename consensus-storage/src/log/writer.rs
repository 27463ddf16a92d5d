//! The writer thread: the only code that writes the log file.
//!
//! [`Log`](super::Log) queues each accepted write as an [`Op::Write`] of encoded records, in
//! acceptance order. The writer takes everything queued at once, writes it as one `pwrite` and,
//! if any of it has a callback, makes it durable with one `fdatasync` before running the
//! callbacks (group commit: one sync covers every write before it). The first write after a sync
//! starts with a sync mark ([`Record::Synced`]), which tells replay where acknowledged data ends.
//! Between batches it rewrites the file once most of it is dead. After the first failed write it
//! stops writing: every later callback gets that error, and the shared state records it so new
//! writes are refused. A rewrite that fails after its rename stops the writer the same way: the
//! file it holds open may no longer be the log's.

use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::{DirLock, LogOptions, State, SyncCallback};
use crate::file::{write_atomic, AtomicWriteError};
use crate::fs::{FileHandle, FileSystem, OpenMode};
use crate::metrics::StorageMetrics;
use crate::record::Record;
use crate::StorageError;

/// What the log asks of its writer.
pub(super) enum Op {
    /// Write these encoded records after everything before; run the callback once durable.
    Write(Vec<u8>, Option<SyncCallback>),
    /// Sync what was written, then exit and signal the sender.
    Stop(mpsc::Sender<()>),
}

/// Source of zeros for preallocation.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// The writer thread's state: the open file and where its records end.
pub(super) struct Writer {
    /// The log's shared state: read for rewrites, and told of a failure.
    pub(super) state: Arc<Mutex<State>>,
    /// Exclusive lock on the data directory, held for as long as the writer runs.
    pub(super) _lock: Arc<DirLock>,
    pub(super) fs: Arc<dyn FileSystem>,
    pub(super) path: PathBuf,
    /// Records go at `len`, which may lie inside preallocated space: explicit offsets only.
    pub(super) file: Box<dyn FileHandle>,
    /// End of the valid records: where the next write goes.
    pub(super) len: u64,
    /// Everything before this offset is durable.
    pub(super) synced: u64,
    /// Offset of the last sync mark written.
    pub(super) marked: Option<u64>,
    /// The file's size: zeros between `len` and here.
    pub(super) allocated: u64,
    pub(super) options: LogOptions,
    pub(super) metrics: StorageMetrics,
}

impl Writer {
    /// Starts the thread that runs the writer until `rx` closes or asks it to stop.
    pub(super) fn spawn(self, rx: mpsc::Receiver<Op>) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || self.run(rx))
    }

    fn run(mut self, rx: mpsc::Receiver<Op>) {
        let mut failed: Option<String> = None;
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            ops.extend(rx.try_iter());
            if self.flush(ops, &mut failed) {
                return;
            }
            if failed.is_none() && self.rewrite_due() && self.rewrite(&rx, &mut failed) {
                return;
            }
        }
    }

    /// Writes `ops` as one batch (synced when any of them waits), runs their callbacks, and
    /// says whether one of them asked the writer to stop.
    fn flush(&mut self, ops: Vec<Op>, failed: &mut Option<String>) -> bool {
        let mut callbacks = Vec::with_capacity(ops.len());
        let mut stop = None;
        let mut buf = Vec::new();
        let mut writes = 0u32;
        for op in ops {
            match op {
                Op::Write(bytes, cb) => {
                    writes += 1;
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
        // Nobody waits on a batch without callbacks: write it, and let the next sync (or the
        // one at close) make it durable.
        let sync = !callbacks.is_empty() || stop.is_some();
        if writes > 0 {
            self.metrics.batch_writes.record(writes);
            self.metrics.write_bytes.increment(buf.len() as u64);
        }
        let result = match failed.as_ref() {
            Some(e) => Err(e.clone()),
            None => self.write(&buf, sync),
        };
        if let Err(e) = &result {
            if failed.is_none() {
                tracing::error!(path = %self.path.display(), "log write failed: {e}");
                self.fail(failed, e.clone());
            }
        }
        for cb in callbacks {
            cb(result.clone());
        }
        match stop {
            Some(done) => {
                let _ = done.send(());
                true
            }
            None => false,
        }
    }

    fn fail(&self, failed: &mut Option<String>, e: String) {
        *failed = Some(e.clone());
        self.state.lock().failed = Some(e);
    }

    /// Whether the file is large and mostly dead.
    fn rewrite_due(&self) -> bool {
        self.len >= self.options.rewrite_min_bytes
            && self.state.lock().index.live_bytes() * 2 <= self.len
    }

    /// Replaces the file by the live records; says whether a queued op asked to stop.
    ///
    /// The new file is the index as it stands, which includes every write accepted so far,
    /// also those still queued. So the queued writes are taken off the queue (under the state
    /// lock, which every acceptance holds, so nothing slips in between) and not written at all:
    /// the rewritten file holds their effect, and their callbacks run once it is durable.
    /// (Writing their records after the rewritten state would replay them onto a state that
    /// already has them, which is wrong for a queued append followed by a queued truncate.)
    ///
    /// The lock is held only to take that point in time, not while the file is written and
    /// synced: reads are served from the in-memory index, and writes accepted meanwhile wait
    /// on the queue and go into the new file after it, in order. (Holding it stalled every
    /// append of the engine for as long as the rewrite took: seconds with a large log, enough
    /// to lose the leadership.)
    fn rewrite(&mut self, rx: &mpsc::Receiver<Op>, failed: &mut Option<String>) -> bool {
        let (queued, index) = {
            let guard = self.state.lock();
            let queued: Vec<Op> = rx.try_iter().collect();
            // Entries share their bytes: the copy is a list of references.
            (queued, guard.index.clone())
        };
        let bytes = index.encode_all();
        drop(index);
        let result = self.replace_file(&bytes);
        match result {
            Ok(()) => {
                tracing::info!(path = %self.path.display(), to = bytes.len(), "log rewritten");
                let mut stop = false;
                for op in queued {
                    match op {
                        Op::Write(_, cb) => cb.into_iter().for_each(|cb| cb(Ok(()))),
                        Op::Stop(done) => {
                            let _ = done.send(());
                            stop = true;
                        }
                    }
                }
                stop
            }
            Err(AtomicWriteError::BeforeRename(e)) => {
                tracing::warn!(path = %self.path.display(), "log rewrite failed, keeping the old file: {e}");
                // The old file is intact: the queued writes go into it as usual.
                !queued.is_empty() && self.flush(queued, failed)
            }
            Err(AtomicWriteError::AfterRename(e)) => {
                // The file at the log's path is (or may durably be) the rewritten one, while
                // this writer may hold the old one open: writing on would put acknowledged
                // records where a restart never reads them.
                let e = format!("log rewrite failed after replacing the file: {e}");
                tracing::error!(path = %self.path.display(), "{e}; the log stops");
                self.fail(failed, e);
                !queued.is_empty() && self.flush(queued, failed)
            }
        }
    }

    fn write(&mut self, buf: &[u8], sync: bool) -> std::result::Result<(), String> {
        let mut marked;
        let buf = if !buf.is_empty()
            && self.len > 0
            && self.synced == self.len
            && self.marked != Some(self.len)
        {
            // First write since everything was made durable: a mark says so to replay.
            marked = Vec::with_capacity(buf.len() + 32);
            Record::Synced { offset: self.len }.encode_into(&mut marked);
            marked.extend_from_slice(buf);
            self.marked = Some(self.len);
            &marked[..]
        } else {
            buf
        };
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
        let started = std::time::Instant::now();
        self.file
            .sync_data()
            .map_err(|e| format!("fdatasync {}: {e}", self.path.display()))?;
        self.metrics.fsync_seconds.record(started.elapsed());
        self.metrics.fsyncs.increment(1);
        self.synced = self.len;
        Ok(())
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

    /// Replaces the log file by `bytes` (the live records) and continues in the new one.
    fn replace_file(&mut self, bytes: &[u8]) -> std::result::Result<(), AtomicWriteError> {
        write_atomic(&*self.fs, &self.path, bytes)?;
        self.file = self.fs.open(&self.path, OpenMode::Existing).map_err(|e| {
            AtomicWriteError::AfterRename(StorageError::io("reopen", &self.path, e))
        })?;
        self.len = bytes.len() as u64;
        self.synced = self.len;
        self.marked = None;
        self.allocated = self.len;
        Ok(())
    }
}
