//! The wiring: the one file of this crate that names engines and transports. Cargo features
//! (`tikv`, `openraft`, `grpc`, `quic`) choose what is compiled in; `--backend` and
//! `--transport` choose among them at run time.

use std::sync::Arc;

use consensus_api::{Backend, TransportFactory};

/// Default log filter: warnings, with the engines' own chatty targets at errors only.
pub const LOG_FILTER: &str = "warn,raft=error,openraft=error";

/// The compiled-in backends, the default first.
pub fn backends() -> Vec<Arc<dyn Backend>> {
    vec![
        #[cfg(feature = "tikv")]
        Arc::new(backend_tikv::TikvBackend),
        #[cfg(feature = "openraft")]
        Arc::new(backend_openraft::OpenraftBackend),
    ]
}

/// The compiled-in transports, the default first.
pub fn transports() -> Vec<Arc<dyn TransportFactory>> {
    vec![
        #[cfg(feature = "quic")]
        Arc::new(transport_quic::QuicTransportFactory),
        #[cfg(feature = "grpc")]
        Arc::new(transport_grpc::GrpcTransportFactory),
    ]
}

/// The backend named `wanted` (or the default), or a message listing what is compiled in.
pub fn backend(wanted: Option<&str>) -> Result<Arc<dyn Backend>, String> {
    pick("backend", backends(), wanted, |b| b.name())
}

/// The transport named `wanted` (or the default), or a message listing what is compiled in.
pub fn transport(wanted: Option<&str>) -> Result<Arc<dyn TransportFactory>, String> {
    pick("transport", transports(), wanted, |t| t.name())
}

fn pick<T: ?Sized>(
    what: &str,
    all: Vec<Arc<T>>,
    wanted: Option<&str>,
    name: impl Fn(&T) -> &'static str,
) -> Result<Arc<T>, String> {
    let names: Vec<&str> = all.iter().map(|x| name(x)).collect();
    let found = match wanted {
        None => all.into_iter().next(),
        Some(w) => all.into_iter().find(|x| name(x) == w),
    };
    found.ok_or_else(|| {
        format!(
            "{what} {:?} is not compiled in (available: {names:?}); enable its cargo feature",
            wanted.unwrap_or("default")
        )
    })
}
