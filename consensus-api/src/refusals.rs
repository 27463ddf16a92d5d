//! [`RefusedMessages`]: how a backend counts and reports the peer messages it refuses before
//! they reach its engine.

use std::fmt::Display;
use std::sync::Arc;

use tokio::sync::watch;

use crate::NodeId;

/// A refusal is logged at `warn` the first time and then once every this many, so a peer that
/// keeps sending the same bad message cannot flood the log; the others go to `debug`.
pub const REFUSAL_LOG_EVERY: u64 = 1024;

/// The count of peer messages a node refused because they would break its engine's invariants
/// (an identity that is not the authenticated sender, a commit index beyond the local log,
/// entries that are not contiguous, ...), shown as [`Status::refused_messages`](crate::Status).
///
/// Cheap to clone (all clones share one count) and safe to use from any thread: the transport's
/// handler and the engine's own task both record into it. [`RefusedMessages::subscribe`] wakes a
/// status publisher on every refusal.
#[derive(Debug, Clone)]
pub struct RefusedMessages {
    node: NodeId,
    count: Arc<watch::Sender<u64>>,
}

impl RefusedMessages {
    /// A zero count for node `node` (named in its log lines).
    pub fn new(node: NodeId) -> Self {
        Self {
            node,
            count: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Counts one refused message of `kind` from `from`, and logs `why` (at `warn` for the first
    /// and every [`REFUSAL_LOG_EVERY`]th refusal, at `debug` otherwise).
    pub fn record(&self, from: NodeId, kind: &str, why: impl Display) {
        let mut total = 0;
        self.count.send_modify(|c| {
            *c += 1;
            total = *c;
        });
        if total == 1 || total.is_multiple_of(REFUSAL_LOG_EVERY) {
            tracing::warn!(
                node = self.node,
                from,
                kind,
                refused_so_far = total,
                "refused a peer message that would break the engine's invariants: {why}"
            );
        } else {
            tracing::debug!(
                node = self.node,
                from,
                kind,
                "refused a peer message: {why}"
            );
        }
    }

    /// How many messages were refused so far.
    pub fn count(&self) -> u64 {
        *self.count.borrow()
    }

    /// A watch of the count, marked changed on every refusal.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.count.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clone_counts_into_one_total_and_wakes_subscribers() {
        let refused = RefusedMessages::new(1);
        let mut rx = refused.subscribe();
        let other = refused.clone();
        refused.record(2, "test", "first");
        other.record(3, "test", "second");
        assert_eq!(refused.count(), 2);
        assert!(rx.has_changed().unwrap_or(false), "a subscriber is woken");
        assert_eq!(*rx.borrow_and_update(), 2);
    }
}
