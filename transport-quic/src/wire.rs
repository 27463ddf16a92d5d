//! The wire protocol on top of QUIC streams (all integers big-endian).
//!
//! - **Frame**: `length: u32` then `length` payload bytes. A receiver checks `length` against
//!   its limit before it reads (or allocates) anything more.
//! - **Hello** (first bidirectional stream of a connection, opened by the client): one frame
//!   holding `b"CQ1" ‖ node id: u64 ‖ incarnation: u64 ‖ cluster id (UTF-8)`, then FIN. The
//!   server answers with a reply: `OK` with its own incarnation (`u64`), or `REFUSED` with the
//!   reason, after which it closes the connection with [`CLOSE_REFUSED`].
//! - **One-way frames**: a sequence of frames on a unidirectional stream, never finished.
//! - **Call**: one bidirectional stream; the request is one frame then FIN, the answer a reply.
//! - **Reply**: `status: u8` then a frame: the body for `OK`, a UTF-8 message otherwise.
//!
//! Everything here is a pure function of the bytes or a thin read/write helper: nothing panics
//! on what a peer sends.

use std::fmt;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use consensus_api::NodeId;
use quinn::{
    ReadError, ReadExactError, RecvStream, SendStream, TransportErrorCode, VarInt, WriteError,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Marks a hello and the protocol version.
pub(crate) const HELLO_MAGIC: &[u8; 3] = b"CQ1";
/// Fixed part of a hello: magic, node id, incarnation.
const HELLO_FIXED: usize = 3 + 8 + 8;
/// Largest hello (and hello reply) a node reads.
pub(crate) const MAX_HELLO: usize = 4096;
/// Longest cluster id that fits a hello.
pub(crate) const MAX_CLUSTER_ID: usize = MAX_HELLO - HELLO_FIXED;
/// Largest payload the 32-bit length prefix can describe.
pub(crate) const MAX_FRAME: usize = u32::MAX as usize;
/// Bytes of framing around one payload: the length prefix, plus the status byte of a reply.
pub(crate) const FRAME_OVERHEAD: usize = 4 + 1;
/// Memory reserved up front for a frame whose bytes have not arrived yet (outside a byte budget;
/// see [`read_frame_within`]); beyond this the buffer grows as data comes, so a peer announcing a
/// large frame cannot make us allocate it for free.
const PREALLOC: usize = 64 << 10;

/// Connection closed normally (shutdown, peer removed or replaced).
pub(crate) const CLOSE_NORMAL: VarInt = VarInt::from_u32(0);
/// Connection refused after the hello (wrong cluster, identity mismatch, malformed hello).
pub(crate) const CLOSE_REFUSED: VarInt = VarInt::from_u32(1);
/// Connection dropped because the peer process behind it was replaced by a new incarnation.
pub(crate) const CLOSE_STALE: VarInt = VarInt::from_u32(2);
/// Stream stopped by the receiver: a frame exceeded its limit.
pub(crate) const STOP_TOO_LARGE: VarInt = VarInt::from_u32(1);
/// Stream stopped by the receiver: malformed or truncated framing.
pub(crate) const STOP_MALFORMED: VarInt = VarInt::from_u32(2);
/// Longest reason carried in a CONNECTION_CLOSE frame.
const MAX_CLOSE_REASON: usize = 200;

/// The outcome class of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Status {
    /// The body is the answer (or, for a hello, the server's incarnation).
    Ok = 0,
    /// The handler answered with an error message.
    Failed = 1,
    /// The transport refused the request (size, identity, cluster); the handler never saw it.
    Refused = 2,
    /// No handler is installed yet; the handler never saw the request.
    NotReady = 3,
}

impl Status {
    pub(crate) fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::Ok),
            1 => Some(Self::Failed),
            2 => Some(Self::Refused),
            3 => Some(Self::NotReady),
            _ => None,
        }
    }
}

/// A decoded reply.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) body: Bytes,
}

/// The client's introduction, first thing on every connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The node the client claims to be; its certificate must name it.
    pub(crate) node: NodeId,
    /// Random per transport instance: a new value means the peer process restarted.
    pub(crate) incarnation: u64,
    /// Must equal the server's cluster id.
    pub(crate) cluster_id: String,
}

