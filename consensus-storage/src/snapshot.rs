//! [`SnapshotStore`]: the latest snapshot of a node, one file written atomically.
//!
//! Layout: `MAGIC (8) | meta_len: u32 LE | crc32(meta ++ data): u32 LE | meta | data`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::file::write_atomic_parts;
use crate::fs::FileSystem;
use crate::log::DirLock;
use crate::{Result, StorageError};

const MAGIC: &[u8; 8] = b"CSNAP001";
const FILE: &str = "snapshot.bin";

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
    pub(crate) fn new(fs: Arc<dyn FileSystem>, dir: &Path, lock: Arc<DirLock>) -> Self {
        Self {
            fs,
            dir: dir.to_path_buf(),
            _lock: lock,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Replaces the stored snapshot atomically; durable when it returns.
    pub fn save(&self, meta: &[u8], data: &[u8]) -> Result<()> {
        let mut header = Vec::with_capacity(16);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        let mut h = crc32fast::Hasher::new();
        h.update(meta);
        h.update(data);
        header.extend_from_slice(&h.finalize().to_le_bytes());
        // Written in parts: a large state is never copied into one more buffer.
        write_atomic_parts(&*self.fs, &self.path(), &[&header, meta, data])
            .map_err(|e| e.into_inner())
    }

    /// The stored snapshot as `(meta, data)`, or `None` when there is none. A damaged file is an
    /// error: snapshots are written atomically, so damage is never a torn write.
    pub fn load(&self) -> Result<Option<(Bytes, Bytes)>> {
        load(&*self.fs, &self.path())
    }

    /// Reads the snapshot stored in data directory `dir` without taking its lock (for
    /// inspection: offline dumps, tests). A node may be replacing it meanwhile; what is read is
    /// then either the old or the new snapshot, never a mix.
    pub fn peek(dir: &Path) -> Result<Option<(Bytes, Bytes)>> {
        load(&*crate::fs::for_path(dir), &dir.join(FILE))
    }
}

fn load(fs: &dyn FileSystem, path: &Path) -> Result<Option<(Bytes, Bytes)>> {
    {
        let path = path.to_path_buf();
        let buf = match fs.read(&path) {
            Ok(b) => Bytes::from(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StorageError::io("read", &path, e)),
        };
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path.display().to_string(),
            offset: 0,
            reason: reason.to_string(),
        };
        if buf.len() < 16 || &buf[..8] != MAGIC {
            return Err(corrupt("not a snapshot file (bad magic or too short)"));
        }
        let meta_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        let crc = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        if 16 + meta_len > buf.len() {
            return Err(corrupt("metadata length runs past the end"));
        }
        if crc32fast::hash(&buf[16..]) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        Ok(Some((
            buf.slice(16..16 + meta_len),
            buf.slice(16 + meta_len..),
        )))
    }
}
