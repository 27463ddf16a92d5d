//! A test harness over [`MetadataMachine`]: applies records at consecutive offsets and checks
//! that accepted records are accepted and refused ones change nothing.

use std::collections::BTreeMap;

use consensus_api::StateMachine;

use super::MetadataMachine;
use crate::model::*;

pub(super) struct M {
    pub(super) m: MetadataMachine,
    next: u64,
}

impl M {
    pub(super) fn new() -> Self {
        Self {
            m: MetadataMachine::default(),
            next: 1,
        }
    }

    /// The offset of the last applied record: what a caught-up broker reports.
    pub(super) fn caught_up(&self) -> u64 {
        self.next - 1
    }

    pub(super) fn apply(&mut self, c: MetadataCommand) -> MetadataResponse {
        let i = self.next;
        self.next += 1;
        self.m.apply(i, c)
    }

    pub(super) fn ok(&mut self, c: MetadataCommand) -> MetadataResponse {
        let r = self.apply(c.clone());
        assert!(
            !matches!(r, MetadataResponse::Error(_)),
            "{c:?} refused: {r:?}"
        );
        r
    }

    pub(super) fn err(&mut self, c: MetadataCommand) -> MetadataError {
        let before = self.m.image.clone();
        match self.apply(c) {
            MetadataResponse::Error(e) => {
                let mut after = self.m.image.clone();
                after.offset = before.offset;
                assert_eq!(after, before, "a refused record changed the image");
                e
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    /// Registers and unfences brokers with racks; returns their epochs.
    pub(super) fn live(&mut self, brokers: &[(BrokerId, &str)]) -> BTreeMap<BrokerId, u64> {
        let mut epochs = BTreeMap::new();
        for (id, rack) in brokers {
            let MetadataResponse::Registered { epoch } = self.ok(MetadataCommand::RegisterBroker {
                broker_id: *id,
                incarnation: 100 + u64::from(*id),
                endpoints: vec![format!("b{id}:9092")],
                rack: Some(rack.to_string()),
            }) else {
                panic!("not registered")
            };
            self.ok(MetadataCommand::Heartbeat {
                broker_id: *id,
                epoch,
                metadata_offset: epoch,
            });
            epochs.insert(*id, epoch);
        }
        epochs
    }

    /// Fences `ids` in this order, at their `epochs`.
    pub(super) fn fence(&mut self, ids: &[BrokerId], epochs: &BTreeMap<BrokerId, u64>) {
        for id in ids {
            self.ok(MetadataCommand::FenceBroker {
                broker_id: *id,
                epoch: epochs[id],
            });
        }
    }

    pub(super) fn topic(&mut self, name: &str, partitions: u32, rf: u16) -> Vec<Vec<BrokerId>> {
        match self.ok(create(name, partitions, rf)) {
            MetadataResponse::TopicCreated { assignment, .. } => assignment,
            other => panic!("{other:?}"),
        }
    }

    pub(super) fn partition(&self, t: &str, p: usize) -> PartitionState {
        self.m.image.topics[t].partitions[p].clone()
    }
}

pub(super) fn create(name: &str, partitions: u32, rf: u16) -> MetadataCommand {
    MetadataCommand::CreateTopic {
        name: name.into(),
        partitions,
        replication_factor: rf,
        configs: BTreeMap::new(),
    }
}
