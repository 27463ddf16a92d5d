//! What runs on each node of a [`LocalCluster`](crate::LocalCluster).

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use consensus_api::{
    Backend, Consensus, ConsensusError, NodeConfig, NodeId, StateMachine, Status, Transport,
};

use crate::kv::KvMachine;
use crate::LocalCluster;

/// Starts, observes and stops the program that runs on one node: a plain consensus node, or a
/// program built on one (the broker runs its controller and admin API beside it).
#[async_trait]
pub trait NodeKind: Send + Sync + 'static {
    /// The running node's handle.
    type Node: Send + Sync + 'static;

    /// Starts a node from its configuration on an already bound `transport`. Runs on the
    /// node's own runtime (when the cluster has one): everything it spawns dies with a crash.
    async fn start(
        &self,
        backend: Arc<dyn Backend>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Self::Node, ConsensusError>;

    /// The node's current consensus status.
    fn status(node: &Self::Node) -> Status;

    /// Stops the node gracefully (flushes storage, closes the transport).
    async fn shutdown(node: &Self::Node) -> Result<(), ConsensusError>;
}

/// Plain consensus nodes replicating `SM` (started from `SM::default()`).
pub struct Machines<SM>(PhantomData<fn() -> SM>);

impl<SM> Default for Machines<SM> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

#[async_trait]
impl<SM: StateMachine + Default> NodeKind for Machines<SM> {
    type Node = Consensus<SM>;

    async fn start(
        &self,
        backend: Arc<dyn Backend>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Consensus<SM>, ConsensusError> {
        Consensus::start(&*backend, config, SM::default(), transport).await
    }

    fn status(node: &Consensus<SM>) -> Status {
        node.status()
    }

    async fn shutdown(node: &Consensus<SM>) -> Result<(), ConsensusError> {
        node.shutdown().await
    }
}

impl<SM: StateMachine + Default> LocalCluster<Machines<SM>> {
    /// Proposes `command` through node `id`, on its runtime.
    pub async fn propose(
        &self,
        id: NodeId,
        command: SM::Command,
    ) -> Result<SM::Response, ConsensusError> {
        self.on(id, move |n| async move { n.propose(command).await })
            .await
    }

    /// The state machine of node `id`, read locally (no barrier).
    pub fn machine(&self, id: NodeId) -> SM
    where
        SM: Clone,
    {
        self.node(id).read_local(|sm| sm.clone())
    }
}

impl LocalCluster<Machines<KvMachine>> {
    /// Proposes a `Put` through node `id`.
    pub async fn put(&self, id: NodeId, key: &str, value: &str) -> Result<(), ConsensusError> {
        self.propose(id, crate::kv::put(key, value))
            .await
            .map(|_| ())
    }

    /// A linearizable read of `key` through node `id`.
    pub async fn get(&self, id: NodeId, key: &str) -> Result<Option<String>, ConsensusError> {
        let key = key.to_string();
        self.on(
            id,
            move |n| async move { n.read(move |sm| sm.get(&key)).await },
        )
        .await
    }
}
