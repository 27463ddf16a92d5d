//! What one peer's requests may hold in this node's memory (`TransportConfig::
//! max_inflight_bytes_per_peer`).
//!
//! tonic reads a unary request's whole body into its own buffer before the handler sees it,
//! and HTTP/2 flow control only bounds bytes *not yet read*; so without a budget one connection
//! with many concurrent calls could make this node buffer calls × frame limit. Every accepted
//! connection gets a [`Budget`] ([`Budgets::open`], released when the connection closes):
//! - **unary calls** take byte permits as their body's data arrives and hold them until the
//!   handler has answered; a call that finds the budget spent waits, unread, so the peer is
//!   slowed by flow control and this node's memory does not grow;
//! - **one-way streams** hold at most one frame at a time in tonic's decoder, so they are
//!   bounded by number: at most [`MAX_STREAMS_PER_CONNECTION`] at once, more are refused with
//!   `RESOURCE_EXHAUSTED`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

/// One-way streams one connection may have open at once (a peer needs one; a reconnecting
/// peer may briefly have two).
pub(crate) const MAX_STREAMS_PER_CONNECTION: usize = 4;

/// The memory budget of one connection.
pub(crate) struct Budget {
    bytes: Arc<Semaphore>,
    streams: Arc<Semaphore>,
}

/// The budgets of the open connections, by remote address (unique while a connection is open).
#[derive(Clone)]
pub(crate) struct Budgets {
    open: Arc<Mutex<HashMap<SocketAddr, Arc<Budget>>>>,
    bytes: usize,
}

impl Budgets {
    /// Budgets of `bytes` per connection (at least one frame must fit: the caller passes the
    /// larger of the configured budget and the frame limit).
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            open: Arc::default(),
            bytes: bytes.clamp(1, Semaphore::MAX_PERMITS),
        }
    }

    /// A fresh budget for the connection from `remote`, released when the returned guard is
    /// dropped (with the connection).
    pub(crate) fn open(&self, remote: SocketAddr) -> Registration {
        let budget = Arc::new(Budget {
            bytes: Arc::new(Semaphore::new(self.bytes)),
            streams: Arc::new(Semaphore::new(MAX_STREAMS_PER_CONNECTION)),
        });
        self.open.lock().insert(remote, budget);
        Registration {
            budgets: self.clone(),
            remote,
        }
    }

    fn get(&self, remote: SocketAddr) -> Option<Arc<Budget>> {
        self.open.lock().get(&remote).cloned()
    }
}

/// Keeps a connection's budget registered while the connection lives.
pub(crate) struct Registration {
    budgets: Budgets,
    remote: SocketAddr,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.budgets.open.lock().remove(&self.remote);
    }
}

/// The peer service with every request charged to its connection's [`Budget`].
#[derive(Clone)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budgets: Budgets,
}

impl<S> Budgeted<S> {
    pub(crate) fn new(inner: S, budgets: Budgets) -> Self {
        Self { inner, budgets }
    }
}

impl<S: NamedService> NamedService for Budgeted<S> {
    const NAME: &'static str = S::NAME;
}

fn remote_addr<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            ext.get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

type Answer = Result<http::Response<Body>, Infallible>;

impl<S> Service<http::Request<Body>> for Budgeted<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone is the one that was polled ready (tower's rule for services that are
        // cloned into their futures).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(budget) = remote_addr(&req).and_then(|r| self.budgets.get(r)) else {
            // Every accepted connection is registered; a request without one is not ours.
            let status = Status::unavailable("the connection has no memory budget");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        if req.uri().path().ends_with("/Stream") {
            let Ok(slot) = budget.streams.clone().try_acquire_owned() else {
                let status = Status::resource_exhausted(format!(
                    "at most {MAX_STREAMS_PER_CONNECTION} streams per connection"
                ));
                return Box::pin(async move { Ok(status.into_http()) });
            };
            return Box::pin(async move {
                let answer = inner.call(req).await;
                drop(slot);
                answer
            });
        }
        let held = Arc::new(Mutex::new(Vec::new()));
        let metered = held.clone();
        let req = req.map(|body| {
            Body::new(Metered {
                inner: body,
                budget: PollSemaphore::new(budget.bytes.clone()),
                waiting: None,
                cap: self.budgets.bytes,
                prefix: [0; 5],
                prefix_len: 0,
                received: 0,
                charged: 0,
                held: metered,
            })
        });
        Box::pin(async move {
            let answer = inner.call(req).await;
            // The handler has answered: the call's bytes are no longer held here.
            held.lock().clear();
            answer
        })
    }
}

/// A request body that takes a permit per byte before handing data on.
///
/// Once its 5-byte gRPC prefix has arrived (it may come in pieces), a call pays for the whole
/// message the prefix declares (up to the whole budget) at once: calls whose frames arrive
/// interleaved on one connection must not each hold part of the budget while none can complete (with 4 calls of 60 KiB and a 128 KiB budget,
/// 16 KiB frames in turn would take it all at 32 KiB each). Bytes beyond what was paid for are
/// charged as they arrive.
struct Metered {
    inner: Body,
    budget: PollSemaphore,
    /// A data frame read but not yet paid for.
    waiting: Option<Frame<Bytes>>,
    /// The whole budget: what one data frame is charged at most.
    cap: usize,
    /// The gRPC prefix's bytes as far as they have arrived: the first `prefix_len` of 5.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Data bytes handed on so far.
    received: usize,
    /// Bytes paid for so far.
    charged: usize,
    held: Arc<Mutex<Vec<OwnedSemaphorePermit>>>,
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.waiting.is_none() {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => this.waiting = Some(frame),
                other => return other,
            }
        }
        let size = this
            .waiting
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, Bytes::len);
        // The prefix as it stands once this frame is counted (not kept until paid for, since a
        // frame that has to wait is looked at again).
        let (mut prefix, mut prefix_len) = (this.prefix, this.prefix_len);
        if let Some(data) = this.waiting.as_ref().and_then(Frame::data_ref) {
            let more = (5 - prefix_len).min(data.len());
            prefix[prefix_len..prefix_len + more].copy_from_slice(&data[..more]);
            prefix_len += more;
        }
        let declared = if prefix_len == 5 {
            u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize + 5
        } else {
            0
        };
        // A call never holds more than the whole budget, so it can always be paid eventually
        // (tonic's decode limit, below the budget, refuses a larger message).
        let due = declared.max(this.received + size).min(this.cap);
        if due > this.charged && size > 0 {
            let want = due - this.charged;
            match this
                .budget
                .poll_acquire_many(cx, u32::try_from(want).unwrap_or(u32::MAX))
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(permit)) => {
                    this.held.lock().push(permit);
                    this.charged += want;
                }
                Poll::Ready(None) => {
                    return Poll::Ready(Some(Err(Status::unavailable("the transport stopped"))))
                }
            }
        }
        (this.prefix, this.prefix_len) = (prefix, prefix_len);
        this.received += size;
        Poll::Ready(this.waiting.take().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.waiting.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
