//! `hush results windows|alerts|budget|collect` against a running results service: called by
//! the metrics test once its cluster has released a window (one cluster for both).

use std::process::Command;

use hush_collector::http::{AlertJson, BudgetJson, WindowJson};
use hush_protocol::{TaskConfig, Time};

use crate::hush_bin;

fn hush(args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut c = Command::new(hush_bin());
    c.arg("results")
        .args(args)
        .env_remove("HUSH_RESULTS_READ_TOKEN");
    if let Some(t) = token {
        c.env("HUSH_RESULTS_READ_TOKEN", t);
    }
    c.output().expect("run hush")
}

/// The released `window` of `task` as the analyst CLI prints it, in every format.
pub(crate) fn check(url: &str, token: &str, task: &TaskConfig, window: Time) {
    let id = task.id().to_string();
    let from = window.as_secs().to_string();
    let to = (window.as_secs() + task.time_precision_s()).to_string();
    let base = ["--task", id.as_str(), "--url", url];

    let out = hush(
        &[
            &["windows"][..],
            &base,
            &["--from", &from, "--to", &to, "--json"],
        ]
        .concat(),
        Some(token),
    );
    assert!(out.status.success(), "{out:?}");
    let ws: Vec<WindowJson> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ws.len(), 1);
    assert_eq!(ws[0].start, window.as_secs());

    let out = hush(&[&["windows"][..], &base, &["--csv"]].concat(), Some(token));
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut rows = csv::Reader::from_reader(text.as_bytes());
    let head = rows.headers().unwrap().clone();
    assert!(head.iter().any(|h| h == "p95_ms_high"), "{text}");
    assert!(rows.records().any(|r| r.unwrap()[1] == *from), "{text}");

    let out = hush(&[&["windows"][..], &base].concat(), Some(token));
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("p95 ms"));

    let out = hush(
        &[
            &["budget"][..],
            &base,
            &["--from", &from, "--to", &to, "--json"],
        ]
        .concat(),
        Some(token),
    );
    assert!(out.status.success(), "{out:?}");
    let b: BudgetJson = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(b.purposes.len(), 2);

    let out = hush(&["alerts", "--url", url, "--json"], Some(token));
    assert!(out.status.success(), "{out:?}");
    let _: Vec<AlertJson> = serde_json::from_slice(&out.stdout).unwrap();

    // Errors name the fix.
    let out = hush(&[&["windows"][..], &base].concat(), None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HUSH_RESULTS_READ_TOKEN"),
        "{out:?}"
    );
    let out = hush(
        &[&["windows"][..], &base, &["--from", "-6w"]].concat(),
        Some(token),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unit"),
        "{out:?}"
    );
    let out = hush(&[&["collect"][..], &base].concat(), Some(token));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HUSH_RESULTS_TOKEN"),
        "{out:?}"
    );
}
