//! `cargo run --release -p kvstore`: a local three-node cluster of the replicated store on real
//! sockets and real data dirs. It bootstraps, writes through every node (followers forward to
//! the leader), reads linearizably, stops the leader, shows the failover and keeps writing.
//!
//! Flags: `--nodes N` (default 3), `--writes N` (default 30), `--data-dir PATH` (default: a
//! temporary directory, removed at exit), `--backend openraft|tikv` and `--transport grpc|quic`
//! (default: the first compiled in; cargo features `openraft`, `tikv`, `grpc`, `quic` choose
//! which are).
//!
//! [`kvstore::wiring`] is the only place that names an engine or a transport: adding one is a
//! cargo feature plus one line there, and nothing else changes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use consensus_api::{Consensus, ConsensusError};
use consensus_harness::Runtimes;
use kvstore::{Command, Store};

/// A local cluster of the replicated key-value store: bootstrap, writes through every node,
/// linearizable reads, the leader stopped, failover, more writes.
#[derive(Parser)]
#[command(name = "kvstore", version)]
struct Args {
    /// Number of nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=9))]
    nodes: u64,
    /// Number of writes before the failover.
    #[arg(long, default_value_t = 30)]
    writes: u64,
    /// Where the data dirs go (default: a temporary directory, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Consensus engine among those compiled in (default: the first).
    #[arg(long)]
    backend: Option<String>,
    /// Transport among those compiled in (default: the first).
    #[arg(long)]
    transport: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    kvstore::init_process("warn,openraft=error");
    kvstore::exit_code(run(Args::parse()).await, "error")
}

async fn run(args: Args) -> Result<(), ConsensusError> {
    let wiring = kvstore::wiring();
    let backend = wiring.backend(args.backend.as_deref())?;
    let transports = wiring.transport(args.transport.as_deref())?;
    let tmp;
    let root = match &args.data_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().map_err(|e| ConsensusError::Storage(e.to_string()))?;
            tmp.path().to_path_buf()
        }
    };
    let t0 = Instant::now();
    let say = |msg: String| println!("[{:>7.3}s] {msg}", t0.elapsed().as_secs_f64());
    say(format!(
        "starting {} nodes ({} over {}) in {}",
        args.nodes,
        backend.name(),
        transports.name(),
        root.display()
    ));

    let cluster = kvstore::start_local_cluster(
        backend.clone(),
        transports.clone(),
        "kvstore-demo",
        args.nodes,
        &root,
        Runtimes::Caller,
    )
    .await?;
    let mut nodes = BTreeMap::new();
    for id in cluster.live() {
        let node = cluster.node(id);
        say(format!("node {id} listening on {}", node.local_addr()));
        nodes.insert(id, node);
    }

    let first = &nodes[&1];
    let leader = first.wait_for_leader(Duration::from_secs(10)).await?;
    say(format!("node {leader} is leader"));

    for i in 0..args.writes {
        let via = 1 + i % args.nodes;
        let cmd = Command::Put {
            key: format!("key-{i}"),
            value: format!("value-{i}"),
        };
        nodes[&via].propose(cmd).await?;
    }
    say(format!(
        "{} writes committed through all nodes (followers forward to the leader)",
        args.writes
    ));
    for (id, node) in &nodes {
        let n = node.read(|s| s.len()).await?;
        say(format!("node {id}: linearizable read sees {n} keys"));
    }
    print_status(&nodes);

    if args.nodes >= 3 {
        let old = nodes[&1].wait_for_leader(Duration::from_secs(5)).await?;
        say(format!("stopping the leader, node {old}"));
        if let Some(node) = nodes.remove(&old) {
            node.shutdown().await?;
        }
        let started = Instant::now();
        let any = nodes.values().next().ok_or(ConsensusError::ShuttingDown)?;
        let new = any
            .wait_status(Duration::from_secs(10), |s| {
                s.leader.is_some_and(|l| l != old)
            })
            .await?
            .leader
            .unwrap_or_default();
        say(format!(
            "node {new} took over after {:.0} ms",
            started.elapsed().as_secs_f64() * 1e3
        ));
        any.propose(Command::Put {
            key: "after-failover".into(),
            value: "ok".into(),
        })
        .await?;
        let value = any
            .read(|s| s.get("after-failover").map(str::to_owned))
            .await?;
        say(format!("write after failover read back: {value:?}"));
        print_status(&nodes);
    }
    for node in nodes.values() {
        node.shutdown().await?;
    }
    say("all nodes stopped cleanly".into());
    Ok(())
}

fn print_status(nodes: &BTreeMap<u64, Consensus<Store>>) {
    println!("    node  role        term  leader  commit  applied  voters");
    for (id, node) in nodes {
        let s = node.status();
        println!(
            "    {id:<5} {:<11} {:<5} {:<7} {:<7} {:<8} {:?}",
            format!("{:?}", s.role),
            s.term,
            s.leader.map(|l| l.to_string()).unwrap_or("-".into()),
            s.commit_index,
            s.applied_index,
            s.voters
        );
    }
}
