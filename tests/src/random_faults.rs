//! The randomized fault runs behind [`scenarios::random`](crate::scenarios::random) and the
//! soak binary. One seed drives a schedule of partitions (one node cut off, the leader cut off, a bridge), message loss, delay, duplication and
//! reordering, calls delivered and then reported failed, power-loss crashes and restarts,
//! pauses, leader transfers and node replacements (add a learner, promote it, remove the old
//! node), all in the middle of traffic from concurrent clients doing put, get and
//! compare-and-set on a few keys through random nodes. Every operation's invocation, completion
//! and outcome (ok, failed, unknown) is recorded and the history is judged by the
//! [`linearizability`](consensus_harness::linearizability) checker; invariants are watched during the run
//! (one leader per term, commit index never going back within a node's life, every node's
//! applied history identical at equal indexes) and at the end (faults healed, the cluster
//! commits again within a bound, every node converges on one history).
//!
//! Reference: Raft paper §5.2 (election safety), §5.4 (log matching, leader completeness,
//! state machine safety), §8 (linearizable semantics for clients).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use consensus_api::{ConsensusError, ErrorKind, NodeId, Role};
use parking_lot::{Mutex, RwLock};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::kv::{KvCommand, KvMachine, KvResponse};
use crate::scenarios::{ELECTION, SETTLE};
use crate::{Cluster, Combo, Node};
use consensus_harness::history::{History, Op, Outcome};
use consensus_harness::{ClusterOptions, Machines, Remote};

/// Keys the clients work on: few, so operations contend.
const KEYS: [&str; 3] = ["x", "y", "z"];
/// Deadline of one client operation (beyond the node's own request timeout).
const OP_DEADLINE: Duration = Duration::from_secs(8);
/// After the last fault heals, a write must commit within this.
const PROGRESS_BOUND: Duration = Duration::from_secs(30);
/// Search budget of the checker per key.
const CHECK_STEPS: u64 = 20_000_000;

/// Settings of one randomized run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Drives the schedule, the clients' choices, the network faults and the power cuts.
    pub seed: u64,
    /// How long faults are injected (the run takes longer: settling and checking).
    pub faults_for: Duration,
    /// Concurrent clients.
    pub clients: usize,
}

impl RunConfig {
    /// The settings the conformance test uses: `RANDOM_FAULTS_SECS` (default 20) of faults,
    /// 4 clients.
    pub fn for_test(seed: u64) -> Self {
        let secs = std::env::var("RANDOM_FAULTS_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        RunConfig {
            seed,
            faults_for: Duration::from_secs(secs),
            clients: 4,
        }
    }
}

/// What a run did, for the test log and the soak table.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The seed.
    pub seed: u64,
    /// Operations recorded (ok, failed and unknown).
    pub ops: usize,
    /// Operations with a known outcome that the checker placed.
    pub ok: usize,
    /// Operations whose outcome is unknown.
    pub unknown: usize,
    /// Fault steps of the schedule executed, by kind.
    pub faults: BTreeMap<&'static str, usize>,
    /// Frames and calls the fault layer cut, dropped, delayed, duplicated, reordered, failed
    /// after delivery or held.
    pub network: consensus_harness::fault::FaultStats,
    /// The schedule as executed (one line per step).
    pub schedule: Vec<String>,
    /// What went wrong; empty when the run passed.
    pub violations: Vec<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl RunReport {
    /// Fault steps executed, all kinds.
    pub fn faults_total(&self) -> usize {
        self.faults.values().sum()
    }

    /// One line: operations, outcomes, faults.
    pub fn summary(&self) -> String {
        format!(
            "seed {}: {} ops ({} ok, {} unknown), {} fault steps ({}), messages: {}, {:.1?}",
            self.seed,
            self.ops,
            self.ok,
            self.unknown,
            self.faults_total(),
            self.faults
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", "),
            self.network,
            self.elapsed
        )
    }

    /// The failure report: seed, violations and the schedule.
    pub fn explain(&self) -> String {
        let mut s = format!(
            "seed {} (replay with CONFORMANCE_SEED={}): {} violation(s)\n",
            self.seed,
            self.seed,
            self.violations.len()
        );
        for v in &self.violations {
            let _ = writeln!(s, "- {v}");
        }
        let _ = writeln!(s, "schedule:");
        for step in &self.schedule {
            let _ = writeln!(s, "  {step}");
        }
        s
    }
}

