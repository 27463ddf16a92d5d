//! [`SimFs`]: an in-memory disk that remembers what was made durable, and loses the rest at a
//! power cut.
//!
//! Each file has its current bytes (what reads see) and its durable bytes (what a sync made
//! durable), plus the pages written since its last sync. Each directory entry has a current and a
//! durable binding. [`SimFs::power_cut`] is a machine losing power:
//!
//! - directory entries go back to their durable binding: a create, rename or remove not
//!   followed by a sync of its directory is undone (or never happened);
//! - each unsynced page of each file independently survives whole, is lost (the durable
//!   content, zeros where there was none), or is torn (a random subset of its 512-byte sectors
//!   survives); a size change not made durable keeps either the old or the new size;
//! - every handle and lock taken before the cut is dead: each of its operations fails, so a
//!   writer thread that outlived its node's "machine" cannot touch the disk the restarted node
//!   uses;
//! - directories are durable as soon as they are created (a simplification: the store never
//!   relies on a directory it has not just created).
//!
//! The choices follow a seed, so a failing run replays. Faults can also be injected: the next
//! operations of a kind fail ([`SimFs::fail`]), writes to a file block until released
//! ([`SimFs::gate_writes`]), a durable byte rots ([`SimFs::flip_byte`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{normalize, FileHandle, FileSystem, LockGuard, OpenMode};

/// Granularity of what survives a power cut.
const PAGE: usize = 4096;
/// Granularity of a torn page.
const SECTOR: usize = 512;

/// The kinds of operation [`SimFs::fail`] can make fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SimOp {
    /// [`FileSystem::open`].
    Open,
    /// [`FileHandle::write_all_at`] and [`FileHandle::set_len`].
    Write,
    /// [`FileHandle::sync_data`] and [`FileHandle::sync_all`].
    SyncFile,
    /// [`FileSystem::sync_dir`].
    SyncDir,
    /// [`FileSystem::rename`].
    Rename,
    /// [`FileSystem::read`] and [`FileHandle::read_at`].
    Read,
}

/// What one [`SimFs::power_cut`] did, for the test log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CutReport {
    /// Files that had unsynced pages.
    pub files_touched: usize,
    /// Unsynced pages that survived whole.
    pub pages_kept: usize,
    /// Unsynced pages lost entirely.
    pub pages_lost: usize,
    /// Unsynced pages that survived in part.
    pub pages_torn: usize,
    /// Directory entries whose unsynced change was undone.
    pub entries_reverted: usize,
}

#[derive(Debug, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Pages written (or resized) since the last sync.
    dirty: BTreeSet<usize>,
}

impl Inode {
    fn mark(&mut self, from: usize, to: usize) {
        if to > from {
            self.dirty.extend(from / PAGE..to.div_ceil(PAGE));
        }
    }

    fn sync(&mut self) {
        let len = self.data.len();
        self.durable.resize(len, 0);
        for page in std::mem::take(&mut self.dirty) {
            let lo = page * PAGE;
            if lo < len {
                let hi = (lo + PAGE).min(len);
                self.durable[lo..hi].copy_from_slice(&self.data[lo..hi]);
            }
        }
    }

    fn lose_power(&mut self, rng: &mut StdRng, report: &mut CutReport) {
        if self.dirty.is_empty() && self.data.len() == self.durable.len() {
            return;
        }
        report.files_touched += 1;
        let len = if rng.gen_bool(0.5) {
            self.data.len()
        } else {
            self.durable.len()
        };
        let mut out = std::mem::take(&mut self.durable);
        out.resize(len, 0);
        for page in std::mem::take(&mut self.dirty) {
            let lo = page * PAGE;
            let hi = (lo + PAGE).min(len);
            if lo >= hi {
                continue;
            }
            match rng.gen_range(0..3) {
                0 => report.pages_lost += 1,
                1 => {
                    report.pages_kept += 1;
                    copy_from(&mut out, &self.data, lo, hi);
                }
                _ => {
                    report.pages_torn += 1;
                    let mut s = lo;
                    while s < hi {
                        let e = (s + SECTOR).min(hi);
                        if rng.gen_bool(0.5) {
                            copy_from(&mut out, &self.data, s, e);
                        }
                        s = e;
                    }
                }
            }
        }
        self.durable = out.clone();
        self.data = out;
    }
}

/// Copies `src[lo..hi]` into `out`, zeros where `src` is shorter.
fn copy_from(out: &mut [u8], src: &[u8], lo: usize, hi: usize) {
    for (i, b) in out[lo..hi].iter_mut().enumerate() {
        *b = src.get(lo + i).copied().unwrap_or(0);
    }
}

