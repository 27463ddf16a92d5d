//! Snapshot transfer: a [`SnapshotFile`] copied to a peer in chunks within the frame limit,
//! over the node's snapshot channel ([`consensus_api::channel::SNAPSHOT`]), in bounded memory.
//!
//! Both backends use it the same way: the leader's engine calls [`SnapshotSender::send`] with
//! its snapshot file and gets a [`Ticket`] naming the copy; it sends its own snapshot message
//! (raft-rs `MsgSnapshot`, openraft's install-snapshot) carrying the ticket instead of the
//! data; the follower's engine hands the message to its engine only once
//! [`SnapshotReceiver::take`] gives it the complete, checked file for that ticket.
//!
//! # Protocol (every step one [`consensus_api::Transport::call`])
//!
//! - `Begin { id, len, crc, chunk }`: the receiver answers with a bitmap of the chunks it
//!   already has: those of an interrupted transfer of the same file (same length, checksum and
//!   chunk size) are kept, so the transfer **resumes**; anything else starts a new temporary file.
//!   One incoming transfer per sender: a new `Begin` replaces the previous one.
//! - `Chunk { id, index, bytes }`: written at `index * chunk`; chunks may arrive in any order
//!   or twice (each says where it goes). At most [`WINDOW`] are in flight per transfer; a
//!   failed chunk is retried a few times, then the transfer fails and the engine's next attempt
//!   resumes it.
//! - `Finish { id }`: the receiver checks that every chunk is there, syncs the file and verifies
//!   its size and checksum; only then is it offered to [`SnapshotReceiver::take`]. A file that
//!   fails the check is discarded, and the next attempt starts over. Nothing partial is ever
//!   installed.
//!
//! A **stream** ([`SnapshotSender::send_stream`]) sends a snapshot as it is written, from a
//! point-in-time view, with no file on the sender: `BeginStream { id, chunk, meta_len }`, then
//! chunks as they fill (all whole but the last; the file's header is zeros in them), then
//! `FinishStream { id, len, crc }`: the receiver checks that the chunks make exactly `len`
//! bytes, writes the header, and checks the file as at `Finish`. A stream does not resume: a
//! failed one is started over by the engine.
//!
//! Memory: the sender holds at most [`WINDOW`] chunks (a stream twice that: as many queued),
//! the receiver at most what is in flight; neither ever holds the snapshot. Progress of each
//! transfer is kept in [`Transfers`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use consensus_api::{
    InboundHandler, NodeId, TransferDirection, TransferProgress, Transport, TransportError,
};
use parking_lot::Mutex;
use tokio::task::JoinSet;

use crate::aside::{Follower, Preparer};
use crate::fs::{FileHandle, OpenMode};
use crate::snapshot::SnapshotFile;
use crate::SnapshotStore;

/// Chunks in flight per transfer.
pub const WINDOW: usize = 8;
/// How long the receiver of a complete file waits for its build aside to finish reading it
/// before checking the file by reading it again. The build hashes what it reads, so once it
/// has read everything the file needs no second read (about 0.3 s per GiB from the page cache,
/// at the end of the copy); it usually ends within tens of milliseconds of the last chunk.
const BUILD_WAIT: Duration = Duration::from_millis(500);
/// Attempts per chunk before the transfer fails.
const CHUNK_ATTEMPTS: u32 = 3;
/// An incoming transfer without a chunk for this long is dropped at the next start of any
/// transfer (its sender gave up).
const ABANDONED_AFTER: Duration = Duration::from_secs(120);
/// Largest snapshot file a receiver accepts (a guard against nonsense lengths, not a policy).
const MAX_FILE: u64 = 1 << 46;

const BEGIN: u8 = 1;
const CHUNK: u8 = 2;
const FINISH: u8 = 3;
const BEGIN_STREAM: u8 = 4;
/// A snapshot file's header length.
const HEADER_LEN: u64 = crate::snapshot::HEADER as u64;
const FINISH_STREAM: u8 = 5;
/// A chunk frame's head: tag, transfer id, chunk index.
const CHUNK_HEAD: usize = 1 + 8 + 4;

/// Starts a chunk frame in `buf`: its head, the data goes after.
fn put_chunk_head(buf: &mut BytesMut, id: u64, index: u32) {
    buf.put_u8(CHUNK);
    buf.put_u64_le(id);
    buf.put_u32_le(index);
}

/// Writes a snapshot's state bytes (what [`SnapshotFile::data`] of the file would hold) into
/// the sink it is given: the source of [`SnapshotSender::send_stream`].
pub type StreamWriter = Box<dyn FnOnce(&mut dyn std::io::Write) -> Result<(), String> + Send>;

/// What a completed transfer is known by: the engine's snapshot message carries it, and the
/// receiver gives the file back for it ([`SnapshotReceiver::take`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    /// The transfer's id, unique per sender.
    pub id: u64,
    /// Size of the file.
    pub len: u64,
    /// The file's checksum.
    pub crc: u32,
}

impl Ticket {
    /// Encoded size.
    pub const LEN: usize = 20;

    /// The ticket as bytes (little-endian `id | len | crc`).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(Self::LEN);
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// Reads a ticket written by [`Ticket::encode`]; `None` for anything else.
    pub fn decode(mut b: &[u8]) -> Option<Self> {
        if b.len() != Self::LEN {
            return None;
        }
        Some(Self {
            id: b.get_u64_le(),
            len: b.get_u64_le(),
            crc: b.get_u32_le(),
        })
    }
}

/// Each transfer's progress and start, by peer and direction.
type ProgressMap = BTreeMap<(NodeId, u8), (TransferProgress, Instant)>;

/// Progress of every transfer of a node, sending and receiving: those in flight and the last
/// one that ended per peer and direction. Cheap to clone.
#[derive(Clone, Default)]
pub struct Transfers {
    inner: Arc<Mutex<ProgressMap>>,
}

fn key(peer: NodeId, d: TransferDirection) -> (NodeId, u8) {
    (peer, d as u8)
}

impl Transfers {
    fn start(&self, peer: NodeId, d: TransferDirection, total: u64, resumed: u64) {
        let mut p = TransferProgress::new(peer, d, total);
        p.resumed_bytes = resumed;
        self.inner.lock().insert(key(peer, d), (p, Instant::now()));
    }

    fn resumed(&self, peer: NodeId, d: TransferDirection, bytes: u64) {
        if let Some((p, _)) = self.inner.lock().get_mut(&key(peer, d)) {
            p.resumed_bytes = bytes;
        }
    }

    /// A stream's size, known at its end.
    fn sized(&self, peer: NodeId, d: TransferDirection, total: u64) {
        if let Some((p, _)) = self.inner.lock().get_mut(&key(peer, d)) {
            p.total_bytes = total;
        }
    }

    fn advance(&self, peer: NodeId, d: TransferDirection, bytes: u64) {
        if let Some((p, _)) = self.inner.lock().get_mut(&key(peer, d)) {
            p.bytes += bytes;
            p.chunks += 1;
        }
    }

    fn end(&self, peer: NodeId, d: TransferDirection, error: Option<String>) {
        if let Some((p, started)) = self.inner.lock().get_mut(&key(peer, d)) {
            if !p.done {
                p.done = true;
                p.error = error;
                p.elapsed_ms = started.elapsed().as_millis() as u64;
            }
        }
    }

