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
//! leader must make its entry durable and hear from a follower that did the same).
//!
//! Flags: `--combos all|tikv_quic,openraft_grpc,...`, `--clients 1,16,64,256`, `--secs 5`,
//! `--value-bytes 256`, `--nodes 3`, `--json PATH`, `--dir PATH` (where data dirs go),
//! `--processes` (nodes 2..N run as child processes of this binary; node 1 runs here, next to
//! the clients, and is made leader; `rss_mib_max` is then the largest child's peak RSS, i.e.
//! per node).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use consensus_api::{Backend, Consensus, ConsensusError, NodeConfig, TransportFactory};
use consensus_harness::Runtimes;
use kvstore::{Command, Store};

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

/// The machine's floor at one moment.
#[derive(Debug, Clone, Copy)]
struct Floor {
    fsync_us: u64,
    rtt_us: u64,
}

impl Floor {
    fn measure(dir: &Path) -> Result<Floor, String> {
        Ok(Floor {
            fsync_us: fsync_floor(dir)?,
            rtt_us: rtt_floor()?,
        })
    }

    /// `fsync p50 + 2 x RTT p50`.
    fn total_us(&self) -> u64 {
        self.fsync_us + 2 * self.rtt_us
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Peak resident set size of this process, in MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// p50 of a 4 KiB append + fdatasync in `dir`, in microseconds.
fn fsync_floor(dir: &Path) -> Result<u64, String> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let block = vec![0x5au8; 4096];
    let mut samples = Vec::with_capacity(500);
    for _ in 0..500 {
        let t = Instant::now();
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(&path);
    samples.sort_unstable();
    Ok(percentile(&samples, 0.5))
}

/// p50 of a 64-byte loopback TCP round trip, in microseconds.
fn rtt_floor() -> Result<u64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 64];
        loop {
            if s.read_exact(&mut buf).is_err() {
                return Ok(());
            }
            s.write_all(&buf)?;
        }
    });
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    c.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = [7u8; 64];
    let mut samples = Vec::with_capacity(2000);
    for i in 0..2500 {
        let t = Instant::now();
        c.write_all(&buf).map_err(|e| e.to_string())?;
        c.read_exact(&mut buf).map_err(|e| e.to_string())?;
        if i >= 500 {
            samples.push(t.elapsed().as_micros() as u64);
        }
    }
    drop(c);
    let _ = echo.join();
    samples.sort_unstable();
    Ok(percentile(&samples, 0.5))
}

type Node = Consensus<Store>;

