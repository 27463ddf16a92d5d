//! `--processes`: node 1 in this process, the others as child processes of this binary
//! (`bench --serve-node ID BACKEND TRANSPORT ROOT`).
//!
//! The child protocol, on the child's stdin and stdout:
//! 1. the child binds its transport and prints `ADDR <addr>`;
//! 2. the parent writes one line: the initial members (`1=addr,2=addr,...`), or an empty line
//!    for a node that joins later through `add_learner`;
//! 3. the child starts its node and its client API ([`kvstore::service`], on 127.0.0.1, any
//!    port), prints `KV <addr>`, then `STATUS <applied_index> <role>` whenever its status
//!    changes (at most every [`STATUS_INTERVAL`]), and `STOPPED <reason>` if its engine stops;
//! 4. the child shuts its node down and exits when its stdin closes.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use consensus_api::{Backend, Consensus, NodeConfig, TransportFactory};
use kvstore::Store;
use tokio::sync::watch;

pub(crate) type Node = Consensus<Store>;

/// Least time between two status lines of a child.
const STATUS_INTERVAL: Duration = Duration::from_millis(20);
/// How long a child may take to exit once its stdin closed before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(20);

pub(crate) fn node_config(id: u64, root: &Path) -> NodeConfig {
    kvstore::local_config(id, "bench", root)
}

fn members_arg(members: &BTreeMap<u64, String>) -> String {
    members
        .iter()
        .map(|(i, a)| format!("{i}={a}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, String> {
    s.split(',')
        .filter(|kv| !kv.trim().is_empty())
        .map(|kv| {
            let (i, a) = kv
                .split_once('=')
                .ok_or_else(|| format!("bad member {kv:?}"))?;
            Ok((
                i.parse().map_err(|e| format!("member id {i:?}: {e}"))?,
                a.to_string(),
            ))
        })
        .collect()
}

/// What a child last reported about its node.
#[derive(Debug, Clone, Default)]
pub(crate) struct Report {
    pub(crate) applied_index: u64,
    pub(crate) role: String,
    /// Where its client API listens.
    pub(crate) kv_addr: Option<std::net::SocketAddr>,
    /// Why the node stopped, or why its reports ended (the child exited).
    pub(crate) stopped: Option<String>,
}

/// A node running in a child process. Dropping it ends the child (its stdin closes; it is
/// killed if it does not exit within [`EXIT_GRACE`]).
pub(crate) struct ChildNode {
    pub(crate) id: u64,
    /// The address its transport is bound to.
    pub(crate) addr: String,
    process: Child,
    reports: watch::Receiver<Report>,
}

impl ChildNode {
    /// Starts node `id` in a child process; it waits for [`ChildNode::start`].
    pub(crate) fn spawn(
        id: u64,
        backend: &dyn Backend,
        factory: &dyn TransportFactory,
        root: &Path,
    ) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut process = std::process::Command::new(&exe)
            .args([
                "--serve-node",
                &id.to_string(),
                backend.name(),
                factory.name(),
                &root.display().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn node {id}: {e}"))?;
        let out = process
            .stdout
            .take()
            .ok_or_else(|| format!("node {id} has no stdout"))?;
        let mut out = std::io::BufReader::new(out);
        let mut line = String::new();
        out.read_line(&mut line).map_err(|e| e.to_string())?;
        let addr = line
            .trim()
            .strip_prefix("ADDR ")
            .ok_or_else(|| format!("node {id} did not report its address: {line:?}"))?
            .to_string();
        let (tx, reports) = watch::channel(Report::default());
        std::thread::spawn(move || read_reports(out, tx));
        Ok(Self {
            id,
            addr,
            process,
            reports,
        })
    }

    /// Starts the child's node with these initial members (empty: it joins later as a
    /// learner).
    pub(crate) fn start(&mut self, members: &BTreeMap<u64, String>) -> Result<(), String> {
        let stdin = self
            .process
            .stdin
            .as_mut()
            .ok_or_else(|| format!("node {} has no stdin", self.id))?;
        writeln!(stdin, "{}", members_arg(members))
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("starting node {}: {e}", self.id))
    }

    /// The child's peak RSS, in MiB.
    pub(crate) fn peak_rss_mib(&self) -> f64 {
        crate::stats::peak_rss_mib(Some(self.process.id()))
    }

    /// Waits until the child's node has started and serves its client API (an operator adds a
    /// learner once its process is up: a message sent before would wait out an RPC deadline).
    pub(crate) async fn wait_serving(&self, timeout: Duration) -> Result<(), String> {
        let mut rx = self.reports.clone();
        let wait = rx.wait_for(|r| r.kv_addr.is_some() || r.stopped.is_some());
        let report = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| format!("node {} did not start within {timeout:?}", self.id))?
            .map_err(|_| format!("node {}'s reports ended", self.id))?
            .clone();
        match report.stopped {
            Some(why) => Err(format!("node {} stopped: {why}", self.id)),
            None => Ok(()),
        }
    }

    /// Waits until the child reports an applied index of at least `index`; fails when its node
    /// stops or `timeout` passes.
    pub(crate) async fn wait_applied(&self, index: u64, timeout: Duration) -> Result<(), String> {
        let mut rx = self.reports.clone();
        let wait = rx.wait_for(|r| r.applied_index >= index || r.stopped.is_some());
        let report = tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| {
                format!(
                    "node {} did not reach applied index {index} within {timeout:?} (last report: {:?})",
                    self.id,
                    *self.reports.borrow()
                )
            })?
            .map_err(|_| format!("node {}'s reports ended", self.id))?
            .clone();
        match report.stopped {
            Some(why) if report.applied_index < index => {
                Err(format!("node {} stopped: {why}", self.id))
            }
            _ => Ok(()),
        }
    }
}

