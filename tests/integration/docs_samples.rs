//! The sample configs in docs/samples are parsed and checked, so the documentation never rots.

use std::path::{Path, PathBuf};

use hush_aggregator::AggregatorConfig;
use hush_collector::{ResultsConfig, load_tasks};
use hush_protocol::{TaskConfig, TaskParams};
use hush_shuffler::ShufflerConfig;

fn samples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_sample_config_parses_and_passes_its_checks() {
    let files = samples();
    assert!(
        files.len() >= 6,
        "expected the sample configs, found {files:?}"
    );
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        if name.starts_with("task-") {
            let params: TaskParams =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            TaskConfig::new(params).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else if name == "leader.toml" || name == "helper.toml" {
            let c = AggregatorConfig::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.leader.is_some(), name == "leader.toml", "{name}");
        } else if name == "results.toml" {
            let c = ResultsConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            let tasks = load_tasks(&c).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(tasks.len(), c.task_files.len());
        } else if name == "client.toml" {
            let c = hush_client::ClientConfig::from_file(&path)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            c.check().unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!((c.latency.len(), c.counter.len()), (1, 1));
        } else if name.starts_with("shuffler") {
            ShufflerConfig::from_toml(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        } else {
            panic!("{name}: no test knows how to check this sample; add it here");
        }
    }
}

/// Every URL in the README, docs/ and the samples that names a component reaches it on the
/// port its sample listens on, under one name per component: a new operator copying commands
/// from different pages gets one consistent cluster.
#[test]
fn ports_and_names_agree_across_the_readme_the_docs_and_the_samples() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    // Component, its host name in the examples, the port its sample listens on.
    let canonical = [
        ("leader", "leader.operator-a.example", 7001),
        ("helper", "helper.operator-b.example", 7002),
        ("shuffler-a", "shuffler-a.operator-c.example", 7101),
        ("shuffler-b", "shuffler-b.operator-d.example", 7102),
        ("results", "results.acme.example", 7201),
    ];
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "docs/samples"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "md" || x == "toml") {
                files.push(p);
            }
        }
    }
    let mut checked = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        // host:port pairs whose host ends in ".example" (the example domains).
        for (i, _) in text.match_indices(".example:") {
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'))
                .map_or(0, |s| s + 1);
            let host = format!("{}.example", &text[start..i]);
            let port: String = text[i + ".example:".len()..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            let label = host.split('.').next().unwrap();
            let Some((_, name, want)) = canonical.iter().find(|(c, _, _)| *c == label) else {
                panic!("{}: {host}:{port} names no known component", f.display());
            };
            assert_eq!(host, *name, "{}: {host}:{port}", f.display());
            assert_eq!(port, want.to_string(), "{}: {host}:{port}", f.display());
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} URLs found");
    // ... and the samples listen there.
    for (sample, port) in [
        ("leader.toml", 7001),
        ("helper.toml", 7002),
        ("shuffler-a.toml", 7101),
        ("shuffler-b.toml", 7102),
    ] {
        let text = std::fs::read_to_string(root.join("docs/samples").join(sample)).unwrap();
        assert!(
            text.contains(&format!("listen = \"0.0.0.0:{port}\"")),
            "{sample} does not listen on {port}"
        );
    }
    let results = std::fs::read_to_string(root.join("docs/samples/results.toml")).unwrap();
    assert!(results.contains("listen_grpc = \"127.0.0.1:7201\""));
    // The last shuffler's next hop is the leader, which names it among its shufflers.
    let b = ShufflerConfig::from_toml(
        &std::fs::read_to_string(root.join("docs/samples/shuffler-b.toml")).unwrap(),
    )
    .unwrap();
    let leader = std::fs::read_to_string(root.join("docs/samples/leader.toml")).unwrap();
    assert!(leader.contains("shufflers = [\"shuffler-b.operator-d.example\"]"));
    assert!(format!("{b:?}").contains("https://leader.operator-a.example:7001"));
}
