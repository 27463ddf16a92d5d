//! [`Wiring`]: the backends and transports a program compiled in, chosen by name at run time.
//!
//! A program's wiring module is the one place that names engine and transport types (each
//! behind its cargo feature); it hands them to [`Wiring::new`], and everything else picks
//! among them by name (`--backend tikv --transport quic`) without knowing the types.

use std::sync::Arc;

use crate::{Backend, ConsensusError, TransportFactory};

/// The compiled-in backends and transports, the first of each being the default.
#[derive(Clone, Default)]
pub struct Wiring {
    backends: Vec<Arc<dyn Backend>>,
    transports: Vec<Arc<dyn TransportFactory>>,
}

impl Wiring {
    /// A wiring of these backends and transports; the first of each is the default.
    pub fn new(
        backends: Vec<Arc<dyn Backend>>,
        transports: Vec<Arc<dyn TransportFactory>>,
    ) -> Self {
        Self {
            backends,
            transports,
        }
    }

    /// Names of the compiled-in backends (`Backend::name`), the default first.
    pub fn backend_names(&self) -> Vec<&'static str> {
        self.backends.iter().map(|b| b.name()).collect()
    }

    /// Names of the compiled-in transports (`TransportFactory::name`), the default first.
    pub fn transport_names(&self) -> Vec<&'static str> {
        self.transports.iter().map(|t| t.name()).collect()
    }

    /// The compiled-in backends.
    pub fn backends(&self) -> &[Arc<dyn Backend>] {
        &self.backends
    }

    /// The compiled-in transports.
    pub fn transports(&self) -> &[Arc<dyn TransportFactory>] {
        &self.transports
    }

    /// The backend named `wanted` (or the default); `InvalidRequest` naming what is compiled in.
    pub fn backend(&self, wanted: Option<&str>) -> Result<Arc<dyn Backend>, ConsensusError> {
        pick("backend", &self.backends, wanted, |b| b.name())
    }

    /// The transport named `wanted` (or the default); `InvalidRequest` naming what is
    /// compiled in.
    pub fn transport(
        &self,
        wanted: Option<&str>,
    ) -> Result<Arc<dyn TransportFactory>, ConsensusError> {
        pick("transport", &self.transports, wanted, |t| t.name())
    }
}

fn pick<T: ?Sized>(
    what: &str,
    all: &[Arc<T>],
    wanted: Option<&str>,
    name: impl Fn(&T) -> &'static str,
) -> Result<Arc<T>, ConsensusError> {
    let found = match wanted {
        None => all.first(),
        Some(w) => all.iter().find(|x| name(x) == w),
    };
    found.cloned().ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|x| name(x)).collect();
        ConsensusError::InvalidRequest(format!(
            "{what} {:?} is not compiled in (available: {names:?}); enable its cargo feature",
            wanted.unwrap_or("default")
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_wiring_names_what_is_missing() {
        let w = Wiring::default();
        let err = w
            .backend(None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("backend \"default\" is not compiled in"),
            "{err}"
        );
        let err = w
            .transport(Some("quic"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("transport \"quic\""), "{err}");
        assert!(w.backend_names().is_empty());
    }
}
