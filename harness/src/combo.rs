//! A backend and a transport: what one cluster runs.

use std::sync::Arc;

use consensus_api::{Backend, TransportFactory};

/// One backend x transport combination.
#[derive(Clone)]
pub struct Combo {
    /// The backend.
    pub backend: Arc<dyn Backend>,
    /// The transport.
    pub transport: Arc<dyn TransportFactory>,
}

impl Combo {
    /// A combination of a backend and a transport.
    pub fn new(backend: impl Backend, transport: impl TransportFactory) -> Self {
        Self {
            backend: Arc::new(backend),
            transport: Arc::new(transport),
        }
    }

    /// A combination of already shared parts (as a program's wiring hands them out).
    pub fn from_parts(backend: Arc<dyn Backend>, transport: Arc<dyn TransportFactory>) -> Self {
        Self { backend, transport }
    }

    /// `backend_transport`, as in test names.
    pub fn name(&self) -> String {
        format!("{}_{}", self.backend.name(), self.transport.name())
    }
}
