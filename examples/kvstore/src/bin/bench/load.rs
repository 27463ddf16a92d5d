//! Closed-loop clients: each puts a value through the leader and waits for the answer before
//! the next, until stopped. The leader is a node in this process, a node's client API over the
//! network ([`kvstore::service`]), or etcd's `KV.Put` (side-by-side runs).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::service::{etcd, Client, PutStream};
use kvstore::Command;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::nodes::Node;
use crate::stats::percentile;

/// Keys each client cycles through: the store stays small and the log keeps compacting.
const KEYS_PER_CLIENT: u64 = 1024;
/// Pause of a client after a failed proposal: a node that fails at once (stopped, no leader)
/// must not turn the client into a loop that never yields.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// What the clients put to.
#[derive(Clone)]
pub(crate) enum Target {
    /// A node's API in this process.
    Local(Node),
    /// A node's client API over the network; client `c` uses connection `c % len`.
    Kv(Vec<Client>),
    /// The same, each client with a put stream of its own (`PutStream`).
    KvStream(Vec<Client>),
    /// etcd's `KV.Put` over gRPC; client `c` uses connection `c % len`.
    Etcd(Vec<etcd::kv_client::KvClient<Channel>>),
}

/// One client's handle on the target.
enum Conn {
    Local(Node),
    Kv(Client),
    KvStream(Client, Option<Box<PutStream>>),
    Etcd(etcd::kv_client::KvClient<Channel>),
}

impl Target {
    fn conn(&self, c: usize) -> Conn {
        match self {
            Target::Local(n) => Conn::Local(n.clone()),
            Target::Kv(v) => Conn::Kv(v[c % v.len()].clone()),
            Target::KvStream(v) => Conn::KvStream(v[c % v.len()].clone(), None),
            Target::Etcd(v) => Conn::Etcd(v[c % v.len()].clone()),
        }
    }
}

impl Conn {
    /// Puts and waits for the answer; whether it was acknowledged.
    async fn put(&mut self, key: String, value: String) -> bool {
        match self {
            // Puts as etcd's clients make them: without the previous value.
            Conn::Local(n) => n.propose(Command::Set { key, value }).await.is_ok(),
            Conn::Kv(c) => c.set(key, value).await.is_ok(),
            Conn::KvStream(c, stream) => {
                if stream.is_none() {
                    *stream = c.put_stream().await.ok().map(Box::new);
                }
                let Some(s) = stream else { return false };
                let ok = s.put(key, value, false).await.is_ok();
                if !ok {
                    // A failed put ends its stream: the next put opens another.
                    *stream = None;
                }
                ok
            }
            Conn::Etcd(c) => c
                .put(etcd::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    ..Default::default()
                })
                .await
                .is_ok(),
        }
    }
}

/// Clients running against a node; dropping it stops them.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    started: Instant,
    tasks: Vec<JoinHandle<ClientSamples>>,
}

/// One client's acknowledged puts as `(answered at, latency)` in microseconds from the start of
/// the load, and its failed proposals.
type ClientSamples = (Vec<(u64, u64)>, u64);

/// What a load measured: sorted latencies in microseconds, failed proposals, duration.
pub(crate) struct Samples {
    pub(crate) latencies_us: Vec<u64>,
    /// Every acknowledged put as `(answered at, latency)`, in microseconds from the start of
    /// the load, sorted by the time of the answer.
    pub(crate) timed_us: Vec<(u64, u64)>,
    pub(crate) errors: u64,
    pub(crate) elapsed: Duration,
}

impl Samples {
    pub(crate) fn ops_per_sec(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    pub(crate) fn p(&self, q: f64) -> u64 {
        percentile(&self.latencies_us, q)
    }

    /// The `q` quantile of the latencies of the puts answered in `[from, to)` after the start
    /// of the load.
    pub(crate) fn p_between(&self, q: f64, from: Duration, to: Duration) -> u64 {
        let (from, to) = (from.as_micros() as u64, to.as_micros() as u64);
        let lo = self.timed_us.partition_point(|(at, _)| *at < from);
        let hi = self.timed_us.partition_point(|(at, _)| *at < to);
        let mut window: Vec<u64> = self.timed_us[lo..hi.max(lo)].iter().map(|t| t.1).collect();
        window.sort_unstable();
        percentile(&window, q)
    }
}

impl Load {
    /// Starts `clients` clients putting `value_bytes` values through `leader`.
    pub(crate) fn start(leader: &Node, clients: usize, value_bytes: usize) -> Load {
        Self::start_on(&Target::Local(leader.clone()), clients, value_bytes)
    }

    /// Starts `clients` clients putting `value_bytes` values to `target`.
    pub(crate) fn start_on(target: &Target, clients: usize, value_bytes: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let value = "v".repeat(value_bytes);
        let started = Instant::now();
        let tasks = (0..clients)
            .map(|c| {
                let (mut conn, stop, value) = (target.conn(c), stop.clone(), value.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(4096);
                    let mut errors = 0u64;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("c{c}-k{}", i % KEYS_PER_CLIENT);
                        let t = Instant::now();
                        match conn.put(key, value.clone()).await {
                            true => lat.push((
                                started.elapsed().as_micros() as u64,
                                t.elapsed().as_micros() as u64,
                            )),
                            false => {
                                errors += 1;
                                tokio::time::sleep(ERROR_PAUSE).await;
                            }
                        }
                        i += 1;
                    }
                    (lat, errors)
                })
            })
            .collect();
        Load {
            stop,
            started,
            tasks,
        }
    }

    /// When the clients started: the origin of [`Samples::timed_us`].
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// Stops the clients (each finishes its proposal in flight) and collects their samples.
    pub(crate) async fn stop(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let mut timed = Vec::new();
        let mut errors = 0;
        for t in std::mem::take(&mut self.tasks) {
            if let Ok((lat, e)) = t.await {
                timed.extend(lat);
                errors += e;
            }
        }
        timed.sort_unstable();
        let mut all: Vec<u64> = timed.iter().map(|t| t.1).collect();
        all.sort_unstable();
        Samples {
            latencies_us: all,
            timed_us: timed,
            errors,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `clients` closed-loop clients against `leader` for `secs`.
pub(crate) async fn closed_loop(
    leader: &Node,
    clients: usize,
    secs: u64,
    value_bytes: usize,
) -> Samples {
    closed_loop_on(&Target::Local(leader.clone()), clients, secs, value_bytes).await
}

/// Runs `clients` closed-loop clients against `target` for `secs`.
pub(crate) async fn closed_loop_on(
    target: &Target,
    clients: usize,
    secs: u64,
    value_bytes: usize,
) -> Samples {
    let load = Load::start_on(target, clients, value_bytes);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    load.stop().await
}
