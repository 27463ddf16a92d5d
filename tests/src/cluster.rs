//! A cluster of real nodes for the scenarios: real transports on 127.0.0.1 (port 0), real data
//! directories with fsync, each node on its own tokio runtime so that a crash can be simulated by
//! killing the runtime (every task, connection and timer of the node dies at once, nothing is
//! flushed or shut down politely).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{
    Backend, Consensus, ConsensusError, NodeConfig, NodeId, Role, StateMachine, Status, TlsConfig,
    TransportFactory,
};
use tokio::runtime::Runtime;
use tokio::time::Instant;

use crate::fault::{Faults, FaultyTransport};
use crate::kv::KvMachine;

/// The node handle type the key-value scenarios use.
pub type Node = Consensus<KvMachine>;

/// A cluster of the key-value test machine, what most scenarios use.
pub type Cluster = SmCluster<KvMachine>;

/// How long a restarting node may wait for its old port and data-dir lock to be released.
const RESTART_DEADLINE: Duration = Duration::from_secs(10);

/// One backend x transport combination under test.
#[derive(Clone)]
pub struct Combo {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// The transport.
    pub transport: Arc<dyn TransportFactory>,
}

impl Combo {
    /// A combination of a backend and a transport.
    pub fn new(backend: impl Backend, transport: impl TransportFactory) -> Self {
        Self {
            backend: Arc::new(backend),
            transport: Arc::new(transport),
        }
    }

    /// `backend_transport`, as in test names.
    pub fn name(&self) -> String {
        format!("{}_{}", self.backend.name(), self.transport.name())
    }
}

struct Member<SM: StateMachine> {
    addr: SocketAddr,
    data_dir: PathBuf,
    initial: BTreeMap<NodeId, String>,
    runtime: Option<Runtime>,
    node: Option<Consensus<SM>>,
}

/// A test cluster of nodes replicating `SM`. Dropping it kills every node.
pub struct SmCluster<SM: StateMachine + Default> {
    combo: Combo,
    /// The fault plan every node's transport obeys.
    pub faults: Faults,
    cluster_id: String,
    root: tempfile::TempDir,
    members: BTreeMap<NodeId, Member<SM>>,
    tweak: Arc<dyn Fn(&mut NodeConfig) + Send + Sync>,
}

/// The TLS settings tests use: mutual TLS with a development CA and node certificates
/// generated (once) under `root/certs`, for every transport (the suite runs what production
/// runs).
pub fn test_tls(root: &std::path::Path) -> TlsConfig {
    TlsConfig::DevCerts {
        dir: root.join("certs"),
    }
}

/// Installs a log subscriber once (`RUST_LOG` filters; default: warnings).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The seed of this run: `CONFORMANCE_SEED` if set, else random; printed so a failure replays.
pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("CONFORMANCE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("{test}: seed {seed} (replay with CONFORMANCE_SEED={seed})");
    seed
}

impl<SM: StateMachine + Default> SmCluster<SM> {
    /// Starts `n` voters (ids 1..=n) that bootstrap a fresh cluster together.
    pub async fn start(combo: &Combo, test: &str, n: u64) -> Self {
        Self::start_with(combo, test, n, |_| {}).await
    }

