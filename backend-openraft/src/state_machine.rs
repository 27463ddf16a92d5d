//! `RaftStateMachine` over the user's byte state machine, with snapshots as files in the
//! shared snapshot store ([`SnapshotStore`]).
//!
//! A snapshot is never whole in memory, on either side:
//! - **Build.** Under the applied lock only [`ByteStateMachine::capture`] (a point-in-time view)
//!   and the snapshot's metadata (last applied log id, membership) are taken. The view is then
//!   written on a blocking thread into a [`SnapshotStore::create`] sink while applies go on,
//!   sealed (synced and checked), and installed as the stored snapshot only if it is newer than
//!   the current one.
//! - **Install.** A snapshot received from the leader arrives as a complete, checked file
//!   (streamed in chunks by `consensus_storage::transfer`, see `network`). An older one is
//!   refused; otherwise the file is installed in the store (durable) first, then, under the
//!   applied lock, the state machine takes the state it built aside while the file arrived
//!   ([`ByteStateMachine::install_prepared`], see `consensus_storage::aside`) or, when there is
//!   none, is restored from the file ([`ByteStateMachine::restore_from`]).
//! - **Current.** The current snapshot is kept as its metadata and an open
//!   [`SnapshotFile`](consensus_storage::SnapshotFile), which is what openraft hands the
//!   network to send to a lagging follower; it stays readable after a newer snapshot replaces
//!   it.

use std::io;
use std::sync::Arc;

