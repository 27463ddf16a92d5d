//! Snapshots: when to take one (the [`SnapshotPacer`](consensus_api::backend_support::SnapshotPacer), raft-rs
//! asking for a fresher one to send, or `snapshot_now`), capturing the state between applies
//! (a point-in-time view: applies go on while it is written), writing the file off the driver
//! ([`SaveJob`]), compacting after it, and installing a file a leader streamed to us (with the
//! state built aside while it arrived, when the state machine does that).

use std::collections::BTreeMap;

use consensus_api::{ConsensusError, NodeId, SnapshotView};
use consensus_storage::SnapshotFile;
use raft::eraftpb::{Message, MessageType, Snapshot, SnapshotMetadata};

use super::waiters::Reply;
use super::Core;
use crate::mapping;
use crate::storage::{SnapshotData, SnapshotWriter, Streamable};

/// A snapshot to write off the driver: run [`SaveJob::run`] anywhere (it streams the captured
/// state into the file and installs it), then hand the job back to [`Core::snapshot_saved`].
pub(crate) struct SaveJob {
    meta: SnapshotMetadata,
    addresses: BTreeMap<NodeId, String>,
    view: Option<Box<dyn SnapshotView>>,
    compact_to: u64,
    writer: SnapshotWriter,
    /// The installed file, once run (`None` if a newer snapshot overtook it).
    file: Option<SnapshotFile>,
}

impl SaveJob {
    /// Writes and installs the snapshot file with fsync (blocking).
    pub(crate) fn run(&mut self) -> Result<(), String> {
        let view = self
            .view
            .take()
            .ok_or_else(|| "snapshot job already run".to_string())?;
        self.file = self.writer.build(&self.meta, &self.addresses, view)?;
        Ok(())
    }
}

/// Snapshot files kept for snapshot messages stepped but not yet installed.
const MAX_PENDING_SNAPSHOT_FILES: usize = 4;

