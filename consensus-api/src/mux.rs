//! The multiplexer that shares one transport between the engine and the forwarding layer of
//! the node handle: each frame carries a one-byte channel tag. Internal to this crate.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use parking_lot::RwLock;

use crate::metrics::ChannelMetrics;
use crate::{InboundHandler, NodeId, Transport, TransportError, TransportLayer};

pub(crate) use crate::channel::{ENGINE as ENGINE_CHANNEL, FORWARD as FORWARD_CHANNEL};

type Handlers = Arc<RwLock<HashMap<u8, Weak<dyn InboundHandler>>>>;

/// The frame counters of the known channels (engine, forward, snapshot) and of any other tag.
type Counters = Arc<[ChannelMetrics; 4]>;

fn counters_of(counters: &Counters, tag: u8) -> &ChannelMetrics {
    &counters[usize::from(tag).min(3)]
}

/// Splits one transport into tagged channels.
///
/// A channel holds its handler weakly: whoever installs a handler keeps it alive (an engine
/// keeps its RPC handler, the node handle its forwarding handler). Handlers usually own the
/// engine, and the engine owns the transport, so a strong reference here would be a cycle that
/// keeps a dead node's storage open forever.
pub(crate) struct Mux {
    inner: Arc<dyn Transport>,
    handlers: Handlers,
    counters: Counters,
}

impl Mux {
    /// Takes over `inner`'s inbound handler.
    pub(crate) fn new(inner: Arc<dyn Transport>) -> Arc<Self> {
        let handlers: Handlers = Arc::default();
        let id = inner.local_id();
        let counters: Counters = Arc::new([0u8, 1, 2, u8::MAX].map(|t| ChannelMetrics::new(id, t)));
        inner.set_handler(Arc::new(MuxHandler {
            handlers: handlers.clone(),
            counters: counters.clone(),
        }));
        Arc::new(Self {
            inner,
            handlers,
            counters,
        })
    }

    /// A transport view whose frames carry `tag`.
    pub(crate) fn channel(&self, tag: u8) -> Arc<dyn Transport> {
        Arc::new(MuxChannel {
            inner: self.inner.clone(),
            tag,
            handlers: self.handlers.clone(),
            counters: self.counters.clone(),
        })
    }
}

struct MuxHandler {
    handlers: Handlers,
    counters: Counters,
}

impl MuxHandler {
    fn route(&self, frame: &Bytes) -> Result<(Arc<dyn InboundHandler>, Bytes), String> {
        let Some(&tag) = frame.first() else {
            return Err("empty frame".into());
        };
        counters_of(&self.counters, tag).received(frame.len());
        let handler = self
            .handlers
            .read()
            .get(&tag)
            .and_then(Weak::upgrade)
            .ok_or_else(|| format!("no handler for channel {tag}"))?;
        Ok((handler, frame.slice(1..)))
    }
}

#[async_trait]
impl InboundHandler for MuxHandler {
    fn on_message(&self, from: NodeId, frame: Bytes) {
        match self.route(&frame) {
            Ok((h, body)) => h.on_message(from, body),
            Err(e) => tracing::debug!(from, "dropping inbound frame: {e}"),
        }
    }

    async fn on_call(&self, from: NodeId, frame: Bytes) -> Result<Bytes, String> {
        let (h, body) = self.route(&frame)?;
        h.on_call(from, body).await
    }
}

/// One channel: tags outbound frames, and registers its handler under its tag.
struct MuxChannel {
    inner: Arc<dyn Transport>,
    tag: u8,
    handlers: Handlers,
    counters: Counters,
}

impl MuxChannel {
    fn tagged(&self, frame: &[u8]) -> Bytes {
        let mut buf = BytesMut::with_capacity(frame.len() + 1);
        buf.put_u8(self.tag);
        buf.put_slice(frame);
        buf.freeze()
    }
}

#[async_trait]
impl TransportLayer for MuxChannel {
    fn inner(&self) -> &Arc<dyn Transport> {
        &self.inner
    }
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        let result = self.inner.send(to, self.tagged(&frame));
        counters_of(&self.counters, self.tag).sent(frame.len() + 1, &result);
        result
    }
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let result = self.inner.call(to, self.tagged(&frame), timeout).await;
        counters_of(&self.counters, self.tag).sent(frame.len() + 1, &result);
        result
    }
    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        self.handlers
            .write()
            .insert(self.tag, Arc::downgrade(&handler));
    }
    /// Closes this channel only: the shared transport is shut down by the node handle.
    async fn shutdown(&self) {
        self.handlers.write().remove(&self.tag);
    }
}
