//! The durability promises of the log and snapshot store, checked by reopening from disk.

use std::io::{Seek, SeekFrom, Write};

use bytes::Bytes;
use consensus_storage::{Entry, Log, LogOptions, StorageError};

/// Plain appends: the file ends at the last record, as the torn-tail tests below assume.
fn appending() -> LogOptions {
    LogOptions {
        preallocate_bytes: 0,
        ..LogOptions::default()
    }
}

/// Size of the record holding an entry with `data_len` bytes of data.
fn entry_record_len(data_len: usize) -> u64 {
    8 + 1 + 16 + data_len as u64
}

fn e(index: u64, term: u64, data: &str) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(data.to_string()),
    }
}

fn datas(log: &Log, lo: u64, hi: u64) -> Vec<(u64, u64, String)> {
    log.entries(lo, hi, None)
        .into_iter()
        .map(|e| (e.index, e.term, String::from_utf8(e.data.to_vec()).unwrap()))
        .collect()
}

/// After a log of entries "a", "b" lost the end of "b": reopening keeps "a" only, and the log
/// stays writable after the repair.
fn assert_torn_second_record_repaired(dir: &std::path::Path) {
    let log = Log::open(dir).unwrap();
    assert_eq!(datas(&log, 1, 10), vec![(1, 1, "a".into())]);
    log.append(vec![e(2, 2, "b2")], None).unwrap();
    log.sync().unwrap();
    drop(log);
    let log = Log::open(dir).unwrap();
    assert_eq!(
        datas(&log, 1, 10),
        vec![(1, 1, "a".into()), (2, 2, "b2".into())]
    );
}

#[test]
fn acknowledged_entries_and_metadata_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path()).unwrap();
        log.append(vec![e(1, 1, "a"), e(2, 1, "b"), e(3, 2, "c")], None)
            .unwrap();
        log.set_meta(1, Bytes::from_static(b"vote-1"), None)
            .unwrap();
        log.set_meta(1, Bytes::from_static(b"vote-2"), None)
            .unwrap();
        log.sync().unwrap();
        log.close();
    }
    let log = Log::open(dir.path()).unwrap();
    assert_eq!(
        datas(&log, 0, 10),
        vec![(1, 1, "a".into()), (2, 1, "b".into()), (3, 2, "c".into())]
    );
    assert_eq!(log.meta(1).unwrap(), Bytes::from_static(b"vote-2"));
    assert_eq!(log.term(2), Some(1));
}

#[test]
fn append_callback_runs_only_after_the_write_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    log.append(
        vec![e(1, 1, "x")],
        Some(Box::new(move |r| tx.send(r).unwrap())),
    )
    .unwrap();
    rx.recv().unwrap().unwrap();
    // The callback fired: a fresh open of the file (another handle) must see the entry.
    let bytes = std::fs::read(log.path()).unwrap();
    assert!(bytes.windows(1).any(|w| w == b"x"));
}

#[test]
fn conflicting_append_replaces_the_suffix_and_truncate_persists() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path()).unwrap();
        log.append(vec![e(1, 1, "a"), e(2, 1, "b"), e(3, 1, "c")], None)
            .unwrap();
        log.append(vec![e(2, 2, "B")], None).unwrap();
        log.append(vec![e(3, 2, "C"), e(4, 2, "D")], None).unwrap();
        log.truncate(4, None).unwrap();
        log.sync().unwrap();
    }
    let log = Log::open(dir.path()).unwrap();
    assert_eq!(
        datas(&log, 1, 10),
        vec![(1, 1, "a".into()), (2, 2, "B".into()), (3, 2, "C".into())]
    );
}

#[test]
fn purge_drops_the_prefix_and_remembers_the_purged_position() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = Log::open(dir.path()).unwrap();
        log.append((1..=10).map(|i| e(i, 1, "v")).collect(), None)
            .unwrap();
        log.purge(6, 1, Bytes::from_static(b"note"), None).unwrap();
        log.sync().unwrap();
    }
    let log = Log::open(dir.path()).unwrap();
    let st = log.state();
    assert_eq!(st.first_index, Some(7));
    assert_eq!(st.last_index, Some(10));
    assert_eq!(st.purged.as_ref().map(|p| (p.0, p.1)), Some((6, 1)));
    assert_eq!(log.term(6), Some(1));
    assert!(log.entry(6).is_none());
    assert!(matches!(
        log.append(vec![e(5, 1, "late")], None),
        Err(StorageError::Invalid(_))
    ));
}

#[test]
fn an_append_that_leaves_a_gap_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    log.append(vec![e(1, 1, "a")], None).unwrap();
    assert!(matches!(
        log.append(vec![e(3, 1, "c")], None),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        log.append(vec![e(2, 1, "b"), e(4, 1, "d")], None),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(log.state().last_index, Some(1));
}

#[test]
fn a_torn_tail_is_truncated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path;
    {
        let log = Log::open_with(dir.path(), appending()).unwrap();
        log.append(vec![e(1, 1, "a"), e(2, 1, "b")], None).unwrap();
        log.sync().unwrap();
        path = log.path().to_path_buf();
    }
    let full = std::fs::metadata(&path).unwrap().len();
    assert_eq!(full, 2 * entry_record_len(1));
    // Simulate a crash in the middle of writing the last record.
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(full - 3).unwrap();
    drop(f);
    assert_torn_second_record_repaired(dir.path());
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path;
    {
        let log = Log::open_with(dir.path(), appending()).unwrap();
        log.append(vec![e(1, 1, "a")], None).unwrap();
        log.sync().unwrap();
        path = log.path().to_path_buf();
    }
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
    drop(f);
    let log = Log::open(dir.path()).unwrap();
    assert_eq!(log.state().last_index, Some(1));
}

