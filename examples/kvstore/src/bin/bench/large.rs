//! `--large-state-mib N`: what a large state costs when a new node joins.
//!
//! Per combination and run: the same-run bandwidth floors ([`Bandwidth`]); a cluster of
//! `--nodes` nodes (node 1 here and leader, the others child processes) filled through the
//! leader with N MiB in values of `--fill-value-kib`, then `snapshot_now` on the leader so its
//! log is compacted; the baseline proposal latency (`--load-clients` closed-loop clients of
//! `--value-bytes` puts for `--secs`); then a new learner (its own child process, empty data
//! dir) added with `add_learner` while the same clients keep putting, until its applied index
//! reaches the leader's at the time of the add. Measured: the catch-up time and its phases,
//! the catch-up throughput against the slower floor, peak RSS of the sender (this process:
//! node 1 and the clients, peak reset before the add) and of the learner, and proposal latency
//! during the catch-up against the baseline (overall, and per phase: the snapshot for the
//! learner, the copy, the restore and tail). `--runs` repeats it; medians are judged against
//! the targets.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consensus_api::{
    Backend, ConsensusError, TransferDirection, TransferProgress, TransportFactory,
};
use kvstore::Command;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::floor::Bandwidth;
use crate::load::{closed_loop, Load};
use crate::nodes::{make_leader, start_processes, ChildNode, Node};
use crate::stats::{heap_free_mib, median, peak_rss_mib, reset_peak_rss, rss_mib};

const MIB: f64 = (1u64 << 20) as f64;
/// Concurrent proposers while filling (values are large: a few suffice to keep the log busy).
const FILL_CLIENTS: u64 = 8;
/// Attempts per fill put before the run fails (a put is idempotent, so a retry is safe).
const FILL_ATTEMPTS: u32 = 5;
/// Seconds of load before the baseline, to warm connections and the log.
const WARMUP_SECS: u64 = 1;
/// How long to wait for `add_learner`'s answer once the learner has caught up.
const ADD_ANSWER_GRACE: Duration = Duration::from_secs(2);
/// How long the learner's process may take to start its node.
const LEARNER_START: Duration = Duration::from_secs(30);
/// How often the leader's transfer progress is sampled during the catch-up.
const TRANSFER_POLL: Duration = Duration::from_millis(20);
/// Catch-up deadline: this much, plus one second per [`CATCH_UP_MIB_PER_SEC_MIN`] MiB.
const CATCH_UP_BASE: Duration = Duration::from_secs(120);
/// The slowest catch-up the deadline allows for, in MiB/s.
const CATCH_UP_MIB_PER_SEC_MIN: u64 = 8;

/// The targets of the large-state issue.
pub(crate) mod targets {
    /// Catch-up throughput, as a percentage of the slower of the disk and loopback floors.
    pub(crate) const MIN_CATCH_UP_PCT: f64 = 50.0;
    /// Peak RSS of the sender and of the receiver above the state's own size, in MiB.
    pub(crate) const RSS_HEADROOM_MIB: f64 = 128.0;
    /// Proposal p99 during the catch-up, as a multiple of the baseline p99.
    pub(crate) const MAX_P99_RATIO: f64 = 3.0;
}

/// The settings of the mode, from the command line.
pub(crate) struct Options {
    pub(crate) state_mib: u64,
    pub(crate) fill_value_bytes: usize,
    pub(crate) runs: u32,
    pub(crate) clients: usize,
    pub(crate) secs: u64,
    pub(crate) value_bytes: usize,
    pub(crate) nodes: u64,
}