    /// Every transfer known, with its elapsed time.
    pub fn list(&self) -> Vec<TransferProgress> {
        self.inner
            .lock()
            .values()
            .map(|(p, started)| {
                let mut p = p.clone();
                if !p.done {
                    p.elapsed_ms = started.elapsed().as_millis() as u64;
                }
                p
            })
            .collect()
    }
}

/// Streams snapshot files to peers; one transfer per peer at a time.
pub struct SnapshotSender {
    transport: Arc<dyn Transport>,
    transfers: Transfers,
    chunk: usize,
    timeout: Duration,
    busy: Mutex<HashSet<NodeId>>,
}

/// Releases a peer's slot when its transfer ends, and marks the transfer ended when the
/// caller stopped waiting for it (the engine cancelled it): otherwise [`Transfers::list`]
/// would show it running forever.
struct Busy<'a>(&'a SnapshotSender, NodeId);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        // A no-op when `send` already recorded the outcome.
        self.0.transfers.end(
            self.1,
            TransferDirection::Sending,
            Some("cancelled by the engine".into()),
        );
        self.0.busy.lock().remove(&self.1);
    }
}

impl SnapshotSender {
    /// A sender over `transport` (the snapshot channel) in chunks of `chunk` bytes
    /// ([`NodeConfig::snapshot_chunk_bytes`](consensus_api::NodeConfig::snapshot_chunk_bytes)),
    /// each call with deadline `timeout`.
    pub fn new(
        transport: Arc<dyn Transport>,
        transfers: Transfers,
        chunk: usize,
        timeout: Duration,
    ) -> Self {
        Self {
            transport,
            transfers,
            chunk: chunk.max(1),
            timeout,
            busy: Mutex::new(HashSet::new()),
        }
    }

    /// Copies `file` to `to`; returns the ticket of the complete, checked copy. Fails if a
    /// transfer to `to` is already running, or when the peer cannot be reached or refuses; a
    /// later call for the same file resumes where this one stopped.
    pub async fn send(&self, to: NodeId, file: &SnapshotFile) -> Result<Ticket, String> {
        if !self.busy.lock().insert(to) {
            return Err(format!(
                "a snapshot transfer to node {to} is already running"
            ));
        }
        let _busy = Busy(self, to);
        let ticket = Ticket {
            id: rand::random(),
            len: file.len(),
            crc: file.checksum(),
        };
        let outcome = self.run(to, file, ticket).await;
        self.transfers.end(
            to,
            TransferDirection::Sending,
            outcome.as_ref().err().cloned(),
        );
        match &outcome {
            Ok(()) => tracing::info!(to, bytes = ticket.len, "snapshot file sent"),
            Err(e) => tracing::warn!(to, "snapshot transfer failed: {e}"),
        }
        outcome.map(|()| ticket)
    }

    /// Streams a snapshot to `to` while it is written, with no file on this side: `meta` (the
    /// engine's metadata) then what `write` writes, on a blocking thread, in chunks as they
    /// fill (at most [`WINDOW`] in flight and as many queued, so memory stays bounded). The
    /// receiver gets a snapshot file like any other, checked the same way; the ticket names
    /// it. No resume: a failed stream is started over by the engine's next attempt.
    pub async fn send_stream(
        &self,
        to: NodeId,
        meta: Bytes,
        write: StreamWriter,
    ) -> Result<Ticket, String> {
        if !self.busy.lock().insert(to) {
            return Err(format!(
                "a snapshot transfer to node {to} is already running"
            ));
        }
        let _busy = Busy(self, to);
        let outcome = self.run_stream(to, meta, write).await;
        self.transfers.end(
            to,
            TransferDirection::Sending,
            outcome.as_ref().err().cloned(),
        );
        match &outcome {
            Ok(t) => tracing::info!(to, bytes = t.len, "snapshot streamed"),
            Err(e) => tracing::warn!(to, "snapshot stream failed: {e}"),
        }
        outcome
    }

    async fn run_stream(
        &self,
        to: NodeId,
        meta: Bytes,
        write: StreamWriter,
    ) -> Result<Ticket, String> {
        let id: u64 = rand::random();
        let meta_len = u32::try_from(meta.len()).map_err(|_| "metadata over 4 GiB".to_string())?;
        let mut begin = BytesMut::with_capacity(17);
        begin.put_u8(BEGIN_STREAM);
        begin.put_u64_le(id);
        begin.put_u32_le(self.chunk as u32);
        begin.put_u32_le(meta_len);
        self.transfers.start(to, TransferDirection::Sending, 0, 0);
        self.call(to, begin.freeze())
            .await
            .map_err(|e| format!("starting the stream: {e}"))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WINDOW);
        let chunk = self.chunk;
        let producer = tokio::task::spawn_blocking(move || -> Result<(u64, u32), String> {
            let mut sink = ChunkSink::new(id, chunk, tx);
            sink.push(&[0; crate::snapshot::HEADER], false)
                .and_then(|()| sink.push(&meta, true))
                .map_err(|e| e.to_string())?;
            write(&mut sink).map_err(|e| format!("writing the snapshot: {e}"))?;
            sink.finish().map_err(|e| e.to_string())
        });
        let mut inflight: JoinSet<Result<u64, String>> = JoinSet::new();
        let mut open = true;
        loop {
            let done = if open && inflight.len() < WINDOW {
                tokio::select! {
                    frame = rx.recv() => {
                        match frame {
                            Some(frame) => {
                                let (transport, timeout) = (self.transport.clone(), self.timeout);
                                inflight.spawn(async move {
                                    let size = (frame.len() - CHUNK_HEAD) as u64;
                                    call_retrying(&*transport, to, frame, timeout)
                                        .await
                                        .map(|_| size)
                                        .map_err(|e| format!("chunk: {e}"))
                                });
                            }
                            None => open = false,
                        }
                        continue;
                    }
                    Some(done) = inflight.join_next(), if !inflight.is_empty() => done,
                }
            } else {
                match inflight.join_next().await {
                    Some(done) => done,
                    None => break,
                }
            };
            let bytes = done.map_err(|e| format!("chunk task failed: {e}"))??;
            self.transfers
                .advance(to, TransferDirection::Sending, bytes);
        }
        let (len, crc) = producer
            .await
            .map_err(|e| format!("snapshot writer failed: {e}"))??;
        self.transfers.sized(to, TransferDirection::Sending, len);
        let mut finish = BytesMut::with_capacity(21);
        finish.put_u8(FINISH_STREAM);
        finish.put_u64_le(id);
        finish.put_u64_le(len);
        finish.put_u32_le(crc);
        self.call(to, finish.freeze())
            .await
            .map_err(|e| format!("finishing the stream: {e}"))?;
        Ok(Ticket { id, len, crc })
    }

    /// A control call (start, finish), retried like a chunk: both are idempotent.
    async fn call(&self, to: NodeId, frame: Bytes) -> Result<Bytes, String> {
        call_retrying(&*self.transport, to, frame, self.timeout).await
    }

    async fn run(&self, to: NodeId, file: &SnapshotFile, t: Ticket) -> Result<(), String> {
        let chunks = chunk_count(t.len, self.chunk);
        let mut begin = BytesMut::with_capacity(32);
        begin.put_u8(BEGIN);
        begin.put_u64_le(t.id);
        begin.put_u64_le(t.len);
        begin.put_u32_le(t.crc);
        begin.put_u32_le(self.chunk as u32);
        self.transfers
            .start(to, TransferDirection::Sending, t.len, 0);
        let have = self
            .call(to, begin.freeze())
            .await
            .map_err(|e| format!("starting the transfer: {e}"))?;
        let have = Bitmap::from_bytes(&have, chunks)
            .ok_or_else(|| "the receiver's chunk map has the wrong size".to_string())?;
        let missing: Vec<u64> = (0..chunks).filter(|i| !have.get(*i)).collect();
        let resumed = (chunks - missing.len() as u64).min(chunks) * self.chunk as u64;
        self.transfers
            .resumed(to, TransferDirection::Sending, resumed.min(t.len));
        let mut next = missing.into_iter();
        let mut inflight: JoinSet<Result<u64, String>> = JoinSet::new();
        loop {
            while inflight.len() < WINDOW {
                let Some(index) = next.next() else { break };
                let (transport, file) = (self.transport.clone(), file.clone());
                let (chunk, timeout) = (self.chunk, self.timeout);
                inflight.spawn(async move {
                    send_chunk(transport, to, file, t, chunk, index, timeout).await
                });
            }
            let Some(done) = inflight.join_next().await else {
                break;
            };
            let bytes = done.map_err(|e| format!("chunk task failed: {e}"))??;
            self.transfers
                .advance(to, TransferDirection::Sending, bytes);
        }
        let mut finish = BytesMut::with_capacity(9);
        finish.put_u8(FINISH);
        finish.put_u64_le(t.id);
        self.call(to, finish.freeze())
            .await
            .map_err(|e| format!("finishing the transfer: {e}"))?;
        Ok(())
    }
}

