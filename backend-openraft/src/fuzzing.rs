//! Entry points for fuzzing this backend's decoders of peer bytes (`fuzz/` at the workspace
//! root holds the cargo-fuzz targets, and the conformance crate replays their corpus as
//! ordinary tests). Each takes arbitrary bytes and must return without panicking.

/// `data` as an engine RPC (the call path) and as a replication stream frame: decoded and put
/// through the checks an inbound request passes before openraft sees it.
pub fn rpc(data: &[u8]) {
    crate::network::fuzz(data);
}
