//! A replicated key-value store built only on `consensus-api`: the embedding guide in code.
//!
//! The program implements one trait, [`StateMachine`](consensus_api::StateMachine), in
//! [`store`]; everything else (engine, transport, durability, leader forwarding, snapshot
//! transfer) comes from the consensus layer. The store takes the form a large state needs: a
//! persistent map whose point-in-time views cost nothing ([`Store`]), and snapshots streamed
//! entry by entry ([`records`]).

#![warn(missing_docs, unreachable_pub)]

use std::sync::Arc;

use consensus_api::{Backend, ConsensusError, NodeConfig, TlsConfig, TransportFactory, Wiring};
use consensus_harness::{ClusterOptions, Combo, Machines, Runtimes, SmCluster, TlsChoice};

pub mod alloc;
pub mod gather;
pub mod records;
pub mod service;
pub mod store;

pub use store::{Command, Store};

/// The wiring: the one place backends and transports are named. Each is one line behind its
/// cargo feature; the first of each list is the default.
pub fn wiring() -> Wiring {
    Wiring::new(
        vec![
            #[cfg(feature = "openraft")]
            Arc::new(backend_openraft::OpenraftBackend),
            #[cfg(feature = "tikv")]
            Arc::new(backend_tikv::TikvBackend),
        ],
        vec![
            #[cfg(feature = "grpc")]
            Arc::new(transport_grpc::GrpcTransportFactory),
            #[cfg(feature = "quic")]
            Arc::new(transport_quic::QuicTransportFactory),
        ],
    )
}

/// The configuration of local node `id` under `root`: its data dir, and mutual TLS with
/// development certificates in `root/certs` on every transport (the same layout as
/// [`start_local_cluster`]'s).
pub fn local_config(id: u64, cluster_id: &str, root: &std::path::Path) -> NodeConfig {
    let mut config = NodeConfig::new(id, cluster_id, root.join(format!("node-{id}")));
    config.transport.tls = TlsConfig::DevCerts {
        dir: root.join("certs"),
    };
    config
}

/// A local cluster of the store.
pub type LocalCluster = SmCluster<Store>;

/// Starts `nodes` local nodes (ids 1..=nodes, port 0) as one new cluster under `root`, with the
/// shared harness: every transport is bound first so the initial members know the real
/// addresses. Mutual TLS with development certificates, as production runs.
pub async fn start_local_cluster(
    backend: Arc<dyn Backend>,
    factory: Arc<dyn TransportFactory>,
    cluster_id: &str,
    nodes: u64,
    root: &std::path::Path,
    runtimes: Runtimes,
) -> Result<LocalCluster, ConsensusError> {
    let mut options = ClusterOptions::new(cluster_id);
    options.runtimes = runtimes;
    options.tls = TlsChoice::DevCerts;
    options.root = Some(root.to_path_buf());
    LocalCluster::launch(
        &Combo::from_parts(backend, factory),
        Machines::default(),
        options,
        nodes,
    )
    .await
}

/// Process setup shared by the kvstore binaries: the allocator's setup for nodes
/// ([`alloc::init`]) and logging (`RUST_LOG`, else `default_filter`).
pub fn init_process(default_filter: &str) {
    alloc::init();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
}

/// The exit code of a binary's run: success, or the error printed behind `prefix` and failure.
pub fn exit_code<E: std::fmt::Display>(
    outcome: Result<(), E>,
    prefix: &str,
) -> std::process::ExitCode {
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{prefix}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