/// One step of the schedule, drawn from the seed before the run.
#[derive(Debug, Clone)]
enum Fault {
    /// Cut one follower off.
    IsolateFollower(usize),
    /// Cut the leader off (it may stay leader of a minority of one for a while).
    IsolateLeader,
    /// Cut the link between two nodes; a third still sees both.
    Bridge(usize),
    /// Lose this fraction of frames and calls.
    Loss(f64),
    /// Delay every frame by up to this many milliseconds.
    Delay(u64),
    /// Deliver calls twice.
    Duplicate(f64),
    /// Let calls overtake each other.
    Reorder(f64),
    /// Deliver calls and report an ambiguous failure.
    DeliverThenFail(f64),
    /// Power-cut a node (the leader when true), restart it when the step ends.
    Crash(bool, usize),
    /// Pause a node's traffic.
    Pause(usize),
    /// Move leadership to a follower.
    TransferLeader(usize),
    /// Replace a voter: a fresh node joins as a learner, is promoted, the old one is removed.
    Replace(usize),
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::IsolateFollower(_) => "isolate follower",
            Fault::IsolateLeader => "isolate leader",
            Fault::Bridge(_) => "bridge partition",
            Fault::Loss(_) => "message loss",
            Fault::Delay(_) => "delay",
            Fault::Duplicate(_) => "duplicate calls",
            Fault::Reorder(_) => "reorder calls",
            Fault::DeliverThenFail(_) => "deliver then fail",
            Fault::Crash(..) => "power-loss crash",
            Fault::Pause(_) => "pause",
            Fault::TransferLeader(_) => "leader transfer",
            Fault::Replace(_) => "replace node",
        }
    }

    fn draw(rng: &mut StdRng) -> Fault {
        let pick = rng.gen_range(0..100);
        let n = rng.gen_range(0..1000);
        match pick {
            0..=9 => Fault::IsolateFollower(n),
            10..=17 => Fault::IsolateLeader,
            18..=24 => Fault::Bridge(n),
            25..=32 => Fault::Loss(rng.gen_range(0.05..0.3)),
            33..=39 => Fault::Delay(rng.gen_range(5..60)),
            40..=45 => Fault::Duplicate(rng.gen_range(0.1..0.5)),
            46..=51 => Fault::Reorder(rng.gen_range(0.1..0.5)),
            52..=59 => Fault::DeliverThenFail(rng.gen_range(0.05..0.3)),
            60..=74 => Fault::Crash(rng.gen_bool(0.5), n),
            75..=81 => Fault::Pause(n),
            82..=91 => Fault::TransferLeader(n),
            _ => Fault::Replace(n),
        }
    }
}

/// The schedule: faults and how long each lasts, drawn from the seed alone.
fn schedule(seed: u64, total: Duration) -> Vec<(Fault, Duration)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_5c4e_d01e);
    let mut out = Vec::new();
    let mut at = Duration::ZERO;
    while at < total {
        let f = Fault::draw(&mut rng);
        let d = Duration::from_millis(rng.gen_range(300..2500));
        at += d;
        out.push((f, d));
    }
    out
}

/// The nodes clients may talk to, refreshed whenever the cluster changes.
type Targets = Arc<RwLock<Vec<Remote<Node>>>>;

fn refresh(c: &Cluster, targets: &Targets) {
    let live: Vec<Remote<Node>> = c.live().into_iter().filter_map(|id| c.remote(id)).collect();
    *targets.write() = live;
}

/// Invariants watched while the run goes on.
#[derive(Default)]
struct Watch {
    /// Term -> the node seen leading it.
    leaders: BTreeMap<u64, NodeId>,
    /// (node, incarnation) -> highest commit index seen.
    commits: BTreeMap<(NodeId, u64), u64>,
    /// Applied index -> (history hash, node that had it first).
    applied: BTreeMap<u64, (u64, NodeId)>,
    /// Node pairs already reported as diverged.
    diverged: std::collections::BTreeSet<(NodeId, NodeId)>,
    /// (term, second leader) already reported.
    double_leaders: std::collections::BTreeSet<(u64, NodeId)>,
    violations: Vec<String>,
}

