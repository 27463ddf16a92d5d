//! The Ready cycle and the apply loop at its centre: what to send before and after the disk,
//! what to persist, what to apply and which waiters that completes. The order is in the
//! [module docs](super).

use consensus_api::ConsensusError;
use raft::eraftpb::{Entry, EntryType, Message};
use tokio::sync::mpsc;

use super::{Core, COMMAND_CONTEXT};

/// A Ready's writes became durable (or failed): what [`Core::persisted`] needs.
pub(crate) struct Persisted {
    number: u64,
    messages: Vec<Message>,
    outcome: Result<(), String>,
}

/// Where durability notices arrive; the driver waits on it next to its other inputs.
pub(crate) type PersistEvents = mpsc::UnboundedReceiver<Persisted>;

impl Core {
    /// Handles one Ready without waiting for the disk (see the module docs). `false`: there was
    /// nothing to do.
    pub(crate) fn cycle(&mut self) -> Result<bool, ConsensusError> {
        if !self.raw.has_ready() {
            return Ok(false);
        }
        let storage = |e: raft::Error| ConsensusError::Storage(e.to_string());
        let mut rd = self.raw.ready();
        self.outbox.extend(rd.take_messages());
        if !rd.snapshot().is_empty() {
            self.install_snapshot(rd.snapshot().clone())?;
        }
        self.apply(rd.take_committed_entries())?;
        self.waiters.complete_reads(rd.take_read_states());
        if !rd.entries().is_empty() {
            self.raw.mut_store().append(rd.entries()).map_err(storage)?;
        }
        if let Some(hs) = rd.hs() {
            self.raw.mut_store().set_hard_state(hs).map_err(storage)?;
        }
        // raft-rs: without new entries, a snapshot, or a new term or vote (a hard state that
        // only moved the commit index), the write may complete asynchronously: it rides on the
        // next sync instead of holding this Ready's messages back.
        let wrote = rd.must_sync();
        let number = rd.number();
        let messages = rd.take_persisted_messages();
        self.raw.advance_append_async(rd);
        self.report_applied();
        if wrote || self.in_flight > 0 {
            let tx = self.persist_tx.clone();
            self.raw
                .store()
                .on_durable(Box::new(move |outcome| {
                    let _ = tx.send(Persisted {
                        number,
                        messages,
                        outcome,
                    });
                }))
                .map_err(storage)?;
            self.in_flight += 1;
        } else {
            // Nothing written and nothing in flight: durable already.
            self.outbox.extend(messages);
            self.raw.on_persist_ready(number);
        }
        self.maybe_snapshot()?;
        self.after_progress();
        Ok(true)
    }

    /// Readies whose writes are not yet known durable.
    #[cfg(test)]
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A Ready's writes are durable: its persisted messages may leave, and raft-rs learns how
    /// far the log is stable (for a leader, its own vote towards the commit index).
    pub(crate) fn persisted(&mut self, p: Persisted) -> Result<(), ConsensusError> {
        self.in_flight = self.in_flight.saturating_sub(1);
        p.outcome.map_err(ConsensusError::Storage)?;
        self.outbox.extend(p.messages);
        self.raw.on_persist_ready(p.number);
        self.report_applied();
        Ok(())
    }

    /// Tells raft-rs what the state machine has applied, as far as raft-rs allows: an installed
    /// snapshot counts only once its Ready is persisted.
    fn report_applied(&mut self) {
        let log = &self.raw.raft.raft_log;
        let to = self.applied.min(log.persisted).min(log.committed);
        if to > log.applied {
            self.raw.advance_apply_to(to);
        }
    }

    /// Applies committed entries in order (skipping what a snapshot already covers) and
    /// completes the proposals they answer.
    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), ConsensusError> {
        for e in entries {
            if e.index <= self.applied {
                continue;
            }
            self.pacer.applied(e.data.len());
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    let out = (e.context.as_ref() == COMMAND_CONTEXT)
                        .then(|| self.sm.apply(e.index, &e.data));
                    self.applied = e.index;
                    self.waiters.command_applied(e.index, e.term, out);
                }
                EntryType::EntryConfChange | EntryType::EntryConfChangeV2 => {
                    let outcome = self.apply_conf(&e);
                    self.applied = e.index;
                    self.waiters.conf_applied(e.index, e.term, &outcome);
                }
            }
        }
        Ok(())
    }

    /// Housekeeping after anything moved: waiters that depend on the role, learner catch-up,
    /// and leaving a joint configuration a previous leader entered.
    pub(super) fn after_progress(&mut self) {
        if !self.is_leader() {
            self.waiters.not_leading(self.leader_hint());
            return;
        }
        self.membership_progress();
    }
}
