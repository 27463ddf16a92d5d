//! Helpers over the [`FileSystem`](crate::fs::FileSystem) that make creation, replacement and
//! removal durable.

use std::path::Path;

use crate::fs::{FileSystem, OpenMode};
use crate::{Result, StorageError};

/// Fsyncs a directory so that entries created, renamed or removed in it survive a crash.
pub(crate) fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<()> {
    fs.sync_dir(dir)
        .map_err(|e| StorageError::io("fsync directory", dir, e))
}

/// Where [`write_atomic_parts`] failed: before the rename (the old file is intact and still
/// the one at `path`) or at or after it (the file at `path` is the new one, or may be).
#[derive(Debug)]
pub(crate) enum AtomicWriteError {
    /// Nothing changed at `path`.
    BeforeRename(StorageError),
    /// `path` was (or may have been) replaced, but the replacement may not be durable.
    AfterRename(StorageError),
}

impl AtomicWriteError {
    pub(crate) fn into_inner(self) -> StorageError {
        match self {
            AtomicWriteError::BeforeRename(e) | AtomicWriteError::AfterRename(e) => e,
        }
    }
}

/// Replaces `path` with `bytes` atomically: temp file, fsync, rename, fsync directory.
pub(crate) fn write_atomic(
    fs: &dyn FileSystem,
    path: &Path,
    bytes: &[u8],
) -> std::result::Result<(), AtomicWriteError> {
    write_atomic_parts(fs, path, &[bytes])
}

/// Like [`write_atomic`], with the content given as consecutive parts.
pub(crate) fn write_atomic_parts(
    fs: &dyn FileSystem,
    path: &Path,
    parts: &[&[u8]],
) -> std::result::Result<(), AtomicWriteError> {
    use AtomicWriteError::{AfterRename, BeforeRename};
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let f = fs
        .open(&tmp, OpenMode::Truncate)
        .map_err(|e| BeforeRename(StorageError::io("create", &tmp, e)))?;
    let mut at = 0u64;
    for part in parts {
        f.write_all_at(part, at)
            .map_err(|e| BeforeRename(StorageError::io("write", &tmp, e)))?;
        at += part.len() as u64;
    }
    f.sync_all()
        .map_err(|e| BeforeRename(StorageError::io("fsync", &tmp, e)))?;
    drop(f);
    fs.rename(&tmp, path)
        .map_err(|e| BeforeRename(StorageError::io("rename", path, e)))?;
    sync_dir(fs, dir).map_err(AfterRename)
}
