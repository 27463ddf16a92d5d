//! # transport-grpc: consensus frames over gRPC (tonic)
//!
//! - One HTTP/2 connection per peer (a lazily connecting tonic `Channel` that reconnects on its
//!   own). One-way frames go through a bounded per-peer queue into one long-lived client stream
//!   (`Peer.Stream`), so they pipeline and stay ordered; when the stream breaks, a peer task
//!   reopens it with exponential backoff. Calls are unary (`Peer.Call`) with a deadline.
//! - Every request carries `x-cluster-id` and `x-node-id`; a server refuses another cluster's
//!   requests (`PERMISSION_DENIED`) and requests without a valid node id (`INVALID_ARGUMENT`).
//! - Frames above `TransportConfig::max_frame_bytes` are refused before sending
//!   ([`TransportError::FrameTooLarge`](consensus_api::TransportError)) and on receipt (tonic's
//!   decode limit).
//! - A failed call is `Unreachable` only when the request provably reached no handler: the
//!   channel could not connect, or the server refused it before a handler was installed (a
//!   status marked `x-not-delivered`). Once the request may have gone out, a failure is
//!   `Timeout` or `Remote`, never `Unreachable`.
//! - No `protoc` install is needed: `build.rs` uses the binary vendored by `protoc-bin-vendored`.
//! - TLS: `TlsConfig::Files` or `TlsConfig::DevCerts` turn on mutual TLS (rustls with ring):
//!   the client expects the server certificate to name `node-<peer>`, the server requires a
//!   client certificate from the cluster CA, and a request's `x-node-id` must be the node its
//!   certificate names. `TlsConfig::Unset` (the default) refuses to start.
//!   `TlsConfig::InsecurePlaintext` is plaintext for local experiments: a warning is logged at
//!   start, and the transport reports [`authenticates_peers`](Transport::authenticates_peers)
//!   `false` since `x-node-id` is then only the sender's word.

#![warn(missing_docs, unreachable_pub)]

mod budget;
mod conn;
pub mod fuzzing;
mod peer;
mod server;
mod status;
#[cfg(test)]
mod tests;

/// Generated protobuf and tonic code.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("peer");
}

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::transport_support::{HandlerSlot, PeerTable};
use consensus_api::{
    InboundHandler, NodeConfig, NodeId, TlsConfig, Transport, TransportConfig, TransportError,
    TransportFactory,
};
use parking_lot::Mutex;

use peer::Peer;
use server::Server;

/// Metadata key carrying the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-cluster-id";
/// Metadata key carrying the sender's node id.
pub const NODE_HEADER: &str = "x-node-id";
/// Room for protobuf framing on top of a payload of `max_frame_bytes`.
const FRAMING_SLACK: usize = 64;
/// Smallest HTTP/2 stream window, whatever the frame limit.
const MIN_STREAM_WINDOW: u32 = 1 << 20;
/// The HTTP/2 connection window holds this many full streams.
const STREAMS_PER_CONNECTION_WINDOW: u32 = 4;
/// Largest HTTP/2 frame either side accepts (the unit `DATA` is cut into; the protocol's
/// default is 16 KiB).
const HTTP2_MAX_FRAME: u32 = 256 << 10;

/// HTTP/2 flow-control windows for a frame limit, the same on both sides of a connection: a
/// whole frame fits one stream's window, so one call never waits on window updates in the
/// middle, and the connection's window holds [`STREAMS_PER_CONNECTION_WINDOW`] of them (the
/// snapshot transfer keeps a few chunks in flight beside the engine's messages). With hyper's
/// defaults (1 MiB for the connection on the server side) a transfer of 1 MiB chunks waited on
/// window updates for every chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Windows {
    pub(crate) stream: u32,
    pub(crate) connection: u32,
}

impl Windows {
    pub(crate) fn for_frame_limit(max_frame_bytes: usize) -> Self {
        let frame =
            u32::try_from(max_frame_bytes.saturating_add(FRAMING_SLACK + 5)).unwrap_or(u32::MAX);
        // HTTP/2 windows are at most 2^31 - 1.
        let stream = frame.clamp(MIN_STREAM_WINDOW, i32::MAX as u32);
        let connection = stream
            .saturating_mul(STREAMS_PER_CONNECTION_WINDOW)
            .min(i32::MAX as u32);
        Self { stream, connection }
    }
}

/// Binds gRPC transports; the value a program names at wiring time.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcTransportFactory;

#[async_trait]
impl TransportFactory for GrpcTransportFactory {
    fn name(&self) -> &'static str {
        "grpc"
    }

    async fn bind(&self, config: &NodeConfig) -> Result<Arc<dyn Transport>, TransportError> {
        Ok(GrpcTransport::bind(config.id, &config.cluster_id, &config.transport).await?)
    }
}

