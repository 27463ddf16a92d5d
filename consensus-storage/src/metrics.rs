//! What the store reports through the [`metrics`] facade (a no-op unless the program installs a
//! recorder, as `broker serve` does for `/metrics`). Every series has a `node` label (the
//! node id of [`LogOptions::metrics_node`](crate::LogOptions::metrics_node), empty when unset),
//! so several nodes in one process stay apart. The names are the same on both engines:
//!
//! | name | kind | what |
//! |---|---|---|
//! | `consensus_log_fsync_duration_seconds` | histogram | one `fdatasync` of the log |
//! | `consensus_log_fsyncs_total` | counter | `fdatasync`s of the log |
//! | `consensus_log_write_bytes_total` | counter | bytes written to the log |
//! | `consensus_log_batch_writes` | histogram | writes carried by one write (and sync): the group-commit factor |
//! | `consensus_snapshot_build_duration_seconds` | histogram | building a snapshot file, from create to sealed |
//! | `consensus_snapshot_bytes` | gauge | size of the last snapshot built or saved |
//! | `consensus_snapshots_installed_total` | counter | snapshots made current (built here or received) |

use consensus_api::NodeId;
use metrics::{Counter, Gauge, Histogram};

/// Handles of the store's series for one node (cheap to clone).
#[derive(Clone)]
pub(crate) struct StorageMetrics {
    pub(crate) fsync_seconds: Histogram,
    pub(crate) fsyncs: Counter,
    pub(crate) write_bytes: Counter,
    pub(crate) batch_writes: Histogram,
    pub(crate) snapshot_build_seconds: Histogram,
    pub(crate) snapshot_bytes: Gauge,
    pub(crate) snapshots_installed: Counter,
}

impl StorageMetrics {
    pub(crate) fn new(node: Option<NodeId>) -> Self {
        let node = node.map_or_else(String::new, |n| n.to_string());
        let l = [("node", node)];
        Self {
            fsync_seconds: metrics::histogram!("consensus_log_fsync_duration_seconds", &l),
            fsyncs: metrics::counter!("consensus_log_fsyncs_total", &l),
            write_bytes: metrics::counter!("consensus_log_write_bytes_total", &l),
            batch_writes: metrics::histogram!("consensus_log_batch_writes", &l),
            snapshot_build_seconds: metrics::histogram!(
                "consensus_snapshot_build_duration_seconds",
                &l
            ),
            snapshot_bytes: metrics::gauge!("consensus_snapshot_bytes", &l),
            snapshots_installed: metrics::counter!("consensus_snapshots_installed_total", &l),
        }
    }
}