/// Keeps the latest report of a child from its stdout, until it closes.
fn read_reports(out: impl BufRead, tx: watch::Sender<Report>) {
    for line in out.lines() {
        let Ok(line) = line else { break };
        if let Some(rest) = line.strip_prefix("STATUS ") {
            let mut parts = rest.split_whitespace();
            let applied = parts.next().and_then(|a| a.parse().ok());
            let role = parts.next().unwrap_or_default().to_string();
            if let Some(applied_index) = applied {
                tx.send_modify(|r| {
                    r.applied_index = applied_index;
                    r.role = role;
                });
            }
        } else if let Some(addr) = line.strip_prefix("KV ") {
            if let Ok(addr) = addr.trim().parse() {
                tx.send_modify(|r| r.kv_addr = Some(addr));
            }
        } else if let Some(why) = line.strip_prefix("STOPPED ") {
            tx.send_modify(|r| r.stopped = Some(why.to_string()));
        }
    }
    tx.send_modify(|r| {
        r.stopped
            .get_or_insert_with(|| "the child process exited".into());
    });
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        drop(self.process.stdin.take());
        let deadline = Instant::now() + EXIT_GRACE;
        loop {
            match self.process.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => break,
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        eprintln!(
            "node {} did not exit in {EXIT_GRACE:?}; killing it",
            self.id
        );
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Child processes for nodes `ids`, started as initial members together with `members` (nodes
/// that run elsewhere, id to address); the children and the whole member list.
fn spawn_members(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    ids: std::ops::RangeInclusive<u64>,
    root: &Path,
    mut members: BTreeMap<u64, String>,
) -> Result<(Vec<ChildNode>, BTreeMap<u64, String>), String> {
    let mut children = Vec::new();
    for id in ids {
        let child = ChildNode::spawn(id, backend, factory, root)?;
        members.insert(id, child.addr.clone());
        children.push(child);
    }
    for c in &mut children {
        c.start(&members)?;
    }
    Ok((children, members))
}

/// Every node as a child process (`--network`): the children, and once the cluster has a
/// leader and every node serves its client API, each node's id and client API address, the
/// leader's first.
pub(crate) async fn start_children(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    nodes: u64,
    root: &Path,
) -> Result<(Vec<ChildNode>, Vec<(u64, std::net::SocketAddr)>), String> {
    let (children, _) = spawn_members(backend, factory, 1..=nodes, root, BTreeMap::new())?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut apis = Vec::new();
        for c in &children {
            let r = c.reports.borrow().clone();
            if let Some(why) = r.stopped {
                return Err(format!("node {} stopped: {why}", c.id));
            }
            if let Some(addr) = r.kv_addr {
                apis.push((r.role == "Leader", c.id, addr));
            }
        }
        if apis.len() == children.len() && apis.iter().any(|a| a.0) {
            // The leader first.
            apis.sort_by_key(|a| !a.0);
            return Ok((children, apis.into_iter().map(|a| (a.1, a.2)).collect()));
        }
        if Instant::now() >= deadline {
            return Err("no leader, or not every client API up, within 20 s".into());
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
    }
}

/// Node 1 here, nodes 2..=`nodes` as child processes; node 1 is made leader.
pub(crate) async fn start_processes(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    nodes: u64,
    root: &Path,
) -> Result<(Node, Vec<ChildNode>), String> {
    let config = node_config(1, root);
    let transport = factory.bind(&config).await.map_err(|e| e.to_string())?;
    let local = BTreeMap::from([(1u64, transport.local_addr().to_string())]);
    let (children, members) = spawn_members(backend, factory, 2..=nodes, root, local)?;
    let mut config = config;
    config.initial_members = members;
    // Fresh temporary data dirs: this run creates the cluster.
    // An empty member list: this node joins a running cluster later (`add_learner`).
    config.new_data_dir = if config.initial_members.is_empty() {
        consensus_api::NewDataDir::Join
    } else {
        consensus_api::NewDataDir::Bootstrap
    };
    let node = Consensus::start(backend, config, Store::default(), transport)
        .await
        .map_err(|e| e.to_string())?;
    make_leader(&node).await?;
    Ok((node, children))
}

/// Makes `node` the leader (once there is one) if it is not: the bench's clients and
/// measurements run next to it.
pub(crate) async fn make_leader(node: &Node) -> Result<(), String> {
    let leader = node
        .wait_for_leader(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    if leader != node.id() {
        node.transfer_leader(node.id()).await.map_err(|e| {
            format!(
                "moving leadership from node {leader} back to node {}: {e}",
                node.id()
            )
        })?;
    }
    Ok(())
}

/// The child side of `--processes`: run node `id` until stdin closes.
pub(crate) async fn serve_node(args: &[String]) -> Result<(), String> {
    let [id, backend, transport, root] = args else {
        return Err("--serve-node ID BACKEND TRANSPORT ROOT".into());
    };
    let id: u64 = id.parse().map_err(|e| format!("id: {e}"))?;
    let wiring = kvstore::wiring();
    let backend = wiring.backend(Some(backend)).map_err(|e| e.to_string())?;
    let factory = wiring
        .transport(Some(transport))
        .map_err(|e| e.to_string())?;
    let mut config = node_config(id, Path::new(root));
    let t = factory.bind(&config).await.map_err(|e| e.to_string())?;
    say(&format!("ADDR {}", t.local_addr()));
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(l) = line else { return };
            if lines_tx.send(l).is_err() {
                return;
            }
        }
    });
    let members = lines.recv().await.ok_or("no member list on stdin")?;
    config.initial_members = parse_members(&members)?;
    // An empty member list: this node joins a running cluster later (`add_learner`).
    config.new_data_dir = if config.initial_members.is_empty() {
        consensus_api::NewDataDir::Join
    } else {
        consensus_api::NewDataDir::Bootstrap
    };
    let node = Consensus::start(&*backend, config, Store::default(), t)
        .await
        .map_err(|e| e.to_string())?;
    let api = kvstore::service::Server::start(
        node.clone(),
        id,
        std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        &node_config(id, Path::new(root)).transport.tls,
    )
    .await?;
    say(&format!("KV {}", api.addr()));
    let reporter = tokio::spawn(report_status(node.clone()));
    while lines.recv().await.is_some() {}
    reporter.abort();
    drop(api);
    let _ = node.shutdown().await;
    Ok(())
}

/// Prints the node's status lines (step 3 of the protocol) until it stops.
async fn report_status(node: Node) {
    let mut rx = node.watch();
    loop {
        let st = rx.borrow_and_update().clone();
        say(&format!("STATUS {} {:?}", st.applied_index, st.role));
        if let Some(why) = &st.stopped {
            say(&format!("STOPPED {why}"));
            return;
        }
        tokio::time::sleep(STATUS_INTERVAL).await;
        if rx.changed().await.is_err() {
            say("STOPPED the node's status ended");
            return;
        }
    }
}

/// One protocol line on stdout. Errors are ignored: a parent that stopped reading is ending
/// this child anyway (through stdin).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
