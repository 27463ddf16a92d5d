//! Snapshots: when to take one (the [`SnapshotPacer`](consensus_api::backend_support::SnapshotPacer), raft-rs
//! asking for a fresher one to send, or `snapshot_now`), taking it between applies, writing it
//! off the driver ([`SaveJob`]), compacting after it, and installing one a leader sent.

use consensus_api::ConsensusError;
use raft::eraftpb::Snapshot;

use super::waiters::Reply;
use super::Core;
use crate::mapping;
use crate::storage::{SnapshotData, SnapshotWriter};

/// A snapshot to make durable off the driver: run [`SaveJob::run`] anywhere, then hand the job
/// back to [`Core::snapshot_saved`].
pub(crate) struct SaveJob {
    snap: Snapshot,
    compact_to: u64,
    writer: SnapshotWriter,
}

impl SaveJob {
    /// Writes the snapshot file with fsync (blocking).
    pub(crate) fn run(&self) -> Result<(), String> {
        self.writer
            .save(&self.snap)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Core {
    /// Asks for a snapshot covering everything applied now; `reply` gets the snapshot's index
    /// once its file is durable and the log compacted.
    pub(crate) fn snapshot_now(&mut self, reply: Reply<u64>) {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_none() && self.applied <= snap_index {
            let to = snap_index.saturating_sub(self.settings.keep_logs_after_snapshot);
            let r = self
                .raw
                .mut_store()
                .compact(to)
                .map(|()| snap_index)
                .map_err(|e| mapping::raft(e, None));
            self.waiters.later(reply, r);
            return;
        }
        self.waiters.snapshot_requested(self.applied, reply);
        if let Err(e) = self.start_snapshot() {
            self.waiters.snapshots_failed(&e);
        }
    }

    /// Snapshots when the pacer says so, or when raft-rs asked for a fresher snapshot to send.
    pub(super) fn maybe_snapshot(&mut self) -> Result<(), ConsensusError> {
        let requested = self.raw.store().take_snapshot_request();
        if requested || self.pacer.due() {
            self.start_snapshot()?;
        }
        Ok(())
    }

    /// Takes the state machine's snapshot at the applied index (it must be consistent, so here,
    /// between applies) and hands writing it to [`Core::take_save_job`]'s taker; one at a time.
    fn start_snapshot(&mut self) -> Result<(), ConsensusError> {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_some() || self.applied <= snap_index {
            return Ok(());
        }
        let applied = self.applied;
        let term = self
            .raw
            .raft
            .raft_log
            .term(applied)
            .map_err(|e| mapping::raft(e, None))?;
        let data = SnapshotData::encode(self.book.known(), &self.sm.snapshot()?)?;
        self.pacer.taken(data.len());
        let mut snap = Snapshot::default();
        snap.mut_metadata().set_conf_state(self.conf_state());
        snap.mut_metadata().index = applied;
        snap.mut_metadata().term = term;
        snap.data = data.into();
        self.saving = Some(applied);
        self.save_job = Some(SaveJob {
            snap,
            compact_to: applied.saturating_sub(self.settings.keep_logs_after_snapshot),
            writer: self.raw.store().snapshot_writer(),
        });
        Ok(())
    }

    /// A snapshot to write off the driver (file + fsync), if one was started.
    pub(crate) fn take_save_job(&mut self) -> Option<SaveJob> {
        self.save_job.take()
    }

    /// The outcome of a [`SaveJob`]: record the snapshot, compact, answer the waiters it
    /// covers, and start the next one if a waiter needs a newer snapshot.
    pub(crate) fn snapshot_saved(&mut self, job: SaveJob, outcome: Result<(), String>) {
        self.saving = None;
        let index = job.snap.get_metadata().index;
        let recorded = outcome.map_err(ConsensusError::Storage).and_then(|()| {
            self.raw
                .mut_store()
                .snapshot_saved(job.snap, job.compact_to)
                .map_err(|e| mapping::raft(e, None))
        });
        if let Err(e) = recorded {
            tracing::warn!(id = self.id, index, "snapshot not saved: {e}");
            self.waiters.snapshots_failed(&e);
            return;
        }
        tracing::debug!(id = self.id, index, "took a snapshot");
        if self.waiters.snapshot_taken(index) {
            if let Err(e) = self.start_snapshot() {
                self.waiters.snapshots_failed(&e);
            }
        }
    }

    /// Installs a snapshot a leader sent (it arrived in a Ready): the state machine, the
    /// storage and the address book take its contents; proposals it covers fail.
    pub(super) fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), ConsensusError> {
        let (index, term) = {
            let m = snap.get_metadata();
            (m.index, m.term)
        };
        let (book, state) = SnapshotData::decode(&snap.data)?;
        self.sm.restore(state)?;
        self.raw
            .mut_store()
            .apply_snapshot(snap)
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        tracing::info!(id = self.id, index, term, "installed a snapshot");
        self.applied = index;
        self.book.replace(book);
        self.waiters.discard_through(index);
        Ok(())
    }
}
