//! The admin API over HTTPS: a rustls handshake per connection (bounded in time), then HTTP/1.1
//! with the router. A client certificate the handshake verified is marked on every request of
//! its connection ([`VerifiedClientCertificate`]), which [`crate::admin::AdminAuth`] may take
//! as a credential. Connections live in the serving task: aborting it closes them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::admin::VerifiedClientCertificate;

pub use rustls::ServerConfig;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections open at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 256;

/// Serves `app` on `listener` over TLS with `config` until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, app: Router, config: Arc<rustls::ServerConfig>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("admin API: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if connections.len() >= MAX_CONNECTIONS {
            tracing::warn!(%peer, "admin API: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        }
        connections.spawn(connection(acceptor.clone(), tcp, peer, app.clone()));
    }
}

async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::info!(%peer, "admin API: TLS handshake refused: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "admin API: no TLS handshake within {HANDSHAKE_TIMEOUT:?}");
            return;
        }
    };
    let certificate = tls
        .get_ref()
        .1
        .peer_certificates()
        .is_some_and(|chain| !chain.is_empty());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if certificate {
            req.extensions_mut().insert(VerifiedClientCertificate);
        }
        app.clone().oneshot(req)
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
    {
        tracing::debug!(%peer, "admin API connection: {e}");
    }
}