impl Hello {
    pub(crate) fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HELLO_FIXED + self.cluster_id.len());
        b.put_slice(HELLO_MAGIC);
        b.put_u64(self.node);
        b.put_u64(self.incarnation);
        b.put_slice(self.cluster_id.as_bytes());
        b.freeze()
    }

    pub(crate) fn decode(mut b: &[u8]) -> Result<Self, String> {
        if take(&mut b, HELLO_MAGIC.len()) != Some(HELLO_MAGIC.as_slice()) {
            return Err("not a hello of this protocol (bad magic)".into());
        }
        let node = take_u64(&mut b).ok_or("hello too short (node id)")?;
        let incarnation = take_u64(&mut b).ok_or("hello too short (incarnation)")?;
        let cluster_id = std::str::from_utf8(b)
            .map_err(|_| "hello cluster id is not UTF-8".to_string())?
            .to_string();
        Ok(Self {
            node,
            incarnation,
            cluster_id,
        })
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

fn take_u64(b: &mut &[u8]) -> Option<u64> {
    take(b, 8)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
}

/// Decodes the body of a hello `OK` reply: the server's incarnation.
pub(crate) fn decode_incarnation(body: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(body).ok().map(u64::from_be_bytes)
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum FrameError {
    /// The announced length exceeds the receiver's limit; nothing of it was read.
    TooLarge { size: usize, limit: usize },
    /// The stream ended inside a frame.
    Truncated,
    /// Bytes that do not follow the protocol.
    Malformed(String),
    /// The stream failed (reset by the peer, connection lost).
    Read(ReadError),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size, limit } => {
                write!(
                    f,
                    "frame of {size} bytes exceeds the limit of {limit} bytes"
                )
            }
            Self::Truncated => f.write_str("stream ended inside a frame"),
            Self::Malformed(m) => write!(f, "malformed: {m}"),
            Self::Read(e) => write!(f, "{e}"),
        }
    }
}

/// Why a frame could not be written.
#[derive(Debug)]
pub(crate) enum SendError {
    /// Longer than the 32-bit length prefix allows (callers check their limit first).
    Oversized(usize),
    /// The stream or connection failed.
    Write(WriteError),
}

impl From<WriteError> for SendError {
    fn from(e: WriteError) -> Self {
        Self::Write(e)
    }
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Oversized(n) => write!(f, "frame of {n} bytes cannot be framed"),
            Self::Write(e) => write!(f, "{e}"),
        }
    }
}

fn prefix(len: usize) -> Result<[u8; 4], SendError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| SendError::Oversized(len))
}

/// Reads a frame's length prefix, checked against `limit`; `Ok(None)` when the stream finished
/// cleanly between frames.
async fn read_size(recv: &mut RecvStream, limit: usize) -> Result<Option<u32>, FrameError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(FrameError::Read(e)),
    }
    let size = u32::from_be_bytes(header);
    let bytes = usize::try_from(size).unwrap_or(usize::MAX);
    if bytes > limit {
        return Err(FrameError::TooLarge { size: bytes, limit });
    }
    Ok(Some(size))
}

/// Reads one frame; `Ok(None)` when the stream finished cleanly between frames.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    limit: usize,
) -> Result<Option<Bytes>, FrameError> {
    let Some(size) = read_size(recv, limit).await? else {
        return Ok(None);
    };
    read_body(recv, size as usize, PREALLOC).await.map(Some)
}

/// [`read_frame`] within a byte budget shared by the calls of one connection: the body is read
/// only once `budget` grants its size (the stream stays unread meanwhile, so flow control
/// holds the sender back); the permit is released when the caller drops it (after answering).
pub(crate) async fn read_frame_within(
    recv: &mut RecvStream,
    limit: usize,
    budget: &Arc<Semaphore>,
) -> Result<Option<(Bytes, OwnedSemaphorePermit)>, FrameError> {
    let Some(size) = read_size(recv, limit).await? else {
        return Ok(None);
    };
    let permit = budget
        .clone()
        .acquire_many_owned(size)
        .await
        .map_err(|_| FrameError::Truncated)?;
    // The budget already holds the whole size for this frame: reserve it at once instead of
    // growing the buffer (and copying it) as the chunks arrive.
    read_body(recv, size as usize, size as usize)
        .await
        .map(|b| Some((b, permit)))
}

