//! The machine's floors, measured in the same run as the figures compared with them (the disk
//! of a shared machine drifts within minutes).
//!
//! Two kinds: latency floors for the put benchmark ([`Floor`]: one fsync, one loopback round
//! trip) and bandwidth floors for the large-state benchmark ([`Bandwidth`]: sequential disk
//! writes ending in an fsync, a loopback TCP copy).

use std::io::{Read, Write};
use std::path::Path;
use std::time::Instant;

use crate::stats::percentile;

/// Size of one write of the bandwidth probes.
const BLOCK: usize = 1 << 20;

/// The machine's latency floor at one moment.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Floor {
    /// p50 of a 4 KiB append + `fdatasync`, in microseconds.
    pub(crate) fsync_us: u64,
    /// p50 of a 64-byte loopback TCP round trip, in microseconds.
    pub(crate) rtt_us: u64,
    /// p50 of the time until a majority of one writer per node, started together, each made
    /// a 4 KiB write durable in preallocated space of its own file in `dir` (as the log
    /// writes; cheaper than the append above): what a quorum of the cluster's logs
    /// needs when its nodes share one disk (a device that serves cache flushes one at a time
    /// makes concurrent syncs wait for each other, so a quorum costs more than one flush).
    pub(crate) fsync_shared_us: u64,
}

impl Floor {
    /// Measures the floors in `dir`, the shared-disk one with `nodes` writers.
    pub(crate) fn measure(dir: &Path, nodes: usize) -> Result<Floor, String> {
        Ok(Floor {
            fsync_us: fsync_floor(dir)?,
            rtt_us: rtt_floor()?,
            fsync_shared_us: fsync_quorum_floor(dir, nodes)?,
        })
    }

    /// `fsync p50 + 2 x RTT p50`.
    pub(crate) fn total_us(&self) -> u64 {
        self.fsync_us + 2 * self.rtt_us
    }

    /// `quorum fsync p50 + 2 x RTT p50`: the same floor for a cluster whose nodes share one
    /// disk, as the bench's do.
    pub(crate) fn shared_total_us(&self) -> u64 {
        self.fsync_shared_us + 2 * self.rtt_us
    }
}

/// The machine's bandwidth floor at one moment, in MiB/s.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub(crate) struct Bandwidth {
    /// Sequential writes of [`Bandwidth::DISK_MIB`] in the data dir's file system, fsync
    /// included.
    pub(crate) disk_mib_s: f64,
    /// One loopback TCP connection copying [`Bandwidth::LOOPBACK_MIB`].
    pub(crate) loopback_mib_s: f64,
}

impl Bandwidth {
    /// MiB the disk probe writes.
    pub(crate) const DISK_MIB: usize = 512;
    /// MiB the loopback probe copies.
    pub(crate) const LOOPBACK_MIB: usize = 2048;

    pub(crate) fn measure(dir: &Path) -> Result<Bandwidth, String> {
        Ok(Bandwidth {
            disk_mib_s: disk_write_mib_s(dir, Self::DISK_MIB)?,
            loopback_mib_s: loopback_mib_s(Self::LOOPBACK_MIB)?,
        })
    }

    /// The slower of the two: what a snapshot copied from disk to disk over loopback is
    /// compared with.
    pub(crate) fn min_mib_s(&self) -> f64 {
        self.disk_mib_s.min(self.loopback_mib_s)
    }
}

/// p50 of a 4 KiB append + fdatasync in `dir`, in microseconds.
fn fsync_floor(dir: &Path) -> Result<u64, String> {
    let mut samples = fsync_samples(&dir.join("fsync-probe"), 500)?;
    samples.sort_unstable();
    Ok(percentile(&samples, 0.5))
}

