//! raft-rs logs through `slog`; this drain forwards its records to `tracing` (target `raft`), so
//! one env filter controls every log line of a node.

use std::fmt::{self, Write as _};

use slog::{Drain, Key, Level, Never, OwnedKVList, Record, Serializer, KV};

struct TracingDrain;

struct Fields(String);

impl Serializer for Fields {
    fn emit_arguments(&mut self, key: Key, val: &fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl Drain for TracingDrain {
    type Ok = ();
    type Err = Never;

    fn log(&self, record: &Record<'_>, values: &OwnedKVList) -> Result<(), Never> {
        let mut fields = Fields(String::new());
        let _ = record.kv().serialize(record, &mut fields);
        let _ = values.serialize(record, &mut fields);
        let msg = record.msg();
        let fields = fields.0;
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}{fields}"),
            Level::Warning => tracing::warn!(target: "raft", "{msg}{fields}"),
            Level::Info => tracing::info!(target: "raft", "{msg}{fields}"),
            Level::Debug => tracing::debug!(target: "raft", "{msg}{fields}"),
            Level::Trace => tracing::trace!(target: "raft", "{msg}{fields}"),
        }
        Ok(())
    }
}

/// The logger handed to raft-rs for node `id`.
pub(crate) fn logger(id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.ignore_res(), slog::o!("raft_id" => id))
}