/// The figures of one run (or the median of several). Times in seconds and milliseconds,
/// sizes in MiB.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Figures {
    pub(crate) disk_mib_s: f64,
    pub(crate) loopback_mib_s: f64,
    pub(crate) floor_mib_s: f64,
    pub(crate) state_mib: f64,
    pub(crate) keys: f64,
    pub(crate) fill_secs: f64,
    pub(crate) fill_mib_s: f64,
    pub(crate) baseline_p50_ms: f64,
    pub(crate) baseline_p99_ms: f64,
    pub(crate) baseline_ops_s: f64,
    pub(crate) snapshot_mib: f64,
    /// From `add_learner` until the learner's applied index reached the leader's at the add.
    pub(crate) catch_up_secs: f64,
    /// From `add_learner` until the transfer began (the leader's snapshot for the learner).
    pub(crate) build_secs: f64,
    /// The file's copy, as the leader's transfer progress reports it.
    pub(crate) transfer_secs: f64,
    /// From the end of the copy until caught up (checks, install, restore, the log's tail).
    pub(crate) restore_secs: f64,
    /// Snapshot file bytes / catch-up time.
    pub(crate) catch_up_mib_s: f64,
    pub(crate) catch_up_pct_floor: f64,
    /// Snapshot file bytes / copy time.
    pub(crate) transfer_mib_s: f64,
    pub(crate) transfer_pct_floor: f64,
    pub(crate) transfer_failures: f64,
    /// Peak RSS of this process (node 1, the leader, and the clients) from just before the add.
    pub(crate) sender_rss_mib: f64,
    /// Peak RSS of this process during the fill and baseline.
    pub(crate) sender_fill_rss_mib: f64,
    /// Free memory in the allocator of this process at the add ([`kvstore::alloc::free_bytes`]:
    /// jemalloc's unpurged pages; under glibc, `mallinfo2` also counts pages the trimmer
    /// already handed back, so that figure is not all resident).
    pub(crate) sender_heap_free_mib: f64,
    pub(crate) learner_rss_mib: f64,
    pub(crate) during_p50_ms: f64,
    pub(crate) during_p99_ms: f64,
    pub(crate) during_ops_s: f64,
    /// Proposal p99 of the puts answered during each phase of the catch-up: the leader's
    /// snapshot for the learner, the copy, and the restore and tail.
    pub(crate) build_p99_ms: f64,
    pub(crate) copy_p99_ms: f64,
    pub(crate) restore_p99_ms: f64,
    pub(crate) p99_ratio: f64,
    pub(crate) errors: f64,
}

impl Figures {
    fn rss_budget_mib(&self) -> f64 {
        self.state_mib + targets::RSS_HEADROOM_MIB
    }

    /// `(passed, line)` per target.
    fn judge(&self) -> Vec<(bool, String)> {
        let budget = self.rss_budget_mib();
        vec![
            (
                self.catch_up_pct_floor >= targets::MIN_CATCH_UP_PCT,
                format!(
                    "catch-up {:.0} MiB/s = {:.0}% of the slower floor {:.0} MiB/s (target >= {:.0}%)",
                    self.catch_up_mib_s,
                    self.catch_up_pct_floor,
                    self.floor_mib_s,
                    targets::MIN_CATCH_UP_PCT
                ),
            ),
            (
                self.sender_rss_mib <= budget,
                format!(
                    "sender peak RSS {:.0} MiB (target <= state {:.0} + {:.0} = {budget:.0} MiB)",
                    self.sender_rss_mib,
                    self.state_mib,
                    targets::RSS_HEADROOM_MIB
                ),
            ),
            (
                self.learner_rss_mib <= budget,
                format!(
                    "learner peak RSS {:.0} MiB (target <= {budget:.0} MiB)",
                    self.learner_rss_mib
                ),
            ),
            (
                self.p99_ratio <= targets::MAX_P99_RATIO,
                format!(
                    "p99 during the catch-up {:.2} ms = {:.2} x baseline {:.2} ms (target <= {:.0}x)",
                    self.during_p99_ms,
                    self.p99_ratio,
                    self.baseline_p99_ms,
                    targets::MAX_P99_RATIO
                ),
            ),
        ]
    }