impl Watch {
    fn sample(&mut self, remote: &Remote<Node>, incarnation: u64) {
        let st = remote.node.status();
        let id = remote.id;
        if st.role == Role::Leader {
            match self.leaders.get(&st.term) {
                Some(other) if *other != id && self.double_leaders.insert((st.term, id)) => {
                    self.violations.push(format!(
                        "two leaders in term {}: nodes {other} and {id}",
                        st.term
                    ))
                }
                Some(_) => {}
                None => {
                    self.leaders.insert(st.term, id);
                }
            }
        }
        let seen = self.commits.entry((id, incarnation)).or_default();
        if st.commit_index < *seen && self.violations.len() < 100 {
            self.violations.push(format!(
                "node {id} commit index went back from {seen} to {}",
                st.commit_index
            ));
        }
        *seen = (*seen).max(st.commit_index);
        let (index, hash) = remote.node.read_local(|sm| (sm.last_index, sm.history));
        if index > 0 {
            match self.applied.get(&index) {
                // Reported once per node pair: every later index differs too.
                Some((h, other)) if *h != hash && self.diverged.insert((*other, id)) => {
                    self.violations.push(format!(
                        "nodes {other} and {id} applied different histories up to index {index}"
                    ))
                }
                Some(_) => {}
                None => {
                    self.applied.insert(index, (hash, id));
                }
            }
        }
    }
}

fn write_outcome(r: Result<KvResponse, ConsensusError>) -> Outcome {
    match r {
        Ok(KvResponse::Previous(previous)) => Outcome::Put { previous },
        Ok(KvResponse::Swapped { swapped, .. }) => Outcome::Cas { swapped },
        Ok(KvResponse::Current(_)) => Outcome::Unknown,
        // Refused before anything was appended.
        Err(e) if matches!(e.kind(), ErrorKind::InvalidRequest | ErrorKind::NotLeader) => {
            tracing::debug!("write refused (recorded as failed): {e}");
            Outcome::Failed
        }
        // Timeouts, transport failures, a node dying under the call: it may still commit.
        Err(_) => Outcome::Unknown,
    }
}

/// One client: random operations through random nodes until `stop`.
async fn client(
    me: usize,
    seed: u64,
    targets: Targets,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (me as u64).wrapping_mul(0x9e37_79b9));
    let mut seen: BTreeMap<&str, Option<String>> = BTreeMap::new();
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let remote = {
            let t = targets.read();
            if t.is_empty() {
                None
            } else {
                Some(t[rng.gen_range(0..t.len())].clone())
            }
        };
        let Some(remote) = remote else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let key = KEYS[rng.gen_range(0..KEYS.len())];
        n += 1;
        let value = format!("c{me}.{n}");
        let roll = rng.gen_range(0..100);
        let failed = if roll < 40 {
            let p = history.invoke(
                me,
                key,
                Op::Put {
                    value: value.clone(),
                },
            );
            let cmd = crate::kv::put(key, value.clone());
            let r = call(&remote, cmd).await;
            tracing::debug!(node = remote.id, "put {key}={value}: {r:?}");
            let o = write_outcome(r);
            let failed = o == Outcome::Failed || o == Outcome::Unknown;
            if !failed {
                seen.insert(key, Some(value));
            }
            p.complete(o);
            failed
        } else if roll < 70 {
            let expected = seen.get(key).cloned().flatten();
            let p = history.invoke(
                me,
                key,
                Op::Cas {
                    expected: expected.clone(),
                    new: value.clone(),
                },
            );
            let cmd = crate::kv::cas(key, expected.as_deref(), value.clone());
            let o = write_outcome(call(&remote, cmd).await);
            if o == (Outcome::Cas { swapped: true }) {
                seen.insert(key, Some(value));
            }
            let failed = matches!(o, Outcome::Failed | Outcome::Unknown);
            p.complete(o);
            failed
        } else {
            let p = history.invoke(me, key, Op::Get);
            let k = key.to_string();
            let r = tokio::time::timeout(
                OP_DEADLINE,
                remote.run(move |n| async move { n.read(move |sm| sm.get(&k)).await }),
            )
            .await;
            match r {
                Ok(Ok(value)) => {
                    seen.insert(key, value.clone());
                    p.complete(Outcome::Get { value });
                    false
                }
                // A failed read has no effect.
                _ => {
                    p.complete(Outcome::Failed);
                    true
                }
            }
        };
        if failed {
            // Pacing only: a client hammering a dead node learns nothing.
            tokio::time::sleep(Duration::from_millis(rng.gen_range(10..60))).await;
        }
    }
}

