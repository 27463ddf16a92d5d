//! A replicated key-value store built only on `consensus-api`: the embedding guide in code.
//!
//! The program implements one trait, [`StateMachine`]; everything else (engine, transport,
//! durability, leader forwarding) comes from the consensus layer.

#![warn(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use consensus_api::{
    codec, Backend, Consensus, ConsensusError, NodeConfig, StateMachine, TlsConfig,
    TransportFactory,
};
use serde::{Deserialize, Serialize};

/// A command of the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Sets a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Removes a key.
    Delete {
        /// The key.
        key: String,
    },
}

/// The store's state: deterministic, so every replica computes the same.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Store {
    data: BTreeMap<String, String>,
}

impl Store {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.data.get(key)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl StateMachine for Store {
    type Command = Command;
    /// The previous value of the key.
    type Response = Option<String>;

    fn apply(&mut self, _index: u64, command: Command) -> Option<String> {
        match command {
            Command::Put { key, value } => self.data.insert(key, value),
            Command::Delete { key } => self.data.remove(&key),
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        codec::encode(self).map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        *self = codec::decode(snapshot).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// What the wiring offers: the compiled-in backends and transports.
pub type Choices = (Vec<Arc<dyn Backend>>, Vec<Arc<dyn TransportFactory>>);

/// The wiring: the one place backends and transports are named. Each is one line behind its
/// cargo feature; the first of each list is the default.
pub fn wiring() -> Choices {
    let backends: Vec<Arc<dyn Backend>> = vec![
        #[cfg(feature = "openraft")]
        Arc::new(backend_openraft::OpenraftBackend),
        #[cfg(feature = "tikv")]
        Arc::new(backend_tikv::TikvBackend),
    ];
    let transports: Vec<Arc<dyn TransportFactory>> = vec![
        #[cfg(feature = "grpc")]
        Arc::new(transport_grpc::GrpcTransportFactory),
        #[cfg(feature = "quic")]
        Arc::new(transport_quic::QuicTransportFactory),
    ];
    (backends, transports)
}

/// Picks `wanted` (or the first) among the compiled-in choices by name.
pub fn choose<T: ?Sized>(
    what: &str,
    all: Vec<Arc<T>>,
    wanted: Option<&str>,
    name: impl Fn(&T) -> &'static str,
) -> Result<Arc<T>, ConsensusError> {
    let names: Vec<&str> = all.iter().map(|x| name(x)).collect();
    let found = match wanted {
        None => all.into_iter().next(),
        Some(w) => all.into_iter().find(|x| name(x) == w),
    };
    found.ok_or_else(|| {
        ConsensusError::InvalidRequest(format!(
            "{what} {:?} is not compiled in (available: {names:?}; enable it with a cargo feature)",
            wanted.unwrap_or("any")
        ))
    })
}

/// The configuration of local node `id` under `root`: its data dir, and development
/// certificates in `root/certs` when the transport needs TLS.
pub fn local_config(
    id: u64,
    cluster_id: &str,
    factory: &dyn TransportFactory,
    root: &std::path::Path,
) -> NodeConfig {
    let mut config = NodeConfig::new(id, cluster_id, root.join(format!("node-{id}")));
    if !factory.supports_insecure() {
        config.transport.tls = TlsConfig::DevCerts {
            dir: root.join("certs"),
        };
    }
    config
}

/// Starts `nodes` local nodes (ids 1..=nodes, port 0) as one new cluster: every transport is
/// bound first so the initial members know the real addresses.
pub async fn start_local_cluster(
    backend: &dyn Backend,
    factory: &dyn TransportFactory,
    cluster_id: &str,
    nodes: u64,
    root: &std::path::Path,
) -> Result<Vec<Consensus<Store>>, ConsensusError> {
    let mut configs = Vec::new();
    let mut bound = Vec::new();
    for id in 1..=nodes {
        let config = local_config(id, cluster_id, factory, root);
        bound.push(factory.bind(&config).await?);
        configs.push(config);
    }
    let members: BTreeMap<u64, String> = bound
        .iter()
        .map(|t| (t.local_id(), t.local_addr().to_string()))
        .collect();
    let mut out = Vec::new();
    for (mut config, transport) in configs.into_iter().zip(bound) {
        config.initial_members = members.clone();
        out.push(Consensus::start(backend, config, Store::default(), transport).await?);
    }
    Ok(out)
}

/// Process setup shared by the kvstore binaries: the allocator setting for nodes
/// ([`consensus_api::release_large_buffers`]) and logging (`RUST_LOG`, else `default_filter`).
pub fn init_process(default_filter: &str) {
    consensus_api::release_large_buffers();
    tracing_subscriber::fmt()
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
