//! The outbound side of one peer.
//!
//! A peer task owns the connection's life: it dials on demand (a queued frame or a call), keeps
//! one long-lived unidirectional stream fed from the bounded queue of one-way frames, and after
//! a failure or loss waits out an exponential backoff before the next attempt. Calls do not dial
//! themselves: they read the connection state the task publishes and ask it for a connection,
//! so there is never more than one connection (or dial) per peer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use consensus_api::transport_support::{discard_queued, Backoff};
use consensus_api::{NodeId, TransportError};
use quinn::{Connection, WriteError};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::wire::{self, Hello, SendError, Status, CLOSE_NORMAL, CLOSE_REFUSED, CLOSE_STALE};
use crate::{errors, Ctx};

/// The connection state of one peer, published by its task.
#[derive(Clone)]
enum Link {
    /// No connection; the next demand dials at once.
    Idle,
    /// The task is dialing.
    Dialing,
    /// Connected to the peer process identified by `incarnation`.
    Up { conn: Connection, incarnation: u64 },
    /// The last attempt failed; no new one before `until`.
    Down {
        error: TransportError,
        until: Instant,
    },
    /// The peer was removed or replaced, or the transport shut down.
    Stopped(TransportError),
}

/// How a connection's one-way pump ended.
enum PumpEnd {
    /// The connection failed; reconnect per the backoff rules.
    Lost(String),
    /// Every queue sender is gone: the peer was dropped.
    QueueClosed,
}

/// A peer: its address, its queue of one-way frames, and the task that serves both.
pub(crate) struct Peer {
    link: Arc<PeerLink>,
    queue: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
}

/// What the peer handle, its task, and in-flight calls share.
struct PeerLink {
    ctx: Arc<Ctx>,
    id: NodeId,
    addr: String,
    state: watch::Sender<Link>,
    demand: Notify,
}

impl Peer {
    /// Starts the peer's task on the transport's runtime; nothing is dialed until needed.
    pub(crate) fn start(ctx: Arc<Ctx>, id: NodeId, addr: &str) -> Self {
        let (queue, rx) = mpsc::channel(ctx.config.peer_queue_capacity.max(1));
        let runtime = ctx.runtime.clone();
        let link = Arc::new(PeerLink {
            ctx,
            id,
            addr: addr.to_string(),
            state: watch::Sender::new(Link::Idle),
            demand: Notify::new(),
        });
        let task = runtime.spawn(link.clone().run(rx));
        Self { link, queue, task }
    }

    /// Queues a one-way frame (its size is already checked).
    pub(crate) fn send(&self, frame: Bytes) -> Result<(), TransportError> {
        // In backoff the frame could only wait for a later connection, where it would be stale.
        if let Link::Down { error, until } = &*self.link.state.borrow() {
            if Instant::now() < *until {
                return Err(error.clone());
            }
        }
        self.queue
            .try_send(frame)
            .map_err(|e| TransportError::from_queue(self.link.id, e))
    }

    /// A call with its whole life (connecting included) bounded by `timeout`.
    pub(crate) async fn call(
        &self,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        match tokio::time::timeout(timeout, self.link.call(frame)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(timeout)),
        }
    }

    /// The peer introduced itself with `incarnation` on an inbound connection. If our outbound
    /// connection reaches another incarnation, that process is gone and the connection can only
    /// time out: drop it now so the next send or call reconnects to the live process.
    pub(crate) fn observe_incarnation(&self, incarnation: u64) {
        let stale = match &*self.link.state.borrow() {
            Link::Up {
                conn,
                incarnation: known,
            } if *known != incarnation => Some(conn.clone()),
            _ => None,
        };
        if let Some(conn) = stale {
            tracing::debug!(
                peer = self.link.id,
                "peer restarted; dropping the connection to its old process"
            );
            conn.close(CLOSE_STALE, b"peer restarted");
        }
    }

    /// Stops the task and closes the connection; waiting and later calls fail with `why`.
    pub(crate) fn stop(&self, why: TransportError) {
        self.task.abort();
        if let Link::Up { conn, .. } = self.link.state.send_replace(Link::Stopped(why)) {
            conn.close(CLOSE_NORMAL, b"peer removed");
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let stopped = matches!(*self.link.state.borrow(), Link::Stopped(_));
        if !stopped {
            self.stop(TransportError::Unreachable {
                peer: self.link.id,
                reason: "the peer was removed".into(),
            });
        }
    }
}

