//! Helpers for transport implementations; embedders never need this.
//!
//! Every [`Transport`](crate::Transport) keeps the same three pieces of bookkeeping beside its
//! connection handling, and they are shared here so the rules live once:
//! - [`PeerTable`]: node id -> address and the transport's per-peer state, with the
//!   "same address keeps the peer, a new address replaces it" rule of `set_peer`.
//! - [`Backoff`]: reconnect delays from `reconnect_backoff_min` doubling up to
//!   `reconnect_backoff_max`, starting over after a healthy connection. A plain value: the caller
//!   sleeps, so tests need no clock.
//! - [`HandlerSlot`]: the installed [`InboundHandler`], with the contract's rule that frames
//!   arriving before one is installed are refused ([`NoHandler`]).
//!
//! What a connection is, how it is dialed and how its failures are classified stays in each
//! transport.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use crate::{InboundHandler, NodeId, TransportConfig, TransportError};

/// Exponential reconnect delays: `min`, doubling on each failure up to `max`, back to `min` after
/// a success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A connection that stayed up at least this long counts as a success: losing it starts the
    /// backoff over instead of doubling it. Long enough that a peer accepting and dropping every
    /// connection at once (a crash loop, a refusal) still backs off.
    pub const HEALTHY: Duration = Duration::from_secs(1);

    /// Delays from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The delays `config` names (`reconnect_backoff_min`, `reconnect_backoff_max`).
    pub fn from_config(config: &TransportConfig) -> Self {
        Self::new(config.reconnect_backoff_min, config.reconnect_backoff_max)
    }

    /// The delay to wait before the next attempt; the one after it is twice as long, at most
    /// `max`.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        // Saturating: a configured maximum near `Duration::MAX` must not panic the peer task.
        self.next = delay.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over at `min`, after a success.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// A connection ended after being up for `lived`: starts over when it was healthy
    /// ([`Backoff::HEALTHY`]). Returns whether it did.
    pub fn reset_if_healthy(&mut self, lived: Duration) -> bool {
        let healthy = lived >= Self::HEALTHY;
        if healthy {
            self.reset();
        }
        healthy
    }
}

/// Drops every frame waiting in a peer's one-way queue (after a lost connection or a failed
/// attempt: they were meant for a connection that no longer exists) and returns how many.
pub fn discard_queued<T>(queue: &mut tokio::sync::mpsc::Receiver<T>) -> usize {
    let mut dropped = 0;
    while queue.try_recv().is_ok() {
        dropped += 1;
    }
    dropped
}

/// No inbound handler is installed yet (or any more, after shutdown): the frame was refused
/// before reaching one, so a caller told so may safely retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("node not ready: no handler installed")]
pub struct NoHandler;

/// The installed inbound handler, shared between a transport and its server tasks (clones share
/// one slot).
///
/// The contract's rule: frames arriving before a handler is installed are refused. One-way
/// frames are dropped ([`HandlerSlot::deliver`]); a call is answered with [`NoHandler`], which
/// the calling side reports as `Unreachable` (the frame provably reached no handler).
#[derive(Clone, Default)]
pub struct HandlerSlot {
    handler: Arc<RwLock<Option<Arc<dyn InboundHandler>>>>,
}

impl HandlerSlot {
    /// An empty slot: every frame is refused until [`HandlerSlot::set`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs `handler`, replacing any earlier one.
    pub fn set(&self, handler: Arc<dyn InboundHandler>) {
        *self.handler.write() = Some(handler);
    }

    /// Removes the handler (at shutdown): frames are refused again.
    pub fn clear(&self) {
        *self.handler.write() = None;
    }

    /// The handler for an inbound frame, or [`NoHandler`] when none is installed.
    pub fn get(&self) -> Result<Arc<dyn InboundHandler>, NoHandler> {
        self.handler.read().clone().ok_or(NoHandler)
    }

    /// Hands a one-way frame to the handler; drops it (Raft retransmits) and returns false when
    /// none is installed.
    pub fn deliver(&self, from: NodeId, frame: Bytes) -> bool {
        match self.get() {
            Ok(handler) => {
                handler.on_message(from, frame);
                true
            }
            Err(NoHandler) => {
                tracing::trace!(from, "no handler yet; dropping a one-way frame");
                false
            }
        }
    }
}

