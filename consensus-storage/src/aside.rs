//! Restoring a snapshot while it arrives: the state of a snapshot a peer sends is built aside
//! ([`ByteStateMachine::prepare_restore`](consensus_api::ByteStateMachine::prepare_restore)) by
//! a thread that reads the receiver's temporary file as its chunks land, so the restore overlaps
//! the copy instead of following it (with 1 GiB of state it took about 2 s after the copy).
//!
//! The thread reads only the prefix of the file whose chunks are all written, waits for more,
//! and hashes everything after the header as it reads. Once the file is complete, the
//! receiver checks it against that hash ([`Follower::body_crc`]) instead of reading it all
//! again (falling back to the full read when the thread has not read everything). What it built travels with the checked
//! file ([`SnapshotFile::take_prepared`](crate::SnapshotFile::take_prepared)), and
//! [`PendingRestore::wait`] gives it to the engine only if the thread read exactly that file's
//! body and its hash is the file's checksum; in every other case (a chunk written again after it
//! was read, a state machine that stopped reading early, any error, a state machine that does
//! not build aside) the engine restores from the file as before. Dropping the receiver's handle
//! (the transfer was abandoned or replaced) or the pending restore cancels the thread.

use std::io::{self, BufRead, BufReader, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus_api::{ConsensusError, PreparedRestore};
use parking_lot::{Condvar, Mutex};

use crate::fs::FileHandle;
use crate::snapshot::{HEADER, IO_BUF, MAGIC};
use crate::SnapshotFile;

/// Builds a state aside from a snapshot's state bytes (what
/// [`SnapshotFile::data`](crate::SnapshotFile::data) yields): the backend's part (it may read
/// an envelope of its own first), ending in the state machine's
/// [`prepare_restore`](consensus_api::ByteStateMachine::prepare_restore).
pub type Preparer =
    Arc<dyn Fn(&mut dyn Read) -> Result<Option<PreparedRestore>, ConsensusError> + Send + Sync>;

/// How much of the file has arrived, as the thread sees it.
struct Progress {
    /// Bytes from the start of the file that are written.
    available: u64,
    /// The first chunk not yet counted in `available`.
    next_chunk: u64,
    /// The file's length: known from the start for a file, at its end for a stream.
    len: Option<u64>,
    cancelled: bool,
}

impl Progress {
    /// Counts the chunks written so far (`have`) into `available`; whether it moved.
    fn count(&mut self, chunk: u64, have: impl Fn(u64) -> bool) -> bool {
        let before = self.available;
        let end = self.len.unwrap_or(u64::MAX);
        while self.next_chunk.saturating_mul(chunk) < end && have(self.next_chunk) {
            self.next_chunk += 1;
        }
        self.available = self.next_chunk.saturating_mul(chunk).min(end);
        self.available != before
    }
}

struct Feed {
    progress: Mutex<Progress>,
    moved: Condvar,
    chunk: u64,
    /// A stream's metadata length (its header is written only at its end); `None` for a file,
    /// whose header is read.
    meta_len: Option<u64>,
}

impl Feed {
    fn cancel(&self) {
        self.progress.lock().cancelled = true;
        self.moved.notify_all();
    }
}

/// What the thread built, and over which bytes.
struct Built {
    state: Option<PreparedRestore>,
    /// Hash of the body bytes read (everything after the header).
    crc: u32,
    /// Whether the thread read the body to the end of the file and the state machine consumed
    /// all of it.
    whole: bool,
    /// Whether the thread read the body to the end of the file (`crc` covers all of it),
    /// whatever the state machine did with it.
    read_all: bool,
}

#[derive(Default)]
struct Outcome {
    slot: Mutex<Option<Result<Built, String>>>,
    done: Condvar,
}

/// The receiver's handle on a restore following a file being received. Dropping it cancels
/// the restore (unless it was handed on with [`Follower::into_pending`]).
pub(crate) struct Follower {
    feed: Arc<Feed>,
    outcome: Arc<Outcome>,
    handed: bool,
}

impl Follower {
    /// Starts a thread building the state of the file being received into `handle`, in chunks
    /// of `chunk`: a file of `len` bytes (`Some`; `have` says which chunks are already
    /// written), or a stream (`len` and `have` come with [`arrived`](Self::arrived) and
    /// [`ended`](Self::ended); its header is written last, so `meta_len` gives the metadata's
    /// length). `None` when no thread can be started (the engine then restores from the file).
    pub(crate) fn start(
        preparer: Preparer,
        handle: Arc<dyn FileHandle>,
        len: Option<u64>,
        meta_len: Option<u64>,
        chunk: u64,
        have: impl Fn(u64) -> bool,
    ) -> Option<Self> {
        let feed = Arc::new(Feed {
            progress: Mutex::new(Progress {
                available: 0,
                next_chunk: 0,
                len,
                cancelled: false,
            }),
            moved: Condvar::new(),
            chunk: chunk.max(1),
            meta_len,
        });
        let outcome = Arc::new(Outcome::default());
        let follower = Self {
            feed: feed.clone(),
            outcome: outcome.clone(),
            handed: false,
        };
        follower.arrived(have);
        let started = consensus_api::process::spawn_background("snapshot-restore", move || {
            // A panicking state machine must not leave the engine waiting for the outcome.
            let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                build(&preparer, feed, handle)
            }))
            .unwrap_or_else(|_| Err("the state machine panicked building the state aside".into()));
            if let Err(e) = &built {
                tracing::debug!("building a received snapshot's state aside stopped: {e}");
            }
            *outcome.slot.lock() = Some(built);
            outcome.done.notify_all();
        });
        match started {
            Ok(()) => Some(follower),
            Err(e) => {
                tracing::warn!("no thread to restore a snapshot while it arrives: {e}");
                None
            }
        }
    }

    /// Counts the chunks written so far (`have`) into what the thread may read. Of a stream,
    /// pass only whole chunks until it [`ended`](Self::ended).
    pub(crate) fn arrived(&self, have: impl Fn(u64) -> bool) {
        let moved = self.feed.progress.lock().count(self.feed.chunk, have);
        if moved {
            self.feed.moved.notify_all();
        }
    }

    /// A stream ended at `len` bytes, every chunk written (`have`).
    pub(crate) fn ended(&self, len: u64, have: impl Fn(u64) -> bool) {
        let mut p = self.feed.progress.lock();
        p.len = Some(len);
        p.count(self.feed.chunk, have);
        drop(p);
        self.feed.moved.notify_all();
    }

    /// The checksum of the whole file body (everything after the header, `len` bytes of file
    /// in all) as the thread read it, once it has read all of it, waiting at most `wait` for
    /// the thread to finish; `None` if it did not read the body to the end in that time (it
    /// stopped early, failed, or is still building). Chunks are never written twice, and the
    /// thread reads only chunks already written, so the file holds what it hashed: the
    /// receiver checks the file against this instead of reading it all again.
    pub(crate) fn body_crc(&self, len: u64, wait: Duration) -> Option<u32> {
        let deadline = Instant::now() + wait;
        let mut slot = self.outcome.slot.lock();
        while slot.is_none() {
            if self
                .outcome
                .done
                .wait_until(&mut slot, deadline)
                .timed_out()
            {
                break;
            }
        }
        match &*slot {
            Some(Ok(built)) if built.read_all && self.feed.progress.lock().len == Some(len) => {
                Some(built.crc)
            }
            _ => None,
        }
    }

    /// The restore, to travel with the file once it is complete and checked.
    pub(crate) fn into_pending(mut self) -> PendingRestore {
        self.handed = true;
        PendingRestore {
            feed: self.feed.clone(),
            outcome: self.outcome.clone(),
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if !self.handed {
            self.feed.cancel();
        }
    }
}

