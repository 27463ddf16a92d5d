//! Broker lifecycle records: registration, heartbeats (which unfence), fencing, controlled
//! shutdown and unregistration.
//!
//! A broker's epoch is the log offset of its registration, so it is unique and every node
//! computes the same one. A broker starts fenced and is unfenced by the first heartbeat showing
//! it has applied the metadata up to its own registration. Records naming a broker carry its
//! epoch, and a stale epoch (from a previous process of the same broker) is refused. Whenever a
//! broker stops being available, [`partitions::evict`] moves its leaderships and ISR places to
//! the others; when it is unfenced again, [`partitions::readmit`] brings it back.

use super::partitions;
use crate::model::*;

/// Whether `b` may hold leaderships and new replicas: not fenced and not shutting down.
pub(super) fn is_available(b: &BrokerRegistration) -> bool {
    !b.fenced && !b.shutting_down
}

/// The available brokers, by id.
pub(super) fn available(image: &MetadataImage) -> impl Iterator<Item = &BrokerRegistration> {
    image.brokers.values().filter(|b| is_available(b))
}

/// The registration of `id`, if `epoch` is its current epoch.
pub(super) fn current(
    image: &MetadataImage,
    id: BrokerId,
    epoch: u64,
) -> Result<&BrokerRegistration, MetadataError> {
    let b = image
        .brokers
        .get(&id)
        .ok_or(MetadataError::UnknownBroker(id))?;
    if b.epoch != epoch {
        return Err(MetadataError::StaleBrokerEpoch {
            broker_id: id,
            given: epoch,
            current: b.epoch,
        });
    }
    Ok(b)
}

/// Fences `id` and takes it out of every partition.
fn fence_and_evict(image: &mut MetadataImage, id: BrokerId) {
    if let Some(b) = image.brokers.get_mut(&id) {
        b.fenced = true;
    }
    partitions::evict(image, id);
}

/// [`MetadataCommand::RegisterBroker`]: the same incarnation keeps its epoch; a new one gets
/// the epoch `index`, fenced, after the old incarnation gave up what it held.
pub(super) fn register(
    image: &mut MetadataImage,
    index: u64,
    broker_id: BrokerId,
    incarnation: u64,
    endpoints: &[String],
    rack: &Option<String>,
) -> Result<MetadataResponse, MetadataError> {
    if let Some(b) = image.brokers.get(&broker_id) {
        if b.incarnation == incarnation {
            return Ok(MetadataResponse::Registered { epoch: b.epoch });
        }
        // A restarted process: whatever the old one held is given up first.
        fence_and_evict(image, broker_id);
    }
    image.brokers.insert(
        broker_id,
        BrokerRegistration {
            broker_id,
            incarnation,
            epoch: index,
            endpoints: endpoints.to_vec(),
            rack: rack.clone(),
            fenced: true,
            shutting_down: false,
            last_heartbeat_offset: index,
        },
    );
    Ok(MetadataResponse::Registered { epoch: index })
}

/// The check of [`unregister`].
pub(super) fn check_unregister(
    image: &MetadataImage,
    broker_id: BrokerId,
) -> Result<(), MetadataError> {
    if image.brokers.contains_key(&broker_id) {
        Ok(())
    } else {
        Err(MetadataError::UnknownBroker(broker_id))
    }
}

/// The checks of [`heartbeat`], for a heartbeat that is (or would be) the record at `index`:
/// the epoch is current, and the broker cannot have applied the log up to this record or
/// beyond, since the record is appended after the broker sent it.
pub(super) fn check_heartbeat(
    image: &MetadataImage,
    index: u64,
    broker_id: BrokerId,
    epoch: u64,
    metadata_offset: u64,
) -> Result<&BrokerRegistration, MetadataError> {
    let b = current(image, broker_id, epoch)?;
    if metadata_offset >= index {
        return Err(MetadataError::Invalid(format!(
            "broker {broker_id} claims to have applied the metadata log up to offset \
             {metadata_offset}, but the log ends before {index}"
        )));
    }
    Ok(b)
}

/// [`MetadataCommand::UnregisterBroker`]: the broker gives up what it held, then is removed.
pub(super) fn unregister(
    image: &mut MetadataImage,
    broker_id: BrokerId,
) -> Result<MetadataResponse, MetadataError> {
    check_unregister(image, broker_id)?;
    fence_and_evict(image, broker_id);
    image.brokers.remove(&broker_id);
    Ok(MetadataResponse::Ok)
}