async fn call(remote: &Remote<Node>, cmd: KvCommand) -> Result<KvResponse, ConsensusError> {
    match tokio::time::timeout(
        OP_DEADLINE,
        remote.run(move |n| async move { n.propose(cmd).await }),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(ConsensusError::Timeout("the client's deadline".into())),
    }
}

/// The nemesis' view of the cluster.
struct Nemesis {
    c: Cluster,
    targets: Targets,
    incarnations: Arc<Mutex<BTreeMap<NodeId, u64>>>,
    voters: Vec<NodeId>,
    next_id: NodeId,
    log: Vec<String>,
    faults: BTreeMap<&'static str, usize>,
    started: Instant,
    violations: Vec<String>,
}

impl Nemesis {
    fn note(&mut self, line: String) {
        let at = self.started.elapsed().as_millis();
        tracing::info!("nemesis +{at}ms: {line}");
        self.log.push(format!("+{at}ms {line}"));
    }

    fn leader(&self) -> Option<NodeId> {
        let statuses = self.c.statuses();
        statuses
            .iter()
            .filter(|(id, s)| s.role == Role::Leader && self.voters.contains(id))
            .max_by_key(|(_, s)| s.term)
            .map(|(id, _)| *id)
    }

    fn pick(&self, n: usize, except: Option<NodeId>) -> Option<NodeId> {
        let pool: Vec<NodeId> = self
            .voters
            .iter()
            .copied()
            .filter(|v| Some(*v) != except)
            .collect();
        (!pool.is_empty()).then(|| pool[n % pool.len()])
    }

    fn bump(&self, id: NodeId) {
        *self.incarnations.lock().entry(id).or_default() += 1;
    }

    async fn run_step(&mut self, fault: &Fault, lasts: Duration) {
        let faults = self.c.faults.clone();
        let all = self.c.ids();
        let leader = self.leader();
        *self.faults.entry(fault.kind()).or_default() += 1;
        match fault {
            Fault::IsolateFollower(n) => {
                if let Some(v) = self.pick(*n, leader) {
                    self.note(format!("isolate follower {v} for {lasts:?}"));
                    faults.isolate(v, all);
                }
                tokio::time::sleep(lasts).await;
            }
            Fault::IsolateLeader => {
                if let Some(l) = leader {
                    self.note(format!("isolate leader {l} for {lasts:?}"));
                    faults.isolate(l, all);
                }
                tokio::time::sleep(lasts).await;
            }
            Fault::Bridge(n) => {
                if self.voters.len() >= 3 {
                    let a = self.voters[*n % self.voters.len()];
                    let b = self.voters[(*n + 1) % self.voters.len()];
                    self.note(format!("cut link {a}-{b} (bridge) for {lasts:?}"));
                    faults.cut(a, b);
                }
                tokio::time::sleep(lasts).await;
            }
            Fault::Loss(rate) => {
                self.note(format!(
                    "lose {:.0}% of messages for {lasts:?}",
                    rate * 100.0
                ));
                faults.set_drop_rate(*rate);
                tokio::time::sleep(lasts).await;
            }
            Fault::Delay(ms) => {
                self.note(format!("delay messages up to {ms}ms for {lasts:?}"));
                faults.set_delay(Duration::ZERO, Duration::from_millis(*ms));
                tokio::time::sleep(lasts).await;
            }
            Fault::Duplicate(p) => {
                self.note(format!(
                    "duplicate {:.0}% of calls for {lasts:?}",
                    p * 100.0
                ));
                faults.set_duplicate_rate(*p, Duration::from_millis(50));
                tokio::time::sleep(lasts).await;
            }
            Fault::Reorder(p) => {
                self.note(format!("reorder {:.0}% of calls for {lasts:?}", p * 100.0));
                faults.set_reorder_rate(*p, Duration::from_millis(200));
                tokio::time::sleep(lasts).await;
            }
            Fault::DeliverThenFail(p) => {
                self.note(format!(
                    "deliver and then fail {:.0}% of calls for {lasts:?}",
                    p * 100.0
                ));
                faults.set_fail_after_delivery_rate(*p);
                tokio::time::sleep(lasts).await;
            }
            Fault::Crash(of_leader, n) => {
                let victim = if *of_leader {
                    leader
                } else {
                    self.pick(*n, leader)
                };
                if let Some(v) = victim {
                    self.note(format!("power-cut node {v}, restart after {lasts:?}"));
                    self.c.crash(v);
                    refresh(&self.c, &self.targets);
                    tokio::time::sleep(lasts).await;
                    self.bump(v);
                    match self.c.try_restart(v).await {
                        Ok(()) => self.note(format!("node {v} restarted")),
                        Err(e) => {
                            self.note(format!("node {v} failed to restart: {e}"));
                            self.violations
                                .push(format!("node {v} failed to restart after a power cut: {e}"));
                        }
                    }
                    refresh(&self.c, &self.targets);
                }
            }
            Fault::Pause(n) => {
                if let Some(v) = self.pick(*n, None) {
                    self.note(format!("pause node {v} for {lasts:?}"));
                    faults.pause(v);
                    tokio::time::sleep(lasts).await;
                    faults.resume(v);
                }
            }
            Fault::TransferLeader(n) => {
                if let (Some(l), Some(to)) = (leader, self.pick(*n, leader)) {
                    let r = self
                        .c
                        .on(l, move |node| async move { node.transfer_leader(to).await })
                        .await;
                    self.note(format!("transfer leadership {l} -> {to}: {r:?}"));
                }
                tokio::time::sleep(lasts).await;
            }
            Fault::Replace(n) => {
                self.replace(*n).await;
            }
        }
        if !matches!(fault, Fault::Replace(_) | Fault::TransferLeader(_)) {
            faults.heal();
        }
    }

