//! Waiting on a [`LocalCluster`]'s statuses: agreed leaders, applied indexes, membership,
//! any condition; each with a deadline, never a bare sleep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use consensus_api::{ConsensusError, NodeId, Role, Status};
use tokio::time::Instant;

use crate::node::NodeKind;
use crate::LocalCluster;

/// How often the `wait_*` helpers look at the nodes' statuses.
const POLL: Duration = Duration::from_millis(10);

impl<K: NodeKind> LocalCluster<K> {
    /// Waits until the running nodes among `among` agree on one leader that claims the role.
    pub async fn try_wait_leader_among(
        &self,
        among: &[NodeId],
        timeout: Duration,
    ) -> Result<NodeId, ConsensusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.statuses();
            let view: Vec<&Status> = among.iter().filter_map(|id| st.get(id)).collect();
            if let Some(leader) = view.first().and_then(|s| s.leader) {
                let agreed = view.iter().all(|s| s.leader == Some(leader));
                let claims = st.get(&leader).is_some_and(|s| s.role == Role::Leader);
                if agreed && claims && among.contains(&leader) {
                    return Ok(leader);
                }
            }
            if Instant::now() >= deadline {
                return Err(ConsensusError::Timeout(format!(
                    "an agreed leader among {among:?} within {timeout:?}: {st:#?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the running nodes among `among` agree on one leader; panics at the timeout.
    pub async fn wait_leader_among(&self, among: &[NodeId], timeout: Duration) -> NodeId {
        self.try_wait_leader_among(among, timeout)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until every running node agrees on a leader; panics at the timeout.
    pub async fn wait_leader(&self, timeout: Duration) -> NodeId {
        let live = self.live();
        self.wait_leader_among(&live, timeout).await
    }

    /// Waits until every node in `ids` has applied at least `index`; panics at the timeout.
    pub async fn wait_applied(&self, ids: &[NodeId], index: u64, timeout: Duration) {
        self.wait_statuses(timeout, |st| {
            ids.iter()
                .all(|id| st.get(id).is_some_and(|s| s.applied_index >= index))
        })
        .await
        .unwrap_or_else(|e| panic!("nodes {ids:?} did not apply index {index}: {e}"));
    }

    /// Waits until `pred` holds for the statuses of the running nodes.
    pub async fn wait_statuses(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&BTreeMap<NodeId, Status>) -> bool,
    ) -> Result<BTreeMap<NodeId, Status>, ConsensusError> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.statuses();
            if pred(&st) {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                return Err(ConsensusError::Timeout(format!(
                    "a cluster condition within {timeout:?}: {st:#?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The running nodes other than `id`.
    pub fn others(&self, id: NodeId) -> Vec<NodeId> {
        self.live().into_iter().filter(|i| *i != id).collect()
    }

    /// Some running node other than `leader`; panics when there is none.
    pub fn follower_of(&self, leader: NodeId) -> NodeId {
        self.others(leader)
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("no running node besides {leader}"))
    }

    /// Waits until every node in `voters` sees exactly `voters` and `learners` as the
    /// membership; panics at the timeout.
    pub async fn wait_members(
        &self,
        voters: &BTreeSet<NodeId>,
        learners: &BTreeSet<NodeId>,
        timeout: Duration,
    ) {
        self.wait_statuses(timeout, |st| {
            voters.iter().all(|id| {
                st.get(id)
                    .is_some_and(|s| &s.voters == voters && &s.learners == learners)
            })
        })
        .await
        .unwrap_or_else(|e| panic!("membership did not converge to {voters:?}: {e}"));
    }
}
