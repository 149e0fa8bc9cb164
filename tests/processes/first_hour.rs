//! What a new operator runs into first: errors that name the fix, `hush certs --names` in the
//! form its help shows, a token per role in one shell, and config paths relative to the config
//! file.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::hush_bin;

fn stderr_of(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(hush_bin())
        .args(args)
        .env_remove("HUSH_CA")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn operator_tools_without_a_ca_say_to_pass_one() {
    let token = [("HUSH_ADMIN_TOKEN", "t")];
    let e = stderr_of(
        &["task", "list", "--aggregator", "https://127.0.0.1:9"],
        &token,
    );
    assert!(e.contains("--ca FILE or HUSH_CA=FILE"), "{e}");
    assert!(!e.contains("[tls]") && !e.contains("--insecure"), "{e}");
    let e = stderr_of(
        &[
            "results",
            "windows",
            "--url",
            "https://127.0.0.1:9",
            "--task",
            "Qm9vbS1lcnJvcnMtY291bnRlci10YXNrLWlkLTAwMDE",
        ],
        &[("HUSH_RESULTS_READ_TOKEN", "t")],
    );
    assert!(e.contains("--ca FILE or HUSH_CA=FILE"), "{e}");
    // The other way round: a CA given, a plaintext URL.
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not read before the URL is checked").unwrap();
    let e = stderr_of(
        &[
            "--ca",
            ca.to_str().unwrap(),
            "task",
            "list",
            "--aggregator",
            "http://127.0.0.1:9",
        ],
        &token,
    );
    assert!(e.contains("use the server's https:// URL"), "{e}");
}

#[test]
fn hush_certs_takes_names_comma_or_space_separated() {
    let dir = tempfile::tempdir().unwrap();
    for (sub, args) in [
        (
            "spaces",
            vec![
                "--names",
                "leader",
                "helper",
                "--hosts",
                "localhost",
                "127.0.0.1",
            ],
        ),
        (
            "commas",
            vec!["--names", "leader,helper", "--hosts", "localhost,127.0.0.1"],
        ),
    ] {
        let out = dir.path().join(sub);
        let o = Command::new(hush_bin())
            .args(["certs", "--out", out.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{sub}: {o:?}");
        for f in ["ca.pem", "leader.pem", "helper.pem"] {
            assert!(out.join(f).is_file(), "{sub}: no {f}");
        }
        assert!(
            !out.join("collector.pem").exists(),
            "{sub}: default names added"
        );
    }
}

/// Starts `hush aggregator` in `cwd` and returns its first stdout line ("listening on …") or
/// its stderr.
fn start_leader(
    cwd: &std::path::Path,
    config: &str,
    env: &[(&str, &str)],
) -> Result<(std::process::Child, String), String> {
    let mut child = Command::new(hush_bin())
        .args([
            "aggregator",
            "--insecure",
            "--role",
            "leader",
            "--config",
            config,
        ])
        .current_dir(cwd)
        .env_remove("HUSH_ADMIN_TOKEN")
        .env_remove("HUSH_LEADER_ADMIN_TOKEN")
        .env("HUSH_PEER_TOKEN", "peer-token")
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line.starts_with("listening on ") {
        Ok((
            child,
            line.trim().trim_start_matches("listening on ").to_owned(),
        ))
    } else {
        let out = child.wait_with_output().unwrap();
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn a_server_reads_its_roles_admin_token_and_paths_relative_to_its_config() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = dir.path().join("conf");
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::create_dir_all(&elsewhere).unwrap();
    let config = conf_dir.join("leader.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"leader-data\"\n[leader]\nhelper_url = \"http://127.0.0.1:9\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap().to_owned();
    // Neither token variable: the error names both.
    let e = start_leader(&elsewhere, &config, &[]).unwrap_err();
    assert!(
        e.contains("HUSH_LEADER_ADMIN_TOKEN") && e.contains("HUSH_ADMIN_TOKEN"),
        "{e}"
    );
    // The role's own variable is enough, and it is the token the admin API takes.
    let (mut child, addr) = start_leader(
        &elsewhere,
        &config,
        &[("HUSH_LEADER_ADMIN_TOKEN", "leader-admin")],
    )
    .unwrap();
    let list = |token: &str| {
        Command::new(hush_bin())
            .args(["task", "list", "--aggregator", &format!("http://{addr}")])
            .env_remove("HUSH_CA")
            .env("HUSH_ADMIN_TOKEN", token)
            .output()
            .unwrap()
    };
    let ok = list("leader-admin");
    assert!(ok.status.success(), "{ok:?}");
    assert!(!list("another-token").status.success());
    // data_dir is relative to the config's folder, not to where the process started.
    assert!(conf_dir.join("leader-data").is_dir());
    assert!(!elsewhere.join("leader-data").exists());
    let _ = child.kill();
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(10));
}
