//! Membership: `ConfChangeV2` requests (learners, voter sets through joint consensus, removal),
//! applying committed changes, the wait until a new learner has caught up, and leaving a joint
//! configuration a former leader entered.

use std::collections::{BTreeMap, BTreeSet};

use consensus_api::{codec, ConsensusError, NodeId};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
};

use crate::mapping;

use super::*;

pub(super) fn members(cs: &ConfState) -> BTreeSet<NodeId> {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next)
        .copied()
        .collect()
}

pub(super) fn is_joint(cs: &ConfState) -> bool {
    !cs.voters_outgoing.is_empty()
}

pub(super) fn single(id: NodeId, ty: ConfChangeType) -> ConfChangeSingle {
    let mut s = ConfChangeSingle {
        node_id: id,
        ..Default::default()
    };
    s.set_change_type(ty);
    s
}

/// The changes that turn `cs` into a configuration whose voters are exactly `voters`: learners
/// in `voters` are promoted, voters not in it are demoted to learners. Every new voter must
/// already be a member (added as a learner first, so it has caught up).
pub(crate) fn voter_changes(
    cs: &ConfState,
    voters: &BTreeSet<NodeId>,
) -> Result<Vec<ConfChangeSingle>, ConsensusError> {
    if voters.is_empty() {
        return Err(ConsensusError::InvalidRequest(
            "the voter set must not be empty".into(),
        ));
    }
    let current: BTreeSet<NodeId> = cs.voters.iter().copied().collect();
    let learners: BTreeSet<NodeId> = cs.learners.iter().copied().collect();
    let mut changes = Vec::new();
    for id in voters {
        if current.contains(id) {
            continue;
        }
        if !learners.contains(id) {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {id} must be added as a learner before it can become a voter"
            )));
        }
        changes.push(single(*id, ConfChangeType::AddNode));
    }
    for id in current.difference(voters) {
        changes.push(single(*id, ConfChangeType::AddLearnerNode));
    }
    Ok(changes)
}

