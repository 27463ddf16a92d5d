//! The leader's reply routes: which open replication stream a follower's `Reply` or `Reset`
//! belongs to, and where a peer's address comes from when the transport does not know it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use consensus_api::NodeId;
use openraft::async_runtime::WatchReceiver;
use openraft::raft::StreamAppendResult;
use openraft::type_config::alias::WatchReceiverOf;
use openraft::RaftMetrics;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::stream::MAX_IN_FLIGHT;
use crate::types::C;
use crate::OpenRaft;

/// What the leader side of a stream receives from its follower.
pub(crate) enum Inbound {
    Reply {
        seq: u64,
        result: Result<StreamAppendResult<C>, String>,
    },
    Reset {
        reason: String,
    },
}

/// Where the replies of one open stream go.
struct Route {
    target: NodeId,
    tx: mpsc::Sender<Inbound>,
}

/// The replication streams this node has open as a leader, by session id.
///
/// Shared by [`super::NetworkFactory`], whose clients open streams, and [`super::RaftHandler`],
/// which delivers the replies arriving on the transport to them.
pub(crate) struct StreamRoutes {
    routes: Mutex<HashMap<u64, Route>>,
    next_session: AtomicU64,
    /// This node's metrics (set by [`super::RaftHandler::new`]), to announce its own address,
    /// as its membership records it, to the followers it opens streams to.
    metrics: OnceLock<WatchReceiverOf<C, RaftMetrics<C>>>,
}

impl StreamRoutes {
    /// An empty set of routes. Session ids start from the clock, so a restarted leader does not
    /// reuse the ids its previous process used with the same followers.
    pub(crate) fn new() -> Arc<Self> {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Arc::new(Self {
            routes: Mutex::default(),
            next_session: AtomicU64::new(seed),
            metrics: OnceLock::new(),
        })
    }

    /// Records this node's metrics, once; a second handler for the same routes would announce
    /// the same node, so later calls change nothing.
    pub(crate) fn set_metrics(&self, metrics: WatchReceiverOf<C, RaftMetrics<C>>) {
        let _ = self.metrics.set(metrics);
    }

    /// The address node `me` has in its own membership, once the metrics are known.
    pub(crate) fn own_address(&self, me: NodeId) -> Option<String> {
        address_in(&self.metrics.get()?.borrow_watched(), me)
    }

    /// Registers a new stream to `target`; returns its session id and its reply queue.
    pub(crate) fn open(&self, target: NodeId) -> (u64, mpsc::Receiver<Inbound>) {
        let session = self.next_session.fetch_add(1, Ordering::Relaxed);
        // At most one reply per request in flight, plus a `Reset`.
        let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT + 1);
        self.routes.lock().insert(session, Route { target, tx });
        (session, rx)
    }

    /// Forgets stream `session`; its later replies are dropped.
    pub(crate) fn close(&self, session: u64) {
        self.routes.lock().remove(&session);
    }

    /// Hands a follower's answer to the stream it belongs to; never blocks.
    pub(crate) fn deliver(&self, from: NodeId, session: u64, msg: Inbound) {
        let routes = self.routes.lock();
        match routes.get(&session) {
            Some(route) if route.target == from => {
                // Full only if the follower answers more than was sent: the stream then sees a
                // gap and fails.
                if route.tx.try_send(msg).is_err() {
                    tracing::debug!(from, session, "stream reply queue full; reply dropped");
                }
            }
            Some(route) => tracing::warn!(
                from,
                session,
                expected = route.target,
                "stream reply from a node that is not the stream's target; dropped"
            ),
            None => tracing::trace!(from, session, "reply for a closed stream; dropped"),
        }
    }

    /// How many streams are open.
    #[cfg(test)]
    pub(crate) fn open_streams(&self) -> usize {
        self.routes.lock().len()
    }
}

/// The address the membership gives `node`, if any.
pub(crate) fn address_in(metrics: &RaftMetrics<C>, node: NodeId) -> Option<String> {
    metrics
        .membership_config
        .membership()
        .get_node(&node)
        .map(|n| n.addr.clone())
}

/// Waits up to `wait` for the membership to name `node`'s address (a learner that joined later
/// learns its leader's address from the log the leader is replicating to it).
pub(crate) async fn wait_for_address(
    raft: &OpenRaft,
    node: NodeId,
    wait: Duration,
) -> Option<String> {
    let mut metrics = raft.metrics();
    let deadline = Instant::now() + wait;
    loop {
        let found = address_in(&metrics.borrow_watched(), node);
        if found.is_some() {
            return found;
        }
        match tokio::time::timeout_at(deadline, metrics.changed()).await {
            Ok(Ok(())) => {}
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(seq: u64) -> Inbound {
        Inbound::Reply {
            seq,
            result: Ok(Ok(None)),
        }
    }

    #[test]
    fn a_reply_reaches_its_open_stream_only_from_the_stream_target() {
        let routes = StreamRoutes::new();
        let (session, mut rx) = routes.open(2);
        routes.deliver(3, session, reply(0));
        assert!(rx.try_recv().is_err(), "node 3 is not the stream's target");
        routes.deliver(2, session, reply(0));
        assert!(matches!(rx.try_recv(), Ok(Inbound::Reply { seq: 0, .. })));
    }

    #[test]
    fn replies_for_a_closed_or_unknown_session_are_dropped() {
        let routes = StreamRoutes::new();
        let (old, mut old_rx) = routes.open(2);
        let (new, mut new_rx) = routes.open(2);
        assert_ne!(old, new, "every stream gets its own session id");
        routes.close(old);
        routes.deliver(2, old, reply(0));
        routes.deliver(2, new.wrapping_add(1), reply(0));
        assert!(old_rx.try_recv().is_err(), "a closed stream gets nothing");
        assert!(new_rx.try_recv().is_err(), "nor does another session");
        assert_eq!(routes.open_streams(), 1);
    }

    #[test]
    fn a_follower_answering_more_than_was_sent_cannot_block_delivery() {
        let routes = StreamRoutes::new();
        let (session, mut rx) = routes.open(2);
        for seq in 0..(MAX_IN_FLIGHT as u64 + 5) {
            routes.deliver(2, session, reply(seq));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, MAX_IN_FLIGHT + 1, "the excess is dropped, not queued");
    }
}
