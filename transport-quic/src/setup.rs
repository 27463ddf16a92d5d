//! This node's QUIC configuration: the TLS identity from `consensus-tls`, and transport
//! parameters sized for the frame limit and tuned for a cluster network.

use std::net::SocketAddr;
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
/// Kernel buffer asked for the endpoint's UDP socket, each way. A snapshot chunk arrives as a
/// burst of packets faster than the endpoint's task drains them; what does not fit the socket's
/// receive buffer is dropped, and every drop is a loss to QUIC's congestion control, which
/// halves its sending rate. Linux's usual default (208 KiB) dropped thousands of packets per
/// GiB copied on loopback, holding a snapshot copy to a quarter of TCP's speed. The kernel caps
/// the size at `net.core.rmem_max` / `wmem_max`; [`bind_socket`] warns when that leaves less
/// than [`SOCKET_BUFFER_MIN`].
const SOCKET_BUFFER: usize = 8 << 20;
/// Below this receive buffer, bulk transfers are likely to lose packets (see [`SOCKET_BUFFER`]).
const SOCKET_BUFFER_MIN: usize = 1 << 20;

/// The endpoint's UDP socket bound to `addr`, its kernel buffers enlarged (see
/// [`SOCKET_BUFFER`]).
pub(crate) fn bind_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer still works, only slower under bursts.
    if let Err(e) = socket.set_recv_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(%addr, error = %e, "cannot size the UDP receive buffer");
    }
    if let Err(e) = socket.set_send_buffer_size(SOCKET_BUFFER) {
        tracing::warn!(%addr, error = %e, "cannot size the UDP send buffer");
    }
    // Linux reports twice the usable size (it counts its bookkeeping).
    let got = socket.recv_buffer_size().unwrap_or(0);
    if got < SOCKET_BUFFER_MIN {
        tracing::warn!(
            %addr,
            bytes = got,
            wanted = SOCKET_BUFFER,
            "the UDP receive buffer is small (capped by net.core.rmem_max): bulk transfers such \
             as snapshots may lose packets and slow down; raise net.core.rmem_max"
        );
    } else {
        tracing::debug!(%addr, bytes = got, "UDP receive buffer");
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The endpoint's socket gets the receive buffer asked for, as far as the kernel allows
    /// (`net.core.rmem_max`; Linux reports twice what it grants).
    #[test]
    fn the_socket_gets_a_large_receive_buffer() {
        let socket = bind_socket("127.0.0.1:0".parse().unwrap()).unwrap();
        let got = socket2::SockRef::from(&socket).recv_buffer_size().unwrap();
        let cap = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        if let Some(cap) = cap {
            let expected = SOCKET_BUFFER.min(cap);
            assert!(
                got >= expected,
                "receive buffer {got} bytes, expected at least {expected} (rmem_max {cap})"
            );
        }
        assert!(socket.local_addr().unwrap().port() != 0);
    }
}
