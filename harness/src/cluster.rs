//! [`LocalCluster`]: nodes of one cluster in this process, on real transports (127.0.0.1, port
//! 0) and real data directories. With [`Runtimes::PerNode`] (the default) each node has its own
//! tokio runtime, so a crash is simulated by killing that runtime: every task, connection and
//! timer of the node dies at once, nothing is flushed or shut down politely.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{ConsensusError, NewDataDir, NodeConfig, NodeId, Status, TlsConfig};
use consensus_storage::fs::{MountGuard, SimFs};
use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::time::Instant;

use crate::fault::{Faults, FaultyTransport};
use crate::node::NodeKind;
use crate::options::{ClusterOptions, Root, Runtimes, StorageChoice, TlsChoice};
use crate::Combo;

/// How long a restarting node may wait for its old port and data-dir lock to be released.
const RESTART_DEADLINE: Duration = Duration::from_secs(10);

/// Pause between attempts to bind an address or take a data-dir lock a killed node still holds.
const RETRY: Duration = Duration::from_millis(50);

struct Member<N> {
    addr: SocketAddr,
    data_dir: PathBuf,
    initial: BTreeMap<NodeId, String>,
    runtime: Option<Runtime>,
    node: Option<N>,
    /// Whether it has started once: later starts refuse an empty data dir, as an operator's
    /// restarts do (the first one creates the cluster or joins it).
    started: bool,
}

/// Nodes of one cluster running `K`'s program. Dropping it kills every node.
pub struct LocalCluster<K: NodeKind> {
    kind: Arc<K>,
    combo: Combo,
    /// The fault plan every node's transport obeys (with [`ClusterOptions::fault_injection`]).
    pub faults: Faults,
    options: ClusterOptions,
    root: Root,
    members: BTreeMap<NodeId, Member<K::Node>>,
    /// With [`StorageChoice::PowerLoss`]: each node's disk, mounted at its data dir.
    disks: Mutex<BTreeMap<NodeId, (SimFs, MountGuard)>>,
}

fn internal(e: impl std::fmt::Display) -> ConsensusError {
    ConsensusError::Internal(e.to_string())
}

impl<K: NodeKind + Default> LocalCluster<K> {
    /// Starts `n` voters (ids 1..=n) of a fresh test cluster; panics if they cannot start.
    pub async fn start(combo: &Combo, test: &str, n: u64) -> Self {
        Self::start_with(combo, test, n, |_| {}).await
    }

    /// Like [`start`](Self::start), with a change applied to every node's config.
    pub async fn start_with(
        combo: &Combo,
        test: &str,
        n: u64,
        tweak: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> Self {
        let mut options = ClusterOptions::for_test(combo, test);
        options.tweak = Arc::new(tweak);
        Self::launch(combo, K::default(), options, n)
            .await
            .unwrap_or_else(|e| panic!("cluster did not start: {e}"))
    }

    /// Plans `n` voters (ids 1..=n) of a fresh test cluster, with reserved addresses, but
    /// starts none of them: start each with [`start_node`](Self::start_node), in any order.
    pub async fn planned(combo: &Combo, test: &str, n: u64) -> Self {
        let options = ClusterOptions::for_test(combo, test);
        let mut cluster = Self::empty(combo, K::default(), options)
            .unwrap_or_else(|e| panic!("cluster root: {e}"));
        let bound = cluster.bind_all(n).await.unwrap_or_else(|e| panic!("{e}"));
        let initial = Self::initial(&bound);
        for (id, rt, transport) in bound {
            let addr = transport.local_addr();
            // Release the port: the node binds it again when it starts.
            match rt {
                Some(rt) => {
                    let _ = rt.spawn(async move { transport.shutdown().await }).await;
                    rt.shutdown_background();
                }
                None => transport.shutdown().await,
            }
            let data_dir = cluster.data_dir(id);
            cluster.members.insert(
                id,
                Member {
                    addr,
                    data_dir,
                    initial: initial.clone(),
                    runtime: None,
                    node: None,
                    started: false,
                },
            );
        }
        cluster
    }
}

type Bound = (NodeId, Option<Runtime>, Arc<dyn consensus_api::Transport>);

impl<K: NodeKind> LocalCluster<K> {
    /// What starts this cluster's nodes (and whatever it recorded about them).
    pub fn kind(&self) -> &K {
        &self.kind
    }

