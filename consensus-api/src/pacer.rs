//! [`SnapshotPacer`]: when a backend takes its next automatic snapshot.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::NodeConfig;

/// Snapshots up to this size are never held back by the byte rule: they are cheap.
const SMALL_SNAPSHOT_BYTES: u64 = 1 << 20;

/// Decides when a node snapshots on its own, the same way for every backend.
///
/// A snapshot is due once both hold since the last one:
/// - at least [`NodeConfig::snapshot_threshold`] entries were applied;
/// - the applied entries carried at least [`NodeConfig::snapshot_log_percent`] percent of the
///   last snapshot's size in bytes (snapshots under 1 MiB are exempt).
///
/// The second rule bounds the cost of snapshots by the log's own: a large state is not
/// rewritten in full for every few thousand small writes, so the bytes written as snapshots
/// stay at most `100 / snapshot_log_percent` times the bytes written to the log, and the log
/// held in memory stays at most about that fraction of the state's size.
///
/// Shared between the task that applies entries and the one that triggers snapshots, so every
/// method takes `&self`.
#[derive(Debug)]
pub struct SnapshotPacer {
    threshold: u64,
    percent: u64,
    entries: AtomicU64,
    bytes: AtomicU64,
    last_size: AtomicU64,
    signalled: AtomicBool,
}

impl SnapshotPacer {
    /// A pacer for `config`'s rules; `last_size` is the size of the snapshot the node started
    /// from (0 when none).
    pub fn new(config: &NodeConfig, last_size: u64) -> Self {
        Self {
            threshold: config.snapshot_threshold,
            percent: u64::from(config.snapshot_log_percent),
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            last_size: AtomicU64::new(last_size),
            signalled: AtomicBool::new(false),
        }
    }

    /// Counts one applied entry of `bytes` bytes. Returns `true` exactly once per snapshot: the
    /// first time one is due (later calls return `false` until [`SnapshotPacer::taken`]).
    pub fn applied(&self, bytes: usize) -> bool {
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.due() && !self.signalled.swap(true, Ordering::Relaxed)
    }

    /// Whether a snapshot is due now.
    pub fn due(&self) -> bool {
        if self.entries.load(Ordering::Relaxed) < self.threshold {
            return false;
        }
        let last = self.last_size.load(Ordering::Relaxed);
        if self.percent == 0 || last <= SMALL_SNAPSHOT_BYTES {
            return true;
        }
        let needed = (u128::from(last) * u128::from(self.percent) / 100) as u64;
        self.bytes.load(Ordering::Relaxed) >= needed
    }

    /// The snapshot counted by the last [`SnapshotPacer::taken`] turned out `size` bytes (for a
    /// backend that learns the size only once the file is written).
    pub fn sized(&self, size: u64) {
        self.last_size.store(size, Ordering::Relaxed);
    }

    /// A snapshot of `size` bytes was taken: counting starts again.
    pub fn taken(&self, size: usize) {
        self.entries.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        self.last_size.store(size as u64, Ordering::Relaxed);
        self.signalled.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(threshold: u64, percent: u32) -> NodeConfig {
        let mut c = NodeConfig::new(1, "c", "/tmp/unused");
        c.snapshot_threshold = threshold;
        c.snapshot_log_percent = percent;
        c
    }

    #[test]
    fn small_snapshots_follow_the_entry_count_alone() {
        let p = SnapshotPacer::new(&config(3, 100), 1000);
        assert!(!p.applied(10));
        assert!(!p.applied(10));
        assert!(p.applied(10), "due at the threshold");
        assert!(!p.applied(10), "signalled once");
        assert!(p.due());
        p.taken(1000);
        assert!(!p.due());
    }

    #[test]
    fn a_large_snapshot_waits_for_as_many_log_bytes() {
        let size = 4 << 20;
        let p = SnapshotPacer::new(&config(2, 50), size);
        let mut signalled_at = None;
        for i in 1..=100u64 {
            if p.applied(64 << 10) {
                signalled_at = Some(i);
            }
        }
        // Half of 4 MiB in 64 KiB entries: the 32nd entry.
        assert_eq!(signalled_at, Some(32));
        p.taken(size as usize);
        assert!(!p.applied(8 << 20), "the entry count still applies");
        assert!(p.applied(1));
    }

    #[test]
    fn zero_percent_turns_the_byte_rule_off() {
        let p = SnapshotPacer::new(&config(1, 0), 1 << 30);
        assert!(p.applied(1));
    }
}
