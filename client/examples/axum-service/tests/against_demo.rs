//! The example service against the demo cluster: `hush demo --serve` (run in this process, as
//! `hush demo` runs it) writes its client configuration; the example, a separate process,
//! serves its routes, and its reports travel the cascade and are aggregated by the demo's
//! leader and helper.

use std::process::Command;
use std::time::{Duration, Instant};

use hush_sim::demo::{DemoArgs, run_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_service_reports_into_the_demo_cluster() {
    let data = tempfile::tempdir().unwrap();
    let client_dir = data.path().join("client");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // Idle: after its two simulated windows the demo's own instances stop, so every report
    // beyond theirs is the example's.
    let args = DemoArgs::new()
        .sized(2, 150, Some(data.path().join("demo")))
        .serving(Some(client_dir.clone()), true);
    let demo = tokio::spawn(run_until(args, async {
        let _ = stop_rx.await;
    }));
    let config = client_dir.join("client.toml");
    let start = Instant::now();
    while !config.exists() {
        assert!(
            !demo.is_finished(),
            "the demo stopped: {:?}",
            demo.await.unwrap()
        );
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the demo wrote no client config"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_hush-example-axum"))
            .arg("--config")
            .arg(&config)
            .args(["--requests", "30", "--exit"])
            .output()
            .expect("run the example")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the example failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // "… N reports sent, N accepted, 0 refused; uploaded everything: true"
    let number_before = |word: &str| -> u64 {
        let head = stdout
            .split(word)
            .next()
            .unwrap_or_else(|| panic!("no {word:?} in {stdout}"));
        head.split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {word:?} in {stdout}"))
    };
    let sent = number_before(" reports sent");
    let accepted = number_before(" accepted");
    // Spans of both routes and the error counter (its window's count, even 0): three tasks,
    // one report each per window.
    assert!(accepted >= 3, "{stdout}");
    assert_eq!(sent, accepted, "{stdout}");
    assert!(stdout.contains(" 0 refused"), "{stdout}");
    // 15 requests per route, within the demo tasks' bound of 20 per window: none dropped.
    assert!(
        stdout.contains(" 0 dropped over the per-window bound"),
        "{stdout}"
    );
    assert!(number_before(" events recorded") >= 30, "{stdout}");

    stop_tx.send(()).unwrap();
    let summary = demo.await.unwrap().expect("the demo ends cleanly");
    assert_eq!(
        summary.entered.checked_sub(summary.accepted),
        Some(accepted),
        "the first shuffler took in other than the example's reports: {summary:?}"
    );
    // Every report is aggregated, or counted late by the leader if its window closed first.
    assert_eq!(
        summary.aggregated + summary.late,
        summary.entered,
        "{summary:?}"
    );
}
