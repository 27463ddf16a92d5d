//! The wiring: the one file of the broker that names engines and transports. Cargo features
//! (`tikv`, `openraft`, `grpc`, `quic`) choose what is compiled in; `--backend` and
//! `--transport` choose among them at run time through [`consensus_api::Wiring`].

use std::sync::Arc;

use consensus_api::{Backend, TransportFactory, Wiring};

/// Default log filter: warnings, the broker's operator events (admin changes, leader changes,
/// peers back) at info, and the engines' own chatty targets at errors only.
pub const LOG_FILTER: &str = "warn,broker=info,broker_node=info,transport_quic=info,transport_grpc=info,raft=error,openraft=error";

/// The compiled-in backends and transports, the defaults (tikv, quic) first.
pub fn wiring() -> Wiring {
    Wiring::new(
        vec![
            #[cfg(feature = "tikv")]
            Arc::new(backend_tikv::TikvBackend),
            #[cfg(feature = "openraft")]
            Arc::new(backend_openraft::OpenraftBackend),
        ],
        vec![
            #[cfg(feature = "quic")]
            Arc::new(transport_quic::QuicTransportFactory),
            #[cfg(feature = "grpc")]
            Arc::new(transport_grpc::GrpcTransportFactory),
        ],
    )
}

/// The backend named `wanted` (or the default), or a message listing what is compiled in.
pub fn backend(wanted: Option<&str>) -> Result<Arc<dyn Backend>, String> {
    wiring().backend(wanted).map_err(|e| e.to_string())
}

/// The transport named `wanted` (or the default), or a message listing what is compiled in.
pub fn transport(wanted: Option<&str>) -> Result<Arc<dyn TransportFactory>, String> {
    wiring().transport(wanted).map_err(|e| e.to_string())
}