    fn print(&self) {
        println!(
            "  floors   disk {:.0} MiB/s ({} MiB + fsync), loopback TCP {:.0} MiB/s; slower {:.0} MiB/s",
            self.disk_mib_s,
            Bandwidth::DISK_MIB,
            self.loopback_mib_s,
            self.floor_mib_s
        );
        println!(
            "  fill     {:.1} MiB in {:.0} keys in {:.1} s ({:.0} MiB/s); sender peak RSS {:.0} MiB",
            self.state_mib, self.keys, self.fill_secs, self.fill_mib_s, self.sender_fill_rss_mib
        );
        println!(
            "  baseline p50 {:.2} ms, p99 {:.2} ms, {:.0} ops/s",
            self.baseline_p50_ms, self.baseline_p99_ms, self.baseline_ops_s
        );
        println!(
            "  learner  caught up in {:.2} s: snapshot for it {:.2} s, copy {:.2} s ({:.0} MiB/s = {:.0}% of floor), \
             restore and tail {:.2} s; file {:.1} MiB; {:.0} failed copies",
            self.catch_up_secs,
            self.build_secs,
            self.transfer_secs,
            self.transfer_mib_s,
            self.transfer_pct_floor,
            self.restore_secs,
            self.snapshot_mib,
            self.transfer_failures
        );
        println!(
            "  catch-up {:.0} MiB/s = {:.0}% of floor; peak RSS sender {:.0} MiB (the allocator's free heap at \
             the add: {:.0} MiB), learner {:.0} MiB (state + {:.0} = {:.0} MiB)",
            self.catch_up_mib_s,
            self.catch_up_pct_floor,
            self.sender_rss_mib,
            self.sender_heap_free_mib,
            self.learner_rss_mib,
            targets::RSS_HEADROOM_MIB,
            self.rss_budget_mib()
        );
        println!(
            "  during   p50 {:.2} ms, p99 {:.2} ms ({:.2} x baseline), {:.0} ops/s; {:.0} failed proposals in the run",
            self.during_p50_ms, self.during_p99_ms, self.p99_ratio, self.during_ops_s, self.errors
        );
        println!(
            "           p99 by phase: snapshot for it {:.2} ms, copy {:.2} ms, restore and tail {:.2} ms",
            self.build_p99_ms, self.copy_p99_ms, self.restore_p99_ms
        );
    }
}

/// The median of each figure over runs.
fn median_figures(runs: &[Figures]) -> Result<Figures, String> {
    let values: Vec<Value> = runs
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let mut out = serde_json::Map::new();
    if let Some(Value::Object(first)) = values.first() {
        for key in first.keys() {
            let m = median(values.iter().filter_map(|v| v.get(key)?.as_f64()));
            out.insert(key.clone(), serde_json::json!(m));
        }
    }
    serde_json::from_value(Value::Object(out)).map_err(|e| e.to_string())
}

/// One combination's runs.
#[derive(Serialize)]
pub(crate) struct ComboReport {
    pub(crate) combo: String,
    pub(crate) runs: Vec<Figures>,
    pub(crate) median: Figures,
    pub(crate) passed: Vec<(bool, String)>,
}

/// Runs the mode on one combination: `--runs` runs, each in its own directory under `root`
/// (removed after the run), then the medians and the targets.
pub(crate) async fn bench_combo(
    backend: Arc<dyn Backend>,
    factory: Arc<dyn TransportFactory>,
    opts: &Options,
    root: &Path,
) -> Result<ComboReport, String> {
    let combo = format!("{}_{}", backend.name(), factory.name());
    let mut runs = Vec::new();
    let mut voided = 0;
    while runs.len() < opts.runs as usize {
        let run = runs.len() + 1;
        println!("{combo} run {run}/{}", opts.runs);
        let dir = root.join(format!("{combo}-large-{run}"));
        // This bench's own scratch directory: a leftover of an interrupted run would be
        // reopened as the cluster's state.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let outcome = one_run(&*backend, &*factory, opts, &dir).await;
        let _ = std::fs::remove_dir_all(&dir);
        let figures = match outcome {
            Err(e) if e.starts_with(VOID) && voided < MAX_VOIDED => {
                voided += 1;
                println!("  {e}: run {run} is void and runs again ({voided} voided so far)");
                continue;
            }
            other => other.map_err(|e| format!("{combo} run {run}: {e}"))?,
        };
        figures.print();
        runs.push(figures);
    }
    let median = median_figures(&runs)?;
    println!("{combo}: median of {} runs", runs.len());
    median.print();
    let floors: Vec<String> = runs
        .iter()
        .map(|r| format!("{:.0}/{:.0}", r.disk_mib_s, r.loopback_mib_s))
        .collect();
    println!(
        "  floors of every run (disk/loopback MiB/s): {}",
        floors.join(", ")
    );
    let passed = median.judge();
    for (ok, line) in &passed {
        println!("  {} {line}", if *ok { "PASS" } else { "FAIL" });
    }
    Ok(ComboReport {
        combo,
        runs,
        median,
        passed,
    })
}