fn node_config(id: u64, factory: &dyn TransportFactory, root: &Path) -> NodeConfig {
    kvstore::local_config(id, "bench", factory, root)
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

/// Child processes running nodes 2..N; dropping it ends them (their stdin closes).
struct Children(Vec<std::process::Child>);

impl Children {
    /// Peak RSS of each child, in MiB.
    fn peak_rss_mib(&self) -> Vec<f64> {
        self.0
            .iter()
            .map(|c| {
                std::fs::read_to_string(format!("/proc/{}/status", c.id()))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("VmHWM:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                    .map(|kb| kb / 1024.0)
                    .unwrap_or(0.0)
            })
            .collect()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            drop(c.stdin.take());
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

/// Node 1 here, nodes 2..N as child processes (`bench --serve-node ...`).
async fn start_processes(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    nodes: u64,
    root: &Path,
) -> Result<(Node, Children), String> {
    use std::io::BufRead;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let config = node_config(1, factory, root);
    let transport = factory.bind(&config).await.map_err(|e| e.to_string())?;
    let mut members = BTreeMap::from([(1u64, transport.local_addr().to_string())]);
    let mut children = Children(Vec::new());
    for id in 2..=nodes {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--serve-node",
                &id.to_string(),
                backend.name(),
                factory.name(),
                &root.display().to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn node {id}: {e}"))?;
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            std::io::BufReader::new(out)
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
        }
        let addr = line
            .trim()
            .strip_prefix("ADDR ")
            .ok_or_else(|| format!("node {id} did not report its address: {line:?}"))?;
        members.insert(id, addr.to_string());
        children.0.push(child);
    }
    let list = members_arg(&members);
    for c in &mut children.0 {
        if let Some(stdin) = c.stdin.as_mut() {
            writeln!(stdin, "{list}").map_err(|e| e.to_string())?;
        }
    }
    let mut config = config;
    config.initial_members = members;
    let node = Consensus::start(backend, config, Store::default(), transport)
        .await
        .map_err(|e| e.to_string())?;
    let leader = node
        .wait_for_leader(Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    if leader != 1 {
        node.transfer_leader(1).await.map_err(|e| e.to_string())?;
    }
    Ok((node, children))
}

/// The child side of `--processes`: run node `id` until stdin closes.
async fn serve_node(args: &[String]) -> Result<(), String> {
    use std::io::BufRead;
    let [id, backend, transport, root] = args else {
        return Err("--serve-node ID BACKEND TRANSPORT ROOT".into());
    };
    let id: u64 = id.parse().map_err(|e| format!("id: {e}"))?;
    let wiring = kvstore::wiring();
    let backend = wiring.backend(Some(backend)).map_err(|e| e.to_string())?;
    let factory = wiring
        .transport(Some(transport))
        .map_err(|e| e.to_string())?;
    let mut config = node_config(id, &*factory, Path::new(root));
    let t = factory.bind(&config).await.map_err(|e| e.to_string())?;
    println!("ADDR {}", t.local_addr());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            match line {
                Ok(l) => {
                    if lines_tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let members = lines.recv().await.ok_or("no member list on stdin")?;
    config.initial_members = parse_members(&members)?;
    let node = Consensus::start(&*backend, config, Store::default(), t)
        .await
        .map_err(|e| e.to_string())?;
    while lines.recv().await.is_some() {}
    let _ = node.shutdown().await;
    Ok(())
}

/// Runs `clients` closed-loop clients against `leader` for `secs`.
async fn closed_loop(
    leader: &Node,
    clients: usize,
    secs: u64,
    value_bytes: usize,
) -> (Vec<u64>, u64, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let value = "v".repeat(value_bytes);
    let mut tasks = Vec::new();
    let started = Instant::now();
    for c in 0..clients {
        let node = leader.clone();
        let stop = stop.clone();
        let value = value.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(4096);
            let mut errors = 0u64;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let cmd = Command::Put {
                    // A bounded key space: the store stays small, the log keeps compacting.
                    key: format!("c{c}-k{}", i % 1024),
                    value: value.clone(),
                };
                let t = Instant::now();
                match node.propose(cmd).await {
                    Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((lat, e)) = t.await {
            all.extend(lat);
            errors += e;
        }
    }
    let elapsed = started.elapsed();
    all.sort_unstable();
    (all, errors, elapsed)
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
    // Kept until the end of the run: the in-process cluster's nodes live in it.
    let mut cluster = None;
    let (nodes, children) = if args.processes {
        let (node, children) = start_processes(&*backend, &*factory, args.nodes, &dir)
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
    // Warm up connections and the log.
    let _ = closed_loop(&leader, 4, 1, args.value_bytes).await;
    let mut rows = Vec::new();
    for clients in args.clients.iter().map(|&c| c as usize) {
        let (lat, errors, elapsed) =
            closed_loop(&leader, clients, args.secs, args.value_bytes).await;
        let ops = lat.len() as u64;
        let row = Row {
            combo: combo.clone(),
            clients,
            ops,
            ops_per_sec: ops as f64 / elapsed.as_secs_f64(),
            p50_us: percentile(&lat, 0.5),
            p99_us: percentile(&lat, 0.99),
            p999_us: percentile(&lat, 0.999),
            // Processes: the largest pure node process (node 1 shares this process with the
            // clients); in-process: the whole cluster's peak.
            rss_mib_max: match &children {
                Some(c) => c.peak_rss_mib().into_iter().fold(0.0, f64::max),
                None => peak_rss_mib(),
            },
            errors,
            floor,
        };
        println!(
            "{:<14} {:>7} {:>9.0} {:>8} {:>8} {:>8} {:>9.1} {:>6} {:>9}",
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
    for n in nodes {
        let _ = n.shutdown().await;
    }
    drop(children);
    drop(cluster);
    Ok(rows)
}

fn json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "  {{\"combo\": \"{}\", \"clients\": {}, \"ops\": {}, \"ops_per_sec\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \"p999_us\": {}, \"rss_mib_max\": {:.1}, \"errors\": {}, \"fsync_p50_us\": {}, \"rtt_p50_us\": {}, \"floor_us\": {}}}",
                r.combo, r.clients, r.ops, r.ops_per_sec, r.p50_us, r.p99_us, r.p999_us, r.rss_mib_max, r.errors,
                r.floor.fsync_us, r.floor.rtt_us, r.floor.total_us()
            )
        })
        .collect();
    format!("[\n{}\n]\n", items.join(",\n"))
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
    println!(
        "{} nodes, {} B values, {} s per run; floor = fsync(4 KiB append) p50 + 2 x loopback RTT p50, measured before each combination",
        args.nodes, args.value_bytes, args.secs
    );
    println!(
        "{:<14} {:>7} {:>9} {:>8} {:>8} {:>8} {:>9} {:>6} {:>9}",
        "combo", "clients", "ops/s", "p50_us", "p99_us", "p999_us", "rss_mib", "errors", "floor_us"
    );
    let wiring = kvstore::wiring();
    let mut rows = Vec::new();
    for b in wiring.backends() {
        for f in wiring.transports() {
            let name = format!("{}_{}", b.name(), f.name());
            if !(args.combos.iter().any(|c| c == "all" || *c == name)) {
                continue;
            }
            let floor = Floor::measure(&root)?;
            let r = bench_combo(b.clone(), f.clone(), &args, &root, floor)
                .await
                .map_err(|e| format!("{name}: {e}"))?;
            rows.extend(r);
        }
    }
    if rows.is_empty() {
        return Err(format!(
            "no combination matched {:?}; compiled in: {:?} x {:?}",
            args.combos,
            wiring.backend_names(),
            wiring.transport_names()
        ));
    }
    for r in rows.iter().filter(|r| r.clients == 1) {
        println!(
            "{}: single-client p50 {} us = {:.2} x floor ({} us: fsync {} + 2 x RTT {})",
            r.combo,
            r.p50_us,
            r.p50_us as f64 / r.floor.total_us().max(1) as f64,
            r.floor.total_us(),
            r.floor.fsync_us,
            r.floor.rtt_us
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, json(&rows)).map_err(|e| format!("{}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    kvstore::init_process("error");
    let args = Args::parse();
    if let Some(node) = &args.serve_node {
        return kvstore::exit_code(serve_node(node).await, "node");
    }
    kvstore::exit_code(run(args).await, "error")
}
