//! One node in combined mode (KRaft's `process.roles=broker,controller`): a consensus member
//! with its controller, the broker half that registers and heartbeats, and the admin API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use std::time::Duration;

use consensus_api::{
    Backend, Consensus, NodeConfig, NodeId, Role, TlsConfig, Transport, TransportFactory,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::{self, AdminAuth};
use crate::admin_tls;
use crate::controller::{BrokerAgent, Controller, LivenessConfig};
use crate::machine::MetadataMachine;

/// What a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    /// Consensus node id; the broker id of its broker half too.
    pub id: NodeId,
    /// Cluster id, checked on every connection.
    pub cluster_id: String,
    /// Consensus transport address (port 0: any).
    pub listen: SocketAddr,
    /// Admin HTTP address (port 0: any).
    pub admin: SocketAddr,
    /// Initial voters with their consensus addresses (used once, on a fresh data dir).
    pub peers: BTreeMap<NodeId, String>,
    /// What to do with a data dir that has no identity record: refuse, create the cluster
    /// from `peers`, or join (see [`consensus_api::data_dir`]).
    pub new_data_dir: consensus_api::NewDataDir,
    /// Data directory.
    pub data_dir: PathBuf,
    /// Transport security.
    pub tls: TlsConfig,
    /// Broker liveness settings.
    pub liveness: LivenessConfig,
    /// Rack of this node's broker.
    pub rack: Option<String>,
    /// Who may use the admin API.
    pub admin_auth: AdminAuth,
    /// HTTPS for the admin API (see [`admin_tls`]); `None` serves plain HTTP.
    pub admin_tls: Option<Arc<rustls::ServerConfig>>,
}

impl NodeSpec {
    /// The consensus configuration of this node.
    pub fn config(&self) -> NodeConfig {
        let mut c = NodeConfig::new(self.id, self.cluster_id.clone(), self.data_dir.clone());
        c.initial_members = self.peers.clone();
        c.new_data_dir = self.new_data_dir;
        c.transport.listen_addr = self.listen;
        c.transport.tls = self.tls.clone();
        c
    }
}

/// The broker-side settings of a node, beside its consensus configuration.
#[derive(Clone)]
pub struct NodeParts {
    /// Admin HTTP address (port 0: any).
    pub admin: SocketAddr,
    /// Broker liveness settings.
    pub liveness: LivenessConfig,
    /// Rack of this node's broker.
    pub rack: Option<String>,
    /// Where `/metrics` reads from, if metrics are installed.
    pub metrics: Option<PrometheusHandle>,
    /// Who may use the admin API.
    pub admin_auth: AdminAuth,
    /// HTTPS for the admin API (see [`admin_tls`]); `None` serves plain HTTP.
    pub admin_tls: Option<Arc<rustls::ServerConfig>>,
}

/// A running node.
pub struct BrokerNode {
    /// Node id.
    pub id: NodeId,
    /// The controller API.
    pub controller: Controller,
    /// The broker half.
    pub agent: BrokerAgent,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// Where the consensus transport listens.
    pub raft_addr: SocketAddr,
    admin_task: AbortOnDrop,
}

/// Aborts the admin server when the node goes away.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a node may go without a consensus leader before it warns of a lost quorum.
const NO_LEADER_WARNING: Duration = Duration::from_secs(5);

/// Logs what an operator must know about this node's consensus: a lost leader (WARN), no
/// leader for [`NO_LEADER_WARNING`] (WARN: quorum lost or this node isolated), a new leader
/// (INFO), a stopped engine (ERROR).
async fn watch_consensus(ctl: Controller) {
    let node = ctl.node().clone();
    let mut rx = node.watch();
    let mut leader = rx.borrow().leader;
    let mut leaderless_since = leader.is_none().then(Instant::now);
    let mut warned_quorum = false;
    loop {
        let changed = tokio::time::timeout(Duration::from_secs(1), rx.changed()).await;
        if matches!(changed, Ok(Err(_))) {
            return;
        }
        let st = rx.borrow_and_update().clone();
        if st.role == Role::Shutdown {
            match &st.stopped {
                Some(why) => tracing::error!(node = st.id, "consensus stopped: {why}"),
                None => tracing::info!(node = st.id, "consensus stopped"),
            }
            return;
        }
        if st.leader != leader {
            match (leader, st.leader) {
                (Some(old), None) => tracing::warn!(
                    node = st.id,
                    term = st.term,
                    "lost the consensus leader (was node {old}); proposals wait for a new one"
                ),
                (_, Some(new)) => tracing::info!(
                    node = st.id,
                    term = st.term,
                    "consensus leader is node {new}"
                ),
                (None, None) => {}
            }
            leader = st.leader;
            leaderless_since = leader.is_none().then(Instant::now);
            warned_quorum = false;
        }
        if let Some(since) = leaderless_since {
            if !warned_quorum && since.elapsed() >= NO_LEADER_WARNING {
                warned_quorum = true;
                tracing::warn!(
                    node = st.id,
                    term = st.term,
                    voters = ?st.voters,
                    "no consensus leader for {:?}: the quorum is lost or this node is isolated",
                    since.elapsed()
                );
            }
        }
    }
}

