//! A local cluster of broker nodes in one process (on `consensus-harness`: each node on its own
//! runtime, so killing one is abrupt) and the scripted demo built on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker::admin::AdminAuth;
use broker::server::{BrokerNode, NodeParts};
use broker::{Controller, LivenessConfig, MetadataImage};
use consensus_api::{
    Backend, ConsensusError, NodeConfig, NodeId, Status, TlsConfig, Transport, TransportFactory,
};
use consensus_harness::{ClusterOptions, Combo, NodeKind};
use metrics_exporter_prometheus::PrometheusHandle;
use parking_lot::Mutex;

use crate::{http, wiring};

/// What runs on each node: a combined-mode broker node. Remembers each node's admin address so
/// a restarted node serves on the one it had.
struct BrokerNodes {
    liveness: LivenessConfig,
    admin_auth: AdminAuth,
    metrics: Option<PrometheusHandle>,
    admin: Mutex<BTreeMap<NodeId, SocketAddr>>,
    /// The CA of the nodes' certificates, once a node has started with TLS.
    ca: Mutex<Option<PathBuf>>,
}

#[async_trait]
impl NodeKind for BrokerNodes {
    type Node = Arc<BrokerNode>;

    async fn start(
        &self,
        backend: Arc<dyn Backend>,
        config: NodeConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Arc<BrokerNode>, ConsensusError> {
        let id = config.id;
        let admin = self
            .admin
            .lock()
            .get(&id)
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        // HTTPS with the node's own certificate, as `serve` does.
        let admin_tls = match &config.transport.tls {
            TlsConfig::DevCerts { dir } => {
                let paths =
                    consensus_tls::dev::ensure(dir, id).map_err(ConsensusError::Internal)?;
                consensus_tls::dev::ensure_operator(dir).map_err(ConsensusError::Internal)?;
                let material =
                    consensus_tls::load_files(&paths.ca_cert, &paths.node_cert, &paths.node_key)
                        .map_err(ConsensusError::Internal)?;
                *self.ca.lock() = Some(paths.ca_cert);
                Some(Arc::new(
                    consensus_tls::admin_server_config(&material)
                        .map_err(ConsensusError::Internal)?,
                ))
            }
            _ => None,
        };
        let admin_auth = match admin_tls {
            Some(_) => self.admin_auth.clone().or_client_certificates(),
            None => self.admin_auth.clone(),
        };
        let parts = NodeParts {
            admin,
            liveness: self.liveness.clone(),
            rack: Some(format!("rack-{}", (id.saturating_sub(1)) % 3)),
            metrics: self.metrics.clone(),
            admin_auth,
            admin_tls,
        };
        let node = BrokerNode::start_with_config(config, parts, &*backend, transport)
            .await
            .map_err(ConsensusError::Internal)?;
        self.admin.lock().insert(id, node.admin_addr);
        Ok(Arc::new(node))
    }

    fn status(node: &Arc<BrokerNode>) -> Status {
        node.controller.node().status()
    }

    async fn shutdown(node: &Arc<BrokerNode>) -> Result<(), ConsensusError> {
        node.agent.kill();
        node.controller.node().shutdown().await
    }
}

/// Broker nodes of one cluster running in this process.
pub struct LocalCluster {
    nodes: consensus_harness::LocalCluster<BrokerNodes>,
}

impl LocalCluster {
    /// Binds every node (port 0), then starts them as one new cluster with data dirs and
    /// development certificates under `root`, their admin APIs protected by `admin_auth`.
    ///
    /// With `base_port`, node `id` listens on 127.0.0.1 port `base_port + id` for consensus and
    /// `base_port + 100 + id` for its admin API, so a cluster whose `root` is kept comes back on
    /// the same addresses (its stored membership names them); without it the OS picks ports.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        backend: Arc<dyn Backend>,
        factory: Arc<dyn TransportFactory>,
        nodes: u64,
        root: &Path,
        liveness: LivenessConfig,
        metrics: Option<PrometheusHandle>,
        admin_auth: AdminAuth,
        base_port: Option<u16>,
    ) -> Result<Self, String> {
        let mut options = ClusterOptions::new("broker-dev");
        options.root = Some(root.to_path_buf());
        options.base_port = base_port;
        let mut admin = BTreeMap::new();
        if let Some(base) = base_port {
            for id in 1..=nodes {
                let port = u16::try_from(id + 100)
                    .ok()
                    .and_then(|i| base.checked_add(i))
                    .ok_or_else(|| format!("--base-port {base} leaves no room for node {id}"))?;
                admin.insert(id, SocketAddr::from(([127, 0, 0, 1], port)));
            }
        }
        let kind = BrokerNodes {
            liveness,
            admin_auth,
            metrics,
            admin: Mutex::new(admin),
            ca: Mutex::new(None),
        };
        let nodes = consensus_harness::LocalCluster::launch(
            &Combo::from_parts(backend, factory),
            kind,
            options,
            nodes,
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(Self { nodes })
    }

    /// How an admin client reaches these nodes' HTTPS APIs: the CA, and the development
    /// operator certificate (`operator.pem`/`operator.key` beside it) as the identity.
    pub fn admin_tls(&self) -> http::ClientTls {
        let ca = self.nodes.kind().ca.lock().clone();
        let identity = ca.as_ref().and_then(|ca| {
            let dir = ca.parent()?;
            Some((dir.join("operator.pem"), dir.join("operator.key")))
        });
        http::ClientTls { ca, identity }
    }

    /// Admin URLs of the running nodes (`https://` when they serve TLS).
    pub fn admin_urls(&self) -> Vec<(NodeId, String)> {
        let scheme = if self.nodes.kind().ca.lock().is_some() {
            "https"
        } else {
            "http"
        };
        self.admin_addrs()
            .into_iter()
            .map(|(id, a)| (id, format!("{scheme}://{a}")))
            .collect()
    }

    /// Admin addresses of the running nodes.
    pub fn admin_addrs(&self) -> Vec<(NodeId, SocketAddr)> {
        self.nodes
            .live()
            .into_iter()
            .filter_map(|id| self.nodes.handle(id).map(|n| (id, n.admin_addr)))
            .collect()
    }

    /// The controller of a running node.
    pub fn controller(&self, id: NodeId) -> Option<Controller> {
        self.nodes.handle(id).map(|n| n.controller.clone())
    }

    /// A running node's controller, any.
    pub fn any_controller(&self) -> Option<Controller> {
        self.nodes
            .live()
            .into_iter()
            .find_map(|id| self.controller(id))
    }

    /// The leader the running nodes agree on, waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> Result<NodeId, String> {
        let live = self.nodes.live();
        self.nodes
            .try_wait_leader_among(&live, timeout)
            .await
            .map_err(|_| format!("no agreed leader within {timeout:?}"))
    }

