//! [`MetadataMachine`]: the replicated state machine of the metadata plane. Every rule here is
//! deterministic: the same records give the same image on every node.
//!
//! [`StateMachine::apply`] dispatches each record to the function of its concern, and records
//! the outcome in the feed:
//!
//! - [`brokers`]: register, unregister, heartbeat (unfencing), fence, controlled shutdown and
//!   its cancellation;
//! - [`topics`]: create and delete topics, grow partitions, alter configs;
//! - [`partitions`]: compare-and-set partition changes, preferred-leader election, and the
//!   leader election and epoch rules that broker changes trigger;
//! - [`feed`]: the bounded change feed by log offset.
//!
//! A refused record changes nothing in the image (each function checks before it writes); it
//! still advances the image offset and appears in the feed with its error.

mod brokers;
mod feed;
mod partitions;
mod topics;

#[cfg(test)]
mod testing;

use consensus_api::{codec, StateMachine};

use crate::model::*;
use feed::Feed;

pub use feed::FeedGap;

/// The metadata image plus a bounded feed of recent changes.
#[derive(Debug, Default)]
pub struct MetadataMachine {
    image: MetadataImage,
    feed: Feed,
}

impl MetadataMachine {
    /// The current image.
    pub fn image(&self) -> &MetadataImage {
        &self.image
    }

    /// Changes applied after `offset`, oldest first, at most `max`.
    pub fn changes_since(&self, offset: u64, max: usize) -> Result<Vec<MetadataChange>, FeedGap> {
        self.feed.since(offset, max)
    }

    /// Checks `cmd` against the current image with the rules its apply would use, changing
    /// nothing: the controller refuses a request that fails here without appending it. Apply
    /// checks again, since the image may have moved on by the time the record commits. A
    /// heartbeat is checked as if it were the next record.
    pub fn check(&self, cmd: &MetadataCommand) -> Result<(), MetadataError> {
        use MetadataCommand as C;
        let image = &self.image;
        match cmd {
            C::RegisterBroker { .. } | C::ChangePartition { .. } => Ok(()),
            C::UnregisterBroker { broker_id } => brokers::check_unregister(image, *broker_id),
            C::Heartbeat {
                broker_id,
                epoch,
                metadata_offset,
            } => brokers::check_heartbeat(
                image,
                image.offset + 1,
                *broker_id,
                *epoch,
                *metadata_offset,
            )
            .map(drop),
            C::FenceBroker { broker_id, epoch }
            | C::BeginControlledShutdown { broker_id, epoch } => {
                brokers::current(image, *broker_id, *epoch).map(drop)
            }
            C::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => topics::check_create_topic(image, name, *partitions, *replication_factor, configs)
                .map(drop),
            C::CreatePartitions { name, total } => {
                topics::check_create_partitions(image, name, *total).map(drop)
            }
            C::DeleteTopic { name } => topics::check_delete_topic(image, name),
            C::AlterTopicConfig { name, set, remove } => {
                topics::check_alter_topic_config(image, name, set, remove).map(drop)
            }
            C::ElectPreferredLeaders { topics } => partitions::check_elect_preferred(image, topics),
            C::CancelControlledShutdown { broker_id, epoch } => {
                brokers::check_cancel_controlled_shutdown(image, *broker_id, *epoch)
            }
        }
    }

    /// Applies one record to the image: the record's concern decides, this only dispatches.
    fn try_apply(
        &mut self,
        index: u64,
        cmd: &MetadataCommand,
    ) -> Result<MetadataResponse, MetadataError> {
        use MetadataCommand as C;
        let image = &mut self.image;
        match cmd {
            C::RegisterBroker {
                broker_id,
                incarnation,
                endpoints,
                rack,
            } => brokers::register(image, index, *broker_id, *incarnation, endpoints, rack),
            C::UnregisterBroker { broker_id } => brokers::unregister(image, *broker_id),
            C::Heartbeat {
                broker_id,
                epoch,
                metadata_offset,
            } => brokers::heartbeat(image, index, *broker_id, *epoch, *metadata_offset),
            C::FenceBroker { broker_id, epoch } => brokers::fence(image, *broker_id, *epoch),
            C::BeginControlledShutdown { broker_id, epoch } => {
                brokers::begin_controlled_shutdown(image, *broker_id, *epoch)
            }
            C::CreateTopic {
                name,
                partitions,
                replication_factor,
                configs,
            } => topics::create_topic(
                image,
                index,
                name,
                *partitions,
                *replication_factor,
                configs,
            ),
            C::CreatePartitions { name, total } => topics::create_partitions(image, name, *total),
            C::DeleteTopic { name } => topics::delete_topic(image, name),
            C::ChangePartition {
                topic,
                partition,
                partition_epoch,
                leader,
                isr,
            } => partitions::change_partition(
                image,
                topic,
                *partition,
                *partition_epoch,
                *leader,
                isr,
            ),
            C::AlterTopicConfig { name, set, remove } => {
                topics::alter_topic_config(image, name, set, remove)
            }
            C::ElectPreferredLeaders { topics } => partitions::elect_preferred(image, topics),
            C::CancelControlledShutdown { broker_id, epoch } => {
                brokers::cancel_controlled_shutdown(image, *broker_id, *epoch)
            }
        }
    }

    /// Whether `broker_id` is fenced (`None`: not registered).
    fn fenced(&self, broker_id: BrokerId) -> Option<bool> {
        self.image.brokers.get(&broker_id).map(|b| b.fenced)
    }
}

impl StateMachine for MetadataMachine {
    type Command = MetadataCommand;
    type Response = MetadataResponse;

    fn apply(&mut self, index: u64, command: MetadataCommand) -> MetadataResponse {
        // A heartbeat's broker and whether it was fenced before, to tell a quiet heartbeat.
        let heartbeat = match &command {
            MetadataCommand::Heartbeat { broker_id, .. } => {
                Some((*broker_id, self.fenced(*broker_id)))
            }
            _ => None,
        };
        let response = self
            .try_apply(index, &command)
            .unwrap_or_else(MetadataResponse::Error);
        self.image.offset = index;
        // A heartbeat that changed nothing but the liveness offset stays out of the feed.
        let quiet_heartbeat =
            heartbeat.is_some_and(|(id, fenced_before)| fenced_before == self.fenced(id));
        if !quiet_heartbeat {
            self.feed.push(MetadataChange {
                offset: index,
                command,
                response: response.clone(),
            });
        }
        response
    }

    fn snapshot(&self) -> Result<Vec<u8>, String> {
        codec::encode(&self.image).map_err(|e| e.to_string())
    }

    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.image = codec::decode(snapshot).map_err(|e| e.to_string())?;
        self.feed.restart_after(self.image.offset);
        Ok(())
    }
}