    /// Like [`Cluster::start`], with a change applied to every node's config.
    pub async fn start_with(
        combo: &Combo,
        test: &str,
        n: u64,
        tweak: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Self {
        let mut cluster = Self::empty(combo, test, Arc::new(tweak));
        // Bind every transport first: the initial members need the real ports.
        let mut bound = Vec::new();
        for id in 1..=n {
            let (rt, transport) = cluster.bind(id, "127.0.0.1:0".parse().expect("addr")).await;
            bound.push((id, rt, transport));
        }
        let initial: BTreeMap<NodeId, String> = bound
            .iter()
            .map(|(id, _, t)| (*id, t.local_addr().to_string()))
            .collect();
        let mut starting = Vec::new();
        for (id, rt, transport) in bound {
            let addr = transport.local_addr();
            let data_dir = cluster.root.path().join(format!("node-{id}"));
            let config = cluster.config(id, addr, &data_dir, initial.clone());
            let backend = combo.backend.clone();
            let task = rt.spawn(async move {
                Consensus::start(&*backend, config, SM::default(), transport).await
            });
            cluster.members.insert(
                id,
                Member {
                    addr,
                    data_dir,
                    initial: initial.clone(),
                    runtime: Some(rt),
                    node: None,
                },
            );
            starting.push((id, task));
        }
        for (id, task) in starting {
            let node = task
                .await
                .expect("start task")
                .unwrap_or_else(|e| panic!("node {id} failed to start: {e}"));
            cluster.member(id).node = Some(node);
        }
        cluster
    }

    fn empty(combo: &Combo, test: &str, tweak: Arc<dyn Fn(&mut NodeConfig) + Send + Sync>) -> Self {
        init_logging();
        let seed = seed(test);
        SmCluster {
            combo: combo.clone(),
            faults: Faults::new(seed),
            cluster_id: format!("test-{}-{seed}", combo.name()),
            root: tempfile::tempdir().expect("temp dir for the cluster"),
            members: BTreeMap::new(),
            tweak,
        }
    }

    /// Plans `n` voters (ids 1..=n) of a fresh cluster, with reserved addresses, but starts
    /// none of them: start each with [`Cluster::start_node`], in any order, at any interval.
    pub async fn planned(combo: &Combo, test: &str, n: u64) -> Self {
        let mut cluster = Self::empty(combo, test, Arc::new(|_: &mut NodeConfig| {}));
        let mut bound = Vec::new();
        for id in 1..=n {
            let (rt, transport) = cluster.bind(id, "127.0.0.1:0".parse().expect("addr")).await;
            bound.push((id, rt, transport));
        }
        let initial: BTreeMap<NodeId, String> = bound
            .iter()
            .map(|(id, _, t)| (*id, t.local_addr().to_string()))
            .collect();
        for (id, rt, transport) in bound {
            let addr = transport.local_addr();
            // Release the port: the node binds it again when it starts.
            let _ = rt.spawn(async move { transport.shutdown().await }).await;
            rt.shutdown_background();
            cluster.members.insert(
                id,
                Member {
                    addr,
                    data_dir: cluster.root.path().join(format!("node-{id}")),
                    initial: initial.clone(),
                    runtime: None,
                    node: None,
                },
            );
        }
        cluster
    }

    /// Starts a planned (or stopped) node on its address and data dir.
    pub async fn start_node(&mut self, id: NodeId) {
        self.restart(id).await
    }

    fn config(
        &self,
        id: NodeId,
        addr: SocketAddr,
        data_dir: &std::path::Path,
        initial: BTreeMap<NodeId, String>,
    ) -> NodeConfig {
        let mut c = NodeConfig::new(id, self.cluster_id.clone(), data_dir);
        c.initial_members = initial;
        c.transport.listen_addr = addr;
        c.transport.tls = test_tls(self.root.path());
        (self.tweak)(&mut c);
        c
    }

    fn member(&mut self, id: NodeId) -> &mut Member<SM> {
        self.members
            .get_mut(&id)
            .unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    /// Creates a node runtime and binds its transport (wrapped in the fault layer), retrying
    /// while the address is still held by a node that was just killed.
    async fn bind(
        &self,
        id: NodeId,
        addr: SocketAddr,
    ) -> (Runtime, Arc<dyn consensus_api::Transport>) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("node-{id}"))
            .enable_all()
            .build()
            .expect("node runtime");
        let mut config = NodeConfig::new(id, self.cluster_id.clone(), self.root.path());
        config.transport.listen_addr = addr;
        config.transport.tls = test_tls(self.root.path());
        (self.tweak)(&mut config);
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            let factory = self.combo.transport.clone();
            let cfg = config.clone();
            match rt
                .spawn(async move { factory.bind(&cfg).await })
                .await
                .expect("bind task")
            {
                Ok(t) => return (rt, FaultyTransport::wrap(t, self.faults.clone())),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(id, "bind {addr} failed, retrying: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("node {id} could not bind {addr}: {e}"),
            }
        }
    }