use consensus_api::backend_support::SnapshotPacer;
use consensus_api::{codec, ByteStateMachine, NodeConfig, SnapshotView};
use consensus_storage::SnapshotStore;
use futures::{Stream, TryStreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::type_config::alias::{LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StoredMembership,
};
use tokio::sync::{Mutex, Notify, OwnedMutexGuard};

use crate::types::{Response, SnapshotData, C};

fn io_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Runs blocking work (snapshot file I/O, the user's capture and restore) off the async runtime.
/// Once started it runs to its end even if the caller stops waiting.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

#[derive(Default)]
struct Applied {
    last_applied: Option<LogIdOf<C>>,
    last_membership: StoredMembershipOf<C>,
}

/// The stored snapshot: its metadata and the open file (`None` before the first).
type Current = Option<(SnapshotMetaOf<C>, SnapshotData)>;

/// The state machine store openraft drives; clones share the same state.
#[derive(Clone)]
pub struct StateMachineStore {
    sm: Arc<dyn ByteStateMachine>,
    snapshots: SnapshotStore,
    /// Held while applying an entry, while capturing a snapshot view and while restoring, so a
    /// snapshot's state and its last log id always agree.
    applied: Arc<Mutex<Applied>>,
    /// Held from the check that a snapshot is newer than the current one until its file is
    /// installed: a build captured before an install finishes after it, and must not replace
    /// the newer file that openraft has already purged the log up to. Taken before `applied`.
    current: Arc<Mutex<Current>>,
    /// Set by [`StateMachineStore::paced`]: when automatic snapshots are due.
    pacing: Option<(Arc<SnapshotPacer>, Arc<Notify>)>,
    /// Size of the state in the snapshot loaded at open (0 when none).
    loaded_size: u64,
}

impl StateMachineStore {
    /// Restores the user's state machine from the stored snapshot, if any, streaming it from
    /// the file. Blocking: call it off the async runtime for a large state.
    pub fn open(sm: Arc<dyn ByteStateMachine>, snapshots: SnapshotStore) -> io::Result<Self> {
        let mut applied = Applied::default();
        let mut current = None;
        let mut loaded_size = 0;
        if let Some(file) = snapshots.current().map_err(io_err)? {
            let meta: SnapshotMetaOf<C> = codec::decode(file.meta()).map_err(io_err)?;
            sm.restore_from(&mut file.data()).map_err(io_err)?;
            loaded_size = file.data_len();
            applied.last_applied = meta.last_log_id;
            applied.last_membership = meta.last_membership.clone();
            current = Some((meta, file));
        }
        Ok(Self {
            sm,
            snapshots,
            applied: Arc::new(Mutex::new(applied)),
            current: Arc::new(Mutex::new(current)),
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
        self.current.try_lock().map(|c| c.is_some()).unwrap_or(true)
    }

    /// Installs `file` as the stored snapshot and makes `(meta, file)` current. The caller has
    /// checked, under `current`, that they are not older; the guard moves into the blocking
    /// work and is released only when the file is installed, even if the caller stops waiting.
    async fn replace(
        &self,
        mut current: OwnedMutexGuard<Current>,
        meta: &SnapshotMetaOf<C>,
        file: &SnapshotData,
    ) -> io::Result<()> {
        let store = self.snapshots.clone();
        let (meta, file) = (meta.clone(), file.clone());
        blocking(move || {
            store.install(&file).map_err(io_err)?;
            *current = Some((meta, file));
            Ok(())
        })
        .await
    }

    /// Captures a point-in-time view of the user's state and its metadata under the applied
    /// lock; nothing is written yet.
    async fn capture(&self) -> io::Result<(SnapshotMetaOf<C>, Box<dyn SnapshotView>)> {
        let applied = self.applied.lock().await;
        let sm = self.sm.clone();
        // A state machine without a view serializes here, holding applies off meanwhile.
        let view = blocking(move || sm.capture().map_err(io_err)).await?;
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.last_membership.clone(),
        };
        Ok((meta, view))
    }

    /// Writes a captured view to a new snapshot file (synced and checked, not installed) on a
    /// blocking thread, while applies go on.
    async fn write(
        &self,
        meta: &SnapshotMetaOf<C>,
        view: Box<dyn SnapshotView>,
    ) -> io::Result<SnapshotData> {
        let meta_bytes = codec::encode(meta).map_err(io_err)?;
        let store = self.snapshots.clone();
        let file = blocking(move || {
            let mut sink = store.create(&meta_bytes).map_err(io_err)?;
            view.write_to(&mut sink).map_err(io_err)?;
            sink.seal().map_err(io_err)
        })
        .await?;
        if let Some((pacer, _)) = &self.pacing {
            pacer.taken(usize::try_from(file.data_len()).unwrap_or(usize::MAX));
        }
        Ok(file)
    }

    /// Installs a built snapshot if it is newer than the current one, and returns the snapshot
    /// that is current afterwards. A build overtaken by an install (or by another build) is
    /// dropped, and its file with it: openraft ignores a returned snapshot that is not newer
    /// than its own, so returning the current one purges nothing the file does not cover.
    async fn keep(
        &self,
        meta: SnapshotMetaOf<C>,
        file: SnapshotData,
    ) -> io::Result<SnapshotOf<C, SnapshotData>> {
        let current = self.current.clone().lock_owned().await;
        if let Some((cur, cur_file)) = current.as_ref() {
            if meta.last_log_id <= cur.last_log_id {
                tracing::info!(
                    built = %meta,
                    current = %cur,
                    "dropping a built snapshot that is not newer than the current one"
                );
                return Ok(Snapshot {
                    meta: cur.clone(),
                    snapshot: cur_file.clone(),
                });
            }
        }
        self.replace(current, &meta, &file).await?;
        Ok(Snapshot {
            meta,
            snapshot: file,
        })
    }

    /// `file` as a file this store can install: a received or sealed file waiting in this
    /// store's directory is used as it is; one that is already some store's snapshot (handed
    /// over in process, as openraft's storage suite does) is copied, because installing it
    /// would leave this store's own file unchanged.
    async fn adopt(&self, file: SnapshotData) -> io::Result<SnapshotData> {
        if !file.is_installed() {
            return Ok(file);
        }
        let store = self.snapshots.clone();
        blocking(move || store.import(&file).map_err(io_err)).await
    }
}

impl RaftSnapshotBuilder<C> for StateMachineStore {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<C, SnapshotData>, io::Error> {
        let (meta, view) = self.capture().await?;
        let file = self.write(&meta, view).await?;
        self.keep(meta, file).await
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
        let current = self.current.clone().lock_owned().await;
        if let Some((cur, _)) = current.as_ref() {
            // openraft installs only snapshots past its committed index, so this is a broken
            // promise; going back would lose the entries between the two, already purged.
            if meta.last_log_id < cur.last_log_id {
                return Err(io::Error::other(format!(
                    "refusing to install snapshot {meta}: older than the current snapshot {cur}, \
                     whose log may already be purged"
                )));
            }
        }
        // The file carries the metadata a restart reads back: it must be the one installed.
        let stored: SnapshotMetaOf<C> = codec::decode(snapshot.meta()).map_err(io_err)?;
        if stored != *meta {
            return Err(io::Error::other(format!(
                "refusing to install snapshot {meta}: its file holds snapshot {stored}"
            )));
        }
        // The state built aside while the file arrived, if any (see consensus_storage::aside).
        let prepared = snapshot.take_prepared();
        let file = self.adopt(snapshot).await?;
        // Durable first: a crash after restoring memory but before installing the file would
        // lose the state the log no longer has.
        self.replace(current, meta, &file).await?;
        let mut a = self.applied.lock().await;
        let sm = self.sm.clone();
        blocking(move || match prepared.and_then(|p| p.wait(&file)) {
            Some(state) => sm.install_prepared(state).map_err(io_err),
            None => sm.restore_from(&mut file.data()).map_err(io_err),
        })
        .await?;
        a.last_applied = meta.last_log_id;
        a.last_membership = meta.last_membership.clone();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<C, SnapshotData>>, io::Error> {
        let current = self.current.lock().await;
        Ok(current
            .clone()
            .map(|(meta, snapshot)| Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc;

    use consensus_api::ConsensusError;
    use openraft::entry::RaftEntry;
    use openraft::type_config::alias::EntryOf;
    use openraft::LogId;

    use super::*;
    use crate::types::Request;

    /// Blocks the first `snapshot()` until released, to hold a build inside its capture.
    struct Gate {
        entered: mpsc::Sender<()>,
        release: mpsc::Receiver<()>,
    }

    /// Echoes commands and snapshots their concatenation.
    #[derive(Default)]
    struct Echo {
        state: parking_lot::Mutex<Vec<u8>>,
        gate: parking_lot::Mutex<Option<Gate>>,
    }

    impl ByteStateMachine for Echo {
        fn apply(&self, _index: u64, command: &[u8]) -> Vec<u8> {
            self.state.lock().extend_from_slice(command);
            command.to_vec()
        }
        fn snapshot(&self) -> Result<Vec<u8>, ConsensusError> {
            let gate = self.gate.lock().take();
            if let Some(g) = gate {
                g.entered.send(()).expect("test waits for the build");
                g.release.recv().expect("test releases the build");
            }
            Ok(self.state.lock().clone())
        }
        fn restore(&self, snapshot: &[u8]) -> Result<(), ConsensusError> {
            *self.state.lock() = snapshot.to_vec();
            Ok(())
        }
    }

    fn log_id(index: u64) -> LogIdOf<C> {
        LogId::new_term_index(1, index)
    }

    fn meta(index: u64) -> SnapshotMetaOf<C> {
        SnapshotMeta {
            last_log_id: Some(log_id(index)),
            last_membership: StoredMembership::default(),
        }
    }

    fn open(dir: &std::path::Path, sm: Arc<Echo>) -> StateMachineStore {
        let log = consensus_storage::Log::open(dir).expect("open log");
        let snaps = log.snapshot_store().expect("open snapshots");
        StateMachineStore::open(sm, snaps).expect("open state machine")
    }

    /// A snapshot file at `index` holding `state`, waiting in `store`'s directory as one
    /// received from a leader does (complete and checked, not installed).
    fn received(store: &StateMachineStore, index: u64, state: &[u8]) -> SnapshotData {
        let meta = codec::encode(&meta(index)).expect("encode meta");
        let mut sink = store.snapshots.create(&meta).expect("create");
        sink.write_all(state).expect("write");
        sink.seal().expect("seal")
    }

    /// Applies the command `a` at index 1, `b` at 2, ..., over `indexes`.
    async fn apply_at(store: &mut StateMachineStore, indexes: std::ops::RangeInclusive<u64>) {
        let entries = indexes.map(|i| {
            let cmd = vec![b'a' + (i - 1) as u8];
            Ok((EntryOf::<C>::new_normal(log_id(i), Request(cmd)), None))
        });
        store
            .apply(futures::stream::iter(entries))
            .await
            .expect("apply");
    }

    /// The stored file's last log id, read back through a fresh `SnapshotStore`.
    fn stored_last_log_id(dir: &std::path::Path) -> Option<LogIdOf<C>> {
        let (meta, _) = SnapshotStore::peek(dir)
            .expect("load")
            .expect("a stored snapshot");
        let meta: SnapshotMetaOf<C> = codec::decode(&meta).expect("decode meta");
        meta.last_log_id
    }

    async fn current_last_log_id(store: &mut StateMachineStore) -> Option<LogIdOf<C>> {
        store
            .get_current_snapshot()
            .await
            .expect("current snapshot")
            .and_then(|s| s.meta.last_log_id)
    }

    /// Temporary snapshot files left in `dir`.
    fn temporaries(dir: &std::path::Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("list")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    /// A follower's own build captured at index 2 finishes after the leader's snapshot at index 5
    /// was installed: the file and the current snapshot stay at 5, because openraft has already
    /// purged the log up to 5 and a restart from 2 could not re-apply 3..=5.
    #[tokio::test]
    async fn a_build_finishing_after_a_newer_install_does_not_replace_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(dir.path(), Arc::new(Echo::default()));
        apply_at(&mut store, 1..=2).await;

        let builder = store.get_snapshot_builder().await;
        let (built_meta, view) = builder.capture().await.expect("capture");
        assert_eq!(built_meta.last_log_id, Some(log_id(2)));

        let leader = received(&store, 5, b"abcde");
        store
            .install_snapshot(&meta(5), leader)
            .await
            .expect("install");
        let built = builder.write(&built_meta, view).await.expect("write");
        let returned = builder.keep(built_meta, built).await.expect("keep");

        assert_eq!(
            stored_last_log_id(dir.path()),
            Some(log_id(5)),
            "the stored snapshot went back to the older build"
        );
        assert_eq!(current_last_log_id(&mut store).await, Some(log_id(5)));
        assert_eq!(
            returned.meta.last_log_id,
            Some(log_id(5)),
            "a superseded build reports the current snapshot"
        );
        assert_eq!(returned.snapshot.read_data().expect("read"), b"abcde");
        assert_eq!(
            temporaries(dir.path()),
            Vec::<String>::new(),
            "the dropped build's file is removed"
        );

        // A restart: the old node's store (and with it the data-dir lock) is gone first.
        drop((store, builder, returned));
        let sm = Arc::new(Echo::default());
        let (applied, _) = open(dir.path(), sm.clone())
            .applied_state()
            .await
            .expect("applied state");
        assert_eq!(
            applied,
            Some(log_id(5)),
            "a restart resumes before the install"
        );
        assert_eq!(&sm.state.lock()[..], b"abcde");
    }

    /// The same race through openraft's own calls: the build is held inside its capture while the
    /// install runs, in whatever order the two then reach the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_build_racing_a_newer_install_leaves_the_install_stored() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let sm = Arc::new(Echo::default());
        let mut store = open(dir.path(), sm.clone());
        apply_at(&mut store, 1..=2).await;
        *sm.gate.lock() = Some(Gate {
            entered: entered_tx,
            release: release_rx,
        });

        let mut builder = store.get_snapshot_builder().await;
        let build = tokio::spawn(async move { builder.build_snapshot().await });
        tokio::task::spawn_blocking(move || entered.recv())
            .await
            .expect("join")
            .expect("build entered its capture");
        let mut installer = store.clone();
        let leader = received(&store, 5, b"abcde");
        let install =
            tokio::spawn(async move { installer.install_snapshot(&meta(5), leader).await });
        // Gives the install the time to reach the file (or its lock) before the build goes on.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        release.send(()).expect("release the build");
        build.await.expect("join build").expect("build");
        install.await.expect("join install").expect("install");

        assert_eq!(stored_last_log_id(dir.path()), Some(log_id(5)));
        assert_eq!(current_last_log_id(&mut store).await, Some(log_id(5)));
        assert_eq!(&sm.state.lock()[..], b"abcde");
    }

    /// A build at the current snapshot's own log id succeeds and reports the current snapshot.
    #[tokio::test]
    async fn a_build_at_the_current_log_id_keeps_the_current_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(dir.path(), Arc::new(Echo::default()));
        let leader = received(&store, 5, b"abcde");
        store
            .install_snapshot(&meta(5), leader)
            .await
            .expect("install");
        let built = store
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        assert_eq!(built.meta.last_log_id, Some(log_id(5)));
        assert_eq!(stored_last_log_id(dir.path()), Some(log_id(5)));
    }

    /// A newer build replaces the current snapshot, on disk and in memory, and a restart
    /// restores the state from it.
    #[tokio::test]
    async fn a_newer_build_replaces_the_current_snapshot() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut store = open(dir.path(), Arc::new(Echo::default()));
        let leader = received(&store, 2, b"ab");
        store
            .install_snapshot(&meta(2), leader)
            .await
            .expect("install");
        apply_at(&mut store, 3..=4).await;
        let built = store
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        assert_eq!(built.meta.last_log_id, Some(log_id(4)));
        assert_eq!(built.snapshot.read_data().expect("read"), b"abcd");
        assert_eq!(stored_last_log_id(dir.path()), Some(log_id(4)));
        assert_eq!(current_last_log_id(&mut store).await, Some(log_id(4)));

        drop((store, built));
        let sm = Arc::new(Echo::default());
        let (applied, _) = open(dir.path(), sm.clone())
            .applied_state()
            .await
            .expect("applied state");
        assert_eq!(applied, Some(log_id(4)));
        assert_eq!(&sm.state.lock()[..], b"abcd");
    }

    /// Installing a snapshot older than the current one is refused and changes nothing: the log
    /// may already be purged up to the current one.
    #[tokio::test]
    async fn installing_an_older_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sm = Arc::new(Echo::default());
        let mut store = open(dir.path(), sm.clone());
        let newer = received(&store, 5, b"abcde");
        store
            .install_snapshot(&meta(5), newer)
            .await
            .expect("install");
        let older = received(&store, 3, b"abc");
        let older = store.install_snapshot(&meta(3), older).await;
        assert!(older.is_err(), "an older install was accepted");
        assert_eq!(stored_last_log_id(dir.path()), Some(log_id(5)));
        assert_eq!(current_last_log_id(&mut store).await, Some(log_id(5)));
        assert_eq!(&sm.state.lock()[..], b"abcde");
        let (applied, _) = store.applied_state().await.expect("applied state");
        assert_eq!(applied, Some(log_id(5)));
    }

    /// A file whose own metadata is not the snapshot openraft installs is refused: a restart
    /// would read the file's.
    #[tokio::test]
    async fn a_file_holding_another_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let sm = Arc::new(Echo::default());
        let mut store = open(dir.path(), sm.clone());
        let file = received(&store, 4, b"abcd");
        assert!(store.install_snapshot(&meta(5), file).await.is_err());
        assert!(store
            .get_current_snapshot()
            .await
            .expect("current")
            .is_none());
        assert!(sm.state.lock().is_empty());
    }

    /// Another store's snapshot (handed over in process) is copied into this store, so a
    /// restart finds it here.
    #[tokio::test]
    async fn a_snapshot_of_another_store_is_copied_into_this_one() {
        let (dir_a, dir_b) = (
            tempfile::tempdir().expect("temp dir"),
            tempfile::tempdir().expect("temp dir"),
        );
        let mut a = open(dir_a.path(), Arc::new(Echo::default()));
        apply_at(&mut a, 1..=3).await;
        let built = a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        let mut b = open(dir_b.path(), Arc::new(Echo::default()));
        b.install_snapshot(&built.meta, built.snapshot)
            .await
            .expect("install");
        drop(b);
        let sm = Arc::new(Echo::default());
        let (applied, _) = open(dir_b.path(), sm.clone())
            .applied_state()
            .await
            .expect("applied state");
        assert_eq!(applied, Some(log_id(3)));
        assert_eq!(&sm.state.lock()[..], b"abc");
    }
}
