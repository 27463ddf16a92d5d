//! The change feed: the most recent [`MetadataChange`]s by log offset, so a broker that is a
//! little behind catches up with the changes instead of re-reading the whole image.
//!
//! The feed is bounded: once it holds [`FEED_CAPACITY`] changes the oldest is dropped, and a
//! reader asking for changes after an offset the feed no longer covers gets a [`FeedGap`] and
//! must read the image instead. A restored snapshot starts the feed afresh after the image's
//! offset, since the changes before it were never seen by this node.

use std::collections::VecDeque;

use crate::model::MetadataChange;

/// Most changes kept for the feed; older readers restart from the image.
pub(super) const FEED_CAPACITY: usize = 10_000;

/// A feed reader asked for changes older than the feed keeps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("changes after offset {asked} are gone; the feed starts after {oldest}: read the image")]
pub struct FeedGap {
    /// The offset asked for.
    pub asked: u64,
    /// Changes after this offset are available.
    pub oldest: u64,
}

/// The bounded feed of recent changes, oldest first.
#[derive(Debug, Default)]
pub(super) struct Feed {
    changes: VecDeque<MetadataChange>,
    /// The feed holds every change after this offset (0 until changes were dropped or the
    /// image was restored from a snapshot).
    floor: u64,
}

impl Feed {
    /// Adds the change of the record just applied (offsets only grow), dropping the oldest
    /// change when the feed is full.
    pub(super) fn push(&mut self, change: MetadataChange) {
        if self.changes.len() == FEED_CAPACITY {
            if let Some(old) = self.changes.pop_front() {
                self.floor = old.offset;
            }
        }
        self.changes.push_back(change);
    }

    /// Changes after `offset`, oldest first, at most `max`; a [`FeedGap`] when some of them
    /// were already dropped.
    pub(super) fn since(&self, offset: u64, max: usize) -> Result<Vec<MetadataChange>, FeedGap> {
        let oldest = self.floor;
        if offset < oldest {
            return Err(FeedGap {
                asked: offset,
                oldest,
            });
        }
        Ok(self
            .changes
            .iter()
            .filter(|c| c.offset > offset)
            .take(max)
            .cloned()
            .collect())
    }

    /// Empties the feed; it covers every change after `offset` from now on.
    pub(super) fn restart_after(&mut self, offset: u64) {
        self.changes.clear();
        self.floor = offset;
    }
}

#[cfg(test)]
mod tests {
    use consensus_api::StateMachine;

    use super::super::testing::M;
    use super::super::MetadataMachine;
    use super::*;
    use crate::model::*;

    fn change(offset: u64) -> MetadataChange {
        MetadataChange {
            offset,
            command: MetadataCommand::DeleteTopic { name: "t".into() },
            response: MetadataResponse::Ok,
        }
    }

    fn offsets(changes: &[MetadataChange]) -> Vec<u64> {
        changes.iter().map(|c| c.offset).collect()
    }

    #[test]
    fn a_full_feed_drops_its_oldest_change_and_reports_the_gap() {
        let mut feed = Feed::default();
        for offset in 1..=FEED_CAPACITY as u64 {
            feed.push(change(offset));
        }
        assert_eq!(feed.since(0, 2).map(|c| offsets(&c)), Ok(vec![1, 2]));
        feed.push(change(FEED_CAPACITY as u64 + 1));
        assert_eq!(
            feed.since(0, 10),
            Err(FeedGap {
                asked: 0,
                oldest: 1
            })
        );
        assert_eq!(feed.since(1, 1).map(|c| offsets(&c)), Ok(vec![2]));
        let all = feed.since(1, usize::MAX).expect("covered");
        assert_eq!(all.len(), FEED_CAPACITY);
        assert_eq!(all.last().map(|c| c.offset), Some(FEED_CAPACITY as u64 + 1));
    }

    #[test]
    fn a_restarted_feed_covers_only_what_follows() {
        let mut feed = Feed::default();
        feed.push(change(3));
        feed.restart_after(7);
        assert!(feed.since(6, 10).is_err());
        assert_eq!(feed.since(7, 10), Ok(vec![]));
        feed.push(change(8));
        assert_eq!(feed.since(7, 10).map(|c| offsets(&c)), Ok(vec![8]));
    }

    #[test]
    fn the_feed_is_ordered_and_restores_from_the_image() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 2, 2);
        // A heartbeat that changes nothing stays out of the feed.
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch: epochs[&1],
            metadata_offset: m.caught_up(),
        });
        let feed = m.m.changes_since(0, 100).expect("feed");
        let offsets: Vec<u64> = feed.iter().map(|c| c.offset).collect();
        let mut sorted = offsets.clone();
        sorted.sort_unstable();
        assert_eq!(offsets, sorted);
        assert_eq!(
            feed.len(),
            5,
            "2 registrations, 2 unfencing heartbeats, 1 topic"
        );
        let tail = m.m.changes_since(offsets[2], 100).expect("tail");
        assert_eq!(tail.len(), 2);
        let snap = m.m.snapshot().expect("snapshot");
        let mut r = MetadataMachine::default();
        r.restore(&snap).expect("restore");
        assert_eq!(r.image(), m.m.image());
        assert!(
            r.changes_since(0, 10).is_err(),
            "older changes are gone after a restore"
        );
        assert_eq!(
            r.changes_since(r.image().offset, 10)
                .expect("from the image"),
            vec![]
        );
    }

    #[test]
    fn a_refused_record_is_in_the_feed_with_its_error() {
        let mut m = M::new();
        m.err(MetadataCommand::DeleteTopic {
            name: "nope".into(),
        });
        let feed = m.m.changes_since(0, 10).expect("feed");
        assert_eq!(feed.len(), 1);
        assert!(matches!(
            feed[0].response,
            MetadataResponse::Error(MetadataError::UnknownTopic(_))
        ));
        assert_eq!(
            m.m.image().offset,
            1,
            "a refused record still advances the offset"
        );
    }
}