/// p50 of the time until a majority of `nodes` writers, starting together, each finished a
/// 4 KiB write + fdatasync into preallocated space of its own file in `dir`, in microseconds:
/// one round per sample, all writers released at once (as one entry reaches every node's log),
/// timed until the majority-th of them is done (when the entry is durable on a quorum).
fn fsync_quorum_floor(dir: &Path, nodes: usize) -> Result<u64, String> {
    const ROUNDS: usize = 300;
    let nodes = nodes.max(1);
    let quorum = nodes / 2 + 1;
    let start = std::sync::Arc::new(std::sync::Barrier::new(nodes));
    let threads: Vec<_> = (0..nodes)
        .map(|i| {
            let path = dir.join(format!("fsync-probe-{i}"));
            let start = start.clone();
            std::thread::spawn(move || fsync_rounds(&path, ROUNDS, &start))
        })
        .collect();
    let mut per_writer = Vec::new();
    for t in threads {
        per_writer.push(
            t.join()
                .map_err(|_| "fsync probe thread panicked".to_string())??,
        );
    }
    let mut samples: Vec<u64> = (0..ROUNDS)
        .map(|round| {
            let began = per_writer.iter().map(|w| w[round].0).min();
            let mut done: Vec<Instant> = per_writer.iter().map(|w| w[round].1).collect();
            done.sort_unstable();
            match began {
                Some(began) => done[quorum - 1].duration_since(began).as_micros() as u64,
                None => 0,
            }
        })
        .collect();
    samples.sort_unstable();
    Ok(percentile(&samples, 0.5))
}

/// `rounds` (start, end) times of a 4 KiB write + fdatasync into zero-filled space of a new file
/// at `path` (removed afterwards), as the log writes into its preallocated space (cheaper than
/// an append: no size change to commit), each round starting once `start` lets every writer go.
/// A writer that fails keeps meeting the others at `start` until the last round (without
/// writing), so they finish instead of waiting for it forever, and then reports the failure.
fn fsync_rounds(
    path: &Path,
    rounds: usize,
    start: &std::sync::Barrier,
) -> Result<Vec<(Instant, Instant)>, String> {
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let block = vec![0x5au8; 4096];
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(path)
        .and_then(|f| {
            f.write_all_at(&vec![0u8; rounds * block.len()], 0)?;
            f.sync_all()?;
            Ok(f)
        })
        .map_err(err);
    let mut out = Vec::with_capacity(rounds);
    for round in 0..rounds {
        start.wait();
        let Ok(f) = &file else { continue };
        let t = Instant::now();
        let wrote = f
            .write_all_at(&block, (round * block.len()) as u64)
            .and_then(|_| f.sync_data());
        match wrote {
            Ok(()) => out.push((t, Instant::now())),
            Err(e) => file = Err(err(e)),
        }
    }
    let _ = std::fs::remove_file(path);
    file.map(|_| out)
}

/// `n` timings (microseconds) of a 4 KiB append + fdatasync to a new file at `path` (removed
/// afterwards).
fn fsync_samples(path: &Path, n: usize) -> Result<Vec<u64>, String> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let block = vec![0x5au8; 4096];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&block).map_err(|e| e.to_string())?;
        f.sync_data().map_err(|e| e.to_string())?;
        samples.push(t.elapsed().as_micros() as u64);
    }
    let _ = std::fs::remove_file(path);
    Ok(samples)
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

/// Writes `mib` MiB to a new file in `dir` in 1 MiB blocks and fsyncs it; MiB/s including the
/// fsync (what a snapshot file written and synced costs).
fn disk_write_mib_s(dir: &Path, mib: usize) -> Result<f64, String> {
    let path = dir.join("disk-probe");
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    // Not all zeros and not one repeated block, so nothing below can make it cheaper.
    let mut block = vec![0u8; BLOCK];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in block.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let started = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(err)?;
    for i in 0..mib {
        block[0] = i as u8;
        f.write_all(&block).map_err(err)?;
    }
    f.sync_all().map_err(err)?;
    let secs = started.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(mib as f64 / secs)
}

/// Copies `mib` MiB over one loopback TCP connection in 1 MiB writes; MiB/s as the receiver
/// sees it.
fn loopback_mib_s(mib: usize) -> Result<f64, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let sink = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; BLOCK];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf)? {
                0 => return Ok(total),
                n => total += n as u64,
            }
        }
    });
    let block = vec![0xa5u8; BLOCK];
    let started = Instant::now();
    let mut c = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    for _ in 0..mib {
        c.write_all(&block).map_err(|e| e.to_string())?;
    }
    drop(c);
    let received = sink
        .join()
        .map_err(|_| "the loopback probe's receiver panicked".to_string())?
        .map_err(|e| e.to_string())?;
    let secs = started.elapsed().as_secs_f64();
    if received != (mib * BLOCK) as u64 {
        return Err(format!(
            "the loopback probe received {received} of {} bytes",
            mib * BLOCK
        ));
    }
    Ok(mib as f64 / secs)
}
