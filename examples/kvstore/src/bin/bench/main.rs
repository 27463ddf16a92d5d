//! `cargo run --release -p kvstore --bin bench`: throughput and latency of the replicated store
//! per backend x transport combination, against the machine's floor measured in the same run.
//!
//! For each combination: a cluster of `--nodes` nodes on 127.0.0.1 with durable storage (fsync
//! on) in a temporary directory, then for each client count a closed loop of `--secs` seconds in
//! which every client puts a `--value-bytes` value through the leader and waits for the answer
//! before the next. Printed per run: ops/s, p50/p99/p999 latency, and peak RSS.
//!
//! The floor: the p50 of a 4 KiB append + `fdatasync` in the data directory's file system and
//! of a loopback TCP round trip, measured again right before each combination (the disk of a
//! shared machine drifts within minutes, so each combination is compared with the floor of its
//! own moment); single-client p50 is printed as a multiple of `fsync p50 + 2 x RTT p50` (a
//! leader must make its entry durable and hear from a follower that did the same). Next to it,
//! the shared-disk floor: the same with the fsync replaced by the p50 time until a majority of
//! `--nodes` writers, started together, each synced a 4 KiB write into preallocated space of
//! its own file (as the log writes, which is cheaper than an append), as the cluster's nodes do
//! on the one disk they share here (a device that serves cache flushes one at a time makes
//! concurrent syncs wait for each other).
//!
//! Flags: `--combos all|tikv_quic,openraft_grpc,...`, `--clients 1,16,64,256`, `--secs 5`,
//! `--value-bytes 256`, `--nodes 3`, `--json PATH`, `--dir PATH` (where data dirs go),
//! `--processes` (nodes 2..N run as child processes of this binary; node 1 runs here, next to
//! the clients, and is made leader; `rss_mib_max` is then the largest child's peak RSS, i.e.
//! per node), `--network` (every node its own child process serving the client API of
//! [`kvstore::service`]; this process only runs the clients, over gRPC with mutual TLS, sharing
//! `--conns` HTTP/2 connections to the leader), `--etcd URL` (first run the same clients against
//! etcd's `KV.Put` at that gRPC endpoint, e.g. `http://127.0.0.1:2379`, or `https://...` with
//! `--etcd-tls DIR` for TLS with a client certificate, and print every
//! row's ratio to etcd's row with the same client count; `scripts/side-by-side.sh` starts etcd).
//!
//! # Large state
//!
//! `--large-state-mib N` runs the large-state benchmark instead (always with `--processes`):
//! per combination and run, the same-run floors (sequential disk writes of 512 MiB ending in an
//! fsync, in the data dir's file system; one loopback TCP connection copying 2 GiB), a cluster
//! filled with N MiB through the leader in values of `--fill-value-kib` (default 64) and
//! compacted with `snapshot_now`, the baseline proposal latency of `--load-clients` (default 4)
//! closed-loop clients putting `--value-bytes` for `--secs`, then a new learner (node
//! `--nodes` + 1, its own process, empty data dir) added while those clients keep putting.
//! Printed: fill time, catch-up time and its phases (the leader's snapshot for the learner, the
//! copy, restore), catch-up MiB/s (snapshot file bytes / catch-up time) against the slower
//! floor, the copy's own MiB/s, peak RSS of the sender (this process, holding node 1 only; its
//! peak is reset just before the add) and of the learner against the state's size + 128 MiB,
//! and proposal p50/p99 during the catch-up against the baseline. `--runs N` (default 3)
//! repeats it and prints the median of each figure, every run's floors, and one PASS/FAIL line
//! per target: catch-up >= 50% of the slower floor, both peak RSS <= state + 128 MiB, p99
//! during the catch-up <= 3 x baseline. `--json PATH` writes the runs, medians and verdicts.
//! Example: `bench --large-state-mib 1024 --combos tikv_quic,tikv_grpc`.

mod floor;
mod large;
mod load;
mod nodes;
mod stats;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use consensus_api::{Backend, ConsensusError, TransportFactory};
use consensus_harness::Runtimes;

use floor::Floor;
use load::{closed_loop_on, Target};

