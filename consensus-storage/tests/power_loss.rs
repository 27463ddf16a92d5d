//! The log and the snapshot store on a disk that loses power ([`SimFs`]).
//!
//! The property tests run random sequences of writes (appends that cross pages and replace
//! suffixes, truncates, purges, metadata, with and without callbacks, log rewrites) and cut the
//! power at random points, then reopen. After every reopen:
//!
//! - every write whose callback reported success is there (nothing acknowledged is lost);
//! - the log equals the state after some prefix of the accepted records (nothing appears that
//!   was never written, nothing from the middle is missing);
//! - opening never fails: a torn unsynced tail is repaired, not refused.
//!
//! Each test prints its seed; `POWER_LOSS_SEED=<n>` replays one (the cut races the writer
//! thread, so a replay follows the same operations and cut choices, not the same thread timing).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use bytes::Bytes;
use consensus_storage::fs::{FileSystem, SimFs, SimOp};
use consensus_storage::{Entry, Log, LogOptions, StorageError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The log's content as the tests compare it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    entries: BTreeMap<u64, (u64, Bytes)>,
    purged: Option<(u64, u64, Bytes)>,
    metas: BTreeMap<u8, Bytes>,
}

const META_KEYS: [u8; 3] = [1, 2, 9];

impl Model {
    fn read(log: &Log) -> Model {
        let st = log.state();
        let mut m = Model {
            purged: st.purged.clone(),
            ..Model::default()
        };
        if let (Some(first), Some(last)) = (st.first_index, st.last_index) {
            for e in log.entries(first, last + 1, None) {
                m.entries.insert(e.index, (e.term, e.data));
            }
        }
        for k in META_KEYS {
            if let Some(v) = log.meta(k) {
                m.metas.insert(k, v);
            }
        }
        m
    }

    fn last(&self) -> Option<u64> {
        self.entries.keys().next_back().copied()
    }