/// Cuts a stream into chunk frames and queues them for [`SnapshotSender::run_stream`],
/// hashing the body (everything after the header) on the way.
struct ChunkSink {
    id: u64,
    chunk: usize,
    index: u32,
    frame: BytesMut,
    len: u64,
    hasher: crc32fast::Hasher,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

impl ChunkSink {
    fn new(id: u64, chunk: usize, tx: tokio::sync::mpsc::Sender<Bytes>) -> Self {
        Self {
            id,
            chunk,
            index: 0,
            frame: BytesMut::new(),
            len: 0,
            hasher: crc32fast::Hasher::new(),
            tx,
        }
    }

    fn push(&mut self, mut data: &[u8], hashed: bool) -> std::io::Result<()> {
        if hashed {
            self.hasher.update(data);
        }
        while !data.is_empty() {
            if self.frame.is_empty() {
                self.frame.reserve(CHUNK_HEAD + self.chunk);
                put_chunk_head(&mut self.frame, self.id, self.index);
            }
            let take = (CHUNK_HEAD + self.chunk - self.frame.len()).min(data.len());
            self.frame.extend_from_slice(&data[..take]);
            self.len += take as u64;
            data = &data[take..];
            if self.frame.len() == CHUNK_HEAD + self.chunk {
                self.ship()?;
            }
        }
        Ok(())
    }

    fn ship(&mut self) -> std::io::Result<()> {
        let frame = std::mem::take(&mut self.frame).freeze();
        self.tx
            .blocking_send(frame)
            .map_err(|_| std::io::Error::other("the stream stopped"))?;
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| std::io::Error::other("a stream of more than 2^32 chunks"))?;
        Ok(())
    }

    /// Sends the last, short chunk; the stream's length and body checksum.
    fn finish(mut self) -> std::io::Result<(u64, u32)> {
        if !self.frame.is_empty() {
            self.ship()?;
        }
        Ok((self.len, self.hasher.finalize()))
    }
}

impl std::io::Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.push(data, true)?;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn chunk_count(len: u64, chunk: usize) -> u64 {
    len.div_ceil(chunk as u64)
}

/// Reads chunk `index` from the file and sends it, retrying a failed call.
async fn send_chunk(
    transport: Arc<dyn Transport>,
    to: NodeId,
    file: SnapshotFile,
    t: Ticket,
    chunk: usize,
    index: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let at = index * chunk as u64;
    let size = (t.len - at).min(chunk as u64) as usize;
    // Allocated here, on the runtime's thread, and only filled on the blocking one: glibc
    // serves a thread from its own arena, and the blocking pool's many threads would spread
    // the chunk buffers over as many arenas, each keeping its free pages resident.
    let mut buf = BytesMut::with_capacity(CHUNK_HEAD + size);
    let frame = tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
        put_chunk_head(&mut buf, t.id, index as u32);
        buf.resize(CHUNK_HEAD + size, 0);
        let mut done = 0;
        while done < size {
            let n = file.read_at(&mut buf[CHUNK_HEAD + done..], at + done as u64)?;
            if n == 0 {
                return Err(std::io::Error::other("snapshot file ends early"));
            }
            done += n;
        }
        Ok(buf.freeze())
    })
    .await
    .map_err(|e| format!("reading chunk {index}: {e}"))?
    .map_err(|e| format!("reading chunk {index}: {e}"))?;
    call_retrying(&*transport, to, frame, timeout)
        .await
        .map(|_| size as u64)
        .map_err(|e| format!("chunk {index}: {e}"))
}

/// Makes a call, retrying a few times when it was lost (every step of the protocol is
/// idempotent). A refusal by the receiver is final: it no longer knows the transfer (it
/// restarted, or another began), and the next attempt resumes from its map.
async fn call_retrying(
    transport: &dyn Transport,
    to: NodeId,
    frame: Bytes,
    timeout: Duration,
) -> Result<Bytes, String> {
    let mut last = String::new();
    for attempt in 0..CHUNK_ATTEMPTS {
        match transport.call(to, frame.clone(), timeout).await {
            Ok(reply) => return Ok(reply),
            Err(TransportError::Remote(e)) => return Err(format!("refused: {e}")),
            Err(e) => {
                last = e.to_string();
                tokio::time::sleep(Duration::from_millis(20 << attempt)).await;
            }
        }
    }
    Err(format!(
        "not delivered after {CHUNK_ATTEMPTS} attempts: {last}"
    ))
}

/// Which chunks are there.
#[derive(Clone)]
struct Bitmap {
    bits: Vec<u8>,
    count: u64,
    set: u64,
}

impl Bitmap {
    fn new(count: u64) -> Self {
        Self {
            bits: vec![0; count.div_ceil(8) as usize],
            count,
            set: 0,
        }
    }

    fn from_bytes(b: &[u8], count: u64) -> Option<Self> {
        if b.len() as u64 != count.div_ceil(8) {
            return None;
        }
        let mut m = Self {
            bits: b.to_vec(),
            count,
            set: 0,
        };
        m.set = (0..count).filter(|i| m.get(*i)).count() as u64;
        Some(m)
    }