/// Closed-loop put benchmark of every compiled-in backend x transport combination: a cluster
/// per combination on 127.0.0.1 with fsync on, clients putting values through the leader.
#[derive(Parser)]
#[command(name = "bench", version)]
struct Args {
    /// Combinations to run (`all`, or `backend_transport` names such as `tikv_quic`).
    #[arg(long, value_delimiter = ',', default_value = "all")]
    combos: Vec<String>,
    /// Client counts; one run per count.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256",
          value_parser = clap::value_parser!(u64).range(1..))]
    clients: Vec<u64>,
    /// Seconds per run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    secs: u64,
    /// Size of each put's value.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Cluster size.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Also write the rows as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Data directories go here (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Each node in its own process (node 1 in this one); `rss_mib` is then per node.
    #[arg(long)]
    processes: bool,
    /// Every node its own process; the clients use the client API over the network.
    #[arg(long, conflicts_with = "processes")]
    network: bool,
    /// Network clients (`--network`, `--etcd`) share this many HTTP/2 connections.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    conns: u64,
    /// Also run the clients against etcd at these gRPC endpoints (the leader first), first:
    /// `http://` plaintext, `https://` with TLS (`--etcd-tls`).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// TLS to etcd's `https://` endpoints with client certificates, as the project's own
    /// clients and peers always use: a directory holding `ca.pem` (the CA etcd's certificate
    /// is checked against) and `client.pem` / `client-key.pem` (the client's certificate and
    /// key; `scripts/side-by-side.sh` writes them).
    #[arg(long)]
    etcd_tls: Option<PathBuf>,
    /// Network clients (`--network`, `--etcd`) spread their connections over every node (as
    /// etcd's client balancer does) instead of all connecting to the leader; followers forward.
    #[arg(long)]
    spread: bool,
    /// `--network` clients put on long-lived gRPC streams (`PutStream`, one per client) instead
    /// of one unary call per put.
    #[arg(long)]
    streams: bool,
    /// Run the large-state benchmark with this much state, in MiB (see the module docs).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    large_state_mib: Option<u64>,
    /// Large state: size of each value written by the fill, in KiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=8192))]
    fill_value_kib: u64,
    /// Large state: runs per combination (medians are printed).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Large state: closed-loop clients measuring proposal latency.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..))]
    load_clients: u64,
    /// Internal: run one node of `--processes` (ID BACKEND TRANSPORT ROOT) until stdin closes.
    #[arg(long, num_args = 4, hide = true, value_names = ["ID", "BACKEND", "TRANSPORT", "ROOT"])]
    serve_node: Option<Vec<String>>,
}

/// One measured run.
struct Row {
    combo: String,
    clients: usize,
    ops: u64,
    ops_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    rss_mib_max: f64,
    errors: u64,
    floor: Floor,
}

async fn bench_combo(
    backend: Arc<dyn Backend>,
    factory: Arc<dyn TransportFactory>,
    args: &Args,
    root: &Path,
    floor: Floor,
) -> Result<Vec<Row>, ConsensusError> {
    let combo = format!("{}_{}", backend.name(), factory.name());
    let dir = root.join(&combo);
    if args.network {
        let (children, apis) = nodes::start_children(&*backend, &*factory, args.nodes, &dir)
            .await
            .map_err(ConsensusError::Internal)?;
        let tls = consensus_api::TlsConfig::DevCerts {
            dir: dir.join("certs"),
        };
        // The leader's API only, or (`--spread`) every node's in turn.
        let apis = if args.spread { &apis[..] } else { &apis[..1] };
        let mut conns = Vec::new();
        for i in 0..args.conns as usize {
            let (id, addr) = apis[i % apis.len()];
            let c = kvstore::service::Client::connect(addr, id, &tls, Duration::from_secs(10))
                .await
                .map_err(ConsensusError::Transport)?;
            conns.push(c);
        }
        let name = format!(
            "{combo}_net{}{}",
            if args.streams { "_stream" } else { "" },
            if args.spread { "_spread" } else { "" }
        );
        let target = if args.streams {
            Target::KvStream(conns)
        } else {
            Target::Kv(conns)
        };
        let rss = || {
            children
                .iter()
                .map(|c| c.peak_rss_mib())
                .fold(0.0, f64::max)
        };
        return Ok(run_rows(&name, &target, args, floor, rss).await);
    }
    // Kept until the end of the run: the in-process cluster's nodes live in it.
    let mut cluster = None;
    let (nodes, children) = if args.processes {
        let (node, children) = nodes::start_processes(&*backend, &*factory, args.nodes, &dir)
            .await
            .map_err(ConsensusError::Internal)?;
        (vec![node], Some(children))
    } else {
        let local = kvstore::start_local_cluster(
            backend.clone(),
            factory.clone(),
            "bench",
            args.nodes,
            &dir,
            Runtimes::Caller,
        )
        .await?;
        let nodes = local.live().into_iter().map(|id| local.node(id)).collect();
        cluster = Some(local);
        (nodes, None)
    };
    let leader_id = nodes[0].wait_for_leader(Duration::from_secs(10)).await?;
    let leader = nodes
        .iter()
        .find(|n| n.status().id == leader_id)
        .cloned()
        .ok_or_else(|| ConsensusError::Internal("leader handle missing".into()))?;
    // Processes: the largest pure node process (node 1 shares this process with the clients);
    // in-process: the whole cluster's peak.
    let rss = || match &children {
        Some(c) => c.iter().map(|c| c.peak_rss_mib()).fold(0.0, f64::max),
        None => stats::peak_rss_mib(None),
    };
    let rows = run_rows(&combo, &Target::Local(leader), args, floor, rss).await;
    for n in nodes {
        let _ = n.shutdown().await;
    }
    drop(children);
    drop(cluster);
    Ok(rows)
}

