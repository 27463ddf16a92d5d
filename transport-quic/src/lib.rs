//! # transport-quic: consensus frames over QUIC (quinn) with mutual TLS
//!
//! ## Shape
//! - **One endpoint per node**, bound to `TransportConfig::listen_addr` (UDP; port 0 allowed),
//!   serving inbound connections and dialing outbound ones from the same socket.
//! - **One connection per peer and direction**, dialed lazily by a per-peer task, reused by
//!   everything sent to that peer, re-made after loss with exponential backoff
//!   (`reconnect_backoff_min` doubling up to `reconnect_backoff_max`). Keep-alives (1 s) and an
//!   idle timeout (5 s) notice a vanished peer; a peer that restarts and connects to us is noticed
//!   at once (its hello carries a new incarnation) and our stale connection to it is dropped.
//! - **One-way frames** go through a bounded per-peer queue (`peer_queue_capacity`, full ⇒
//!   [`TransportError::QueueFull`]) into **one long-lived unidirectional stream** per connection.
//!   A single ordered stream gives the per-peer ordering the contract promises for free and lets
//!   frames pipeline without a stream setup each; a stream per message would need sequence
//!   numbers and reordering on the receiver to keep that promise.
//! - **Calls** use **one bidirectional stream each** on the cached connection: request frame,
//!   FIN, then a reply (status byte + frame). Streams are cheap (no round trip to open) and
//!   independent, so a slow call (a snapshot) never blocks another (a vote) the way a shared
//!   stream would; the stream's end delimits the exchange, so no call ids are needed. The whole
//!   call, connecting included, runs under its deadline ([`TransportError::Timeout`]).
//!
//! ## Identity
//! Mutual TLS is mandatory (`TlsConfig::Files` or `TlsConfig::DevCerts`; `Unset` and `InsecurePlaintext` are refused
//! at bind): a client dialing node `p` expects the server certificate to name `node-p`, and the
//! server requires a client certificate from the cluster CA. Right after the TLS handshake the
//! client sends a hello (`CQ1`, node id, incarnation, cluster id) on the first stream; the server
//! refuses another cluster or a certificate that does not name the claimed node (reply, then a
//! connection close with an application error code) and only then serves the connection,
//! attributing every frame to the verified node id. A refusal reaches the caller as
//! [`TransportError::Refused`].
//!
//! ## Framing and limits
//! Frames are a `u32` big-endian length and the payload. Senders refuse frames above
//! `max_frame_bytes` with [`TransportError::FrameTooLarge`] before anything is sent; receivers
//! check the length before reading or allocating, refuse an oversized call with an explicit
//! answer and stop an oversized one-way stream (the sender continues on a fresh one). Nothing a
//! peer sends can panic a node.
//!
//! ## Errors
//! `Unreachable` is returned only when the request provably did not reach the peer's handler
//! (no connection, refused before sending, no handler installed): callers may retry it. A
//! connection lost after the request was written is `Remote` (the handler may have run).
//!
//! ## Lifecycle
//! Every task (accept loop, per connection, per call, per peer) belongs to the runtime the
//! transport was bound on and ends when the transport shuts down or is dropped, or when that
//! runtime goes away.

#![warn(missing_docs, unreachable_pub)]

mod errors;
#[doc(hidden)]
pub mod fuzzing;
mod peer;
mod server;
mod setup;
mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::transport_support::{HandlerSlot, PeerTable};
use consensus_api::{
    InboundHandler, NodeConfig, NodeId, Transport, TransportConfig, TransportError,
    TransportFactory,
};
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use peer::Peer;

/// How long a graceful shutdown waits for connections to close cleanly (so peers learn of it at
/// once rather than by idle timeout).
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// The known peers, shared with the server tasks (which report peer restarts to them).
pub(crate) type PeerMap = Arc<PeerTable<Peer>>;

/// Binds QUIC transports; the value a program names at wiring time.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuicTransportFactory;

