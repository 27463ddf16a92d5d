//! `RaftStateMachine` over the user's byte state machine, with snapshots in the shared
//! snapshot store.

use std::io;
use std::sync::Arc;

use consensus_api::backend_support::SnapshotPacer;
use consensus_api::{codec, ByteStateMachine, NodeConfig};
use consensus_storage::SnapshotStore;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership,
};
use tokio::sync::{Mutex, Notify};

use crate::types::{Response, SnapshotData, C};

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

#[derive(Default)]
struct Applied {
    last_applied: Option<LogIdOf<C>>,
    last_membership: StoredMembershipOf<C>,
    current: Option<(SnapshotMetaOf<C>, SnapshotData)>,
}

/// The state machine store openraft drives; clones share the same state.
#[derive(Clone)]
pub struct StateMachineStore {
    sm: Arc<dyn ByteStateMachine>,
    snapshots: SnapshotStore,
    /// Held while applying an entry and while capturing a snapshot, so a snapshot's bytes and
    /// its last log id always agree.
    applied: Arc<Mutex<Applied>>,
    /// Serializes snapshot file writes.
    save: Arc<Mutex<()>>,
    /// Set by [`StateMachineStore::paced`]: when automatic snapshots are due.
    pacing: Option<(Arc<SnapshotPacer>, Arc<Notify>)>,
    /// Size of the snapshot loaded at open (0 when none).
    loaded_size: u64,
}

impl StateMachineStore {
    /// Restores the user's state machine from the stored snapshot, if any.
    pub fn open(sm: Arc<dyn ByteStateMachine>, snapshots: SnapshotStore) -> io::Result<Self> {
        let mut applied = Applied::default();
        let mut loaded_size = 0;
        if let Some((meta, data)) = snapshots.load().map_err(io_err)? {
            loaded_size = data.len() as u64;
            let meta: SnapshotMetaOf<C> = codec::decode(&meta).map_err(io_err)?;
            sm.restore(&data).map_err(io_err)?;
            applied.last_applied = meta.last_log_id;
            applied.last_membership = meta.last_membership.clone();
            applied.current = Some((meta, data));
        }
        Ok(Self {
            sm,
            snapshots,
            applied: Arc::new(Mutex::new(applied)),
            save: Arc::new(Mutex::new(())),
            pacing: None,
            loaded_size,
        })
    }

    /// Paces automatic snapshots by `config`'s rules ([`SnapshotPacer`]): the returned `Notify`
    /// fires when one is due, for the engine to trigger (openraft's own policy is off then).
    pub fn paced(mut self, config: &NodeConfig) -> (Self, Arc<Notify>) {
        let due = Arc::new(Notify::new());
        let pacer = Arc::new(SnapshotPacer::new(config, self.loaded_size));
        self.pacing = Some((pacer, due.clone()));
        (self, due)
    }

    /// Whether a snapshot was loaded or installed (a data dir with one is not fresh).
    pub fn has_snapshot(&self) -> bool {
        self.applied
            .try_lock()
            .map(|a| a.current.is_some())
            .unwrap_or(true)
    }

    async fn persist(&self, meta: &SnapshotMetaOf<C>, data: &SnapshotData) -> io::Result<()> {
        let _guard = self.save.lock().await;
        let meta_bytes = codec::encode(meta).map_err(io_err)?;
        let store = self.snapshots.clone();
        // A reference count, not a copy of the state.
        let data = data.clone();
        tokio::task::spawn_blocking(move || store.save(&meta_bytes, &data))
            .await
            .map_err(io_err)?
            .map_err(io_err)
    }
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotData>, io::Error> {
        let (meta, data) = {
            let applied = self.applied.lock().await;
            let data = SnapshotData::from(self.sm.snapshot().map_err(io_err)?);
            if let Some((pacer, _)) = &self.pacing {
                pacer.taken(data.len());
            }
            let meta = SnapshotMeta {
                last_log_id: applied.last_applied,
                last_membership: applied.last_membership.clone(),
            };
            (meta, data)
        };
        self.persist(&meta, &data).await?;
        let mut applied = self.applied.lock().await;
        let newer = match (&applied.current, meta.last_log_id) {
            (Some((cur, _)), Some(new)) => cur.last_log_id.is_none_or(|c| c <= new),
            _ => true,
        };
        if newer {
            applied.current = Some((meta.clone(), data.clone()));
        }
        Ok(Snapshot {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<C> for StateMachineStore {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<C>>, StoredMembershipOf<C>), io::Error> {
        let a = self.applied.lock().await;
        Ok((a.last_applied, a.last_membership.clone()))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<C>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let response = {
                let mut a = self.applied.lock().await;
                a.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => Response::default(),
                    EntryPayload::Normal(req) => {
                        if let Some((pacer, due)) = &self.pacing {
                            if pacer.applied(req.0.len()) {
                                due.notify_one();
                            }
                        }
                        Response(self.sm.apply(entry.log_id.index, &req.0))
                    }
                    EntryPayload::Membership(m) => {
                        a.last_membership = StoredMembership::new(Some(entry.log_id), m);
                        Response::default()
                    }
                }
            };
            if let Some(r) = responder {
                r.send(response);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<C>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        // Durable first: a crash after restoring memory but before saving would lose the state
        // the log no longer has.
        self.persist(meta, &snapshot).await?;
        let mut a = self.applied.lock().await;
        self.sm.restore(&snapshot).map_err(io_err)?;
        a.last_applied = meta.last_log_id;
        a.last_membership = meta.last_membership.clone();
        a.current = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, SnapshotData>>, io::Error> {
        let a = self.applied.lock().await;
        Ok(a.current
            .clone()
            .map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}
