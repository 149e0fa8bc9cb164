//! cargo-fuzz target: `hush_tests::fuzzing::onion_packet`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hush_tests::fuzzing::onion_packet(data);
});
