//! docs/operators.md's "Your first hour", run as written: every block marked
//! `<!-- walkthrough NAME: TERMINAL -->` is read from the doc and executed line by line against
//! the real `hush` binary, so the walkthrough cannot drift from what the binary does.
//!
//! Each terminal keeps its own working directory and environment across its blocks, in document
//! order, as a person with several terminals would. A line is one of:
//! - `cd DIR`: changes the terminal's directory;
//! - `. FILE` (or `source FILE`): loads its `export NAME=value` lines into the terminal;
//! - `COMMAND &`: a server left running; the step waits until it prints `listening on`, and
//!   at the end every server gets SIGTERM and must exit cleanly;
//! - anything else: run with `sh -c` in the terminal's directory and environment; it must
//!   succeed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::hush_bin;

/// One terminal's state.
struct Terminal {
    cwd: PathBuf,
    env: BTreeMap<String, String>,
}

/// The blocks of walkthrough `name` in document order: (terminal, lines).
fn blocks(name: &str) -> Vec<(String, Vec<String>)> {
    let doc = include_str!("../../docs/operators.md");
    let marker = format!("<!-- walkthrough {name}: ");
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        let Some(rest) = l.strip_prefix(&marker) else {
            continue;
        };
        let terminal = rest.trim_end_matches("-->").trim().to_owned();
        assert_eq!(
            lines.next(),
            Some("```sh"),
            "{name}: a marker without a block"
        );
        let mut cmds: Vec<String> = Vec::new();
        let mut continued = false;
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            if continued {
                let last = cmds.last_mut().unwrap();
                last.push(' ');
                last.push_str(l.trim());
            } else {
                cmds.push(l.trim().to_owned());
            }
            continued = l.ends_with('\\');
            if continued {
                let last = cmds.last_mut().unwrap();
                last.truncate(last.trim_end_matches('\\').len());
            }
        }
        out.push((terminal, cmds));
    }
    assert!(
        !out.is_empty(),
        "no walkthrough {name} in docs/operators.md"
    );
    out
}

/// The longest one step may take (`hush send` runs 30 s, `sleep` 20 s).
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `cmd` to completion, killing it (and failing) after `timeout`.
fn output_within(cmd: &mut Command, timeout: Duration, what: &str) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("{what}: still running after {timeout:?}");
        }
    }
}

/// Servers started by the walkthrough; SIGKILL on drop if the test fails midway.
struct Servers(Vec<(String, Child)>);

