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
//! broker topics list [--describe] | describe NAME | delete NAME [--if-exists]
//! broker topics alter-configs NAME --set K=V --remove K | add-partitions NAME --total N | configs
//! broker brokers list | describe ID | unregister ID
//! broker cluster status
//! # admin commands: --admin URL[,URL...] (or BROKER_ADMIN), --timeout S, --output table|json
//! ```
//!
//! Exit codes of the admin commands: 0 done, 1 other failure, 2 bad command line, 3 not found,
//! 4 conflict (exists, stale, alive), 5 invalid request, 6 unavailable (no node answered, no
//! leader, timeout), 7 no or wrong credential.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use broker::admin::AdminAuth;
use broker::server::{bind, BrokerNode, NodeSpec};
use broker::LivenessConfig;
use broker_node::cli::{
    self, BrokersCmd, CliError, ClusterCmd, Conn, ExitKind, QuorumCmd, TopicsCmd,
};
use broker_node::{config_file, demo, wiring};
use clap::{Args, Parser, Subcommand};
use consensus_api::{NodeId, TlsConfig};

#[derive(Parser)]
#[command(
    name = "broker",
    version,
    about = "A KRaft-like metadata plane on pluggable consensus",
    after_help = "Start with `broker demo`, or `broker dev` and then, in another terminal, \
                  `broker topics create orders --partitions 3 --replication-factor 3 --admin \
                  URL --admin-token-file FILE` (both printed by `dev`)."
)]
struct Cli {
    /// The admin API's bearer token, read from this file (admin commands; the token may also
    /// come from the BROKER_ADMIN_TOKEN environment variable).
    #[arg(long, global = true)]
    admin_token_file: Option<PathBuf>,
    /// Log format on stderr: `text` (colours only on a terminal) or `json` (one object per
    /// line, for log collectors). `RUST_LOG` sets the levels.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "BROKER_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

/// How logs are written.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one node of a multi-process cluster (consensus member + broker, combined mode).
    Serve(Box<Serve>),
    /// Run a local cluster in this process and print its admin URLs; Ctrl-C stops it.
    #[command(after_help = "Examples:\n  broker dev\n  \
                            broker dev --data-dir /tmp/dev --base-port 19000   # keep it; run again to restart it")]
    Dev {
        /// Number of nodes.
        #[arg(long, default_value_t = 3)]
        nodes: u64,
        /// Keep the cluster's data (and its admin token) here, and start it again from it when
        /// it exists; needs --base-port. Default: a temporary directory removed at exit.
        #[arg(long, requires = "base_port")]
        data_dir: Option<PathBuf>,
        /// Node N listens on 127.0.0.1 port BASE+N (consensus) and BASE+100+N (admin API).
        #[arg(long)]
        base_port: Option<u16>,
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
        #[command(flatten)]
        conn: Conn,
    },
    /// Topic admin commands.
    Topics {
        #[command(subcommand)]
        cmd: TopicsCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cluster admin commands.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// The consensus quorum: `quorum describe --status | --replication`.
    Quorum {
        #[command(subcommand)]
        cmd: QuorumCmd,
        #[command(flatten)]
        conn: Conn,
    },
    /// Write the data dir of one initial member of a NEW cluster from a backup (`broker
    /// cluster backup`), offline: run it for each member with the same backup, --peers and
    /// --cluster-id, then start each with `serve` and the same --peers (no --bootstrap: the
    /// data dir has its identity). The new cluster's log continues after the backup's index.
    #[command(
        after_help = "Example (a new three-node cluster from last night's backup):\n  \
                            broker restore --backup metadata.backup --data-dir /var/lib/broker/1 --id 1 \\\n    \
                            --peers 1=10.0.0.1:7001,2=10.0.0.2:7001,3=10.0.0.3:7001 --cluster-id metadata-2"
    )]
    Restore {
        /// The backup file (checked whole first: format, length, checksum).
        #[arg(long)]
        backup: PathBuf,
        /// The new node's data dir: must not exist or be empty.
        #[arg(long)]
        data_dir: PathBuf,
        /// The new node's id; one of --peers.
        #[arg(long)]
        id: NodeId,
        /// The new cluster's voters: `1=host:port,2=host:port,...`.
        #[arg(long, value_parser = parse_peers)]
        peers: BTreeMap<NodeId, String>,
        /// The new cluster's id (what `serve --cluster-id` will say).
        #[arg(long)]
        cluster_id: String,
        /// The engine the new cluster runs (default: the first compiled in).
        #[arg(long)]
        backend: Option<String>,
    },
    /// Offline tools that read a data dir.
    Debug {
        #[command(subcommand)]
        cmd: DebugCmd,
    },
}