#[async_trait]
impl TransportFactory for QuicTransportFactory {
    fn name(&self) -> &'static str {
        "quic"
    }

    async fn bind(&self, config: &NodeConfig) -> Result<Arc<dyn Transport>, TransportError> {
        Ok(QuicTransport::bind(config.id, &config.cluster_id, &config.transport).await?)
    }

    fn supports_insecure(&self) -> bool {
        false
    }
}

/// What every part of one transport shares: identity, settings, the endpoint.
pub(crate) struct Ctx {
    pub(crate) id: NodeId,
    pub(crate) cluster_id: String,
    /// Random per transport instance; tells peers this process apart from a restarted one.
    pub(crate) incarnation: u64,
    pub(crate) config: TransportConfig,
    /// `max_frame_bytes`, capped to what the length prefix can carry.
    pub(crate) frame_limit: usize,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) local_addr: SocketAddr,
    pub(crate) client_config: quinn::ClientConfig,
    /// The runtime the transport was bound on; all its tasks run there.
    pub(crate) runtime: Handle,
    closed: AtomicBool,
}

impl Ctx {
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

/// A running QUIC transport: one endpoint, a connection per peer.
pub struct QuicTransport {
    ctx: Arc<Ctx>,
    handler: HandlerSlot,
    peers: PeerMap,
    server: Mutex<Option<JoinHandle<()>>>,
}

impl QuicTransport {
    /// Loads the TLS identity of node `id`, binds `config.listen_addr` (port 0 picks one) and
    /// starts serving. Must run inside a tokio runtime (with time and I/O enabled); the
    /// transport's tasks live on that runtime.
    pub async fn bind(
        id: NodeId,
        cluster_id: &str,
        config: &TransportConfig,
    ) -> Result<Arc<Self>, TransportError> {
        if cluster_id.is_empty() || cluster_id.len() > wire::MAX_CLUSTER_ID {
            return Err(TransportError::Setup(format!(
                "cluster id must be 1 to {} bytes long",
                wire::MAX_CLUSTER_ID
            )));
        }
        let runtime = Handle::try_current().map_err(|_| {
            TransportError::Setup("QuicTransport::bind must run inside a tokio runtime".into())
        })?;
        let frame_limit = config.max_frame_bytes.min(wire::MAX_FRAME);
        let (server_config, client_config) = setup::configs(id, &config.tls, frame_limit).await?;
        let endpoint = setup::bind_socket(config.listen_addr)
            .and_then(|socket| {
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    Some(server_config),
                    socket,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| {
                TransportError::Setup(format!("cannot bind UDP {}: {e}", config.listen_addr))
            })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| TransportError::Setup(format!("local address: {e}")))?;
        let ctx = Arc::new(Ctx {
            id,
            cluster_id: cluster_id.to_string(),
            incarnation: random_u64(),
            config: config.clone(),
            frame_limit,
            endpoint,
            local_addr,
            client_config,
            runtime: runtime.clone(),
            closed: AtomicBool::new(false),
        });
        let handler = HandlerSlot::default();
        let peers = PeerMap::default();
        let server = runtime.spawn(server::accept_loop(
            ctx.clone(),
            handler.clone(),
            peers.clone(),
        ));
        tracing::debug!(id, %local_addr, "QUIC transport listening");
        Ok(Arc::new(Self {
            ctx,
            handler,
            peers,
            server: Mutex::new(Some(server)),
        }))
    }

    fn peer(&self, to: NodeId) -> Result<Arc<Peer>, TransportError> {
        if self.ctx.is_closed() {
            return Err(TransportError::Closed);
        }
        self.peers.get(to)
    }

    fn check_size(&self, frame: &Bytes) -> Result<(), TransportError> {
        TransportError::check_frame(frame.len(), self.ctx.frame_limit)
    }