async fn one_run(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    opts: &Options,
    dir: &Path,
) -> Result<Figures, String> {
    let floor = Bandwidth::measure(dir)?;
    let (leader, children) = start_processes(backend, factory, opts.nodes, dir).await?;
    let outcome = measure(backend, factory, opts, dir, &leader, floor).await;
    let _ = leader.shutdown().await;
    drop(children);
    outcome
}

async fn measure(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    opts: &Options,
    dir: &Path,
    leader: &Node,
    floor: Bandwidth,
) -> Result<Figures, String> {
    let progress = Progress(Instant::now());
    progress.say("filling");
    let started = Instant::now();
    fill(leader, opts.state_mib << 20, opts.fill_value_bytes).await?;
    let fill_secs = started.elapsed().as_secs_f64();
    let (state_bytes, keys) = leader.read_local(|s| (s.data_bytes(), s.len()));
    keep_leading(leader, &progress, "the fill").await?;
    progress.say("filled; snapshot_now");
    leader
        .snapshot_now()
        .await
        .map_err(|e| format!("snapshot_now after the fill: {e}"))?;

    progress.say("baseline");
    let _ = closed_loop(leader, opts.clients, WARMUP_SECS, opts.value_bytes).await;
    let baseline = closed_loop(leader, opts.clients, opts.secs, opts.value_bytes).await;
    let sender_fill_rss_mib = peak_rss_mib(None);
    let sender_heap_free_mib = heap_free_mib();
    reset_peak_rss()?;

    keep_leading(leader, &progress, "the baseline").await?;
    progress.say("adding the learner");
    let learner_id = opts.nodes + 1;
    let mut learner = ChildNode::spawn(learner_id, backend, factory, dir)?;
    learner.start(&Default::default())?;
    learner.wait_serving(LEARNER_START).await?;
    let load = Load::start(leader, opts.clients, opts.value_bytes);
    let added = Instant::now();
    let load_before_add = added.duration_since(load.started());
    let (target, term_at_add) = {
        let st = leader.status();
        (st.applied_index, st.term)
    };
    // Not awaited in line: an engine may answer only once the learner has caught up (raft-rs
    // does), later than the request deadline for a large state. The learner's own reports say
    // when it has.
    let mut add = tokio::spawn({
        let (leader, addr) = (leader.clone(), learner.addr.clone());
        async move {
            let outcome = leader.add_learner(learner_id, addr).await;
            (outcome, added.elapsed())
        }
    });
    let timeout =
        CATCH_UP_BASE + Duration::from_secs(opts.state_mib / CATCH_UP_MIB_PER_SEC_MIN.max(1));
    let mut watch = TransferWatch::new(learner_id, added);
    let mut add_answered = false;
    {
        let caught_up = learner.wait_applied(target, timeout);
        tokio::pin!(caught_up);
        let mut tick = tokio::time::interval(TRANSFER_POLL);
        loop {
            tokio::select! {
                r = &mut caught_up => { r?; break; }
                _ = tick.tick() => watch.observe(&leader.snapshot_transfers()),
            }
            if add.is_finished() && !add_answered {
                add_answered = true;
                let (outcome, took) = (&mut add).await.map_err(|e| format!("add_learner: {e}"))?;
                progress.say(&format!(
                    "add_learner answered after {took:.2?}: {outcome:?}"
                ));
                match outcome {
                    // The outcome is unknown, the change may well be in: keep watching.
                    Ok(()) | Err(ConsensusError::Timeout(_)) => {}
                    Err(e) => return Err(format!("add_learner: {e}")),
                }
            }
        }
    }
    let catch_up = added.elapsed();
    progress.say("the learner caught up");
    let now = leader.status();
    if !now.is_leader() || now.term != term_at_add {
        return Err(format!(
            "{VOID} leadership moved during the catch-up (term {term_at_add} -> {}, leader {:?})",
            now.term, now.leader
        ));
    }
    if !add_answered {
        // Engines that answer at the catch-up answer now; the figures do not depend on it.
        if let Ok(Ok((outcome, took))) = tokio::time::timeout(ADD_ANSWER_GRACE, add).await {
            progress.say(&format!(
                "add_learner answered after {took:.2?}: {outcome:?}"
            ));
        }
    }
    watch.observe(&leader.snapshot_transfers());
    let during = load.stop().await;
    let sender_rss_mib = peak_rss_mib(None);
    let learner_rss_mib = learner.peak_rss_mib();
    drop(learner);

    let copy = watch
        .last
        .as_ref()
        .filter(|p| p.done && p.error.is_none())
        .ok_or_else(|| {
            format!(
                "the learner caught up without a completed snapshot transfer from the leader ({:?})",
                watch.last
            )
        })?;
    let file_mib = copy.total_bytes as f64 / MIB;
    let transfer_secs = copy.elapsed_ms as f64 / 1e3;
    let catch_up_secs = catch_up.as_secs_f64();
    let build_secs = watch.began.map(|b| b.as_secs_f64()).unwrap_or(0.0);
    let ms = |us: u64| us as f64 / 1e3;
    let floor_mib_s = floor.min_mib_s();
    let catch_up_mib_s = file_mib / catch_up_secs;
    let transfer_mib_s = file_mib / transfer_secs.max(1e-3);
    let state_mib = state_bytes as f64 / MIB;
    let phase_p99_ms = |from: f64, to: f64| {
        let at = |secs: f64| load_before_add + Duration::from_secs_f64(secs.max(0.0));
        ms(during.p_between(0.99, at(from), at(to)))
    };
    let copied_at = build_secs + transfer_secs;
    Ok(Figures {
        disk_mib_s: floor.disk_mib_s,
        loopback_mib_s: floor.loopback_mib_s,
        floor_mib_s,
        state_mib,
        keys: keys as f64,
        fill_secs,
        fill_mib_s: state_mib / fill_secs,
        baseline_p50_ms: ms(baseline.p(0.5)),
        baseline_p99_ms: ms(baseline.p(0.99)),
        baseline_ops_s: baseline.ops_per_sec(),
        snapshot_mib: file_mib,
        catch_up_secs,
        build_secs,
        transfer_secs,
        restore_secs: (catch_up_secs - build_secs - transfer_secs).max(0.0),
        catch_up_mib_s,
        catch_up_pct_floor: 100.0 * catch_up_mib_s / floor_mib_s,
        transfer_mib_s,
        transfer_pct_floor: 100.0 * transfer_mib_s / floor_mib_s,
        transfer_failures: watch.failures.len() as f64,
        sender_rss_mib,
        sender_fill_rss_mib,
        sender_heap_free_mib,
        learner_rss_mib,
        during_p50_ms: ms(during.p(0.5)),
        during_p99_ms: ms(during.p(0.99)),
        during_ops_s: during.ops_per_sec(),
        build_p99_ms: phase_p99_ms(0.0, build_secs),
        copy_p99_ms: phase_p99_ms(build_secs, copied_at),
        restore_p99_ms: phase_p99_ms(copied_at, catch_up_secs),
        p99_ratio: during.p(0.99) as f64 / baseline.p(0.99).max(1) as f64,
        errors: (baseline.errors + during.errors) as f64,
    })
}