/// A state being built aside from a received snapshot file; see the module docs. Dropping it
/// cancels the build.
pub struct PendingRestore {
    feed: Arc<Feed>,
    outcome: Arc<Outcome>,
}

impl std::fmt::Debug for PendingRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingRestore")
    }
}

impl PendingRestore {
    /// Waits (blocking) for the build, and gives its state if it is the state of `file`: the
    /// build read exactly `file`'s body, and what it read hashes to `file`'s checksum. `None`
    /// otherwise (say why in the log): the caller restores from `file` instead.
    pub fn wait(self, file: &SnapshotFile) -> Option<PreparedRestore> {
        let built = {
            let mut slot = self.outcome.slot.lock();
            loop {
                if let Some(b) = slot.take() {
                    break b;
                }
                self.outcome.done.wait(&mut slot);
            }
        };
        let why = match built {
            Ok(Built {
                state: Some(state),
                crc,
                whole: true,
                ..
            }) if crc == file.checksum() && self.feed.progress.lock().len == Some(file.len()) => {
                tracing::info!(
                    bytes = file.len(),
                    "installing the state built while the snapshot arrived"
                );
                return Some(state);
            }
            Ok(Built { state: None, .. }) => return None,
            Ok(Built { whole: false, .. }) => "the state machine did not read it to its end".into(),
            Ok(Built { crc, .. }) => format!(
                "it read other bytes than the file holds (crc {crc:08x}, the file's {:08x})",
                file.checksum()
            ),
            Err(e) => e,
        };
        tracing::info!(
            "restoring the snapshot from its file: the state built aside is unusable: {why}"
        );
        None
    }
}

