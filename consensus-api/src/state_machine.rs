//! The replicated state machine: the one trait an embedder implements.
//!
//! Small states keep the simple form ([`StateMachine::snapshot`] / [`StateMachine::restore`]
//! with one buffer). Large states override the streaming forms: [`StateMachine::snapshot_to`]
//! and [`StateMachine::restore_from`] move the state through a sink and a source without a
//! whole copy in memory, and [`StateMachine::snapshot_view`] hands the node a point-in-time view
//! so that applies continue while the snapshot is written.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{de::DeserializeOwned, Serialize};

use crate::{codec, ConsensusError};

/// A deterministic state machine replicated by consensus.
///
/// Every node applies the same commands in the same order; `apply` must give the same result and
/// the same state on every node (no clocks, no randomness, no I/O whose outcome can differ).
pub trait StateMachine: Send + Sync + 'static {
    /// A command proposed by a client.
    type Command: Serialize + DeserializeOwned + Send + Sync + 'static;
    /// What applying a command returns to the proposer.
    type Response: Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Whether concurrent proposals on one node may share one log entry ([`crate::batch`]):
    /// the engines' per-entry costs are then paid per batch, which multiplies throughput under
    /// many clients and costs one client nothing. The commands of a batch are applied in order
    /// with the **same** `index`, so a state machine that uses the index as an identity (an
    /// offset, an epoch) must leave this `false` (the default). It is a property of the type:
    /// every node of a cluster frames its entries the same way, and changing it makes the
    /// existing log unreadable.
    const BATCHES: bool = false;

    /// Applies a committed command at log `index` (shared by the commands of one batch when
    /// [`BATCHES`](Self::BATCHES)).
    fn apply(&mut self, index: u64, command: Self::Command) -> Self::Response;

    /// Serializes the whole state (called between applies, so it is consistent).
    fn snapshot(&self) -> Result<Vec<u8>, String>;

    /// Replaces the whole state with a snapshot produced by [`StateMachine::snapshot`].
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;

    /// Writes the whole state to `sink` (called between applies, so it is consistent). The
    /// bytes must be what [`restore_from`](Self::restore_from) reads back. The default writes
    /// [`snapshot`](Self::snapshot)'s buffer; override it to stream a large state.
    fn snapshot_to(&self, sink: &mut dyn Write) -> Result<(), String> {
        let bytes = self.snapshot()?;
        sink.write_all(&bytes).map_err(|e| e.to_string())
    }

    /// Replaces the whole state with what [`snapshot_to`](Self::snapshot_to) (or a
    /// [`SnapshotView`]) wrote, read from `source` to its end. On an error the state may be
    /// partly replaced; the node then stops (it never applies on top of a failed restore). The
    /// default reads everything into one buffer for [`restore`](Self::restore).
    fn restore_from(&mut self, source: &mut dyn Read) -> Result<(), String> {
        let mut bytes = Vec::new();
        source
            .read_to_end(&mut bytes)
            .map_err(|e| format!("reading the snapshot: {e}"))?;
        self.restore(&bytes)
    }

    /// A point-in-time view of the state, taken between applies, that the node writes to the
    /// snapshot file on another thread while applies continue (for example an `Arc` of an
    /// immutable or persistent map: taking it must be cheap). `None` (the default): the node
    /// serializes the state with [`snapshot_to`](Self::snapshot_to) into memory between
    /// applies, which stops applies for that long and holds one more copy of the state.
    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        None
    }

    /// Builds, from a snapshot read from `source` to its end, the state it describes **aside**:
    /// without looking at or changing the live state. `Ok(Some(state))` is installed later with
    /// [`install_restored`](Self::install_restored); `Ok(None)` (the default) says this state
    /// machine does not build aside, and the node restores with
    /// [`restore_from`](Self::restore_from) when it installs the snapshot.
    ///
    /// The node calls it on a thread of its own while a snapshot sent by the leader is still
    /// arriving (`source` follows the file as its chunks land, so the restore overlaps the
    /// copy), while applies and reads of the live state go on. Obligations: from the same bytes
    /// it must build exactly the state `restore_from` would; it must read `source` to its end;
    /// an error from `source` (the transfer was abandoned) must be returned, not worked around.
    /// The node installs the result only if the snapshot arrived whole, its checksum holds over
    /// exactly the bytes read here, and the engine installs that snapshot; otherwise it drops it.
    fn restore_aside(source: &mut dyn Read) -> Result<Option<Self>, String>
    where
        Self: Sized,
    {
        let _ = source;
        Ok(None)
    }

    /// Replaces the whole state with one [`restore_aside`](Self::restore_aside) built, when the
    /// engine installs its snapshot (between applies, holding the state's write lock, so reads
    /// and applies wait for this call). The default swaps it in and drops the old state on a
    /// background thread ([`crate::process::spawn_background`]; inline if no thread can be
    /// started): freeing a large state takes about as long as building it (for a follower
    /// replacing 1 GiB, a second or more that the lock would otherwise be held). An override
    /// that keeps the old state's drop inline must accept that stall.
    fn install_restored(&mut self, restored: Self)
    where
        Self: Sized,
    {
        let old = std::mem::replace(self, restored);
        // When no thread can be started, the closure, and the old state in it, is dropped here.
        let _ = crate::process::spawn_background("state-drop", move || drop(old));
    }
}