/// Reads a body of `size` bytes, reserving at most `prealloc` of it before it arrives.
async fn read_body(
    recv: &mut RecvStream,
    size: usize,
    prealloc: usize,
) -> Result<Bytes, FrameError> {
    let mut buf = BytesMut::new();
    while buf.len() < size {
        let chunk = match recv.read_chunk(size - buf.len(), true).await {
            Ok(Some(chunk)) => chunk.bytes,
            Ok(None) => return Err(FrameError::Truncated),
            Err(e) => return Err(FrameError::Read(e)),
        };
        if buf.is_empty() {
            // The common case: the whole frame arrived as one chunk, no copy.
            if chunk.len() == size {
                return Ok(chunk);
            }
            buf.reserve(size.min(prealloc));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Writes one frame (length prefix and payload).
pub(crate) async fn write_frame(send: &mut SendStream, frame: Bytes) -> Result<(), SendError> {
    let head = prefix(frame.len())?;
    send.write_all_chunks(&mut [Bytes::copy_from_slice(&head), frame])
        .await?;
    Ok(())
}

/// Writes a reply (status byte and framed body).
pub(crate) async fn write_reply(
    send: &mut SendStream,
    status: Status,
    body: Bytes,
) -> Result<(), SendError> {
    let len = prefix(body.len())?;
    let mut head = [0u8; 5];
    head[0] = status as u8;
    head[1..].copy_from_slice(&len);
    send.write_all_chunks(&mut [Bytes::copy_from_slice(&head), body])
        .await?;
    Ok(())
}

/// Reads a reply whose body is at most `limit` bytes.
pub(crate) async fn read_reply(recv: &mut RecvStream, limit: usize) -> Result<Reply, FrameError> {
    let mut status = [0u8; 1];
    match recv.read_exact(&mut status).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(_)) => return Err(FrameError::Truncated),
        Err(ReadExactError::ReadError(e)) => return Err(FrameError::Read(e)),
    }
    let status = Status::from_byte(status[0])
        .ok_or_else(|| FrameError::Malformed(format!("unknown reply status {}", status[0])))?;
    let body = read_frame(recv, limit)
        .await?
        .ok_or(FrameError::Truncated)?;
    Ok(Reply { status, body })
}

/// A message carried as bytes, shown as text.
pub(crate) fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).into_owned()
}

/// `reason`, cut (at a character boundary) to fit a CONNECTION_CLOSE frame.
pub(crate) fn close_reason(reason: &str) -> &[u8] {
    let mut end = reason.len().min(MAX_CLOSE_REASON);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason.as_bytes().get(..end).unwrap_or_default()
}

/// TLS alerts travel as QUIC transport error codes 0x100-0x1ff.
pub(crate) fn is_tls_alert(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            node: 7,
            incarnation: 0xdead_beef,
            cluster_id: "blue-cluster".into(),
        }
    }

    #[test]
    fn a_hello_round_trips() {
        assert_eq!(Hello::decode(&hello().encode()), Ok(hello()));
    }

    #[test]
    fn garbage_is_not_a_hello() {
        assert!(Hello::decode(b"").is_err());
        assert!(Hello::decode(b"GET / HTTP/1.1\r\n\r\n").is_err());
        let encoded = hello().encode();
        for cut in 0..HELLO_FIXED {
            assert!(Hello::decode(&encoded[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_utf8 = encoded.to_vec();
        bad_utf8.push(0xff);
        assert!(Hello::decode(&bad_utf8).is_err());
    }

    #[test]
    fn an_incarnation_reply_is_exactly_eight_bytes() {
        assert_eq!(decode_incarnation(&42u64.to_be_bytes()), Some(42));
        assert_eq!(decode_incarnation(&[0; 7]), None);
        assert_eq!(decode_incarnation(&[0; 9]), None);
    }

    #[test]
    fn unknown_reply_statuses_are_rejected() {
        assert_eq!(
            Status::from_byte(Status::NotReady as u8),
            Some(Status::NotReady)
        );
        assert_eq!(Status::from_byte(4), None);
    }

    #[test]
    fn close_reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_CLOSE_REASON);
        let cut = close_reason(&long);
        assert!(cut.len() <= MAX_CLOSE_REASON);
        assert!(std::str::from_utf8(cut).is_ok());
        assert_eq!(close_reason("short"), b"short");
    }

    #[test]
    fn tls_alerts_are_recognised() {
        assert!(is_tls_alert(TransportErrorCode::crypto(42)));
        assert!(!is_tls_alert(TransportErrorCode::PROTOCOL_VIOLATION));
    }
}