#[test]
fn the_log_preallocates_and_reopens_at_the_end_of_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let step = 64 << 10;
    let options = LogOptions {
        preallocate_bytes: step,
        ..LogOptions::default()
    };
    let path;
    {
        let log = Log::open_with(dir.path(), options).unwrap();
        log.append(vec![e(1, 1, "a"), e(2, 1, "b")], None).unwrap();
        log.sync().unwrap();
        path = log.path().to_path_buf();
    }
    // The file holds the records plus zeros up to whole steps beyond them.
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(
        size >= step,
        "expected preallocated space, file is {size} bytes"
    );
    let bytes = std::fs::read(&path).unwrap();
    let end = 2 * entry_record_len(1) as usize;
    assert!(bytes[end..].iter().all(|b| *b == 0));
    // Reopening finds the records, and new writes go right after them, not after the zeros.
    for round in 0..3u64 {
        let log = Log::open_with(dir.path(), options).unwrap();
        assert_eq!(log.state().last_index, Some(2 + round));
        log.append(vec![e(3 + round, 2, "c")], None).unwrap();
        log.sync().unwrap();
    }
    let log = Log::open_with(dir.path(), options).unwrap();
    assert_eq!(
        datas(&log, 1, 10),
        vec![
            (1, 1, "a".into()),
            (2, 1, "b".into()),
            (3, 2, "c".into()),
            (4, 2, "c".into()),
            (5, 2, "c".into())
        ]
    );
    // Crossing the preallocated end extends the file by more steps.
    let big = "x".repeat(100_000);
    log.append(vec![e(6, 2, &big)], None).unwrap();
    log.sync().unwrap();
    drop(log);
    let size = std::fs::metadata(&path).unwrap().len();
    assert!(size >= 2 * step, "file did not grow: {size} bytes");
    let log = Log::open_with(dir.path(), options).unwrap();
    assert_eq!(log.entry(6).unwrap().data.len(), big.len());
}

#[test]
fn a_torn_record_inside_preallocated_space_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let path;
    {
        let log = Log::open(dir.path()).unwrap();
        log.append(vec![e(1, 1, "a"), e(2, 1, "b")], None).unwrap();
        log.sync().unwrap();
        path = log.path().to_path_buf();
    }
    // The last bytes of the second record never reached the disk: zeros instead.
    let end = 2 * entry_record_len(1);
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.seek(SeekFrom::Start(end - 3)).unwrap();
    f.write_all(&[0, 0, 0]).unwrap();
    drop(f);
    assert_torn_second_record_repaired(dir.path());
}

#[test]
fn corruption_before_valid_records_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let path;
    {
        let log = Log::open(dir.path()).unwrap();
        log.append((1..=5).map(|i| e(i, 1, "payload")).collect(), None)
            .unwrap();
        log.sync().unwrap();
        // The next write after a sync carries the mark that proves the records before it were
        // acknowledged as durable.
        log.append(vec![e(6, 1, "payload")], None).unwrap();
        log.sync().unwrap();
        path = log.path().to_path_buf();
    }
    // Flip a byte inside the second record's body.
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let record_len = entry_record_len("payload".len());
    f.seek(SeekFrom::Start(record_len + 12)).unwrap();
    f.write_all(&[0xff]).unwrap();
    drop(f);
    match Log::open(dir.path()) {
        Err(StorageError::Corrupt { offset, .. }) => assert_eq!(offset, record_len),
        Err(other) => panic!("expected corruption error, got {other}"),
        Ok(_) => panic!("a corrupt log must refuse to open"),
    }
}

#[test]
fn rewrite_keeps_exactly_the_live_state() {
    let dir = tempfile::tempdir().unwrap();
    let payload = "p".repeat(1000);
    {
        // A tiny rewrite threshold forces rewrites while we write and purge.
        let options = LogOptions {
            rewrite_min_bytes: 16 << 10,
            preallocate_bytes: 4 << 10,
            ..Default::default()
        };
        let log = Log::open_with(dir.path(), options).unwrap();
        log.set_meta(7, Bytes::from_static(b"m"), None).unwrap();
        for i in 1..=200u64 {
            log.append(vec![e(i, 3, &payload)], None).unwrap();
            if i % 20 == 0 {
                log.purge(i - 5, 3, Bytes::from_static(b"n"), None).unwrap();
            }
            log.sync().unwrap();
        }
    }
    let size = std::fs::metadata(dir.path().join("raft.log"))
        .unwrap()
        .len();
    assert!(size < 100 << 10, "file was not rewritten: {size} bytes");
    let log = Log::open(dir.path()).unwrap();
    let st = log.state();
    assert_eq!(st.first_index, Some(196));
    assert_eq!(st.last_index, Some(200));
    assert_eq!(log.meta(7).unwrap(), Bytes::from_static(b"m"));
}

#[test]
fn snapshots_are_atomic_and_damage_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    let store = log.snapshot_store().unwrap();
    assert!(store.load().unwrap().is_none());
    store.save(b"meta-1", b"data-1").unwrap();
    store.save(b"meta-2", b"data-2").unwrap();
    let (m, d) = store.load().unwrap().unwrap();
    assert_eq!((&m[..], &d[..]), (&b"meta-2"[..], &b"data-2"[..]));
    let path = dir.path().join("snapshot.bin");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    assert!(matches!(store.load(), Err(StorageError::Corrupt { .. })));
}

#[test]
fn a_data_dir_cannot_be_opened_twice() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path()).unwrap();
    assert!(matches!(
        Log::open(dir.path()),
        Err(StorageError::Locked(_))
    ));
    log.close();
    drop(log);
    Log::open(dir.path()).unwrap();
}
