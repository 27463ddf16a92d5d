//! Soak: runs `linearizable_under_random_faults` over many seeds on every combination and
//! prints a table (combination, seeds, operations checked, faults injected, violations).
//!
//! ```text
//! cargo run --release -p conformance --all-features --bin soak -- --minutes 30
//! cargo run --release -p conformance --all-features --bin soak -- --seeds 20 --combo tikv_grpc
//! cargo run --release -p conformance --all-features --bin soak -- --seed 1234 --combo openraft_quic   # replay
//! ```
//!
//! Every failing seed prints its violations and its schedule; `--seed` replays one. Exit status:
//! 0 when no run found a violation.

use std::time::Duration;

use clap::Parser;
use conformance::random_faults::{random_faults_run, RunConfig};
use conformance::Combo;
use tokio::time::Instant;

/// Soak the randomized fault scenario.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Stop starting new runs after this many minutes per combination.
    #[arg(long)]
    minutes: Option<u64>,
    /// Runs per combination (default 3 when --minutes is not given).
    #[arg(long)]
    seeds: Option<u64>,
    /// First seed (the next runs use the following seeds); random when omitted.
    #[arg(long)]
    seed: Option<u64>,
    /// Only this combination (openraft_grpc, openraft_quic, tikv_grpc, tikv_quic).
    #[arg(long)]
    combo: Option<String>,
    /// Seconds of faults per run.
    #[arg(long, default_value_t = 20)]
    faults_secs: u64,
    /// Concurrent clients per run.
    #[arg(long, default_value_t = 4)]
    clients: usize,
}

fn combos() -> Vec<Combo> {
    vec![
        Combo::new(
            backend_openraft::OpenraftBackend,
            transport_grpc::GrpcTransportFactory,
        ),
        Combo::new(
            backend_openraft::OpenraftBackend,
            transport_quic::QuicTransportFactory,
        ),
        Combo::new(
            backend_tikv::TikvBackend,
            transport_grpc::GrpcTransportFactory,
        ),
        Combo::new(
            backend_tikv::TikvBackend,
            transport_quic::QuicTransportFactory,
        ),
    ]
}

#[derive(Default)]
struct Row {
    seeds: u64,
    ops: usize,
    unknown: usize,
    faults: usize,
    messages: u64,
    violations: usize,
    failing: Vec<u64>,
    elapsed: Duration,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = Args::parse();
    let combos: Vec<Combo> = combos()
        .into_iter()
        .filter(|c| args.combo.as_deref().is_none_or(|n| c.name() == n))
        .collect();
    if combos.is_empty() {
        eprintln!(
            "no combination named {:?}; use openraft_grpc, openraft_quic, tikv_grpc or tikv_quic",
            args.combo
        );
        std::process::exit(2);
    }
    let first = args.seed.unwrap_or_else(rand::random);
    let runs = args
        .seeds
        .unwrap_or(if args.minutes.is_some() { u64::MAX } else { 3 });
    let budget = args.minutes.map(|m| Duration::from_secs(m * 60));
    println!(
        "soak: first seed {first}, {} s of faults per run",
        args.faults_secs
    );
    let mut rows = Vec::new();
    for combo in &combos {
        let started = Instant::now();
        let mut row = Row::default();
        let mut i = 0;
        while i < runs && budget.is_none_or(|b| started.elapsed() < b) {
            let seed = first.wrapping_add(i);
            i += 1;
            let cfg = RunConfig {
                seed,
                faults_for: Duration::from_secs(args.faults_secs),
                clients: args.clients,
            };
            let report = random_faults_run(combo.clone(), cfg).await;
            row.seeds += 1;
            row.ops += report.ops;
            row.unknown += report.unknown;
            row.faults += report.faults_total();
            row.messages += report.network.total();
            println!(
                "{} {}, {} violations",
                combo.name(),
                report.summary(),
                report.violations.len()
            );
            if !report.violations.is_empty() {
                row.violations += report.violations.len();
                row.failing.push(seed);
                println!("{}", report.explain());
            }
        }
        row.elapsed = started.elapsed();
        rows.push((combo.name(), row));
    }
    println!();
    println!("| combination | seeds | operations checked | unknown outcomes | fault steps | messages faulted | violations | failing seeds | time |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut bad = false;
    for (name, r) in &rows {
        bad |= r.violations > 0;
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {:?} | {:.0?} |",
            r.seeds, r.ops, r.unknown, r.faults, r.messages, r.violations, r.failing, r.elapsed
        );
    }
    std::process::exit(i32::from(bad));
}
