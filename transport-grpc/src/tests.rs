//! The call-outcome promise over real sockets: `Unreachable` only when the request reached no
//! handler, never after it went out.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::{
    InboundHandler, NodeId, TlsConfig, Transport, TransportConfig, TransportError,
};
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;

use crate::GrpcTransport;

const SECOND: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Echo {
    calls: Mutex<u64>,
}

#[async_trait]
impl InboundHandler for Echo {
    fn on_message(&self, _from: NodeId, _frame: Bytes) {}
    async fn on_call(&self, _from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        *self.calls.lock() += 1;
        Ok(frame)
    }
}

/// A plaintext transport: these tests are about the gRPC mechanics; the TLS paths run in the
/// conformance suite's transport scenarios.
async fn bind(id: NodeId) -> Arc<GrpcTransport> {
    let mut config = TransportConfig::default();
    config.tls = TlsConfig::InsecurePlaintext;
    GrpcTransport::bind(id, "c", &config).await.expect("bind")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_tls_configured_it_refuses_to_start_and_plaintext_is_not_authenticated() {
    let err = GrpcTransport::bind(1, "c", &TransportConfig::default())
        .await
        .err()
        .expect("no TLS configured must be refused");
    assert!(
        matches!(&err, TransportError::Setup(m) if m.contains("InsecurePlaintext")),
        "{err}"
    );
    let plain = bind(1).await;
    assert!(!plain.authenticates_peers());
    plain.shutdown().await;
}

/// A port nothing listens on (bound once, then released).
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_an_address_nobody_listens_on_is_unreachable() {
    let a = bind(1).await;
    a.set_peer(2, closed_port());
    let err = a
        .call(2, Bytes::from_static(b"hi"), 5 * SECOND)
        .await
        .expect_err("nobody listens");
    assert!(
        matches!(err, TransportError::Unreachable { peer: 2, .. }),
        "{err}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_before_the_handler_is_installed_is_unreachable() {
    let a = bind(1).await;
    let b = bind(2).await;
    a.set_peer(2, b.local_addr().to_string());
    let err = a
        .call(2, Bytes::from_static(b"early"), 5 * SECOND)
        .await
        .expect_err("no handler yet");
    assert!(
        matches!(err, TransportError::Unreachable { peer: 2, .. }),
        "{err}"
    );
    let echo = Arc::new(Echo::default());
    b.set_handler(echo.clone());
    assert_eq!(
        a.call(2, Bytes::from_static(b"now"), 5 * SECOND).await,
        Ok(Bytes::from_static(b"now"))
    );
    assert_eq!(*echo.calls.lock(), 1, "the refused call never reached it");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_after_the_request_went_out_is_not_unreachable() {
    // A server that accepts the connection, reads until the request's payload has arrived,
    // then drops the connection without answering.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let marker = b"deliver-me-exactly-once";
    let server = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.expect("accept");
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(marker.len()).any(|w| w == marker) {
            let n = socket.read(&mut buf).await.expect("read");
            assert!(n > 0, "the client closed before sending its request");
            seen.extend_from_slice(&buf[..n]);
        }
    });
    let a = bind(1).await;
    a.set_peer(2, addr.to_string());
    let err = a
        .call(2, Bytes::from_static(marker), 5 * SECOND)
        .await
        .expect_err("the connection is gone");
    tokio::time::timeout(5 * SECOND, server)
        .await
        .expect("the request reached the server")
        .expect("fake server");
    assert!(
        !matches!(
            err,
            TransportError::Unreachable { .. }
                | TransportError::UnknownPeer(_)
                | TransportError::QueueFull(_)
                | TransportError::FrameTooLarge { .. }
        ),
        "the request was sent, yet the error promises it was not: {err}"
    );
    a.shutdown().await;
}
