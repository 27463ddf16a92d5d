//! This node's QUIC configuration: the TLS identity from `consensus-tls`, and transport
//! parameters sized for the frame limit and tuned for a cluster network.

use std::sync::Arc;
use std::time::Duration;

use consensus_api::{NodeId, TlsConfig, TransportError};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, VarInt};

use crate::wire::FRAME_OVERHEAD;

/// ALPN of this protocol; bumped with the hello magic when the wire format changes.
pub(crate) const ALPN: &[u8] = b"consensus-quic/1";
/// Keep-alive pings: a connection with nothing to say still proves the peer alive.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// A peer silent this long (no packet, not even a keep-alive ack) is gone: the connection fails
/// and is re-made on demand. Bounds how long a crashed peer looks connected.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// RTT assumed before a measurement; QUIC's default (333 ms) suits the internet, a cluster
/// network is faster, and this bounds handshake retransmission delays after a lost packet (a
/// peer restarting on its address).
const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Calls in flight on one connection; more wait for a free stream, within their deadline.
const MAX_CONCURRENT_CALLS: u32 = 256;
/// A sender uses one unidirectional stream at a time; a few more absorb reopen races.
const MAX_CONCURRENT_ONE_WAY_STREAMS: u32 = 8;
/// Smallest per-stream receive window, whatever the frame limit.
const MIN_STREAM_WINDOW: u64 = 1 << 20;
/// The connection window holds this many full streams.
const STREAMS_PER_CONNECTION_WINDOW: u64 = 4;

/// Builds the server and client configurations of node `id`.
pub(crate) async fn configs(
    id: NodeId,
    tls: &TlsConfig,
    frame_limit: usize,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    // Reading files (and generating dev certificates) blocks: keep it off the async workers.
    let tls = tls.clone();
    let material = tokio::task::spawn_blocking(move || consensus_tls::load(&tls, id))
        .await
        .map_err(|e| TransportError::Setup(format!("loading TLS material failed: {e}")))?
        .map_err(|e| TransportError::Setup(format!("TLS material of node {id}: {e}")))?;
    let server_tls =
        consensus_tls::server_config(&material, ALPN).map_err(TransportError::Setup)?;
    let client_tls =
        consensus_tls::client_config(&material, ALPN).map_err(TransportError::Setup)?;
    let server_crypto = QuicServerConfig::try_from(server_tls)
        .map_err(|e| TransportError::Setup(format!("TLS configuration unusable for QUIC: {e}")))?;
    let client_crypto = QuicClientConfig::try_from(client_tls)
        .map_err(|e| TransportError::Setup(format!("TLS configuration unusable for QUIC: {e}")))?;

    let transport = Arc::new(transport_config(frame_limit));
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server.transport_config(transport.clone());
    let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
    client.transport_config(transport);
    Ok((server, client))
}

/// Transport parameters, the same on both sides of a connection.
fn transport_config(frame_limit: usize) -> quinn::TransportConfig {
    let frame = u64::try_from(frame_limit.saturating_add(FRAME_OVERHEAD)).unwrap_or(u64::MAX);
    // A whole frame fits a stream's window, so one frame never waits on window updates.
    let stream_window = frame.max(MIN_STREAM_WINDOW);
    let connection_window = stream_window.saturating_mul(STREAMS_PER_CONNECTION_WINDOW);
    let varint = |v: u64| VarInt::from_u64(v).unwrap_or(VarInt::MAX);
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(IdleTimeout::try_from(MAX_IDLE_TIMEOUT).ok())
        .initial_rtt(INITIAL_RTT)
        .stream_receive_window(varint(stream_window))
        .receive_window(varint(connection_window))
        .send_window(connection_window)
        .max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_CALLS))
        .max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_ONE_WAY_STREAMS));
    t
}
