//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, grown by `scripts/fuzz.sh` with
//! cargo-fuzz on nightly) through the same entry points on the stable toolchain: every input
//! that ever reached a new path of a decoder of outside bytes still returns without a panic.

use std::path::PathBuf;

type Target = (&'static str, fn(&[u8]));

/// Every fuzz target (`fuzz/fuzz_targets/<name>.rs`) and its entry point.
const TARGETS: &[Target] = &[
    ("forwarded", consensus_api::fuzzing::forwarded),
    ("codec_values", consensus_api::fuzzing::codec_values),
    ("batch_frames", consensus_api::fuzzing::batch_frames),
    #[cfg(feature = "grpc")]
    ("grpc_frames", transport_grpc::fuzzing::frames),
    #[cfg(feature = "quic")]
    ("quic_wire", transport_quic::fuzzing::wire),
    #[cfg(feature = "tikv")]
    ("raft_message", backend_tikv::fuzzing::raft_message),
    #[cfg(feature = "openraft")]
    ("openraft_rpc", backend_openraft::fuzzing::rpc),
    ("log_replay", consensus_storage::fuzzing::log_replay),
    ("snapshot_file", consensus_storage::fuzzing::snapshot_file),
    ("broker_commands", broker::fuzzing::commands),
    ("admin_bodies", broker::fuzzing::admin_bodies),
];

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

#[test]
fn every_corpus_input_is_handled_without_a_panic() {
    let mut replayed = 0;
    for (name, run) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        inputs.sort();
        assert!(
            !inputs.is_empty(),
            "{name}: empty corpus in {}",
            dir.display()
        );
        for input in inputs {
            let data = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            println!("{name}: {}", input.display());
            run(&data);
            replayed += 1;
        }
    }
    println!("replayed {replayed} inputs");
}

#[test]
fn every_fuzz_target_is_replayed() {
    let targets = fuzz_dir().join("fuzz_targets");
    let mut on_disk: Vec<String> = std::fs::read_dir(&targets)
        .unwrap_or_else(|e| panic!("{}: {e}", targets.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".rs"))
                .map(str::to_string)
        })
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    if cfg!(all(
        feature = "grpc",
        feature = "quic",
        feature = "tikv",
        feature = "openraft"
    )) {
        assert_eq!(listed, on_disk, "a fuzz target is missing from TARGETS");
    }
}