struct Disk {
    rng: StdRng,
    /// Bumped by every power cut: handles and locks of an older generation are dead.
    generation: u64,
    dirs: BTreeSet<PathBuf>,
    entries: BTreeMap<PathBuf, u64>,
    durable_entries: BTreeMap<PathBuf, u64>,
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    locks: HashMap<PathBuf, u64>,
    next_token: u64,
    /// Armed failures: kind, path suffix, how many more.
    faults: Vec<(SimOp, String, usize)>,
    cuts: u64,
}

impl Disk {
    fn fail_if_armed(&mut self, op: SimOp, path: &Path) -> io::Result<()> {
        let name = path.to_string_lossy();
        let armed = self
            .faults
            .iter_mut()
            .find(|(o, suffix, n)| *o == op && *n > 0 && name.ends_with(suffix.as_str()));
        match armed {
            Some((_, _, n)) => {
                *n -= 1;
                Err(io::Error::other(format!(
                    "injected failure of {op:?} on {}",
                    path.display()
                )))
            }
            None => Ok(()),
        }
    }

    fn check_parent(&self, path: &Path) -> io::Result<()> {
        match path.parent() {
            Some(p) if self.dirs.contains(p) => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no directory for {}", path.display()),
            )),
        }
    }

    fn inode(&mut self, path: &Path) -> io::Result<&mut Inode> {
        let ino = *self.entries.get(path).ok_or_else(|| not_found(path))?;
        self.inodes.get_mut(&ino).ok_or_else(|| not_found(path))
    }

    fn create(&mut self, path: &Path) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.inodes.insert(ino, Inode::default());
        self.entries.insert(path.to_path_buf(), ino);
        ino
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} not found", path.display()),
    )
}

fn dead() -> io::Error {
    io::Error::other("power was lost: this file handle belongs to the machine before the cut")
}

#[derive(Default)]
struct GateState {
    /// Writes to files whose path ends with this wait.
    suffix: Option<String>,
    /// Writes waiting now.
    blocked: usize,
}

type Gate = Arc<(Mutex<GateState>, Condvar)>;

/// One machine's disk, in memory; see the module docs. Cheap to clone (clones share the disk).
#[derive(Clone)]
pub struct SimFs {
    id: u64,
    seed: u64,
    disk: Arc<Mutex<Disk>>,
    gate: Gate,
    /// For a view of one process ([`SimFs::process`]): the power generation it lives in.
    /// Every call fails once a power cut ended it.
    process: Option<u64>,
}

impl fmt::Debug for SimFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SimFs#{}(seed {})", self.id, self.seed)
    }
}

