//! Membership: building `ConfChangeV2` proposals (joint consensus when several voters change),
//! applying committed ones, leaving a joint configuration a previous leader entered, and the
//! address book that rides along (in a change's context, in snapshots, and from peers).

use std::collections::{BTreeMap, BTreeSet};

use consensus_api::{codec, ConsensusError, NodeId};
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
};

use super::waiters::Reply;
use super::Core;
use crate::mapping;

/// Every member of `cs`: voters and learners, incoming and outgoing.
pub(super) fn members(cs: &ConfState) -> BTreeSet<NodeId> {
    cs.voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next)
        .copied()
        .collect()
}

/// Whether `cs` is a joint configuration (old and new voters both decide).
pub(super) fn is_joint(cs: &ConfState) -> bool {
    !cs.voters_outgoing.is_empty()
}

fn single(id: NodeId, ty: ConfChangeType) -> ConfChangeSingle {
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

/// The member addresses this node knows, and the transport peer changes not yet taken.
#[derive(Default)]
pub(super) struct AddressBook {
    known: BTreeMap<NodeId, String>,
    /// Peers to add (`Some(addr)`) or forget (`None`) on the transport.
    changes: Vec<(NodeId, Option<String>)>,
}

impl AddressBook {
    /// The book restored from a snapshot at open: every address goes to the transport.
    pub(super) fn restored(known: BTreeMap<NodeId, String>) -> Self {
        let changes = known.iter().map(|(i, a)| (*i, Some(a.clone()))).collect();
        Self { known, changes }
    }

    pub(super) fn known(&self) -> &BTreeMap<NodeId, String> {
        &self.known
    }

    pub(super) fn take_changes(&mut self) -> Vec<(NodeId, Option<String>)> {
        std::mem::take(&mut self.changes)
    }

    /// Tells the transport about `id` without recording it (the change naming it has not
    /// committed yet, but the leader must reach the learner to replicate it).
    pub(super) fn announce(&mut self, id: NodeId, addr: String) {
        self.changes.push((id, Some(addr)));
    }

    /// Records an address carried by the log: it overrides what was known.
    pub(super) fn record(&mut self, id: NodeId, addr: String) {
        self.changes.push((id, Some(addr.clone())));
        self.known.insert(id, addr);
    }

    /// Records addresses from a peer, for members not known yet (known ones come from the log).
    pub(super) fn learn(&mut self, me: NodeId, book: BTreeMap<NodeId, String>) {
        for (id, addr) in book {
            if id != me && !self.known.contains_key(&id) {
                self.changes.push((id, Some(addr.clone())));
                self.known.insert(id, addr);
            }
        }
    }

    /// Forgets every node but `me` that is not in `members`.
    pub(super) fn retain_members(&mut self, me: NodeId, members: &BTreeSet<NodeId>) {
        let gone: Vec<NodeId> = self
            .known
            .keys()
            .filter(|i| !members.contains(i) && **i != me)
            .copied()
            .collect();
        for i in gone {
            self.known.remove(&i);
            self.changes.push((i, None));
        }
    }

    /// Replaces the book with an installed snapshot's.
    pub(super) fn replace(&mut self, book: BTreeMap<NodeId, String>) {
        for gone in self.known.keys().filter(|i| !book.contains_key(i)) {
            self.changes.push((*gone, None));
        }
        for (i, a) in &book {
            self.changes.push((*i, Some(a.clone())));
        }
        self.known = book;
    }
}

impl Core {
    fn propose_conf(
        &mut self,
        changes: Vec<ConfChangeSingle>,
        addresses: BTreeMap<NodeId, String>,
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
                self.waiters.conf_proposed(index, term, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(mapping::raft(e, self.leader_hint())));
            }
        }
    }

    /// Adds `id` as a learner; `reply` fires once the change is applied (its catching up shows
    /// in the leader's status).
    pub(crate) fn add_learner(&mut self, id: NodeId, addr: String, reply: Reply<()>) {
        let cs = self.conf_state();
        if members(&cs).contains(&id) {
            // Idempotent: already a member (a retried request lands here).
            let _ = reply.send(self.check_leader());
            return;
        }
        if self.is_leader() {
            self.book.announce(id, addr.clone());
        }
        let changes = vec![single(id, ConfChangeType::AddLearnerNode)];
        self.propose_conf(changes, BTreeMap::from([(id, addr)]), reply);
    }

    /// Makes `voters` the voting set (several changes go through joint consensus).
    pub(crate) fn change_voters(&mut self, voters: BTreeSet<NodeId>, reply: Reply<()>) {
        if let Err(e) = self.check_leader() {
            let _ = reply.send(Err(e));
            return;
        }
        match voter_changes(&self.conf_state(), &voters) {
            Ok(changes) => self.propose_conf(changes, BTreeMap::new(), reply),
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
            // Idempotent: already gone (a retried removal, whose first answer was lost when
            // the leader removed itself, lands here).
            let _ = reply.send(Ok(()));
            return;
        }
        if cs.voters == [id] {
            let _ = reply.send(Err(ConsensusError::InvalidRequest(format!(
                "node {id} is the last voter"
            ))));
            return;
        }
        let changes = vec![single(id, ConfChangeType::RemoveNode)];
        self.propose_conf(changes, BTreeMap::new(), reply);
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

    /// Adds addresses a peer told us about for members we cannot reach yet (a node that joined
    /// empty learns the cluster this way). Known addresses are never overridden: those come
    /// from the log.
    pub(crate) fn learn_addresses(&mut self, book: BTreeMap<NodeId, String>) {
        self.book.learn(self.id, book);
    }

    /// The member addresses this node knows.
    pub(crate) fn address_book(&self) -> BTreeMap<NodeId, String> {
        self.book.known().clone()
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
                        self.book.record(i, a);
                    }
                }
                Err(err) => tracing::warn!(index = e.index, "conf change context: {err}"),
            }
        }
        self.book.retain_members(self.id, &members(&cs));
        tracing::info!(id = self.id, index = e.index, conf = ?cs, "membership changed");
        Ok(cs)
    }

    /// On the leader: leaves a joint configuration that a previous leader entered.
    pub(super) fn membership_progress(&mut self) {
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