impl Core {
    pub(super) fn propose_conf(
        &mut self,
        changes: Vec<ConfChangeSingle>,
        addresses: BTreeMap<NodeId, String>,
        learner: Option<NodeId>,
        reply: Reply<()>,
    ) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        // raft-rs would silently turn a second concurrent change into an empty entry: refuse it
        // here instead, like openraft refuses a change while one is in progress.
        if self.raw.raft.has_pending_conf() || is_joint(&self.conf_state()) {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(
                "membership change refused: another change is in progress; retry once it completes"
                    .into(),
            )));
            return;
        }
        if changes.is_empty() {
            let _ = reply.send(Ok(()));
            return;
        }
        let mut cc = ConfChangeV2::default();
        cc.set_changes(changes.into());
        if !addresses.is_empty() {
            match codec::encode(&addresses) {
                Ok(b) => cc.context = b.into(),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            }
        }
        match self.raw.propose_conf_change(Vec::new(), cc) {
            Ok(()) => {
                let index = self.raw.raft.raft_log.last_index();
                let term = self.raw.raft.term;
                self.pending.insert(
                    index,
                    Pending::Conf {
                        term,
                        reply,
                        learner,
                    },
                );
            }
            Err(e) => {
                let _ = reply.send(Err(mapping::raft(e, self.leader_hint())));
            }
        }
    }

    /// Adds `id` as a learner; `reply` fires once it is a member and has caught up to the
    /// change (or this node stopped leading, the change being committed).
    pub(crate) fn add_learner(&mut self, id: NodeId, addr: String, reply: Reply<()>) {
        let cs = self.conf_state();
        if members(&cs).contains(&id) {
            // Idempotent: already a member (a retried request lands here).
            let _ = reply.send(self.check_leader());
            return;
        }
        if self.is_leader() {
            self.peer_changes.push((id, Some(addr.clone())));
        }
        let changes = vec![single(id, ConfChangeType::AddLearnerNode)];
        self.propose_conf(changes, BTreeMap::from([(id, addr)]), Some(id), reply);
    }

    /// Makes `voters` the voting set (several changes go through joint consensus).
    pub(crate) fn change_voters(&mut self, voters: BTreeSet<NodeId>, reply: Reply<()>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        match voter_changes(&self.conf_state(), &voters) {
            Ok(changes) => self.propose_conf(changes, BTreeMap::new(), None, reply),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Removes a voter or learner entirely.
    pub(crate) fn remove_node(&mut self, id: NodeId, reply: Reply<()>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        let cs = self.conf_state();
        if !members(&cs).contains(&id) {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "node {id} is not a member"
            ))));
            return;
        }
        if cs.voters == [id] {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "node {id} is the last voter"
            ))));
            return;
        }
        let changes = vec![single(id, ConfChangeType::RemoveNode)];
        self.propose_conf(changes, BTreeMap::new(), None, reply);
    }

    /// Asks raft-rs to hand leadership to `to`.
    pub(crate) fn transfer_leader(&mut self, to: NodeId) -> Result<(), ConsensusError> {
        self.check_leader()?;
        if !self.conf_state().voters.contains(&to) {
            return Err(ConsensusError::InvalidRequest(format!(
                "node {to} is not a voter; only voters can lead"
            )));
        }
        if to != self.id {
            self.raw.transfer_leader(to);
        }
        Ok(())
    }

    /// Applies a committed membership entry: records the addresses it carries, then lets
    /// raft-rs switch configuration. Every node reaches the same outcome.
    pub(super) fn apply_conf(&mut self, e: &Entry) -> Result<ConfState, ConsensusError> {
        let undecodable = |err: protobuf::ProtobufError| {
            ConsensusError::Internal(format!("undecodable conf change at {}: {err}", e.index))
        };
        // raft-rs only proposes V2 for us; a V1 entry is still applied as such.
        let (context, applied) = if e.get_entry_type() == EntryType::EntryConfChangeV2 {
            let cc = ConfChangeV2::parse_from_carllerche_bytes(&e.data).map_err(undecodable)?;
            (cc.context.clone(), self.raw.apply_conf_change(&cc))
        } else {
            let cc = ConfChange::parse_from_carllerche_bytes(&e.data).map_err(undecodable)?;
            (cc.context.clone(), self.raw.apply_conf_change(&cc))
        };
        let cs = applied.map_err(|err| {
            tracing::warn!(
                id = self.id,
                index = e.index,
                "conf change not applied: {err}"
            );
            mapping::raft(err, None)
        })?;
        if !context.is_empty() {
            match codec::decode::<BTreeMap<NodeId, String>>(&context) {
                Ok(addrs) => {
                    for (i, a) in addrs {
                        self.peer_changes.push((i, Some(a.clone())));
                        self.addresses.insert(i, a);
                    }
                }
                Err(err) => tracing::warn!(index = e.index, "conf change context: {err}"),
            }
        }
        let now = members(&cs);
        let gone: Vec<NodeId> = self
            .addresses
            .keys()
            .filter(|i| !now.contains(i) && **i != self.id)
            .copied()
            .collect();
        for i in gone {
            self.addresses.remove(&i);
            self.peer_changes.push((i, None));
        }
        tracing::info!(id = self.id, index = e.index, conf = ?cs, "membership changed");
        Ok(cs)
    }

    /// Housekeeping after anything moved: waiters that depend on the role, learner catch-up,
    /// and leaving a joint configuration a previous leader entered.
    pub(super) fn after_progress(&mut self) {
        if !self.is_leader() {
            let leader = self.leader_hint();
            for (_, r) in std::mem::take(&mut self.reads) {
                self.later(r.reply, Err(ConsensusError::NotLeader { leader }));
            }
            // The learner is a member (the change committed); catching up is the new
            // leader's business.
            for (_, _, r) in std::mem::take(&mut self.learner_waits) {
                self.later(r, Ok(()));
            }
            return;
        }
        let mut waiting = Vec::new();
        for (id, index, reply) in std::mem::take(&mut self.learner_waits) {
            match self.raw.raft.prs().get(id) {
                Some(p) if p.matched < index => waiting.push((id, index, reply)),
                _ => self.later(reply, Ok(())),
            }
        }
        self.learner_waits = waiting;
        if is_joint(&self.conf_state()) && !self.raw.raft.has_pending_conf() {
            // raft-rs leaves a joint config automatically only if the leader that entered it
            // applied it; a later leader must propose the leave itself.
            if let Err(e) = self
                .raw
                .propose_conf_change(Vec::new(), ConfChangeV2::default())
            {
                tracing::debug!(
                    id = self.id,
                    "could not propose leaving the joint config: {e}"
                );
            }
        }
    }
}