impl fmt::Debug for HandlerSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerSlot")
            .field("installed", &self.handler.read().is_some())
            .finish()
    }
}

/// The known peers of a transport: node id -> address and the transport's state for that peer
/// (`P`: its connection, queue and task).
///
/// The table only keeps the bookkeeping; stopping a peer it hands back (replaced, removed,
/// drained) is the transport's job, done outside the table's lock.
pub struct PeerTable<P> {
    peers: Mutex<HashMap<NodeId, Entry<P>>>,
}

struct Entry<P> {
    addr: String,
    peer: Arc<P>,
}

impl<P> Default for PeerTable<P> {
    fn default() -> Self {
        Self {
            peers: Mutex::new(HashMap::new()),
        }
    }
}

impl<P> PeerTable<P> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of peer `id`, or `UnknownPeer` when no address is known for it.
    pub fn get(&self, id: NodeId) -> Result<Arc<P>, TransportError> {
        self.peers
            .lock()
            .get(&id)
            .map(|e| e.peer.clone())
            .ok_or(TransportError::UnknownPeer(id))
    }

    /// The address known for peer `id`.
    pub fn addr(&self, id: NodeId) -> Option<String> {
        self.peers.lock().get(&id).map(|e| e.addr.clone())
    }

    /// Points `id` at `addr`, the rule of `Transport::set_peer`: an unchanged address keeps the
    /// current peer (and its connection); otherwise `start` makes the new peer's state and the
    /// peer it replaces is returned for the caller to stop. When `start` fails the table is left
    /// as it was.
    ///
    /// `start` runs under the table's lock, so concurrent calls for one id start one peer at a
    /// time; it must not use the table.
    pub fn set<E>(
        &self,
        id: NodeId,
        addr: String,
        start: impl FnOnce(&str) -> Result<P, E>,
    ) -> Result<Option<Arc<P>>, E> {
        let mut peers = self.peers.lock();
        if peers.get(&id).is_some_and(|e| e.addr == addr) {
            return Ok(None);
        }
        let peer = Arc::new(start(&addr)?);
        Ok(peers.insert(id, Entry { addr, peer }).map(|old| old.peer))
    }

    /// Forgets peer `id`; returns its state for the caller to stop.
    pub fn remove(&self, id: NodeId) -> Option<Arc<P>> {
        self.peers.lock().remove(&id).map(|e| e.peer)
    }

    /// Forgets every peer (at shutdown); returns their states for the caller to stop.
    pub fn drain(&self) -> Vec<Arc<P>> {
        self.peers.lock().drain().map(|(_, e)| e.peer).collect()
    }
}