/// A state built aside from a snapshot ([`ByteStateMachine::prepare_restore`]), waiting to be
/// installed by the state machine that built it ([`ByteStateMachine::install_prepared`]).
pub struct PreparedRestore(Box<dyn std::any::Any + Send>);

impl PreparedRestore {
    /// Wraps a state built aside.
    pub fn new<T: Send + 'static>(state: T) -> Self {
        Self(Box::new(state))
    }

    /// The state, if it is a `T`.
    pub fn downcast<T: 'static>(self) -> Result<T, Self> {
        self.0.downcast::<T>().map(|b| *b).map_err(Self)
    }
}

impl std::fmt::Debug for PreparedRestore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedRestore")
    }
}

/// A point-in-time view of a state machine's state ([`StateMachine::snapshot_view`]).
///
/// It must describe the state exactly as it was when it was taken, whatever is applied after,
/// and write the same bytes [`StateMachine::snapshot_to`] would have written then.
pub trait SnapshotView: Send + 'static {
    /// Writes the viewed state to `sink` (runs on a blocking thread, off the apply path).
    fn write_to(self: Box<Self>, sink: &mut dyn Write) -> Result<(), String>;
}

/// A view over bytes already serialized (what the node uses when a state machine has no view).
struct Serialized(Vec<u8>);

impl SnapshotView for Serialized {
    fn write_to(self: Box<Self>, sink: &mut dyn Write) -> Result<(), String> {
        sink.write_all(&self.0).map_err(|e| e.to_string())
    }
}

/// The byte-level view of a state machine that engines drive. Engines never see the user's types.
pub trait ByteStateMachine: Send + Sync + 'static {
    /// Applies an encoded command; returns the encoded outcome (the response, or a decode error
    /// that every node reaches identically).
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8>;
    /// Serializes the whole state into one buffer (small states, tests).
    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError>;
    /// Restores the whole state from one buffer.
    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError>;
    /// A point-in-time capture of the state, taken between applies (the engine holds off
    /// applies for the call only), to be written on any thread while applies continue: the
    /// state machine's own [`SnapshotView`], or its serialized bytes when it has none. The
    /// default serializes with [`snapshot`](Self::snapshot).
    fn capture(&self) -> Result<Box<dyn SnapshotView>, ConsensusError> {
        Ok(serialized_view(self.snapshot()?))
    }
    /// Replaces the whole state with a snapshot read from `source` to its end. The default
    /// reads it into one buffer for [`restore`](Self::restore).
    fn restore_from(&self, source: &mut dyn Read) -> Result<(), ConsensusError> {
        let mut bytes = Vec::new();
        source
            .read_to_end(&mut bytes)
            .map_err(|e| ConsensusError::Storage(format!("reading the snapshot: {e}")))?;
        self.restore(&bytes)
    }
    /// Builds the state of a snapshot read from `source` to its end aside, without taking the
    /// live state's lock (see [`StateMachine::restore_aside`], whose obligations hold here):
    /// `Ok(None)` when the state machine does not build aside. The default does not.
    fn prepare_restore(
        &self,
        source: &mut dyn Read,
    ) -> Result<Option<PreparedRestore>, ConsensusError> {
        let _ = source;
        Ok(None)
    }
    /// Replaces the whole state with what [`prepare_restore`](Self::prepare_restore) built.
    fn install_prepared(&self, prepared: PreparedRestore) -> Result<(), ConsensusError> {
        let _ = prepared;
        Err(ConsensusError::Internal(
            "this state machine builds no state aside".into(),
        ))
    }
}

