//! Short runs of `hush load` and `hush chaos` (the long runs are manual commands): the cluster
//! as processes with mutual TLS, a fixed report rate, and for chaos SIGKILLs of the leader and
//! the first shuffler; both must end with every acknowledged report aggregated exactly once.

use std::process::Command;

use crate::hush_bin;

fn run(args: &[&str]) -> String {
    let out = Command::new(hush_bin()).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "hush {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn a_short_load_run_loses_nothing() {
    let out = run(&["load", "--rate", "100", "--duration", "6s", "--agents", "2"]);
    assert!(out.contains("lost 0, counted twice 0"), "{out}");
    assert!(out.contains("p99"), "{out}");
    assert!(out.contains("leader") && out.contains("MiB"), "{out}");
}

#[test]
fn a_short_chaos_run_kills_the_leader_and_a_shuffler_and_loses_nothing() {
    let out = run(&[
        "chaos",
        "--rate",
        "100",
        "--duration",
        "16s",
        "--agents",
        "2",
        "--kill-every",
        "3s",
        "--down",
        "1s",
        "--targets",
        "leader,shuffler-a",
        "--seed",
        "3",
    ]);
    assert!(out.contains("SIGKILL leader"), "{out}");
    assert!(out.contains("SIGKILL shuffler-a"), "{out}");
    assert!(out.contains("lost 0, counted twice 0"), "{out}");
    assert!(out.contains("exactly once"), "{out}");
}

#[test]
fn a_short_load_run_on_postgres_with_two_leader_replicas_loses_nothing() {
    let out = run(&[
        "load",
        "--rate",
        "100",
        "--duration",
        "6s",
        "--agents",
        "2",
        "--store",
        "postgres",
        "--leader-replicas",
        "2",
    ]);
    assert!(out.contains("on PostgreSQL"), "{out}");
    assert!(out.contains("leader-2"), "{out}");
    assert!(out.contains("lost 0, counted twice 0"), "{out}");
}

#[test]
fn replicas_on_sled_are_refused_with_the_reason() {
    let out = Command::new(hush_bin())
        .args(["load", "--leader-replicas", "2", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only with --store postgres"), "{err}");
}