    /// Stops every peer and closes the endpoint without waiting; what both shutdown and drop
    /// do. Returns false when the transport was already closed.
    fn close_now(&self) -> bool {
        if self.ctx.closed.swap(true, Ordering::SeqCst) {
            return false;
        }
        for p in self.peers.drain() {
            p.stop(TransportError::Closed);
        }
        self.handler.clear();
        self.ctx.endpoint.close(wire::CLOSE_NORMAL, b"shutdown");
        true
    }
}

#[async_trait]
impl Transport for QuicTransport {
    fn local_id(&self) -> NodeId {
        self.ctx.id
    }

    fn local_addr(&self) -> SocketAddr {
        self.ctx.local_addr
    }

    fn set_peer(&self, id: NodeId, addr: String) {
        if id == self.ctx.id || self.ctx.is_closed() {
            return;
        }
        if !looks_like_host_port(&addr) {
            tracing::warn!(peer = id, %addr, "peer address is not host:port; it will be unreachable");
        }
        let started = self.peers.set(id, addr, |addr| {
            Ok::<_, std::convert::Infallible>(Peer::start(self.ctx.clone(), id, addr))
        });
        if let Ok(Some(old)) = started {
            old.stop(TransportError::Unreachable {
                peer: id,
                reason: "the peer's address changed".into(),
            });
        }
    }

