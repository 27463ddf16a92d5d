//! # conformance: one suite, every backend x transport
//!
//! Every scenario in [`scenarios`] is an async function over a [`Combo`] (a backend and a
//! transport); [`conformance_suite!`] instantiates all of them for one combination, so test
//! names read `openraft_grpc::acknowledged_write_survives_leader_crash`. Clusters are real:
//! real transports on 127.0.0.1 with port 0, real data dirs with fsync, a crash kills a node's
//! whole runtime. A [`fault::FaultyTransport`] wraps the real transport for partitions, loss and
//! delay (seeded; the seed is printed, `CONFORMANCE_SEED` replays it).
//!
//! ## Running the suite on your own backend or transport
//! Depend on `conformance` and `tokio` (dev-dependencies), then in `tests/conformance.rs`:
//! ```text
//! conformance::conformance_suite!(mine_grpc, conformance::Combo::new(MyBackend, transport_grpc::GrpcTransportFactory));
//! conformance::transport_suite!(my_transport, MyTransportFactory);
//! ```
//! One line per combination; `cargo test` then runs every scenario for it.

#![warn(missing_docs)]

pub mod broker_scenarios;
pub mod cluster;
pub mod fault;
pub mod kv;
pub mod scenarios;
pub mod transport_scenarios;

pub use cluster::{Cluster, Combo, SmCluster};

/// Instantiates every consensus scenario as a test in module `$name` for the combination
/// `$combo` (an expression of type [`Combo`]).
#[macro_export]
macro_rules! conformance_suite {
    ($name:ident, $combo:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn combo() -> $crate::Combo {
                $combo
            }
            $crate::__tests!(combo, scenarios;
                single_node_bootstrap_and_propose,
                three_nodes_elect_exactly_one_leader,
                replicated_proposals_apply_in_the_same_order_everywhere,
                propose_and_read_through_a_follower,
                acknowledged_write_survives_leader_crash,
                minority_leader_cannot_commit_and_heals,
                full_cluster_restart_recovers_state_from_disk,
                add_learner_promote_it_and_remove_a_voter,
                leadership_transfers_to_the_named_node,
                deposed_leader_never_serves_a_stale_read,
                snapshot_compacts_and_restart_restores_from_it,
                lagging_node_catches_up_by_snapshot,
                acknowledged_writes_survive_message_loss_and_delay,
                failures_have_the_shared_error_kinds,
                nodes_started_one_after_another_form_a_cluster
            );
            $crate::__tests!(combo, broker_scenarios;
                broker_registration_and_fencing,
                broker_topic_creation_has_a_valid_assignment,
                broker_partition_leader_fails_over,
                broker_metadata_survives_consensus_leader_failover,
                broker_stale_epochs_are_refused,
                broker_metadata_feed_is_ordered
            );
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
            $crate::__tests!(factory, transport_scenarios;
                one_way_frames_arrive_in_order,
                a_call_fails_at_its_deadline,
                oversized_frames_are_refused,
                a_peer_from_another_cluster_is_refused,
                a_peer_with_the_wrong_certificate_is_refused,
                garbage_on_the_socket_is_survived,
                a_restarted_peer_is_reconnected
            );
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __tests {
    ($make:ident, $module:ident; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                $crate::$module::$scenario($make()).await
            }
        )*
    };
}

#[doc(hidden)]
pub use consensus_api as __api;