    fn first(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    fn next_index(&self) -> u64 {
        self.last()
            .or(self.purged.as_ref().map(|p| p.0))
            .unwrap_or(0)
            + 1
    }
}

/// The run: the model after each accepted record, and the highest acknowledged one.
struct Run {
    versions: Vec<Model>,
    /// Record count covered by the latest successful callback (shared with the callbacks).
    acked: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
}

impl Run {
    fn new(start: Model) -> Self {
        Run {
            versions: vec![start],
            acked: Arc::new(AtomicUsize::new(0)),
            failed: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn current(&self) -> Model {
        self.versions.last().cloned().unwrap_or_default()
    }

    /// A callback acknowledging the first `records` versions.
    fn callback(&self) -> consensus_storage::SyncCallback {
        let records = self.versions.len() - 1;
        let acked = self.acked.clone();
        let failed = self.failed.clone();
        Box::new(move |r| match r {
            Ok(()) => {
                acked.fetch_max(records, Ordering::SeqCst);
            }
            Err(_) => {
                failed.fetch_add(1, Ordering::SeqCst);
            }
        })
    }

    /// The recovered `model` must be a version at or after the acknowledged one.
    fn check(&self, seed: u64, round: usize, recovered: &Model) {
        let acked = self.acked.load(Ordering::SeqCst);
        let found = self.versions[acked..].iter().position(|v| v == recovered);
        assert!(
            found.is_some(),
            "seed {seed} round {round}: the reopened log is no version at or after the \
             acknowledged record {acked} of {}: recovered {} entries (last {:?}, purged {:?}); \
             acknowledged version has last {:?}; an older version matches: {:?}",
            self.versions.len() - 1,
            recovered.entries.len(),
            recovered.last(),
            recovered.purged.as_ref().map(|p| p.0),
            self.versions[acked].last(),
            self.versions.iter().position(|v| v == recovered),
        );
    }
}

fn data(rng: &mut StdRng, n: u64) -> Bytes {
    // Sizes that cross 4 KiB pages and the preallocation step.
    let len = match rng.gen_range(0..10) {
        0 => 0,
        1..=6 => rng.gen_range(1..200),
        _ => rng.gen_range(2000..9000),
    };
    let b = (n % 251) as u8;
    Bytes::from(vec![b; len])
}

/// One random write against `log`, recorded in `run`.
fn step(rng: &mut StdRng, log: &Log, run: &mut Run, n: &mut u64) -> Result<(), StorageError> {
    let cur = run.current();
    let with_cb = rng.gen_bool(0.6);
    match rng.gen_range(0..20) {
        0..=11 => {
            let lo = cur.first().unwrap_or_else(|| cur.next_index());
            let start = if rng.gen_bool(0.8) {
                cur.next_index()
            } else {
                rng.gen_range(lo..=cur.next_index())
            };
            let term = rng.gen_range(1..4);
            let count = rng.gen_range(1..6);
            let mut entries = Vec::new();
            let mut m = cur;
            for i in 0..count {
                *n += 1;
                let e = Entry {
                    index: start + i,
                    term,
                    data: data(rng, *n),
                };
                m.entries.split_off(&e.index);
                m.entries.insert(e.index, (e.term, e.data.clone()));
                run.versions.push(m.clone());
                entries.push(e);
            }
            let cb = with_cb.then(|| run.callback());
            log.append(entries, cb)
        }
        12..=13 => {
            let Some(last) = cur.last() else {
                return Ok(());
            };
            let lo = cur.first().unwrap_or(last);
            let at = rng.gen_range(lo..=last);
            let mut m = cur;
            m.entries.split_off(&at);
            run.versions.push(m);
            let cb = with_cb.then(|| run.callback());
            log.truncate(at, cb)
        }
        14..=15 => {
            let (Some(first), Some(last)) = (cur.first(), cur.last()) else {
                return Ok(());
            };
            let at = rng.gen_range(first..=last);
            let term = cur.entries[&at].0;
            let note = Bytes::from(format!("note-{at}"));
            let mut m = cur;
            m.entries = m.entries.split_off(&(at + 1));
            m.purged = Some((at, term, note.clone()));
            run.versions.push(m);
            let cb = with_cb.then(|| run.callback());
            log.purge(at, term, note, cb)
        }
        16..=18 => {
            let key = META_KEYS[rng.gen_range(0..META_KEYS.len())];
            *n += 1;
            let v = Bytes::from(format!("v{n}"));
            let mut m = cur;
            m.metas.insert(key, v.clone());
            run.versions.push(m);
            let cb = with_cb.then(|| run.callback());
            log.set_meta(key, v, cb)
        }
        _ => {
            let cb = run.callback();
            log.on_durable(cb)
        }
    }
}

fn options(rng: &mut StdRng) -> LogOptions {
    LogOptions {
        // Small enough that runs rewrite the file now and then.
        rewrite_min_bytes: if rng.gen_bool(0.5) { 64 << 10 } else { 1 << 30 },
        preallocate_bytes: match rng.gen_range(0..3) {
            0 => 0,
            1 => 8 << 10,
            _ => 64 << 10,
        },
        ..Default::default()
    }
}

fn seeds(default: std::ops::Range<u64>) -> Vec<u64> {
    match std::env::var("POWER_LOSS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => default.collect(),
    }
}

fn open(fs: &SimFs, dir: &Path, options: LogOptions) -> Log {
    let fs: Arc<dyn FileSystem> = Arc::new(fs.process());
    Log::open_in(fs, dir, options).unwrap_or_else(|e| panic!("reopen after a power cut: {e}"))
}

/// Runs `rounds` rounds of random writes, each ended by a power cut, on one disk.
fn power_loss_run(seed: u64, rounds: usize) {
    eprintln!("power-loss seed {seed} (POWER_LOSS_SEED={seed} replays)");
    let mut rng = StdRng::seed_from_u64(seed);
    let fs = SimFs::new(seed);
    let dir = PathBuf::from("/node/data");
    let mut expected = Model::default();
    let mut n = 0u64;
    for round in 0..rounds {
        let opts = options(&mut rng);
        let log = open(&fs, &dir, opts);
        let recovered = Model::read(&log);
        if round > 0 {
            assert_eq!(
                recovered, expected,
                "seed {seed} round {round}: a second open changed the log"
            );
        }
        let mut run = Run::new(recovered);
        for _ in 0..rng.gen_range(5..120) {
            if let Err(e) = step(&mut rng, &log, &mut run, &mut n) {
                panic!("seed {seed} round {round}: a write was refused: {e}");
            }
            if rng.gen_bool(0.05) {
                // Let the writer catch up now and then, so cuts land at all depths.
                log.sync()
                    .unwrap_or_else(|e| panic!("seed {seed}: sync: {e}"));
                run.acked
                    .fetch_max(run.versions.len() - 1, Ordering::SeqCst);
            }
        }
        if rng.gen_bool(0.3) {
            std::thread::sleep(Duration::from_micros(rng.gen_range(0..500)));
        }
        fs.power_cut();
        drop(log);
        let log = open(&fs, &dir, opts);
        let recovered = Model::read(&log);
        run.check(seed, round, &recovered);
        log.close();
        drop(log);
        expected = recovered;
    }
}

#[test]
fn acknowledged_writes_survive_power_cuts_and_nothing_else_appears() {
    for seed in seeds(0..48) {
        power_loss_run(seed, 6);
    }
}

#[test]
fn damage_before_the_synced_end_is_refused_with_its_location() {
    for seed in seeds(100..124) {
        eprintln!("seed {seed}");
        let mut rng = StdRng::seed_from_u64(seed);
        let fs = SimFs::new(seed);
        let dir = PathBuf::from("/d");
        let log = open(&fs, &dir, LogOptions::default());
        let mut offsets = Vec::new();
        let mut at = 0u64;
        let count = rng.gen_range(3..30);
        for i in 1..=count {
            let e = Entry {
                index: i,
                term: 1,
                data: Bytes::from(vec![1u8; rng.gen_range(1..3000)]),
            };
            offsets.push(at);
            at += 8 + 1 + 8 + 8 + e.data.len() as u64;
            log.append(vec![e], None).unwrap_or_else(|e| panic!("{e}"));
        }
        log.sync().unwrap_or_else(|e| panic!("{e}"));
        // The next write carries the sync mark that proves all of the above durable.
        log.set_meta(1, Bytes::from_static(b"x"), None)
            .unwrap_or_else(|e| panic!("{e}"));
        log.sync().unwrap_or_else(|e| panic!("{e}"));
        log.close();
        drop(log);
        let victim = rng.gen_range(0..offsets.len());
        let byte = offsets[victim] + rng.gen_range(4..17);
        fs.flip_byte(&dir.join("raft.log"), byte)
            .unwrap_or_else(|e| panic!("{e}"));
        fs.power_cut();
        let fsd: Arc<dyn FileSystem> = Arc::new(fs.clone());
        match Log::open_in(fsd, &dir, LogOptions::default()) {
            Err(StorageError::Corrupt { offset, .. }) => {
                assert_eq!(offset, offsets[victim], "seed {seed}: wrong location")
            }
            Err(e) => panic!("seed {seed}: expected corruption, got {e}"),
            Ok(_) => panic!("seed {seed}: damage before the synced end was accepted"),
        }
    }
}

/// Fills a log so that purging most of it makes the writer rewrite the file.
fn log_due_for_rewrite(fs: &SimFs, dir: &Path) -> Log {
    let opts = LogOptions {
        rewrite_min_bytes: 64 << 10,
        preallocate_bytes: 0,
        ..Default::default()
    };
    let log = open(fs, dir, opts);
    let entries = (1..=100)
        .map(|i| Entry {
            index: i,
            term: 1,
            data: Bytes::from(vec![3u8; 1000]),
        })
        .collect();
    log.append(entries, None).unwrap_or_else(|e| panic!("{e}"));
    log.sync().unwrap_or_else(|e| panic!("{e}"));
    log
}

fn append_acked(log: &Log, index: u64) -> bool {
    let (tx, rx) = mpsc::channel();
    let e = Entry {
        index,
        term: 1,
        data: Bytes::from_static(b"after"),
    };
    let cb = Box::new(move |r: Result<(), String>| {
        let _ = tx.send(r.is_ok());
    });
    match log.append(vec![e], Some(cb)) {
        Err(_) => false,
        Ok(()) => rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false),
    }
}

/// Defect 2: a rewrite that fails after its rename (here: the reopen of the new file fails,
/// as with no file descriptors left) must stop the log. Before the fix the writer kept
/// appending to the unlinked old file and acknowledged writes a restart never sees.
#[test]
fn a_rewrite_failing_after_its_rename_stops_the_log_instead_of_losing_writes() {
    for failing in [SimOp::Open, SimOp::SyncDir] {
        let fs = SimFs::new(5);
        let dir = PathBuf::from("/d");
        let log = log_due_for_rewrite(&fs, &dir);
        let suffix = if failing == SimOp::Open {
            "raft.log"
        } else {
            ""
        };
        fs.fail_on(failing, suffix, 1);
        log.purge(95, 1, Bytes::new(), None)
            .unwrap_or_else(|e| panic!("{e}"));
        let _ = log.sync();
        // The purge's batch triggers the rewrite once written; give the writer a turn.
        let _ = log.sync();
        let acked = append_acked(&log, 101);
        // Something else in the directory syncs it (a snapshot save): the rename is durable.
        if let Ok(store) = log.snapshot_store() {
            let _ = store.save(b"m", b"d");
        }
        fs.power_cut();
        drop(log);
        let log = open(&fs, &dir, LogOptions::default());
        let present = log.entry(101).is_some();
        assert!(
            !acked || present,
            "{failing:?} failure after the rename: entry 101 was acknowledged and is gone"
        );
        assert!(
            !acked,
            "{failing:?}: the log must stop after a failed rewrite"
        );
    }
}

/// Defect 4: the data-dir lock must outlive the log while a snapshot save is still running,
/// so a node restarted in the same process cannot race it on the snapshot's temp file.
#[test]
fn the_data_dir_stays_locked_until_a_running_snapshot_save_ends() {
    let fs = SimFs::new(9);
    let dir = PathBuf::from("/d");
    let log = open(&fs, &dir, LogOptions::default());
    let store = log.snapshot_store().unwrap_or_else(|e| panic!("{e}"));
    let gate = fs.gate_writes("snapshot.tmp");
    let saving = std::thread::spawn(move || store.save(b"meta", &[7u8; 10_000]));
    assert!(
        gate.wait_blocked(Duration::from_secs(10)),
        "the save never started"
    );
    log.close();
    drop(log);
    let fsd: Arc<dyn FileSystem> = Arc::new(fs.clone());
    match Log::open_in(fsd.clone(), &dir, LogOptions::default()) {
        Err(StorageError::Locked(_)) => {}
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a restarted log opened while the old node's snapshot save still ran"),
    }
    drop(gate);
    let saved = saving
        .join()
        .unwrap_or_else(|_| panic!("save thread panicked"));
    saved.unwrap_or_else(|e| panic!("save: {e}"));
    let log = Log::open_in(fsd, &dir, LogOptions::default())
        .unwrap_or_else(|e| panic!("open after the save ended: {e}"));
    let snap = log.snapshot_store().unwrap_or_else(|e| panic!("{e}"));
    assert!(snap.load().unwrap_or_else(|e| panic!("{e}")).is_some());
}

#[test]
fn a_snapshot_survives_a_power_cut_once_saved_and_a_torn_save_leaves_the_old_one() {
    let fs = SimFs::new(11);
    let dir = PathBuf::from("/d");
    let log = open(&fs, &dir, LogOptions::default());
    let store = log.snapshot_store().unwrap_or_else(|e| panic!("{e}"));
    store
        .save(b"m1", &[1u8; 20_000])
        .unwrap_or_else(|e| panic!("{e}"));
    fs.fail(SimOp::SyncFile, 1);
    assert!(store.save(b"m2", &[2u8; 20_000]).is_err());
    fs.power_cut();
    drop((log, store));
    let log = open(&fs, &dir, LogOptions::default());
    let store = log.snapshot_store().unwrap_or_else(|e| panic!("{e}"));
    let (m, d) = store
        .load()
        .unwrap_or_else(|e| panic!("{e}"))
        .unwrap_or_else(|| panic!("the saved snapshot is gone"));
    assert_eq!((&m[..], d.len()), (&b"m1"[..], 20_000));
}

/// A log rewrite (compaction) in progress does not hold up the engine: while the rewritten
/// file's writes are held at a gate, reads answer and a new append is accepted (it becomes
/// durable after the rewrite, in the new file, and survives a power cut and a reopen). Before
/// the fix the writer held the log's lock for the whole rewrite, and every append and read of
/// the engine waited for it: seconds with a large log, enough to lose the leadership.
#[test]
fn reads_and_appends_proceed_while_a_rewrite_is_being_written() {
    let fs = SimFs::new(11);
    let dir = PathBuf::from("/d");
    let log = log_due_for_rewrite(&fs, &dir);
    let gate = fs.gate_writes("raft.tmp");
    log.purge(95, 1, Bytes::new(), None)
        .unwrap_or_else(|e| panic!("{e}"));
    // The purge's batch triggers the rewrite once written.
    let (sync_tx, sync_rx) = mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            let _ = sync_tx.send(log.sync().is_ok());
        });
    }
    assert!(
        gate.wait_blocked(Duration::from_secs(10)),
        "the rewrite never started"
    );
    // The rewrite is stuck in its write; the engine's calls must not be.
    let (tx, rx) = mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            let read = log.entry(100).map(|e| e.index);
            let accepted = log
                .append(
                    vec![Entry {
                        index: 101,
                        term: 1,
                        data: Bytes::from_static(b"during"),
                    }],
                    None,
                )
                .is_ok();
            let _ = tx.send((read, accepted));
        });
    }
    let answered = rx.recv_timeout(Duration::from_secs(10));
    drop(gate);
    assert_eq!(
        answered,
        Ok((Some(100), true)),
        "a read and an append waited for the rewrite"
    );
    assert_eq!(sync_rx.recv_timeout(Duration::from_secs(10)), Ok(true));
    log.sync().unwrap_or_else(|e| panic!("{e}"));
    fs.power_cut();
    drop(log);
    let log = open(&fs, &dir, LogOptions::default());
    assert_eq!(log.entry(95), None, "purged");
    assert_eq!(log.entry(96).map(|e| e.index), Some(96));
    assert_eq!(
        log.entry(101).map(|e| e.data),
        Some(Bytes::from_static(b"during"))
    );
}