/// The outcome of applying one command, as carried back to the proposer.
pub(crate) type ApplyOutcome<R> = Result<R, String>;

/// A user's state machine shared between the engine (which applies) and the node handle (which
/// reads after a barrier), with the index of the last command applied to it (set under the
/// write lock, so a reader holding the read lock sees the index its state reflects).
pub(crate) struct Shared<SM>(pub(crate) Arc<RwLock<SM>>, pub(crate) Arc<AtomicU64>);

impl<SM> Shared<SM> {
    pub(crate) fn new(sm: SM) -> Self {
        Self(Arc::new(RwLock::new(sm)), Arc::new(AtomicU64::new(0)))
    }
}

impl<SM> Clone for Shared<SM> {
    fn clone(&self) -> Self {
        Self(self.0.clone(), self.1.clone())
    }
}

impl<SM: StateMachine> Shared<SM> {
    /// Applies one encoded command to `sm` (write-locked by the caller); the encoded outcome.
    fn apply_one(sm: &mut SM, index: u64, command: &[u8]) -> Vec<u8> {
        let outcome: ApplyOutcome<SM::Response> = match codec::decode::<SM::Command>(command) {
            Ok(cmd) => Ok(sm.apply(index, cmd)),
            Err(e) => Err(format!(
                "command at index {index} could not be decoded: {e}"
            )),
        };
        // Encoding our own response type cannot fail short of a serde bug; keep it deterministic.
        codec::encode(&outcome).unwrap_or_default()
    }
}

impl<SM: StateMachine> ByteStateMachine for Shared<SM> {
    fn apply(&self, index: u64, command: &[u8]) -> Vec<u8> {
        if !SM::BATCHES {
            let mut sm = self.0.write();
            self.1.fetch_max(index, Ordering::SeqCst);
            return Self::apply_one(&mut sm, index, command);
        }
        // A malformed batch (only a hostile or broken proposer makes one) applies nothing, on
        // every node alike; its proposer gets no parts back and reports the batch failed.
        let Ok(parts) = crate::batch::split(command) else {
            self.1.fetch_max(index, Ordering::SeqCst);
            return crate::batch::encode(std::iter::empty());
        };
        let mut sm = self.0.write();
        self.1.fetch_max(index, Ordering::SeqCst);
        let outcomes: Vec<Vec<u8>> = parts
            .into_iter()
            .map(|c| Self::apply_one(&mut sm, index, c))
            .collect();
        drop(sm);
        crate::batch::encode(outcomes.iter().map(Vec::as_slice))
    }

    fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
        self.0
            .read()
            .snapshot()
            .map_err(|e| ConsensusError::Internal(format!("state machine snapshot failed: {e}")))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
        self.0
            .write()
            .restore(snapshot)
            .map_err(|e| ConsensusError::Storage(format!("state machine restore failed: {e}")))
    }

    fn capture(&self) -> Result<Box<dyn SnapshotView>, ConsensusError> {
        let sm = self.0.read();
        if let Some(view) = sm.snapshot_view() {
            return Ok(view);
        }
        let mut bytes = Vec::new();
        sm.snapshot_to(&mut bytes)
            .map_err(|e| ConsensusError::Internal(format!("state machine snapshot failed: {e}")))?;
        Ok(Box::new(Serialized(bytes)))
    }

    fn restore_from(&self, source: &mut dyn Read) -> Result<(), ConsensusError> {
        self.0
            .write()
            .restore_from(source)
            .map_err(|e| ConsensusError::Storage(format!("state machine restore failed: {e}")))
    }

    fn prepare_restore(
        &self,
        source: &mut dyn Read,
    ) -> Result<Option<PreparedRestore>, ConsensusError> {
        SM::restore_aside(source)
            .map(|built| built.map(PreparedRestore::new))
            .map_err(|e| ConsensusError::Storage(format!("state machine restore failed: {e}")))
    }

    fn install_prepared(&self, prepared: PreparedRestore) -> Result<(), ConsensusError> {
        let state = prepared.downcast::<SM>().map_err(|_| {
            ConsensusError::Internal("a state built aside by another state machine".into())
        })?;
        self.0.write().install_restored(state);
        Ok(())
    }
}

