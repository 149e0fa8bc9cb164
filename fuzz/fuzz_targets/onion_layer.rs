//! cargo-fuzz target: `hush_tests::fuzzing::onion_layer`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hush_tests::fuzzing::onion_layer(data);
});
