//! Entry points for fuzzing this transport's wire format (`fuzz/` at the workspace root holds
//! the cargo-fuzz targets, and the conformance crate replays their corpus as ordinary tests).
//! Each takes arbitrary bytes and must return without panicking, whatever they are.

use crate::wire;

/// `data` as a peer's hello, a reply's status byte and body, and a close reason: each decoded
/// or refused; a decoded hello encodes back to the same bytes.
pub fn wire(data: &[u8]) {
    if let Ok(hello) = wire::Hello::decode(data) {
        assert_eq!(hello.encode().as_ref(), data, "a hello does not round-trip");
    }
    let _ = wire::decode_incarnation(data);
    if let Some((&first, rest)) = data.split_first() {
        let _ = wire::Status::from_byte(first);
        let _ = wire::text(rest);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let reason = wire::close_reason(s);
        assert!(
            std::str::from_utf8(reason).is_ok(),
            "a close reason cut a character"
        );
    }
}
