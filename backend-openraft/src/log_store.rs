//! `RaftLogStorage` over the shared durable log: entries, vote and committed id, fsynced.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};

use bytes::Bytes;
use consensus_api::codec;
use consensus_storage::{Entry, Log, SyncCallback};
use openraft::storage::{IOFlushed, RaftLogStorage};
use openraft::type_config::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::{LogState, OptionalSend, RaftLogReader};
use tokio::sync::oneshot;

use crate::types::C;

/// Metadata key of the vote.
pub(crate) const META_VOTE: u8 = 1;
/// Metadata key of the committed log id.
pub(crate) const META_COMMITTED: u8 = 2;
/// Metadata key set once this node bootstrapped a cluster.
pub(crate) const META_BOOTSTRAPPED: u8 = 3;

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs a log operation that reports durability through a callback and waits for it.
async fn durable(
    op: impl FnOnce(Option<SyncCallback>) -> consensus_storage::Result<()>,
) -> io::Result<()> {
    let (tx, rx) = oneshot::channel();
    op(Some(Box::new(move |r| {
        let _ = tx.send(r);
    })))
    .map_err(io_err)?;
    rx.await
        .map_err(|_| io_err("log writer stopped"))?
        .map_err(io_err)
}

/// The log store openraft drives; clones share the same log.
#[derive(Clone)]
pub struct LogStore {
    log: Log,
    /// Most bytes of encoded entries one replication read returns (at least one entry).
    max_read_bytes: u64,
}

impl LogStore {
    /// Wraps an open log. Replication reads
    /// ([`limited_get_log_entries`](RaftLogReader::limited_get_log_entries)) return at most
    /// `max_read_bytes` of encoded entries, and always at least one: pass
    /// [`NodeConfig::max_command_bytes`](consensus_api::NodeConfig::max_command_bytes), so that
    /// one AppendEntries message stays within the transport's frame limit.
    pub fn new(log: Log, max_read_bytes: u64) -> Self {
        Self {
            log,
            max_read_bytes,
        }
    }

    /// Whether nothing was ever stored (fresh data dir).
    pub fn is_fresh(&self) -> bool {
        let st = self.log.state();
        st.last_index.is_none()
            && st.purged.is_none()
            && self.log.meta(META_VOTE).is_none()
            && self.log.meta(META_BOOTSTRAPPED).is_none()
    }

    fn decode_entry(e: &Entry) -> io::Result<EntryOf<C>> {
        codec::decode(&e.data).map_err(|err| io_err(format!("log entry {}: {err}", e.index)))
    }
}

impl RaftLogReader<C> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        let lo = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i + 1,
            Bound::Unbounded => 0,
        };
        let hi = match range.end_bound() {
            Bound::Included(i) => i + 1,
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.log
            .entries(lo, hi, None)
            .iter()
            .map(Self::decode_entry)
            .collect()
    }

    /// A prefix of `[start, end)` of at most `max_read_bytes` encoded bytes, at least one entry
    /// when the range holds any: what one AppendEntries message carries. The byte budget is on
    /// the stored encoding, which is the entry's wire encoding too; the message's envelope fits
    /// in the room [`NodeConfig::max_command_bytes`](consensus_api::NodeConfig::max_command_bytes)
    /// leaves below the frame limit.
    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<EntryOf<C>>, io::Error> {
        self.log
            .entries(start, end, Some(self.max_read_bytes))
            .iter()
            .map(Self::decode_entry)
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<C>>, io::Error> {
        match self.log.meta(META_VOTE) {
            Some(b) => codec::decode(&b).map(Some).map_err(io_err),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<C> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<C>, io::Error> {
        let st = self.log.state();
        let purged: Option<LogIdOf<C>> = match &st.purged {
            Some((_, _, note)) => Some(codec::decode(note).map_err(io_err)?),
            None => None,
        };
        let last = match st.last_index.and_then(|i| self.log.entry(i)) {
            Some(e) => Some(Self::decode_entry(&e)?.log_id),
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<C>) -> Result<(), io::Error> {
        let bytes = Bytes::from(codec::encode(vote).map_err(io_err)?);
        durable(|cb| self.log.set_meta(META_VOTE, bytes, cb)).await
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        // Not waited for: a committed id that lags after a crash is only re-learned from the
        // leader, never wrong.
        let bytes = Bytes::from(codec::encode(&committed).map_err(io_err)?);
        self.log
            .set_meta(META_COMMITTED, bytes, None)
            .map_err(io_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<C>>, io::Error> {
        match self.log.meta(META_COMMITTED) {
            Some(b) => codec::decode(&b).map_err(io_err),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<C>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<C>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Vec::new();
        for e in entries {
            batch.push(Entry {
                index: e.log_id.index,
                term: e.log_id.leader_id.term,
                data: Bytes::from(codec::encode(&e).map_err(io_err)?),
            });
        }
        self.log
            .append(
                batch,
                Some(Box::new(move |r| {
                    callback.io_completed(r.map_err(io_err));
                })),
            )
            .map_err(io_err)
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<C>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        durable(|cb| self.log.truncate(from, cb)).await
    }

    async fn purge(&mut self, log_id: LogIdOf<C>) -> Result<(), io::Error> {
        let note = Bytes::from(codec::encode(&log_id).map_err(io_err)?);
        self.log
            .purge(log_id.index, log_id.leader_id.term, note, None)
            .map_err(io_err)
    }
}