/// Binds the consensus transport of `spec` (so its real address is known before peers are).
pub async fn bind(
    spec: &NodeSpec,
    factory: &dyn TransportFactory,
) -> Result<Arc<dyn Transport>, String> {
    factory
        .bind(&spec.config())
        .await
        .map_err(|e| format!("node {}: binding {}: {e}", spec.id, spec.listen))
}

impl BrokerNode {
    /// Starts consensus on `transport`, the controller, the broker half and the admin API.
    pub async fn start(
        spec: NodeSpec,
        backend: &dyn Backend,
        transport: Arc<dyn Transport>,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, String> {
        let parts = NodeParts {
            admin: spec.admin,
            liveness: spec.liveness.clone(),
            rack: spec.rack.clone(),
            metrics,
            admin_auth: spec.admin_auth.clone(),
            admin_tls: spec.admin_tls.clone(),
        };
        Self::start_with_config(spec.config(), parts, backend, transport).await
    }

    /// Like [`start`](Self::start), from a consensus configuration built elsewhere (a test or
    /// demo harness) plus the broker's own settings.
    pub async fn start_with_config(
        config: NodeConfig,
        parts: NodeParts,
        backend: &dyn Backend,
        transport: Arc<dyn Transport>,
    ) -> Result<Self, String> {
        let id = config.id;
        let raft_addr = transport.local_addr();
        let admin = tokio::net::TcpListener::bind(parts.admin)
            .await
            .map_err(|e| format!("node {id}: admin address {}: {e}", parts.admin))?;
        let admin_addr = admin
            .local_addr()
            .map_err(|e| format!("admin address: {e}"))?;
        let node = Consensus::start(backend, config, MetadataMachine::default(), transport)
            .await
            .map_err(|e| format!("node {id}: {e}"))?;
        let controller = Controller::start(node, parts.liveness);
        let broker_id =
            u32::try_from(id).map_err(|_| format!("node id {id} does not fit a broker id"))?;
        let agent = BrokerAgent::start(
            controller.clone(),
            broker_id,
            rand::random(),
            vec![admin_addr.to_string()],
            parts.rack,
        );
        if parts.admin_tls.is_none() && parts.admin_auth.takes_client_certificates() {
            return Err(format!(
                "node {id}: the admin API takes client certificates but is not served over HTTPS"
            ));
        }
        let app = admin::router(controller.clone(), parts.metrics, parts.admin_auth);
        let watch_task = tokio::spawn(watch_consensus(controller.clone()));
        let admin_task = tokio::spawn(async move {
            let _watch = AbortOnDrop(watch_task);
            match parts.admin_tls {
                Some(tls) => admin_tls::serve(admin, app, tls).await,
                None => {
                    let app = app.into_make_service_with_connect_info::<SocketAddr>();
                    if let Err(e) = axum::serve(admin, app).await {
                        tracing::error!("admin server stopped: {e}");
                    }
                }
            }
        });
        Ok(Self {
            id,
            controller,
            agent,
            admin_addr,
            raft_addr,
            admin_task: AbortOnDrop(admin_task),
        })
    }

    /// Controlled shutdown of the broker half only (the node keeps serving consensus): do this
    /// for every node of a cluster first, while there is still a quorum.
    pub async fn shutdown_broker(&self) {
        if let Err(e) = self.agent.shutdown().await {
            tracing::warn!(node = self.id, "controlled shutdown: {e}");
        }
    }

    /// Controlled shutdown of the broker half, then the consensus node.
    pub async fn shutdown(self) {
        let BrokerNode {
            controller,
            agent,
            admin_task,
            ..
        } = self;
        if let Err(e) = agent.shutdown().await {
            tracing::warn!("controlled shutdown: {e}");
        }
        drop(admin_task);
        let _ = controller.node().shutdown().await;
    }
}