/// Node 1 must lead when the learner is added (the sender's figures are its own): if
/// leadership moved during `phase`, it is said and moved back.
/// How a run that measured nothing meaningful starts its error: the figures would belong to
/// another sender (leadership moved during the catch-up), so the run is repeated.
const VOID: &str = "void:";
/// Void runs tolerated per combination before the bench gives up.
const MAX_VOIDED: u32 = 3;

async fn keep_leading(leader: &Node, progress: &Progress, phase: &str) -> Result<(), String> {
    let st = leader.status();
    if !st.is_leader() {
        progress.say(&format!(
            "leadership moved to {:?} during {phase} (term {}); moving it back",
            st.leader, st.term
        ));
        make_leader(leader).await?;
    }
    Ok(())
}

/// Puts `value_bytes` values under fresh keys through `leader` until the store holds
/// `target_bytes`, with [`FILL_CLIENTS`] concurrent proposers.
async fn fill(leader: &Node, target_bytes: u64, value_bytes: usize) -> Result<(), String> {
    let key = |i: u64| format!("fill-{i:010}");
    let per_key = (key(0).len() + value_bytes) as u64;
    let count = target_bytes.div_ceil(per_key.max(1));
    let next = Arc::new(AtomicU64::new(0));
    let value: Arc<str> = "f".repeat(value_bytes).into();
    let tasks: Vec<_> = (0..FILL_CLIENTS)
        .map(|_| {
            let (node, next, value) = (leader.clone(), next.clone(), value.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return Ok(());
                    }
                    let mut attempt = 0;
                    loop {
                        let cmd = Command::Set {
                            key: key(i),
                            value: value.to_string(),
                        };
                        match node.propose(cmd).await {
                            Ok(_) => break,
                            Err(e) if attempt + 1 >= FILL_ATTEMPTS => {
                                return Err(format!("filling key {i}: {e}"))
                            }
                            Err(_) => {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.map_err(|e| format!("a fill task failed: {e}"))??;
    }
    Ok(())
}

/// Progress lines on stderr (the report goes to stdout), with the time since the run began.
struct Progress(Instant);

impl Progress {
    fn say(&self, what: &str) {
        eprintln!(
            "  [{:>7.2} s] {what} (RSS here {:.0} MiB)",
            self.0.elapsed().as_secs_f64(),
            rss_mib(None)
        );
    }
}

/// The leader's progress of its snapshot transfers to the learner, sampled.
struct TransferWatch {
    learner: u64,
    added: Instant,
    /// When the copy began, after the add (first seen in flight: now less its elapsed time).
    began: Option<Duration>,
    /// The latest progress seen.
    last: Option<TransferProgress>,
    /// Copies that ended in an error.
    failures: Vec<String>,
}

impl TransferWatch {
    fn new(learner: u64, added: Instant) -> Self {
        Self {
            learner,
            added,
            began: None,
            last: None,
            failures: Vec::new(),
        }
    }

    fn observe(&mut self, transfers: &[TransferProgress]) {
        let Some(p) = transfers
            .iter()
            .find(|p| p.peer == self.learner && p.direction == TransferDirection::Sending)
        else {
            return;
        };
        let began = self
            .added
            .elapsed()
            .saturating_sub(Duration::from_millis(p.elapsed_ms));
        match (&p.error, &self.last) {
            (Some(e), Some(last)) if last.error.as_ref() != Some(e) => {
                self.failures.push(e.clone())
            }
            (Some(e), None) => self.failures.push(e.clone()),
            _ => {}
        }
        // A retried copy replaces a failed one: its start is the one that counts.
        let restarted = self
            .last
            .as_ref()
            .is_some_and(|l| l.error.is_some() && p.error.is_none());
        if self.began.is_none() || restarted {
            // Exact for a copy seen in flight; for one first seen done, at most one poll late.
            self.began = Some(began);
        }
        self.last = Some(p.clone());
    }
}