    fn get(&self, i: u64) -> bool {
        i < self.count && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    fn set(&mut self, i: u64) {
        if !self.get(i) {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
            self.set += 1;
        }
    }

    fn full(&self) -> bool {
        self.set == self.count
    }

    /// Grows the map to `count` chunks (a stream's), keeping what is set.
    fn ensure(&mut self, count: u64) {
        if count > self.count {
            self.bits.resize(count.div_ceil(8) as usize, 0);
            self.count = count;
        }
    }
}

/// One sender's transfer being received.
struct Incoming {
    id: u64,
    len: u64,
    crc: u32,
    chunk: u64,
    path: PathBuf,
    handle: Arc<dyn FileHandle>,
    have: Bitmap,
    /// When a chunk last arrived (or the transfer began).
    last: Instant,
    /// Bytes written since the file was last synced (see `snapshot::WRITE_BEHIND`).
    unsynced: u64,
    writeback: Arc<Writeback>,
    /// The state being built aside from the chunks written so far ([`crate::aside`]).
    restore: Option<Follower>,
    /// Set for a stream ([`SnapshotSender::send_stream`]): `len` and `crc` are known only at
    /// its end, and so is `have`'s size.
    stream: Option<Stream>,
}

/// What a stream being received tells about itself before its end.
struct Stream {
    meta_len: u32,
    /// The one chunk shorter than the chunk size (the last), if it arrived: `(index, bytes)`.
    short: Option<(u64, u64)>,
}

/// The write-behind syncs of a file being received (see `snapshot::WRITE_BEHIND`): they run
/// in the background, one at a time, so a chunk's answer waits on the disk only while the
/// previous sync is still running. The first error is kept: the file's final sync could no
/// longer report it (an error is reported once per file), so the transfer fails at `Finish`.
struct Writeback {
    gate: Arc<tokio::sync::Semaphore>,
    error: Mutex<Option<String>>,
}

impl Writeback {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            gate: Arc::new(tokio::sync::Semaphore::new(1)),
            error: Mutex::new(None),
        })
    }

    /// Starts syncing `handle` once the previous sync ended.
    async fn start(self: &Arc<Self>, handle: Arc<dyn FileHandle>) -> Result<(), String> {
        let permit = self
            .gate
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = handle.sync_data() {
                me.error.lock().get_or_insert(e.to_string());
            }
            drop(permit);
        });
        Ok(())
    }

    /// Waits for a running sync; the first error any of them met.
    async fn settle(&self) -> Result<(), String> {
        let _idle = self.gate.acquire().await.map_err(|e| e.to_string())?;
        match self.error.lock().clone() {
            Some(e) => Err(format!("syncing the received snapshot: {e}")),
            None => Ok(()),
        }
    }
}

#[derive(Default)]
struct ReceiverState {
    incoming: HashMap<NodeId, Incoming>,
    /// Complete, checked files not yet taken, by sender: `(transfer id, file)`.
    ready: HashMap<NodeId, (u64, SnapshotFile)>,
}

/// The receiving side: the handler of the snapshot channel. Keep the `Arc` alive as long as
/// transfers should be accepted (the channel holds its handler weakly).
pub struct SnapshotReceiver {
    store: SnapshotStore,
    transfers: Transfers,
    state: Mutex<ReceiverState>,
    /// Builds the state of an arriving file aside ([`SnapshotReceiver::restore_while_receiving`]).
    preparer: Mutex<Option<Preparer>>,
}

impl SnapshotReceiver {
    /// A receiver writing into `store`'s directory, installed as `transport`'s handler.
    pub fn install(
        transport: &Arc<dyn Transport>,
        store: SnapshotStore,
        transfers: Transfers,
    ) -> Arc<Self> {
        let r = Arc::new(Self {
            store,
            transfers,
            state: Mutex::new(ReceiverState::default()),
            preparer: Mutex::new(None),
        });
        transport.set_handler(r.clone());
        r
    }

    /// From now on, every new incoming transfer also starts building its state aside with
    /// `preparer`, reading the file as it arrives ([`crate::aside`]); the checked file then
    /// carries it ([`SnapshotFile::take_prepared`]).
    pub fn restore_while_receiving(&self, preparer: Preparer) {
        *self.preparer.lock() = Some(preparer);
    }

    /// The complete, checked file `from` sent under `ticket`, if it is here; it is then no
    /// longer offered. The file is not installed: the engine installs it
    /// ([`SnapshotStore::install`]) when it restores it.
    pub fn take(&self, from: NodeId, ticket: &Ticket) -> Option<SnapshotFile> {
        let mut st = self.state.lock();
        match st.ready.get(&from) {
            Some((id, f)) if *id == ticket.id && f.len() == ticket.len => {
                let f = f.clone();
                st.ready.remove(&from);
                Some(f)
            }
            _ => None,
        }
    }

    fn begin(&self, from: NodeId, mut b: &[u8]) -> Result<Bytes, String> {
        if b.len() != 24 {
            return Err("malformed transfer start".into());
        }
        let (id, len, crc, chunk) = (
            b.get_u64_le(),
            b.get_u64_le(),
            b.get_u32_le(),
            b.get_u32_le() as u64,
        );
        if chunk == 0 || !(16..=MAX_FILE).contains(&len) {
            return Err(format!(
                "refusing a snapshot transfer of {len} bytes in chunks of {chunk}"
            ));
        }
        let mut st = self.state.lock();
        self.forget_abandoned(&mut st);
        let count = chunk_count(len, chunk as usize);
        if let Some((ready_id, file)) = st.ready.get_mut(&from) {
            if file.len() == len && file.checksum() == crc {
                // The file already arrived whole and checked (the engine's message after it
                // was lost): nothing to send again.
                *ready_id = id;
                drop(st);
                let mut all = Bitmap::new(count);
                (0..count).for_each(|i| all.set(i));
                self.transfers
                    .start(from, TransferDirection::Receiving, len, len);
                self.transfers.end(from, TransferDirection::Receiving, None);
                return Ok(Bytes::from(all.bits));
            }
        }
        if let Some(inc) = st.incoming.get_mut(&from) {
            if inc.len == len && inc.crc == crc && inc.chunk == chunk {
                inc.id = id;
                inc.last = Instant::now();
                let have = inc.have.bits.clone();
                let resumed = inc.have.set * chunk;
                drop(st);
                self.transfers
                    .start(from, TransferDirection::Receiving, len, resumed.min(len));
                tracing::info!(from, len, resumed, "resuming a snapshot transfer");
                return Ok(Bytes::from(have));
            }
        }
        let (path, handle) = self.replace_incoming(&mut st, from)?;
        let have = Bitmap::new(count);
        let bits = Bytes::from(have.bits.clone());
        let restore = self.preparer.lock().clone().and_then(|preparer| {
            Follower::start(preparer, handle.clone(), Some(len), None, chunk, |i| {
                have.get(i)
            })
        });
        st.incoming.insert(
            from,
            Incoming {
                id,
                len,
                crc,
                chunk,
                path,
                handle,
                have,
                last: Instant::now(),
                unsynced: 0,
                writeback: Writeback::new(),
                restore,
                stream: None,
            },
        );
        drop(st);
        self.transfers
            .start(from, TransferDirection::Receiving, len, 0);
        Ok(bits)
    }

    /// Drops `from`'s transfer in progress (and its file), and creates the temporary file of
    /// the next one.
    fn replace_incoming(
        &self,
        st: &mut ReceiverState,
        from: NodeId,
    ) -> Result<(PathBuf, Arc<dyn FileHandle>), String> {
        if let Some(old) = st.incoming.remove(&from) {
            let _ = self.store.fs().remove_file(&old.path);
        }
        let path = self.store.temp_path(&format!("from-{from}"));
        let handle = self
            .store
            .fs()
            .open(&path, OpenMode::Truncate)
            .map_err(|e| format!("creating {}: {e}", path.display()))?
            .into();
        Ok((path, handle))
    }

