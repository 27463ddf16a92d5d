//! The outbound side of one peer: a lazily connecting channel, a bounded queue of one-way frames
//! drained into one long-lived client stream, and unary calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::transport_support::{discard_queued, Backoff};
use consensus_api::{NodeId, TransportError};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity as TlsIdentity};
use tonic::Request;

use crate::pb::peer_client::PeerClient;
use crate::pb::Frame;
use crate::server::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::status::call_error;
use crate::{Identity, Windows, CLUSTER_HEADER, FRAMING_SLACK, HTTP2_MAX_FRAME, NODE_HEADER};

/// Frames in flight inside one open stream (HTTP/2 flow control applies beyond it).
const STREAM_BUFFER: usize = 256;

pub(crate) struct Peer {
    id: NodeId,
    me: Arc<Identity>,
    client: PeerClient<Channel>,
    queue: mpsc::Sender<Bytes>,
    /// Set while the sending task waits out a backoff: sends fail at once meanwhile.
    down: Arc<Mutex<Option<Down>>>,
    task: JoinHandle<()>,
}

/// The sending task's backoff after a broken stream.
struct Down {
    until: Instant,
    reason: String,
}

impl Peer {
    /// Prepares the connection (made on first use) and the sending task.
    pub(crate) fn start(me: Arc<Identity>, id: NodeId, addr: &str) -> Result<Self, String> {
        tokio::runtime::Handle::try_current()
            .map_err(|_| "set_peer must be called inside a tokio runtime".to_string())?;
        let scheme = if me.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|e| format!("invalid address {addr:?}: {e}"))?;
        if let Some(pem) = &me.tls {
            let tls = ClientTlsConfig::new()
                .domain_name(consensus_tls::node_name(id))
                .ca_certificate(Certificate::from_pem(&pem.ca))
                .identity(TlsIdentity::from_pem(&pem.cert, &pem.key));
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("TLS client config: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(me.config.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let windows = Windows::for_frame_limit(me.config.max_frame_bytes);
        let endpoint = endpoint
            .initial_stream_window_size(windows.stream)
            .initial_connection_window_size(windows.connection)
            .max_frame_size(HTTP2_MAX_FRAME);
        let limit = me.config.max_frame_bytes + FRAMING_SLACK;
        let client = PeerClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let (queue, rx) = mpsc::channel(me.config.peer_queue_capacity.max(1));
        let down = Arc::new(Mutex::new(None));
        let task = tokio::spawn(stream_loop(
            me.clone(),
            id,
            client.clone(),
            rx,
            down.clone(),
        ));
        Ok(Self {
            id,
            me,
            client,
            queue,
            down,
            task,
        })
    }

    pub(crate) fn send(&self, frame: Bytes) -> Result<(), TransportError> {
        // In backoff the frame could only wait for a later stream, where it would be stale.
        if let Some(down) = &*self.down.lock() {
            if Instant::now() < down.until {
                return Err(TransportError::Unreachable {
                    peer: self.id,
                    reason: down.reason.clone(),
                });
            }
        }
        self.queue
            .try_send(frame)
            .map_err(|e| TransportError::from_queue(self.id, e))
    }

    pub(crate) async fn call(
        &self,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let mut req = Request::new(Frame { payload: frame });
        stamp(&self.me, &mut req);
        req.set_timeout(timeout);
        let mut client = self.client.clone();
        match tokio::time::timeout(timeout, client.call(req)).await {
            Err(_) => Err(TransportError::Timeout(timeout)),
            Ok(Ok(resp)) => Ok(resp.into_inner().payload),
            Ok(Err(status)) => Err(call_error(self.id, status, timeout)),
        }
    }

    pub(crate) fn stop(&self) {
        self.task.abort();
    }
}

/// Adds this node's identity to a request.
fn stamp<T>(me: &Identity, req: &mut Request<T>) {
    let md = req.metadata_mut();
    if let Ok(v) = me.cluster_id.parse() {
        md.insert(CLUSTER_HEADER, v);
    }
    md.insert(NODE_HEADER, MetadataValue::from(me.id));
}

/// Drains the peer queue into a client stream, reopening it with backoff when it breaks.
async fn stream_loop(
    me: Arc<Identity>,
    peer: NodeId,
    client: PeerClient<Channel>,
    mut queue: mpsc::Receiver<Bytes>,
    down: Arc<Mutex<Option<Down>>>,
) {
    let mut backoff = Backoff::from_config(&me.config);
    // Whether the peer's unreachability was reported: once per outage, not per attempt.
    let mut reported = false;
    // `consensus_transport_reconnects_total`: streams opened after the first.
    let reconnects = metrics::counter!(
        "consensus_transport_reconnects_total",
        "node" => me.id.to_string(),
        "peer" => peer.to_string()
    );
    let mut opened_before = false;
    loop {
        // Connect only when there is something to send: idle peers cost nothing.
        let Some(first) = queue.recv().await else {
            return;
        };
        let (tx, rx) = mpsc::channel::<Frame>(STREAM_BUFFER);
        let _ = tx.try_send(Frame { payload: first });
        let mut req = Request::new(ReceiverStream::new(rx));
        stamp(&me, &mut req);
        let mut client = client.clone();
        if std::mem::replace(&mut opened_before, true) {
            reconnects.increment(1);
        }
        let opened = Instant::now();
        let call = client.stream(req);
        tokio::pin!(call);
        let healthy = tokio::time::sleep(Backoff::HEALTHY);
        tokio::pin!(healthy);
        let mut healthy_seen = false;
        let outcome = loop {
            tokio::select! {
                res = &mut call => break res,
                () = &mut healthy, if !healthy_seen => {
                    healthy_seen = true;
                    if std::mem::take(&mut reported) {
                        tracing::info!(peer, "peer reachable again");
                    }
                }
                frame = queue.recv() => match frame {
                    None => return,
                    Some(payload) => {
                        if tx.send(Frame { payload }).await.is_err() {
                            break (&mut call).await;
                        }
                    }
                },
            }
        };
        let reason = match outcome {
            Ok(_) => {
                tracing::debug!(peer, "stream to peer closed by the peer");
                "the stream was closed by the peer".to_string()
            }
            Err(status) => {
                if opened.elapsed() < Backoff::HEALTHY && !reported {
                    reported = true;
                    tracing::warn!(peer, code = ?status.code(), "peer {peer} unreachable: {} (retrying with backoff)", status.message());
                } else {
                    tracing::debug!(peer, code = ?status.code(), "stream to peer broke: {}", status.message());
                }
                format!("the stream broke: {}", status.message())
            }
        };

        // Frames still queued were meant for the stream that is gone (the peer there may be a
        // restarted process): drop them, and refuse new ones until the next attempt.
        discard(peer, &mut queue, "their stream ended");
        // A stream that lived long enough counts as a success; either way the next one waits
        // out a delay, so a peer that keeps closing streams is not hammered.
        backoff.reset_if_healthy(opened.elapsed());
        let until = Instant::now() + backoff.next_delay();
        *down.lock() = Some(Down { until, reason });
        tokio::time::sleep_until(until).await;
        discard(peer, &mut queue, "they were queued during the backoff");
        *down.lock() = None;
    }
}

/// Drops the queued one-way frames for `peer`, saying why.
fn discard(peer: NodeId, queue: &mut mpsc::Receiver<Bytes>, why: &str) {
    let dropped = discard_queued(queue);
    if dropped > 0 {
        tracing::debug!(peer, dropped, "dropped queued frames: {why}");
    }
}
