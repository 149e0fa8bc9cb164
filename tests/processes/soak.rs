//! `hush soak --windows 26 --agents 40`: at a steady report rate, with every retention period
//! shortened, every sled tree of every component stays flat once retention has caught up (the
//! command exits 1 naming any tree that keeps growing).

use std::process::Command;

use crate::hush_bin;

#[test]
fn storage_stays_flat_at_a_steady_rate_once_retention_catches_up() {
    let out = Command::new(hush_bin())
        .args(["soak", "--windows", "26", "--agents", "40"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hush soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hush soak failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for tree in [
        "leader      seen",
        "helper      helper_jobs",
        "shuffler-a  tags",
        "leader      ledger",
    ] {
        assert!(stdout.contains(tree), "no {tree:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("GROWS"), "{stdout}");
}
