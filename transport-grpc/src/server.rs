//! The inbound side: a tonic server that authenticates each request and hands frames to the
//! installed handler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use consensus_api::transport_support::HandlerSlot;
use consensus_api::{InboundHandler, NodeId, TransportError};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity as TlsIdentity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::budget::{Budgeted, Budgets};
use crate::conn::Cuttable;
use crate::pb::peer_server::{Peer, PeerServer};
use crate::pb::{Ack, Frame};
use crate::{Identity, Windows, CLUSTER_HEADER, FRAMING_SLACK, HTTP2_MAX_FRAME, NODE_HEADER};

/// How long a graceful stop may wait for open streams before the server task is aborted.
const STOP_GRACE: Duration = Duration::from_millis(200);
/// HTTP/2 keepalive: detects dead connections to crashed peers.
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 streams one connection may have open at once; what they may hold in memory is
/// bounded by [`crate::budget`].
const MAX_CONCURRENT_STREAMS: u32 = 256;

pub(crate) struct Server {
    pub(crate) local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// Cuts every accepted connection ([`Cuttable`]).
    cut: CancellationToken,
    task: JoinHandle<()>,
}

impl Server {
    pub(crate) async fn start(
        me: Arc<Identity>,
        handler: HandlerSlot,
    ) -> Result<Self, TransportError> {
        let listener = tokio::net::TcpListener::bind(me.config.listen_addr)
            .await
            .map_err(|e| TransportError::Setup(format!("bind {}: {e}", me.config.listen_addr)))?;
        let local_addr = listener
            .local_addr()
            .map_err(|e| TransportError::Setup(format!("local address: {e}")))?;
        let cut = CancellationToken::new();
        let token = cut.clone();
        let limit = me.config.max_frame_bytes + FRAMING_SLACK;
        let windows = Windows::for_frame_limit(me.config.max_frame_bytes);
        let budgets = Budgets::new(me.config.max_inflight_bytes_per_peer.max(limit));
        let incoming_budgets = budgets.clone();
        let incoming = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map(move |accepted| accepted.map(|io| Cuttable::new(io, &token, &incoming_budgets)));
        let tls = me.tls.clone();
        let service = PeerServer::new(PeerService::new(me, handler))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let mut builder = tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_CONCURRENT_STREAMS))
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .initial_stream_window_size(windows.stream)
            .initial_connection_window_size(windows.connection)
            .max_frame_size(HTTP2_MAX_FRAME);
        if let Some(pem) = &tls {
            let config = ServerTlsConfig::new()
                .identity(TlsIdentity::from_pem(&pem.cert, &pem.key))
                .client_ca_root(Certificate::from_pem(&pem.ca));
            builder = builder
                .tls_config(config)
                .map_err(|e| TransportError::Setup(format!("TLS server config: {e}")))?;
        }
        let router = builder.add_service(Budgeted::new(service, budgets));
        let task = tokio::spawn(async move {
            let stop = async {
                let _ = stop_rx.await;
            };
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                tracing::warn!(%local_addr, "gRPC server stopped: {e}");
            }
        });
        Ok(Self {
            local_addr,
            stop: Some(stop_tx),
            cut,
            task,
        })
    }

    /// Stops accepting, lets calls in flight finish briefly, then closes every connection.
    pub(crate) async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // Open client streams keep a graceful shutdown waiting forever: cut it short.
        if tokio::time::timeout(STOP_GRACE, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
        // Connections are served on tasks of their own, which outlive the server's.
        self.cut.cancel();
    }

    /// Stops at once: no more accepts, every connection closed.
    pub(crate) fn abort(&self) {
        self.task.abort();
        self.cut.cancel();
    }
}

pub(crate) struct PeerService {
    me: Arc<Identity>,
    handler: HandlerSlot,
}

impl PeerService {
    pub(crate) fn new(me: Arc<Identity>, handler: HandlerSlot) -> Self {
        Self { me, handler }
    }

    /// Checks the cluster id and reads the sender's node id.
    fn authenticate<T>(&self, req: &Request<T>) -> Result<NodeId, Status> {
        let md = req.metadata();
        let cluster = md
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument("missing x-cluster-id"))?;
        if cluster != self.me.cluster_id {
            return Err(Status::permission_denied(format!(
                "cluster id {cluster:?} does not match this node's cluster {:?}",
                self.me.cluster_id
            )));
        }
        let from = md
            .get(NODE_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse::<NodeId>().ok())
            .ok_or_else(|| Status::invalid_argument("missing or malformed x-node-id"))?;
        if self.me.tls.is_some() {
            // The chain was verified against the cluster CA in the handshake; the claimed node
            // id must be the one the certificate names.
            let certs = req
                .peer_certs()
                .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
            let leaf = certs
                .first()
                .ok_or_else(|| Status::unauthenticated("empty client certificate chain"))?;
            consensus_tls::verify_peer_id(leaf, from).map_err(|e| {
                Status::permission_denied(format!(
                    "node id {from} does not match its certificate: {e}"
                ))
            })?;
        }
        Ok(from)
    }

    /// The handler for a call; before one is installed the call is refused with a status
    /// that tells the caller it reached no handler.
    fn handler(&self) -> Result<Arc<dyn InboundHandler>, Status> {
        self.handler.get().map_err(crate::status::not_delivered)
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn stream(&self, request: Request<Streaming<Frame>>) -> Result<Response<Ack>, Status> {
        let from = self.authenticate(&request)?;
        let mut stream = request.into_inner();
        let mut received = 0u64;
        while let Some(frame) = stream.message().await? {
            received += 1;
            self.handler.deliver(from, frame.payload);
        }
        Ok(Response::new(Ack { received }))
    }

    async fn call(&self, request: Request<Frame>) -> Result<Response<Frame>, Status> {
        let from = self.authenticate(&request)?;
        let handler = self.handler()?;
        match handler.on_call(from, request.into_inner().payload).await {
            Ok(payload) => Ok(Response::new(Frame { payload })),
            Err(e) => Err(Status::aborted(e)),
        }
    }
}
