//! Requests waiting on the log and the rules that complete them: a proposal by the entry at its
//! index (and term), a read by its read state, a membership change by leaving a joint
//! configuration, a `snapshot_now` by a snapshot that covers it.
//!
//! Answers are not sent when decided: they queue until [`Waiters::deliver`], which the driver
//! calls after publishing the status that reflects them, so a client that sees its answer also
//! sees the new status.

use std::collections::BTreeMap;

use consensus_api::{ConsensusError, NodeId};
use raft::eraftpb::ConfState;
use raft::ReadState;
use tokio::sync::oneshot;

use super::membership::is_joint;

/// Where the answer to a request goes.
pub(crate) type Reply<T> = oneshot::Sender<Result<T, ConsensusError>>;

/// A proposal waiting for its entry to apply.
enum Pending {
    Command { term: u64, reply: Reply<Vec<u8>> },
    Conf { term: u64, reply: Reply<()> },
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

struct PendingRead {
    reply: Reply<u64>,
    /// The tick the read-index request was last issued at.
    issued_tick: u64,
}

/// The error for a proposal whose entry another leader replaced.
pub(super) fn discarded() -> ConsensusError {
    // Same kind as the openraft backend's `LogEntryDiscarded`: the caller cannot tell whether
    // another leader's log holds an equal command, so the outcome counts as unknown.
    ConsensusError::Timeout(
        "the proposal's outcome (leadership moved before it committed and its entry was replaced)"
            .into(),
    )
}

/// Every request waiting on this node, and the answers decided but not yet delivered.
pub(crate) struct Waiters {
    /// Proposals by log index.
    pending: BTreeMap<u64, Pending>,
    /// Membership changes that entered a joint configuration, waiting for it to be left.
    joint: Vec<Reply<()>>,
    /// Read-index requests by their context number.
    reads: BTreeMap<u64, PendingRead>,
    next_read: u64,
    /// `snapshot_now` callers: the applied index when they asked, and where the answer goes.
    snapshots: Vec<(u64, Reply<u64>)>,
    /// Answers decided, sent by [`Waiters::deliver`].
    deferred: Vec<Box<dyn FnOnce() + Send>>,
}

impl Default for Waiters {
    fn default() -> Self {
        Self {
            pending: BTreeMap::new(),
            joint: Vec::new(),
            reads: BTreeMap::new(),
            next_read: 1,
            snapshots: Vec::new(),
            deferred: Vec::new(),
        }
    }
}

impl Waiters {
    /// Queues an answer for the next [`Waiters::deliver`].
    pub(super) fn later<T: Send + 'static>(
        &mut self,
        reply: Reply<T>,
        v: Result<T, ConsensusError>,
    ) {
        self.deferred.push(Box::new(move || {
            let _ = reply.send(v);
        }));
    }

    fn fail_later(&mut self, p: Pending, e: ConsensusError) {
        match p {
            Pending::Command { reply, .. } => self.later(reply, Err(e)),
            Pending::Conf { reply, .. } => self.later(reply, Err(e)),
        }
    }

    /// Sends the answers decided so far, in the order they were decided.
    pub(super) fn deliver(&mut self) {
        for f in self.deferred.drain(..) {
            f();
        }
    }

    /// A command entered the log at `index` in `term`.
    pub(super) fn command_proposed(&mut self, index: u64, term: u64, reply: Reply<Vec<u8>>) {
        self.pending.insert(index, Pending::Command { term, reply });
    }

    /// A membership change entered the log at `index` in `term`.
    pub(super) fn conf_proposed(&mut self, index: u64, term: u64, reply: Reply<()>) {
        self.pending.insert(index, Pending::Conf { term, reply });
    }

