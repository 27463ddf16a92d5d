//! A local cluster in one process (each node on its own runtime, so killing one is abrupt) and
//! the scripted demo built on it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::http;
use broker::server::{bind, BrokerNode, NodeSpec};
use broker::{wiring, Controller, LivenessConfig, MetadataImage};
use consensus_api::{Backend, NodeId, TlsConfig, TransportFactory};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::runtime::Runtime;

struct Member {
    spec: NodeSpec,
    runtime: Option<Runtime>,
    node: Option<BrokerNode>,
}

/// Nodes of one cluster running in this process.
pub struct LocalCluster {
    backend: Arc<dyn Backend>,
    factory: Arc<dyn TransportFactory>,
    metrics: Option<PrometheusHandle>,
    members: BTreeMap<NodeId, Member>,
}

fn runtime(id: NodeId) -> Result<Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(format!("node-{id}"))
        .enable_all()
        .build()
        .map_err(|e| format!("runtime for node {id}: {e}"))
}

impl LocalCluster {
    /// Binds every node (port 0), then starts them as one new cluster.
    pub async fn start(
        backend: Arc<dyn Backend>,
        factory: Arc<dyn TransportFactory>,
        nodes: u64,
        root: &Path,
        liveness: LivenessConfig,
        metrics: Option<PrometheusHandle>,
    ) -> Result<Self, String> {
        let tls = if factory.supports_insecure() {
            TlsConfig::Insecure
        } else {
            TlsConfig::DevCerts {
                dir: root.join("certs"),
            }
        };
        let mut specs = Vec::new();
        let mut bound = Vec::new();
        for id in 1..=nodes {
            let spec = NodeSpec {
                id,
                cluster_id: "broker-dev".into(),
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                admin: SocketAddr::from(([127, 0, 0, 1], 0)),
                peers: BTreeMap::new(),
                data_dir: root.join(format!("node-{id}")),
                tls: tls.clone(),
                liveness: liveness.clone(),
                rack: Some(format!("rack-{}", (id - 1) % 3)),
            };
            let rt = runtime(id)?;
            let f = factory.clone();
            let s = spec.clone();
            let t = rt
                .spawn(async move { bind(&s, &*f).await })
                .await
                .map_err(|e| e.to_string())??;
            bound.push((rt, t));
            specs.push(spec);
        }
        let peers: BTreeMap<NodeId, String> = specs
            .iter()
            .zip(&bound)
            .map(|(s, (_, t))| (s.id, t.local_addr().to_string()))
            .collect();
        let mut members = BTreeMap::new();
        for (mut spec, (rt, transport)) in specs.into_iter().zip(bound) {
            spec.peers = peers.clone();
            spec.listen = transport.local_addr();
            let (b, s, m) = (backend.clone(), spec.clone(), metrics.clone());
            let node = rt
                .spawn(async move { BrokerNode::start(s, &*b, transport, m).await })
                .await
                .map_err(|e| e.to_string())??;
            spec.admin = node.admin_addr;
            members.insert(
                spec.id,
                Member {
                    spec,
                    runtime: Some(rt),
                    node: Some(node),
                },
            );
        }
        Ok(Self {
            backend,
            factory,
            metrics,
            members,
        })
    }

    /// Admin addresses of the running nodes.
    pub fn admin_addrs(&self) -> Vec<(NodeId, SocketAddr)> {
        self.members
            .iter()
            .filter(|(_, m)| m.node.is_some())
            .map(|(id, m)| (*id, m.spec.admin))
            .collect()
    }

    /// The controller of a running node.
    pub fn controller(&self, id: NodeId) -> Option<Controller> {
        self.members
            .get(&id)
            .and_then(|m| m.node.as_ref())
            .map(|n| n.controller.clone())
    }

    /// A running node's controller, any.
    pub fn any_controller(&self) -> Option<Controller> {
        self.members
            .values()
            .find_map(|m| m.node.as_ref().map(|n| n.controller.clone()))
    }

