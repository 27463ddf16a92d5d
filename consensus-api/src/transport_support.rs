//! Helpers for transport implementations; embedders never need this. What both of our
//! transports (and most others) need in the same form: the slot holding the installed
//! [`InboundHandler`] and the reconnect backoff.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::{InboundHandler, TransportConfig};

/// The inbound handler a transport's server tasks hand frames to. Cheap to clone; every clone
/// sees the same handler. Empty until [`set`](Self::set): frames that arrive then are refused
/// (the [`Transport::set_handler`](crate::Transport::set_handler) rule).
#[derive(Clone, Default)]
pub struct HandlerSlot(Arc<RwLock<Option<Arc<dyn InboundHandler>>>>);

impl HandlerSlot {
    /// Installs `handler`, replacing any earlier one.
    pub fn set(&self, handler: Arc<dyn InboundHandler>) {
        *self.0.write() = Some(handler);
    }

    /// Removes the handler (at shutdown): later frames are refused.
    pub fn clear(&self) {
        *self.0.write() = None;
    }

    /// The installed handler, if any.
    pub fn get(&self) -> Option<Arc<dyn InboundHandler>> {
        self.0.read().clone()
    }
}

/// Reconnect backoff: `reconnect_backoff_min`, doubling after each failure up to
/// `reconnect_backoff_max`, back to the minimum after a healthy connection.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// The backoff of `config`.
    pub fn new(config: &TransportConfig) -> Self {
        let min = config.reconnect_backoff_min;
        let max = config.reconnect_backoff_max.max(min);
        Self {
            min,
            max,
            next: min,
        }
    }

    /// The wait before the next attempt; the one after it is twice as long (up to the max).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A connection proved healthy: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_max_and_resets_to_the_min() {
        let config = TransportConfig {
            reconnect_backoff_min: Duration::from_millis(50),
            reconnect_backoff_max: Duration::from_millis(300),
            ..TransportConfig::default()
        };
        let mut b = Backoff::new(&config);
        let waits: Vec<u64> = (0..5).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(waits, [50, 100, 200, 300, 300]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(50));
    }

    #[test]
    fn an_empty_slot_has_no_handler_until_set_and_after_clear() {
        struct Nop;
        #[async_trait::async_trait]
        impl InboundHandler for Nop {
            fn on_message(&self, _: crate::NodeId, _: bytes::Bytes) {}
            async fn on_call(
                &self,
                _: crate::NodeId,
                f: bytes::Bytes,
            ) -> Result<bytes::Bytes, String> {
                Ok(f)
            }
        }
        let slot = HandlerSlot::default();
        assert!(slot.get().is_none());
        let other = slot.clone();
        slot.set(Arc::new(Nop));
        assert!(other.get().is_some());
        other.clear();
        assert!(slot.get().is_none());
    }
}
