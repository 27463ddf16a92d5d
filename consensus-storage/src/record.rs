//! The on-disk record format: `len: u32 LE | crc32(body): u32 LE | body`, where `body` is
//! `kind: u8 | fields`. A length of zero never occurs in a valid record (the body has a kind).

use bytes::{Buf, BufMut, Bytes};

/// Size of the record header.
pub(crate) const HEADER: usize = 8;
/// Largest body accepted on replay; larger lengths are damage, not data.
pub(crate) const MAX_BODY: usize = 512 << 20;

const KIND_ENTRY: u8 = 1;
const KIND_TRUNCATE: u8 = 2;
const KIND_PURGE: u8 = 3;
const KIND_META: u8 = 4;
const KIND_SYNCED: u8 = 5;

/// One logical record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// A log entry; replaces any entry at `index` or above.
    Entry { index: u64, term: u64, data: Bytes },
    /// Removes entries at `index` and above.
    Truncate { index: u64 },
    /// Removes entries at `index` and below; `data` is the backend's note about the purged id.
    Purge { index: u64, term: u64, data: Bytes },
    /// Sets metadata `key` to `data` (latest wins).
    Meta { key: u8, data: Bytes },
    /// A sync mark: written at `offset` (its own position) only after everything before it was
    /// made durable, so damage before a valid mark is corruption, never a torn write.
    Synced { offset: u64 },
}

impl Record {
    /// Appends the framed record to `out`.
    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u32_le(0);
        match self {
            Record::Entry { index, term, data } => {
                out.put_u8(KIND_ENTRY);
                out.put_u64_le(*index);
                out.put_u64_le(*term);
                out.put_slice(data);
            }
            Record::Truncate { index } => {
                out.put_u8(KIND_TRUNCATE);
                out.put_u64_le(*index);
            }
            Record::Purge { index, term, data } => {
                out.put_u8(KIND_PURGE);
                out.put_u64_le(*index);
                out.put_u64_le(*term);
                out.put_slice(data);
            }
            Record::Meta { key, data } => {
                out.put_u8(KIND_META);
                out.put_u8(*key);
                out.put_slice(data);
            }
            Record::Synced { offset } => {
                out.put_u8(KIND_SYNCED);
                out.put_u64_le(*offset);
            }
        }
        let body_len = out.len() - start - HEADER;
        let crc = crc32fast::hash(&out[start + HEADER..]);
        out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes a checked body.
    fn decode_body(body: &[u8]) -> Result<Record, String> {
        let mut b = body;
        if b.is_empty() {
            return Err("empty record body".into());
        }
        let kind = b.get_u8();
        let need = |b: &[u8], n: usize| {
            if b.len() < n {
                Err(format!("record of kind {kind} too short"))
            } else {
                Ok(())
            }
        };
        Ok(match kind {
            KIND_ENTRY => {
                need(b, 16)?;
                let index = b.get_u64_le();
                let term = b.get_u64_le();
                Record::Entry {
                    index,
                    term,
                    data: Bytes::copy_from_slice(b),
                }
            }
            KIND_TRUNCATE => {
                need(b, 8)?;
                Record::Truncate {
                    index: b.get_u64_le(),
                }
            }
            KIND_PURGE => {
                need(b, 16)?;
                let index = b.get_u64_le();
                let term = b.get_u64_le();
                Record::Purge {
                    index,
                    term,
                    data: Bytes::copy_from_slice(b),
                }
            }
            KIND_META => {
                need(b, 1)?;
                let key = b.get_u8();
                Record::Meta {
                    key,
                    data: Bytes::copy_from_slice(b),
                }
            }
            KIND_SYNCED => {
                need(b, 8)?;
                Record::Synced {
                    offset: b.get_u64_le(),
                }
            }
            other => return Err(format!("unknown record kind {other}")),
        })
    }
}

/// What parsing at an offset found.
pub(crate) enum Parsed {
    /// A valid record and the offset after it.
    Ok(Record, usize),
    /// Clean end of data.
    End,
    /// A damaged record.
    Bad { reason: String },
}

/// Parses the record at `pos` of `buf`.
pub(crate) fn parse_at(buf: &[u8], pos: usize) -> Parsed {
    if pos == buf.len() {
        return Parsed::End;
    }
    if buf.len() - pos < HEADER {
        return Parsed::Bad {
            reason: "truncated header".into(),
        };
    }
    let len = u32::from_le_bytes([buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]]) as usize;
    let crc = u32::from_le_bytes([buf[pos + 4], buf[pos + 5], buf[pos + 6], buf[pos + 7]]);
    if len == 0 || len > MAX_BODY {
        return Parsed::Bad {
            reason: format!("implausible record length {len}"),
        };
    }
    let body_start = pos + HEADER;
    let Some(body) = buf.get(body_start..body_start + len) else {
        return Parsed::Bad {
            reason: format!("record of {len} bytes runs past the end of the file"),
        };
    };
    if crc32fast::hash(body) != crc {
        return Parsed::Bad {
            reason: "checksum mismatch".into(),
        };
    }
    match Record::decode_body(body) {
        Ok(r) => Parsed::Ok(r, body_start + len),
        Err(reason) => Parsed::Bad { reason },
    }
}

/// Whether a valid sync mark ([`Record::Synced`] naming its own position) starts at or after
/// `from`: proof that the bytes before it had been made durable, so damage there is not a torn
/// write.
pub(crate) fn sync_mark_after(buf: &[u8], from: usize) -> bool {
    (from..buf.len().saturating_sub(HEADER)).any(|p| {
        matches!(parse_at(buf, p), Parsed::Ok(Record::Synced { offset }, _) if offset == p as u64)
    })
}
