//! [`ReplicationTracker`]: builds the leader's [`Status::replication`] from what an engine
//! reports, so both engines fill the same fields the same way.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::types::{ReplicaProgress, CONTACT_RESOLUTION_MS};
use crate::NodeId;

/// Keeps, for a leader, when each member last answered and when it was last caught up, and
/// turns the engine's matched indexes into [`Status::replication`](crate::Status::replication).
///
/// Obligations of the engine using it: call [`heard_from`](Self::heard_from) (or
/// [`heard_from_ago`](Self::heard_from_ago)) for every answer a member sends the leader,
/// [`progress`](Self::progress) whenever it builds a status as leader, and
/// [`clear`](Self::clear) when it stops leading (times are "since this node leads").
#[derive(Debug, Default)]
pub struct ReplicationTracker {
    contact: HashMap<NodeId, u64>,
    caught_up: HashMap<NodeId, u64>,
}

/// Now, in Unix milliseconds rounded down to the resolution.
fn rounded(at: SystemTime) -> u64 {
    let ms = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    ms - ms % CONTACT_RESOLUTION_MS
}

impl ReplicationTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// `id` answered the leader just now.
    pub fn heard_from(&mut self, id: NodeId) {
        self.contact.insert(id, rounded(SystemTime::now()));
    }

    /// `id` last answered the leader `ago` before now (for engines that keep the time).
    pub fn heard_from_ago(&mut self, id: NodeId, ago: Duration) {
        let at = SystemTime::now().checked_sub(ago).unwrap_or(UNIX_EPOCH);
        self.contact.insert(id, rounded(at));
    }

    /// The progress of every member in `matched` (id and highest index known on it; every
    /// member but the leader), given the leader's commit index. Members not listed are
    /// forgotten.
    pub fn progress(
        &mut self,
        commit_index: u64,
        matched: impl IntoIterator<Item = (NodeId, u64)>,
    ) -> BTreeMap<NodeId, ReplicaProgress> {
        let now = rounded(SystemTime::now());
        let out: BTreeMap<NodeId, ReplicaProgress> = matched
            .into_iter()
            .map(|(id, matched)| {
                if matched >= commit_index {
                    self.caught_up.insert(id, now);
                }
                let p = ReplicaProgress {
                    matched,
                    last_contact_unix_ms: self.contact.get(&id).copied(),
                    caught_up_unix_ms: self.caught_up.get(&id).copied(),
                };
                (id, p)
            })
            .collect();
        self.contact.retain(|id, _| out.contains_key(id));
        self.caught_up.retain(|id, _| out.contains_key(id));
        out
    }

    /// This node no longer leads: forget every time.
    pub fn clear(&mut self) {
        self.contact.clear();
        self.caught_up.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_at_the_commit_index_is_caught_up_and_one_behind_is_not() {
        let mut t = ReplicationTracker::new();
        t.heard_from(2);
        let p = t.progress(10, [(2, 10), (3, 4)]);
        assert_eq!(p[&2].matched, 10);
        assert!(p[&2].caught_up_unix_ms.is_some());
        assert!(p[&2].last_contact_unix_ms.is_some());
        assert_eq!(p[&3].matched, 4);
        assert_eq!(p[&3].caught_up_unix_ms, None);
        assert_eq!(p[&3].last_contact_unix_ms, None);
        // Node 2 falls behind: it keeps the time it was last caught up.
        let before = p[&2].caught_up_unix_ms;
        let p = t.progress(20, [(2, 15), (3, 4)]);
        assert_eq!(p[&2].caught_up_unix_ms, before);
    }

    #[test]
    fn times_are_rounded_and_forgotten_with_the_member_or_the_leadership() {
        let mut t = ReplicationTracker::new();
        t.heard_from_ago(2, Duration::from_secs(5));
        let p = t.progress(1, [(2, 0)]);
        let at = p[&2].last_contact_unix_ms.expect("contact recorded");
        assert_eq!(at % CONTACT_RESOLUTION_MS, 0);
        assert!(rounded(SystemTime::now()) - at >= 4_900);
        assert!(!t.progress(1, [(3, 0)]).contains_key(&2));
        assert_eq!(t.progress(1, [(2, 0)])[&2].last_contact_unix_ms, None);
        t.heard_from(2);
        t.clear();
        assert_eq!(t.progress(1, [(2, 0)])[&2].last_contact_unix_ms, None);
    }
}
