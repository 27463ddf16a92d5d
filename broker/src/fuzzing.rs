//! Entry points for fuzzing the broker's decoders of outside bytes (`fuzz/` at the workspace
//! root holds the cargo-fuzz targets, and the conformance crate replays their corpus as
//! ordinary tests). Each takes arbitrary bytes and must return without panicking.

use consensus_api::{codec, StateMachine};

use crate::machine::MetadataMachine;
use crate::model::MetadataCommand;

/// `data` as a run of log entries (each a length byte, then that many bytes) decoded as
/// metadata commands and applied in order to a fresh metadata machine, then as a snapshot
/// restored into another. A decoded command may be refused; nothing may panic.
pub fn commands(data: &[u8]) {
    let mut m = MetadataMachine::default();
    let mut rest = data;
    let mut index = 0;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len).min(tail.len());
        let (entry, tail) = tail.split_at(len);
        rest = tail;
        index += 1;
        if let Ok(cmd) = codec::decode::<MetadataCommand>(entry) {
            let _ = m.apply(index, cmd);
        }
    }
    let _ = m.image();
    let _ = MetadataMachine::default().restore(data);
}

/// `data` as the body of each admin request: parsed into the request or refused.
pub fn admin_bodies(data: &[u8]) {
    crate::admin::fuzz_bodies(data);
}
