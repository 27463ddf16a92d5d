//! `broker`: run a metadata node, a local cluster, the scripted demo, or admin commands.
//!
//! ```text
//! broker demo                                   # scripted: bootstrap, topics, kill, failover, recovery
//! broker dev --nodes 3                          # a local cluster in one process until Ctrl-C
//! broker serve --id 1 --listen 127.0.0.1:7001 --admin 127.0.0.1:8001 \
//!     --peers 1=127.0.0.1:7001,2=127.0.0.1:7002,3=127.0.0.1:7003 --data-dir /tmp/n1 \
//!     --dev-certs /tmp/certs --admin-token-file /tmp/admin-token
//! broker topics create orders --partitions 6 --replication-factor 3 --admin 127.0.0.1:8001 \
//!     --admin-token-file /tmp/admin-token         # or BROKER_ADMIN_TOKEN=...
//! broker topics list|describe NAME|delete NAME --admin ADDR
//! broker brokers list --admin ADDR
//! broker cluster status --admin ADDR
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use broker::admin::AdminAuth;
use broker::server::{bind, BrokerNode, NodeSpec};
use broker::LivenessConfig;
use broker_node::{demo, http, wiring};
use clap::{Args, Parser, Subcommand};
use consensus_api::{NodeId, TlsConfig};

#[derive(Parser)]
#[command(
    name = "broker",
    about = "A KRaft-like metadata plane on pluggable consensus"
)]
struct Cli {
    /// The admin API's bearer token, read from this file (admin commands; the token may also
    /// come from the BROKER_ADMIN_TOKEN environment variable).
    #[arg(long, global = true)]
    admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a multi-process cluster (consensus member + broker, combined mode).
    Serve(Box<Serve>),
    /// Run a local cluster in this process and print its admin URLs; Ctrl-C stops it.
    Dev {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        #[command(flatten)]
        engine: Engine,
    },
    /// The scripted demo: bootstrap, topics, kill the leader and a broker, failover, recovery.
    Demo {
        #[command(flatten)]
        engine: Engine,
    },
    /// Broker admin commands.
    Brokers {
        #[command(subcommand)]
        cmd: BrokersCmd,
    },
    /// Topic admin commands.
    Topics {
        #[command(subcommand)]
        cmd: TopicsCmd,
    },
    /// Cluster admin commands.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
}

#[derive(Args, Clone)]
struct Engine {
    /// Consensus engine among those compiled in (cargo features); default: the first.
    #[arg(long)]
    backend: Option<String>,
    /// Transport among those compiled in (cargo features); default: the first.
    #[arg(long)]
    transport: Option<String>,
}

#[derive(Args)]
struct Serve {
    /// This node's id (also its broker id).
    #[arg(long)]
    id: NodeId,
    /// Consensus transport address.
    #[arg(long)]
    listen: SocketAddr,
    /// Admin HTTP address (localhost unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:9093")]
    admin: SocketAddr,
    /// Initial voters: `1=host:port,2=host:port,...` (used once, on a fresh data dir).
    #[arg(long, value_parser = parse_peers)]
    peers: BTreeMap<NodeId, String>,
    /// Data directory.
    #[arg(long)]
    data_dir: PathBuf,
    /// Cluster id.
    #[arg(long, default_value = "broker-cluster")]
    cluster_id: String,
    /// Cluster CA certificate (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM).
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// This node's key (PEM).
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Generate (once) and use development certificates in this directory.
    #[arg(long, conflicts_with = "tls_ca")]
    dev_certs: Option<PathBuf>,
    /// Reads (GET) need the admin token (--admin-token-file) too.
    #[arg(long)]
    admin_protect_reads: bool,
    /// INSECURE, local experiments only: serve the admin API without any credential check
    /// (otherwise --admin-token-file is required: every request that changes state needs
    /// `Authorization: Bearer <token>`).
    #[arg(long)]
    admin_insecure_no_auth: bool,
    /// INSECURE, local experiments only: run the consensus transport without TLS (gRPC only).
    /// Traffic is readable and anyone who reaches the port can claim to be any member.
    #[arg(long, conflicts_with_all = ["tls_ca", "dev_certs"])]
    insecure_plaintext: bool,
    /// Rack of this node's broker.
    #[arg(long)]
    rack: Option<String>,
    /// Broker session timeout in milliseconds.
    #[arg(long, default_value_t = 9000)]
    session_timeout_ms: u64,
    /// Broker heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 2000)]
    heartbeat_ms: u64,
    #[command(flatten)]
    engine: Engine,
}

#[derive(Subcommand)]
enum BrokersCmd {
    /// List registered brokers.
    List {
        /// Admin address of any node.
        #[arg(long)]
        admin: String,
    },
}

