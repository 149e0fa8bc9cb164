//! Inputs the fuzz targets in `fuzz/` found interesting or hostile, kept under
//! `tests/fuzz-regressions/<target>/`: each must decode to an error (or a valid value), never a
//! panic. The same entry points run under libFuzzer (`cargo +nightly fuzz run <target>`).

use std::path::Path;

use hush_tests::fuzzing::{TARGETS, seeds};

#[test]
fn every_regression_input_decodes_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz-regressions");
    for (target, decode) in TARGETS {
        let dir = root.join(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| decode(&data));
            assert!(outcome.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
        assert!(
            n >= 3,
            "{target}: only {n} regression inputs in {}",
            dir.display()
        );
    }
}

#[test]
fn the_seeds_are_valid_inputs() {
    for (target, name, data) in seeds() {
        let decode = TARGETS.iter().find(|(t, _)| *t == target).unwrap().1;
        decode(&data);
        let _ = name;
    }
}

/// Writes the seed corpora for `cargo fuzz`: `HUSH_FUZZ_SEEDS=fuzz/seeds cargo test -p
/// hush-tests --test integration write_fuzz_seeds -- --ignored`.
#[test]
#[ignore = "a tool: writes seed files"]
fn write_fuzz_seeds() {
    let out = std::env::var("HUSH_FUZZ_SEEDS").expect("set HUSH_FUZZ_SEEDS to the seeds directory");
    for (target, name, data) in seeds() {
        let dir = Path::new(&out).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), data).unwrap();
    }
}
