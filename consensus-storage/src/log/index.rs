//! [`Index`]: the log's contents in memory, with no files and no threads.
//!
//! Both sides of the log drive the same index: [`Log`](super::Log) applies each accepted write
//! to it before queueing the write's records, and replay applies every record read back from the
//! file. So what a reader sees after a write and what a restart rebuilds are one code path. The
//! index also counts the bytes its live records take, which tells the writer when a rewrite pays
//! off, and encodes itself as the records of such a rewrite.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::Entry;
use crate::record::{Record, HEADER};

/// Bytes of an entry record besides its data: the header, the kind, index and term.
const ENTRY_OVERHEAD: u64 = HEADER as u64 + 1 + 8 + 8;

/// Live entries, the purged position and the metadata of a log.
#[derive(Debug, Default, Clone)]
pub(crate) struct Index {
    /// Contiguous entries, lowest index first.
    entries: VecDeque<Entry>,
    /// The last purged entry: index, term and the engine's note about it.
    purged: Option<(u64, u64, Bytes)>,
    metas: HashMap<u8, Bytes>,
    /// Size of the entry records that a rewrite would keep.
    live_bytes: u64,
}

impl Index {
    /// Index of the first live entry.
    pub(crate) fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index)
    }

    /// Index of the last live entry.
    pub(crate) fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|e| e.index)
    }

    /// The last purged entry: index, term and the engine's note about it.
    pub(crate) fn purged(&self) -> Option<&(u64, u64, Bytes)> {
        self.purged.as_ref()
    }

    /// Size of the entry records that a rewrite would keep.
    pub(crate) fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// The live entry at `index`.
    pub(crate) fn entry(&self, index: u64) -> Option<&Entry> {
        self.position(index).map(|p| &self.entries[p])
    }

    /// The term at `index`: of a live entry, or of the last purged one.
    pub(crate) fn term(&self, index: u64) -> Option<u64> {
        if let Some(e) = self.entry(index) {
            return Some(e.term);
        }
        self.purged.as_ref().filter(|p| p.0 == index).map(|p| p.1)
    }

    /// Live entries with index in `[lo, hi)`, stopping before the entry whose data would take
    /// the total past `max_bytes`, but always at least one entry (so a caller always progresses).
    pub(crate) fn entries(&self, lo: u64, hi: u64, max_bytes: Option<u64>) -> Vec<Entry> {
        let mut out = Vec::new();
        let Some(first) = self.first_index() else {
            return out;
        };
        let start = lo.max(first);
        let mut size = 0u64;
        for index in start..hi {
            let Some(p) = self.position(index) else { break };
            let e = &self.entries[p];
            size += e.data.len() as u64;
            if !out.is_empty() && max_bytes.is_some_and(|m| size > m) {
                break;
            }
            out.push(e.clone());
        }
        out
    }

    /// The metadata value under `key`.
    pub(crate) fn meta(&self, key: u8) -> Option<&Bytes> {
        self.metas.get(&key)
    }

    /// Sets metadata `key` (latest wins).
    pub(crate) fn set_meta(&mut self, key: u8, data: Bytes) {
        self.metas.insert(key, data);
    }

    /// Checks that `entries` may be appended as one batch: the first one may be appended
    /// (see [`Index::check_append`]) and the rest follow it without gaps. Checking the whole
    /// batch first is what lets a refused batch change nothing.
    pub(crate) fn check_batch(&self, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        self.check_append(first.index)?;
        for w in entries.windows(2) {
            if w[1].index != w[0].index + 1 {
                return Err(format!(
                    "entries not contiguous: {} then {}",
                    w[0].index, w[1].index
                ));
            }
        }
        Ok(())
    }

    /// Checks that `index` may be appended (replacing anything at or above it): it lies above
    /// the purged prefix and leaves no gap after the last entry.
    pub(crate) fn check_append(&self, index: u64) -> Result<(), String> {
        if let Some((p, _, _)) = &self.purged {
            if index <= *p {
                return Err(format!(
                    "append at {index} is at or below the purged index {p}"
                ));
            }
        }
        let next = match (self.last_index(), &self.purged) {
            (Some(last), _) => last + 1,
            (None, Some((p, _, _))) => p + 1,
            (None, None) => return Ok(()),
        };
        if index > next {
            return Err(format!("append at {index} leaves a gap after {}", next - 1));
        }
        Ok(())
    }

    /// Appends `e`, replacing any entry at or above its index.
    pub(crate) fn push(&mut self, e: Entry) -> Result<(), String> {
        self.check_append(e.index)?;
        self.truncate_from(e.index);
        self.live_bytes += entry_bytes(&e);
        self.entries.push_back(e);
        Ok(())
    }

    /// Removes entries at `index` and above.
    pub(crate) fn truncate_from(&mut self, index: u64) {
        while self.entries.back().is_some_and(|e| e.index >= index) {
            if let Some(e) = self.entries.pop_back() {
                self.live_bytes -= entry_bytes(&e);
            }
        }
    }

    /// Removes entries at `index` and below and remembers `(index, term, data)` as the purged
    /// position, unless a later position is already purged (purges never move backwards).
    pub(crate) fn purge_upto(&mut self, index: u64, term: u64, data: Bytes) {
        while self.entries.front().is_some_and(|e| e.index <= index) {
            if let Some(e) = self.entries.pop_front() {
                self.live_bytes -= entry_bytes(&e);
            }
        }
        if self.purged.as_ref().is_none_or(|p| p.0 <= index) {
            self.purged = Some((index, term, data));
        }
    }

    /// Applies one record read back from the file; an error means the records contradict each
    /// other (an append that leaves a gap), which replay reports as corruption.
    pub(crate) fn apply(&mut self, r: Record) -> Result<(), String> {
        match r {
            Record::Entry { index, term, data } => {
                // Replaying a rewrite race may repeat entries already purged: harmless.
                if self.purged.as_ref().is_some_and(|p| index <= p.0) {
                    return Ok(());
                }
                self.push(Entry { index, term, data })?;
            }
            Record::Truncate { index } => self.truncate_from(index),
            Record::Purge { index, term, data } => self.purge_upto(index, term, data),
            Record::Meta { key, data } => self.set_meta(key, data),
            Record::Synced { .. } => {}
        }
        Ok(())
    }

    /// Every record needed to rebuild this index: metadata (by key), the purged position, then
    /// the live entries in order.
    pub(crate) fn encode_all(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.live_bytes as usize + 1024);
        let mut metas: Vec<_> = self.metas.iter().collect();
        metas.sort_by_key(|(k, _)| **k);
        for (key, data) in metas {
            Record::Meta {
                key: *key,
                data: data.clone(),
            }
            .encode_into(&mut out);
        }
        if let Some((index, term, data)) = &self.purged {
            Record::Purge {
                index: *index,
                term: *term,
                data: data.clone(),
            }
            .encode_into(&mut out);
        }
        for e in &self.entries {
            Record::Entry {
                index: e.index,
                term: e.term,
                data: e.data.clone(),
            }
            .encode_into(&mut out);
        }
        out
    }

    /// Where the entry at `index` sits in `entries`: the entries are contiguous, so it is the
    /// distance from the first.
    /// The highest index up to which the log can be purged so that the live entries at or
    /// below `upto` hold at most `max_bytes` of data: `upto` itself when even the entry at
    /// `upto` is larger, the index before the first live entry when they all fit.
    pub(crate) fn purge_bound_keeping(&self, upto: u64, max_bytes: u64) -> Option<u64> {
        let first = self.first_index()?;
        let last = self.position(upto.min(self.last_index()?))?;
        let mut kept = 0u64;
        for pos in (0..=last).rev() {
            kept += self.entries[pos].data.len() as u64;
            if kept > max_bytes {
                return Some(first + pos as u64);
            }
        }
        Some(first - 1)
    }

    fn position(&self, index: u64) -> Option<usize> {
        let first = self.first_index()?;
        let pos = index.checked_sub(first)? as usize;
        (pos < self.entries.len()).then_some(pos)
    }
}

