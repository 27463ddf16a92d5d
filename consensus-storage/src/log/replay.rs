//! Reading the log file back on open.
//!
//! [`scan`] is the decision, on bytes alone: which records are valid, whether what follows them
//! is a clean end, a torn write or corruption. [`replay`] reads the file, runs the scan and acts
//! on its answer (truncates a torn tail, refuses corruption). The rules:
//!
//! - the records are applied in file order to an [`Index`]; records that contradict each other
//!   (an entry that leaves a gap) are corruption at that record;
//! - the end of the bytes, or nothing but zeros, is the clean end: zeros are preallocated space
//!   that was never written;
//! - the writer puts a sync mark (a record naming its own offset) at the start of the first
//!   write after each sync: everything before a mark had been made durable when it was written;
//! - a damaged record with no valid sync mark after it lies past the last synced end: it is
//!   part of a write torn by a crash, never acknowledged (its sync never completed), so it and
//!   everything after it are dropped and the file is truncated there. That holds even when
//!   valid records follow it: a power cut during one multi-page write may keep a later page
//!   and lose an earlier one (or leave it zeroed in preallocated space);
//! - a damaged record followed by a valid sync mark lies before a synced end: that is
//!   corruption of acknowledged data, and the log refuses to open instead of losing it.
//!
//! What the rule cannot see: damage inside the last synced write when nothing was written
//! after it (no mark follows yet) is indistinguishable from a torn write and is truncated.

use std::path::Path;

use super::index::Index;
use crate::fs::{FileSystem, OpenMode};
use crate::record::{parse_at, sync_mark_after, Parsed};
use crate::{Result, StorageError};

/// What [`scan`] found in a log file's bytes that it could open from.
#[derive(Debug)]
pub(crate) struct Scan {
    /// The log rebuilt from the valid records.
    pub(crate) index: Index,
    /// End of the last valid record: where the next write goes.
    pub(crate) valid_len: u64,
    /// Why the bytes after `valid_len` are a torn write, when they are one; `None` when they
    /// are a clean end (nothing, or zeros).
    pub(crate) torn: Option<String>,
}

/// Damage before the tail of the file (see the module doc).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Corruption {
    /// Byte offset of the bad record.
    pub(crate) offset: u64,
    /// What is wrong with it.
    pub(crate) reason: String,
}

/// Checks every record of `buf` and rebuilds the log from them.
pub(crate) fn scan(buf: &[u8]) -> std::result::Result<Scan, Corruption> {
    let mut index = Index::default();
    let mut pos = 0usize;
    let torn = loop {
        match parse_at(buf, pos) {
            Parsed::Ok(record, next) => {
                index.apply(record).map_err(|reason| Corruption {
                    offset: pos as u64,
                    reason,
                })?;
                pos = next;
            }
            Parsed::End => break None,
            // Preallocated space that was never written: the clean end of the log.
            Parsed::Bad { .. } if buf[pos..].iter().all(|b| *b == 0) => break None,
            Parsed::Bad { reason, .. } => {
                if sync_mark_after(buf, pos + 1) {
                    return Err(Corruption {
                        offset: pos as u64,
                        reason,
                    });
                }
                break Some(reason);
            }
        }
    };
    Ok(Scan {
        index,
        valid_len: pos as u64,
        torn,
    })
}

