#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    backend_tikv::fuzzing::raft_message(data);
});