/// One row per client count of `args` against `target` (after a short warm-up of connections
/// and the log), printed as it is measured.
async fn run_rows(
    combo: &str,
    target: &Target,
    args: &Args,
    floor: Floor,
    rss_mib: impl Fn() -> f64,
) -> Vec<Row> {
    let _ = closed_loop_on(target, 4, 1, args.value_bytes).await;
    let mut rows = Vec::new();
    for clients in args.clients.iter().map(|&c| c as usize) {
        let samples = closed_loop_on(target, clients, args.secs, args.value_bytes).await;
        let row = Row {
            combo: combo.to_string(),
            clients,
            ops: samples.latencies_us.len() as u64,
            ops_per_sec: samples.ops_per_sec(),
            p50_us: samples.p(0.5),
            p99_us: samples.p(0.99),
            p999_us: samples.p(0.999),
            rss_mib_max: rss_mib(),
            errors: samples.errors,
            floor,
        };
        println!(
            "{:<18} {:>7} {:>9.0} {:>8} {:>8} {:>8} {:>9.1} {:>6} {:>9}",
            row.combo,
            row.clients,
            row.ops_per_sec,
            row.p50_us,
            row.p99_us,
            row.p999_us,
            row.rss_mib_max,
            row.errors,
            row.floor.total_us()
        );
        rows.push(row);
    }
    rows
}

/// etcd's rows: the same clients against its `KV.Put` at `urls` (the first, or with
/// `--spread` each in turn).
async fn etcd_rows(urls: &[String], args: &Args, floor: Floor) -> Result<Vec<Row>, String> {
    let urls = if args.spread { urls } else { &urls[..1] };
    let mut conns = Vec::new();
    let tls = match &args.etcd_tls {
        Some(dir) => Some(etcd_tls(dir)?),
        None => None,
    };
    for i in 0..args.conns as usize {
        let url = &urls[i % urls.len()];
        // The same client stack as against the project's nodes (kvstore::service).
        let (https, host_port) = match url.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            _ => {
                return Err(format!(
                    "etcd endpoint {url:?}: expected http://HOST:PORT or https://HOST:PORT"
                ))
            }
        };
        let host_port = host_port.trim_end_matches('/');
        let addr = tokio::net::lookup_host(host_port)
            .await
            .map_err(|e| format!("etcd endpoint {url:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("etcd endpoint {url:?}: no address"))?;
        let timeout = Duration::from_secs(10);
        let channel = match (https, &tls) {
            (true, Some(config)) => {
                let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
                kvstore::service::tls_channel(addr, host, config.clone(), timeout).await
            }
            (true, None) => return Err(format!("etcd endpoint {url}: https:// needs --etcd-tls")),
            (false, _) => kvstore::service::plaintext_channel(addr, timeout).await,
        }
        .map_err(|e| format!("etcd at {url}: {e}"))?;
        conns.push(kvstore::service::etcd::kv_client::KvClient::new(channel));
    }
    // etcd runs outside this process: no RSS of its own here.
    let name = if args.spread { "etcd_spread" } else { "etcd" };
    Ok(run_rows(name, &Target::Etcd(conns), args, floor, || 0.0).await)
}

/// The client TLS to etcd from `dir` (`ca.pem`, `client.pem`, `client-key.pem`): the same
/// rustls configuration as the project's clients use (TLS 1.3, ALPN `h2`).
fn etcd_tls(dir: &Path) -> Result<rustls::ClientConfig, String> {
    let material = consensus_tls::load_files(
        &dir.join("ca.pem"),
        &dir.join("client.pem"),
        &dir.join("client-key.pem"),
    )
    .map_err(|e| format!("--etcd-tls: {e}"))?;
    consensus_tls::client_config(&material, kvstore::service::H2_ALPN)
        .map_err(|e| format!("--etcd-tls: {e}"))
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "  {{\"combo\": \"{}\", \"clients\": {}, \"ops\": {}, \"ops_per_sec\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"rss_mib_max\": {:.1}, \"errors\": {}, \"fsync_p50_us\": {}, \"rtt_p50_us\": {}, \"floor_us\": {}, \"fsync_shared_p50_us\": {}, \"shared_floor_us\": {}}}",
                r.combo, r.clients, r.ops, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us, r.rss_mib_max, r.errors,
                r.floor.fsync_us, r.floor.rtt_us, r.floor.total_us(), r.floor.fsync_shared_us, r.floor.shared_total_us()
            )
        })
        .collect();
    format!("[\n{}\n]\n", items.join(",\n"))
}