    /// Starts `n` voters (ids 1..=n) that bootstrap a fresh cluster together: every transport
    /// is bound first, so the initial members know the real ports.
    pub async fn launch(
        combo: &Combo,
        kind: K,
        options: ClusterOptions,
        n: u64,
    ) -> Result<Self, ConsensusError> {
        let mut cluster = Self::empty(combo, kind, options)?;
        let bound = cluster.bind_all(n).await?;
        let initial = Self::initial(&bound);
        let mut starting = Vec::new();
        for (id, rt, transport) in bound {
            let addr = transport.local_addr();
            let data_dir = cluster.data_dir(id);
            cluster.mount_disk(id, &data_dir);
            let config = cluster.config(id, addr, &data_dir, initial.clone());
            let start = cluster.start_fn(config, transport);
            let task = match &rt {
                Some(rt) => rt.spawn(start),
                None => tokio::spawn(start),
            };
            cluster.members.insert(
                id,
                Member {
                    addr,
                    data_dir,
                    initial: initial.clone(),
                    runtime: rt,
                    node: None,
                    started: false,
                },
            );
            starting.push((id, task));
        }
        for (id, task) in starting {
            let node = task
                .await
                .map_err(internal)?
                .map_err(|e| ConsensusError::Internal(format!("node {id} failed to start: {e}")))?;
            let m = cluster.member(id)?;
            m.node = Some(node);
            m.started = true;
        }
        Ok(cluster)
    }