    /// Starts receiving a stream ([`SnapshotSender::send_stream`]) into a new temporary file,
    /// replacing any transfer from the same sender.
    fn begin_stream(&self, from: NodeId, mut b: &[u8]) -> Result<Bytes, String> {
        if b.len() != 16 {
            return Err("malformed stream start".into());
        }
        let (id, chunk, meta_len) = (b.get_u64_le(), b.get_u32_le() as u64, b.get_u32_le());
        if chunk == 0 {
            return Err("refusing a snapshot stream in chunks of 0 bytes".into());
        }
        let mut st = self.state.lock();
        self.forget_abandoned(&mut st);
        let (path, handle) = self.replace_incoming(&mut st, from)?;
        let restore = self.preparer.lock().clone().and_then(|preparer| {
            Follower::start(
                preparer,
                handle.clone(),
                None,
                Some(u64::from(meta_len)),
                chunk,
                |_| false,
            )
        });
        st.incoming.insert(
            from,
            Incoming {
                id,
                len: 0,
                crc: 0,
                chunk,
                path,
                handle,
                have: Bitmap::new(0),
                last: Instant::now(),
                unsynced: 0,
                writeback: Writeback::new(),
                restore,
                stream: Some(Stream {
                    meta_len,
                    short: None,
                }),
            },
        );
        drop(st);
        self.transfers
            .start(from, TransferDirection::Receiving, 0, 0);
        Ok(Bytes::new())
    }

    /// Drops incoming transfers no chunk has reached for [`ABANDONED_AFTER`]: their sender
    /// gave up (it lost leadership, or stopped), and their files would hold disk space.
    fn forget_abandoned(&self, st: &mut ReceiverState) {
        let stale: Vec<NodeId> = st
            .incoming
            .iter()
            .filter(|(_, i)| i.last.elapsed() > ABANDONED_AFTER)
            .map(|(from, _)| *from)
            .collect();
        for from in stale {
            if let Some(old) = st.incoming.remove(&from) {
                let _ = self.store.fs().remove_file(&old.path);
                self.transfers.end(
                    from,
                    TransferDirection::Receiving,
                    Some("abandoned by the sender".into()),
                );
                tracing::info!(from, "dropping an abandoned incoming snapshot transfer");
            }
        }
    }

    async fn chunk(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        // The tag was taken off: the rest of the head, then the data.
        let head_len = CHUNK_HEAD - 1;
        if frame.len() < head_len {
            return Err("malformed chunk".into());
        }
        let mut head = &frame[..head_len];
        let (id, index) = (head.get_u64_le(), head.get_u32_le() as u64);
        let data = frame.slice(head_len..);
        let (handle, at, sync, writeback) = {
            let mut st = self.state.lock();
            let inc = st
                .incoming
                .get_mut(&from)
                .filter(|i| i.id == id)
                .ok_or_else(|| format!("no snapshot transfer {id:x} from node {from}"))?;
            let at = index * inc.chunk;
            let n = data.len() as u64;
            let misfit = || format!("chunk {index} of {n} bytes does not fit the transfer");
            match &mut inc.stream {
                None => {
                    let expected = inc.len.saturating_sub(at).min(inc.chunk);
                    if index >= inc.have.count || n != expected {
                        return Err(misfit());
                    }
                }
                Some(stream) => {
                    // Every chunk is whole but the last; its length comes at the end. A
                    // sender has at most WINDOW chunks in flight, all above the ones that
                    // arrived: a chunk far beyond them would only grow the map.
                    if n == 0
                        || n > inc.chunk
                        || at.saturating_add(n) > MAX_FILE
                        || index >= inc.have.count + 2 * WINDOW as u64
                    {
                        return Err(misfit());
                    }
                    if n < inc.chunk {
                        match stream.short {
                            Some((i, _)) if i != index => return Err(misfit()),
                            _ => stream.short = Some((index, n)),
                        }
                    }
                    inc.have.ensure(index + 1);
                }
            }
            if inc.have.get(index) {
                return Ok(Bytes::new());
            }
            // Keep the unwritten part of the file small (see `snapshot::WRITE_BEHIND`).
            inc.unsynced += data.len() as u64;
            let sync = inc.unsynced >= crate::snapshot::WRITE_BEHIND;
            if sync {
                inc.unsynced = 0;
            }
            (inc.handle.clone(), at, sync, inc.writeback.clone())
        };
        let n = data.len() as u64;
        let file = handle.clone();
        tokio::task::spawn_blocking(move || file.write_all_at(&data, at))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing chunk {index}: {e}"))?;
        if sync {
            writeback.start(handle).await?;
        }
        let mut st = self.state.lock();
        if let Some(inc) = st.incoming.get_mut(&from).filter(|i| i.id == id) {
            inc.have.set(index);
            inc.last = Instant::now();
            if let Some(restore) = &inc.restore {
                // A stream's short chunk counts once the stream's length is known.
                let short = inc.stream.as_ref().and_then(|s| s.short).map(|(i, _)| i);
                restore.arrived(|i| inc.have.get(i) && Some(i) != short);
            }
            drop(st);
            self.transfers
                .advance(from, TransferDirection::Receiving, n);
        }
        Ok(Bytes::new())
    }

    /// The end of a transfer (`end`: `None`) or of a stream (`end`: its length and checksum).
    async fn finish(
        &self,
        from: NodeId,
        id: u64,
        end: Option<(u64, u32)>,
    ) -> Result<Bytes, String> {
        let mut header = None;
        let inc = {
            let mut st = self.state.lock();
            if st.ready.get(&from).is_some_and(|(ready, _)| *ready == id) {
                // A repeated finish (the first answer was lost): already checked.
                return Ok(Bytes::new());
            }
            if let Some((len, crc)) = end {
                let inc = st
                    .incoming
                    .get_mut(&from)
                    .filter(|i| i.id == id && i.stream.is_some())
                    .ok_or_else(|| format!("no snapshot stream {id:x} from node {from}"))?;
                let (meta_len, short) = match &inc.stream {
                    Some(s) => (s.meta_len, s.short),
                    None => return Err("not a stream".into()),
                };
                let count = chunk_count(len, inc.chunk as usize);
                let tail = len % inc.chunk;
                let adds_up = match short {
                    None => tail == 0,
                    Some((i, n)) => tail != 0 && i + 1 == count && n == tail,
                };
                if !(HEADER_LEN + u64::from(meta_len)..=MAX_FILE).contains(&len)
                    || inc.have.count != count
                    || !adds_up
                {
                    return Err(format!(
                        "stream {id:x} ends at {len} bytes, which its chunks do not make"
                    ));
                }
                header = Some(
                    crate::snapshot::header(meta_len as usize, crc).map_err(|e| e.to_string())?,
                );
                (inc.len, inc.crc) = (len, crc);
                self.transfers
                    .sized(from, TransferDirection::Receiving, len);
                if let Some(restore) = &inc.restore {
                    restore.ended(len, |i| inc.have.get(i));
                }
            }
            match st.incoming.get(&from) {
                Some(i) if i.id == id && i.have.full() => st.incoming.remove(&from),
                Some(i) if i.id == id => {
                    return Err(format!(
                        "transfer {id:x} is missing {} chunks",
                        i.have.count - i.have.set
                    ))
                }
                _ => return Err(format!("no snapshot transfer {id:x} from node {from}")),
            }
        };
        let Some(mut inc) = inc else {
            return Err("transfer vanished".into());
        };
        let restore = inc.restore.take();
        let fs = self.store.fs().clone();
        let (path, len, crc) = (inc.path.clone(), inc.len, inc.crc);
        let received = inc.path.clone();
        let settled = inc.writeback.settle().await;
        let checked = tokio::task::spawn_blocking(move || {
            settled?;
            if let Some(h) = header {
                // A stream's header goes last, as when a snapshot file is sealed.
                inc.handle
                    .write_all_at(&h, 0)
                    .map_err(|e| format!("writing the received snapshot's header: {e}"))?;
            }
            inc.handle
                .sync_all()
                .map_err(|e| format!("syncing the received snapshot: {e}"))?;
            drop(inc.handle);
            let handle = fs
                .open(&path, OpenMode::Existing)
                .map_err(|e| format!("reopening the received snapshot: {e}"))?;
            // The build aside hashed the whole body as it read it: no second read then.
            let hashed = restore.as_ref().and_then(|r| r.body_crc(len, BUILD_WAIT));
            let file = match hashed {
                Some(body) => {
                    SnapshotFile::verify_hashed(fs, handle, &path, Some(path.clone()), body)
                }
                None => SnapshotFile::verify(fs, handle, &path, Some(path.clone())),
            }
            .map_err(|e| format!("the received snapshot is damaged: {e}"))?;
            if file.len() != len || file.checksum() != crc {
                return Err(format!(
                    "the received snapshot is not the one announced ({} bytes, crc {:08x}; \
                     expected {len} bytes, crc {crc:08x})",
                    file.len(),
                    file.checksum()
                ));
            }
            Ok((file, restore))
        })
        .await
        .map_err(|e| e.to_string())?;
        match checked {
            Ok((file, restore)) => {
                if let Some(restore) = restore {
                    file.attach_prepared(restore.into_pending());
                }
                self.transfers.end(from, TransferDirection::Receiving, None);
                tracing::info!(from, bytes = len, "snapshot file received and checked");
                self.state.lock().ready.insert(from, (id, file));
                Ok(Bytes::new())
            }
            Err(e) => {
                let _ = self.store.fs().remove_file(&received);
                self.transfers
                    .end(from, TransferDirection::Receiving, Some(e.clone()));
                tracing::warn!(from, "{e}");
                Err(e)
            }
        }
    }
}