impl Core {
    /// Asks for a snapshot covering everything applied now; `reply` gets the snapshot's index
    /// once its file is durable and the log compacted.
    pub(crate) fn snapshot_now(&mut self, reply: Reply<u64>) {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_none() && self.applied <= snap_index {
            let to = self.compact_bound(snap_index);
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

    /// Snapshots when the pacer says so; captures one to stream when raft-rs asked for a
    /// fresher snapshot to send.
    pub(super) fn maybe_snapshot(&mut self) -> Result<(), ConsensusError> {
        if self.raw.store().take_snapshot_request() {
            self.capture_for_peer()?;
        }
        if self.pacer.due() {
            self.start_snapshot()?;
        }
        Ok(())
    }

    /// A peer needs a snapshot the stored one cannot serve (taken before the peer joined, or
    /// older than it needs): a point-in-time view of the state at the applied index, which the
    /// driver streams to it from memory. Nothing is written here: building a file first (as
    /// this did before) wrote the whole state to this node's disk (5 s for 1 GiB on a slow
    /// disk) before the copy could start.
    fn capture_for_peer(&mut self) -> Result<(), ConsensusError> {
        let (meta, view) = self.capture()?;
        let applied = meta.index;
        let mut snapshot = Snapshot::default();
        snapshot.set_metadata(meta);
        self.raw.store().set_streamable(Streamable {
            snapshot,
            book: self.book.known().clone(),
            view,
        });
        tracing::debug!(
            id = self.id,
            index = applied,
            "captured a snapshot to stream to a peer"
        );
        Ok(())
    }

    /// Takes the state machine's snapshot at the applied index (it must be consistent, so here,
    /// between applies) and hands writing it to [`Core::take_save_job`]'s taker; one at a time.
    fn start_snapshot(&mut self) -> Result<(), ConsensusError> {
        let (snap_index, _) = self.raw.store().snapshot_position();
        if self.saving.is_some() || self.applied <= snap_index {
            return Ok(());
        }
        let (meta, view) = self.capture()?;
        let applied = meta.index;
        let last_size = self
            .raw
            .store()
            .snapshot_file()
            .map(|f| f.data_len())
            .unwrap_or(0);
        self.pacer.taken(last_size as usize);
        self.saving = Some(applied);
        self.save_job = Some(SaveJob {
            meta,
            addresses: self.book.known().clone(),
            view: Some(view),
            compact_to: self.compact_bound(applied),
            writer: self.raw.store().snapshot_writer(),
            file: None,
        });
        Ok(())
    }

    /// The state at the applied index (call it between applies) and the snapshot metadata that
    /// describes it.
    fn capture(&self) -> Result<(SnapshotMetadata, Box<dyn SnapshotView>), ConsensusError> {
        let applied = self.applied;
        let term = self
            .raw
            .raft
            .raft_log
            .term(applied)
            .map_err(|e| mapping::raft(e, None))?;
        // Cheap for a state machine with a view; a copy in memory for one without.
        let view = self.sm.capture()?;
        let mut meta = SnapshotMetadata::default();
        meta.set_conf_state(self.conf_state());
        meta.index = applied;
        meta.term = term;
        Ok((meta, view))
    }

    /// Where the log is compacted to behind a snapshot at `snap`: keeping at most
    /// `keep_logs_after_snapshot` entries and `keep_log_bytes_after_snapshot` bytes of them.
    fn compact_bound(&self, snap: u64) -> u64 {
        let by_count = snap.saturating_sub(self.settings.keep_logs_after_snapshot);
        let by_bytes = self
            .raw
            .store()
            .log()
            .purge_bound_keeping(snap, self.settings.keep_log_bytes_after_snapshot)
            .unwrap_or(0);
        by_count.max(by_bytes).min(snap)
    }

    /// A snapshot to write off the driver (file + fsync), if one was started.
    pub(crate) fn take_save_job(&mut self) -> Option<SaveJob> {
        self.save_job.take()
    }

    /// The outcome of a [`SaveJob`]: record the snapshot, compact, answer the waiters it
    /// covers, and start the next one if a waiter needs a newer snapshot.
    pub(crate) fn snapshot_saved(&mut self, job: SaveJob, outcome: Result<(), String>) {
        self.saving = None;
        let index = job.meta.index;
        let recorded = outcome.map_err(ConsensusError::Storage).and_then(|()| {
            let Some(file) = job.file else {
                // Overtaken by a newer snapshot (installed from the leader): nothing to record.
                return Ok(());
            };
            self.pacer.sized(file.data_len());
            self.raw
                .mut_store()
                .snapshot_saved(job.meta, file, job.compact_to)
                .map_err(|e| mapping::raft(e, None))
        });
        if let Err(e) = recorded {
            tracing::warn!(id = self.id, index, "snapshot not saved: {e}");
            self.waiters.snapshots_failed(&e);
            return;
        }
        // A view captured for a peer and not yet sent is older than this file now.
        self.raw.store().drop_streamable();
        tracing::debug!(id = self.id, index, "took a snapshot");
        if self.waiters.snapshot_taken(index) {
            if let Err(e) = self.start_snapshot() {
                self.waiters.snapshots_failed(&e);
            }
        }
    }

    /// Steps a leader's `MsgSnapshot` whose file has arrived complete and checked (`file`,
    /// from the transfer): raft-rs decides whether to take it; if it does, the next Ready
    /// installs this file (kept with any other pending one, see `Core::incoming`).
    pub(crate) fn step_snapshot(&mut self, msg: Message, file: SnapshotFile) {
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return self.step(msg);
        }
        if self.refuse(&msg) {
            return;
        }
        let m = msg.get_snapshot().get_metadata();
        // A few at most: every install drops the files at or below it.
        while self.incoming.len() >= MAX_PENDING_SNAPSHOT_FILES {
            self.incoming.pop_first();
        }
        self.incoming.insert((m.index, m.term), file);
        self.step(msg);
    }

    /// Installs a snapshot a leader sent (it arrived in a Ready): the file received for it is
    /// installed durably, then the state machine (streamed from the file), the storage and the
    /// address book take its contents; proposals it covers fail.
    pub(super) fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), ConsensusError> {
        let (index, term) = {
            let m = snap.get_metadata();
            (m.index, m.term)
        };
        let Some(file) = self.incoming.remove(&(index, term)) else {
            return Err(ConsensusError::Storage(format!(
                "raft-rs installs snapshot {index} (term {term}) but its file never arrived"
            )));
        };
        // Files of older snapshots can no longer be installed.
        self.incoming.retain(|(i, _), _| *i > index);
        let mut meta = snap.get_metadata().clone();
        meta.index = index;
        self.raw
            .mut_store()
            .install_file(meta, file.clone())
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let mut source = file.data();
        let book = SnapshotData::read_book(&mut source)?;
        // The state built aside while the file arrived, if any (see consensus_storage::aside):
        // installing it is a swap, where restoring 1 GiB from the file held the driver ~2 s.
        match file.take_prepared().and_then(|p| p.wait(&file)) {
            Some(state) => self.sm.install_prepared(state)?,
            None => self.sm.restore_from(&mut source)?,
        }
        self.pacer.taken(file.data_len() as usize);
        tracing::info!(
            id = self.id,
            index,
            term,
            bytes = file.len(),
            "installed a snapshot"
        );
        self.applied = index;
        self.book.replace(book);
        self.waiters.discard_through(index);
        Ok(())
    }
}
