//! File-system helpers that make creation, replacement and removal durable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use crate::{Result, StorageError};

/// Fsyncs a directory so that entries created, renamed or removed in it survive a crash.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io("fsync directory", dir, e))
}

/// Replaces `path` with `bytes` atomically: temp file, fsync, rename, fsync directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// Like [`write_atomic`], with the content given as consecutive parts.
pub(crate) fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&tmp)
        .map_err(|e| StorageError::io("create", &tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut f);
    for part in parts {
        w.write_all(part)
            .map_err(|e| StorageError::io("write", &tmp, e))?;
    }
    w.flush().map_err(|e| StorageError::io("write", &tmp, e))?;
    drop(w);
    f.sync_all()
        .map_err(|e| StorageError::io("fsync", &tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| StorageError::io("rename", path, e))?;
    sync_dir(dir)
}
