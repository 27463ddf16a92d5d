//! The store's snapshot format: length-prefixed records, written and read one entry at a time.
//!
//! ```text
//! snapshot := MAGIC (8 bytes, "kvstore" 0x01) | count: u64 LE | count x entry
//! entry    := key_len: u32 LE | key (UTF-8) | value_len: u32 LE | value (UTF-8)
//! ```
//!
//! Keys come in strictly ascending order and nothing follows the last entry. A reader checks
//! all of it (magic, lengths against what is really there, UTF-8, order, the count, the end)
//! and refuses anything else with what is wrong, so a damaged or foreign file is never applied.
//! It never allocates by a length it has not read yet the bytes for.

use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::Arc;

use imbl::OrdMap;

use crate::store::{Key, Value};

/// Identifies the format and its version.
const MAGIC: &[u8; 8] = b"kvstore\x01";
/// Buffer of the writer and the reader: a store's sink or source need not be buffered.
const IO_BUF: usize = 64 << 10;
/// Most bytes reserved ahead of reading a key or value (a longer one grows as it arrives).
const RESERVE_MAX: usize = 1 << 20;

/// Writes every entry of `map` to `sink` in the snapshot format.
pub(crate) fn write(map: &OrdMap<Key, Value>, sink: &mut dyn Write) -> Result<(), String> {
    let io = |e: std::io::Error| format!("writing the store's snapshot: {e}");
    let mut out = BufWriter::with_capacity(IO_BUF, sink);
    out.write_all(MAGIC).map_err(io)?;
    out.write_all(&(map.len() as u64).to_le_bytes())
        .map_err(io)?;
    for (key, value) in map.iter() {
        for text in [key.as_str(), value.as_str()] {
            let len = u32::try_from(text.len())
                .map_err(|_| format!("an entry of {} bytes does not fit a u32", text.len()))?;
            out.write_all(&len.to_le_bytes()).map_err(io)?;
            out.write_all(text.as_bytes()).map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

/// Reads a snapshot from `source` to its end, handing each entry to `entry` in key order.
/// On an error some entries may have been handed over already; the caller discards them.
pub(crate) fn read(source: &mut dyn Read, mut entry: impl FnMut(Key, Value)) -> Result<(), String> {
    let mut input = BufReader::with_capacity(IO_BUF, source);
    let mut magic = [0u8; 8];
    read_exact(&mut input, &mut magic, "the header")?;
    if &magic != MAGIC {
        return Err("not a kvstore snapshot (wrong magic bytes)".into());
    }
    let mut count = [0u8; 8];
    read_exact(&mut input, &mut count, "the entry count")?;
    let count = u64::from_le_bytes(count);
    let mut previous: Option<Key> = None;
    for n in 0..count {
        let key = Key::from(read_text(&mut input, n, "key")?);
        let value = Arc::new(read_text(&mut input, n, "value")?);
        if previous.as_ref().is_some_and(|p| *p >= key) {
            return Err(format!(
                "snapshot damaged: entry {n}'s key is not above the previous one"
            ));
        }
        previous = Some(key.clone());
        entry(key, value);
    }
    let mut extra = [0u8; 1];
    match input.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err(format!(
            "snapshot damaged: bytes follow its last entry (entry {count})"
        )),
        Err(e) => Err(format!("reading the store's snapshot: {e}")),
    }
}

fn read_exact(input: &mut impl Read, buf: &mut [u8], what: &str) -> Result<(), String> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => format!("snapshot truncated in {what}"),
        _ => format!("reading the store's snapshot ({what}): {e}"),
    })
}

/// One length-prefixed text of entry `n`.
fn read_text(input: &mut impl Read, n: u64, what: &str) -> Result<String, String> {
    let mut len = [0u8; 4];
    read_exact(input, &mut len, &format!("entry {n}'s {what} length"))?;
    let len = u32::from_le_bytes(len) as usize;
    let mut bytes = Vec::with_capacity(len.min(RESERVE_MAX));
    input
        .take(len as u64)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the store's snapshot (entry {n}'s {what}): {e}"))?;
    if bytes.len() != len {
        return Err(format!(
            "snapshot truncated in entry {n}'s {what} ({} of {len} bytes)",
            bytes.len()
        ));
    }
    String::from_utf8(bytes)
        .map_err(|_| format!("snapshot damaged: entry {n}'s {what} is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> OrdMap<Key, Value> {
        pairs
            .iter()
            .map(|(k, v)| (Key::from(*k), Arc::new(v.to_string())))
            .collect()
    }

    fn encoded(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        write(&map(pairs), &mut out).unwrap();
        out
    }

    fn decode(bytes: &[u8]) -> Result<Vec<(String, String)>, String> {
        let mut got = Vec::new();
        read(&mut &bytes[..], |k, v| {
            got.push((k.as_str().to_owned(), v.to_string()))
        })?;
        Ok(got)
    }

    /// Hand-built records, to write what `write` never would.
    fn raw(count: u64, texts: &[&[u8]]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&count.to_le_bytes());
        for t in texts {
            out.extend_from_slice(&(t.len() as u32).to_le_bytes());
            out.extend_from_slice(t);
        }
        out
    }

    #[test]
    fn entries_read_back_in_key_order() {
        let got = decode(&encoded(&[("b", "2"), ("a", ""), ("c", "333")])).unwrap();
        let want: Vec<(String, String)> = [("a", ""), ("b", "2"), ("c", "333")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(decode(&encoded(&[])).unwrap(), vec![]);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = encoded(&[("alpha", "one"), ("beta", "two")]);
        for cut in 0..bytes.len() {
            let e = decode(&bytes[..cut]).unwrap_err();
            assert!(e.contains("truncated"), "cut at {cut}: {e}");
        }
    }

    #[test]
    fn foreign_bytes_are_refused_by_their_magic() {
        let e = decode(b"{\"not\": \"a snapshot\"}").unwrap_err();
        assert!(e.contains("magic"), "{e}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encoded(&[("a", "1")]);
        bytes.push(0);
        assert!(decode(&bytes).unwrap_err().contains("follow"));
    }

    #[test]
    fn keys_out_of_order_or_repeated_are_refused() {
        let e = decode(&raw(2, &[b"b", b"1", b"a", b"2"])).unwrap_err();
        assert!(e.contains("not above"), "{e}");
        let e = decode(&raw(2, &[b"a", b"1", b"a", b"2"])).unwrap_err();
        assert!(e.contains("not above"), "{e}");
    }

    #[test]
    fn text_that_is_not_utf8_is_refused() {
        let e = decode(&raw(1, &[b"k", &[0xff, 0xfe]])).unwrap_err();
        assert!(e.contains("UTF-8"), "{e}");
    }

    #[test]
    fn a_huge_claimed_length_is_refused_without_allocating_it() {
        let mut bytes = raw(1, &[b"k"]);
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        bytes.extend_from_slice(b"short");
        let e = decode(&bytes).unwrap_err();
        assert!(e.contains("truncated") && e.contains("5 of"), "{e}");
    }

    #[test]
    fn a_count_beyond_the_entries_is_refused() {
        let e = decode(&raw(u64::MAX, &[b"a", b"1"])).unwrap_err();
        assert!(e.contains("truncated"), "{e}");
    }
}