impl SimFs {
    /// An empty disk whose power-cut choices follow `seed`.
    pub fn new(seed: u64) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        SimFs {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            seed,
            disk: Arc::new(Mutex::new(Disk {
                rng: StdRng::seed_from_u64(seed),
                generation: 0,
                dirs: BTreeSet::from([PathBuf::from("/")]),
                entries: BTreeMap::new(),
                durable_entries: BTreeMap::new(),
                inodes: HashMap::new(),
                next_ino: 1,
                locks: HashMap::new(),
                next_token: 1,
                faults: Vec::new(),
                cuts: 0,
            })),
            gate: Arc::default(),
            process: None,
        }
    }

    /// The disk as one process sees it: every call through this view (and every handle and
    /// lock it opens) fails after the next power cut, as the process would have died with
    /// the power. Without it a thread that outlived a cut (a log writer finishing a rewrite)
    /// could rename a file over the one the next process recovers, or reopen it and write at
    /// offsets of its own stale state.
    pub fn process(&self) -> SimFs {
        let generation = self.disk.lock().generation;
        SimFs {
            process: Some(generation),
            ..self.clone()
        }
    }

    /// Refuses a call from a process that a power cut ended.
    fn alive(&self, d: &Disk) -> io::Result<()> {
        match self.process {
            Some(g) if g != d.generation => Err(dead()),
            _ => Ok(()),
        }
    }

    /// The machine loses power: see the module docs for what survives.
    pub fn power_cut(&self) -> CutReport {
        let mut report = CutReport::default();
        let mut d = self.disk.lock();
        let d = &mut *d;
        d.generation += 1;
        d.cuts += 1;
        d.locks.clear();
        let all: BTreeSet<&PathBuf> = d.entries.keys().chain(d.durable_entries.keys()).collect();
        report.entries_reverted = all
            .into_iter()
            .filter(|p| d.entries.get(*p) != d.durable_entries.get(*p))
            .count();
        d.entries = d.durable_entries.clone();
        let live: BTreeSet<u64> = d.entries.values().copied().collect();
        d.inodes.retain(|ino, _| live.contains(ino));
        for ino in live {
            if let Some(inode) = d.inodes.get_mut(&ino) {
                inode.lose_power(&mut d.rng, &mut report);
            }
        }
        report
    }

    /// How many power cuts this disk has seen.
    pub fn cuts(&self) -> u64 {
        self.disk.lock().cuts
    }

    /// The next `count` operations of kind `op` fail with an I/O error.
    pub fn fail(&self, op: SimOp, count: usize) {
        self.fail_on(op, "", count);
    }

    /// The next `count` operations of kind `op` on paths ending with `suffix` fail.
    pub fn fail_on(&self, op: SimOp, suffix: &str, count: usize) {
        self.disk
            .lock()
            .faults
            .push((op, suffix.to_string(), count));
    }

    /// Until the returned gate is dropped, writes to files whose path ends with `suffix` block.
    pub fn gate_writes(&self, suffix: &str) -> WriteGate {
        self.gate.0.lock().suffix = Some(suffix.to_string());
        WriteGate {
            gate: self.gate.clone(),
        }
    }

    /// Flips the bits of the byte at `offset` of the file at `path`, durably (bit rot).
    pub fn flip_byte(&self, path: &Path, offset: u64) -> io::Result<()> {
        let path = normalize(path);
        let mut d = self.disk.lock();
        let inode = d.inode(&path)?;
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        if at >= inode.data.len() {
            return Err(io::Error::other("offset past the end"));
        }
        inode.data[at] ^= 0xff;
        if let Some(b) = inode.durable.get_mut(at) {
            *b ^= 0xff;
        }
        Ok(())
    }

    fn wait_gate(&self, path: &Path) {
        let (lock, cv) = &*self.gate;
        let mut g = lock.lock();
        let matches = |g: &GateState| {
            g.suffix
                .as_deref()
                .is_some_and(|s| path.to_string_lossy().ends_with(s))
        };
        if !matches(&g) {
            return;
        }
        g.blocked += 1;
        cv.notify_all();
        while matches(&g) {
            cv.wait(&mut g);
        }
        g.blocked -= 1;
    }
}

/// Holds writes to some files of a [`SimFs`] until dropped.
pub struct WriteGate {
    gate: Gate,
}

impl WriteGate {
    /// Waits until at least one write is blocked at the gate; false after `timeout`.
    pub fn wait_blocked(&self, timeout: Duration) -> bool {
        let (lock, cv) = &*self.gate;
        let mut g = lock.lock();
        let deadline = std::time::Instant::now() + timeout;
        while g.blocked == 0 {
            if cv.wait_until(&mut g, deadline).timed_out() {
                return g.blocked > 0;
            }
        }
        true
    }
}

impl Drop for WriteGate {
    fn drop(&mut self) {
        let (lock, cv) = &*self.gate;
        lock.lock().suffix = None;
        cv.notify_all();
    }
}

struct SimFile {
    fs: SimFs,
    path: PathBuf,
    ino: u64,
    generation: u64,
}

impl SimFile {
    fn with<R>(&self, op: SimOp, f: impl FnOnce(&mut Inode) -> io::Result<R>) -> io::Result<R> {
        let mut d = self.fs.disk.lock();
        if d.generation != self.generation {
            return Err(dead());
        }
        d.fail_if_armed(op, &self.path)?;
        // An unlinked file stays writable through its handle, as on a real file system.
        let inode = d
            .inodes
            .get_mut(&self.ino)
            .ok_or_else(|| not_found(&self.path))?;
        f(inode)
    }
}

impl FileHandle for SimFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fs.wait_gate(&self.path);
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        self.with(SimOp::Write, |i| {
            let end = at + buf.len();
            if i.data.len() < end {
                let old = i.data.len();
                i.data.resize(end, 0);
                i.mark(old, end);
            }
            i.data[at..end].copy_from_slice(buf);
            i.mark(at, end);
            Ok(())
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let at = usize::try_from(offset).map_err(io::Error::other)?;
        self.with(SimOp::Read, |i| {
            let Some(src) = i.data.get(at..) else {
                return Ok(0);
            };
            let n = src.len().min(buf.len());
            buf[..n].copy_from_slice(&src[..n]);
            Ok(n)
        })
    }

    fn size(&self) -> io::Result<u64> {
        self.with(SimOp::Read, |i| Ok(i.data.len() as u64))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.with(SimOp::Write, |i| {
            let old = i.data.len();
            i.data.resize(len, 0);
            i.mark(old.min(len), old.max(len));
            Ok(())
        })
    }

    fn sync_data(&self) -> io::Result<()> {
        self.with(SimOp::SyncFile, |i| {
            i.sync();
            Ok(())
        })
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }
}