    /// Takes the proposal at `index` if it was made in `term`; proposals below it (or made in
    /// another term at it) were replaced by another leader's entries and fail.
    fn take(&mut self, index: u64, term: u64) -> Option<Pending> {
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

    /// A snapshot up to `index` replaced the log: proposals at or below it cannot be told
    /// apart from another leader's entries and fail.
    pub(super) fn discard_through(&mut self, index: u64) {
        while let Some(e) = self.pending.first_entry() {
            if *e.key() > index {
                break;
            }
            let p = e.remove();
            self.fail_later(p, discarded());
        }
    }

    /// A normal entry applied; `out` is the state machine's answer (`None`: not a user
    /// command, such as a new leader's empty entry).
    pub(super) fn command_applied(&mut self, index: u64, term: u64, out: Option<Vec<u8>>) {
        match self.take(index, term) {
            Some(Pending::Command { reply, .. }) => self.later(reply, Ok(out.unwrap_or_default())),
            Some(other) => self.fail_later(
                other,
                ConsensusError::Internal(
                    "a membership change was answered by a command entry".into(),
                ),
            ),
            None => {}
        }
    }

    /// A membership entry applied with `outcome`. Its change completes now, or once the joint
    /// configuration it entered is left; a configuration that is not joint completes every
    /// joint waiter. (An added learner's catching up is not waited for: the status shows it.)
    pub(super) fn conf_applied(
        &mut self,
        index: u64,
        term: u64,
        outcome: &Result<ConfState, ConsensusError>,
    ) {
        match (self.take(index, term), outcome) {
            (Some(Pending::Conf { reply, .. }), Ok(cs)) => {
                if is_joint(cs) {
                    self.joint.push(reply);
                } else {
                    self.later(reply, Ok(()));
                }
            }
            (Some(p), Err(err)) => self.fail_later(p, err.clone()),
            (Some(other), Ok(_)) => self.fail_later(
                other,
                ConsensusError::Internal("a command was answered by a membership entry".into()),
            ),
            (None, _) => {}
        }
        if outcome.as_ref().is_ok_and(|cs| !is_joint(cs)) {
            for r in std::mem::take(&mut self.joint) {
                self.later(r, Ok(()));
            }
        }
    }

    /// Registers a read issued at tick `now`; returns the context to hand raft-rs.
    pub(super) fn read_started(&mut self, reply: Reply<u64>, now: u64) -> Vec<u8> {
        let ctx = self.next_read;
        self.next_read += 1;
        self.reads.insert(
            ctx,
            PendingRead {
                reply,
                issued_tick: now,
            },
        );
        ctx.to_be_bytes().to_vec()
    }

    /// Contexts of reads unanswered for `retry` ticks, marked as re-issued at `now`: raft-rs
    /// drops a read-index request silently while a new leader has not committed in its term.
    pub(super) fn reads_to_retry(&mut self, now: u64, retry: u64) -> Vec<Vec<u8>> {
        let mut due = Vec::new();
        for (ctx, r) in self.reads.iter_mut() {
            if now - r.issued_tick >= retry {
                r.issued_tick = now;
                due.push(ctx.to_be_bytes().to_vec());
            }
        }
        due
    }

    /// Answers the reads raft-rs confirmed, with their read index.
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

    /// This node does not lead: reads fail with the hint.
    pub(super) fn not_leading(&mut self, leader: Option<NodeId>) {
        for (_, r) in std::mem::take(&mut self.reads) {
            self.later(r.reply, Err(ConsensusError::NotLeader { leader }));
        }
    }

    /// A `snapshot_now` caller who needs a snapshot covering `applied`.
    pub(super) fn snapshot_requested(&mut self, applied: u64, reply: Reply<u64>) {
        self.snapshots.push((applied, reply));
    }

    /// A snapshot up to `index` is durable: answers the callers it covers. Whether any still
    /// need a newer one.
    pub(super) fn snapshot_taken(&mut self, index: u64) -> bool {
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.snapshots)
            .into_iter()
            .partition(|(min, _)| *min <= index);
        for (_, r) in done {
            self.later(r, Ok(index));
        }
        self.snapshots = waiting;
        !self.snapshots.is_empty()
    }

    /// Fails every `snapshot_now` caller.
    pub(super) fn snapshots_failed(&mut self, e: &ConsensusError) {
        for (_, r) in std::mem::take(&mut self.snapshots) {
            self.later(r, Err(e.clone()));
        }
    }