    /// A fresh node joins as a learner, catches up, is promoted; the old one is removed.
    async fn replace(&mut self, n: usize) {
        let Some(old) = self.pick(n, None) else {
            return;
        };
        self.c.faults.heal();
        let new = self.next_id;
        self.next_id += 1;
        self.note(format!("replace node {old} by fresh node {new}"));
        let addr = self.c.add_fresh_node(new).await.to_string();
        self.bump(new);
        refresh(&self.c, &self.targets);
        let deadline = Instant::now() + SETTLE;
        let step = |what: &str, r: Result<(), ConsensusError>| match r {
            Ok(()) => format!("  {what}: ok"),
            Err(e) => format!("  {what}: {e}"),
        };
        let r = self
            .admin(deadline, move |node| {
                let addr = addr.clone();
                async move { node.add_learner(new, addr).await }
            })
            .await;
        let ok = r.is_ok();
        self.note(step("add learner", r));
        if !ok {
            return;
        }
        let mut voters: Vec<NodeId> = self.voters.iter().copied().filter(|v| *v != old).collect();
        voters.push(new);
        let set: std::collections::BTreeSet<NodeId> = voters.iter().copied().collect();
        let r = self
            .admin(deadline, move |node| {
                let set = set.clone();
                async move { node.change_voters(set).await }
            })
            .await;
        let ok = r.is_ok();
        self.note(step("promote and demote", r));
        if !ok {
            return;
        }
        self.voters = voters;
        let r = self
            .admin(
                deadline,
                move |node| async move { node.remove_node(old).await },
            )
            .await;
        self.note(step("remove old node", r));
        self.c.stop(old).await;
        refresh(&self.c, &self.targets);
    }