impl Drop for Servers {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `export NAME=value` lines of `path`.
fn exports(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export "))
        .map(|l| {
            let (k, v) = l.split_once('=').expect("NAME=value");
            (k.to_owned(), v.trim_matches(['"', '\'']).to_owned())
        })
        .collect()
}

/// Runs walkthrough `name` in a fresh temporary directory; returns each command's stdout by
/// the command line, the directory and the servers still running.
fn run(name: &str) -> (BTreeMap<String, String>, tempfile::TempDir, Servers) {
    let root = tempfile::tempdir().unwrap();
    let bin_dir = hush_bin().parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // A clean environment: nothing from the developer's shell may make a step pass.
    let base: BTreeMap<String, String> = [
        ("PATH".to_owned(), path),
        ("HOME".to_owned(), root.path().display().to_string()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ]
    .into();
    let mut terminals: BTreeMap<String, Terminal> = BTreeMap::new();
    let mut servers = Servers(Vec::new());
    let mut outputs = BTreeMap::new();
    for (terminal, lines) in blocks(name) {
        let t = terminals
            .entry(terminal.clone())
            .or_insert_with(|| Terminal {
                cwd: root.path().to_owned(),
                env: base.clone(),
            });
        for line in lines {
            let cmd = line.split(" #").next().unwrap().trim().to_owned();
            if cmd.is_empty() || cmd.starts_with('#') {
                continue;
            }
            eprintln!("[{terminal}] $ {cmd}");
            if let Some(dir) = cmd.strip_prefix("cd ") {
                t.cwd = t.cwd.join(dir.trim());
                assert!(t.cwd.is_dir(), "{cmd}: no such directory");
            } else if let Some(file) = cmd
                .strip_prefix(". ")
                .or_else(|| cmd.strip_prefix("source "))
            {
                t.env.extend(exports(&t.cwd.join(file.trim())));
            } else if let Some(server) = cmd.strip_suffix('&') {
                let log = root.path().join(format!("server-{}.log", servers.0.len()));
                let mut child = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {}", server.trim()))
                    .current_dir(&t.cwd)
                    .env_clear()
                    .envs(&t.env)
                    .stdout(Stdio::piped())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap();
                // Wait for "listening on", then keep draining stdout.
                let (tx, rx) = mpsc::channel();
                let stdout = child.stdout.take().unwrap();
                std::thread::spawn(move || {
                    for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                        if l.starts_with("listening on ") {
                            let _ = tx.send(l);
                        }
                    }
                });
                match rx.recv_timeout(Duration::from_secs(60)) {
                    Ok(l) => eprintln!("[{terminal}]   {l}"),
                    Err(_) => panic!(
                        "{cmd}: never said it was listening; its log:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    ),
                }
                servers.0.push((cmd.clone(), child));
            } else {
                let out = output_within(
                    Command::new("sh")
                        .arg("-c")
                        .arg(&cmd)
                        .current_dir(&t.cwd)
                        .env_clear()
                        .envs(&t.env),
                    STEP_TIMEOUT,
                    &cmd,
                );
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                eprintln!("{stdout}");
                assert!(
                    out.status.success(),
                    "[{terminal}] {cmd} failed: {}\n{stdout}",
                    String::from_utf8_lossy(&out.stderr)
                );
                outputs.insert(format!("{terminal}: {cmd}"), stdout);
            }
        }
    }
    (outputs, root, servers)
}

/// Every server stops cleanly on SIGTERM, as the doc says.
fn stop(mut servers: Servers) {
    for (cmd, child) in &mut servers.0 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let begun = std::time::Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(30),
                "{cmd} still running 30 s after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "{cmd} exited with {status} on SIGTERM");
    }
    servers.0.clear();
}

/// The released windows of `task` as JSON, asked the way the walkthrough's last step asks.
fn windows_json(dir: &Path, task_var: &str) -> Vec<serde_json::Value> {
    let env = exports(&dir.join("hush.env"));
    let task = &env.iter().find(|(k, _)| k == task_var).unwrap().1;
    let out = output_within(
        Command::new(hush_bin())
            .args(["results", "windows", "--json", "--task", task])
            .current_dir(dir)
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v))),
        STEP_TIMEOUT,
        "hush results windows --json",
    );
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// At least one released latency window with a median near the 50 ms `hush send` draws, and
/// one released error count; the sender's reports all accepted.
fn check(outputs: &BTreeMap<String, String>, results_dir: &Path) {
    let send = outputs
        .iter()
        .find(|(k, _)| k.contains("hush send"))
        .expect("the walkthrough sends traffic")
        .1;
    assert!(send.contains(" 0 refused"), "{send}");
    let shown = outputs
        .iter()
        .find(|(k, _)| k.contains("results windows --task \"$HUSH_LATENCY_TASK\""))
        .expect("the walkthrough reads the latency windows")
        .1;
    assert!(shown.contains("p50 ms"), "{shown}");
    // Checked once more in JSON: the text's numbers are the API's.
    let latency = windows_json(results_dir, "HUSH_LATENCY_TASK");
    let medians: Vec<f64> = latency
        .iter()
        .filter_map(|w| w["p50_ms"]["value"].as_f64())
        .collect();
    assert!(!medians.is_empty(), "no median released: {latency:?}");
    // 20 log-spaced buckets are about 1.5x wide at 50 ms: the point lies within its bucket.
    for m in &medians {
        assert!((25.0..=100.0).contains(m), "median {m} ms: {latency:?}");
    }
    // Every window the text showed is in the JSON (which, asked later, may hold one more).
    let starts: Vec<u64> = latency.iter().filter_map(|w| w["start"].as_u64()).collect();
    for row in shown.lines().skip(1) {
        if let Some(Ok(start)) = row.split_whitespace().next().map(str::parse::<u64>) {
            assert!(
                starts.contains(&start),
                "window {start} missing from the JSON"
            );
        }
    }
}

#[test]
fn the_first_hour_walkthrough_runs_as_written() {
    let (outputs, root, servers) = run("trial");
    check(&outputs, &root.path().join("hush-trial"));
    let errors = windows_json(&root.path().join("hush-trial"), "HUSH_ERRORS_TASK");
    assert!(
        errors
            .iter()
            .any(|w| w["total"]["value"].as_f64().is_some()),
        "{errors:?}"
    );
    stop(servers);
}

#[test]
fn the_two_operator_walkthrough_runs_as_written() {
    let (outputs, root, servers) = run("two-operators");
    check(&outputs, &root.path().join("hush-pair/tenant-acme"));
    stop(servers);
}