    /// Ids of the nodes currently running.
    pub fn live(&self) -> Vec<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.node.is_some())
            .map(|(id, _)| *id)
            .collect()
    }

    /// The handle of a running node.
    pub fn node(&self, id: NodeId) -> Consensus<SM> {
        self.members
            .get(&id)
            .and_then(|m| m.node.clone())
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// The address node `id` listens on.
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        self.members[&id].addr
    }

    /// Runs `f` on node `id`'s own runtime (where its tasks and connections live).
    pub async fn on<F, Fut, R>(&self, id: NodeId, f: F) -> Result<R, ConsensusError>
    where
        F: FnOnce(Consensus<SM>) -> Fut,
        Fut: Future<Output = Result<R, ConsensusError>> + Send + 'static,
        R: Send + 'static,
    {
        let m = &self.members[&id];
        let (Some(rt), Some(node)) = (&m.runtime, &m.node) else {
            return Err(ConsensusError::ShuttingDown);
        };
        rt.spawn(f(node.clone()))
            .await
            .unwrap_or(Err(ConsensusError::ShuttingDown))
    }

    /// Statuses of the running nodes.
    pub fn statuses(&self) -> BTreeMap<NodeId, Status> {
        self.members
            .iter()
            .filter_map(|(id, m)| m.node.as_ref().map(|n| (*id, n.status())))
            .collect()
    }

    /// Waits until the running nodes among `among` agree on one leader that claims the role.
    pub async fn wait_leader_among(&self, among: &[NodeId], timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.statuses();
            let view: Vec<&Status> = among.iter().filter_map(|id| st.get(id)).collect();
            if let Some(first) = view.first() {
                if let Some(leader) = first.leader {
                    let agreed = view.iter().all(|s| s.leader == Some(leader));
                    let claims = st.get(&leader).is_some_and(|s| s.role == Role::Leader);
                    if agreed && claims && among.contains(&leader) {
                        return leader;
                    }
                }
            }
            if Instant::now() >= deadline {
                panic!("no agreed leader among {among:?} within {timeout:?}: {st:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until every running node agrees on a leader.
    pub async fn wait_leader(&self, timeout: Duration) -> NodeId {
        let live = self.live();
        self.wait_leader_among(&live, timeout).await
    }

    /// Waits until every node in `ids` has applied at least `index`.
    pub async fn wait_applied(&self, ids: &[NodeId], index: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.statuses();
            if ids
                .iter()
                .all(|id| st.get(id).is_some_and(|s| s.applied_index >= index))
            {
                return;
            }
            if Instant::now() >= deadline {
                panic!("nodes {ids:?} did not apply index {index} within {timeout:?}: {st:#?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills node `id` without any shutdown: its runtime, tasks and sockets vanish at once.
    pub fn crash(&mut self, id: NodeId) {
        let m = self.member(id);
        m.node = None;
        if let Some(rt) = m.runtime.take() {
            rt.shutdown_background();
        }
    }

    /// Shuts node `id` down gracefully (flushes storage, closes the transport).
    pub async fn stop(&mut self, id: NodeId) {
        let result = self.on(id, |n| async move { n.shutdown().await }).await;
        if let Err(e) = result {
            tracing::warn!(id, "graceful shutdown reported: {e}");
        }
        self.crash(id);
    }

    /// Restarts node `id` on its data dir and address, as a new process would.
    pub async fn restart(&mut self, id: NodeId) {
        let (addr, data_dir, initial) = {
            let m = self.member(id);
            assert!(m.node.is_none(), "node {id} is still running");
            (m.addr, m.data_dir.clone(), m.initial.clone())
        };
        let node = self.launch(id, addr, &data_dir, initial).await;
        self.member(id).node = Some(node.1);
        self.member(id).runtime = Some(node.0);
    }

    /// Starts a brand-new node `id` with an empty data dir that joins later (no bootstrap);
    /// returns its address for `add_learner`.
    pub async fn add_fresh_node(&mut self, id: NodeId) -> SocketAddr {
        assert!(!self.members.contains_key(&id), "node {id} exists");
        let data_dir = self.root.path().join(format!("node-{id}"));
        let (rt, node) = self
            .launch(
                id,
                "127.0.0.1:0".parse().expect("addr"),
                &data_dir,
                BTreeMap::new(),
            )
            .await;
        let addr = node.local_addr();
        self.members.insert(
            id,
            Member {
                addr,
                data_dir,
                initial: BTreeMap::new(),
                runtime: Some(rt),
                node: Some(node),
            },
        );
        addr
    }

    async fn launch(
        &self,
        id: NodeId,
        addr: SocketAddr,
        data_dir: &std::path::Path,
        initial: BTreeMap<NodeId, String>,
    ) -> (Runtime, Consensus<SM>) {
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            let (rt, transport) = self.bind(id, addr).await;
            let config = self.config(id, transport.local_addr(), data_dir, initial.clone());
            let backend = self.combo.backend.clone();
            let t = transport.clone();
            let started = rt
                .spawn(async move { Consensus::start(&*backend, config, SM::default(), t).await })
                .await
                .expect("start task");
            match started {
                Ok(node) => return (rt, node),
                // The killed incarnation may still hold the data-dir lock for a moment.
                Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                    rt.spawn(async move { transport.shutdown().await });
                    rt.shutdown_background();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("node {id} failed to start: {e}"),
            }
        }
    }

    /// Shuts every running node down gracefully.
    pub async fn stop_all(&mut self) {
        for id in self.live() {
            self.stop(id).await;
        }
    }
}

impl SmCluster<KvMachine> {
    /// Proposes a `Put` through node `id`.
    pub async fn put(&self, id: NodeId, key: &str, value: &str) -> Result<(), ConsensusError> {
        let cmd = crate::kv::put(key, value);
        self.on(id, move |n| async move { n.propose(cmd).await.map(|_| ()) })
            .await
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

    /// The state machine of node `id`, read locally (no barrier).
    pub fn machine(&self, id: NodeId) -> KvMachine {
        self.node(id).read_local(|sm| sm.clone())
    }
}

impl<SM: StateMachine + Default> Drop for SmCluster<SM> {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            m.node = None;
            if let Some(rt) = m.runtime.take() {
                rt.shutdown_background();
            }
        }
    }
}
