//! Server-side connections the transport can cut.
//!
//! tonic serves each accepted connection on its own task, so stopping the server (even aborting
//! its task) leaves established connections open, and a peer keeps streaming to a node that has
//! shut down, never reconnecting to the process that replaces it on the same address. Every
//! accepted socket is wrapped in [`Cuttable`]: cancelling the server's token makes its next read
//! or write fail, hyper drops the connection, and the socket closes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::budget::{Budgets, Registration};

/// An accepted TCP connection that fails (and is then dropped) once its token is cancelled.
/// Also keeps the connection's memory budget registered ([`crate::budget`]) while it lives.
pub(crate) struct Cuttable {
    io: TcpStream,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    _budget: Option<Registration>,
}

impl Cuttable {
    pub(crate) fn new(io: TcpStream, token: &CancellationToken, budgets: &Budgets) -> Self {
        let budget = io.peer_addr().ok().map(|remote| budgets.open(remote));
        Self {
            io,
            cut: Box::pin(token.clone().cancelled_owned()),
            _budget: budget,
        }
    }

    /// Whether the token was cancelled; registers the waker otherwise, so a connection waiting
    /// on a quiet socket is woken to fail.
    fn is_cut(&mut self, cx: &mut Context<'_>) -> bool {
        self.cut.as_mut().poll(cx).is_ready()
    }
}

fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the transport shut down")
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.is_cut(cx) {
            return Poll::Ready(Err(cut_error()));
        }
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl Connected for Cuttable {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.io.connect_info()
    }
}