/// A [`SnapshotView`] over bytes that are already serialized: what a [`ByteStateMachine`]
/// without a view of its own returns from [`ByteStateMachine::capture`].
pub fn serialized_view(bytes: Vec<u8>) -> Box<dyn SnapshotView> {
    Box::new(Serialized(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch;

    /// Appends each command to a list, with the index it was applied at.
    #[derive(Default)]
    struct Listing(Vec<(u64, String)>);

    impl StateMachine for Listing {
        type Command = String;
        type Response = usize;
        const BATCHES: bool = true;

        fn apply(&mut self, index: u64, command: String) -> usize {
            self.0.push((index, command));
            self.0.len()
        }
        fn snapshot(&self) -> Result<Vec<u8>, String> {
            Ok(Vec::new())
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
    }

    /// A state that reports, when dropped, the name of the thread dropping it.
    struct Reporting(Option<std::sync::mpsc::Sender<Option<String>>>);

    impl Drop for Reporting {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(std::thread::current().name().map(str::to_string));
            }
        }
    }

    impl StateMachine for Reporting {
        type Command = ();
        type Response = ();
        fn apply(&mut self, _: u64, _: ()) {}
        fn snapshot(&self) -> Result<Vec<u8>, String> {
            Ok(Vec::new())
        }
        fn restore(&mut self, _: &[u8]) -> Result<(), String> {
            Ok(())
        }
    }

    #[test]
    fn a_state_replaced_by_one_built_aside_is_freed_off_the_installing_thread() {
        let (tx, rx) = std::sync::mpsc::channel();
        let sm = Shared::new(Reporting(Some(tx)));
        sm.install_prepared(PreparedRestore::new(Reporting(None)))
            .expect("installed");
        let dropped_on = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the old state was never dropped");
        assert_eq!(dropped_on.as_deref(), Some("state-drop"));
        assert!(sm.0.read().0.is_none(), "the new state is in place");
    }

    #[test]
    fn a_batch_applies_in_order_at_one_index_and_a_malformed_one_applies_nothing() {
        let sm = Shared::new(Listing::default());
        let cmds: Vec<Vec<u8>> = ["a", "b", "c"]
            .iter()
            .map(|c| codec::encode(&c.to_string()).expect("encode"))
            .collect();
        let out = sm.apply(7, &batch::encode(cmds.iter().map(Vec::as_slice)));
        let parts = batch::split(&out).expect("framed outcome");
        let answers: Vec<ApplyOutcome<usize>> = parts
            .iter()
            .map(|p| codec::decode(p).expect("outcome"))
            .collect();
        assert_eq!(answers, vec![Ok(1), Ok(2), Ok(3)]);
        let applied: Vec<(u64, String)> = sm.0.read().0.clone();
        assert_eq!(
            applied,
            vec![(7, "a".into()), (7, "b".into()), (7, "c".into())]
        );
        // A command alone (not framed as a batch) or garbage: nothing applied, no parts back.
        for bad in [&cmds[0][..], &[0xff; 9][..]] {
            let out = sm.apply(8, bad);
            assert_eq!(batch::split(&out).expect("framed"), Vec::<&[u8]>::new());
        }
        assert_eq!(sm.0.read().0.len(), 3);
        assert_eq!(sm.1.load(Ordering::SeqCst), 8);
    }
}