#[derive(Subcommand)]
enum TopicsCmd {
    /// Create a topic.
    Create {
        /// Topic name.
        name: String,
        /// Partitions.
        #[arg(long)]
        partitions: u32,
        /// Replication factor.
        #[arg(long)]
        replication_factor: u16,
        /// Configs `key=value` (repeatable).
        #[arg(long = "config", value_parser = parse_kv)]
        configs: Vec<(String, String)>,
        /// Admin address of any node.
        #[arg(long)]
        admin: String,
    },
    /// List topics.
    List {
        /// Admin address of any node.
        #[arg(long)]
        admin: String,
    },
    /// Describe one topic.
    Describe {
        /// Topic name.
        name: String,
        /// Admin address of any node.
        #[arg(long)]
        admin: String,
    },
    /// Delete a topic.
    Delete {
        /// Topic name.
        name: String,
        /// Admin address of any node.
        #[arg(long)]
        admin: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Consensus status of one node.
    Status {
        /// Admin address of the node.
        #[arg(long)]
        admin: String,
    },
}

fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>, String> {
    let mut out = BTreeMap::new();
    for kv in s.split(',').filter(|p| !p.is_empty()) {
        let (id, addr) = kv
            .split_once('=')
            .ok_or_else(|| format!("peer {kv:?} must be ID=HOST:PORT"))?;
        let id: NodeId = id.parse().map_err(|e| format!("peer id {id:?}: {e}"))?;
        if addr.is_empty() {
            return Err(format!("peer {id} has no address"));
        }
        out.insert(id, addr.to_string());
    }
    if out.is_empty() {
        return Err("at least one peer is needed".into());
    }
    Ok(out)
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("config {s:?} must be KEY=VALUE"))
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one admin request; prints the body; fails on a non-2xx status.
async fn admin_call(
    token: Option<&str>,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<(), String> {
    let (status, text) = http::Request::new(addr, method, path)
        .json(body.as_deref())
        .token(token)
        .send(ADMIN_TIMEOUT)
        .await?;
    let pretty = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or(text);
    if (200..300).contains(&status) {
        if !pretty.is_empty() {
            println!("{pretty}");
        }
        Ok(())
    } else {
        Err(format!("HTTP {status}: {pretty}"))
    }
}

/// The admin token from `file`, else from `BROKER_ADMIN_TOKEN`; `None` when neither is set.
fn admin_token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .map_err(|e| format!("admin token file {}: {e}", f.display()))?;
        return Ok(Some(text.trim().to_string()));
    }
    Ok(std::env::var("BROKER_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty()))
}

/// How `serve` protects its admin API.
fn serve_admin_auth(s: &Serve, token_file: Option<&std::path::Path>) -> Result<AdminAuth, String> {
    match (admin_token(token_file)?, s.admin_insecure_no_auth) {
        (Some(_), true) => Err("--admin-insecure-no-auth contradicts an admin token".into()),
        (Some(t), false) => AdminAuth::token(&t, s.admin_protect_reads),
        (None, true) => {
            eprintln!(
                "WARNING: --admin-insecure-no-auth: node {}'s admin API at {} checks no \
                 credential; anyone who reaches it can change the metadata, fence or shut down \
                 brokers. For local experiments only.",
                s.id, s.admin
            );
            Ok(AdminAuth::InsecureOpen)
        }
        (None, false) => Err(
            "the admin API needs a credential: pass --admin-token-file FILE (a secret of at \
             least 16 characters; clients send it as `Authorization: Bearer <token>`), or \
             --admin-insecure-no-auth for a local experiment"
                .into(),
        ),
    }
}

async fn serve(s: Serve, token_file: Option<PathBuf>) -> Result<(), String> {
    // Judged after the transport's TLS, whose error comes first.
    let admin_auth = serve_admin_auth(&s, token_file.as_deref());
    let backend = wiring::backend(s.engine.backend.as_deref())?;
    let factory = wiring::transport(s.engine.transport.as_deref())?;
    let tls = match (s.tls_ca, s.tls_cert, s.tls_key, s.dev_certs) {
        (Some(ca_cert), Some(node_cert), Some(node_key), _) => TlsConfig::Files {
            ca_cert,
            node_cert,
            node_key,
        },
        (_, _, _, Some(dir)) => TlsConfig::DevCerts { dir },
        _ if s.insecure_plaintext && factory.supports_insecure() => {
            eprintln!(
                "WARNING: --insecure-plaintext: node {} runs its consensus transport WITHOUT TLS. \
                 Traffic is readable and anyone who reaches {} can claim to be any member. \
                 For local experiments only.",
                s.id, s.listen
            );
            TlsConfig::InsecurePlaintext
        }
        _ if s.insecure_plaintext => {
            return Err(format!(
                "the {} transport always uses mutual TLS; --insecure-plaintext is for gRPC only",
                factory.name()
            ))
        }
        _ => {
            return Err(
                "TLS is required: pass --tls-ca/--tls-cert/--tls-key (the cluster CA, this \
                 node's certificate and key), or --dev-certs DIR for development certificates \
                 (`broker dev` does this for you); --insecure-plaintext runs without TLS, for \
                 local experiments only"
                    .into(),
            )
        }
    };
    let admin_auth = admin_auth?;
    if !s.peers.contains_key(&s.id) {
        return Err(format!("--peers must include this node ({})", s.id));
    }
    let spec = NodeSpec {
        id: s.id,
        cluster_id: s.cluster_id,
        listen: s.listen,
        admin: s.admin,
        peers: s.peers,
        data_dir: s.data_dir,
        tls,
        liveness: LivenessConfig {
            session_timeout: Duration::from_millis(s.session_timeout_ms.max(100)),
            heartbeat_interval: Duration::from_millis(s.heartbeat_ms.max(10)),
            ..LivenessConfig::default()
        },
        rack: s.rack,
        admin_auth,
    };
    let metrics = install_metrics();
    let transport = bind(&spec, &*factory).await?;
    let node = BrokerNode::start(spec, &*backend, transport, metrics).await?;
    println!(
        "node {} ({} over {}): consensus {}, admin http://{}",
        node.id,
        backend.name(),
        factory.name(),
        node.raft_addr,
        node.admin_addr
    );
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("waiting for Ctrl-C: {e}"))?;
    node.shutdown().await;
    Ok(())
}

/// The Prometheus recorder (once per process).
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| tracing::warn!("metrics disabled: {e}"))
        .ok()
}