impl PeerLink {
    /// The peer task: dial on demand, pump one-way frames, back off after failures.
    async fn run(self: Arc<Self>, mut queue: mpsc::Receiver<Bytes>) {
        let mut backoff = Backoff::from_config(&self.ctx.config);
        let mut pending: Option<Bytes> = None;
        // `consensus_transport_reconnects_total`: connections made after the first.
        let reconnects = metrics::counter!(
            "consensus_transport_reconnects_total",
            "node" => self.ctx.id.to_string(),
            "peer" => self.id.to_string()
        );
        let mut connected_before = false;
        // Whether the peer's unreachability was reported: once per outage, not per attempt.
        let mut reported = false;
        loop {
            // Connect only when something needs the peer: idle peers cost nothing.
            if pending.is_none() {
                tokio::select! {
                    frame = queue.recv() => match frame {
                        Some(frame) => pending = Some(frame),
                        None => return,
                    },
                    () = self.demand.notified() => {}
                }
            }
            self.state.send_replace(Link::Dialing);
            let (conn, incarnation) = match self.dial().await {
                Ok(up) => up,
                Err(error) => {
                    match &error {
                        TransportError::Refused(why) => {
                            tracing::warn!(peer = self.id, addr = %self.addr, "peer refused us: {why}")
                        }
                        e if !reported => {
                            tracing::warn!(peer = self.id, addr = %self.addr, "{e} (retrying with backoff)")
                        }
                        e => {
                            tracing::debug!(peer = self.id, addr = %self.addr, "cannot reach peer: {e}")
                        }
                    }
                    reported = true;
                    // By the time a connection exists these frames are stale; Raft retransmits.
                    pending = None;
                    self.discard(&mut queue, "the connection attempt failed");
                    self.back_off(error, &mut backoff).await;
                    self.discard(&mut queue, "they were queued during the backoff");
                    continue;
                }
            };
            if std::mem::replace(&mut connected_before, true) {
                reconnects.increment(1);
            }
            if std::mem::take(&mut reported) {
                tracing::info!(peer = self.id, addr = %self.addr, "peer reachable again");
            } else {
                tracing::debug!(peer = self.id, addr = %self.addr, "connected");
            }
            let opened = Instant::now();
            self.state.send_replace(Link::Up {
                conn: conn.clone(),
                incarnation,
            });
            let reason = match self.pump(&conn, &mut queue, &mut pending).await {
                PumpEnd::Lost(reason) => reason,
                PumpEnd::QueueClosed => {
                    conn.close(CLOSE_NORMAL, b"peer removed");
                    return;
                }
            };
            tracing::debug!(peer = self.id, "connection lost: {reason}");
            pending = None;
            self.discard(&mut queue, "their connection was lost");
            // A healthy connection's loss reconnects at the next demand, with the backoff
            // started over; one lost right after it was made waits out the backoff.
            if backoff.reset_if_healthy(opened.elapsed()) {
                self.state.send_replace(Link::Idle);
            } else {
                let error = TransportError::Unreachable {
                    peer: self.id,
                    reason: format!("connection lost right after it was made: {reason}"),
                };
                self.back_off(error, &mut backoff).await;
                self.discard(&mut queue, "they were queued during the backoff");
            }
        }
    }