/// A backend x transport combination.
type Pair = (Arc<dyn Backend>, Arc<dyn TransportFactory>);

/// The selected combinations, in wiring order; an error names what is compiled in.
fn selected(args: &Args) -> Result<Vec<Pair>, String> {
    let wiring = kvstore::wiring();
    let mut out = Vec::new();
    for b in wiring.backends() {
        for f in wiring.transports() {
            let name = format!("{}_{}", b.name(), f.name());
            if args.combos.iter().any(|c| c == "all" || *c == name) {
                out.push((b.clone(), f.clone()));
            }
        }
    }
    if out.is_empty() {
        return Err(format!(
            "no combination matched {:?}; compiled in: {:?} x {:?}",
            args.combos,
            wiring.backend_names(),
            wiring.transport_names()
        ));
    }
    Ok(out)
}

async fn run(args: Args) -> Result<(), String> {
    let tmp;
    let root = match &args.dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
            tmp.path().to_path_buf()
        }
    };
    std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
    if let Some(state_mib) = args.large_state_mib {
        return run_large(&args, state_mib, &root).await;
    }
    println!(
        "{} nodes, {} B values, {} s per run; floor = fsync(4 KiB append) p50 + 2 x loopback RTT p50, measured before each combination",
        args.nodes, args.value_bytes, args.secs
    );
    println!(
        "{:<18} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9}",
        "combo", "clients", "ops/s", "p50_us", "p99_us", "p999_us", "rss_mib", "errors", "floor_us"
    );
    let mut rows = Vec::new();
    if !args.etcd.is_empty() {
        let floor = Floor::measure(&root, args.nodes as usize)?;
        rows.extend(etcd_rows(&args.etcd, &args, floor).await?);
    }
    for (b, f) in selected(&args)? {
        let name = format!("{}_{}", b.name(), f.name());
        let floor = Floor::measure(&root, args.nodes as usize)?;
        let r = bench_combo(b, f, &args, &root, floor)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        rows.extend(r);
    }
    for r in rows.iter().filter(|r| r.clients == 1) {
        println!(
            "{}: single-client p50 {} us = {:.2} x floor ({} us: fsync {} + 2 x RTT {}); {:.2} x the shared-disk floor ({} us: a quorum of {} fsyncs at once {} + 2 x RTT)",
            r.combo,
            r.p50_us,
            r.p50_us as f64 / r.floor.total_us().max(1) as f64,
            r.floor.total_us(),
            r.floor.fsync_us,
            r.floor.rtt_us,
            r.p50_us as f64 / r.floor.shared_total_us().max(1) as f64,
            r.floor.shared_total_us(),
            args.nodes,
            r.floor.fsync_shared_us,
        );
    }
    for r in rows.iter().filter(|r| !r.combo.starts_with("etcd")) {
        let Some(e) = rows
            .iter()
            .find(|e| e.combo.starts_with("etcd") && e.clients == r.clients)
        else {
            continue;
        };
        println!(
            "{} at {} clients: {:.2} x etcd's puts/s ({:.0} vs {:.0}); p99 {} vs {} us",
            r.combo,
            r.clients,
            r.ops_per_sec / e.ops_per_sec.max(1.0),
            r.ops_per_sec,
            e.ops_per_sec,
            r.p99_us,
            e.p99_us
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, json(&rows)).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The large-state mode over every selected combination. A combination that fails is
/// reported and the others still run; the exit code then says so.
async fn run_large(args: &Args, state_mib: u64, root: &Path) -> Result<(), String> {
    let opts = large::Options {
        state_mib,
        fill_value_bytes: (args.fill_value_kib as usize) << 10,
        runs: args.runs,
        clients: args.load_clients as usize,
        secs: args.secs,
        value_bytes: args.value_bytes,
        nodes: args.nodes,
    };
    println!(
        "large state: {state_mib} MiB in {} KiB values, {} nodes + a learner, {} load clients of {} B puts, \
         {} s baseline, {} runs per combination",
        args.fill_value_kib, args.nodes, args.load_clients, args.value_bytes, args.secs, args.runs
    );
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (b, f) in selected(args)? {
        match large::bench_combo(b, f, &opts, root).await {
            Ok(r) => reports.push(r),
            Err(e) => {
                println!("FAILED {e}");
                failed.push(e);
            }
        }
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&reports).map_err(|e| e.to_string())?;
        std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    match failed.len() {
        0 => Ok(()),
        n => Err(format!("{n} combination(s) failed: {}", failed.join("; "))),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    kvstore::init_process("error");
    let args = Args::parse();
    if let Some(node) = &args.serve_node {
        return kvstore::exit_code(nodes::serve_node(node).await, "node");
    }
    kvstore::exit_code(run(args).await, "error")
}