async fn dev(nodes: u64, engine: Engine) -> Result<(), String> {
    let backend = wiring::backend(engine.backend.as_deref())?;
    let factory = wiring::transport(engine.transport.as_deref())?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let metrics = install_metrics();
    let token = AdminAuth::generate_token();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, &token).map_err(|e| format!("{}: {e}", token_file.display()))?;
    let cluster = demo::LocalCluster::start(
        backend,
        factory,
        nodes,
        dir.path(),
        LivenessConfig::default(),
        metrics,
        AdminAuth::token(&token, false)?,
    )
    .await?;
    for (id, addr) in cluster.admin_addrs() {
        println!("node {id}: admin http://{addr}");
    }
    println!(
        "admin token (writes need it): --admin-token-file {} or BROKER_ADMIN_TOKEN={token}",
        token_file.display()
    );
    println!("data in {}; Ctrl-C stops the cluster", dir.path().display());
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("waiting for Ctrl-C: {e}"))?;
    cluster.stop_all().await;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), String> {
    let token_file = cli.admin_token_file;
    // For the admin commands (`serve` reads the file itself).
    let token = match &cli.cmd {
        Cmd::Serve(_) | Cmd::Dev { .. } | Cmd::Demo { .. } => None,
        _ => admin_token(token_file.as_deref())?,
    };
    let tok = token.as_deref();
    match cli.cmd {
        Cmd::Serve(s) => serve(*s, token_file).await,
        Cmd::Dev { nodes, engine } => {
            if !(1..=9).contains(&nodes) {
                return Err("--nodes must be between 1 and 9".into());
            }
            dev(nodes, engine).await
        }
        Cmd::Demo { engine } => demo::run(engine.backend, engine.transport).await,
        Cmd::Brokers {
            cmd: BrokersCmd::List { admin },
        } => admin_call(tok, &admin, "GET", "/brokers", None).await,
        Cmd::Topics { cmd } => match cmd {
            TopicsCmd::Create {
                name,
                partitions,
                replication_factor,
                configs,
                admin,
            } => {
                let body = serde_json::json!({
                    "name": name,
                    "partitions": partitions,
                    "replication_factor": replication_factor,
                    "configs": configs.into_iter().collect::<BTreeMap<_, _>>(),
                });
                admin_call(tok, &admin, "POST", "/topics", Some(body.to_string())).await
            }
            TopicsCmd::List { admin } => admin_call(tok, &admin, "GET", "/topics", None).await,
            TopicsCmd::Describe { name, admin } => {
                admin_call(tok, &admin, "GET", &format!("/topics/{name}"), None).await
            }
            TopicsCmd::Delete { name, admin } => {
                admin_call(tok, &admin, "DELETE", &format!("/topics/{name}"), None).await
            }
        },
        Cmd::Cluster {
            cmd: ClusterCmd::Status { admin },
        } => admin_call(tok, &admin, "GET", "/cluster/status", None).await,
    }
}

fn main() -> ExitCode {
    consensus_api::process::release_large_buffers();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(wiring::LOG_FILTER)),
        )
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
