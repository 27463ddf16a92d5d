//! The inbound side: accept connections, admit the peer (hello: cluster id, certificate names the
//! claimed node), then serve its one-way stream and its calls, attributing every frame to the
//! verified node id.
//!
//! Tasks form a tree: the accept loop owns one task per connection (a `JoinSet`), and each
//! connection task owns its call tasks; aborting the accept loop (drop, shutdown, or the runtime
//! going away) ends everything below it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::transport_support::HandlerSlot;
use consensus_api::NodeId;
use quinn::{Connection, Incoming, ReadError, RecvStream, SendStream};
use rustls_pki_types::CertificateDer;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::wire::{self, FrameError, Hello, Status, CLOSE_REFUSED, STOP_MALFORMED, STOP_TOO_LARGE};
use crate::{Ctx, PeerMap};

/// How long a refusing server waits for the client to read why before closing the connection.
const REFUSE_LINGER: Duration = Duration::from_millis(500);

/// Accepts connections until the endpoint closes.
pub(crate) async fn accept_loop(ctx: Arc<Ctx>, handler: HandlerSlot, peers: PeerMap) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = ctx.endpoint.accept() => match incoming {
                Some(incoming) => {
                    connections.spawn(serve(ctx.clone(), handler.clone(), peers.clone(), incoming));
                }
                None => return,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// One inbound connection, from handshake to close.
async fn serve(ctx: Arc<Ctx>, handler: HandlerSlot, peers: PeerMap, incoming: Incoming) {
    let remote = incoming.remote_address();
    let conn = match tokio::time::timeout(ctx.config.connect_timeout, incoming).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "inbound handshake failed: {e}");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "inbound handshake timed out");
            return;
        }
    };
    let Some(hello) = greet(&ctx, &conn).await else {
        return;
    };
    let from = hello.node;
    tracing::debug!(%remote, from, "peer connected");
    if let Ok(peer) = peers.get(from) {
        peer.observe_incarnation(hello.incarnation);
    }

    let mut calls = JoinSet::new();
    // What this peer's calls may hold in memory at once (see `max_inflight_bytes_per_peer`).
    let budget = Arc::new(Semaphore::new(
        ctx.config
            .max_inflight_bytes_per_peer
            .max(ctx.frame_limit)
            .min(Semaphore::MAX_PERMITS),
    ));
    let one_way = one_way_lane(&ctx, &handler, &conn, from);
    tokio::pin!(one_way);
    loop {
        tokio::select! {
            () = &mut one_way => break,
            stream = conn.accept_bi() => match stream {
                Ok((send, recv)) => {
                    let call = serve_call(ctx.clone(), handler.clone(), from, budget.clone(), send, recv);
                    calls.spawn(call);
                }
                Err(e) => {
                    tracing::debug!(from, "connection closed: {e}");
                    break;
                }
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
        }
    }
}

/// Reads the client's hello and admits or refuses it; `None` when the connection is refused or
/// gone.
async fn greet(ctx: &Ctx, conn: &Connection) -> Option<Hello> {
    let remote = conn.remote_address();
    let budget = ctx.config.connect_timeout;
    let (mut send, mut recv) = match tokio::time::timeout(budget, conn.accept_bi()).await {
        Ok(Ok(streams)) => streams,
        Ok(Err(e)) => {
            tracing::debug!(%remote, "connection closed before its hello: {e}");
            return None;
        }
        Err(_) => {
            tracing::debug!(%remote, "no hello within {budget:?}");
            conn.close(CLOSE_REFUSED, b"no hello");
            return None;
        }
    };
    let read = tokio::time::timeout(budget, wire::read_frame(&mut recv, wire::MAX_HELLO)).await;
    let verdict = match read {
        Ok(Ok(Some(bytes))) => Hello::decode(&bytes),
        Ok(Ok(None)) => Err("empty hello".to_string()),
        Ok(Err(e)) => Err(format!("unreadable hello: {e}")),
        Err(_) => Err(format!("no complete hello within {budget:?}")),
    }
    .and_then(|hello| admit(ctx, conn, &hello).map(|()| hello));

    match verdict {
        Ok(hello) => {
            let incarnation = Bytes::copy_from_slice(&ctx.incarnation.to_be_bytes());
            let sent = wire::write_reply(&mut send, Status::Ok, incarnation).await;
            let _ = send.finish();
            match sent {
                Ok(()) => Some(hello),
                Err(e) => {
                    tracing::debug!(%remote, "cannot accept the peer's hello: {e}");
                    None
                }
            }
        }
        Err(reason) => {
            tracing::warn!(%remote, "refusing a peer: {reason}");
            let body = Bytes::from(format!("refused by node {}: {reason}", ctx.id));
            let _ = wire::write_reply(&mut send, Status::Refused, body).await;
            let _ = send.finish();
            // Let the client read why (it closes on its own), then make sure the connection goes.
            let _ = tokio::time::timeout(REFUSE_LINGER, conn.closed()).await;
            conn.close(CLOSE_REFUSED, wire::close_reason(&reason));
            None
        }
    }
}

