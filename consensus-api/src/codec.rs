//! The one place that encodes and decodes values for the wire and for disk.
//!
//! Everything in the workspace that turns a serde value into bytes goes through [`encode`] and
//! [`decode`], so the format (bincode 2 today; `postcard` is the maintained alternative) can be
//! switched in this file alone.

use serde::{de::DeserializeOwned, Serialize};

/// Largest value [`decode`] accepts; a length prefix claiming more is refused before allocating.
pub const MAX_DECODE_BYTES: usize = 256 << 20;

/// A value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("codec: {0}")]
pub struct CodecError(pub String);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE_BYTES>()
}

/// Encodes `value` into a fresh buffer.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| CodecError(e.to_string()))
}

/// Decodes a whole buffer into a `T`; trailing bytes are an error (they mean a framing bug or
/// a different type).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (value, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| CodecError(e.to_string()))?;
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

    #[test]
    fn refuses_garbage_without_panicking() {
        let garbage = [0xffu8; 32];
        assert!(decode::<(String, Vec<u64>)>(&garbage).is_err());
    }
}