    fn remove_peer(&self, id: NodeId) {
        if let Some(p) = self.peers.remove(id) {
            p.stop(TransportError::Unreachable {
                peer: id,
                reason: "the peer was removed".into(),
            });
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

    /// Always: QUIC runs only with mutual TLS, and a peer's node id is read from its
    /// certificate.
    fn authenticates_peers(&self) -> bool {
        true
    }

    async fn shutdown(&self) {
        if !self.close_now() {
            return;
        }
        // Bounded: a peer that vanished would otherwise hold us for its idle timeout.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, self.ctx.endpoint.wait_idle()).await;
        let server = self.server.lock().take();
        if let Some(task) = server {
            task.abort();
        }
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        self.close_now();
        if let Some(task) = self.server.lock().take() {
            task.abort();
        }
    }
}

/// `ip:port` or `host:port`: what `set_peer` accepts without a warning.
fn looks_like_host_port(addr: &str) -> bool {
    addr.parse::<SocketAddr>().is_ok()
        || addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

/// A random value without a dependency: std's per-instance hasher keys, mixed with the clock
/// and the process id.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus_api::TlsConfig;

    #[derive(Default)]
    struct Echo {
        frames: Mutex<Vec<(NodeId, Bytes)>>,
    }

    #[async_trait]
    impl InboundHandler for Echo {
        fn on_message(&self, from: NodeId, frame: Bytes) {
            self.frames.lock().push((from, frame));
        }
        async fn on_call(&self, _from: NodeId, frame: Bytes) -> Result<Bytes, String> {
            if frame.as_ref() == b"fail" {
                return Err("handler says no".into());
            }
            Ok(frame)
        }
    }

    /// Nodes 1 and 2 of cluster `c`, bound on 127.0.0.1 with development certificates.
    async fn pair() -> (Arc<QuicTransport>, Arc<QuicTransport>, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = QuicTransport::bind(1, "c", &config(dir.path()))
            .await
            .expect("bind a");
        let b = QuicTransport::bind(2, "c", &config(dir.path()))
            .await
            .expect("bind b");
        (a, b, dir)
    }

    fn config(dir: &std::path::Path) -> TransportConfig {
        let mut config = TransportConfig::default();
        config.tls = TlsConfig::DevCerts {
            dir: dir.to_path_buf(),
        };
        config
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn insecure_or_unset_tls_is_refused_at_bind() {
        let mut config = TransportConfig::default();
        for tls in [TlsConfig::Unset, TlsConfig::InsecurePlaintext] {
            config.tls = tls;
            let err = QuicTransport::bind(1, "c", &config)
                .await
                .err()
                .expect("no TLS must be refused");
            assert!(
                matches!(&err, TransportError::Setup(m) if m.contains("mutual TLS")),
                "{err}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_and_one_way_frames_cross_a_real_connection() {
        let (a, b, _dir) = pair().await;
        let echo = Arc::new(Echo::default());
        b.set_handler(echo.clone());
        a.set_peer(2, b.local_addr().to_string());
        // Datagrams that are not QUIC are dropped by the endpoint, never by the node.
        let junk = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        for len in [1, 20, 1200] {
            let _ = junk.send_to(&vec![0xff; len], b.local_addr());
        }

        let answer = a
            .call(2, Bytes::from_static(b"ping"), Duration::from_secs(5))
            .await;
        assert_eq!(answer, Ok(Bytes::from_static(b"ping")));
        let failed = a
            .call(2, Bytes::from_static(b"fail"), Duration::from_secs(5))
            .await;
        assert_eq!(
            failed,
            Err(TransportError::Remote("handler says no".into()))
        );

        for i in 0..100u8 {
            a.send(2, Bytes::from(vec![i])).expect("queued");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while echo.frames.lock().len() < 100 {
            assert!(tokio::time::Instant::now() < deadline, "frames missing");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let got: Vec<(NodeId, u8)> = echo.frames.lock().iter().map(|(f, b)| (*f, b[0])).collect();
        assert_eq!(got, (0..100u8).map(|i| (1u64, i)).collect::<Vec<_>>());

        assert_eq!(
            a.call(3, Bytes::new(), Duration::from_secs(1)).await,
            Err(TransportError::UnknownPeer(3))
        );
        a.shutdown().await;
        assert_eq!(a.send(2, Bytes::new()), Err(TransportError::Closed));
        b.shutdown().await;
    }

    #[test]
    fn peer_addresses_must_be_host_and_port() {
        assert!(looks_like_host_port("127.0.0.1:7000"));
        assert!(looks_like_host_port("[::1]:7000"));
        assert!(looks_like_host_port("node-1.example:7000"));
        assert!(!looks_like_host_port("127.0.0.1"));
        assert!(!looks_like_host_port(":7000"));
        assert!(!looks_like_host_port("host:port"));
    }

    #[test]
    fn incarnations_differ() {
        assert_ne!(random_u64(), random_u64());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_call_before_the_handler_is_installed_is_unreachable() {
        let (a, b, _dir) = pair().await;
        a.set_peer(2, b.local_addr().to_string());
        let err = a
            .call(2, Bytes::from_static(b"early"), Duration::from_secs(5))
            .await
            .expect_err("no handler yet");
        assert!(
            matches!(err, TransportError::Unreachable { peer: 2, .. }),
            "{err}"
        );
        b.set_handler(Arc::new(Echo::default()));
        assert_eq!(
            a.call(2, Bytes::from_static(b"now"), Duration::from_secs(5))
                .await,
            Ok(Bytes::from_static(b"now"))
        );
        a.shutdown().await;
        b.shutdown().await;
    }

    /// Signals when a call reached it, then never answers.
    struct Hang(tokio::sync::Notify);

    #[async_trait]
    impl InboundHandler for Hang {
        fn on_message(&self, _from: NodeId, _frame: Bytes) {}
        async fn on_call(&self, _from: NodeId, _frame: Bytes) -> Result<Bytes, String> {
            self.0.notify_one();
            std::future::pending().await
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_lost_after_the_handler_got_the_call_is_not_unreachable() {
        let (a, b, _dir) = pair().await;
        let hang = Arc::new(Hang(tokio::sync::Notify::new()));
        b.set_handler(hang.clone());
        a.set_peer(2, b.local_addr().to_string());
        let call = tokio::spawn({
            let a = a.clone();
            async move {
                a.call(2, Bytes::from_static(b"x"), Duration::from_secs(10))
                    .await
            }
        });
        tokio::time::timeout(Duration::from_secs(5), hang.0.notified())
            .await
            .expect("the call reached the handler");
        b.shutdown().await;
        let err = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the call ends when the connection does")
            .expect("call task")
            .expect_err("no answer can come");
        assert!(
            matches!(err, TransportError::Remote(_)),
            "the handler got the call, so the outcome is unknown: {err}"
        );
        a.shutdown().await;
    }
}