struct SimLock {
    fs: SimFs,
    path: PathBuf,
    token: u64,
}

impl LockGuard for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut d = self.fs.disk.lock();
        if d.locks.get(&self.path) == Some(&self.token) {
            d.locks.remove(&self.path);
        }
    }
}

impl FileSystem for SimFs {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let dir = normalize(dir);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        for a in dir.ancestors() {
            d.dirs.insert(a.to_path_buf());
        }
        Ok(())
    }

    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Box<dyn FileHandle>> {
        let path = normalize(path);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        d.fail_if_armed(SimOp::Open, &path)?;
        let ino = match (d.entries.get(&path).copied(), mode) {
            (Some(ino), OpenMode::Truncate) => {
                let i = d.inodes.entry(ino).or_default();
                let old = i.data.len();
                i.data.clear();
                i.mark(0, old);
                ino
            }
            (Some(ino), _) => ino,
            (None, OpenMode::Existing) => return Err(not_found(&path)),
            (None, _) => {
                d.check_parent(&path)?;
                d.create(&path)
            }
        };
        let generation = self.process.unwrap_or(d.generation);
        Ok(Box::new(SimFile {
            fs: self.clone(),
            path,
            ino,
            generation,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let path = normalize(path);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        d.fail_if_armed(SimOp::Read, &path)?;
        Ok(d.inode(&path)?.data.clone())
    }

    fn list_dir(&self, dir: &Path) -> io::Result<Vec<PathBuf>> {
        let dir = normalize(dir);
        let d = self.disk.lock();
        self.alive(&d)?;
        if !d.dirs.contains(&dir) {
            return Err(not_found(&dir));
        }
        Ok(d.entries
            .keys()
            .filter(|p| p.parent() == Some(dir.as_path()))
            .cloned()
            .collect())
    }

    fn exists(&self, path: &Path) -> io::Result<bool> {
        let path = normalize(path);
        let d = self.disk.lock();
        self.alive(&d)?;
        Ok(d.entries.contains_key(&path) || d.dirs.contains(&path))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let (from, to) = (normalize(from), normalize(to));
        let mut d = self.disk.lock();
        self.alive(&d)?;
        d.fail_if_armed(SimOp::Rename, &from)?;
        d.check_parent(&to)?;
        let ino = d.entries.remove(&from).ok_or_else(|| not_found(&from))?;
        d.entries.insert(to, ino);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let path = normalize(path);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        d.entries.remove(&path).ok_or_else(|| not_found(&path))?;
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dir = normalize(dir);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        d.fail_if_armed(SimOp::SyncDir, &dir)?;
        if !d.dirs.contains(&dir) {
            return Err(not_found(&dir));
        }
        let d = &mut *d;
        let in_dir = |p: &PathBuf| p.parent() == Some(dir.as_path());
        d.durable_entries.retain(|p, _| !in_dir(p));
        for (p, ino) in d.entries.iter().filter(|(p, _)| in_dir(p)) {
            d.durable_entries.insert(p.clone(), *ino);
        }
        Ok(())
    }

    fn lock(&self, path: &Path) -> io::Result<Option<Box<dyn LockGuard>>> {
        let path = normalize(path);
        let mut d = self.disk.lock();
        self.alive(&d)?;
        if !d.entries.contains_key(&path) {
            d.check_parent(&path)?;
            d.create(&path);
        }
        if d.locks.contains_key(&path) {
            return Ok(None);
        }
        let token = d.next_token;
        d.next_token += 1;
        d.locks.insert(path.clone(), token);
        Ok(Some(Box::new(SimLock {
            fs: self.clone(),
            path,
            token,
        })))
    }

    fn for_process(&self) -> Arc<dyn FileSystem> {
        Arc::new(self.process())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs_with_dir() -> (SimFs, PathBuf) {
        let fs = SimFs::new(7);
        let dir = PathBuf::from("/data");
        fs.create_dir_all(&dir).unwrap();
        (fs, dir)
    }

    #[test]
    fn synced_data_and_synced_entries_survive_a_power_cut() {
        let (fs, dir) = fs_with_dir();
        let f = fs.open(&dir.join("a"), OpenMode::Create).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        fs.sync_dir(&dir).unwrap();
        fs.power_cut();
        assert_eq!(fs.read(&dir.join("a")).unwrap(), b"hello");
    }

    #[test]
    fn a_process_view_can_do_nothing_after_a_power_cut() {
        let (fs, dir) = fs_with_dir();
        let old = fs.process();
        let f = old.open(&dir.join("a"), OpenMode::Create).unwrap();
        f.write_all_at(b"x", 0).unwrap();
        fs.power_cut();
        // The thread of the process that lost power: no handle, no path-level call works.
        assert!(f.write_all_at(b"y", 0).is_err());
        assert!(old.open(&dir.join("b"), OpenMode::Create).is_err());
        assert!(old.rename(&dir.join("a"), &dir.join("c")).is_err());
        assert!(old.lock(&dir.join("LOCK")).is_err());
        assert!(!fs.exists(&dir.join("b")).unwrap());
        // The next process works.
        let new = fs.process();
        new.open(&dir.join("b"), OpenMode::Create).unwrap();
    }

    #[test]
    fn a_file_whose_directory_was_not_synced_is_gone_after_a_cut() {
        let (fs, dir) = fs_with_dir();
        let f = fs.open(&dir.join("a"), OpenMode::Create).unwrap();
        f.write_all_at(b"hello", 0).unwrap();
        f.sync_data().unwrap();
        let report = fs.power_cut();
        assert_eq!(report.entries_reverted, 1);
        assert!(!fs.exists(&dir.join("a")).unwrap());
    }

    #[test]
    fn an_unsynced_rename_is_undone_by_a_cut() {
        let (fs, dir) = fs_with_dir();
        for (name, body) in [("a", b"old"), ("tmp", b"new")] {
            let f = fs.open(&dir.join(name), OpenMode::Create).unwrap();
            f.write_all_at(body, 0).unwrap();
            f.sync_data().unwrap();
        }
        fs.sync_dir(&dir).unwrap();
        fs.rename(&dir.join("tmp"), &dir.join("a")).unwrap();
        assert_eq!(fs.read(&dir.join("a")).unwrap(), b"new");
        fs.power_cut();
        assert_eq!(fs.read(&dir.join("a")).unwrap(), b"old");
        assert_eq!(fs.read(&dir.join("tmp")).unwrap(), b"new");
    }

    #[test]
    fn unsynced_pages_survive_in_any_mix_and_handles_die_with_the_power() {
        let mut outcomes = BTreeSet::new();
        for seed in 0..64 {
            let fs = SimFs::new(seed);
            fs.create_dir_all(Path::new("/d")).unwrap();
            let f = fs.open(Path::new("/d/f"), OpenMode::Create).unwrap();
            f.write_all_at(&[1; PAGE], 0).unwrap();
            f.sync_data().unwrap();
            fs.sync_dir(Path::new("/d")).unwrap();
            f.write_all_at(&[2; 2 * PAGE], PAGE as u64).unwrap();
            fs.power_cut();
            let data = fs.read(Path::new("/d/f")).unwrap();
            assert_eq!(&data[..PAGE], &[1; PAGE][..], "synced page intact");
            assert!(data[PAGE..].iter().all(|b| *b == 0 || *b == 2));
            outcomes.insert((data.len(), data[PAGE..].iter().filter(|b| **b == 2).count()));
            assert!(
                f.write_all_at(b"x", 0).is_err(),
                "a handle from before the cut is dead"
            );
            assert!(f.sync_data().is_err());
        }
        assert!(outcomes.len() > 3, "cuts vary: {outcomes:?}");
    }

    #[test]
    fn locks_are_exclusive_and_die_with_the_power() {
        let (fs, dir) = fs_with_dir();
        let l = fs.lock(&dir.join("LOCK")).unwrap();
        assert!(l.is_some());
        assert!(fs.lock(&dir.join("LOCK")).unwrap().is_none());
        fs.power_cut();
        let again = fs.lock(&dir.join("LOCK")).unwrap();
        assert!(again.is_some());
        drop(l); // the dead guard must not release the new holder's lock
        assert!(fs.lock(&dir.join("LOCK")).unwrap().is_none());
    }

    #[test]
    fn injected_failures_hit_the_next_operations_of_their_kind() {
        let (fs, dir) = fs_with_dir();
        fs.fail(SimOp::SyncDir, 1);
        assert!(fs.sync_dir(&dir).is_err());
        assert!(fs.sync_dir(&dir).is_ok());
    }
}