#[async_trait]
impl InboundHandler for SnapshotReceiver {
    fn on_message(&self, from: NodeId, _frame: Bytes) {
        tracing::debug!(from, "unexpected one-way frame on the snapshot channel");
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        match frame.first() {
            Some(&BEGIN) => self.begin(from, &frame[1..]),
            Some(&BEGIN_STREAM) => self.begin_stream(from, &frame[1..]),
            Some(&CHUNK) => self.chunk(from, frame.slice(1..)).await,
            Some(&FINISH) => {
                let mut b = &frame[1..];
                if b.len() != 8 {
                    return Err("malformed transfer end".into());
                }
                self.finish(from, b.get_u64_le(), None).await
            }
            Some(&FINISH_STREAM) => {
                let mut b = &frame[1..];
                if b.len() != 20 {
                    return Err("malformed stream end".into());
                }
                let (id, len, crc) = (b.get_u64_le(), b.get_u64_le(), b.get_u32_le());
                self.finish(from, id, Some((len, crc))).await
            }
            _ => Err(format!("unknown snapshot-transfer frame from node {from}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;
    use crate::fs::SimFs;
    use crate::Log;

    /// What the in-memory link does to the n-th call (counting from 0).
    type Fault = dyn Fn(u64, &mut BytesMut) -> Option<TransportError> + Send + Sync;

    /// An in-memory link from node 1 to a receiver (node 2): calls run the receiver's handler
    /// directly, through `fault`. For the protocol's own tests; the conformance suite runs
    /// transfers over the real transports.
    struct Link {
        handler: Mutex<Option<Arc<dyn InboundHandler>>>,
        calls: AtomicU64,
        fault: Box<Fault>,
    }

    impl Link {
        fn new(
            fault: impl Fn(u64, &mut BytesMut) -> Option<TransportError> + Send + Sync + 'static,
        ) -> Arc<Self> {
            Arc::new(Self {
                handler: Mutex::new(None),
                calls: AtomicU64::new(0),
                fault: Box::new(fault),
            })
        }
    }

    #[async_trait]
    impl Transport for Link {
        fn local_id(&self) -> NodeId {
            1
        }
        fn local_addr(&self) -> SocketAddr {
            SocketAddr::from(([127, 0, 0, 1], 0))
        }
        fn set_peer(&self, _id: NodeId, _addr: String) {}
        fn remove_peer(&self, _id: NodeId) {}
        fn send(&self, _to: NodeId, _frame: Bytes) -> Result<(), TransportError> {
            Ok(())
        }
        async fn call(
            &self,
            _to: NodeId,
            frame: Bytes,
            _timeout: Duration,
        ) -> Result<Bytes, TransportError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let mut frame = BytesMut::from(&frame[..]);
            if let Some(e) = (self.fault)(n, &mut frame) {
                return Err(e);
            }
            let handler = self.handler.lock().clone().ok_or(TransportError::Closed)?;
            handler
                .on_call(1, frame.freeze())
                .await
                .map_err(TransportError::Remote)
        }
        fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
            *self.handler.lock() = Some(handler);
        }
        async fn shutdown(&self) {}
    }

    struct Side {
        _log: Log,
        store: SnapshotStore,
    }

    fn side(fs: &Arc<SimFs>, dir: &str) -> Side {
        let log = Log::open_in(fs.clone(), Path::new(dir), Default::default()).expect("open");
        let store = log.snapshot_store().expect("store");
        Side { _log: log, store }
    }

    /// A sealed snapshot of `len` state bytes in `side`'s store.
    fn snapshot(side: &Side, len: usize) -> (SnapshotFile, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 253) as u8).collect();
        let mut sink = side.store.create(b"engine-meta").expect("create");
        sink.write_all(&data).expect("write");
        let file = sink.seal().expect("seal");
        side.store.install(&file).expect("install");
        (file, data)
    }

    const CHUNK_BYTES: usize = 64 << 10;

    /// Builds the state aside as the bytes themselves.
    fn keep_bytes(receiver: &SnapshotReceiver) {
        receiver.restore_while_receiving(Arc::new(|source: &mut dyn std::io::Read| {
            let mut got = Vec::new();
            source
                .read_to_end(&mut got)
                .map_err(|e| consensus_api::ConsensusError::Storage(e.to_string()))?;
            Ok(Some(consensus_api::PreparedRestore::new(got)))
        }));
    }

    /// The state `file` carries, built while it arrived (waited for off the runtime).
    async fn built_aside(file: &SnapshotFile) -> Option<Vec<u8>> {
        let pending = file.take_prepared()?;
        let file = file.clone();
        let state = tokio::task::spawn_blocking(move || pending.wait(&file))
            .await
            .expect("wait")?;
        Some(state.downcast::<Vec<u8>>().expect("bytes"))
    }

    fn pair(
        link: &Arc<Link>,
        receiving: &Side,
    ) -> (SnapshotSender, Arc<SnapshotReceiver>, Transfers, Transfers) {
        let (sent, got) = (Transfers::default(), Transfers::default());
        let t: Arc<dyn Transport> = link.clone();
        let receiver = SnapshotReceiver::install(&t, receiving.store.clone(), got.clone());
        let sender = SnapshotSender::new(t, sent.clone(), CHUNK_BYTES, Duration::from_secs(5));
        (sender, receiver, sent, got)
    }

