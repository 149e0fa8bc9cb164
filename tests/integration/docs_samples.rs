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
