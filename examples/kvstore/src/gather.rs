//! Byte streams that send fewer, larger writes: what lets the client API answer a batch of
//! puts in one system call instead of one per put.
//!
//! Under load, the puts of one committed batch are answered together: each answer wakes its
//! HTTP/2 stream task, which hands its frames to the connection task and wakes it. tokio runs a
//! task woken that way next, so the connection writes each answer on its own before the next
//! stream task has run: one TLS record and one `writev` per put, each costing a pass through
//! the loopback's TCP stack on both ends. [`Gathered`] holds what is written until the
//! connection task has let every other ready task run once, then sends it all in one write.
//! [`Unvectored`] makes h2 copy small DATA frames into its own buffer instead of writing each
//! one separately (see its docs).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Past this many unsent bytes a write first sends what is held.
const MAX_HELD_BYTES: usize = 256 << 10;

/// A stream that holds its writes until it is flushed, and on the first flush of a batch
/// yields once to the runtime ([`tokio::task::yield_now`]: the task runs again only after
/// every other ready task has, and the I/O driver was polled) before sending everything held
/// in as few writes as the socket takes.
///
/// Bytes are only sent by a flush (or a write that finds [`MAX_HELD_BYTES`] held, or
/// shutdown), so it belongs under code that flushes after it writes, as h2 and tokio-rustls
/// do: h2 flushes at the end of every pass of its connection task, and the TLS handshake
/// flushes each flight.
pub struct Gathered<T> {
    io: T,
    held: Vec<u8>,
    /// Bytes of `held` already sent.
    sent: usize,
    /// The yield in progress before the held bytes go out.
    pause: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The yield is over: the held bytes may go out.
    paused: bool,
}

impl<T> Gathered<T> {
    /// Wraps `io`.
    pub fn new(io: T) -> Self {
        Self {
            io,
            held: Vec::new(),
            sent: 0,
            pause: None,
            paused: false,
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
        &self.io
    }
}

impl<T: AsyncWrite + Unpin> Gathered<T> {
    /// Sends every held byte.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        self.paused = false;
        Poll::Ready(Ok(()))
    }

    fn make_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.held.len() >= MAX_HELD_BYTES {
            ready!(self.poll_send(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl tonic::transport::server::Connected for Gathered<tokio::net::TcpStream> {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Gathered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Gathered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.make_room(cx))?;
        self.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.make_room(cx))?;
        let mut n = 0;
        for b in bufs {
            self.held.extend_from_slice(b);
            n += b.len();
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.sent < this.held.len() && !this.paused {
            let pause = this
                .pause
                .get_or_insert_with(|| Box::pin(tokio::task::yield_now()));
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
            this.paused = true;
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A stream that tells its writer it has no vectored writes.
///
/// h2 then copies each frame with up to 1 KiB of payload into its write buffer, and a flush
/// hands all the frames ready on the connection to the stream in one write (over TLS: one
/// record). With a vectored stream, it writes each DATA frame of more than 256 bytes (a put of
/// a 256-byte value) separately, one TLS record each.
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn holds_writes_until_flushed_then_sends_them_in_order() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut g = Gathered::new(a);
        g.write_all(b"one ").await.unwrap();
        g.write_all(b"two").await.unwrap();
        // Nothing sent before the flush: both writes are held.
        assert_eq!(g.held.len(), 7);
        assert_eq!(g.sent, 0);
        g.flush().await.unwrap();
        let mut got = vec![0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"one two");
    }

    #[tokio::test]
    async fn a_full_buffer_and_a_slow_reader_lose_nothing() {
        // A pipe far smaller than what is written: sends block until the reader reads.
        let (a, mut b) = tokio::io::duplex(4096);
        let data: Vec<u8> = (0..(3 * MAX_HELD_BYTES + 12345)).map(|i| i as u8).collect();
        let expected = data.clone();
        let writer = tokio::spawn(async move {
            let mut g = Gathered::new(a);
            for chunk in data.chunks(1000) {
                g.write_all(chunk).await.unwrap();
            }
            g.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        assert_eq!(got, expected);
    }
}