    fn empty(combo: &Combo, kind: K, options: ClusterOptions) -> Result<Self, ConsensusError> {
        let root = match &options.root {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    ConsensusError::Storage(format!("creating {}: {e}", dir.display()))
                })?;
                Root::Dir(dir.clone())
            }
            None => Root::Temp(
                tempfile::tempdir()
                    .map_err(|e| ConsensusError::Storage(format!("temporary directory: {e}")))?,
            ),
        };
        Ok(LocalCluster {
            kind: Arc::new(kind),
            combo: combo.clone(),
            faults: Faults::new(options.seed),
            options,
            root,
            members: BTreeMap::new(),
            disks: Mutex::new(BTreeMap::new()),
        })
    }

    async fn bind_all(&self, n: u64) -> Result<Vec<Bound>, ConsensusError> {
        let mut bound = Vec::new();
        for id in 1..=n {
            let port = match self.options.base_port {
                None => 0,
                Some(base) => u16::try_from(id)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .ok_or_else(|| {
                        ConsensusError::InvalidRequest(format!(
                            "base port {base} + node id {id} is not a port"
                        ))
                    })?,
            };
            let (rt, transport) = self
                .bind(id, SocketAddr::from(([127, 0, 0, 1], port)))
                .await?;
            bound.push((id, rt, transport));
        }
        Ok(bound)
    }

    fn initial(bound: &[Bound]) -> BTreeMap<NodeId, String> {
        bound
            .iter()
            .map(|(id, _, t)| (*id, t.local_addr().to_string()))
            .collect()
    }

    fn start_fn(
        &self,
        config: NodeConfig,
        transport: Arc<dyn consensus_api::Transport>,
    ) -> impl Future<Output = Result<K::Node, ConsensusError>> + Send + 'static {
        let kind = self.kind.clone();
        let backend = self.combo.backend.clone();
        async move { kind.start(backend, config, transport).await }
    }

    /// The directory data dirs and certificates are under.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The cluster id every node's connections carry.
    pub fn cluster_id(&self) -> &str {
        &self.options.cluster_id
    }

    /// The seed of this cluster's random choices (printed when a test cluster starts;
    /// `CONFORMANCE_SEED` replays it): scenarios draw their own random data from it too.
    pub fn seed(&self) -> u64 {
        self.options.seed
    }

    /// The combination this cluster runs.
    pub fn combo(&self) -> &Combo {
        &self.combo
    }

    /// The data dir of node `id`.
    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    fn tls(&self) -> TlsConfig {
        let dev = TlsConfig::DevCerts {
            dir: self.root.path().join("certs"),
        };
        match self.options.tls {
            TlsChoice::InsecureWhereSupported if self.combo.transport.supports_insecure() => {
                TlsConfig::InsecurePlaintext
            }
            _ => dev,
        }
    }

    fn config(
        &self,
        id: NodeId,
        addr: SocketAddr,
        data_dir: &Path,
        initial: BTreeMap<NodeId, String>,
    ) -> NodeConfig {
        let mut c = NodeConfig::new(id, self.options.cluster_id.clone(), data_dir);
        let started = self.members.get(&id).is_some_and(|m| m.started);
        c.new_data_dir = if started {
            NewDataDir::Refuse
        } else if initial.is_empty() {
            NewDataDir::Join
        } else {
            NewDataDir::Bootstrap
        };
        c.initial_members = initial;
        c.transport.listen_addr = addr;
        c.transport.tls = self.tls();
        (self.options.tweak)(&mut c);
        c
    }

    fn member(&mut self, id: NodeId) -> Result<&mut Member<K::Node>, ConsensusError> {
        self.members
            .get_mut(&id)
            .ok_or_else(|| ConsensusError::InvalidRequest(format!("no node {id} in this cluster")))
    }

    fn runtime(&self, id: NodeId) -> Result<Option<Runtime>, ConsensusError> {
        match self.options.runtimes {
            Runtimes::Caller => Ok(None),
            Runtimes::PerNode => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("node-{id}"))
                .enable_all()
                .build()
                .map(Some)
                .map_err(|e| internal(format!("runtime for node {id}: {e}"))),
        }
    }

    /// Creates a node runtime and binds its transport (wrapped in the fault layer when enabled),
    /// retrying while the address is still held by a node that was just killed.
    async fn bind(
        &self,
        id: NodeId,
        addr: SocketAddr,
    ) -> Result<(Option<Runtime>, Arc<dyn consensus_api::Transport>), ConsensusError> {
        let rt = self.runtime(id)?;
        let mut config = NodeConfig::new(id, self.options.cluster_id.clone(), self.root.path());
        config.transport.listen_addr = addr;
        config.transport.tls = self.tls();
        (self.options.tweak)(&mut config);
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            let factory = self.combo.transport.clone();
            let cfg = config.clone();
            let bind = async move { factory.bind(&cfg).await };
            let bound = match &rt {
                Some(rt) => rt.spawn(bind).await.map_err(internal)?,
                None => bind.await,
            };
            match bound {
                Ok(t) if self.options.fault_injection => {
                    return Ok((rt, FaultyTransport::wrap(t, self.faults.clone())))
                }
                Ok(t) => return Ok((rt, t)),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(id, "bind {addr} failed, retrying: {e}");
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    return Err(ConsensusError::Transport(format!(
                        "node {id} could not bind {addr}: {e}"
                    )))
                }
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

    /// Ids of every node of the cluster, running or not.
    pub fn ids(&self) -> Vec<NodeId> {
        self.members.keys().copied().collect()
    }

    /// The handle of node `id`, if it is running.
    pub fn handle(&self, id: NodeId) -> Option<&K::Node> {
        self.members.get(&id).and_then(|m| m.node.as_ref())
    }

    /// The address node `id` listens on; panics for an unknown node.
    pub fn addr(&self, id: NodeId) -> SocketAddr {
        self.members[&id].addr
    }

    /// Statuses of the running nodes.
    pub fn statuses(&self) -> BTreeMap<NodeId, Status> {
        self.members
            .iter()
            .filter_map(|(id, m)| m.node.as_ref().map(|n| (*id, K::status(n))))
            .collect()
    }

    /// Kills node `id` without any shutdown: its runtime, tasks and sockets vanish at once.
    /// With [`StorageChoice::PowerLoss`] its machine loses power too: whatever it had not made
    /// durable is lost (or torn), and its threads that outlive the runtime (a log writer, a
    /// snapshot save) can no longer touch its disk. Needs [`Runtimes::PerNode`].
    pub fn crash(&mut self, id: NodeId) {
        assert_eq!(
            self.options.runtimes,
            Runtimes::PerNode,
            "crash needs a runtime per node"
        );
        if let Ok(m) = self.member(id) {
            m.node = None;
            if let Some(rt) = m.runtime.take() {
                rt.shutdown_background();
            }
        }
        if let Some((disk, _)) = self.disks.lock().get(&id) {
            let cut = disk.power_cut();
            tracing::info!(id, ?cut, "node {id} lost power");
        }
    }

    /// Node `id`'s simulated disk, with [`StorageChoice::PowerLoss`] once it has started.
    pub fn disk(&self, id: NodeId) -> Option<SimFs> {
        self.disks.lock().get(&id).map(|(d, _)| d.clone())
    }

    /// Gives node `id` its own simulated disk at `data_dir` (once), with
    /// [`StorageChoice::PowerLoss`].
    fn mount_disk(&self, id: NodeId, data_dir: &Path) {
        if self.options.storage != StorageChoice::PowerLoss {
            return;
        }
        self.disks.lock().entry(id).or_insert_with(|| {
            let disk = SimFs::new(self.options.seed ^ id.rotate_left(32));
            let guard = consensus_storage::fs::mount(data_dir, Arc::new(disk.clone()));
            (disk, guard)
        });
    }

    /// Shuts node `id` down gracefully (flushes storage, closes the transport), then ends its
    /// runtime.
    pub async fn stop(&mut self, id: NodeId) {
        let Ok(m) = self.member(id) else { return };
        let (node, rt) = (m.node.take(), m.runtime.take());
        if let Some(node) = node {
            let result = match &rt {
                Some(rt) => {
                    let node = Arc::new(node);
                    let n = node.clone();
                    rt.spawn(async move { K::shutdown(&n).await })
                        .await
                        .unwrap_or(Err(ConsensusError::ShuttingDown))
                }
                None => K::shutdown(&node).await,
            };
            if let Err(e) = result {
                tracing::warn!(id, "graceful shutdown reported: {e}");
            }
        }
        if let Some(rt) = rt {
            rt.shutdown_background();
        }
    }

    /// Restarts node `id` on its data dir and address, as a new process would; panics if it
    /// cannot start.
    pub async fn restart(&mut self, id: NodeId) {
        self.try_restart(id)
            .await
            .unwrap_or_else(|e| panic!("node {id} failed to restart: {e}"))
    }

    /// Starts a planned (or stopped) node on its address and data dir; panics if it cannot.
    pub async fn start_node(&mut self, id: NodeId) {
        self.restart(id).await
    }

    /// Restarts node `id` on its data dir and address, as a new process would.
    pub async fn try_restart(&mut self, id: NodeId) -> Result<(), ConsensusError> {
        let (addr, data_dir, initial) = {
            let m = self.member(id)?;
            if m.node.is_some() {
                return Err(ConsensusError::InvalidRequest(format!(
                    "node {id} is still running"
                )));
            }
            (m.addr, m.data_dir.clone(), m.initial.clone())
        };
        let (rt, node, _) = self.start_on(id, addr, &data_dir, initial).await?;
        let m = self.member(id)?;
        m.node = Some(node);
        m.runtime = rt;
        m.started = true;
        Ok(())
    }

    /// Removes the data dir of stopped node `id`, as a lost disk would (real file system).
    pub fn wipe(&mut self, id: NodeId) -> Result<(), ConsensusError> {
        let m = self.member(id)?;
        if m.node.is_some() {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {id} is still running"
            )));
        }
        match std::fs::remove_dir_all(&m.data_dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(internal(format!("wipe {}: {e}", m.data_dir.display()))),
        }
    }

    /// Starts a brand-new node `id` with an empty data dir that joins later (no bootstrap);
    /// returns its address for `add_learner`.
    pub async fn add_fresh_node(&mut self, id: NodeId) -> SocketAddr {
        assert!(!self.members.contains_key(&id), "node {id} exists");
        let data_dir = self.data_dir(id);
        let (rt, node, addr) = self
            .start_on(
                id,
                SocketAddr::from(([127, 0, 0, 1], 0)),
                &data_dir,
                BTreeMap::new(),
            )
            .await
            .unwrap_or_else(|e| panic!("node {id} failed to start: {e}"));
        self.members.insert(
            id,
            Member {
                addr,
                data_dir,
                initial: BTreeMap::new(),
                runtime: rt,
                node: Some(node),
                started: true,
            },
        );
        addr
    }

    async fn start_on(
        &self,
        id: NodeId,
        addr: SocketAddr,
        data_dir: &Path,
        initial: BTreeMap<NodeId, String>,
    ) -> Result<(Option<Runtime>, K::Node, SocketAddr), ConsensusError> {
        self.mount_disk(id, data_dir);
        let deadline = Instant::now() + RESTART_DEADLINE;
        loop {
            let (rt, transport) = self.bind(id, addr).await?;
            let bound = transport.local_addr();
            let config = self.config(id, bound, data_dir, initial.clone());
            let start = self.start_fn(config, transport.clone());
            let started = match &rt {
                Some(rt) => rt.spawn(start).await.map_err(internal)?,
                None => start.await,
            };
            match started {
                Ok(node) => return Ok((rt, node, bound)),
                // The killed incarnation may still hold the data-dir lock for a moment.
                Err(e) if Instant::now() < deadline && e.to_string().contains("in use") => {
                    match rt {
                        Some(rt) => {
                            rt.spawn(async move { transport.shutdown().await });
                            rt.shutdown_background();
                        }
                        None => transport.shutdown().await,
                    }
                    tokio::time::sleep(RETRY).await;
                }
                Err(e) => {
                    match rt {
                        Some(rt) => {
                            rt.spawn(async move { transport.shutdown().await });
                            rt.shutdown_background();
                        }
                        None => transport.shutdown().await,
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Writes the data dir of every node of this cluster, none of which may have started (a
    /// [`planned`](LocalCluster::planned) cluster), from `backup`, as the initial members of a
    /// new cluster with this cluster's id and addresses
    /// ([`restore_data_dir`](consensus_api::backup::restore_data_dir)); start them with
    /// [`start_node`](Self::start_node) afterwards. Returns what each backend wrote.
    pub fn restore_from(
        &self,
        backup: &consensus_api::backup::Backup,
    ) -> Result<Vec<String>, ConsensusError> {
        let members: BTreeMap<NodeId, String> = self
            .members
            .iter()
            .map(|(id, m)| (*id, m.addr.to_string()))
            .collect();
        let mut written = Vec::new();
        for (id, m) in &self.members {
            if m.started {
                return Err(ConsensusError::InvalidRequest(format!(
                    "node {id} has started: only a new cluster's data dirs are restored"
                )));
            }
            self.mount_disk(*id, &m.data_dir);
            written.push(consensus_api::backup::restore_data_dir(
                &*self.combo.backend,
                backup,
                &m.data_dir,
                &self.options.cluster_id,
                *id,
                &members,
            )?);
        }
        Ok(written)
    }

    /// Shuts every running node down gracefully.
    pub async fn stop_all(&mut self) {
        for id in self.live() {
            self.stop(id).await;
        }
    }
}

impl<K: NodeKind> LocalCluster<K>
where
    K::Node: Clone,
{
    /// The handle of a running node; panics if it is not running.
    pub fn node(&self, id: NodeId) -> K::Node {
        self.handle(id)
            .cloned()
            .unwrap_or_else(|| panic!("node {id} is not running"))
    }

    /// Runs `f` on node `id`'s own runtime (where its tasks and connections live).
    pub async fn on<F, Fut, R>(&self, id: NodeId, f: F) -> Result<R, ConsensusError>
    where
        F: FnOnce(K::Node) -> Fut,
        Fut: Future<Output = Result<R, ConsensusError>> + Send + 'static,
        R: Send + 'static,
    {
        match self.remote(id) {
            Some(r) => r.run(f).await,
            None if self.members.contains_key(&id) => Err(ConsensusError::ShuttingDown),
            None => Err(ConsensusError::InvalidRequest(format!("no node {id}"))),
        }
    }

    /// A handle that runs calls on node `id` (on its runtime) from any task, without holding
    /// the cluster: for concurrent clients while the test crashes and restarts nodes. `None`
    /// when the node is not running.
    pub fn remote(&self, id: NodeId) -> Option<Remote<K::Node>> {
        let m = self.members.get(&id)?;
        Some(Remote {
            id,
            node: m.node.clone()?,
            runtime: m.runtime.as_ref().map(|rt| rt.handle().clone()),
        })
    }
}

/// A running node's handle plus the runtime its calls must run on ([`LocalCluster::remote`]).
/// Once the node crashes, its calls fail with `ShuttingDown`.
#[derive(Clone)]
pub struct Remote<N> {
    /// The node's id.
    pub id: NodeId,
    /// The node's handle.
    pub node: N,
    runtime: Option<tokio::runtime::Handle>,
}

impl<N: Clone + Send + Sync + 'static> Remote<N> {
    /// Runs `f` on the node's runtime; `ShuttingDown` when the runtime died meanwhile.
    pub async fn run<F, Fut, R>(&self, f: F) -> Result<R, ConsensusError>
    where
        F: FnOnce(N) -> Fut,
        Fut: Future<Output = Result<R, ConsensusError>> + Send + 'static,
        R: Send + 'static,
    {
        let fut = f(self.node.clone());
        match &self.runtime {
            Some(rt) => rt.spawn(fut).await,
            None => tokio::spawn(fut).await,
        }
        .unwrap_or(Err(ConsensusError::ShuttingDown))
    }
}

impl<K: NodeKind> Drop for LocalCluster<K> {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            m.node = None;
            if let Some(rt) = m.runtime.take() {
                rt.shutdown_background();
            }
        }
    }
}
