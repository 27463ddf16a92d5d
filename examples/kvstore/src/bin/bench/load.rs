//! Closed-loop clients: each puts a value through the leader and waits for the answer before
//! the next, until stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvstore::Command;
use tokio::task::JoinHandle;

use crate::nodes::Node;
use crate::stats::percentile;

/// Keys each client cycles through: the store stays small and the log keeps compacting.
const KEYS_PER_CLIENT: u64 = 1024;
/// Pause of a client after a failed proposal: a node that fails at once (stopped, no leader)
/// must not turn the client into a loop that never yields.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Clients running against a node; dropping it stops them.
pub(crate) struct Load {
    stop: Arc<AtomicBool>,
    started: Instant,
    tasks: Vec<JoinHandle<(Vec<u64>, u64)>>,
}

/// What a load measured: sorted latencies in microseconds, failed proposals, duration.
pub(crate) struct Samples {
    pub(crate) latencies_us: Vec<u64>,
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
}

impl Load {
    /// Starts `clients` clients putting `value_bytes` values through `leader`.
    pub(crate) fn start(leader: &Node, clients: usize, value_bytes: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let value = "v".repeat(value_bytes);
        let tasks = (0..clients)
            .map(|c| {
                let (node, stop, value) = (leader.clone(), stop.clone(), value.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(4096);
                    let mut errors = 0u64;
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let cmd = Command::Put {
                            key: format!("c{c}-k{}", i % KEYS_PER_CLIENT),
                            value: value.clone(),
                        };
                        let t = Instant::now();
                        match node.propose(cmd).await {
                            Ok(_) => lat.push(t.elapsed().as_micros() as u64),
                            Err(_) => {
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
            started: Instant::now(),
            tasks,
        }
    }

    /// Stops the clients (each finishes its proposal in flight) and collects their samples.
    pub(crate) async fn stop(mut self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        let mut errors = 0;
        for t in std::mem::take(&mut self.tasks) {
            if let Ok((lat, e)) = t.await {
                all.extend(lat);
                errors += e;
            }
        }
        all.sort_unstable();
        Samples {
            latencies_us: all,
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
    let load = Load::start(leader, clients, value_bytes);
    tokio::time::sleep(Duration::from_secs(secs)).await;
    load.stop().await
}
