//! # consensus-storage: the durable log and snapshot store both backends share
//!
//! One append-only file of checksummed records holds a node's Raft log and its small metadata
//! (vote / hard state, committed index, ...); snapshots live in their own files, written
//! atomically. Both engines store their own encodings inside it, so the durability rules live in
//! one tested place:
//!
//! - every write is acknowledged only after `fdatasync` ([`Log::append`] completes its callback
//!   after the flush; a writer thread batches everything queued meanwhile into one write and one
//!   sync: group commit);
//! - the log keeps zero-filled space ahead of its end ([`LogOptions::preallocate_bytes`]) so a
//!   sync flushes data only, not the file size through the file-system journal;
//! - files are created, replaced and removed with the directory fsynced afterwards;
//! - each record carries a CRC32; on open a bad record at the tail is a torn write and is
//!   truncated (logged), while a bad record followed by a good one is corruption: [`Log::open`]
//!   refuses to start and says where;
//! - snapshots and the rewritten log go through temp file, fsync, rename, fsync directory;
//!   snapshots are written and read as streams ([`SnapshotSink`], [`SnapshotFile`]) and copied
//!   to peers in chunks ([`transfer`]), so a large state is never whole in memory; a receiver
//!   builds the state of an arriving snapshot while its chunks land ([`aside`]).

#![warn(missing_docs, unreachable_pub)]

pub mod aside;
mod file;
pub mod fs;
#[doc(hidden)]
pub mod fuzzing;
mod log;
mod metrics;
mod record;
mod snapshot;
pub mod transfer;

pub use log::{Entry, Log, LogOptions, LogState, LogView, SyncCallback};
pub use snapshot::{SnapshotFile, SnapshotReader, SnapshotSink, SnapshotStore};

/// Errors of the store. Every one names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The log is damaged before its tail; refusing to start instead of losing data.
    #[error("log {path} is corrupt at byte {offset}: {reason}; a valid record follows, so this is not a torn write. Restore the data dir from a peer (remove it and re-add the node) or from a backup")]
    Corrupt {
        /// The log file.
        path: String,
        /// Byte offset of the bad record.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A request the log cannot honour (a gap, an append below the purged prefix).
    #[error("invalid log operation: {0}")]
    Invalid(String),
    /// Another open log holds the data directory.
    #[error("data dir {0} is in use by another running node; stop it first")]
    Locked(String),
    /// The writer thread has stopped (after an I/O failure or shutdown).
    #[error("the log writer has stopped: {0}")]
    Stopped(String),
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.display().to_string(),
            source,
        }
    }
}

/// Result alias of this crate.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
