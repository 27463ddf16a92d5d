//! [`TransportLayer`]: a transport that wraps another and writes only what it adds (the tower
//! idea). Every method it does not override forwards to [`inner`](TransportLayer::inner), and
//! a blanket implementation makes every layer a [`Transport`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{InboundHandler, NodeId, Transport, TransportError};

/// A wrapper around a [`Transport`] (fault injection, metrics, channel tagging). Implement
/// [`inner`](Self::inner) and override the methods whose behaviour you change; the others
/// forward unchanged. A layer keeps the obligations written on [`Transport`].
#[async_trait]
pub trait TransportLayer: Send + Sync + 'static {
    /// The wrapped transport.
    fn inner(&self) -> &Arc<dyn Transport>;

    /// See [`Transport::send`].
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        self.inner().send(to, frame)
    }

    /// See [`Transport::call`].
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        self.inner().call(to, frame, timeout).await
    }

    /// See [`Transport::set_handler`].
    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        self.inner().set_handler(handler)
    }

    /// See [`Transport::shutdown`].
    async fn shutdown(&self) {
        self.inner().shutdown().await
    }

    /// See [`Transport::authenticates_peers`].
    fn authenticates_peers(&self) -> bool {
        self.inner().authenticates_peers()
    }
}

#[async_trait]
impl<L: TransportLayer> Transport for L {
    fn local_id(&self) -> NodeId {
        self.inner().local_id()
    }
    fn local_addr(&self) -> SocketAddr {
        self.inner().local_addr()
    }
    fn set_peer(&self, id: NodeId, addr: String) {
        self.inner().set_peer(id, addr)
    }
    fn remove_peer(&self, id: NodeId) {
        self.inner().remove_peer(id)
    }
    fn send(&self, to: NodeId, frame: Bytes) -> Result<(), TransportError> {
        TransportLayer::send(self, to, frame)
    }
    async fn call(
        &self,
        to: NodeId,
        frame: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        TransportLayer::call(self, to, frame, timeout).await
    }
    fn set_handler(&self, handler: Arc<dyn InboundHandler>) {
        TransportLayer::set_handler(self, handler)
    }
    async fn shutdown(&self) {
        TransportLayer::shutdown(self).await
    }
    fn authenticates_peers(&self) -> bool {
        TransportLayer::authenticates_peers(self)
    }
}