#[derive(Subcommand)]
enum DebugCmd {
    /// Print a data dir's identity, hard state (term, vote, commit), membership, log bounds,
    /// last entries and snapshot metadata, without starting a node (no lock is taken and
    /// nothing is changed, so it also reads the dir of a running node, as it was when read).
    #[command(
        after_help = "Example:\n  broker debug dump --data-dir /var/lib/broker/1 --entries 50 -o json"
    )]
    Dump {
        /// The data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// How many of the last log entries to list.
        #[arg(long, default_value_t = 20)]
        entries: usize,
        /// The engine that wrote it (default: the first compiled in).
        #[arg(long)]
        backend: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = cli::Output::Table)]
        output: cli::Output,
    },
    /// UNSAFE disaster recovery after a permanent loss of a quorum: rewrite a stopped
    /// survivor's data dir so that, started again, it runs with exactly --voters as the voting
    /// set. Every entry in its log then counts as committed, and what only the lost nodes had
    /// is gone. Run it on each survivor with the same --voters (or on the most up-to-date one
    /// with itself alone), start them, then replace the lost nodes. Recorded in the data dir's
    /// RECOVERY.log.
    #[command(
        name = "force-voters",
        after_help = "Example (nodes 2 and 3 are lost for good; node 1 survives):\n  \
                      broker debug force-voters --data-dir /var/lib/broker/1 --id 1 --voters 1 \\\n    \
                      --unsafe-lose-uncommitted-writes"
    )]
    ForceVoters {
        /// The stopped survivor's data dir.
        #[arg(long)]
        data_dir: PathBuf,
        /// The survivor's node id.
        #[arg(long)]
        id: NodeId,
        /// The new voting set, comma-separated; must include --id.
        #[arg(long, value_delimiter = ',', required = true)]
        voters: Vec<NodeId>,
        /// The engine that wrote the data dir (default: the first compiled in).
        #[arg(long)]
        backend: Option<String>,
        /// Says you understand this is unsafe (required).
        #[arg(long)]
        unsafe_lose_uncommitted_writes: bool,
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
#[command(
    after_help = "Every flag may come from a TOML file instead (--config FILE): keys are \
                        the flag names (`data-dir = \"/var/lib/broker\"`, `peers` a table of \
                        id = \"host:port\"); flags on the command line override the file."
)]
struct Serve {
    /// A TOML file with any of these flags (see below); flags given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (also its broker id).
    #[arg(long)]
    id: NodeId,
    /// Consensus transport address.
    #[arg(long)]
    listen: SocketAddr,
    /// Admin API address (HTTPS; localhost unless told otherwise).
    #[arg(long, default_value = "127.0.0.1:9093")]
    admin: SocketAddr,
    /// Initial voters: `1=host:port,2=host:port,...` (used once, on a fresh data dir).
    #[arg(long, value_parser = parse_peers, required_unless_present = "join", conflicts_with = "join")]
    peers: Option<BTreeMap<NodeId, String>>,
    /// Start as a new member of an existing cluster instead of creating one: the node waits,
    /// with no membership, until a member adds it (`broker cluster add-learner`). Records the
    /// data dir's identity on the first start.
    #[arg(long)]
    join: bool,
    /// Create the cluster from --peers: the first start of each initial member, once. Records
    /// the data dir's identity (cluster id, node id, incarnation); without it (or --join) an
    /// empty data dir is refused, so a node that lost its disk cannot come back empty under
    /// its id. On a data dir that has an identity it changes nothing.
    #[arg(long, conflicts_with = "join")]
    bootstrap: bool,
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
    /// The admin API's own server certificate (PEM), signed by the cluster CA, for the names
    /// operators dial (default: the node certificate, which must then name them).
    #[arg(long, requires = "admin_tls_key")]
    admin_tls_cert: Option<PathBuf>,
    /// The key (PEM) of --admin-tls-cert.
    #[arg(long, requires = "admin_tls_cert")]
    admin_tls_key: Option<PathBuf>,
    /// INSECURE, local experiments only: serve the admin API as plain HTTP (a token and every
    /// answer cross the network readable). Without it the API is HTTPS with the node's TLS
    /// material, and takes client certificates from the cluster CA as credentials.
    #[arg(long, conflicts_with_all = ["admin_tls_cert", "admin_tls_key"])]
    admin_insecure_plaintext: bool,
    /// A separate secret for the broker RPCs (`/broker-rpc/...`: register, heartbeat,
    /// controlled shutdown of data-plane brokers); they then take only it, and the admin
    /// routes never do. Without it the admin token serves both.
    #[arg(long)]
    broker_token_file: Option<PathBuf>,
    /// Reads (GET) need the admin token (--admin-token-file) too.
    #[arg(long)]
    admin_protect_reads: bool,
    /// INSECURE, local experiments only: serve the admin API without any credential check
    /// (otherwise every request that changes state needs a client certificate from the cluster
    /// CA or, with --admin-token-file, `Authorization: Bearer <token>`; over plain HTTP the
    /// token is required).
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
    /// On SIGTERM or Ctrl-C: how long the controlled shutdown (moving leaderships away, then
    /// stopping the node) may take, in milliseconds.
    #[arg(long, default_value_t = 15_000)]
    shutdown_timeout_ms: u64,
    #[command(flatten)]
    engine: Engine,
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
        if id == 0 {
            return Err("peer id 0 is reserved: node ids start at 1".into());
        }
        if out.insert(id, addr.to_string()).is_some() {
            return Err(format!("peer {id} is listed twice"));
        }
    }
    if out.is_empty() {
        return Err("at least one peer is needed".into());
    }
    Ok(out)
}