    /// Runs an admin call through the leader, retrying until `deadline`.
    async fn admin<F, Fut>(&self, deadline: Instant, f: F) -> Result<(), ConsensusError>
    where
        F: Fn(Node) -> Fut + Clone,
        Fut: std::future::Future<Output = Result<(), ConsensusError>> + Send + 'static,
    {
        loop {
            let r = match self.leader() {
                Some(l) => self.c.on(l, f.clone()).await,
                None => Err(ConsensusError::NotLeader { leader: None }),
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
}

/// One randomized run on `combo`; the report says what happened and what went wrong.
pub async fn random_faults_run(combo: Combo, cfg: RunConfig) -> RunReport {
    let started = Instant::now();
    let options = ClusterOptions {
        seed: cfg.seed,
        ..ClusterOptions::for_test_seeded(&combo, cfg.seed)
    };
    let c = match Cluster::launch(&combo, Machines::<KvMachine>::default(), options, 3).await {
        Ok(c) => c,
        Err(e) => {
            return RunReport {
                seed: cfg.seed,
                violations: vec![format!("the cluster did not start: {e}")],
                ..RunReport::default()
            }
        }
    };
    c.wait_leader(ELECTION).await;
    let targets: Targets = Arc::default();
    refresh(&c, &targets);
    let history = Arc::new(History::new());
    let stop = Arc::new(AtomicBool::new(false));
    let incarnations = Arc::new(Mutex::new(BTreeMap::new()));
    let watch = Arc::new(Mutex::new(Watch::default()));

    let monitor = {
        let (targets, stop, watch, inc) = (
            targets.clone(),
            stop.clone(),
            watch.clone(),
            incarnations.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let nodes = targets.read().clone();
                for r in &nodes {
                    let i = inc.lock().get(&r.id).copied().unwrap_or(0);
                    watch.lock().sample(r, i);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let clients: Vec<_> = (0..cfg.clients)
        .map(|me| {
            tokio::spawn(client(
                me,
                cfg.seed,
                targets.clone(),
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();

    let mut nemesis = Nemesis {
        c,
        targets: targets.clone(),
        incarnations,
        voters: vec![1, 2, 3],
        next_id: 4,
        log: Vec::new(),
        faults: BTreeMap::new(),
        started,
        violations: Vec::new(),
    };
    for (fault, lasts) in schedule(cfg.seed, cfg.faults_for) {
        nemesis.run_step(&fault, lasts).await;
    }
    nemesis.c.faults.heal();
    nemesis.note("faults healed".into());
    let mut violations = std::mem::take(&mut nemesis.violations);

    // Progress: a write commits within the bound once everything healed.
    let progress_by = Instant::now() + PROGRESS_BOUND;
    let mut progressed = false;
    while Instant::now() < progress_by {
        if let Some(l) = nemesis.leader() {
            let cmd = crate::kv::put("progress", "ok");
            if nemesis
                .c
                .on(l, move |n| async move { n.propose(cmd).await })
                .await
                .is_ok()
            {
                progressed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if !progressed {
        violations.push(format!(
            "no write committed within {PROGRESS_BOUND:?} after the faults healed"
        ));
    }
    stop.store(true, Ordering::SeqCst);
    for cl in clients {
        let _ = cl.await;
    }
    let _ = monitor.await;

    // Final reads through the leader join the history: an acknowledged write lost at the end
    // shows up there.
    if let Some(l) = nemesis.leader() {
        for key in KEYS {
            let p = history.invoke(cfg.clients, key, Op::Get);
            let k = key.to_string();
            match nemesis
                .c
                .on(
                    l,
                    move |n| async move { n.read(move |sm| sm.get(&k)).await },
                )
                .await
            {
                Ok(value) => p.complete(Outcome::Get { value }),
                Err(_) => p.complete(Outcome::Failed),
            }
        }
    }

    // Convergence: every running voter applies the same history.
    converge(&nemesis, &mut violations).await;
    violations.extend(std::mem::take(&mut watch.lock().violations));

    let events = history.events();
    let report = consensus_harness::linearizability::check(&events, CHECK_STEPS);
    if !report.is_ok() {
        violations.push(format!("the history is not linearizable:\n{report}"));
    }
    let counts = history.counts();
    let elapsed = started.elapsed();
    let Nemesis { c, log, faults, .. } = nemesis;
    let network = c.faults.stats();
    let mut c = c;
    c.stop_all().await;
    RunReport {
        seed: cfg.seed,
        ops: counts.ops,
        ok: counts.ok,
        unknown: counts.unknown,
        faults,
        network,
        schedule: log,
        violations,
        elapsed,
    }
}

async fn converge(nemesis: &Nemesis, violations: &mut Vec<String>) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let states: BTreeMap<NodeId, (u64, u64)> = nemesis
            .voters
            .iter()
            .filter_map(|id| nemesis.c.handle(*id))
            .map(|n| (n.id(), n.read_local(|sm| (sm.last_index, sm.history))))
            .collect();
        let distinct: std::collections::BTreeSet<_> = states.values().collect();
        let all_running = states.len() == nemesis.voters.len();
        // Entries without a command (leader no-ops, membership) do not move `last_index`, so
        // equal (last index, history hash) pairs are the test of one applied history.
        if distinct.len() == 1 && all_running {
            return;
        }
        if Instant::now() >= deadline {
            violations.push(format!(
                "the voters did not converge on one applied history within {SETTLE:?}: {states:?}"
            ));
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
