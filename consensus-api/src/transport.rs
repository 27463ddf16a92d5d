//! The byte-level transport contract and a multiplexer that shares one transport between the
//! engine and the forwarding layer.
//!
//! A transport moves opaque frames between nodes: one-way [`Transport::send`] (ordered per peer,
//! may drop under overload: Raft retransmits) and request/response [`Transport::call`] with a
//! deadline. Engines serialize their own messages; transports never look inside a frame.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;

use crate::{NodeConfig, NodeId, TransportError};

/// Moves frames between the nodes of one cluster.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// This node's id, as announced in every handshake.
    fn local_id(&self) -> NodeId;
    /// The address this node actually listens on (the real port when bound to port 0).
    fn local_addr(&self) -> SocketAddr;
    /// Adds or updates a peer's address; connections are made lazily.
    fn set_peer(&self, id: NodeId, addr: String);
    /// Forgets a peer and closes its connection.
    fn remove_peer(&self, id: NodeId);
    /// Queues a one-way frame. Frames to one peer arrive in order or not at all.
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError>;
    /// Sends a request and waits for the peer handler's answer, at most `timeout`.
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError>;
    /// Installs the handler for inbound frames. Frames arriving before it is set are refused.
    fn set_handler(&self, handler: Arc<dyn InboundHandler>);
    /// Stops listening and closes every connection. Later calls fail with `Closed`.
    async fn shutdown(&self);
}

/// Receives inbound frames from a transport.
#[async_trait]
pub trait InboundHandler: Send + Sync + 'static {
    /// A one-way frame from `from`. Must not block: hand it to a queue.
    fn on_message(&self, from: NodeId, frame: Bytes);
    /// A request from `from`; the answer (or an error message) goes back to the caller.
    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String>;
}

/// Creates a bound transport for a node; what a program names once, at wiring time.
#[async_trait]
pub trait TransportFactory: Send + Sync + 'static {
    /// Short name used in test names and logs (`grpc`, `quic`).
    fn name(&self) -> &'static str;
    /// Binds `config.transport.listen_addr` and returns the running transport.
    async fn bind(&self, config: &NodeConfig) -> Result<Arc<dyn Transport>, TransportError>;
    /// Whether this transport runs with [`TlsConfig::Insecure`](crate::TlsConfig). QUIC cannot
    /// (TLS is part of the protocol): tools and test harnesses give such a transport
    /// [`TlsConfig::DevCerts`](crate::TlsConfig) instead.
    fn supports_insecure(&self) -> bool {
        true
    }
}

type Handlers = Arc<RwLock<HashMap<u8, Weak<dyn InboundHandler>>>>;

/// Splits one transport into tagged channels: each frame carries a one-byte channel tag.
///
/// A channel holds its handler weakly: whoever installs a handler keeps it alive (an engine
/// keeps its RPC handler, the node handle its forwarding handler). Handlers usually own the
/// engine, and the engine owns the transport, so a strong reference here would be a cycle that
/// keeps a dead node's storage open forever.
pub struct Mux {
    inner: Arc<dyn Transport>,
    handlers: Handlers,
}

impl Mux {
    /// Takes over `inner`'s inbound handler.
    pub fn new(inner: Arc<dyn Transport>) -> Arc<Self> {
        let handlers: Handlers = Arc::default();
        inner.set_handler(Arc::new(MuxHandler {
            handlers: handlers.clone(),
        }));
        Arc::new(Self { inner, handlers })
    }

    /// A transport view whose frames carry `tag`.
    pub fn channel(&self, tag: u8) -> Arc<dyn Transport> {
        Arc::new(MuxChannel {
            inner: self.inner.clone(),
            tag,
            handlers: self.handlers.clone(),
        })
    }

    /// The underlying transport.
    pub fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }
}

struct MuxHandler {
    handlers: Handlers,
}

impl MuxHandler {
    fn route(&self, frame: &Bytes) -> Result<(Arc<dyn InboundHandler>, Bytes), String> {
        let Some(&tag) = frame.first() else {
            return Err("empty frame".into());
        };
        let handler = self
            .handlers
            .read()
            .get(&tag)
            .and_then(Weak::upgrade)
            .ok_or_else(|| format!("no handler for channel {tag}"))?;
        Ok((handler, frame.slice(1..)))
    }
}

#[async_trait]
impl InboundHandler for MuxHandler {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        match self.route(&frame) {
            Ok((h, body)) => h.on_message(from, body),
            Err(e) => tracing::debug!(from, "dropping inbound frame: {e}"),
        }
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let (h, body) = self.route(&frame)?;
        h.on_call(from, body).await
    }
}

struct MuxChannel {
    inner: Arc<dyn Transport>,
    tag: u8,
    handlers: Handlers,
}

impl MuxChannel {
    fn tagged(&self, frame: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(frame.len() + 1);
        buf.put_u8(self.tag);
        buf.put_slice(frame);
        buf.freeze()
    }
}

#[async_trait]
impl Transport for MuxChannel {
    fn local_id(&self) -> NodeId {
        self.inner.local_id()
    }
    fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr()
    }
    fn set_peer(&self, id: NodeId, addr: String) {
        self.inner.set_peer(id, addr)
    }
    fn remove_peer(&self, id: NodeId) {
        self.inner.remove_peer(id)
    }
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        self.inner.send(to, self.tagged(&frame))
    }
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.inner.call(to, self.tagged(&frame), timeout).await
    }
    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        self.handlers
            .write()
            .insert(self.tag, Arc::downgrade(&handler));
    }
    async fn shutdown(&self) {
        self.handlers.write().remove(&self.tag);
    }
}