/// How `serve` protects its admin API; `https` when it is served over TLS (client
/// certificates from the cluster CA are then a credential).
fn serve_admin_auth(
    s: &Serve,
    token_file: Option<&std::path::Path>,
    https: bool,
) -> Result<AdminAuth, String> {
    let token = cli::admin_token(token_file).map_err(|e| e.message)?;
    let with_broker_token = |auth: AdminAuth| match &s.broker_token_file {
        Some(f) => {
            let broker = std::fs::read_to_string(f)
                .map_err(|e| format!("broker token file {}: {e}", f.display()))?;
            auth.with_broker_token(&broker)
        }
        None => Ok(auth),
    };
    match (token, s.admin_insecure_no_auth) {
        (Some(_), true) => Err("--admin-insecure-no-auth contradicts an admin token".into()),
        (Some(t), false) => {
            let auth = AdminAuth::token(&t, s.admin_protect_reads)?;
            with_broker_token(if https {
                auth.or_client_certificates()
            } else {
                auth
            })
        }
        (None, false) if https => {
            with_broker_token(AdminAuth::client_certificates(s.admin_protect_reads))
        }
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
            "the admin API served as plain HTTP needs a credential: pass --admin-token-file \
             FILE (a secret of at least 16 characters; clients send it as `Authorization: \
             Bearer <token>`), or --admin-insecure-no-auth for a local experiment"
                .into(),
        ),
    }
}

/// The admin API's HTTPS: the node's TLS material, or --admin-tls-cert/--admin-tls-key with
/// the cluster CA; `None` with --admin-insecure-plaintext (announced loudly).
fn serve_admin_tls(
    s: &Serve,
    tls: &TlsConfig,
) -> Result<Option<std::sync::Arc<broker::admin_tls::ServerConfig>>, String> {
    if s.admin_insecure_plaintext {
        eprintln!(
            "WARNING: --admin-insecure-plaintext: node {}'s admin API at {} is plain HTTP: \
             credentials and answers cross the network readable. For local experiments only.",
            s.id, s.admin
        );
        return Ok(None);
    }
    let ca = match tls {
        TlsConfig::Files { ca_cert, .. } => ca_cert.clone(),
        TlsConfig::DevCerts { dir } => consensus_tls::dev::ensure(dir, s.id)?.ca_cert,
        _ => {
            return Err(
                "the admin API is HTTPS with the node's TLS material, and this node has none \
                 (--insecure-plaintext): pass --tls-ca/--tls-cert/--tls-key or --dev-certs, \
                 or --admin-insecure-plaintext as well for a local experiment"
                    .into(),
            )
        }
    };
    let material = match (&s.admin_tls_cert, &s.admin_tls_key) {
        (Some(cert), Some(key)) => consensus_tls::load_files(&ca, cert, key)?,
        _ => consensus_tls::load(tls, s.id)?,
    };
    let config = consensus_tls::admin_server_config(&material)?;
    Ok(Some(std::sync::Arc::new(config)))
}