/// The admission rules: same cluster, and a certificate naming the node the peer claims to be.
/// Synchronous on purpose: the peer identity is a non-`Send` `Box<dyn Any>` that must not live
/// across an await.
fn admit(ctx: &Ctx, conn: &Connection, hello: &Hello) -> Result<(), String> {
    if hello.cluster_id != ctx.cluster_id {
        return Err(format!(
            "peer claiming node {} belongs to cluster {:?}, this node to cluster {:?}",
            hello.node, hello.cluster_id, ctx.cluster_id
        ));
    }
    let certs = conn
        .peer_identity()
        .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| "the peer presented no certificate".to_string())?;
    let cert = certs
        .first()
        .ok_or_else(|| "the peer presented an empty certificate chain".to_string())?;
    consensus_tls::verify_peer_id(cert, hello.node)
        .map_err(|e| format!("the peer claims to be node {}, but {e}", hello.node))
}

/// Delivers the connection's one-way frames in order: unidirectional streams are served one
/// after the other (a sender opens the next only after the previous one failed).
async fn one_way_lane(ctx: &Ctx, handler: &HandlerSlot, conn: &Connection, from: NodeId) {
    loop {
        let Ok(mut recv) = conn.accept_uni().await else {
            return;
        };
        loop {
            match wire::read_frame(&mut recv, ctx.frame_limit).await {
                Ok(Some(frame)) => {
                    handler.deliver(from, frame);
                }
                Ok(None) => break,
                Err(FrameError::TooLarge { size, limit }) => {
                    tracing::warn!(
                        from,
                        size,
                        limit,
                        "one-way frame above the frame limit; refusing the rest of its stream"
                    );
                    let _ = recv.stop(STOP_TOO_LARGE);
                    break;
                }
                Err(FrameError::Read(ReadError::ConnectionLost(_))) => return,
                Err(e) => {
                    tracing::warn!(from, "dropping a broken one-way stream: {e}");
                    let _ = recv.stop(STOP_MALFORMED);
                    break;
                }
            }
        }
    }
}

/// One call: read the request, run the handler, write the reply.
async fn serve_call(
    ctx: Arc<Ctx>,
    handler: HandlerSlot,
    from: NodeId,
    budget: Arc<Semaphore>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let limit = ctx.frame_limit;
    // Held until the answer is written: the request's bytes count against the peer's budget.
    let mut _held = None;
    let (status, body) = match wire::read_frame_within(&mut recv, limit, &budget).await {
        Ok(Some((request, permit))) => {
            _held = Some(permit);
            // Refused before any handler saw it: the caller reports `Unreachable`.
            let handler = match handler.get() {
                Ok(handler) => handler,
                Err(not_ready) => {
                    let body = Bytes::from(not_ready.to_string());
                    return reply(&mut send, from, Status::NotReady, body).await;
                }
            };
            // The caller gave up (deadline, cancellation): stop working on its behalf, as a
            // gRPC server drops a handler whose stream was reset.
            let abandoned = send.stopped();
            tokio::select! {
                answer = handler.on_call(from, request) => match answer {
                    Ok(body) if body.len() > limit => (
                        Status::Failed,
                        Bytes::from(format!(
                            "the answer of {} bytes exceeds the frame limit of {limit} bytes",
                            body.len()
                        )),
                    ),
                    Ok(body) => (Status::Ok, body),
                    Err(message) => (Status::Failed, Bytes::from(message)),
                },
                _ = abandoned => return,
            }
        }
        Ok(None) => (Status::Refused, Bytes::from_static(b"empty call")),
        Err(FrameError::TooLarge { size, limit }) => {
            tracing::warn!(
                from,
                size,
                limit,
                "refusing a call frame above the frame limit"
            );
            let _ = recv.stop(STOP_TOO_LARGE);
            (
                Status::Refused,
                Bytes::from(format!(
                    "frame of {size} bytes exceeds the receiver's limit of {limit} bytes"
                )),
            )
        }
        Err(FrameError::Read(ReadError::ConnectionLost(_))) => return,
        Err(e) => {
            tracing::warn!(from, "dropping a broken call stream: {e}");
            let _ = recv.stop(STOP_MALFORMED);
            (Status::Refused, Bytes::from(format!("malformed call: {e}")))
        }
    };
    reply(&mut send, from, status, body).await;
}

async fn reply(send: &mut SendStream, from: NodeId, status: Status, body: Bytes) {
    match wire::write_reply(send, status, body).await {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => tracing::debug!(from, "cannot deliver a call's answer: {e}"),
    }
}
