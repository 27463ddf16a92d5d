//! The quorum view operators know from `kafka-metadata-quorum describe`: `--status` (leader,
//! term, commit index, the largest follower lag in entries and in time, voters and learners
//! with their addresses) and `--replication` (one row per member: matched index, lag, last
//! contact, last caught up, role), built from the leader's [`Status`].

use std::time::{SystemTime, UNIX_EPOCH};

use consensus_api::{NodeId, Status};
use serde::Serialize;

/// A member and its transport address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Node id.
    pub id: NodeId,
    /// Its consensus transport address, as recorded in the membership.
    pub address: Option<String>,
}

/// How one member is doing, as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Replica {
    /// Node id.
    pub id: NodeId,
    /// `leader`, `follower` (a voter) or `observer` (a learner), as Kafka names them.
    pub role: &'static str,
    /// Highest log index known to be on it (the leader: its last log index).
    pub matched: u64,
    /// Entries it lacks: the leader's last log index minus `matched`.
    pub lag: u64,
    /// Milliseconds since it last answered the leader (`None`: not since this leader leads).
    pub last_contact_ms_ago: Option<u64>,
    /// Milliseconds since it last had every committed entry (`None`: not since this leader
    /// leads); its lag in time.
    pub last_caught_up_ms_ago: Option<u64>,
}

/// `GET /cluster/quorum`: the quorum as its leader sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quorum {
    /// The cluster id the nodes were started with.
    pub cluster_id: String,
    /// The leader (the node this view comes from).
    pub leader: NodeId,
    /// Its term (Kafka's leader epoch).
    pub term: u64,
    /// The leader's commit index (Kafka's high watermark).
    pub commit_index: u64,
    /// The leader's last log index.
    pub last_log_index: u64,
    /// The largest `lag` among the other voters (learners do not count, as in Kafka).
    pub max_follower_lag: u64,
    /// The largest `last_caught_up_ms_ago` among the other voters; `None` when one has not
    /// caught up since this leader leads.
    pub max_follower_lag_ms: Option<u64>,
    /// Voters, with addresses.
    pub voters: Vec<Member>,
    /// Learners (observers), with addresses.
    pub learners: Vec<Member>,
    /// One row per member, the leader first.
    pub replication: Vec<Replica>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Quorum {
    /// The view from the leader's status (see [`consensus_api::Consensus::leader_status`]).
    pub fn from_leader(cluster_id: &str, st: &Status) -> Self {
        Self::at(cluster_id, st, now_ms())
    }

    /// As [`from_leader`](Self::from_leader), with `now` in Unix milliseconds.
    pub fn at(cluster_id: &str, st: &Status, now: u64) -> Self {
        let member = |id: &NodeId| Member {
            id: *id,
            address: st.addresses.get(id).cloned(),
        };
        let ago = |at: Option<u64>| at.map(|t| now.saturating_sub(t));
        let mut replication = vec![Replica {
            id: st.id,
            role: "leader",
            matched: st.last_log_index,
            lag: 0,
            last_contact_ms_ago: Some(0),
            last_caught_up_ms_ago: Some(0),
        }];
        for id in st.voters.iter().chain(&st.learners) {
            if *id == st.id {
                continue;
            }
            let p = st.replication.get(id);
            let matched = p.map_or(0, |p| p.matched);
            let caught_up_now = matched >= st.commit_index;
            replication.push(Replica {
                id: *id,
                role: if st.voters.contains(id) {
                    "follower"
                } else {
                    "observer"
                },
                matched,
                lag: st.last_log_index.saturating_sub(matched),
                last_contact_ms_ago: ago(p.and_then(|p| p.last_contact_unix_ms)),
                last_caught_up_ms_ago: if caught_up_now {
                    Some(0)
                } else {
                    ago(p.and_then(|p| p.caught_up_unix_ms))
                },
            });
        }
        let followers: Vec<&Replica> = replication
            .iter()
            .filter(|r| r.role == "follower")
            .collect();
        Self {
            cluster_id: cluster_id.to_string(),
            leader: st.id,
            term: st.term,
            commit_index: st.commit_index,
            last_log_index: st.last_log_index,
            max_follower_lag: followers.iter().map(|r| r.lag).max().unwrap_or(0),
            max_follower_lag_ms: followers
                .iter()
                .try_fold(0u64, |m, r| r.last_caught_up_ms_ago.map(|a| m.max(a))),
            voters: st.voters.iter().map(member).collect(),
            learners: st.learners.iter().map(member).collect(),
            replication,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use consensus_api::ReplicaProgress;

    fn progress(matched: u64, contact: Option<u64>, caught_up: Option<u64>) -> ReplicaProgress {
        serde_json::from_value(serde_json::json!({
            "matched": matched,
            "last_contact_unix_ms": contact,
            "caught_up_unix_ms": caught_up,
        }))
        .expect("a progress")
    }

    #[test]
    fn lags_and_roles_come_from_the_leaders_view() {
        let mut st = Status::initial(1);
        st.term = 7;
        st.commit_index = 100;
        st.last_log_index = 105;
        st.voters = [1, 2, 3].into();
        st.learners = [4].into();
        st.addresses = [(2, "b:1".to_string()), (4, "d:1".to_string())].into();
        st.replication = [
            (2, progress(105, Some(9_900), Some(9_900))),
            (3, progress(40, Some(9_000), Some(6_000))),
            (4, progress(0, None, None)),
        ]
        .into();
        let q = Quorum::at("c1", &st, 10_000);
        assert_eq!((q.leader, q.term, q.commit_index), (1, 7, 100));
        assert_eq!(q.max_follower_lag, 65, "node 3 lacks 65 entries");
        assert_eq!(q.max_follower_lag_ms, Some(4_000));
        let roles: Vec<(NodeId, &str)> = q.replication.iter().map(|r| (r.id, r.role)).collect();
        assert_eq!(
            roles,
            [
                (1, "leader"),
                (2, "follower"),
                (3, "follower"),
                (4, "observer")
            ]
        );
        assert_eq!(q.replication[1].last_caught_up_ms_ago, Some(0));
        assert_eq!(q.replication[2].last_contact_ms_ago, Some(1_000));
        assert_eq!(q.replication[3].lag, 105);
        assert_eq!(q.replication[3].last_contact_ms_ago, None);
        assert_eq!(q.voters[1].address.as_deref(), Some("b:1"));
        assert_eq!(q.learners[0].address.as_deref(), Some("d:1"));
    }

    #[test]
    fn a_voter_never_caught_up_makes_the_lag_in_time_unknown() {
        let mut st = Status::initial(1);
        st.commit_index = 10;
        st.last_log_index = 10;
        st.voters = [1, 2].into();
        st.replication = [(2, progress(3, Some(1), None))].into();
        let q = Quorum::at("c1", &st, 10_000);
        assert_eq!(q.max_follower_lag_ms, None);
        assert_eq!(q.max_follower_lag, 7);
    }
}
