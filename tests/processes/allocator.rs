//! The `hush` binary runs on jemalloc with the options `cli/src/main.rs` exports, and the
//! environment overrides them (docs/operators.md, "Capacity"). jemalloc ignores a `malloc_conf`
//! symbol it does not know by that name, so a renamed symbol would drop the options silently:
//! this reads back what jemalloc itself reports it runs with.

use std::process::Command;

use crate::hush_bin;

/// jemalloc's statistics printed at exit (to stderr), for `hush --version` under `conf`.
fn options_in_force(conf: &str) -> String {
    let out = Command::new(hush_bin())
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", conf)
        .output()
        .expect("run hush --version");
    assert!(
        out.status.success(),
        "hush --version failed: {}",
        out.status
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn the_binary_runs_jemalloc_with_its_options_and_the_environment_overrides_them() {
    let stats = options_in_force("stats_print:true");
    for want in [
        "opt.narenas: 1\n",
        "opt.background_thread: true",
        "opt.dirty_decay_ms: 1000 ",
        "opt.muzzy_decay_ms: 0 ",
    ] {
        assert!(
            stats.contains(want),
            "jemalloc does not report {want:?}; what it printed:\n{stats}"
        );
    }
    let stats = options_in_force("stats_print:true,narenas:3,dirty_decay_ms:500");
    for want in ["opt.narenas: 3\n", "opt.dirty_decay_ms: 500 "] {
        assert!(
            stats.contains(want),
            "the environment did not override: no {want:?} in\n{stats}"
        );
    }
    // The options it was not given stay the binary's.
    assert!(stats.contains("opt.background_thread: true"), "{stats}");
}