pub(crate) struct Identity {
    pub(crate) id: NodeId,
    pub(crate) cluster_id: String,
    pub(crate) config: TransportConfig,
    /// PEM material when mutual TLS is on.
    pub(crate) tls: Option<Pem>,
}

/// The cluster CA, this node's certificate chain and key, as PEM.
pub(crate) type Pem = consensus_tls::PemBytes;

/// Reads the PEM files `tls` names for node `id` (generating development ones if asked).
fn pem(tls: &TlsConfig, id: NodeId) -> Result<Option<Pem>, TransportError> {
    match tls {
        TlsConfig::Unset => Err(TransportError::Setup(
            "no TLS configured: set transport.tls to TlsConfig::Files { ca_cert, node_cert, \
             node_key } or TlsConfig::DevCerts { dir }, or choose \
             TlsConfig::InsecurePlaintext explicitly for a local experiment"
                .into(),
        )),
        TlsConfig::InsecurePlaintext => {
            tracing::warn!(
                node = id,
                "INSECURE: gRPC transport without TLS; traffic is readable and anyone who \
                 reaches the port can claim to be any member. For local experiments only."
            );
            Ok(None)
        }
        other => consensus_tls::paths(other, id)
            .and_then(|p| consensus_tls::read_pem(&p))
            .map(Some)
            .map_err(TransportError::Setup),
    }
}

/// A running gRPC transport: a server for inbound frames and a connection per peer.
pub struct GrpcTransport {
    me: Arc<Identity>,
    local_addr: SocketAddr,
    handler: HandlerSlot,
    peers: PeerTable<Peer>,
    server: Mutex<Option<Server>>,
    closed: AtomicBool,
}

impl GrpcTransport {
    /// Binds `config.listen_addr` (port 0 picks one) and starts serving.
    pub async fn bind(
        id: NodeId,
        cluster_id: &str,
        config: &TransportConfig,
    ) -> Result<Arc<Self>, TransportError> {
        if cluster_id
            .parse::<tonic::metadata::MetadataValue<_>>()
            .is_err()
        {
            return Err(TransportError::Setup(format!(
                "cluster id {cluster_id:?} must be printable ASCII"
            )));
        }
        let me = Arc::new(Identity {
            id,
            cluster_id: cluster_id.to_string(),
            config: config.clone(),
            tls: pem(&config.tls, id)?,
        });
        let handler = HandlerSlot::new();
        let server = Server::start(me.clone(), handler.clone()).await?;
        Ok(Arc::new(Self {
            me,
            local_addr: server.local_addr,
            handler,
            peers: PeerTable::new(),
            server: Mutex::new(Some(server)),
            closed: AtomicBool::new(false),
        }))
    }

    fn peer(&self, to: NodeId) -> Result<Arc<Peer>, TransportError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(TransportError::Closed);
        }
        self.peers.get(to)
    }

    fn check_size(&self, frame: &Bytes) -> Result<(), TransportError> {
        TransportError::check_frame(frame.len(), self.me.config.max_frame_bytes)
    }
}

#[async_trait]
impl Transport for GrpcTransport {
    fn local_id(&self) -> NodeId {
        self.me.id
    }

    fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    fn set_peer(&self, id: NodeId, addr: String) {
        if id == self.me.id || self.closed.load(Ordering::SeqCst) {
            return;
        }
        let started = self.peers.set(id, addr, |addr| {
            Peer::start(self.me.clone(), id, addr).map_err(|e| (addr.to_string(), e))
        });
        match started {
            Ok(Some(old)) => old.stop(),
            Ok(None) => {}
            Err((addr, e)) => tracing::warn!(peer = id, %addr, "cannot use peer address: {e}"),
        }
    }

    fn remove_peer(&self, id: NodeId) {
        if let Some(p) = self.peers.remove(id) {
            p.stop();
        }
    }

    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        self.check_size(&frame)?;
        self.peer(to)?.send(frame)
    }

    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.check_size(&frame)?;
        let peer = self.peer(to)?;
        peer.call(frame, timeout).await
    }

    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        self.handler.set(handler);
    }

    fn authenticates_peers(&self) -> bool {
        self.me.tls.is_some()
    }

    async fn shutdown(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        for p in self.peers.drain() {
            p.stop();
        }
        self.handler.clear();
        let server = self.server.lock().take();
        if let Some(s) = server {
            s.stop().await;
        }
    }
}

impl Drop for GrpcTransport {
    fn drop(&mut self) {
        for p in self.peers.drain() {
            p.stop();
        }
        if let Some(s) = self.server.lock().take() {
            s.abort();
        }
    }
}
