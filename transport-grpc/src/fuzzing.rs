//! Entry points for fuzzing this transport's inbound request handling (`fuzz/` at the workspace
//! root holds the cargo-fuzz targets, and the conformance crate replays their corpus as ordinary
//! tests). Each takes arbitrary bytes and must return without panicking, whatever they are.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use consensus_api::transport_support::HandlerSlot;
use consensus_api::{InboundHandler, NodeId, TlsConfig, TransportConfig};
use http_body::{Body as HttpBody, Frame};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;

use crate::budget::{Budgeted, Budgets, Registration};
use crate::pb::peer_server::PeerServer;
use crate::server::PeerService;
use crate::{Identity, CLUSTER_HEADER, NODE_HEADER};

/// The frame limit of the fuzzed server: small, so the size check is reached.
const FUZZ_FRAME_LIMIT: usize = 4096;

/// Accepts every frame and answers a call with its own payload.
struct Echo;

#[async_trait]
impl InboundHandler for Echo {
    fn on_message(&self, _: NodeId, _: Bytes) {}

    async fn on_call(&self, _: NodeId, frame: Bytes) -> Result<Bytes, String> {
        Ok(frame)
    }
}

/// A request body handed over in the pieces the input chose (so gRPC's length-prefixed
/// messages are split across data frames at arbitrary places).
struct Pieces(VecDeque<Bytes>);

impl HttpBody for Pieces {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    service: Budgeted<PeerServer<PeerService>>,
    remote: SocketAddr,
    /// Keeps the fixture's connection budget registered.
    _registration: Registration,
}

fn fixture() -> Option<&'static Fixture> {
    static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();
    FIXTURE
        .get_or_init(|| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            let mut config = TransportConfig::default();
            config.max_frame_bytes = FUZZ_FRAME_LIMIT;
            config.max_inflight_bytes_per_peer = 4 * FUZZ_FRAME_LIMIT;
            config.tls = TlsConfig::InsecurePlaintext;
            let me = Arc::new(Identity {
                id: 1,
                cluster_id: "fuzz".into(),
                config,
                tls: None,
            });
            let handler = HandlerSlot::new();
            handler.set(Arc::new(Echo));
            let limit = FUZZ_FRAME_LIMIT + crate::FRAMING_SLACK;
            let budgets = Budgets::new(4 * limit);
            let remote = SocketAddr::from(([127, 0, 0, 1], 40_000));
            let registration = budgets.open(remote);
            let service = PeerServer::new(PeerService::new(me, handler))
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit);
            Some(Fixture {
                runtime,
                service: Budgeted::new(service, budgets),
                remote,
                _registration: registration,
            })
        })
        .as_ref()
}

/// Takes a length-prefixed field (one length byte) off the front of `data`.
fn field<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((&len, rest)) = data.split_first() else {
        return &[];
    };
    let (f, rest) = rest.split_at(usize::from(len).min(rest.len()));
    *data = rest;
    f
}

/// `data` as one request to the gRPC peer service, through the same layers a connection's
/// requests take (the per-connection budget, tonic's framing and size limit, the sender check):
/// the first byte picks `Call` or `Stream`, then come the `x-cluster-id` and `x-node-id` values
/// and the sizes of the body's pieces, and the rest is the request body (gRPC length-prefixed
/// messages). The request is answered, with a status or a response, and the whole answer read.
pub fn frames(data: &[u8]) {
    let _ = answer(data);
}

/// What [`frames`] got back: the `grpc-status` (from the headers or the trailers) and the
/// response body's bytes. `None` when the input made no request.
fn answer(data: &[u8]) -> Option<(Option<String>, Vec<u8>)> {
    let fx = fixture()?;
    let mut data = data;
    let (&kind, rest) = data.split_first()?;
    data = rest;
    let cluster = field(&mut data);
    let node = field(&mut data);
    let cuts = field(&mut data);
    let path = if kind & 1 == 0 {
        "/peer.Peer/Call"
    } else {
        "/peer.Peer/Stream"
    };
    let mut pieces = VecDeque::new();
    let mut body = Bytes::copy_from_slice(data);
    for &c in cuts {
        let at = usize::from(c).min(body.len());
        pieces.push_back(body.split_to(at));
    }
    pieces.push_back(body);
    let mut builder = http::Request::builder()
        .method(http::Method::POST)
        .uri(format!("http://127.0.0.1{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if kind & 2 == 0 {
        builder = builder.header(CLUSTER_HEADER, cluster);
    }
    if kind & 4 == 0 {
        builder = builder.header(NODE_HEADER, node);
    }
    // A header value that HTTP would not carry never reaches the server.
    let mut request = builder.body(Body::new(Pieces(pieces))).ok()?;
    request.extensions_mut().insert(TcpConnectInfo {
        local_addr: None,
        remote_addr: Some(fx.remote),
    });
    let service = fx.service.clone();
    fx.runtime.block_on(async move {
        let Ok(response) = service.oneshot(request).await;
        let status = |h: &http::HeaderMap| {
            h.get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let mut code = status(response.headers());
        let mut bytes = Vec::new();
        let mut body = response.into_body();
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            let Ok(frame) = frame else { break };
            match frame.into_data() {
                Ok(data) => bytes.extend_from_slice(&data),
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        code = code.or_else(|| status(trailers));
                    }
                }
            }
        }
        Some((code, bytes))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A well-formed call with a gRPC message: `[kind][cluster][node][cuts]` then the body.
    fn call(cluster: &str, node: &str, message: &[u8]) -> Vec<u8> {
        let mut v = vec![0, cluster.len() as u8];
        v.extend_from_slice(cluster.as_bytes());
        v.push(node.len() as u8);
        v.extend_from_slice(node.as_bytes());
        v.extend_from_slice(&[2, 3, 4]);
        v.extend_from_slice(message);
        v
    }

    fn code(data: &[u8]) -> Option<String> {
        answer(data).and_then(|(code, _)| code)
    }

    #[test]
    fn requests_reach_the_handler_or_get_a_clear_status() {
        // A Frame { payload = "hi" } as a gRPC message: flag 0, length 4, protobuf bytes.
        let frame = [0, 0, 0, 0, 4, 0x0a, 2, b'h', b'i'];
        let Some((ok, body)) = answer(&call("fuzz", "2", &frame)) else {
            panic!("no answer");
        };
        assert_eq!(ok.as_deref(), Some("0"));
        assert_eq!(body, frame, "the echo handler answers the payload");
        assert_eq!(code(&call("other", "2", &frame)).as_deref(), Some("7"));
        assert_eq!(code(&call("fuzz", "x", &frame)).as_deref(), Some("3"));
        // A message that claims more than the limit, a compressed flag, a truncated header.
        assert_eq!(
            code(&call("fuzz", "2", &[0, 0xff, 0xff, 0xff, 0xff, 1])).as_deref(),
            Some("11")
        );
        assert_ne!(
            code(&call("fuzz", "2", &[1, 0, 0, 0, 1, 0])).as_deref(),
            Some("0")
        );
        assert_ne!(code(&call("fuzz", "2", &[0, 0])).as_deref(), Some("0"));
        let mut stream = call("fuzz", "2", &frame);
        stream[0] = 1;
        assert_eq!(code(&stream).as_deref(), Some("0"));
        frames(&[]);
        frames(&[6, 200]);
    }
}