    /// Kills a node abruptly: its runtime, tasks, sockets and broker half vanish at once.
    pub fn kill(&mut self, id: NodeId) {
        self.nodes.crash(id);
    }

    /// Restarts a killed node on its data dir and addresses.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), String> {
        self.nodes.try_restart(id).await.map_err(|e| e.to_string())
    }

    /// Stops every node gracefully: every broker half first (while there is a quorum to record
    /// their controlled shutdowns), then the consensus nodes.
    pub async fn stop_all(mut self) {
        for id in self.nodes.live() {
            let _ = self
                .nodes
                .on(id, |node| async move {
                    node.agent.kill();
                    if let (Some(epoch), Ok(broker_id)) =
                        (node.agent.epoch(), u32::try_from(node.id))
                    {
                        let _ = node
                            .controller
                            .submit(broker::MetadataCommand::BeginControlledShutdown {
                                broker_id,
                                epoch,
                            })
                            .await;
                    }
                    Ok(())
                })
                .await;
        }
        self.nodes.stop_all().await;
    }
}

struct Timeline(Instant);

impl Timeline {
    fn say(&self, msg: impl AsRef<str>) {
        println!(
            "[{:>7.3}s] {}",
            self.0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

fn table(img: &MetadataImage) -> String {
    let mut out = String::new();
    out.push_str("    brokers:");
    for b in img.brokers.values() {
        out.push_str(&format!(
            " {}{}",
            b.broker_id,
            if b.fenced { "(fenced)" } else { "" }
        ));
    }
    out.push('\n');
    out.push_str("    topic        part  leader  isr          replicas     leader_epoch\n");
    for t in img.topics.values() {
        for (p, st) in t.partitions.iter().enumerate() {
            out.push_str(&format!(
                "    {:<12} {:>4}  {:>6}  {:<12} {:<12} {:>5}\n",
                t.name,
                p,
                st.leader
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "-".into()),
                format!("{:?}", st.isr),
                format!("{:?}", st.replicas),
                st.leader_epoch
            ));
        }
    }
    out
}

async fn wait_for(
    ctl: &Controller,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&MetadataImage) -> bool,
) -> Result<MetadataImage, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(img) = ctl.image().await {
            if pred(&img) {
                return Ok(img);
            }
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: not seen within {timeout:?}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A data-plane broker (not a consensus member): registers and heartbeats over the admin API,
/// trying each node until one answers.
fn data_broker(
    id: u32,
    admins: Vec<String>,
    tls: http::ClientTls,
    every: Duration,
    token: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let incarnation: u64 = rand::random();
        let mut epoch: Option<u64> = None;
        loop {
            for addr in &admins {
                let res = match epoch {
                    None => {
                        let body = format!(
                            r#"{{"broker_id":{id},"incarnation":{incarnation},"endpoints":["data-broker-{id}:9092"],"rack":"rack-x"}}"#
                        );
                        http::Request::new(addr, "POST", "/broker-rpc/register")
                            .tls(Some(&tls))
                            .json(Some(&body))
                            .token(Some(&token))
                            .send(Duration::from_secs(2))
                            .await
                    }
                    Some(e) => {
                        // Caught up to its own registration: what unfences it (an
                        // offset beyond the log is refused).
                        let body = format!(r#"{{"epoch":{e},"metadata_offset":{e}}}"#);
                        let path = format!("/broker-rpc/{id}/heartbeat");
                        http::Request::new(addr, "POST", &path)
                            .tls(Some(&tls))
                            .json(Some(&body))
                            .token(Some(&token))
                            .send(Duration::from_secs(2))
                            .await
                    }
                };
                if let Ok((status, text)) = res {
                    if (200..300).contains(&status) {
                        if epoch.is_none() {
                            epoch = serde_json::from_str::<serde_json::Value>(&text)
                                .ok()
                                .and_then(|v| v["epoch"].as_u64());
                        }
                        break;
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// The scripted demo; `Err` if anything it shows did not happen.
pub async fn run(backend: Option<String>, transport: Option<String>) -> Result<(), String> {
    let backend = wiring::backend(backend.as_deref())?;
    let factory = wiring::transport(transport.as_deref())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let root: PathBuf = dir.path().to_path_buf();
    let liveness = LivenessConfig {
        session_timeout: Duration::from_secs(3),
        heartbeat_interval: Duration::from_millis(500),
        check_interval: Duration::from_millis(200),
    };
    let tl = Timeline(Instant::now());
    tl.say(format!(
        "starting 3 nodes in combined mode ({} over {}), data in {}",
        backend.name(),
        factory.name(),
        root.display()
    ));
    let token = AdminAuth::generate_token();
    let auth = AdminAuth::token(&token, false)?;
    let mut cluster = LocalCluster::start(
        backend,
        factory,
        3,
        &root,
        liveness.clone(),
        None,
        auth,
        None,
    )
    .await?;
    let leader = cluster.leader(Duration::from_secs(15)).await?;
    tl.say(format!(
        "node {leader} is the consensus leader (the active controller)"
    ));
    for (id, url) in cluster.admin_urls() {
        tl.say(format!("node {id}: admin {url}"));
    }
    let admins: Vec<String> = cluster.admin_urls().into_iter().map(|(_, a)| a).collect();
    // The token over HTTPS checked with the cluster CA; `operator` also has a client certificate.
    let operator = cluster.admin_tls();
    let tls = http::ClientTls {
        identity: None,
        ..operator.clone()
    };
    let extra = data_broker(
        4,
        admins.clone(),
        tls.clone(),
        liveness.heartbeat_interval,
        token.clone(),
    );
    let ctl = cluster.any_controller().ok_or("no running node")?;
    wait_for(&ctl, "4 brokers unfenced", Duration::from_secs(15), |i| {
        i.brokers.values().filter(|b| !b.fenced).count() == 4
    })
    .await?;
    tl.say("brokers 1-3 (combined mode) and 4 (data plane, over HTTPS) registered and unfenced");

    for (name, parts, rf, credential) in [
        ("orders", 4, 3, "the admin token"),
        ("payments", 2, 2, "the operator's client certificate"),
    ] {
        let body = format!(r#"{{"name":"{name}","partitions":{parts},"replication_factor":{rf}}}"#);
        let req = http::Request::new(&admins[0], "POST", "/topics").json(Some(&body));
        let req = if name == "orders" {
            req.tls(Some(&tls)).token(Some(&token))
        } else {
            req.tls(Some(&operator))
        };
        let (status, text) = req.send(Duration::from_secs(10)).await?;
        if status != 201 {
            return Err(format!("creating {name}: HTTP {status} {text}"));
        }
        tl.say(format!(
            "created topic {name} over HTTPS with {credential}: {text}"
        ));
    }
    let again = r#"{"name":"orders","partitions":1,"replication_factor":1}"#;
    let (status, text) = http::Request::new(&admins[1], "POST", "/topics")
        .tls(Some(&tls))
        .json(Some(again))
        .send(Duration::from_secs(10))
        .await?;
    tl.say(format!(
        "creating it again without a credential is refused: HTTP {status} {text}"
    ));
    if status != 401 {
        return Err("a write without the admin token was not refused with 401".into());
    }
    let (status, text) = http::Request::new(&admins[1], "POST", "/topics")
        .tls(Some(&tls))
        .json(Some(again))
        .token(Some(&token))
        .send(Duration::from_secs(10))
        .await?;
    tl.say(format!(
        "creating it again is refused: HTTP {status} {text}"
    ));
    if status != 409 {
        return Err("a duplicate topic was not refused with 409".into());
    }
    let img = ctl.image().await.map_err(|e| e.to_string())?;
    println!("{}", table(&img));

    tl.say(format!(
        "killing node {leader} (the consensus leader and broker {leader}) and broker 4"
    ));
    let led = img.partitions_where(|p| p.leader == Some(leader as u32));
    // Handles of the node about to die must go with it (they would keep its storage open).
    drop(ctl);
    let killed_at = Instant::now();
    cluster.kill(leader);
    extra.abort();
    let new_leader = cluster.leader(Duration::from_secs(15)).await?;
    tl.say(format!(
        "node {new_leader} took over as controller after {} ms",
        killed_at.elapsed().as_millis()
    ));
    let ctl = cluster.controller(new_leader).ok_or("new leader gone")?;
    let img = wait_for(&ctl, "dead brokers fenced", Duration::from_secs(20), |i| {
        i.brokers.get(&(leader as u32)).is_some_and(|b| b.fenced)
            && i.brokers.get(&4).is_some_and(|b| b.fenced)
    })
    .await?;
    tl.say(format!(
        "brokers {leader} and 4 fenced after their {} s session; their partitions moved:",
        liveness.session_timeout.as_secs()
    ));
    println!("{}", table(&img));
    for (topic, p) in &led {
        let st = &img.topics[topic].partitions[*p];
        if st.leader == Some(leader as u32) || st.isr.contains(&(leader as u32)) {
            return Err(format!(
                "{topic}-{p} still depends on the dead broker: {st:?}"
            ));
        }
    }
    tl.say(format!(
        "{} partition(s) led by broker {leader} got new leaders from their ISR",
        led.len()
    ));

    tl.say(format!("restarting node {leader}"));
    cluster.restart(leader).await?;
    let img = wait_for(&ctl, "broker back", Duration::from_secs(20), |i| {
        i.brokers.get(&(leader as u32)).is_some_and(|b| !b.fenced)
    })
    .await?;
    let back = cluster.controller(leader).ok_or("restarted node gone")?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let has = back
            .node()
            .read_local(|m| m.image().topics.len() == img.topics.len());
        if has {
            break;
        }
        if Instant::now() > deadline {
            return Err("the restarted node did not catch up".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tl.say(format!(
        "node {leader} caught up from its disk and the leader; broker {leader} re-registered and rejoined the ISRs:"
    ));
    println!("{}", table(&img));
    cluster.stop_all().await;
    tl.say("demo complete: no acknowledged metadata was lost");
    Ok(())
}
