#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    consensus_api::fuzzing::batch_frames(data);
});