impl<P> fmt::Debug for PeerTable<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let peers = self.peers.lock();
        f.debug_map()
            .entries(peers.iter().map(|(id, e)| (id, &e.addr)))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn backoff_starts_at_min_doubles_and_stops_at_max() {
        let mut b = Backoff::new(50 * MS, 300 * MS);
        let delays: Vec<_> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, [50 * MS, 100 * MS, 200 * MS, 300 * MS, 300 * MS]);
    }

    #[test]
    fn backoff_reset_starts_over_at_min() {
        let mut b = Backoff::new(50 * MS, 2000 * MS);
        b.next_delay();
        b.next_delay();
        b.reset();
        assert_eq!(b.next_delay(), 50 * MS);
        assert_eq!(b.next_delay(), 100 * MS);
    }

    #[test]
    fn backoff_starts_over_only_after_a_healthy_connection() {
        let mut b = Backoff::new(50 * MS, 2000 * MS);
        b.next_delay();
        assert!(!b.reset_if_healthy(Backoff::HEALTHY - MS));
        assert_eq!(
            b.next_delay(),
            100 * MS,
            "a short-lived connection keeps doubling"
        );
        assert!(b.reset_if_healthy(Backoff::HEALTHY));
        assert_eq!(b.next_delay(), 50 * MS);
    }

    #[test]
    fn backoff_takes_its_bounds_from_the_transport_config() {
        let config = TransportConfig {
            reconnect_backoff_min: 10 * MS,
            reconnect_backoff_max: 15 * MS,
            ..TransportConfig::default()
        };
        let mut b = Backoff::from_config(&config);
        assert_eq!(b.next_delay(), 10 * MS);
        assert_eq!(b.next_delay(), 15 * MS);
    }

    #[test]
    fn backoff_never_overflows() {
        let mut b = Backoff::new(Duration::MAX / 2 + MS, Duration::MAX);
        b.next_delay();
        assert_eq!(b.next_delay(), Duration::MAX);
        assert_eq!(b.next_delay(), Duration::MAX);
    }

    #[derive(Default)]
    struct Recorder {
        frames: Mutex<Vec<(NodeId, Bytes)>>,
    }

    #[async_trait]
    impl InboundHandler for Recorder {
        fn on_message(&self, from: NodeId, frame: Bytes) {
            self.frames.lock().push((from, frame));
        }
        async fn on_call(&self, _from: NodeId, frame: Bytes) -> Result<Bytes, String> {
            Ok(frame)
        }
    }

    #[test]
    fn frames_before_a_handler_is_installed_are_refused() {
        let slot = HandlerSlot::new();
        assert!(slot.get().is_err());
        assert!(!slot.deliver(1, Bytes::from_static(b"early")));
        assert_eq!(
            NoHandler.to_string(),
            "node not ready: no handler installed"
        );
    }

    #[test]
    fn an_installed_handler_gets_frames_until_it_is_cleared() {
        let slot = HandlerSlot::new();
        let shared = slot.clone();
        let rec = Arc::new(Recorder::default());
        slot.set(rec.clone());
        assert!(shared.get().is_ok(), "clones share the slot");
        assert!(shared.deliver(7, Bytes::from_static(b"x")));
        assert_eq!(*rec.frames.lock(), [(7, Bytes::from_static(b"x"))]);
        slot.clear();
        assert_eq!(shared.get().err(), Some(NoHandler));
        assert!(!shared.deliver(7, Bytes::from_static(b"late")));
        assert_eq!(rec.frames.lock().len(), 1);
    }

    fn start(addr: &str) -> Result<String, String> {
        Ok(addr.to_string())
    }

    #[test]
    fn an_unknown_peer_is_reported_as_such() {
        let table = PeerTable::<String>::new();
        assert_eq!(table.get(3).err(), Some(TransportError::UnknownPeer(3)));
        assert!(table.remove(3).is_none());
    }

    #[test]
    fn setting_the_same_address_keeps_the_peer() {
        let table = PeerTable::new();
        assert_eq!(table.set(2, "a:1".into(), start), Ok(None));
        let first = table.get(2).expect("known");
        let replaced = table.set(2, "a:1".into(), |_| -> Result<String, String> {
            panic!("an unchanged address must not start a new peer")
        });
        assert_eq!(replaced, Ok(None));
        assert!(Arc::ptr_eq(&first, &table.get(2).expect("known")));
    }

    #[test]
    fn a_new_address_replaces_the_peer_and_hands_back_the_old_one() {
        let table = PeerTable::new();
        table.set(2, "a:1".into(), start).expect("start");
        let old = table.set(2, "b:2".into(), start).expect("start");
        assert_eq!(old.as_deref().map(String::as_str), Some("a:1"));
        assert_eq!(*table.get(2).expect("known"), "b:2");
        assert_eq!(table.addr(2).as_deref(), Some("b:2"));
    }

    #[test]
    fn a_peer_that_cannot_start_leaves_the_table_as_it_was() {
        let table = PeerTable::new();
        table.set(2, "a:1".into(), start).expect("start");
        let failed = table.set(2, "bad".into(), |_| Err::<String, _>("no"));
        assert_eq!(failed, Err("no"));
        assert_eq!(*table.get(2).expect("still known"), "a:1");
        assert_eq!(
            table.set(3, "bad".into(), |_| Err::<String, _>("no")),
            Err("no")
        );
        assert!(table.get(3).is_err());
    }

    #[test]
    fn removed_and_drained_peers_are_handed_back_and_forgotten() {
        let table = PeerTable::new();
        for (id, addr) in [(1, "a:1"), (2, "b:2"), (3, "c:3")] {
            table.set(id, addr.into(), start).expect("start");
        }
        assert_eq!(table.remove(1).as_deref().map(String::as_str), Some("a:1"));
        assert!(table.get(1).is_err());
        let mut drained: Vec<String> = table.drain().iter().map(|p| p.to_string()).collect();
        drained.sort();
        assert_eq!(drained, ["b:2", "c:3"]);
        assert!(table.get(2).is_err() && table.get(3).is_err());
    }
}