/// Start-up checks of `serve`'s settings, before anything is created on disk.
fn check_serve(s: &Serve) -> Result<(), String> {
    if s.id == 0 {
        return Err("--id 0 is reserved: node ids start at 1".into());
    }
    let peers = s.peers.clone().unwrap_or_default();
    if !s.join && !peers.contains_key(&s.id) {
        return Err(format!("--peers must include this node ({})", s.id));
    }
    let mut addrs = std::collections::BTreeSet::new();
    for (id, addr) in &peers {
        if !addrs.insert(addr.as_str()) {
            return Err(format!(
                "--peers: address {addr} is given to more than one node (again for {id})"
            ));
        }
    }
    if s.heartbeat_ms == 0 || s.session_timeout_ms == 0 {
        return Err("--heartbeat-ms and --session-timeout-ms must be above 0".into());
    }
    if s.heartbeat_ms.saturating_mul(2) > s.session_timeout_ms {
        return Err(format!(
            "--heartbeat-ms {} must be at most half of --session-timeout-ms {}: otherwise one \
             late heartbeat fences the broker, and it flaps between fenced and unfenced",
            s.heartbeat_ms, s.session_timeout_ms
        ));
    }
    Ok(())
}

async fn serve(s: Serve, token_file: Option<PathBuf>) -> Result<(), String> {
    check_serve(&s)?;
    // Judged after the transport's TLS, whose error comes first.
    let admin_auth = serve_admin_auth(&s, token_file.as_deref(), !s.admin_insecure_plaintext);
    let backend = wiring::backend(s.engine.backend.as_deref())?;
    let factory = wiring::transport(s.engine.transport.as_deref())?;
    let tls = match (
        s.tls_ca.clone(),
        s.tls_cert.clone(),
        s.tls_key.clone(),
        s.dev_certs.clone(),
    ) {
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
    let admin_tls = serve_admin_tls(&s, &tls)?;
    let admin_auth = admin_auth?;
    if let TlsConfig::Files { node_cert, .. } = &tls {
        // A certificate of another node would start, then be refused by every peer.
        let material = consensus_tls::load(&tls, s.id)?;
        let leaf = material
            .chain
            .first()
            .ok_or_else(|| format!("{} holds no certificate", node_cert.display()))?;
        consensus_tls::verify_peer_id(leaf, s.id).map_err(|e| {
            format!(
                "--tls-cert {} is not node {}'s certificate ({e}): each node needs a \
                 certificate for the name {}",
                node_cert.display(),
                s.id,
                consensus_tls::node_name(s.id)
            )
        })?;
    }
    let shutdown_timeout = Duration::from_millis(s.shutdown_timeout_ms);
    let admin_scheme = if s.admin_insecure_plaintext {
        "http"
    } else {
        "https"
    };
    let spec = NodeSpec {
        id: s.id,
        cluster_id: s.cluster_id,
        listen: s.listen,
        admin: s.admin,
        peers: s.peers.unwrap_or_default(),
        new_data_dir: if s.bootstrap {
            consensus_api::NewDataDir::Bootstrap
        } else if s.join {
            consensus_api::NewDataDir::Join
        } else {
            consensus_api::NewDataDir::Refuse
        },
        data_dir: s.data_dir,
        tls,
        liveness: LivenessConfig {
            session_timeout: Duration::from_millis(s.session_timeout_ms),
            heartbeat_interval: Duration::from_millis(s.heartbeat_ms),
            ..LivenessConfig::default()
        },
        rack: s.rack,
        admin_auth,
        admin_tls,
    };
    let metrics = install_metrics();
    // --peers bootstraps a fresh data dir only; on a kept one the stored membership rules.
    let kept = !spec.peers.is_empty()
        && std::fs::read_dir(&spec.data_dir).is_ok_and(|mut d| d.next().is_some());
    let peers = spec.peers.clone();
    let transport = bind(&spec, &*factory).await?;
    let node = BrokerNode::start(spec, &*backend, transport, metrics).await?;
    if kept {
        let st = node.controller.node().status();
        let stored: BTreeMap<NodeId, String> = st
            .voters
            .iter()
            .chain(&st.learners)
            .map(|id| (*id, st.addresses.get(id).cloned().unwrap_or_default()))
            .collect();
        if !stored.is_empty() && stored != peers {
            tracing::warn!(
                node = node.id,
                "--peers {peers:?} differs from the membership stored in the data dir \
                 {stored:?}: --peers only creates a cluster, the stored membership is used \
                 (change it with membership commands, not --peers)"
            );
        }
    }
    println!(
        "node {} ({} over {}): consensus {}, admin {}://{}",
        node.id,
        backend.name(),
        factory.name(),
        node.raft_addr,
        admin_scheme,
        node.admin_addr
    );
    let signal = stop_signal().await?;
    let id = node.id;
    eprintln!(
        "node {id}: {signal}: controlled shutdown (leaderships move away, then the node stops; \
         at most {shutdown_timeout:?})"
    );
    if tokio::time::timeout(shutdown_timeout, node.shutdown())
        .await
        .is_err()
    {
        return Err(format!(
            "node {id}: the controlled shutdown did not finish within {shutdown_timeout:?} \
             (no quorum?); stopping anyway"
        ));
    }
    eprintln!("node {id}: stopped");
    Ok(())
}

/// Waits for Ctrl-C (SIGINT) or SIGTERM; returns which.
async fn stop_signal() -> Result<&'static str, String> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.map(|()| "SIGINT").map_err(|e| format!("waiting for Ctrl-C: {e}")),
            _ = term.recv() => Ok("SIGTERM"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .map(|()| "Ctrl-C")
            .map_err(|e| format!("waiting for Ctrl-C: {e}"))
    }
}

