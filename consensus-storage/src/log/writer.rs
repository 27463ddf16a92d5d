//! The writer thread: the only code that writes the log file.
//!
//! [`Log`](super::Log) queues each accepted write as an [`Op::Write`] of encoded records, in
//! acceptance order. The writer takes everything queued at once, writes it as one `pwrite` and,
//! if any of it has a callback, makes it durable with one `fdatasync` before running the
//! callbacks (group commit: one sync covers every write before it). Between batches it rewrites
//! the file once most of it is dead. After the first failed write it stops writing: every later
//! callback gets that error, and the shared state records it so new writes are refused.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::{LogOptions, State, SyncCallback};
use crate::file::write_atomic;
use crate::{Result, StorageError};

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
    pub(super) _lock: File,
    pub(super) path: PathBuf,
    /// Opened without `O_APPEND`: records go at `len`, which may lie inside preallocated space
    /// (and `pwrite` ignores offsets on an `O_APPEND` file).
    pub(super) file: File,
    /// End of the valid records: where the next write goes.
    pub(super) len: u64,
    /// The file's size: zeros between `len` and here.
    pub(super) allocated: u64,
    pub(super) options: LogOptions,
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
        if state.index.live_bytes() * 2 > self.len {
            return Ok(());
        }
        // Holding the state lock: writes queued but not yet written are already in the index,
        // and replay treats their records as idempotent when they follow the rewritten file.
        let bytes = state.index.encode_all();
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