    /// The leader the running nodes agree on, waiting up to `timeout`.
    pub async fn leader(&self, timeout: Duration) -> Result<NodeId, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let views: Vec<Option<NodeId>> = self
                .members
                .values()
                .filter_map(|m| m.node.as_ref())
                .map(|n| n.controller.node().status().leader)
                .collect();
            if let Some(Some(l)) = views.first() {
                let alive = self.members.get(l).is_some_and(|m| m.node.is_some());
                if alive && views.iter().all(|v| *v == Some(*l)) {
                    return Ok(*l);
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no agreed leader within {timeout:?}"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills a node abruptly: its runtime, tasks, sockets and broker half vanish at once.
    pub fn kill(&mut self, id: NodeId) {
        if let Some(m) = self.members.get_mut(&id) {
            let node = m.node.take();
            if let Some(rt) = m.runtime.take() {
                rt.shutdown_background();
            }
            drop(node);
        }
    }

    /// Restarts a killed node on its data dir and addresses.
    pub async fn restart(&mut self, id: NodeId) -> Result<(), String> {
        let spec = self
            .members
            .get(&id)
            .map(|m| m.spec.clone())
            .ok_or_else(|| format!("no node {id}"))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rt = runtime(id)?;
            let (b, f, s, m) = (
                self.backend.clone(),
                self.factory.clone(),
                spec.clone(),
                self.metrics.clone(),
            );
            let started = rt
                .spawn(async move {
                    let t = bind(&s, &*f).await?;
                    BrokerNode::start(s, &*b, t, m).await
                })
                .await
                .map_err(|e| e.to_string())?;
            match started {
                Ok(node) => {
                    if let Some(m) = self.members.get_mut(&id) {
                        m.node = Some(node);
                        m.runtime = Some(rt);
                    }
                    return Ok(());
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("restart of node {id} retried: {e}");
                    rt.shutdown_background();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => {
                    rt.shutdown_background();
                    return Err(e);
                }
            }
        }
    }

    /// Stops every node gracefully: every broker half first (while there is a quorum to record
    /// their controlled shutdowns), then the consensus nodes.
    pub async fn stop_all(mut self) {
        for m in self.members.values() {
            if let (Some(node), Some(rt)) = (&m.node, &m.runtime) {
                node.agent.kill();
                let ctl = node.controller.clone();
                let id = node.id;
                let epoch = node.agent.epoch();
                let _ = rt
                    .spawn(async move {
                        if let (Some(epoch), Ok(broker_id)) = (epoch, u32::try_from(id)) {
                            let _ = ctl
                                .submit(broker::MetadataCommand::BeginControlledShutdown {
                                    broker_id,
                                    epoch,
                                })
                                .await;
                        }
                    })
                    .await;
            }
        }
        for m in self.members.values_mut() {
            if let (Some(node), Some(rt)) = (m.node.take(), m.runtime.take()) {
                let ctl = node.controller.clone();
                let _ = rt
                    .spawn(async move {
                        let _ = ctl.node().shutdown().await;
                    })
                    .await;
                drop(node);
                rt.shutdown_background();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for m in self.members.values_mut() {
            drop(m.node.take());
            if let Some(rt) = m.runtime.take() {
                rt.shutdown_background();
            }
        }
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
fn data_broker(id: u32, admins: Vec<SocketAddr>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let incarnation: u64 = rand::random();
        let mut epoch: Option<u64> = None;
        loop {
            for a in &admins {
                let addr = a.to_string();
                let res = match epoch {
                    None => {
                        let body = format!(
                            r#"{{"broker_id":{id},"incarnation":{incarnation},"endpoints":["data-broker-{id}:9092"],"rack":"rack-x"}}"#
                        );
                        http::request(
                            &addr,
                            "POST",
                            "/brokers",
                            Some(&body),
                            Duration::from_secs(2),
                        )
                        .await
                    }
                    Some(e) => {
                        let body = format!(r#"{{"epoch":{e},"metadata_offset":{}}}"#, u64::MAX / 2);
                        http::request(
                            &addr,
                            "POST",
                            &format!("/brokers/{id}/heartbeat"),
                            Some(&body),
                            Duration::from_secs(2),
                        )
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
    let mut cluster =
        LocalCluster::start(backend, factory, 3, &root, liveness.clone(), None).await?;
    let leader = cluster.leader(Duration::from_secs(15)).await?;
    tl.say(format!(
        "node {leader} is the consensus leader (the active controller)"
    ));
    for (id, a) in cluster.admin_addrs() {
        tl.say(format!("node {id}: admin http://{a}"));
    }
    let admins: Vec<SocketAddr> = cluster.admin_addrs().into_iter().map(|(_, a)| a).collect();
    let extra = data_broker(4, admins.clone(), liveness.heartbeat_interval);
    let ctl = cluster.any_controller().ok_or("no running node")?;
    wait_for(&ctl, "4 brokers unfenced", Duration::from_secs(15), |i| {
        i.brokers.values().filter(|b| !b.fenced).count() == 4
    })
    .await?;
    tl.say("brokers 1-3 (combined mode) and 4 (data plane, over HTTP) registered and unfenced");

    for (name, parts, rf) in [("orders", 4, 3), ("payments", 2, 2)] {
        let body = format!(r#"{{"name":"{name}","partitions":{parts},"replication_factor":{rf}}}"#);
        let (status, text) = http::request(
            &admins[0].to_string(),
            "POST",
            "/topics",
            Some(&body),
            Duration::from_secs(10),
        )
        .await?;
        if status != 201 {
            return Err(format!("creating {name}: HTTP {status} {text}"));
        }
        tl.say(format!("created topic {name} over HTTP: {text}"));
    }
    let (status, text) = http::request(
        &admins[1].to_string(),
        "POST",
        "/topics",
        Some(r#"{"name":"orders","partitions":1,"replication_factor":1}"#),
        Duration::from_secs(10),
    )
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
    let led: Vec<(String, usize)> = img
        .topics
        .values()
        .flat_map(|t| {
            t.partitions
                .iter()
                .enumerate()
                .filter(|(_, p)| p.leader == Some(leader as u32))
                .map(|(i, _)| (t.name.clone(), i))
                .collect::<Vec<_>>()
        })
        .collect();
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