/// [`MetadataCommand::Heartbeat`]: records liveness at `index`, and unfences a fenced broker
/// (not shutting down) once it has applied the log up to its own registration.
pub(super) fn heartbeat(
    image: &mut MetadataImage,
    index: u64,
    broker_id: BrokerId,
    epoch: u64,
    metadata_offset: u64,
) -> Result<MetadataResponse, MetadataError> {
    let b = check_heartbeat(image, index, broker_id, epoch, metadata_offset)?;
    let unfence = b.fenced && !b.shutting_down && metadata_offset >= b.epoch;
    if let Some(b) = image.brokers.get_mut(&broker_id) {
        b.last_heartbeat_offset = index;
        if unfence {
            b.fenced = false;
        }
    }
    if unfence {
        partitions::readmit(image, broker_id);
    }
    Ok(MetadataResponse::Ok)
}

/// [`MetadataCommand::FenceBroker`]: the broker leaves every ISR and loses its leaderships.
pub(super) fn fence(
    image: &mut MetadataImage,
    broker_id: BrokerId,
    epoch: u64,
) -> Result<MetadataResponse, MetadataError> {
    current(image, broker_id, epoch)?;
    fence_and_evict(image, broker_id);
    Ok(MetadataResponse::Ok)
}

/// [`MetadataCommand::BeginControlledShutdown`]: like fencing, but the broker stays registered
/// and unfenced while it stops, and heartbeats no longer bring it back.
pub(super) fn begin_controlled_shutdown(
    image: &mut MetadataImage,
    broker_id: BrokerId,
    epoch: u64,
) -> Result<MetadataResponse, MetadataError> {
    current(image, broker_id, epoch)?;
    if let Some(b) = image.brokers.get_mut(&broker_id) {
        b.shutting_down = true;
    }
    partitions::evict(image, broker_id);
    Ok(MetadataResponse::Ok)
}

/// The checks of [`cancel_controlled_shutdown`]: the epoch is current and the broker is in
/// controlled shutdown.
pub(super) fn check_cancel_controlled_shutdown(
    image: &MetadataImage,
    broker_id: BrokerId,
    epoch: u64,
) -> Result<(), MetadataError> {
    let b = current(image, broker_id, epoch)?;
    if !b.shutting_down {
        return Err(MetadataError::Conflict(format!(
            "broker {broker_id} is not in controlled shutdown"
        )));
    }
    Ok(())
}

/// [`MetadataCommand::CancelControlledShutdown`]: the broker is available again (if it is not
/// fenced) and is readmitted to its partitions.
pub(super) fn cancel_controlled_shutdown(
    image: &mut MetadataImage,
    broker_id: BrokerId,
    epoch: u64,
) -> Result<MetadataResponse, MetadataError> {
    check_cancel_controlled_shutdown(image, broker_id, epoch)?;
    let mut fenced = true;
    if let Some(b) = image.brokers.get_mut(&broker_id) {
        b.shutting_down = false;
        fenced = b.fenced;
    }
    if !fenced {
        partitions::readmit(image, broker_id);
    }
    Ok(MetadataResponse::Ok)
}

#[cfg(test)]
mod tests {
    use super::super::testing::M;
    use super::*;

