//! The file layer under the log and the snapshot store: the only place this crate touches files.
//!
//! Every file operation of [`Log`](crate::Log) and [`SnapshotStore`](crate::SnapshotStore) goes
//! through a [`FileSystem`]. Production runs [`OsFs`], the real file system. Tests can mount a
//! [`SimFs`] (an in-memory disk that remembers what was made durable and can lose power) at a
//! directory with [`mount`]: every log or snapshot store opened under that directory then uses
//! it, without any change to the code that opens them (the backends, the conformance suite).
//!
//! # What an implementation promises
//!
//! The durability rules the log relies on are the POSIX ones, and [`SimFs`] enforces exactly
//! these (nothing more survives a power cut):
//!
//! - data written to a file is durable once [`FileHandle::sync_data`] or
//!   [`FileHandle::sync_all`] of that file returned; a file's size follows its data;
//! - a directory entry created, replaced (rename) or removed is durable once
//!   [`FileSystem::sync_dir`] of its directory returned;
//! - whatever was not made durable may be lost at a power cut: entirely, partly (any subset of
//!   its pages, a page torn at sector granularity), or not at all;
//! - [`FileSystem::lock`] is exclusive among everyone using the same file system, and a lock is
//!   gone once its guard is dropped (or its holder's machine lost power).

mod os;
mod sim;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use parking_lot::Mutex;

pub use os::OsFs;
pub use sim::{SimFs, SimOp, WriteGate};

/// How [`FileSystem::open`] opens a file. Every mode opens for reading and writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// The file must exist.
    Existing,
    /// Created empty when missing; existing content is kept.
    Create,
    /// Created when missing; existing content is discarded.
    Truncate,
}

/// An open file. Writes go at explicit offsets (no append mode).
pub trait FileHandle: Send + Sync {
    /// Writes all of `buf` at `offset`, extending the file (with zeros up to `offset`) as needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads up to `buf.len()` bytes at `offset`; returns how many (0 at or past the end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// The file's current size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros) the file to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes the file's data (and its size) durable: `fdatasync`.
    fn sync_data(&self) -> io::Result<()>;
    /// Makes the file's data and metadata durable: `fsync`.
    fn sync_all(&self) -> io::Result<()>;
}

/// Proof of an exclusive [`FileSystem::lock`]; dropping it releases the lock.
pub trait LockGuard: Send + Sync {}

/// The file operations of the store; see the module docs for the durability contract.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Opens the file at `path`.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>>;
    /// The whole content of the file at `path` (`NotFound` when it does not exist).
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// The files directly inside directory `dir` (full paths, in no particular order).
    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>>;
    /// Whether a file exists at `path`.
    fn exists(&self, path: &Path) -> io::Result<bool>;
    /// Renames `from` to `to`, replacing `to` atomically.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes the file at `path`.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of directory `dir` (creations, renames, removals) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock of the file at `path` (created when missing). `Ok(None)` when
    /// someone else holds it.
    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>>;
    /// This file system as one process that opens a store sees it. A real process dies with
    /// a power cut; a simulated disk's power cut leaves the process's threads running, so the
    /// simulation answers every later call of this view with an error, path-level ones (open,
    /// rename, remove) included: a thread that outlived the cut cannot write into the disk the
    /// next process recovers from. The real file system is the same for every process.
    fn for_process(&self) -> Arc<dyn FileSystem>;
}

type Mounts = Mutex<Vec<(PathBuf, Arc<dyn FileSystem>)>>;

fn mounts() -> &'static Mounts {
    static MOUNTS: OnceLock<Mounts> = OnceLock::new();
    MOUNTS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Keeps a [`mount`] in place; dropping it unmounts.
#[must_use = "the file system is unmounted when the guard is dropped"]
pub struct MountGuard {
    root: PathBuf,
    fs: Arc<dyn FileSystem>,
}

impl fmt::Debug for MountGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountGuard")
            .field("root", &self.root)
            .finish()
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        mounts()
            .lock()
            .retain(|(root, fs)| !(root == &self.root && Arc::ptr_eq(fs, &self.fs)));
    }
}

/// Makes every log and snapshot store opened under `root` (in this process) use `fs` instead of
/// the real file system, until the guard is dropped. The innermost mount wins. For tests: a
/// [`SimFs`] per node's data dir gives each node its own disk that can lose power.
pub fn mount(root: &Path, fs: Arc<dyn FileSystem>) -> MountGuard {
    let root = normalize(root);
    mounts().lock().push((root.clone(), fs.clone()));
    MountGuard { root, fs }
}

/// The file system serving `path`: the innermost [`mount`] above it, else [`OsFs`].
pub fn for_path(path: &Path) -> Arc<dyn FileSystem> {
    let path = normalize(path);
    let mounts = mounts().lock();
    mounts
        .iter()
        .filter(|(root, _)| path.starts_with(root))
        .max_by_key(|(root, _)| root.components().count())
        .map(|(_, fs)| fs.for_process())
        .unwrap_or_else(|| Arc::new(OsFs))
}

/// `path` made absolute (against the current directory) with `.` and `..` resolved lexically,
/// so mounts match however a path is spelled.
pub(crate) fn normalize(path: &Path) -> PathBuf {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut out = PathBuf::new();
    for c in absolute.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_mount_serves_a_path_and_unmounting_restores_the_real_fs() {
        let outer = Arc::new(SimFs::new(1));
        let inner = Arc::new(SimFs::new(2));
        let g1 = mount(Path::new("/mnt-test/a"), outer.clone());
        let g2 = mount(Path::new("/mnt-test/a/b"), inner.clone());
        let served = |p: &str| format!("{:?}", for_path(Path::new(p)));
        assert_eq!(served("/mnt-test/a/b/c/../log"), format!("{inner:?}"));
        assert_eq!(served("/mnt-test/a/x"), format!("{outer:?}"));
        assert_eq!(served("/mnt-test/ab"), format!("{:?}", OsFs));
        drop(g2);
        assert_eq!(served("/mnt-test/a/b/log"), format!("{outer:?}"));
        drop(g1);
        assert_eq!(served("/mnt-test/a/b/log"), format!("{:?}", OsFs));
    }
}
