//! The one place that encodes and decodes values for the wire and for disk.
//!
//! Everything in the workspace that turns a serde value into bytes goes through [`encode`] and
//! [`decode`], so the format (bincode 2 today; `postcard` is the maintained alternative) can be
//! switched in this file alone.

use serde::{de::DeserializeOwned, Serialize};

/// Largest value [`decode`] accepts; a length prefix claiming more is refused before allocating.
pub const MAX_DECODE_BYTES: usize = 256 << 20;

/// How much more than its encoded size a value may claim while it is decoded. bincode counts
/// what a value will take in memory as it reads it (a number at its full width, a string or
/// byte string at its length) and refuses the input past the limit, before allocating: a
/// varint of 1 byte claims at most 16 (a `u128`), so a genuine value never claims more than 16
/// times its encoding, while a few bytes that announce a 200 MiB string claim 200 MiB. The
/// limit of one [`decode`] is this many times the input's length, rounded up to the next
/// power of 4 from 64 KiB, at most [`MAX_DECODE_BYTES`].
pub const MAX_AMPLIFICATION: usize = 16;

/// A value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(pub String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

fn decode_within<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard().with_limit::<LIMIT>())
}

/// Decodes with the limit [`MAX_AMPLIFICATION`] gives an input of this length.
fn decode_bounded<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<(T, usize), bincode::error::DecodeError> {
    const KIB: usize = 1 << 10;
    match bytes.len().saturating_mul(MAX_AMPLIFICATION) {
        n if n <= 64 * KIB => decode_within::<T, { 64 * KIB }>(bytes),
        n if n <= 256 * KIB => decode_within::<T, { 256 * KIB }>(bytes),
        n if n <= 1 << 20 => decode_within::<T, { 1 << 20 }>(bytes),
        n if n <= 4 << 20 => decode_within::<T, { 4 << 20 }>(bytes),
        n if n <= 16 << 20 => decode_within::<T, { 16 << 20 }>(bytes),
        n if n <= 64 << 20 => decode_within::<T, { 64 << 20 }>(bytes),
        _ => bincode::serde::decode_from_slice(bytes, config()),
    }
}

/// Encodes `value` into a fresh buffer.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes a whole buffer into a `T`; trailing bytes are an error (they mean a framing bug or
/// a different type). What the value may claim in memory while it is decoded is bounded by
/// [`MAX_AMPLIFICATION`] times the input's length: a short input announcing a huge string or
/// sequence is refused before anything of that size is allocated.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = decode_bounded(bytes).map_err(|e| CodecError(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError(format!(
            "{} trailing bytes after a {}-byte value",
            bytes.len() - used,
            used
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_trailing_bytes() {
        let v = (7u64, String::from("x"), vec![1u8, 2, 3]);
        let mut bytes = encode(&v).unwrap();
        assert_eq!(decode::<(u64, String, Vec<u8>)>(&bytes).unwrap(), v);
        bytes.push(0);
        assert!(decode::<(u64, String, Vec<u8>)>(&bytes).is_err());
    }

    /// A few bytes announcing a 200 MiB string are refused by the limit, before the buffer is
    /// allocated (without the bound: a 200 MiB allocation, then "unexpected end").
    #[test]
    fn a_short_input_cannot_claim_a_large_allocation() {
        let mut bytes = encode("abc").unwrap();
        // bincode's varint: 252 then a little-endian u32 length.
        bytes[0] = 252;
        bytes.splice(1..1, (200u32 << 20).to_le_bytes());
        let err = decode::<String>(&bytes).unwrap_err();
        assert!(err.0.contains("LimitExceeded"), "{err}");
        // Values that are what they claim decode at every size class, at the largest claim
        // ratio there is (small u64s: 1 byte of wire, 8 claimed).
        for n in [1usize, 1000, 100_000, 3_000_000] {
            let v: Vec<u64> = (0..n as u64).map(|i| i % 100).collect();
            assert_eq!(decode::<Vec<u64>>(&encode(&v).unwrap()).unwrap(), v);
            let s = "x".repeat(n);
            assert_eq!(decode::<String>(&encode(&s).unwrap()).unwrap(), s);
        }
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        let garbage = [0xffu8; 32];
        assert!(decode::<(String, Vec<u64>)>(&garbage).is_err());
    }
}
