//! Waiters: the proposals, reads and membership changes a node answers later, and the rules
//! that complete or fail them (an applied entry at the waited index and term completes a
//! proposal; a different term there, or a lost leadership, fails it).

use consensus_api::{ConsensusError, NodeId};
use raft::ReadState;
use tokio::sync::oneshot;

use crate::mapping;

use super::*;

/// Where the answer to a request goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ConsensusError>>;

pub(super) enum Pending {
    Command {
        term: u64,
        reply: Reply<Vec<u8>>,
    },
    Conf {
        term: u64,
        reply: Reply<()>,
        learner: Option<NodeId>,
    },
}

impl Pending {
    fn term(&self) -> u64 {
        match self {
            Pending::Command { term, .. } | Pending::Conf { term, .. } => *term,
        }
    }

    fn fail(self, e: ConsensusError) {
        match self {
            Pending::Command { reply, .. } => {
                let _ = reply.send(Err(e));
            }
            Pending::Conf { reply, .. } => {
                let _ = reply.send(Err(e));
            }
        }
    }
}

pub(super) struct PendingRead {
    pub(super) reply: Reply<u64>,
    pub(super) issued_tick: u64,
}

pub(super) fn not_leader_hint(leader: u64, me: NodeId) -> Option<NodeId> {
    (leader != raft::INVALID_ID && leader != me).then_some(leader)
}

pub(super) fn discarded() -> ConsensusError {
    // Same kind as the openraft backend's `LogEntryDiscarded`: the caller cannot tell whether
    // another leader's log holds an equal command, so the outcome counts as unknown.
    ConsensusError::Timeout(
        "the proposal's outcome (leadership moved before it committed and its entry was replaced)"
            .into(),
    )
}

impl Core {
    pub(super) fn later<T: Send + 'static>(
        &mut self,
        reply: Reply<T>,
        v: Result<T, ConsensusError>,
    ) {
        self.deferred.push(Box::new(move || {
            let _ = reply.send(v);
        }));
    }

    pub(super) fn fail_later(&mut self, p: Pending, e: ConsensusError) {
        match p {
            Pending::Command { reply, .. } => self.later(reply, Err(e)),
            Pending::Conf { reply, .. } => self.later(reply, Err(e)),
        }
    }

    /// Proposes a user command; `reply` gets the state machine's answer once it is applied.
    pub(crate) fn propose(&mut self, command: Vec<u8>, reply: Reply<Vec<u8>>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        if command.len() > self.settings.max_command_bytes {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "command of {} bytes exceeds the limit of {} (half the transport frame limit)",
                command.len(),
                self.settings.max_command_bytes
            ))));
            return;
        }
        match self.raw.propose(COMMAND_CONTEXT.to_vec(), command) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                self.pending.insert(index, Pending::Command { term, reply });
            }
            Err(e) => {
                let _ = reply.send(Err(mapping::raft(e, self.leader_hint())));
            }
        }
    }

    /// Starts a linearizable read: `reply` gets the read index once a quorum confirmed this
    /// node still leads.
    pub(crate) fn read_index(&mut self, reply: Reply<u64>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        let ctx = self.next_read;
        self.next_read += 1;
        self.raw.read_index(ctx.to_be_bytes().to_vec());
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                issued_tick: self.ticks,
            },
        );
    }

    pub(super) fn complete_reads(&mut self, states: Vec<ReadState>) {
        for rs in states {
            let Ok(ctx) = <[u8; 8]>::try_from(rs.request_ctx.as_slice()) else {
                continue;
            };
            if let Some(r) = self.reads.remove(&u64::from_be_bytes(ctx)) {
                self.later(r.reply, Ok(rs.index));
            }
        }
    }

    /// Takes the proposal at `index` if it was made in `term`; proposals below it (or made in
    /// another term at it) were replaced by another leader's entries and fail.
    pub(super) fn take_pending(&mut self, index: u64, term: u64) -> Option<Pending> {
        let mut found = None;
        while let Some(e) = self.pending.first_entry() {
            if *e.key() > index {
                break;
            }
            let at = *e.key();
            let p = e.remove();
            if at == index && p.term() == term {
                found = Some(p);
            } else {
                self.fail_later(p, discarded());
            }
        }
        found
    }

    /// Fails every waiting request (the node is stopping or its storage failed).
    pub(crate) fn fail_all(&mut self, e: &ConsensusError) {
        self.deliver();
        for (_, p) in std::mem::take(&mut self.pending) {
            p.fail(e.clone());
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            let _ = r.reply.send(Err(e.clone()));
        }
        for r in self.joint_waits.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        for (_, _, r) in self.learner_waits.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
        for (_, r) in self.snapshot_waiters.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
    }
}