/// Size of the record that holds `e`.
fn entry_bytes(e: &Entry) -> u64 {
    e.data.len() as u64 + ENTRY_OVERHEAD
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{parse_at, Parsed};

    fn e(index: u64, term: u64, data: &'static str) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::from_static(data.as_bytes()),
        }
    }

    fn indexes(ix: &Index) -> Vec<(u64, u64)> {
        ix.entries(0, u64::MAX, None)
            .iter()
            .map(|e| (e.index, e.term))
            .collect()
    }

    fn filled(n: u64) -> Index {
        let mut ix = Index::default();
        for i in 1..=n {
            ix.push(e(i, 1, "v")).unwrap();
        }
        ix
    }

    #[test]
    fn the_purge_bound_keeps_at_most_the_bytes_asked_at_or_below_upto() {
        // Entries 1..=10 of one byte each.
        let ix = filled(10);
        assert_eq!(ix.purge_bound_keeping(8, 3), Some(5), "keeps 6, 7, 8");
        assert_eq!(
            ix.purge_bound_keeping(8, 0),
            Some(8),
            "keeps nothing at or below 8"
        );
        assert_eq!(ix.purge_bound_keeping(8, 100), Some(0), "everything fits");
        assert_eq!(
            ix.purge_bound_keeping(50, 2),
            Some(8),
            "upto past the end: the end"
        );
        assert_eq!(Index::default().purge_bound_keeping(8, 2), None);
    }

    #[test]
    fn an_entry_record_is_as_long_as_the_index_counts() {
        let mut buf = Vec::new();
        Record::Entry {
            index: 1,
            term: 1,
            data: Bytes::from_static(b"abc"),
        }
        .encode_into(&mut buf);
        assert_eq!(buf.len() as u64, entry_bytes(&e(1, 1, "abc")));
    }

    #[test]
    fn push_replaces_the_suffix_from_its_index() {
        let mut ix = filled(3);
        ix.push(e(2, 2, "B")).unwrap();
        assert_eq!(indexes(&ix), vec![(1, 1), (2, 2)]);
        assert_eq!(ix.last_index(), Some(2));
    }

    #[test]
    fn an_append_past_the_next_index_leaves_a_gap_and_is_refused() {
        let mut ix = filled(2);
        assert!(ix.push(e(4, 1, "d")).is_err());
        assert!(ix.check_batch(&[e(3, 1, "c"), e(5, 1, "e")]).is_err());
        assert!(ix.check_batch(&[e(3, 1, "c"), e(4, 1, "d")]).is_ok());
        assert!(ix.check_batch(&[]).is_ok());
        assert_eq!(ix.last_index(), Some(2));
    }

    #[test]
    fn the_first_append_to_an_empty_index_may_start_anywhere() {
        let mut ix = Index::default();
        ix.push(e(40, 3, "x")).unwrap();
        assert_eq!(ix.first_index(), Some(40));
        assert_eq!(ix.entry(40).map(|e| e.term), Some(3));
        assert!(ix.entry(39).is_none());
        assert!(ix.entry(41).is_none());
    }

    #[test]
    fn truncate_removes_entries_at_and_above_and_their_bytes() {
        let mut ix = filled(5);
        let before = ix.live_bytes();
        ix.truncate_from(4);
        assert_eq!(ix.last_index(), Some(3));
        assert_eq!(ix.live_bytes(), before - 2 * entry_bytes(&e(0, 0, "v")));
        ix.truncate_from(1);
        assert_eq!(ix.first_index(), None);
        assert_eq!(ix.live_bytes(), 0);
    }

    #[test]
    fn purge_drops_the_prefix_and_keeps_the_purged_term() {
        let mut ix = filled(10);
        ix.purge_upto(6, 1, Bytes::from_static(b"note"));
        assert_eq!(ix.first_index(), Some(7));
        assert_eq!(ix.purged().map(|p| (p.0, p.1)), Some((6, 1)));
        assert_eq!(ix.term(6), Some(1));
        assert_eq!(ix.term(5), None);
        assert!(ix.entry(6).is_none());
        assert_eq!(ix.live_bytes(), 4 * entry_bytes(&e(0, 0, "v")));
    }

    #[test]
    fn appends_at_or_below_the_purged_index_are_refused() {
        let mut ix = filled(3);
        ix.purge_upto(3, 1, Bytes::new());
        assert!(ix.check_append(3).is_err());
        assert!(ix.check_append(5).is_err());
        ix.push(e(4, 2, "d")).unwrap();
        assert_eq!(indexes(&ix), vec![(4, 2)]);
    }

    #[test]
    fn the_purged_position_never_moves_backwards() {
        let mut ix = filled(10);
        ix.purge_upto(8, 2, Bytes::from_static(b"later"));
        ix.purge_upto(5, 1, Bytes::from_static(b"earlier"));
        assert_eq!(
            ix.purged().cloned(),
            Some((8, 2, Bytes::from_static(b"later")))
        );
    }

    #[test]
    fn entries_stop_at_the_byte_budget_but_return_at_least_one() {
        let mut ix = Index::default();
        for i in 1..=4 {
            ix.push(e(i, 1, "12345")).unwrap();
        }
        let got =
            |lo, hi, max| -> Vec<u64> { ix.entries(lo, hi, max).iter().map(|e| e.index).collect() };
        assert_eq!(got(1, 5, Some(10)), vec![1, 2]);
        assert_eq!(got(1, 5, Some(1)), vec![1]);
        assert_eq!(got(0, 3, None), vec![1, 2]);
        assert_eq!(got(3, 100, None), vec![3, 4]);
        assert_eq!(got(5, 9, None), Vec::<u64>::new());
    }

    #[test]
    fn replayed_entries_already_purged_are_ignored() {
        let mut ix = filled(5);
        ix.purge_upto(3, 1, Bytes::new());
        // A rewrite raced with these appends, so they appear again after the rewritten file.
        ix.apply(Record::Entry {
            index: 2,
            term: 1,
            data: Bytes::new(),
        })
        .unwrap();
        assert_eq!(indexes(&ix), vec![(4, 1), (5, 1)]);
    }

    #[test]
    fn a_replayed_gap_is_an_error() {
        let mut ix = filled(2);
        let r = ix.apply(Record::Entry {
            index: 9,
            term: 1,
            data: Bytes::new(),
        });
        assert!(r.is_err());
    }

    #[test]
    fn the_latest_meta_wins() {
        let mut ix = Index::default();
        ix.apply(Record::Meta {
            key: 1,
            data: Bytes::from_static(b"a"),
        })
        .unwrap();
        ix.set_meta(1, Bytes::from_static(b"b"));
        assert_eq!(ix.meta(1), Some(&Bytes::from_static(b"b")));
        assert_eq!(ix.meta(2), None);
    }

    #[test]
    fn encode_all_rebuilds_the_same_index() {
        let mut ix = filled(6);
        ix.set_meta(3, Bytes::from_static(b"m3"));
        ix.set_meta(1, Bytes::from_static(b"m1"));
        ix.purge_upto(2, 1, Bytes::from_static(b"n"));
        ix.push(e(5, 2, "five")).unwrap();
        let bytes = ix.encode_all();
        let mut rebuilt = Index::default();
        let mut pos = 0;
        while let Parsed::Ok(r, next) = parse_at(&bytes, pos) {
            rebuilt.apply(r).unwrap();
            pos = next;
        }
        assert_eq!(pos, bytes.len());
        assert_eq!(indexes(&rebuilt), indexes(&ix));
        assert_eq!(rebuilt.purged(), ix.purged());
        assert_eq!(rebuilt.meta(1), ix.meta(1));
        assert_eq!(rebuilt.meta(3), ix.meta(3));
        assert_eq!(rebuilt.live_bytes(), ix.live_bytes());
        // Only live records are kept: the entries plus two meta records (12 bytes each with
        // their 2-byte values) and one purge record (26 bytes with its 1-byte note).
        assert_eq!(bytes.len() as u64, ix.live_bytes() + 2 * 12 + 26);
    }
}
