//! Batching of proposals above the engines, for state machines that opt in with
//! [`StateMachine::BATCHES`](crate::StateMachine::BATCHES).
//!
//! Concurrent [`Consensus::propose`](crate::Consensus::propose) calls on one node are carried
//! in one log entry (and, on a follower, in one forwarded request) and answered one by one, in
//! order, from the batch's outcome. No timer: a proposal is sent at once when fewer than
//! `MAX_BATCHES_IN_FLIGHT` (4) batches of this node are in flight (so one client waits for nothing);
//! otherwise it waits in a queue that the next batch to finish takes, up to the entry size limit.
//! The engines' per-entry costs (log record, replication, apply, waiter) are then paid once per
//! batch, and the batch grows with the load.
//!
//! # Entry format
//! A batch entry is `count: u32 LE`, then per command `len: u32 LE` and the command's encoding
//! (what the node would otherwise propose alone). The outcome of applying it has the same
//! framing, one part per command, in order. Every node of a cluster must agree on whether a state
//! machine batches, since the entries are framed differently: it is a property of the type.

use std::collections::VecDeque;
use tokio::time::Instant;

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::ConsensusError;

/// How many batches one node keeps in flight at once (pipelined in the engine); further
/// proposals wait for one of them and go together in the next.
pub(crate) const MAX_BATCHES_IN_FLIGHT: usize = 4;

/// Framing bytes of a batch holding one command: a command may be this much under
/// [`NodeConfig::max_command_bytes`](crate::NodeConfig::max_command_bytes) at most.
pub const OVERHEAD: usize = 8;

/// Frames `parts` as one batch.
pub(crate) fn encode<'a>(parts: impl ExactSizeIterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let len = 4 + parts.clone().map(|p| 4 + p.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
    for p in parts {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(p);
    }
    out
}

/// The parts of a batch framed by [`encode`]; an error for anything else (a short or long
/// input, a count that does not match).
pub(crate) fn split(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let (count, mut rest) = take_u32(bytes).ok_or("a batch shorter than its count")?;
    // Every part takes at least its 4-byte length: a count claiming more is refused before
    // anything is allocated for it.
    if count > rest.len() / 4 + 1 {
        return Err(format!(
            "a batch claims {count} parts in {} bytes",
            bytes.len()
        ));
    }
    let mut parts = Vec::with_capacity(count);
    for i in 0..count {
        let (len, tail) = take_u32(rest).ok_or_else(|| format!("part {i} has no length"))?;
        if len > tail.len() {
            return Err(format!(
                "part {i} claims {len} bytes, {} are left",
                tail.len()
            ));
        }
        let (part, tail) = tail.split_at(len);
        parts.push(part);
        rest = tail;
    }
    if !rest.is_empty() {
        return Err(format!("{} bytes after the last part", rest.len()));
    }
    Ok(parts)
}

fn take_u32(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let (head, tail) = bytes.split_first_chunk::<4>()?;
    Some((u32::from_le_bytes(*head) as usize, tail))
}

/// What one proposal gets back: its own part of the batch's outcome, or the batch's error.
pub(crate) type Answer = Result<Vec<u8>, ConsensusError>;

/// A proposal waiting for a batch.
pub(crate) struct Waiting {
    pub(crate) command: Vec<u8>,
    pub(crate) deadline: Instant,
    pub(crate) answer: oneshot::Sender<Answer>,
}

struct Queue {
    waiting: VecDeque<Waiting>,
    in_flight: usize,
}

/// The proposals of one node that wait for a batch, and how many batches are in flight.
pub(crate) struct Batcher {
    queue: Mutex<Queue>,
    /// Largest batch entry (the engine's command limit).
    max_bytes: usize,
}