    /// Delivers what was decided, then fails everything still waiting, at once.
    pub(super) fn fail_all(&mut self, e: &ConsensusError) {
        self.deliver();
        // Proposed entries and membership changes are in the log: they may still commit.
        let handed = e.clone().after_handoff();
        for (_, p) in std::mem::take(&mut self.pending) {
            p.fail(handed.clone());
        }
        for (_, r) in std::mem::take(&mut self.reads) {
            let _ = r.reply.send(Err(e.clone()));
        }
        for r in self.joint.drain(..) {
            let _ = r.send(Err(handed.clone()));
        }
        for (_, r) in self.snapshots.drain(..) {
            let _ = r.send(Err(e.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus_api::ErrorKind;
    use oneshot::error::TryRecvError;

    type Answer<T> = oneshot::Receiver<Result<T, ConsensusError>>;

    fn reply<T>() -> (Reply<T>, Answer<T>) {
        oneshot::channel()
    }

    fn kind<T: std::fmt::Debug>(rx: &mut Answer<T>) -> ErrorKind {
        rx.try_recv()
            .expect("answered")
            .expect_err("an error")
            .kind()
    }

    fn unanswered<T>(rx: &mut Answer<T>) -> bool {
        matches!(rx.try_recv(), Err(TryRecvError::Empty))
    }

    fn conf(voters: &[u64], outgoing: &[u64]) -> Result<ConfState, ConsensusError> {
        Ok(ConfState {
            voters: voters.to_vec(),
            voters_outgoing: outgoing.to_vec(),
            ..Default::default()
        })
    }

    #[test]
    fn answers_are_sent_only_on_deliver() {
        let mut w = Waiters::default();
        let (tx, mut rx) = reply();
        w.command_proposed(5, 2, tx);
        w.command_applied(5, 2, Some(b"out".to_vec()));
        assert!(unanswered(&mut rx));
        w.deliver();
        assert_eq!(rx.try_recv().expect("answered").expect("ok"), b"out");
    }

    #[test]
    fn an_entry_of_another_term_at_the_index_discards_the_proposal() {
        let mut w = Waiters::default();
        let (tx, mut rx) = reply();
        w.command_proposed(5, 2, tx);
        w.command_applied(5, 3, None);
        w.deliver();
        assert_eq!(kind(&mut rx), ErrorKind::Timeout);
    }

    #[test]
    fn proposals_below_an_applied_entry_are_discarded_and_later_ones_wait() {
        let mut w = Waiters::default();
        let (tx4, mut rx4) = reply();
        let (tx5, mut rx5) = reply();
        let (tx6, mut rx6) = reply();
        w.command_proposed(4, 2, tx4);
        w.command_proposed(5, 2, tx5);
        w.command_proposed(6, 2, tx6);
        w.command_applied(5, 2, None);
        w.deliver();
        assert_eq!(kind(&mut rx4), ErrorKind::Timeout);
        // A non-command entry answers its proposal with an empty output.
        assert_eq!(rx5.try_recv().expect("answered").expect("ok"), b"");
        assert!(unanswered(&mut rx6));
    }

    #[test]
    fn a_snapshot_discards_the_proposals_it_covers() {
        let mut w = Waiters::default();
        let (tx3, mut rx3) = reply();
        let (tx8, mut rx8) = reply();
        w.command_proposed(3, 1, tx3);
        w.command_proposed(8, 1, tx8);
        w.discard_through(5);
        w.deliver();
        assert_eq!(kind(&mut rx3), ErrorKind::Timeout);
        assert!(unanswered(&mut rx8));
    }

    #[test]
    fn a_kind_mismatch_between_proposal_and_entry_is_internal() {
        let mut w = Waiters::default();
        let (tx, mut rx) = reply();
        w.conf_proposed(5, 1, tx);
        w.command_applied(5, 1, Some(Vec::new()));
        let (tx, mut rx2) = reply::<Vec<u8>>();
        w.command_proposed(6, 1, tx);
        w.conf_applied(6, 1, &conf(&[1], &[]));
        w.deliver();
        assert_eq!(kind(&mut rx), ErrorKind::Internal);
        assert_eq!(kind(&mut rx2), ErrorKind::Internal);
    }

    #[test]
    fn a_refused_membership_change_fails_with_its_error() {
        let mut w = Waiters::default();
        let (tx, mut rx) = reply();
        w.conf_proposed(5, 1, tx);
        let refused = Err(ConsensusError::InvalidRequest("refused".into()));
        w.conf_applied(5, 1, &refused);
        w.deliver();
        assert_eq!(kind(&mut rx), ErrorKind::InvalidRequest);
    }

    #[test]
    fn a_joint_change_completes_when_the_joint_configuration_is_left() {
        let mut w = Waiters::default();
        let (tx, mut rx) = reply();
        w.conf_proposed(5, 1, tx);
        w.conf_applied(5, 1, &conf(&[1, 2, 4], &[1, 2, 3]));
        w.deliver();
        assert!(unanswered(&mut rx));
        // The leave entry has no proposal of its own.
        w.conf_applied(6, 1, &conf(&[1, 2, 4], &[]));
        w.deliver();
        assert!(rx.try_recv().expect("answered").is_ok());
    }

    #[test]
    fn losing_leadership_fails_reads_with_the_hint() {
        let mut w = Waiters::default();
        let (read, mut read_rx) = reply();
        let (learner, mut learner_rx) = reply();
        w.read_started(read, 0);
        w.conf_proposed(5, 1, learner);
        w.conf_applied(5, 1, &conf(&[1, 2, 3], &[]));
        w.not_leading(Some(2));
        w.deliver();
        match read_rx.try_recv().expect("answered") {
            Err(ConsensusError::NotLeader { leader }) => assert_eq!(leader, Some(2)),
            other => panic!("expected NotLeader, got {other:?}"),
        }
        assert!(learner_rx.try_recv().expect("answered").is_ok());
    }

    #[test]
    fn a_read_is_answered_by_its_own_context_and_retried_after_the_given_ticks() {
        let mut w = Waiters::default();
        let (a, mut a_rx) = reply();
        let (b, mut b_rx) = reply();
        let ctx_a = w.read_started(a, 0);
        let ctx_b = w.read_started(b, 2);
        assert_ne!(ctx_a, ctx_b);
        assert!(w.reads_to_retry(2, 3).is_empty());
        assert_eq!(w.reads_to_retry(3, 3), vec![ctx_a.clone()]);
        // Re-issued at 3: due again at 6, with b (issued at 2, due at 5 and 8 after that).
        assert_eq!(w.reads_to_retry(5, 3), vec![ctx_b.clone()]);
        assert_eq!(w.reads_to_retry(6, 3), vec![ctx_a.clone()]);
        w.complete_reads(vec![
            ReadState {
                index: 9,
                request_ctx: ctx_b,
            },
            ReadState {
                index: 1,
                request_ctx: b"not a context".to_vec(),
            },
        ]);
        w.deliver();
        assert_eq!(b_rx.try_recv().expect("answered").expect("ok"), 9);
        assert!(unanswered(&mut a_rx));
    }

    #[test]
    fn a_snapshot_answers_the_callers_it_covers() {
        let mut w = Waiters::default();
        let (early, mut early_rx) = reply();
        let (late, mut late_rx) = reply();
        w.snapshot_requested(5, early);
        w.snapshot_requested(10, late);
        assert!(
            w.snapshot_taken(7),
            "the later caller still needs a snapshot"
        );
        w.deliver();
        assert_eq!(early_rx.try_recv().expect("answered").expect("ok"), 7);
        assert!(unanswered(&mut late_rx));
        assert!(!w.snapshot_taken(10));
        w.deliver();
        assert_eq!(late_rx.try_recv().expect("answered").expect("ok"), 10);
    }

    #[test]
    fn fail_all_delivers_what_was_decided_and_fails_the_rest() {
        let mut w = Waiters::default();
        let (done, mut done_rx) = reply();
        let (cmd, mut cmd_rx) = reply::<Vec<u8>>();
        let (read, mut read_rx) = reply();
        let (joint, mut joint_rx) = reply();
        let (snap, mut snap_rx) = reply();
        w.command_proposed(1, 1, done);
        w.command_applied(1, 1, None);
        w.conf_proposed(3, 1, joint);
        w.conf_applied(3, 1, &conf(&[1, 2], &[1]));
        w.command_proposed(4, 1, cmd);
        w.read_started(read, 0);
        w.snapshot_requested(9, snap);
        w.fail_all(&ConsensusError::ShuttingDown);
        assert!(done_rx.try_recv().expect("answered").is_ok());
        assert_eq!(
            kind(&mut cmd_rx),
            ErrorKind::OutcomeUnknown,
            "a proposed entry"
        );
        assert_eq!(kind(&mut read_rx), ErrorKind::ShuttingDown);
        assert_eq!(
            kind(&mut joint_rx),
            ErrorKind::OutcomeUnknown,
            "a proposed change"
        );
        assert_eq!(kind(&mut snap_rx), ErrorKind::ShuttingDown);
    }
}
