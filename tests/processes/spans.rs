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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_results_http_api_logs_a_span_per_request_with_route_and_status() {
    use base64::Engine as _;
    use hush_protocol::{Codec, HpkeKeypair, MeasurementKind, TaskConfig};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let collector = HpkeKeypair::generate(1);
    let task = TaskConfig::new(hush_tests::task_params(
        MeasurementKind::Counter,
        &collector,
    ))
    .unwrap();
    std::fs::write(d.join("task.toml"), toml::to_string(task.params()).unwrap()).unwrap();
    let config = d.join("results.toml");
    std::fs::write(
        &config,
        format!(
            "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nleader_url = \"http://127.0.0.1:1\"\ntask_files = [\"{}\"]\n",
            d.join("data").display(),
            d.join("task.toml").display()
        ),
    )
    .unwrap();
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(collector.to_bytes());
    let log = d.join("log");
    let mut results = HushProcess::spawn_with_env(
        hush_bin(),
        &[
            "--log-format",
            "json",
            "results",
            "--insecure",
            "--config",
            &config.display().to_string(),
        ]
        .map(String::from),
        &[
            ("RUST_LOG", "info,hush_collector=debug"),
            ("HUSH_TENANT_TOKEN", "acme-token-0123456789"),
            ("HUSH_RESULTS_READ_TOKEN", "read-token-0123456789"),
            ("HUSH_COLLECTOR_KEY", &key),
        ],
        &log,
    );
    let http = results.http_addr().expect("HTTP address");
    let path = format!("/v1/tasks/{}/windows", task.id());
    let (ok, _) =
        hush_tests::http::request(http, "GET", &path, Some("read-token-0123456789"), None).await;
    let (refused, _) = hush_tests::http::request(http, "GET", &path, None, None).await;
    assert_eq!((ok, refused), (200, 401));
    results.terminate();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "request served" && v["span"]["party"] == "results")
        .collect();
    let statuses: Vec<u64> = lines
        .iter()
        .filter(|v| v["span"]["method"] == "GET /v1/tasks/{task}/windows")
        .map(|v| v["fields"]["http_status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [200, 401], "{text}");
    for v in &lines {
        // The route, not the request's path: no task id, no query, no token.
        assert!(!v.to_string().contains("read-token"), "{v}");
        assert!(!v.to_string().contains(&task.id().to_string()), "{v}");
        assert_eq!(v["span"]["peer"], "http");
    }
}
