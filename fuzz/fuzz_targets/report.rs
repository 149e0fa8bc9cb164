//! cargo-fuzz target: `hush_tests::fuzzing::report`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    hush_tests::fuzzing::report(data);
});
