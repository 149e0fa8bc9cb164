//! `hush demo --windows 2 --agents 200`: the whole cluster in one command finishes, prints every
//! window, accounts for every report, shows that no client connected to an aggregator, and
//! exits 0.

use std::process::Command;

use crate::hush_bin;

#[test]
fn the_demo_runs_two_windows_and_exits_zero() {
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(hush_bin())
        .args(["demo", "--windows", "2", "--agents", "200", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hush demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "hush demo failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    for w in [
        "window 0", "window 1", "checkout", "search", "auth", "errors", "summary",
    ] {
        assert!(stdout.contains(w), "no {w:?} in the output:\n{stdout}");
    }
    assert!(
        !stdout.contains("no result"),
        "a window was not released:\n{stdout}"
    );
    // Over the whole run, no service's client connected to the leader or the helper: keys
    // came from the key directory, reports went to the first shuffler.
    assert!(
        stdout.contains("from clients: 0"),
        "clients reached an aggregator:\n{stdout}"
    );
    // The demo kept its databases where it was told to.
    for d in ["leader", "helper", "shuffler-a", "shuffler-b", "results"] {
        assert!(
            data.path().join(d).is_dir(),
            "no {d} database in --data-dir"
        );
    }
}

#[test]
fn the_demo_flags_the_injected_regression_and_error_spike_where_they_start() {
    let out = Command::new(hush_bin())
        .args([
            "demo",
            "--windows",
            "5",
            "--agents",
            "600",
            "--epsilon",
            "4",
            "--regression-window",
            "3",
            "--spike-window",
            "4",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hush demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hush demo failed:\n{stdout}");
    let window = |w: usize| {
        stdout
            .split(&format!("window {w}  ["))
            .nth(1)
            .and_then(|rest| rest.split("\nwindow ").next())
            .and_then(|rest| rest.split("\nsummary").next())
            .unwrap_or_else(|| panic!("no window {w} in:\n{stdout}"))
            .to_owned()
    };
    assert!(
        window(3).contains("search: latency_regression"),
        "the regression is not flagged in window 3:\n{stdout}"
    );
    assert!(
        window(4).contains("errors: error_spike"),
        "the error spike is not flagged in window 4:\n{stdout}"
    );
}

#[test]
fn an_interrupted_demo_removes_its_temporary_data() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(hush_bin())
        .args(["demo", "--windows", "30", "--agents", "200"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run hush demo");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dir = loop {
        let line = lines
            .next()
            .expect("the demo names its data directory")
            .unwrap();
        if let Some((_, d)) = line.split_once("; data in ") {
            break std::path::PathBuf::from(d.trim());
        }
    };
    // The cluster is up and writing once its databases exist.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&dir).map_or(0, |d| d.count()) == 0 {
        assert!(std::time::Instant::now() < deadline, "no data in {dir:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "an interrupted demo does not report success"
    );
    assert!(!dir.exists(), "{dir:?} is left behind");
}
