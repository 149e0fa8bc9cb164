//! SIGKILL a shuffler process with packets buffered, or while it forwards, restart it on the same
//! data directory: every accepted packet reaches the next hop, and the next hop accepts each
//! exactly once.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use hush_protocol::proto::v1 as pb;
use hush_protocol::{HpkeKeypair, MeasurementKind, TaskConfig};
use hush_shuffler::ShufflerConfig;
use hush_tests::cluster::stats;
use hush_tests::mixnet::{
    Mix, RecordingLeader, one_hop_packets, provision_shuffler, shuffler_config_text, submit_packets,
};
use hush_tests::process::HushProcess;
use hush_tests::task_params;

use crate::hush_bin;

fn write_config(dir: &Path, listen: SocketAddr, sink: &str, mix: Mix, name: &str) -> Vec<String> {
    let text = shuffler_config_text(
        "shuffler-a",
        dir,
        listen,
        ("leader", "leader", sink),
        mix,
        // Appended to [forward]: slices of 50 packets.
        "chunk_packets = 50\n[limits]\nmax_buffered_packets = 100000\nper_tenant_max_buffered = 100000\n",
    );
    ShufflerConfig::from_toml(&text).expect("valid config");
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    [
        "shuffler",
        "--insecure",
        "--config",
        &path.display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

async fn packets(shuffler_url: &str, task: &TaskConfig, n: u32) -> Vec<pb::Packet> {
    one_hop_packets(
        shuffler_url,
        "shuffler-a",
        task,
        (0..n).map(|i| i.to_be_bytes().to_vec()),
    )
    .await
}

fn indices(reports: &[Vec<u8>]) -> HashSet<u32> {
    reports
        .iter()
        .map(|r| u32::from_be_bytes(r[..4].try_into().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_packets_buffered_loses_nothing() {
    let sink = RecordingLeader::start().await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // A batch that never fills: everything stays buffered.
    let hold = Mix {
        batch_size: 100_000,
        min_batch_size: 100_000,
        max_wait_ms: 3_600_000,
    };
    let args = write_config(dir.path(), any, &sink.url(), hold, "hold.toml");
    let mut node = HushProcess::spawn(hush_bin(), &args, &dir.path().join("log"));
    provision_shuffler(&node.url(), &task).await;
    let sent = packets(&node.url(), &task, 2_000).await;
    assert_eq!(
        submit_packets(&node.url(), &sent, 250).await.accepted,
        2_000
    );
    assert_eq!(stats(&node.url(), Some(&task)).await.reports_pending, 2_000);
    assert!(sink.received().is_empty());

    node.kill();
    // Restart on the same data directory with a batch size that lets them go.
    let release = Mix {
        batch_size: 500,
        min_batch_size: 1,
        max_wait_ms: 100,
    };
    let args = write_config(
        dir.path(),
        node.addr(),
        &sink.url(),
        release,
        "release.toml",
    );
    node.restart_with(Some(args));
    let got = sink.wait_for(2_000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.received().len(), 2_000);
    assert_eq!(indices(&got), (0..2_000).collect::<HashSet<_>>());
    assert_eq!(sink.duplicates(), 0);
    let s = stats(&node.url(), Some(&task)).await;
    assert_eq!(
        (s.reports_accepted, s.reports_aggregated, s.reports_pending),
        (2_000, 2_000, 0)
    );
    node.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_forwarding_loses_nothing_and_the_next_hop_counts_each_once() {
    // A next hop that takes 30 ms per request keeps forwarding busy when the kill lands.
    let sink = RecordingLeader::start_with_delay(Duration::from_millis(30)).await;
    let task = TaskConfig::new(task_params(
        MeasurementKind::EventHistogram,
        &HpkeKeypair::generate(1),
    ))
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mix = Mix {
        batch_size: 200,
        min_batch_size: 1,
        max_wait_ms: 50,
    };
    let args = write_config(dir.path(), any, &sink.url(), mix, "config.toml");
    let mut node = HushProcess::spawn(hush_bin(), &args, &dir.path().join("log"));
    provision_shuffler(&node.url(), &task).await;
    let sent = packets(&node.url(), &task, 4_000).await;
    let mut accepted = submit_packets(&node.url(), &sent[..2_000], 100)
        .await
        .accepted;
    // Kill once forwarding is under way but not finished.
    sink.wait_for(1, Duration::from_secs(30)).await;
    node.kill();
    let before = sink.received().len();
    assert!(before < 2_000, "the kill landed after forwarding finished");
    node.restart_with(Some(write_config(
        dir.path(),
        node.addr(),
        &sink.url(),
        mix,
        "config.toml",
    )));
    accepted += submit_packets(&node.url(), &sent[2_000..], 100)
        .await
        .accepted;
    assert_eq!(accepted, 4_000);
    let got = sink.wait_for(4_000, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(indices(&got), (0..4_000).collect::<HashSet<_>>());
    assert_eq!(
        sink.received().len(),
        4_000,
        "the next hop accepted each packet once"
    );
    // A slice acknowledged just before the kill but not yet deleted is sent again after the
    // restart; the next hop refuses it as a replay. At most one slice can be in that state.
    assert!(sink.duplicates() <= 50, "{} duplicates", sink.duplicates());
    eprintln!(
        "killed after {before} of 4000 arrived; {} re-sent and refused as replays",
        sink.duplicates()
    );
    node.terminate();
}
