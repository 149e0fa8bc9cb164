//! `hush certs` writes a development CA and per-component certificates, and the servers refuse
//! to start plaintext unless asked to with `--insecure`.

use std::process::Command;

use hush_server::tls::TlsFiles;

use crate::hush_bin;

#[test]
fn hush_certs_writes_a_ca_and_certificates_that_servers_load() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let run = |extra: &[&str]| {
        Command::new(hush_bin())
            .args(["certs", "--out", out.to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap()
    };
    let first = run(&[]);
    assert!(first.status.success(), "{first:?}");
    for name in [
        "ca",
        "leader",
        "helper",
        "shuffler-a",
        "shuffler-b",
        "collector",
    ] {
        let cert = std::fs::read_to_string(out.join(format!("{name}.pem"))).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{name}");
        let key_path = out.join(format!("{name}-key.pem"));
        assert!(
            std::fs::read_to_string(&key_path)
                .unwrap()
                .contains("PRIVATE KEY")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{name}: key readable by others: {mode:o}");
        }
    }
    // Nothing is overwritten by accident.
    let again = run(&[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert!(run(&["--force"]).status.success());

    // The files work as a [tls] section: the material parses and builds TLS configs.
    let files = TlsFiles {
        cert: out.join("leader.pem"),
        key: out.join("leader-key.pem"),
        ca: out.join("ca.pem"),
    };
    let m = files.read_with(|p| std::fs::read(p)).unwrap();
    m.grpc_server().unwrap();
    let _ = m.client();
}

#[test]
fn servers_refuse_plaintext_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("helper.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let out = Command::new(hush_bin())
        .args(["aggregator", "--role", "helper", "--config"])
        .arg(&config)
        .env("HUSH_ADMIN_TOKEN", "t")
        .env("HUSH_PEER_TOKEN", "p")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no [tls] section"), "{err}");
    assert!(err.contains("--insecure"), "{err}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing is opened before the refusal"
    );
}
