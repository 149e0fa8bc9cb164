//! The audit trail of real aggregator processes: provisioning and token changes are recorded,
//! `hush audit verify` passes on the untouched database and fails, naming the entry, once any
//! entry is changed, removed or reordered.

use std::path::Path;
use std::process::Command;

use hush_aggregator::AggregatorConfig;
use hush_protocol::{HpkeKeypair, MeasurementKind, TaskConfig, VerifyKey};
use hush_tests::cluster::{provision, set_tenant_token};
use hush_tests::process::HushProcess;
use hush_tests::task_params;

use crate::hush_bin;

fn aggregator(dir: &Path, role: &str, helper_url: Option<&str>) -> HushProcess {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\n",
        dir.join("data").display()
    );
    if let Some(u) = helper_url {
        text.push_str(&format!("[leader]\nhelper_url = \"{u}\"\n"));
    }
    AggregatorConfig::from_toml(&text).expect("valid config");
    let config = dir.join("config.toml");
    std::fs::write(&config, text).unwrap();
    HushProcess::spawn(
        hush_bin(),
        &[
            "aggregator".into(),
            "--insecure".into(),
            "--role".into(),
            role.into(),
            "--config".into(),
            config.display().to_string(),
        ],
        &dir.join("log"),
    )
}

fn audit(args: &[&str], data: &Path) -> (bool, String) {
    let out = Command::new(hush_bin())
        .arg("audit")
        .args(args)
        .arg("--data-dir")
        .arg(data)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run hush audit");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Rewrites the stored entries of the audit tree with `f` (the aggregator is stopped).
fn tamper(data: &Path, f: impl FnOnce(&sled::Tree)) {
    let db = sled::open(data.join("db")).unwrap();
    f(&db.open_tree("audit").unwrap());
    db.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampering_with_any_audit_entry_makes_verify_fail_naming_it() {
    let (hd, ld) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut helper = aggregator(hd.path(), "helper", None);
    let mut leader = aggregator(ld.path(), "leader", Some(&helper.url()));
    for i in 0..3 {
        let t = TaskConfig::new(task_params(
            MeasurementKind::EventHistogram,
            &HpkeKeypair::generate(1),
        ))
        .unwrap();
        provision(&leader.url(), &helper.url(), &t, &VerifyKey::random()).await;
        if i == 0 {
            set_tenant_token(&leader.url(), &helper.url(), "acme", "a-token-of-16-chars").await;
        }
    }
    leader.terminate();
    helper.terminate();
    let data = ld.path().join("data");

    let (ok, out) = audit(&["verify"], &data);
    assert!(ok, "{out}");
    assert!(out.contains("intact: 4 entries"), "{out}");
    let (ok, out) = audit(&["show", "--tenant", "acme"], &data);
    assert!(ok, "{out}");
    assert_eq!(out.lines().count(), 4, "{out}");
    assert!(
        out.contains("task.create") && out.contains("tenant.token"),
        "{out}"
    );
    assert!(
        !out.contains("a-token-of-16-chars"),
        "secrets stay out of the trail"
    );

    // Keep a pristine copy per case: each tampering starts from the intact log.
    let pristine: Vec<(sled::IVec, sled::IVec)> = {
        let db = sled::open(data.join("db")).unwrap();
        let t = db.open_tree("audit").unwrap();
        t.iter().map(Result::unwrap).collect()
    };
    let restore = |t: &sled::Tree| {
        t.clear().unwrap();
        for (k, v) in &pristine {
            t.insert(k, v.clone()).unwrap();
        }
    };
    type Case = (
        &'static str,
        fn(&sled::Tree, &[(sled::IVec, sled::IVec)]),
        &'static str,
    );
    let cases: [Case; 4] = [
        (
            "changed",
            |t, p| {
                let text = String::from_utf8(p[2].1.to_vec())
                    .unwrap()
                    .replace("\"ok\"", "\"refused\"");
                t.insert(&p[2].0, text.as_bytes()).unwrap();
            },
            "audit entry 2",
        ),
        (
            "removed",
            |t, p| {
                t.remove(&p[1].0).unwrap();
            },
            "audit entry 1",
        ),
        (
            "reordered",
            |t, p| {
                t.insert(&p[1].0, p[2].1.clone()).unwrap();
                t.insert(&p[2].0, p[1].1.clone()).unwrap();
            },
            "audit entry 1",
        ),
        (
            "newest removed",
            |t, p| {
                t.remove(&p[3].0).unwrap();
            },
            "audit entry 3",
        ),
    ];
    for (what, f, want) in cases {
        tamper(&data, |t| {
            restore(t);
            f(t, &pristine);
        });
        let (ok, out) = audit(&["verify"], &data);
        assert!(!ok, "{what}: verify passed:\n{out}");
        assert!(out.contains(want), "{what}: {out}");
    }
}
