//! Large states: a key-value state many transport frames large, the settings that push its
//! snapshots through a small frame limit, commands sized against the command limit, and the
//! waits the large-state scenarios make (one state everywhere, a log compacted, a snapshot
//! transfer that took more than one chunk).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use consensus_api::{
    codec, ConsensusError, NodeConfig, NodeId, TransferDirection, TransferProgress,
};
use rand::distributions::Alphanumeric;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::kv::{put, KvCommand, KvMachine};
use crate::{LocalCluster, Machines};

/// The frame limit of large-state clusters: small, so a state of one MiB is sixteen frames.
pub const SMALL_FRAME_BYTES: usize = 64 << 10;

/// How often the waits of this module look again.
const POLL: Duration = Duration::from_millis(20);

/// Node settings for a large state that must travel by snapshot: the [`SMALL_FRAME_BYTES`]
/// frame limit, and no log kept behind a snapshot, so a node that misses entries the leader
/// has compacted can only catch up by installing a snapshot. Snapshots are taken when a
/// scenario asks (`snapshot_now`): the default threshold is far above what a scenario writes.
pub fn small_frames_compacting(cfg: &mut NodeConfig) {
    cfg.transport.max_frame_bytes = SMALL_FRAME_BYTES;
    cfg.keep_logs_after_snapshot = 0;
}

/// Node settings for commands near the command limit that must travel in the log: the
/// [`SMALL_FRAME_BYTES`] frame limit and the default log retention and snapshot threshold,
/// far above what a scenario writes, so a lagging node catches up from the log.
pub fn small_frames_keeping_log(cfg: &mut NodeConfig) {
    cfg.transport.max_frame_bytes = SMALL_FRAME_BYTES;
}

/// [`NodeConfig::max_command_bytes`] of a node with [`SMALL_FRAME_BYTES`] frames.
pub fn small_frame_command_limit() -> usize {
    let mut cfg = NodeConfig::new(1, "limits", "unused");
    small_frames_keeping_log(&mut cfg);
    cfg.max_command_bytes()
}

/// The shape of a large state: `keys` puts of a `value_bytes`-byte value each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LargeState {
    /// How many keys.
    pub keys: usize,
    /// The length of each value.
    pub value_bytes: usize,
}

impl LargeState {
    /// 320 values of 4 KiB: 1.25 MiB of values, twenty [`SMALL_FRAME_BYTES`] frames, each put
    /// a fifteenth of the command limit.
    pub const DEFAULT: LargeState = LargeState {
        keys: 320,
        value_bytes: 4096,
    };

    /// The `i`-th key.
    pub fn key(i: usize) -> String {
        format!("large-{i:05}")
    }

    /// The `i`-th value of a run with `seed`.
    pub fn value(&self, seed: u64, i: usize) -> String {
        random_text(seed ^ (i as u64).rotate_left(17), self.value_bytes)
    }

    /// Bytes of values the state holds.
    pub fn bytes(&self) -> usize {
        self.keys * self.value_bytes
    }
}