impl Drop for PendingRestore {
    fn drop(&mut self) {
        self.feed.cancel();
    }
}

/// Reads the file being received, only where it is written, hashing its body.
struct TailReader {
    feed: Arc<Feed>,
    handle: Arc<dyn FileHandle>,
    at: u64,
    hasher: crc32fast::Hasher,
}

impl Read for TailReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let available = {
            let mut p = self.feed.progress.lock();
            loop {
                if p.cancelled {
                    return Err(io::Error::other("the snapshot transfer was abandoned"));
                }
                if p.len.is_some_and(|len| self.at >= len) {
                    return Ok(0);
                }
                if p.available > self.at {
                    break p.available;
                }
                self.feed.moved.wait(&mut p);
            }
        };
        let n = (available - self.at).min(buf.len() as u64) as usize;
        let got = self.handle.read_at(&mut buf[..n], self.at)?;
        if got == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the received snapshot file is shorter than what arrived",
            ));
        }
        let skip = (HEADER as u64).saturating_sub(self.at).min(got as u64) as usize;
        self.hasher.update(&buf[skip..got]);
        self.at += got as u64;
        Ok(got)
    }
}

/// The thread's work: the header, the metadata, then the state through `preparer`.
fn build(
    preparer: &Preparer,
    feed: Arc<Feed>,
    handle: Arc<dyn FileHandle>,
) -> Result<Built, String> {
    let announced = feed.meta_len;
    let mut raw = TailReader {
        feed,
        handle,
        at: 0,
        hasher: crc32fast::Hasher::new(),
    };
    let io = |e: io::Error| format!("reading the arriving snapshot: {e}");
    let mut head = [0u8; HEADER];
    raw.read_exact(&mut head).map_err(io)?;
    // A stream's header is zeros until its end: its metadata length came with its start.
    let meta_len = match announced {
        Some(n) => n,
        None if &head[..8] != MAGIC => return Err("not a snapshot file (bad magic)".into()),
        None => u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
    };
    let skipped = io::copy(&mut (&mut raw).take(meta_len), &mut io::sink()).map_err(io)?;
    if skipped != meta_len {
        return Err("metadata length runs past the end".into());
    }
    let mut source = BufReader::with_capacity(IO_BUF, &mut raw);
    let state = preparer(&mut source).map_err(|e| e.to_string())?;
    // Whatever the state machine left unread counts against it.
    let consumed = state.is_none() || source.fill_buf().map_err(io)?.is_empty();
    drop(source);
    let len = raw.feed.progress.lock().len;
    let read_all = Some(raw.at) == len;
    Ok(Built {
        state,
        whole: consumed && read_all,
        read_all,
        crc: raw.hasher.finalize(),
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::fs::{FileSystem, OpenMode, SimFs};
    use crate::Log;

    const CHUNK: u64 = 4096;

    /// A preparer that keeps the state bytes it read (`upto`: stops after that many).
    fn keeping(upto: Option<usize>) -> Preparer {
        Arc::new(move |source: &mut dyn Read| {
            let mut got = Vec::new();
            match upto {
                Some(n) => source.take(n as u64).read_to_end(&mut got),
                None => source.read_to_end(&mut got),
            }
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
            Ok(Some(PreparedRestore::new(got)))
        })
    }

    /// A sealed snapshot's raw bytes (header included) and its state bytes.
    fn snapshot_bytes(fs: &Arc<SimFs>, dir: &str, len: usize) -> (Vec<u8>, Vec<u8>, Log) {
        let log = Log::open_in(fs.clone(), Path::new(dir), Default::default()).expect("open");
        let store = log.snapshot_store().expect("store");
        let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
        let mut sink = store.create(b"meta").expect("create");
        sink.write_all(&data).expect("write");
        let file = sink.seal().expect("seal");
        let mut raw = vec![0u8; file.len() as usize];
        let mut at = 0;
        while at < raw.len() {
            at += file.read_at(&mut raw[at..], at as u64).expect("read");
        }
        (raw, data, log)
    }

    /// A file being received: its handle, and how to mark chunks written.
    struct Receiving {
        fs: Arc<SimFs>,
        path: std::path::PathBuf,
        handle: Arc<dyn FileHandle>,
        len: u64,
        have: Vec<bool>,
    }

    impl Receiving {
        fn new(fs: &Arc<SimFs>, path: &str, len: usize) -> Self {
            fs.create_dir_all(Path::new(path).parent().expect("parent"))
                .expect("dir");
            let handle: Arc<dyn FileHandle> = fs
                .open(Path::new(path), OpenMode::Truncate)
                .expect("open")
                .into();
            Self {
                fs: fs.clone(),
                path: path.into(),
                handle,
                len: len as u64,
                have: vec![false; (len as u64).div_ceil(CHUNK) as usize],
            }
        }

        fn write(&mut self, raw: &[u8], chunk: usize, follower: &Follower) {
            let at = chunk * CHUNK as usize;
            let end = (at + CHUNK as usize).min(raw.len());
            self.handle
                .write_all_at(&raw[at..end], at as u64)
                .expect("write");
            self.have[chunk] = true;
            follower.arrived(|i| self.have.get(i as usize).copied().unwrap_or(false));
        }

        /// Writes every chunk of `raw`, in order.
        fn write_all(&mut self, raw: &[u8], follower: &Follower) {
            for c in 0..self.have.len() {
                self.write(raw, c, follower);
            }
        }

        /// A build following this file from its start.
        fn follow(&self, preparer: Preparer) -> Follower {
            let len = Some(self.len);
            Follower::start(preparer, self.handle.clone(), len, None, CHUNK, |_| false)
                .expect("started")
        }

        fn checked(&self) -> SnapshotFile {
            let handle = self.fs.open(&self.path, OpenMode::Existing).expect("open");
            SnapshotFile::verify(self.fs.clone(), handle, &self.path, None).expect("a valid file")
        }
    }

    /// Whether the build ended within a deadline.
    fn finished(outcome: &Outcome) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut slot = outcome.slot.lock();
        while slot.is_none() {
            if outcome.done.wait_until(&mut slot, deadline).timed_out() {
                return slot.is_some();
            }
        }
        true
    }

    #[test]
    fn the_state_is_built_from_chunks_arriving_in_any_order() {
        let fs = Arc::new(SimFs::new(7));
        let (raw, data, _log) = snapshot_bytes(&fs, "/a1", 10 * CHUNK as usize + 123);
        let mut r = Receiving::new(&fs, "/b1/in.tmp", raw.len());
        let f = r.follow(keeping(None));
        let chunks = r.have.len();
        // Last first, then the rest backwards: the build waits for the prefix each time.
        for c in (0..chunks).rev() {
            r.write(&raw, c, &f);
        }
        let file = r.checked();
        let state = f.into_pending().wait(&file).expect("the state built aside");
        assert_eq!(state.downcast::<Vec<u8>>().expect("bytes"), data);
    }

    #[test]
    fn a_state_built_from_other_bytes_than_the_checked_file_is_not_given() {
        let fs = Arc::new(SimFs::new(8));
        let (raw, _data, _log) = snapshot_bytes(&fs, "/a2", 6 * CHUNK as usize);
        let mut r = Receiving::new(&fs, "/b2/in.tmp", raw.len());
        let f = r.follow(keeping(None));
        let outcome = f.outcome.clone();
        // Chunk 2 first arrives damaged, and the build reads it so.
        let mut damaged = raw.clone();
        damaged[2 * CHUNK as usize + 10] ^= 0xff;
        r.write_all(&damaged, &f);
        assert!(finished(&outcome), "the build never ended");
        // Then the right bytes are written over it: the file checks, the build does not match.
        r.write(&raw, 2, &f);
        let file = r.checked();
        assert!(f.into_pending().wait(&file).is_none());
    }

    #[test]
    fn a_build_that_read_the_whole_body_gives_the_checksum_the_file_is_checked_against() {
        let fs = Arc::new(SimFs::new(11));
        let (raw, _data, _log) = snapshot_bytes(&fs, "/a5", 5 * CHUNK as usize + 7);
        let mut r = Receiving::new(&fs, "/b5/in.tmp", raw.len());
        let f = r.follow(keeping(None));
        // Not all there yet: no checksum, after the wait.
        r.write(&raw, 0, &f);
        assert_eq!(f.body_crc(r.len, Duration::from_millis(50)), None);
        for c in 1..r.have.len() {
            r.write(&raw, c, &f);
        }
        let file = r.checked();
        let body = f.body_crc(r.len, Duration::from_secs(20));
        assert_eq!(body, Some(file.checksum()));
        // What the receiver does with it: the header must agree, the body is not read.
        let open = || r.fs.open(&r.path, OpenMode::Existing).expect("open");
        let hashed =
            SnapshotFile::verify_hashed(r.fs.clone(), open(), &r.path, None, file.checksum());
        assert_eq!(hashed.expect("checks").checksum(), file.checksum());
        let other = file.checksum() ^ 1;
        assert!(SnapshotFile::verify_hashed(r.fs.clone(), open(), &r.path, None, other).is_err());
        // The checksum is only looked at: the state is still given.
        assert!(f.into_pending().wait(&file).is_some());
    }

    #[test]
    fn a_build_that_read_other_bytes_or_not_all_of_them_gives_no_usable_checksum() {
        let fs = Arc::new(SimFs::new(12));
        let (raw, _data, _log) = snapshot_bytes(&fs, "/a6", 4 * CHUNK as usize);
        // A state machine that does not build aside reads only the header and metadata.
        let mut r = Receiving::new(&fs, "/b6/in.tmp", raw.len());
        let f = r.follow(Arc::new(|_: &mut dyn Read| Ok(None)));
        r.write_all(&raw, &f);
        assert_eq!(f.body_crc(r.len, Duration::from_secs(20)), None);
        // A chunk damaged on the way: the build hashes what the file holds, and the header's
        // checksum (the sender's) does not match it.
        let mut damaged = raw.clone();
        damaged[CHUNK as usize + 3] ^= 0x10;
        let mut r = Receiving::new(&fs, "/b6/in2.tmp", raw.len());
        let f = r.follow(keeping(None));
        r.write_all(&damaged, &f);
        let body = f
            .body_crc(r.len, Duration::from_secs(20))
            .expect("all read");
        let handle = r.fs.open(&r.path, OpenMode::Existing).expect("open");
        let checked = SnapshotFile::verify_hashed(r.fs.clone(), handle, &r.path, None, body);
        assert!(checked.is_err(), "a damaged file passed the check");
    }

    #[test]
    fn a_state_machine_that_stops_reading_early_gives_nothing() {
        let fs = Arc::new(SimFs::new(9));
        let (raw, _data, _log) = snapshot_bytes(&fs, "/a3", 3 * CHUNK as usize);
        let mut r = Receiving::new(&fs, "/b3/in.tmp", raw.len());
        let f = r.follow(keeping(Some(100)));
        r.write_all(&raw, &f);
        let file = r.checked();
        assert!(f.into_pending().wait(&file).is_none());
    }

    #[test]
    fn an_abandoned_transfer_ends_its_build() {
        let fs = Arc::new(SimFs::new(10));
        let (raw, _data, _log) = snapshot_bytes(&fs, "/a4", 3 * CHUNK as usize);
        let mut r = Receiving::new(&fs, "/b4/in.tmp", raw.len());
        let f = r.follow(keeping(None));
        let outcome = f.outcome.clone();
        r.write(&raw, 0, &f);
        drop(f);
        assert!(
            finished(&outcome),
            "the build still waits for chunks that never come"
        );
        let built = outcome.slot.lock().take().expect("an outcome");
        let err = built.err().expect("the build failed");
        assert!(err.contains("abandoned"), "{err}");
    }
}
