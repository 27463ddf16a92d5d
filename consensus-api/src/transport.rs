//! The byte-level transport contract: what a transport author implements.
//!
//! A transport moves opaque frames between nodes: one-way [`Transport::send`] (ordered per peer,
//! may drop under overload: Raft retransmits) and request/response [`Transport::call`] with a
//! deadline. Engines serialize their own messages; transports never look inside a frame. A
//! wrapper that adds behaviour to a transport (fault injection, metrics) implements
//! [`TransportLayer`](crate::TransportLayer) and writes only what it adds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{NodeConfig, NodeId, TransportError};

/// Moves frames between the nodes of one cluster.
///
/// # Obligations of an implementation
/// - **Identity.** Every connection is authenticated as the node id it claims (with TLS: the
///   peer certificate names `node-<id>`) and carries the cluster id; frames from another cluster
///   or an unauthenticated peer never reach the handler. The `from` given to the
///   [`InboundHandler`] is that authenticated id.
/// - **Order.** One-way frames to one peer are delivered in the order they were sent, or not at
///   all (a dropped frame may be followed by later ones; none is ever duplicated or reordered).
/// - **Bounds.** A frame over `TransportConfig::max_frame_bytes` is refused on both sides
///   ([`TransportError::FrameTooLarge`] for the sender); queues per peer are bounded
///   ([`TransportError::QueueFull`]); `call` never waits past its `timeout`.
/// - **Delivery knowledge.** A `call` that fails with a variant for which
///   [`TransportError::is_undelivered`] is true promises that the request never reached the
///   peer's handler: the node handle retries even non-idempotent requests (proposals) on it. A
///   failure after the request may have been handed to the peer must be
///   [`TransportError::Timeout`] or [`TransportError::Remote`] (outcome unknown), never
///   `Unreachable`.
/// - **No stale delivery.** A one-way frame is delivered on the connection that was up (or
///   being made) when it was sent, or not at all: frames still queued when a connection is lost
///   or a connection attempt fails are dropped, never carried over to the next connection (the
///   peer there may be a restarted process, for which they are seconds old), and while the
///   peer is in reconnect backoff `send` fails at once (`Unreachable`) instead of queueing. A
///   backend learns of the loss and retransmits fresh state, as Raft expects.
/// - **Lifecycle.** Connections are made lazily and re-made with backoff after a loss; after
///   [`shutdown`](Self::shutdown) every method fails with [`TransportError::Closed`] and the
///   port is released.
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
    /// Queues a one-way frame and returns at once. Frames to one peer arrive in order or not at
    /// all, and never on a later connection than the one they were queued for. Errors:
    /// `UnknownPeer`, `FrameTooLarge`, `QueueFull` (the frame was dropped), `Unreachable` (the
    /// peer is in reconnect backoff; nothing was queued), `Closed`.
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError>;
    /// Sends a request and waits for the peer handler's answer, at most `timeout`. See the
    /// trait's obligations for which errors promise the request was not delivered.
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError>;
    /// Installs the handler for inbound frames, replacing any earlier one. Frames arriving
    /// before a handler is set are refused (calls answer an error, one-way frames are dropped).
    fn set_handler(&self, handler: Arc<dyn InboundHandler>);
    /// Stops listening and closes every connection. Later calls fail with `Closed`.
    async fn shutdown(&self);
    /// Whether the `from` given to the handler is proven: the peer's certificate, checked
    /// against the cluster CA in the handshake, names that node id. A transport returns `true`
    /// only then; with [`TlsConfig::InsecurePlaintext`](crate::TlsConfig) (or any transport that
    /// takes the id on the sender's word) it returns `false`, and the node trusts no identity
    /// claim: forwarded membership changes and leader transfers are refused. The default is
    /// `false`, so a transport that does not say is not trusted.
    fn authenticates_peers(&self) -> bool {
        false
    }
}

/// Receives inbound frames from a transport.
///
/// `from` is the sender's authenticated node id. Frames are untrusted input all the same: a
/// handler decodes them defensively and answers malformed ones with an error, never a panic.
#[async_trait]
pub trait InboundHandler: Send + Sync + 'static {
    /// A one-way frame from `from`. Must not block: hand it to a queue. Frames from one peer
    /// arrive in the order it sent them.
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
    /// Whether this transport can run with [`TlsConfig::InsecurePlaintext`](crate::TlsConfig). QUIC cannot
    /// (TLS is part of the protocol): tools and test harnesses give such a transport
    /// [`TlsConfig::DevCerts`](crate::TlsConfig) instead.
    fn supports_insecure(&self) -> bool {
        true
    }
}
