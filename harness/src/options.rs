//! How a [`LocalCluster`](crate::LocalCluster) is set up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use consensus_api::NodeConfig;

use crate::run::{init_logging, seed};
use crate::Combo;

/// Where the nodes of a cluster run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Runtimes {
    /// Each node on its own single-worker runtime: [`LocalCluster::crash`](crate::LocalCluster::crash) kills it abruptly.
    #[default]
    PerNode,
    /// Every node on the caller's runtime (benchmarks: no extra threads). Nodes can be stopped
    /// and restarted but not crashed.
    Caller,
}

/// The transport security of a cluster's nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum TlsChoice {
    /// Mutual TLS with a development CA and node certificates generated once under
    /// `root/certs`, for every transport (what production runs).
    #[default]
    DevCerts,
    /// Plaintext where the transport allows it, development certificates where it does not
    /// (QUIC). For side-by-side benchmarks against plaintext systems only.
    InsecureWhereSupported,
}

/// The disks under the nodes' data directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StorageChoice {
    /// The real file system (what programs run).
    #[default]
    RealDisk,
    /// One in-memory [`SimFs`](consensus_storage::fs::SimFs) disk per node, mounted at its data
    /// dir: [`LocalCluster::crash`](crate::LocalCluster::crash) is a power cut that loses
    /// everything the node had not made durable (what tests run).
    PowerLoss,
}

/// How a [`LocalCluster`](crate::LocalCluster) is set up.
#[derive(Clone)]
pub struct ClusterOptions {
    /// The cluster id every node is configured with.
    pub cluster_id: String,
    /// Where nodes run.
    pub runtimes: Runtimes,
    /// Transport security.
    pub tls: TlsChoice,
    /// Whether each node's transport is wrapped in a [`FaultyTransport`](crate::fault::FaultyTransport) obeying
    /// [`LocalCluster::faults`](crate::LocalCluster::faults). Without it the plan has no effect.
    pub fault_injection: bool,
    /// Seed of the fault plan's random choices.
    pub seed: u64,
    /// The disks of the data directories.
    pub storage: StorageChoice,
    /// Data directories (`node-<id>`) and certificates (`certs`) go here; `None`: a temporary
    /// directory removed with the cluster.
    pub root: Option<PathBuf>,
    /// A change applied to every node's configuration.
    pub tweak: Arc<dyn Fn(&mut NodeConfig) + Send + Sync>,
    /// Node `id` listens on 127.0.0.1 port `base_port + id` instead of an OS-chosen port: for
    /// programs that keep a cluster's data dir and start it again (its stored membership names
    /// these addresses). Tests leave it `None`.
    pub base_port: Option<u16>,
}

impl ClusterOptions {
    /// Options for a program's local cluster: per-node runtimes, development certificates, no
    /// fault injection, a temporary root.
    pub fn new(cluster_id: impl Into<String>) -> Self {
        Self {
            cluster_id: cluster_id.into(),
            runtimes: Runtimes::PerNode,
            tls: TlsChoice::DevCerts,
            fault_injection: false,
            seed: 0,
            storage: StorageChoice::RealDisk,
            root: None,
            tweak: Arc::new(|_| {}),
            base_port: None,
        }
    }

    /// Options for a test: the seed of this run (printed, `CONFORMANCE_SEED` replays), a cluster
    /// id naming the combination and the seed, fault injection on, power-loss disks, logs
    /// through the test capture.
    pub fn for_test(combo: &Combo, test: &str) -> Self {
        Self::for_test_seeded(combo, seed(test))
    }

    /// Like [`for_test`](Self::for_test) with a given seed (a soak's, a replay's).
    pub fn for_test_seeded(combo: &Combo, seed: u64) -> Self {
        init_logging();
        Self {
            fault_injection: true,
            seed,
            storage: StorageChoice::PowerLoss,
            ..Self::new(format!("test-{}-{seed}", combo.name()))
        }
    }
}

pub(crate) enum Root {
    Temp(tempfile::TempDir),
    Dir(PathBuf),
}

impl Root {
    pub(crate) fn path(&self) -> &Path {
        match self {
            Root::Temp(t) => t.path(),
            Root::Dir(p) => p,
        }
    }
}