    #[tokio::test]
    async fn a_file_many_chunks_long_arrives_whole_and_installs() {
        let fs = Arc::new(SimFs::new(1));
        let (a, b) = (side(&fs, "/t1/a"), side(&fs, "/t1/b"));
        let (file, data) = snapshot(&a, 3 * CHUNK_BYTES * WINDOW + 12_345);
        let link = Link::new(|_, _| None);
        let (sender, receiver, sent, got) = pair(&link, &b);
        keep_bytes(&receiver);
        let ticket = sender.send(2, &file).await.expect("sent");
        let received = receiver.take(1, &ticket).expect("the file is there");
        assert!(receiver.take(1, &ticket).is_none(), "taken once");
        // The state was built while the chunks (a window at a time, in any order) arrived.
        assert_eq!(built_aside(&received).await.as_ref(), Some(&data));
        assert!(received.take_prepared().is_none(), "taken once");
        assert!(!received.is_installed());
        assert!(
            b.store.current().expect("current").is_none(),
            "not installed by the transfer"
        );
        b.store.install(&received).expect("install");
        let cur = b.store.current().expect("current").expect("installed");
        assert_eq!(cur.read_data().expect("data"), data);
        assert_eq!(cur.meta().as_ref(), b"engine-meta");
        let s = &sent.list()[0];
        assert!(s.done && s.error.is_none(), "{s:?}");
        assert_eq!((s.bytes, s.total_bytes), (file.len(), file.len()));
        assert_eq!(s.chunks, file.len().div_ceil(CHUNK_BYTES as u64));
        let r = &got.list()[0];
        assert!(
            r.done && r.error.is_none() && r.bytes == file.len(),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn lost_chunks_are_retried_and_an_interrupted_transfer_resumes() {
        let fs = Arc::new(SimFs::new(2));
        let (a, b) = (side(&fs, "/t2/a"), side(&fs, "/t2/b"));
        let (file, data) = snapshot(&a, 20 * CHUNK_BYTES);
        // The first attempt of every call (start, each chunk, finish) is lost before delivery:
        // retries absorb it.
        let seen = Mutex::new(HashSet::new());
        let lossy = Link::new(move |_, frame| {
            seen.lock()
                .insert(crc32fast::hash(frame))
                .then(|| TransportError::Unreachable {
                    peer: 2,
                    reason: "lost".into(),
                })
        });
        let (sender, receiver, _, _) = pair(&lossy, &b);
        let ticket = sender.send(2, &file).await.expect("retries absorb losses");
        assert!(receiver.take(1, &ticket).is_some());

        // The link dies after 8 calls: the transfer fails, nothing is offered.
        let c = side(&fs, "/t2/c");
        let dying = Link::new(|n, _| (n >= 8).then_some(TransportError::Timeout(Duration::ZERO)));
        let (sender, receiver, _, got) = pair(&dying, &c);
        keep_bytes(&receiver);
        let err = sender.send(2, &file).await.expect_err("the link died");
        assert!(err.contains("not delivered"), "{err}");
        assert!(got.list()[0].bytes > 0 && !got.list()[0].done);
        // A new link to the same receiver: the next send resumes from what arrived.
        let healed = Link::new(|_, _| None);
        healed.set_handler(receiver.clone());
        let t: Arc<dyn Transport> = healed.clone();
        let sent = Transfers::default();
        let sender = SnapshotSender::new(t, sent.clone(), CHUNK_BYTES, Duration::from_secs(5));
        let ticket = sender.send(2, &file).await.expect("resumed");
        let s = &sent.list()[0];
        assert!(s.resumed_bytes >= 6 * CHUNK_BYTES as u64, "resumed: {s:?}");
        assert!(s.bytes < file.len(), "only the rest was sent: {s:?}");
        let got = receiver.take(1, &ticket).expect("complete");
        assert_eq!(got.read_data().expect("data"), data);
        // The build followed the transfer across the interruption.
        assert_eq!(built_aside(&got).await.as_ref(), Some(&data));
    }

    #[tokio::test]
    async fn a_file_that_arrived_whole_is_not_sent_again_when_the_engine_retries() {
        let fs = Arc::new(SimFs::new(5));
        let (a, b) = (side(&fs, "/t5/a"), side(&fs, "/t5/b"));
        let (file, data) = snapshot(&a, 6 * CHUNK_BYTES);
        let link = Link::new(|_, _| None);
        let (sender, receiver, sent, _) = pair(&link, &b);
        let first = sender.send(2, &file).await.expect("sent");
        // The engine's own message after the transfer was lost: it sends the file again.
        let calls = link.calls.load(Ordering::SeqCst);
        let second = sender.send(2, &file).await.expect("sent again");
        assert_ne!(first.id, second.id);
        assert_eq!(
            link.calls.load(Ordering::SeqCst) - calls,
            2,
            "only start and finish"
        );
        assert_eq!(sent.list()[0].resumed_bytes, file.len());
        assert!(
            receiver.take(1, &first).is_none(),
            "the old ticket no longer names it"
        );
        let f = receiver
            .take(1, &second)
            .expect("offered under the new ticket");
        assert_eq!(f.read_data().expect("data"), data);
    }

    #[tokio::test]
    async fn a_damaged_chunk_fails_the_check_and_nothing_partial_is_offered() {
        let fs = Arc::new(SimFs::new(3));
        let (a, b) = (side(&fs, "/t3/a"), side(&fs, "/t3/b"));
        let (file, data) = snapshot(&a, 5 * CHUNK_BYTES);
        // Call 3 is the third chunk: flip one byte of its payload on the way.
        let corrupting = Link::new(|n, frame| {
            if n == 3 {
                let at = frame.len() - 10;
                frame[at] ^= 0x40;
            }
            None
        });
        let (sender, receiver, _, got) = pair(&corrupting, &b);
        keep_bytes(&receiver);
        let err = sender.send(2, &file).await.expect_err("damage is caught");
        assert!(err.contains("damaged") || err.contains("checksum"), "{err}");
        assert!(got.list()[0].error.is_some());
        let t = Ticket {
            id: 0,
            len: file.len(),
            crc: file.checksum(),
        };
        assert!(receiver.take(1, &t).is_none());
        // The next attempt starts over and succeeds.
        let ticket = sender.send(2, &file).await.expect("second attempt");
        let f = receiver.take(1, &ticket).expect("complete");
        assert_eq!(f.read_data().expect("data"), data);
        assert_eq!(built_aside(&f).await.as_ref(), Some(&data));
    }

    #[tokio::test]
    async fn malformed_and_foreign_frames_are_refused_without_changing_anything() {
        let fs = Arc::new(SimFs::new(4));
        let b = side(&fs, "/t4/b");
        let receiver = SnapshotReceiver::install(
            &(Link::new(|_, _| None) as Arc<dyn Transport>),
            b.store.clone(),
            Transfers::default(),
        );
        for frame in [
            &b""[..],
            &[9u8, 1, 2][..],
            &[BEGIN, 1][..],
            &[super::CHUNK, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3][..],
            &[FINISH, 1, 2, 3, 4, 5, 6, 7, 8][..],
        ] {
            assert!(
                receiver
                    .on_call(5, Bytes::copy_from_slice(frame))
                    .await
                    .is_err(),
                "{frame:?} refused"
            );
        }
        // A start with an absurd length or a zero chunk size is refused.
        let mut begin = BytesMut::new();
        begin.put_u8(BEGIN);
        begin.put_u64_le(1);
        begin.put_u64_le(u64::MAX);
        begin.put_u32_le(0);
        begin.put_u32_le(0);
        assert!(receiver.on_call(5, begin.freeze()).await.is_err());
        // A chunk of the wrong size for a real transfer is refused.
        let mut begin = BytesMut::new();
        begin.put_u8(BEGIN);
        begin.put_u64_le(7);
        begin.put_u64_le(100);
        begin.put_u32_le(0);
        begin.put_u32_le(64);
        receiver
            .on_call(5, begin.freeze())
            .await
            .expect("a sane start");
        let mut chunk = BytesMut::new();
        chunk.put_u8(super::CHUNK);
        chunk.put_u64_le(7);
        chunk.put_u32_le(0);
        chunk.put_slice(&[0u8; 10]);
        let e = receiver
            .on_call(5, chunk.freeze())
            .await
            .expect_err("wrong size");
        assert!(e.contains("does not fit"), "{e}");
        assert!(b.store.current().expect("current").is_none());
    }

    /// A stream's source writing `data`.
    fn writing(data: Vec<u8>) -> StreamWriter {
        Box::new(move |w| w.write_all(&data).map_err(|e| e.to_string()))
    }

    #[tokio::test]
    async fn a_stream_arrives_as_a_checked_file_with_its_state_built_aside() {
        let fs = Arc::new(SimFs::new(11));
        let b = side(&fs, "/t11/b");
        let link = Link::new(|_, _| None);
        let (sender, receiver, sent, _) = pair(&link, &b);
        keep_bytes(&receiver);
        let meta = Bytes::from_static(b"stream-meta");
        // Empty, tiny, ending exactly on a chunk boundary, ending in a short chunk, many windows.
        for len in [
            0,
            1,
            CHUNK_BYTES - 16 - meta.len(),
            5 * CHUNK_BYTES + 777,
            3 * CHUNK_BYTES * WINDOW,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 241) as u8).collect();
            let ticket = sender
                .send_stream(2, meta.clone(), writing(data.clone()))
                .await
                .expect("streamed");
            assert_eq!(ticket.len, (16 + meta.len() + len) as u64);
            let f = receiver.take(1, &ticket).expect("the file is there");
            assert_eq!(f.read_data().expect("data"), data, "{len} bytes");
            assert_eq!(f.meta(), &meta);
            assert_eq!(built_aside(&f).await.as_ref(), Some(&data), "{len} bytes");
            let s = &sent.list()[0];
            assert!(
                s.done && s.error.is_none() && s.bytes == ticket.len,
                "{s:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_stream_offers_nothing_and_the_next_one_starts_over() {
        let fs = Arc::new(SimFs::new(12));
        let b = side(&fs, "/t12/b");
        let data: Vec<u8> = (0..20 * CHUNK_BYTES).map(|i| (i % 199) as u8).collect();
        // The writer fails halfway.
        let link = Link::new(|_, _| None);
        let (sender, receiver, _, _) = pair(&link, &b);
        keep_bytes(&receiver);
        let half = data[..10 * CHUNK_BYTES].to_vec();
        let failing: StreamWriter = Box::new(move |w| {
            w.write_all(&half).map_err(|e| e.to_string())?;
            Err("the state machine failed".into())
        });
        let err = sender
            .send_stream(2, Bytes::new(), failing)
            .await
            .expect_err("the writer failed");
        assert!(err.contains("the state machine failed"), "{err}");
        // The link dies after 6 calls.
        let dying = Link::new(|n, _| (n >= 6).then_some(TransportError::Timeout(Duration::ZERO)));
        dying.set_handler(receiver.clone());
        let t: Arc<dyn Transport> = dying.clone();
        let cut = SnapshotSender::new(t, Transfers::default(), CHUNK_BYTES, Duration::from_secs(5));
        let err = cut
            .send_stream(2, Bytes::new(), writing(data.clone()))
            .await
            .expect_err("the link died");
        assert!(err.contains("not delivered"), "{err}");
        // Nothing partial is offered; the next stream replaces the dead one and completes.
        let ticket = sender
            .send_stream(2, Bytes::new(), writing(data.clone()))
            .await
            .expect("streamed");
        let f = receiver.take(1, &ticket).expect("complete");
        assert_eq!(f.read_data().expect("data"), data);
        assert_eq!(built_aside(&f).await.as_ref(), Some(&data));
    }

    #[tokio::test]
    async fn a_stream_whose_end_does_not_match_its_chunks_is_refused() {
        let fs = Arc::new(SimFs::new(13));
        let b = side(&fs, "/t13/b");
        let t: Arc<dyn Transport> = Link::new(|_, _| None);
        let receiver = SnapshotReceiver::install(&t, b.store.clone(), Transfers::default());
        let begin = |id: u64| {
            let mut f = BytesMut::new();
            f.put_u8(BEGIN_STREAM);
            f.put_u64_le(id);
            f.put_u32_le(64);
            f.put_u32_le(4);
            f.freeze()
        };
        let chunk = |id: u64, index: u32, len: usize| {
            let mut f = BytesMut::new();
            f.put_u8(CHUNK);
            f.put_u64_le(id);
            f.put_u32_le(index);
            f.extend(std::iter::repeat_n(7u8, len));
            f.freeze()
        };
        let finish = |id: u64, len: u64, crc: u32| {
            let mut f = BytesMut::new();
            f.put_u8(FINISH_STREAM);
            f.put_u64_le(id);
            f.put_u64_le(len);
            f.put_u32_le(crc);
            f.freeze()
        };
        receiver.on_call(1, begin(7)).await.expect("begun");
        receiver.on_call(1, chunk(7, 0, 64)).await.expect("chunk 0");
        receiver
            .on_call(1, chunk(7, 1, 10))
            .await
            .expect("a short chunk");
        let err = receiver
            .on_call(1, chunk(7, 2, 10))
            .await
            .expect_err("a second short one");
        assert!(err.contains("does not fit"), "{err}");
        receiver
            .on_call(1, chunk(7, 3, 65))
            .await
            .expect_err("longer than a chunk");
        let far = 2 + 2 * WINDOW as u32;
        receiver
            .on_call(1, chunk(7, far, 64))
            .await
            .expect_err("far beyond the others");
        // The lengths the chunks do not make, then the right one with a wrong checksum.
        for len in [64, 73, 75, 128] {
            let err = receiver
                .on_call(1, finish(7, len, 0))
                .await
                .expect_err("mismatch");
            assert!(err.contains("do not make"), "{len}: {err}");
        }
        let err = receiver
            .on_call(1, finish(7, 74, 0xdead))
            .await
            .expect_err("wrong crc");
        assert!(err.contains("damaged") || err.contains("checksum"), "{err}");
        let ticket = Ticket {
            id: 7,
            len: 74,
            crc: 0xdead,
        };
        assert!(receiver.take(1, &ticket).is_none(), "nothing offered");
        // A finish for a stream that is not there, or of a file transfer, is refused too.
        receiver
            .on_call(1, finish(8, 74, 0))
            .await
            .expect_err("no such stream");
        receiver.on_call(1, begin(9)).await.expect("begun");
        receiver
            .on_call(1, Bytes::from_static(&[FINISH_STREAM, 1]))
            .await
            .expect_err("malformed");
        receiver
            .on_call(1, Bytes::from_static(&[BEGIN_STREAM, 1, 2]))
            .await
            .expect_err("malformed");
    }
}