impl Batcher {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            queue: Mutex::new(Queue {
                waiting: VecDeque::new(),
                in_flight: 0,
            }),
            max_bytes,
        }
    }

    /// Queues `w`; returns a batch to send now when a slot is free (the caller then owns that
    /// slot until [`next`](Self::next) returns `None`).
    pub(crate) fn push(&self, w: Waiting) -> Option<Vec<Waiting>> {
        let mut q = self.queue.lock();
        q.waiting.push_back(w);
        if q.in_flight >= MAX_BATCHES_IN_FLIGHT {
            return None;
        }
        let batch = self.take(&mut q);
        if !batch.is_empty() {
            q.in_flight += 1;
            Some(batch)
        } else {
            None
        }
    }

    /// After a batch finished: the next one for the same slot, or `None` (the slot is free).
    pub(crate) fn next(&self) -> Option<Vec<Waiting>> {
        let mut q = self.queue.lock();
        let batch = self.take(&mut q);
        if batch.is_empty() {
            q.in_flight -= 1;
            None
        } else {
            Some(batch)
        }
    }

    /// Takes the oldest waiting proposals that fit one entry (at least one). A proposal whose
    /// caller has gone, or whose deadline has passed, is dropped before it is sent.
    fn take(&self, q: &mut Queue) -> Vec<Waiting> {
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut bytes = 4;
        while let Some(w) = q.waiting.front() {
            if w.answer.is_closed() || w.deadline <= now {
                if let Some(w) = q.waiting.pop_front() {
                    let _ = w.answer.send(Err(ConsensusError::Timeout(
                        "waiting for a batch slot".into(),
                    )));
                }
                continue;
            }
            let size = 4 + w.command.len();
            if !batch.is_empty() && bytes + size > self.max_bytes {
                break;
            }
            bytes += size;
            batch.extend(q.waiting.pop_front());
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn split_gives_back_what_encode_framed_and_refuses_anything_else() {
        let parts: Vec<&[u8]> = vec![b"a", b"", b"ccc"];
        let framed = encode(parts.iter().copied());
        assert_eq!(split(&framed).expect("framed"), parts);
        assert_eq!(
            split(&encode(std::iter::empty())).expect("empty"),
            Vec::<&[u8]>::new()
        );
        for bad in [
            &framed[..framed.len() - 1],
            &[framed.as_slice(), b"x"].concat()[..],
            &[0xff, 0xff, 0xff, 0xff][..],
            &[1, 0, 0, 0, 9, 0, 0, 0, 1][..],
            &[1, 0][..],
        ] {
            assert!(split(bad).is_err(), "{bad:?}");
        }
    }

    fn waiting(bytes: usize) -> (Waiting, oneshot::Receiver<Answer>) {
        let (tx, rx) = oneshot::channel();
        let w = Waiting {
            command: vec![0; bytes],
            deadline: Instant::now() + Duration::from_secs(60),
            answer: tx,
        };
        (w, rx)
    }

    #[test]
    fn batches_fill_the_free_slots_then_grow_within_the_size_limit() {
        let b = Batcher::new(4 + 3 * (4 + 10));
        let mut keep = Vec::new();
        // Each of the first proposals gets a slot of its own at once.
        for _ in 0..MAX_BATCHES_IN_FLIGHT {
            let (w, rx) = waiting(10);
            keep.push(rx);
            assert_eq!(b.push(w).map(|v| v.len()), Some(1));
        }
        // Then they wait, and the next batch takes as many as fit.
        for _ in 0..4 {
            let (w, rx) = waiting(10);
            keep.push(rx);
            assert!(b.push(w).is_none());
        }
        assert_eq!(b.next().map(|v| v.len()), Some(3));
        assert_eq!(b.next().map(|v| v.len()), Some(1));
        // An empty queue frees the slot: the next proposal goes at once.
        assert!(b.next().is_none());
        let (w, _rx) = waiting(10);
        assert_eq!(b.push(w).map(|v| v.len()), Some(1));
    }

    #[test]
    fn a_proposal_whose_caller_left_is_not_sent() {
        let b = Batcher::new(1 << 20);
        let mut keep = Vec::new();
        for _ in 0..MAX_BATCHES_IN_FLIGHT {
            let (w, rx) = waiting(1);
            keep.push(rx);
            assert!(b.push(w).is_some());
        }
        let (w, rx) = waiting(1);
        assert!(b.push(w).is_none());
        drop(rx);
        let (w, _rx) = waiting(1);
        assert!(b.push(w).is_none());
        assert_eq!(b.next().map(|v| v.len()), Some(1));
    }
}