/// The Prometheus recorder (once per process).
/// Latencies (`*_seconds`) are histograms with buckets from 100 µs to 10 s, batch sizes
/// (`consensus_log_batch_writes`) from 1 to 4096 writes, so they aggregate across nodes.
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    const SECONDS: [f64; 16] = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let batches: Vec<f64> = (0..13).map(|i| f64::from(1u32 << i)).collect();
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full("consensus_log_batch_writes".into()), &batches)
        })
        .and_then(|b| b.install_recorder())
        .map_err(|e| tracing::warn!("metrics disabled: {e}"))
        .ok()
}

async fn dev(
    nodes: u64,
    engine: Engine,
    data_dir: Option<PathBuf>,
    base_port: Option<u16>,
) -> Result<(), String> {
    let backend = wiring::backend(engine.backend.as_deref())?;
    let factory = wiring::transport(engine.transport.as_deref())?;
    // A temporary root lives (and is removed) with this guard.
    let (_temp, root) = match data_dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            (None, dir)
        }
        None => {
            let t = tempfile::tempdir().map_err(|e| e.to_string())?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let restarting = root.join("node-1").exists();
    let metrics = install_metrics();
    let token_file = root.join("admin-token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(t) if restarting => t.trim().to_string(),
        _ => {
            let t = AdminAuth::generate_token();
            std::fs::write(&token_file, &t)
                .map_err(|e| format!("{}: {e}", token_file.display()))?;
            t
        }
    };
    let cluster = demo::LocalCluster::start(
        backend.clone(),
        factory.clone(),
        nodes,
        &root,
        LivenessConfig::default(),
        metrics,
        AdminAuth::token(&token, false)?,
        base_port,
    )
    .await?;
    println!(
        "{} {nodes} nodes ({} over {})",
        if restarting {
            "restarted the kept cluster of"
        } else {
            "started a new cluster of"
        },
        backend.name(),
        factory.name()
    );
    let urls: Vec<String> = cluster.admin_urls().into_iter().map(|(_, u)| u).collect();
    for (id, url) in cluster.admin_urls() {
        println!("node {id}: admin {url}");
    }
    let tls = cluster.admin_tls();
    let shown = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    println!("for the CLI (writes need the token or the operator certificate):");
    println!("  export BROKER_ADMIN={}", urls.join(","));
    if let Some(ca) = shown(&tls.ca) {
        println!("  export BROKER_ADMIN_CA={ca}");
    }
    println!(
        "  export BROKER_ADMIN_TOKEN={token}   # or --admin-token-file {}",
        token_file.display()
    );
    if let Some((cert, key)) = &tls.identity {
        println!(
            "  # or, instead of the token: --admin-cert {} --admin-key {}",
            cert.display(),
            key.display()
        );
    }
    println!("data in {}; Ctrl-C stops the cluster", root.display());
    tokio::signal::ctrl_c()
        .await
        .map_err(|e| format!("waiting for Ctrl-C: {e}"))?;
    cluster.stop_all().await;
    Ok(())
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let token_file = cli.admin_token_file;
    let client = |conn: &Conn| {
        let token = cli::admin_token(token_file.as_deref())?;
        cli::Client::new(conn, token)
    };
    match cli.cmd {
        Cmd::Serve(s) => Ok(serve(*s, token_file.clone()).await?),
        Cmd::Dev {
            nodes,
            engine,
            data_dir,
            base_port,
        } => {
            if !(1..=9).contains(&nodes) {
                return Err(CliError {
                    kind: ExitKind::Usage,
                    message: "--nodes must be between 1 and 9".into(),
                });
            }
            Ok(dev(nodes, engine, data_dir, base_port).await?)
        }
        Cmd::Demo { engine } => Ok(demo::run(engine.backend, engine.transport).await?),
        Cmd::Brokers { cmd, conn } => client(&conn)?.brokers(cmd).await,
        Cmd::Topics { cmd, conn } => client(&conn)?.topics(cmd).await,
        Cmd::Cluster { cmd, conn } => client(&conn)?.cluster(cmd).await,
        Cmd::Quorum { cmd, conn } => client(&conn)?.quorum(cmd).await,
        Cmd::Restore {
            backup,
            data_dir,
            id,
            peers,
            cluster_id,
            backend,
        } => {
            let backend = wiring::backend(backend.as_deref())?;
            Ok(broker_node::dump::restore(
                &*backend,
                &backup,
                &data_dir,
                &cluster_id,
                id,
                &peers,
            )?)
        }
        Cmd::Debug {
            cmd:
                DebugCmd::Dump {
                    data_dir,
                    entries,
                    backend,
                    output,
                },
        } => {
            let backend = wiring::backend(backend.as_deref())?;
            let v = broker_node::dump::report(&*backend, &data_dir, entries)?;
            println!("{}", broker_node::dump::render(&v, output)?);
            Ok(())
        }
        Cmd::Debug {
            cmd:
                DebugCmd::ForceVoters {
                    data_dir,
                    id,
                    voters,
                    backend,
                    unsafe_lose_uncommitted_writes,
                },
        } => {
            if !unsafe_lose_uncommitted_writes {
                return Err(CliError {
                    kind: ExitKind::Usage,
                    message: "force-voters is unsafe (entries the cluster never committed may \
                              commit, and what only the lost nodes had is gone): pass \
                              --unsafe-lose-uncommitted-writes to go ahead"
                        .into(),
                });
            }
            let backend = wiring::backend(backend.as_deref())?;
            let voters: std::collections::BTreeSet<NodeId> = voters.into_iter().collect();
            Ok(broker_node::dump::force_voters(
                &*backend, &data_dir, id, &voters,
            )?)
        }
    }
}

/// The long flags `serve` accepts (its own and the global ones): the keys of a config file.
fn serve_flags() -> std::collections::BTreeSet<String> {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    let longs = |c: &clap::Command| -> Vec<String> {
        c.get_arguments()
            .filter_map(|a| a.get_long())
            .map(String::from)
            .collect()
    };
    let mut flags = longs(&cmd);
    if let Some(serve) = cmd.find_subcommand("serve") {
        flags.extend(longs(serve));
    }
    flags
        .into_iter()
        .filter(|f| f != "help" && f != "version")
        .collect()
}

fn main() -> ExitCode {
    consensus_api::process::release_large_buffers();
    let args = match config_file::expand(std::env::args_os().collect(), &serve_flags()) {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(ExitKind::Usage as u8);
        }
    };
    let cli = Cli::parse_from(args);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(wiring::LOG_FILTER));
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match cli.log_format {
        LogFormat::Json => logs.json().init(),
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
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
            eprintln!("error: {}", e.message);
            ExitCode::from(e.kind as u8)
        }
    }
}
