//! `hush send` drives simulated instances into a cluster that is already running, from the
//! parts an operator hands a service (first shuffler, key directory, CA, task files) or from a
//! client configuration, and accounts for every report.

use std::process::Command;

use crate::hush_bin;
use crate::served_demo::ServedDemo;

/// "… N reports sent, N accepted by the first shuffler, 0 refused …" → (sent, accepted).
fn reports(stdout: &str) -> (u64, u64) {
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("reports:"))
        .unwrap_or_else(|| panic!("no reports line in:\n{stdout}"));
    let n = |word: &str| -> u64 {
        line.split(word)
            .next()
            .and_then(|h| h.split_whitespace().last())
            .and_then(|x| x.parse().ok())
            .unwrap_or_else(|| panic!("no number before {word:?} in {line}"))
    };
    (n(" sent"), n(" accepted"))
}

#[test]
fn hush_send_reports_into_a_running_cluster_from_its_parts_or_a_client_config() {
    let demo = ServedDemo::start(&["--windows", "1", "--agents", "150", "--idle"]);
    let client_dir = demo.data.path().join("client");
    let config = std::fs::read_to_string(demo.client_config()).unwrap();
    let value = |key: &str| -> String {
        config
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in {config}"))
            .trim_matches('"')
            .to_owned()
    };
    let tasks: Vec<String> = std::fs::read_dir(&client_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("task-")
        })
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(tasks.len(), 4, "{tasks:?}");
    // The parts: endpoints, the CA and the task files.
    let out = Command::new(hush_bin())
        .args(["--ca", client_dir.join("ca.pem").to_str().unwrap()])
        .args(["send", "--shuffler", &value("shuffler_url")])
        .args(["--key-directory", &value("key_directory")])
        .arg("--task")
        .args(&tasks)
        .args(["--instances", "20", "--duration", "3s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, accepted) = reports(&stdout);
    // Each instance reports each of the 4 tasks at least once (its open window at the end).
    assert!(sent >= 80 && accepted == sent, "{stdout}");
    assert!(stdout.contains(" 0 refused"), "{stdout}");
    // The client configuration the demo wrote.
    let out = Command::new(hush_bin())
        .args(["send", "--config", demo.client_config().to_str().unwrap()])
        .args(["--instances", "10", "--duration", "2s"])
        .env_remove("HUSH_CA")
        .output()
        .unwrap();
    let stdout2 = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout2}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent2, accepted2) = reports(&stdout2);
    assert!(sent2 >= 40 && accepted2 == sent2, "{stdout2}");
    // The cluster took in and aggregated exactly what the two runs had accepted, beyond the
    // demo's own instances.
    let summary = demo.stop();
    assert!(
        summary.contains(&format!(
            "from other services: {} reports accepted by the first shuffler",
            accepted + accepted2
        )),
        "{summary}"
    );
}