    #[test]
    fn a_broker_is_unfenced_once_caught_up_to_its_registration() {
        let mut m = M::new();
        let MetadataResponse::Registered { epoch } = m.ok(MetadataCommand::RegisterBroker {
            broker_id: 1,
            incarnation: 7,
            endpoints: vec![],
            rack: None,
        }) else {
            panic!()
        };
        assert!(m.m.image.brokers[&1].fenced);
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: epoch - 1,
        });
        assert!(m.m.image.brokers[&1].fenced, "not caught up yet");
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: epoch,
        });
        assert!(!m.m.image.brokers[&1].fenced);
        // Same incarnation again: same epoch, nothing changes.
        assert_eq!(
            m.ok(MetadataCommand::RegisterBroker {
                broker_id: 1,
                incarnation: 7,
                endpoints: vec![],
                rack: None,
            }),
            MetadataResponse::Registered { epoch }
        );
        assert!(!m.m.image.brokers[&1].fenced);
        // A new incarnation: new epoch, fenced, and the old epoch is stale.
        m.ok(MetadataCommand::RegisterBroker {
            broker_id: 1,
            incarnation: 8,
            endpoints: vec![],
            rack: None,
        });
        let e = m.err(MetadataCommand::Heartbeat {
            broker_id: 1,
            epoch,
            metadata_offset: 99,
        });
        assert!(matches!(e, MetadataError::StaleBrokerEpoch { .. }), "{e}");
    }

    #[test]
    fn a_heartbeat_claiming_an_offset_beyond_the_log_is_refused_and_does_not_unfence() {
        let mut m = M::new();
        let MetadataResponse::Registered { epoch } = m.ok(MetadataCommand::RegisterBroker {
            broker_id: 7,
            incarnation: 1,
            endpoints: vec![],
            rack: None,
        }) else {
            panic!("not registered")
        };
        // The heartbeat will be record 2: the broker cannot have applied record 2 or later.
        for claimed in [2, 3, u64::MAX] {
            let e = m.err(MetadataCommand::Heartbeat {
                broker_id: 7,
                epoch,
                metadata_offset: claimed,
            });
            assert!(
                matches!(&e, MetadataError::Invalid(r) if r.contains("log ends")),
                "{e}"
            );
        }
        assert!(m.m.image.brokers[&7].fenced);
        assert!(m
            .m
            .check(&MetadataCommand::Heartbeat {
                broker_id: 7,
                epoch,
                metadata_offset: m.caught_up() + 1,
            })
            .is_err());
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 7,
            epoch,
            metadata_offset: m.caught_up(),
        });
        assert!(!m.m.image.brokers[&7].fenced);
    }

    #[test]
    fn a_new_incarnation_gives_up_what_the_old_one_led() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 2, 2);
        let led_by_1 = (0..2).find(|p| m.partition("t", *p).leader == Some(1));
        let p = led_by_1.expect("broker 1 leads a partition");
        m.ok(MetadataCommand::RegisterBroker {
            broker_id: 1,
            incarnation: 999,
            endpoints: vec![],
            rack: None,
        });
        let st = m.partition("t", p);
        assert_eq!(st.leader, Some(2));
        assert_eq!(st.isr, vec![2]);
        assert!(m.m.image.brokers[&1].fenced);
    }

    #[test]
    fn controlled_shutdown_moves_leadership_away_and_heartbeats_do_not_bring_it_back() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b"), (3, "c")]);
        m.topic("t", 3, 3);
        m.ok(MetadataCommand::BeginControlledShutdown {
            broker_id: 2,
            epoch: epochs[&2],
        });
        m.ok(MetadataCommand::Heartbeat {
            broker_id: 2,
            epoch: epochs[&2],
            metadata_offset: m.caught_up(),
        });
        for p in 0..3 {
            let st = m.partition("t", p);
            assert_ne!(st.leader, Some(2), "{st:?}");
            assert!(!st.isr.contains(&2), "{st:?}");
        }
        // A new topic is placed only on the brokers that stay.
        for replicas in m.topic("u", 3, 2) {
            assert!(!replicas.contains(&2), "{replicas:?}");
        }
        assert!(!m.m.image.brokers[&2].fenced);
    }

    #[test]
    fn a_cancelled_controlled_shutdown_makes_the_broker_available_again() {
        let mut m = M::new();
        let epochs = m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 1, 2);
        let leader = m.partition("t", 0).leader.expect("a leader");
        assert!(matches!(
            m.err(MetadataCommand::CancelControlledShutdown {
                broker_id: leader,
                epoch: epochs[&leader],
            }),
            MetadataError::Conflict(_)
        ));
        m.ok(MetadataCommand::BeginControlledShutdown {
            broker_id: leader,
            epoch: epochs[&leader],
        });
        assert!(!m.partition("t", 0).isr.contains(&leader));
        m.ok(MetadataCommand::CancelControlledShutdown {
            broker_id: leader,
            epoch: epochs[&leader],
        });
        let b = &m.m.image.brokers[&leader];
        assert!(!b.shutting_down && !b.fenced);
        assert!(m.partition("t", 0).isr.contains(&leader), "back in the ISR");
    }

    #[test]
    fn unregistering_removes_the_broker_and_its_leadership() {
        let mut m = M::new();
        m.live(&[(1, "a"), (2, "b")]);
        m.topic("t", 2, 2);
        m.ok(MetadataCommand::UnregisterBroker { broker_id: 1 });
        assert!(!m.m.image.brokers.contains_key(&1));
        for p in 0..2 {
            assert_eq!(m.partition("t", p).leader, Some(2));
        }
        assert!(matches!(
            m.err(MetadataCommand::UnregisterBroker { broker_id: 1 }),
            MetadataError::UnknownBroker(1)
        ));
    }
}