/// `len` alphanumeric characters (one byte each) drawn from `seed`.
fn random_text(seed: u64, len: usize) -> String {
    SmallRng::seed_from_u64(seed)
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

/// The encoded size of `command`: what the command limit counts.
pub fn encoded_len(command: &KvCommand) -> usize {
    codec::encode(command)
        .map(|b| b.len())
        .unwrap_or(usize::MAX)
}

/// A `Put` of `key` whose encoded form is exactly `encoded_len` bytes, its value drawn from
/// `seed`; `None` when no value length gives exactly that size (the key alone is longer, or
/// the size falls in the gap where the value's length prefix grows by a byte).
pub fn sized_put(key: &str, encoded_len: usize, seed: u64) -> Option<KvCommand> {
    let base = self::encoded_len(&put(key, ""));
    let mut value = random_text(seed, encoded_len.checked_sub(base)?);
    loop {
        let command = put(key, value.as_str());
        let len = self::encoded_len(&command);
        if len == encoded_len {
            return Some(command);
        }
        if len < encoded_len || value.is_empty() {
            return None;
        }
        value.pop();
    }
}

impl LocalCluster<Machines<KvMachine>> {
    /// Writes `state` through node `via`: one put per key, in key order, values drawn from
    /// `seed`. Stops at the first failed put.
    pub async fn write_large_state(
        &self,
        via: NodeId,
        state: LargeState,
        seed: u64,
    ) -> Result<(), ConsensusError> {
        for i in 0..state.keys {
            let command = put(LargeState::key(i), state.value(seed, i));
            self.propose(via, command).await.map_err(|e| {
                ConsensusError::Internal(format!(
                    "put {i} of {} ({} bytes each) through node {via}: {e}",
                    state.keys, state.value_bytes
                ))
            })?;
        }
        Ok(())
    }

    /// Takes snapshots on node `id` until its log is compacted past `index` (an engine may
    /// postpone a purge while it still replicates to a dead follower, so it asks again); returns
    /// the last snapshot's index.
    pub async fn compact_past(
        &self,
        id: NodeId,
        index: u64,
        timeout: Duration,
    ) -> Result<u64, ConsensusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let snap = self
                .on(id, |n| async move { n.snapshot_now().await })
                .await?;
            let purged = self.statuses().get(&id).map_or(0, |s| s.purged_index);
            if purged > index {
                return Ok(snap);
            }
            if Instant::now() >= deadline {
                return Err(ConsensusError::Timeout(format!(
                    "node {id} to compact its log past {index} within {timeout:?} (snapshot at \
                     {snap}, purged up to {purged})"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until every node in `ids` runs, has applied the same index and holds the same
    /// key-value state (data, applied count, history hash); returns that state. The error says
    /// how the states and indexes differ.
    pub async fn wait_same_state(
        &self,
        ids: &[NodeId],
        timeout: Duration,
    ) -> Result<KvMachine, ConsensusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let machines: BTreeMap<NodeId, KvMachine> = ids
                .iter()
                .filter_map(|id| Some((*id, self.handle(*id)?.read_local(|sm| sm.clone()))))
                .collect();
            let statuses = self.statuses();
            let applied: Vec<Option<u64>> = ids
                .iter()
                .map(|id| statuses.get(id).map(|s| s.applied_index))
                .collect();
            let reference = ids.first().and_then(|id| machines.get(id));
            let same_index = applied.iter().all(|a| a.is_some() && *a == applied[0]);
            if let Some(reference) = reference {
                if machines.len() == ids.len()
                    && same_index
                    && machines.values().all(|m| m == reference)
                {
                    return Ok(reference.clone());
                }
            }
            if Instant::now() >= deadline {
                let mut why = format!("nodes {ids:?} to hold one state within {timeout:?}:");
                for id in ids {
                    match (statuses.get(id), machines.get(id)) {
                        (Some(s), Some(m)) => {
                            let _ = write!(
                                why,
                                "\n  node {id}: {:?}, term {}, applied {}, commit {}, last log \
                                 {}, snapshot {}, purged {}, {} keys",
                                s.role,
                                s.term,
                                s.applied_index,
                                s.commit_index,
                                s.last_log_index,
                                s.snapshot_index,
                                s.purged_index,
                                m.data.len()
                            );
                            if let Some(d) = reference.and_then(|r| r.difference(m)) {
                                let _ = write!(why, "; differs from node {}: {d}", ids[0]);
                            }
                        }
                        _ => {
                            let _ = write!(why, "\n  node {id}: not running");
                        }
                    }
                }
                return Err(ConsensusError::Timeout(why));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until a finished, error-free snapshot transfer to `receiver` is reported, by the
    /// receiver itself (receiving) or by a running node sending to it, that carried more than
    /// `frame_bytes` in more than one chunk; returns it. The error lists every transfer the
    /// running nodes report.
    pub async fn wait_chunked_transfer(
        &self,
        receiver: NodeId,
        frame_bytes: usize,
        timeout: Duration,
    ) -> Result<TransferProgress, ConsensusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let reported: Vec<(NodeId, TransferProgress)> = self
                .live()
                .into_iter()
                .filter_map(|id| Some((id, self.handle(id)?.snapshot_transfers())))
                .flat_map(|(id, ts)| ts.into_iter().map(move |t| (id, t)))
                .collect();
            let found = reported.iter().find(|(id, t)| {
                let to_receiver = match t.direction {
                    TransferDirection::Receiving => *id == receiver,
                    TransferDirection::Sending => t.peer == receiver,
                };
                to_receiver
                    && t.done
                    && t.error.is_none()
                    && t.total_bytes > frame_bytes as u64
                    && t.chunks > 1
            });
            if let Some((_, t)) = found {
                return Ok(t.clone());
            }
            if Instant::now() >= deadline {
                return Err(ConsensusError::Timeout(format!(
                    "a finished snapshot transfer to node {receiver} of more than {frame_bytes} \
                     bytes in more than one chunk within {timeout:?}; reported (node, \
                     transfer): {reported:#?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_puts_have_exactly_the_asked_encoded_size() {
        let limit = small_frame_command_limit();
        assert_eq!(limit, SMALL_FRAME_BYTES - 4096);
        for len in [limit, limit - 1, limit + 1, 300, 1000] {
            let cmd = sized_put("key", len, 7).expect("a reachable size");
            assert_eq!(encoded_len(&cmd), len);
        }
        assert!(sized_put("a-long-key", 3, 7).is_none());
    }

    #[test]
    fn the_default_large_state_is_many_frames() {
        let s = LargeState::DEFAULT;
        assert!(s.bytes() >= 16 * SMALL_FRAME_BYTES);
        assert!(s.value_bytes * 8 < small_frame_command_limit());
        assert_eq!(s.value(1, 2), s.value(1, 2));
        assert_ne!(s.value(1, 2), s.value(1, 3));
        assert_eq!(s.value(1, 2).len(), s.value_bytes);
    }
}
