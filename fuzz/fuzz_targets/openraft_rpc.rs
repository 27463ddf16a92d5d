#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    backend_openraft::fuzzing::rpc(data);
});
