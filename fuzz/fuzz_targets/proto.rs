//! cargo-fuzz target: `hush_tests::fuzzing::proto`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hush_tests::fuzzing::proto(data);
});