    /// Drops the queued one-way frames: they were meant for a connection that is gone.
    fn discard(&self, queue: &mut mpsc::Receiver<Bytes>, why: &str) {
        let dropped = discard_queued(queue);
        if dropped > 0 {
            tracing::debug!(peer = self.id, dropped, "dropped queued frames: {why}");
        }
    }

    /// Publishes `error` until the backoff's next delay elapses (calls fail fast meanwhile).
    async fn back_off(&self, error: TransportError, backoff: &mut Backoff) {
        let until = Instant::now() + backoff.next_delay();
        self.state.send_replace(Link::Down { error, until });
        tokio::time::sleep_until(until).await;
    }

    /// Feeds queued frames into one unidirectional stream at a time until the connection ends.
    async fn pump(
        &self,
        conn: &Connection,
        queue: &mut mpsc::Receiver<Bytes>,
        pending: &mut Option<Bytes>,
    ) -> PumpEnd {
        let closed = conn.closed();
        tokio::pin!(closed);
        // A frame whose stream the receiver stopped is retried once on a fresh stream: the stop
        // was usually meant for an earlier (oversized) frame.
        let mut retried = false;
        loop {
            let mut stream = match conn.open_uni().await {
                Ok(stream) => stream,
                Err(e) => return PumpEnd::Lost(e.to_string()),
            };
            let stopped = stream.stopped();
            tokio::pin!(stopped);
            loop {
                if pending.is_none() {
                    tokio::select! {
                        biased;
                        e = &mut closed => return PumpEnd::Lost(e.to_string()),
                        _ = &mut stopped => break,
                        frame = queue.recv() => match frame {
                            Some(frame) => *pending = Some(frame),
                            None => return PumpEnd::QueueClosed,
                        },
                    }
                }
                let Some(frame) = pending.clone() else {
                    continue;
                };
                match wire::write_frame(&mut stream, frame).await {
                    Ok(()) => {
                        *pending = None;
                        retried = false;
                    }
                    Err(SendError::Write(WriteError::ConnectionLost(e))) => {
                        return PumpEnd::Lost(e.to_string())
                    }
                    Err(SendError::Write(WriteError::Stopped(code))) => {
                        tracing::warn!(
                            peer = self.id,
                            %code,
                            "peer refused a one-way frame (larger than its frame limit?); \
                             continuing on a new stream"
                        );
                        if retried {
                            *pending = None;
                            retried = false;
                        } else {
                            retried = true;
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(peer = self.id, "dropping a one-way frame: {e}");
                        *pending = None;
                        break;
                    }
                }
            }
        }
    }

    /// Connects and introduces this node, within the connect timeout.
    async fn dial(&self) -> Result<(Connection, u64), TransportError> {
        let ctx = &self.ctx;
        let remote = resolve(&self.addr, ctx.local_addr)
            .await
            .map_err(|reason| {
                tracing::warn!(peer = self.id, "{reason}");
                TransportError::Unreachable {
                    peer: self.id,
                    reason,
                }
            })?;
        let connecting = ctx
            .endpoint
            .connect_with(
                ctx.client_config.clone(),
                remote,
                &consensus_tls::node_name(self.id),
            )
            .map_err(|e| TransportError::Unreachable {
                peer: self.id,
                reason: format!("cannot connect to {remote}: {e}"),
            })?;
        let budget = ctx.config.connect_timeout;
        let handshake = async move {
            let conn = connecting
                .await
                .map_err(|e| errors::connect_error(self.id, &self.addr, &e))?;
            let incarnation = self.hello(&conn).await?;
            Ok::<_, TransportError>((conn, incarnation))
        };
        match tokio::time::timeout(budget, handshake).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Unreachable {
                peer: self.id,
                reason: format!("no handshake with {remote} within {budget:?}"),
            }),
        }
    }

    /// Sends our hello; returns the incarnation of the peer process that accepted it.
    async fn hello(&self, conn: &Connection) -> Result<u64, TransportError> {
        let lost = |e: &quinn::ConnectionError| errors::connect_error(self.id, &self.addr, e);
        let malformed = |what: String| {
            TransportError::Refused(format!(
                "peer {} at {} broke the handshake: {what}",
                self.id, self.addr
            ))
        };
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| lost(&e))?;
        let hello = Hello {
            node: self.ctx.id,
            incarnation: self.ctx.incarnation,
            cluster_id: self.ctx.cluster_id.clone(),
        };
        match wire::write_frame(&mut send, hello.encode()).await {
            Ok(()) => {}
            Err(SendError::Write(WriteError::ConnectionLost(e))) => return Err(lost(&e)),
            Err(e) => return Err(malformed(e.to_string())),
        }
        let _ = send.finish();
        let reply = match wire::read_reply(&mut recv, wire::MAX_HELLO).await {
            Ok(reply) => reply,
            Err(wire::FrameError::Read(quinn::ReadError::ConnectionLost(e))) => {
                return Err(lost(&e))
            }
            Err(e) => return Err(malformed(e.to_string())),
        };
        match reply.status {
            Status::Ok => wire::decode_incarnation(&reply.body)
                .ok_or_else(|| malformed("the acceptance carries no incarnation".into())),
            Status::Refused => {
                conn.close(CLOSE_REFUSED, b"refused");
                Err(TransportError::Refused(format!(
                    "peer {} at {}: {}",
                    self.id,
                    self.addr,
                    wire::text(&reply.body)
                )))
            }
            other => Err(malformed(format!(
                "unexpected reply {other:?}: {}",
                wire::text(&reply.body)
            ))),
        }
    }

    /// Returns the live connection, asking the task for one if needed. Fails fast while the
    /// peer is in backoff, and with the outcome of the attempt it asked for otherwise.
    async fn connection(&self) -> Result<Connection, TransportError> {
        let mut state = self.state.subscribe();
        let mut asked = false;
        loop {
            let outcome = match &*state.borrow_and_update() {
                Link::Up { conn, .. } if conn.close_reason().is_none() => Some(Ok(conn.clone())),
                Link::Down { error, until } if asked || Instant::now() < *until => {
                    Some(Err(error.clone()))
                }
                Link::Stopped(error) => Some(Err(error.clone())),
                _ => None,
            };
            if let Some(outcome) = outcome {
                return outcome;
            }
            if !asked {
                self.demand.notify_one();
                asked = true;
            }
            if state.changed().await.is_err() {
                return Err(TransportError::Closed);
            }
        }
    }

    /// One request/response exchange on its own bidirectional stream.
    async fn call(&self, frame: Bytes) -> Result<Bytes, TransportError> {
        let conn = self.connection().await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| errors::connect_error(self.id, &self.addr, &e))?;
        let written = wire::write_frame(&mut send, frame).await;
        if written.is_ok() {
            let _ = send.finish();
        }
        // Even when writing failed, the peer may have answered why (a refused frame size).
        let outcome = match wire::read_reply(&mut recv, self.ctx.frame_limit).await {
            Ok(reply) => return errors::reply_result(self.id, reply),
            Err(read) => match written {
                Err(write) => errors::request_error(self.id, write),
                Ok(()) => errors::reply_error(self.id, read),
            },
        };
        Err(if self.ctx.is_closed() {
            TransportError::Closed
        } else {
            outcome
        })
    }
}

/// Resolves a peer address (`ip:port`, or `host:port` through the system resolver), preferring
/// the address family this node listens on.
async fn resolve(addr: &str, local: std::net::SocketAddr) -> Result<std::net::SocketAddr, String> {
    if let Ok(parsed) = addr.parse::<std::net::SocketAddr>() {
        return Ok(parsed);
    }
    let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve peer address {addr:?} (expected host:port): {e}"))?
        .collect();
    found
        .iter()
        .find(|a| a.is_ipv4() == local.is_ipv4())
        .or_else(|| found.first())
        .copied()
        .ok_or_else(|| format!("peer address {addr:?} resolves to no address"))
}
