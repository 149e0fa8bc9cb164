//! `hush --log-format json shuffler`: every request runs in a span naming the party, the gRPC
//! method and the caller's role (never its address), and its completion carries the gRPC status
//! and latency, as JSON log lines a log pipeline can parse.

use std::net::SocketAddr;

use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::admin_client::AdminClient;
use hush_protocol::proto::v1::hpke_keys_client::HpkeKeysClient;
use hush_tests::mixnet::{Mix, RecordingLeader, shuffler_config_text};
use hush_tests::process::HushProcess;

use crate::hush_bin;

/// The "request served" events of a JSON log, as (method, peer, grpc_status, line).
fn served(log: &str) -> Vec<(String, String, String, serde_json::Value)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request served")
        .map(|v| {
            let span = &v["span"];
            (
                span["method"].as_str().unwrap_or_default().to_owned(),
                span["peer"].as_str().unwrap_or_default().to_owned(),
                v["fields"]["grpc_status"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                v.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_a_json_span_with_method_role_status_and_latency() {
    let sink = RecordingLeader::start().await;
    let dir = tempfile::tempdir().unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let text = shuffler_config_text(
        "shuffler-a",
        dir.path(),
        any,
        ("leader", "leader", &sink.url()),
        Mix {
            batch_size: 10,
            min_batch_size: 1,
            max_wait_ms: 50,
        },
        "",
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, text).unwrap();
    let args = [
        "--log-format",
        "json",
        "shuffler",
        "--insecure",
        "--config",
        &path.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    let log = dir.path().join("log");
    let mut node = HushProcess::spawn_with_env(
        hush_bin(),
        &args,
        &[("RUST_LOG", "info,hush_server::trace=debug")],
        &log,
    );
    let channel = hush_aggregator::client::channel(&node.url(), None).unwrap();
    // One request that succeeds, one refused (no admin token).
    HpkeKeysClient::new(channel.clone())
        .get_hpke_configs(pb::GetHpkeConfigsRequest {})
        .await
        .unwrap();
    let e = AdminClient::new(channel)
        .list_tasks(pb::ListTasksRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    node.terminate();

    let text = std::fs::read_to_string(&log).unwrap();
    let events = served(&text);
    let keys = events
        .iter()
        .find(|e| e.0 == "/hush.v1.HpkeKeys/GetHpkeConfigs")
        .unwrap_or_else(|| panic!("no span for GetHpkeConfigs in:\n{text}"));
    assert_eq!((keys.1.as_str(), keys.2.as_str()), ("anonymous", "0"));
    assert_eq!(keys.3["span"]["party"], "shuffler");
    assert!(keys.3["fields"]["latency_ms"].as_f64().unwrap() >= 0.0);
    let admin = events
        .iter()
        .find(|e| e.0 == "/hush.v1.Admin/ListTasks")
        .unwrap_or_else(|| panic!("no span for ListTasks in:\n{text}"));
    assert_eq!(admin.2, "16", "UNAUTHENTICATED");
    // No caller address in any request's span or event.
    for e in &events {
        assert!(!e.3.to_string().contains("127.0.0.1"), "{}", e.3);
    }
}
