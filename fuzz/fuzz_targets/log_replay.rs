#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    consensus_storage::fuzzing::log_replay(data);
});
