//! # conformance: one suite, every backend x transport
//!
//! Every scenario in [`scenarios`] is an async function over a [`Combo`] (a backend and a
//! transport) or a transport factory, grouped in families (election, replication, faults,
//! durability, membership, errors, broker, random, large_state, hostile, transport);
//! [`conformance_suite!`] instantiates all of them for one combination, so test names read
//! `openraft_grpc::acknowledged_write_survives_leader_crash`. Clusters come from
//! [`consensus_harness`] and are real: real transports on 127.0.0.1 with port 0, real data dirs
//! with fsync, a crash kills a node's whole runtime. A [`fault::FaultyTransport`] wraps the real
//! transport for partitions, loss and delay (seeded; the seed is printed, `CONFORMANCE_SEED`
//! replays it).
//!
//! ## Running the suite on your own backend or transport
//! Depend on `conformance` and `tokio` (dev-dependencies), then in `tests/conformance.rs`:
//! ```text
//! conformance::conformance_suite!(mine_grpc, conformance::Combo::new(MyBackend, transport_grpc::GrpcTransportFactory));
//! conformance::transport_suite!(my_transport, MyTransportFactory);
//! ```
//! One line per combination; `cargo test` then runs every scenario for it.

#![warn(missing_docs, unreachable_pub)]

pub mod random_faults;
pub mod scenarios;

pub use consensus_harness::{fault, init_logging, kv, seed, Cluster, Combo, Node, SmCluster};

/// The TLS settings the transport scenarios use: mutual TLS with a development CA and node
/// certificates generated (once) under `root/certs`, for every transport (the suite runs what
/// production runs).
pub fn test_tls(root: &std::path::Path) -> consensus_api::TlsConfig {
    consensus_api::TlsConfig::DevCerts {
        dir: root.join("certs"),
    }
}

/// Instantiates every consensus and broker scenario as a test in module `$name` for the
/// combination `$combo` (an expression of type [`Combo`]).
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $combo:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn combo() -> $crate::Combo {
                $combo
            }
            $crate::__election_family!(combo);
            $crate::__replication_family!(combo);
            $crate::__faults_family!(combo);
            $crate::__durability_family!(combo);
            $crate::__membership_family!(combo);
            $crate::__errors_family!(combo);
            $crate::__broker_family!(combo);
            $crate::__random_family!(combo);
            $crate::__large_state_family!(combo);
            $crate::__hostile_family!(combo);
        }
    };
}

/// Instantiates every transport scenario as a test in module `$name` for the transport factory
/// `$factory` (an expression implementing `TransportFactory`).
#[macro_export]
macro_rules! transport_suite {
    ($name:ident, $factory:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn factory() -> ::std::sync::Arc<dyn $crate::__api::TransportFactory> {
                ::std::sync::Arc::new($factory)
            }
            $crate::__transport_family!(factory);
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tests {
    ($make:ident, $family:ident; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                $crate::scenarios::$family::$scenario($make()).await
            }
        )*
    };
}

#[doc(hidden)]
pub use consensus_api as __api;
