//! Entry points for fuzzing the decoders of bytes from the network (`fuzz/` at the workspace
//! root holds the cargo-fuzz targets, and the conformance crate replays their corpus as ordinary
//! tests). Each takes arbitrary bytes and must return without panicking, whatever they are.

/// `data` as a forwarded operation on the forwarding channel: decoded into an operation, or
/// refused; a decoded one encodes back to bytes that decode to the same operation.
pub fn forwarded(data: &[u8]) {
    crate::node::fuzz_forwarded(data);
}

/// `data` as an address book or other codec value an engine receives: decoded or refused.
pub fn codec_values(data: &[u8]) {
    let _ = crate::codec::decode::<std::collections::BTreeMap<crate::NodeId, String>>(data);
    let _ = crate::codec::decode::<crate::Status>(data);
}

/// `data` as a batch entry ([`crate::batch`]): what a state machine that batches applies from
/// the log, and what a proposer splits an outcome with. Split into parts or refused; the parts
/// of an accepted one frame back to exactly `data`.
pub fn batch_frames(data: &[u8]) {
    if let Ok(parts) = crate::batch::split(data) {
        assert_eq!(crate::batch::encode(parts.iter().copied()), data);
    }
}