/// Reads and checks every record of the log at `path`; truncates a torn tail; refuses mid-file
/// corruption. Returns the rebuilt log and the end of its valid records.
pub(crate) fn replay(fs: &dyn FileSystem, path: &Path) -> Result<(Index, u64)> {
    let buf = fs
        .read(path)
        .map_err(|e| StorageError::io("read", path, e))?;
    let scan = scan(&buf).map_err(|c| StorageError::Corrupt {
        path: path.display().to_string(),
        offset: c.offset,
        reason: c.reason,
    })?;
    if let Some(reason) = scan.torn {
        tracing::warn!(
            path = %path.display(),
            offset = scan.valid_len,
            dropped = buf.len() as u64 - scan.valid_len,
            "torn write at the log tail ({reason}); truncating it"
        );
        let f = fs
            .open(path, OpenMode::Existing)
            .map_err(|e| StorageError::io("open", path, e))?;
        f.set_len(scan.valid_len)
            .and_then(|_| f.sync_all())
            .map_err(|e| StorageError::io("truncate torn tail of", path, e))?;
    }
    Ok((scan.index, scan.valid_len))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::Record;

    fn entry(index: u64, data: &'static [u8]) -> Record {
        Record::Entry {
            index,
            term: 1,
            data: Bytes::from_static(data),
        }
    }

    /// The encoding of `records` and where each one starts.
    fn file(records: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let mut buf = Vec::new();
        let mut starts = Vec::new();
        for r in records {
            starts.push(buf.len());
            r.encode_into(&mut buf);
        }
        (buf, starts)
    }

    fn last_index(s: &Scan) -> Option<u64> {
        s.index.last_index()
    }

    #[test]
    fn valid_records_end_cleanly_at_the_end_of_the_bytes() {
        let (buf, _) = file(&[entry(1, b"a"), entry(2, b"b")]);
        let s = scan(&buf).unwrap();
        assert_eq!(last_index(&s), Some(2));
        assert_eq!(s.valid_len, buf.len() as u64);
        assert_eq!(s.torn, None);
    }

    #[test]
    fn an_empty_file_is_an_empty_log() {
        let s = scan(&[]).unwrap();
        assert_eq!(last_index(&s), None);
        assert_eq!((s.valid_len, s.torn), (0, None));
    }

    #[test]
    fn a_zeroed_tail_is_the_clean_end_not_a_torn_write() {
        let (mut buf, _) = file(&[entry(1, b"a")]);
        let end = buf.len();
        buf.resize(end + 4096, 0);
        let s = scan(&buf).unwrap();
        assert_eq!(last_index(&s), Some(1));
        assert_eq!(s.valid_len, end as u64);
        assert_eq!(s.torn, None);
    }

    #[test]
    fn a_cut_off_last_record_is_a_torn_tail() {
        let (buf, starts) = file(&[entry(1, b"a"), entry(2, b"b")]);
        let s = scan(&buf[..buf.len() - 3]).unwrap();
        assert_eq!(last_index(&s), Some(1));
        assert_eq!(s.valid_len, starts[1] as u64);
        assert!(s.torn.is_some());
    }

    #[test]
    fn a_last_record_ending_in_zeros_inside_preallocated_space_is_torn() {
        let (mut buf, starts) = file(&[entry(1, b"a"), entry(2, b"bbbb")]);
        let end = buf.len();
        buf[end - 3..].fill(0);
        buf.resize(end + 1024, 0);
        let s = scan(&buf).unwrap();
        assert_eq!(last_index(&s), Some(1));
        assert_eq!(s.valid_len, starts[1] as u64);
        assert!(s.torn.is_some());
    }

    #[test]
    fn garbage_after_the_last_record_is_a_torn_tail() {
        let (mut buf, _) = file(&[entry(1, b"a")]);
        let end = buf.len();
        buf.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
        let s = scan(&buf).unwrap();
        assert_eq!(s.valid_len, end as u64);
        assert!(s.torn.is_some());
    }

    /// `records`, then a sync mark at its own offset, then `after`.
    fn file_with_mark(records: &[Record], after: &[Record]) -> (Vec<u8>, Vec<usize>) {
        let (mut buf, mut starts) = file(records);
        let at = buf.len();
        starts.push(at);
        Record::Synced { offset: at as u64 }.encode_into(&mut buf);
        for r in after {
            starts.push(buf.len());
            r.encode_into(&mut buf);
        }
        (buf, starts)
    }

    #[test]
    fn a_bad_record_before_a_sync_mark_is_corruption_at_the_bad_one() {
        let (mut buf, starts) = file_with_mark(
            &[entry(1, b"payload"), entry(2, b"payload")],
            &[entry(3, b"x")],
        );
        buf[starts[1] + 12] ^= 0xff;
        let c = scan(&buf).unwrap_err();
        assert_eq!(c.offset, starts[1] as u64);
        assert_eq!(c.reason, "checksum mismatch");
    }

    #[test]
    fn a_mark_that_names_another_offset_proves_nothing() {
        let (mut buf, starts) = file(&[entry(1, b"payload"), entry(2, b"payload")]);
        Record::Synced { offset: 3 }.encode_into(&mut buf);
        buf[starts[1] + 12] ^= 0xff;
        let s = scan(&buf).unwrap();
        assert_eq!(s.valid_len, starts[1] as u64);
        assert!(s.torn.is_some());
    }

    /// Defect 3: one unacknowledged multi-page write into preallocated zeros lost its first
    /// page but kept a later one. Nothing after the damage was ever synced, so it is a torn
    /// tail to repair, not corruption.
    #[test]
    fn a_zeroed_page_followed_by_valid_records_after_the_last_mark_is_a_torn_tail() {
        let big = vec![7u8; 6000];
        let mut records = vec![entry(1, b"a")];
        let mut after = Vec::new();
        for i in 2..6 {
            after.push(Record::Entry {
                index: i,
                term: 1,
                data: Bytes::from(big.clone()),
            });
        }
        records.truncate(1);
        let (mut buf, starts) = file_with_mark(&records, &after);
        let mark = starts[1];
        // The page holding the start of entry 2 was never written: zeros.
        let lost = starts[2]..(starts[2] + 4096).min(buf.len());
        buf[lost].fill(0);
        buf.resize(buf.len() + 8192, 0);
        let s = scan(&buf).unwrap();
        assert_eq!(last_index(&s), Some(1));
        assert_eq!(
            s.valid_len, starts[2] as u64,
            "cut after the mark, at the damage"
        );
        assert!(s.torn.is_some());
        assert!(mark < starts[2]);
    }

    #[test]
    fn records_that_leave_a_gap_are_corruption_at_the_gap() {
        let (buf, starts) = file(&[entry(1, b"a"), entry(5, b"e")]);
        let c = scan(&buf).unwrap_err();
        assert_eq!(c.offset, starts[1] as u64);
    }

    #[test]
    fn truncate_purge_and_meta_records_replay_in_file_order() {
        let (buf, _) = file(&[
            entry(1, b"a"),
            entry(2, b"b"),
            entry(3, b"c"),
            Record::Truncate { index: 3 },
            Record::Purge {
                index: 1,
                term: 1,
                data: Bytes::from_static(b"n"),
            },
            Record::Meta {
                key: 4,
                data: Bytes::from_static(b"v1"),
            },
            Record::Meta {
                key: 4,
                data: Bytes::from_static(b"v2"),
            },
        ]);
        let s = scan(&buf).unwrap();
        assert_eq!(s.index.first_index(), Some(2));
        assert_eq!(s.index.last_index(), Some(2));
        assert_eq!(s.index.meta(4), Some(&Bytes::from_static(b"v2")));
    }
}
