//! `[metrics] listen` on every server process: the helper, the leader, a shuffler and the
//! results service each serve `GET /metrics` in the Prometheus text format. The test parses
//! every scrape with an exposition-format parser and checks that the counters follow the
//! reports: accepted, refused by reason, forwarded in batches, aggregated by both aggregators
//! and released with the ε spent; and that a TLS server counts failed handshakes and callers of
//! the wrong role.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_protocol::proto::v1 as pb;
use hush_protocol::{
    Clock, Codec, Epsilon, HpkeKeypair, Measurement, MeasurementKind, ReportId, SystemClock,
    TaskConfig, VerifyKey,
};
use hush_tests::cluster::{client_task, provision, set_tenant_token, submit};
use hush_tests::http::request;
use hush_tests::mixnet::{
    Mix, one_hop_packets, provision_shuffler, shuffler_config_text, submit_packets,
};
use hush_tests::process::{HushProcess, insecure_aggregator};
use hush_tests::task_params;
use prometheus_parse::{Scrape, Value};

use crate::hush_bin;

const WINDOW_S: u64 = 4;
const READ_TOKEN: &str = "metrics-read-token-0123456789";
const TENANT_TOKEN: &str = "metrics-tenant-token";
const METRICS: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Scrapes `addr` and parses the exposition text.
async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = request(addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text format")
}

/// The sum of the samples of `name` whose labels include `labels` (a histogram: its count).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(b) => b
                .iter()
                .find(|c| c.less_than.is_infinite())
                .map_or(0.0, |c| c.count),
            Value::Summary(_) => f64::NAN,
        })
        .sum()
}

/// Scrapes `addr` until `check` holds, for at most `secs` seconds.
async fn until(addr: SocketAddr, what: &str, secs: u64, check: impl Fn(&Scrape) -> bool) -> Scrape {
    let begun = Instant::now();
    loop {
        let s = scrape(addr).await;
        if check(&s) {
            return s;
        }
        if begun.elapsed() > Duration::from_secs(secs) {
            let hush: Vec<String> = s
                .samples
                .iter()
                .filter(|x| x.metric.starts_with("hush_"))
                .map(|x| format!("{} {} {:?}", x.metric, x.labels, x.value))
                .collect();
            panic!("{what} did not happen; the scrape:\n{}", hush.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn aggregator(dir: &Path, role: &str, helper_url: Option<&str>) -> HushProcess {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 16\nmaintenance_interval_s = 1\n{METRICS}",
        dir.join(role).display()
    );
    if let Some(u) = helper_url {
        text.push_str(&format!(
            "[leader]\nhelper_url = \"{u}\"\njob_size = 50\njob_poll_interval_ms = 20\n"
        ));
    }
    insecure_aggregator(hush_bin(), dir, role, &text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_exports_prometheus_metrics_that_follow_the_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut helper = aggregator(dir, "helper", None);
    let mut leader = aggregator(dir, "leader", Some(&helper.url()));
    let text = shuffler_config_text(
        "shuffler-b",
        &dir.join("shuffler-b"),
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", &leader.url()),
        Mix {
            batch_size: 1_000,
            min_batch_size: 1,
            max_wait_ms: 100,
        },
        METRICS,
    );
    let config = write(dir, "shuffler-b.toml", &text);
    let mut shuffler = HushProcess::spawn(
        hush_bin(),
        &["shuffler", "--insecure", "--config", &config].map(String::from),
        &dir.join("shuffler-b.log"),
    );

    let collector = HpkeKeypair::generate(1);
    let mut p = task_params(MeasurementKind::EventHistogram, &collector);
    p.time_precision_s = WINDOW_S;
    p.min_batch_size = 10;
    p.epsilon_per_collection = Epsilon::from_f64(1.0).unwrap();
    p.epsilon_budget = Epsilon::from_f64(4.0).unwrap();
    let task = TaskConfig::new(p).unwrap();
    provision(&leader.url(), &helper.url(), &task, &VerifyKey::random()).await;
    provision_shuffler(&shuffler.url(), &task).await;
    set_tenant_token(&leader.url(), &helper.url(), "acme", TENANT_TOKEN).await;
    let task_file = write(dir, "task.toml", &toml::to_string(task.params()).unwrap());
    let results_config = write(
        dir,
        "results.toml",
        &format!(
            "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nleader_url = \"{}\"\ntask_files = [\"{task_file}\"]\n\
             poll_interval_ms = 100\n{METRICS}",
            dir.join("results").display(),
            leader.url(),
        ),
    );
    let key = URL_SAFE_NO_PAD.encode(collector.to_bytes());
    let mut results = HushProcess::spawn_with_env(
        hush_bin(),
        &["results", "--insecure", "--config", &results_config].map(String::from),
        &[
            ("HUSH_TENANT_TOKEN", TENANT_TOKEN),
            ("HUSH_RESULTS_READ_TOKEN", READ_TOKEN),
            ("HUSH_COLLECTOR_KEY", &key),
        ],
        &dir.join("results.log"),
    );
    let m = |p: &HushProcess| p.metrics_addr().expect("a metrics address");
    let (lm, hm, sm, rm) = (m(&leader), m(&helper), m(&shuffler), m(&results));

    // Before any report: every server describes its metrics and its process and store.
    for addr in [lm, hm, sm, rm] {
        let s = scrape(addr).await;
        assert!(value(&s, "process_resident_memory_bytes", &[]) > 0.0);
        assert!(value(&s, "hush_store_disk_bytes", &[]) > 0.0);
        assert!(
            s.samples
                .iter()
                .any(|x| x.metric == "hush_store_tree_entries")
        );
    }
    let s = scrape(lm).await;
    assert_eq!(value(&s, "hush_reports_accepted_total", &[]), 0.0);
    assert!(s.docs.contains_key("hush_reports_accepted_total"));

    // Reports of one fresh window: 40 through the shuffler, 5 sent to the leader directly and
    // then again (replays), one that does not decode, and a packet of the wrong size.
    let client = client_task(&leader.url(), &helper.url(), &task).await;
    let window = task.window_of(SystemClock.now()).add_secs(WINDOW_S);
    while SystemClock.now() < window {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let now = SystemClock.now();
    let report = |b: usize| {
        let p = client
            .shard(&Measurement::Bucket(b), ReportId::random())
            .unwrap();
        client.seal(p, now).unwrap().to_bytes()
    };
    let through: Vec<Vec<u8>> = (0..40).map(|i| report(i % 4)).collect();
    let packets = one_hop_packets(&shuffler.url(), "shuffler-b", &task, through).await;
    let counts = submit_packets(&shuffler.url(), &packets, 10).await;
    assert_eq!(counts.accepted, 40);
    let mut wrong = packets[0].clone();
    wrong.data = wrong.data.slice(1..);
    let counts = submit_packets(&shuffler.url(), &[wrong], 1).await;
    assert_eq!(counts.accepted, 0);
    let direct: Vec<Vec<u8>> = (0..5).map(|_| report(2)).collect();
    assert_eq!(submit(&leader.url(), &direct, 5).await.accepted, 5);
    assert_eq!(submit(&leader.url(), &direct, 5).await.accepted, 0);
    assert_eq!(submit(&leader.url(), &[vec![1, 2, 3]], 1).await.accepted, 0);

    // A batch is counted after its packets are: forwarded, then removed from the store.
    let s = until(sm, "the shuffler forwarding its batch", 30, |s| {
        value(s, "hush_shuffler_forwarded_packets_total", &[]) == 40.0
            && value(s, "hush_shuffler_batches_total", &[]) >= 1.0
    })
    .await;
    assert_eq!(value(&s, "hush_packets_accepted_total", &[]), 40.0);
    assert_eq!(
        value(
            &s,
            "hush_packets_rejected_total",
            &[("reason", "wrong_size")]
        ),
        1.0
    );
    assert!(value(&s, "hush_shuffler_batches_total", &[]) >= 1.0);
    assert_eq!(value(&s, "hush_shuffler_buffered_packets", &[]), 0.0);
    assert!(
        value(
            &s,
            "hush_requests_total",
            &[
                ("method", "/hush.v1.Shuffler/SubmitPackets"),
                ("grpc_status", "0")
            ]
        ) >= 5.0
    );

    let s = until(lm, "the leader aggregating every report", 30, |s| {
        value(s, "hush_reports_aggregated_total", &[]) == 45.0
    })
    .await;
    assert_eq!(value(&s, "hush_reports_accepted_total", &[]), 45.0);
    assert_eq!(
        value(&s, "hush_reports_rejected_total", &[("reason", "replay")]),
        5.0
    );
    assert_eq!(
        value(
            &s,
            "hush_reports_rejected_total",
            &[("reason", "malformed")]
        ),
        1.0
    );
    assert!(
        value(
            &s,
            "hush_aggregation_jobs_finished_total",
            &[("outcome", "committed")]
        ) >= 1.0
    );
    assert!(value(&s, "hush_aggregation_job_duration_seconds", &[]) >= 1.0);
    assert_eq!(value(&s, "hush_aggregation_job_retries_total", &[]), 0.0);
    until(lm, "the pending gauge going back to zero", 10, |s| {
        value(s, "hush_reports_pending", &[]) == 0.0
    })
    .await;
    // Tree sizes are counted at most every 10 s.
    // sled logs anti-replay ids per ingest transaction and window: the 45 ids are in at least
    // one entry.
    until(lm, "the store gauges counting the reports seen", 30, |s| {
        value(s, "hush_store_tree_entries", &[("tree", "seen")]) >= 1.0
    })
    .await;
    // ...and holds the ids in memory, counted exactly.
    assert_eq!(value(&scrape(lm).await, "hush_anti_replay_ids", &[]), 45.0);

    // A path no service serves is counted as `unknown`: what a caller puts in it never becomes
    // a label.
    let channel = hush_aggregator::client::channel(&leader.url(), None).unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let e = grpc
        .unary::<pb::ListTasksRequest, pb::ListTasksResponse, _>(
            tonic::Request::new(pb::ListTasksRequest::default()),
            tonic::codegen::http::uri::PathAndQuery::from_static("/hush.v1.Admin/Marker0123"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let s = scrape(lm).await;
    assert!(value(&s, "hush_requests_total", &[("method", "unknown")]) >= 1.0);
    assert!(
        s.samples
            .iter()
            .all(|x| !x.labels.values().any(|v| v.contains("Marker0123"))),
        "a caller's path became a label"
    );
    let s = until(hm, "the helper aggregating every report", 30, |s| {
        value(s, "hush_reports_aggregated_total", &[]) == 45.0
    })
    .await;
    assert!(value(&s, "hush_aggregation_jobs_started_total", &[]) >= 1.0);
    // The helper marks each aggregated report seen at its job's commit.
    assert_eq!(value(&s, "hush_anti_replay_ids", &[]), 45.0);
    // The leader names each committed job back to the helper, which deletes its stored answer
    // rather than keeping it for its whole job retention.
    let committed = value(
        &scrape(lm).await,
        "hush_aggregation_jobs_finished_total",
        &[("outcome", "committed")],
    );
    until(
        lm,
        "the leader naming its committed jobs to the helper",
        30,
        |s| value(s, "hush_aggregation_jobs_forgotten_total", &[]) == committed,
    )
    .await;
    until(
        hm,
        "the helper deleting the committed jobs' answers",
        30,
        |s| {
            value(s, "hush_aggregation_jobs_forgotten_total", &[]) == committed
                && value(s, "hush_store_tree_entries", &[("tree", "helper_jobs")]) == 0.0
                && value(
                    s,
                    "hush_store_tree_entries",
                    &[("tree", "helper_job_times")],
                ) == 0.0
        },
    )
    .await;

    // The results service collects the window once it closes: a release at each party, with
    // the ε it spent.
    let s = until(rm, "the results service releasing the window", 60, |s| {
        value(s, "hush_results_windows_total", &[("outcome", "released")]) >= 1.0
    })
    .await;
    assert!(value(&s, "hush_collections_total", &[("outcome", "released")]) >= 1.0);
    assert!(value(&s, "hush_collection_duration_seconds", &[]) >= 1.0);
    let path = format!("/v1/tasks/{}/windows/{}", task.id(), window.as_secs());
    let (status, body) = request(
        results.http_addr().unwrap(),
        "GET",
        &path,
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let task_label = task.id().to_string();
    for (addr, party) in [(lm, "leader"), (hm, "helper")] {
        let s = scrape(addr).await;
        let labels = [("task", task_label.as_str()), ("purpose", "routine")];
        assert!(
            value(&s, "hush_collections_total", &[("outcome", "released")]) >= 1.0,
            "{party}"
        );
        let spent = value(&s, "hush_epsilon_spent", &labels);
        let left = value(&s, "hush_epsilon_left", &labels);
        assert!(spent >= 1.0, "{party}: ε spent {spent}");
        // The routine share of the budget, less what the window spent.
        let routine = task
            .budget_for(hush_protocol::BudgetPurpose::Routine)
            .as_f64();
        assert!(
            (left - (routine - 1.0)).abs() < 1e-6,
            "{party}: ε left {left}"
        );
        assert!(value(&s, "hush_audit_entries_total", &[]) >= 1.0, "{party}");
    }

    // The analyst CLI reads the same results.
    crate::analyst::check(&results.url(), READ_TOKEN, &task, window);

    for p in [&mut results, &mut shuffler, &mut leader, &mut helper] {
        p.terminate();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_server_counts_failed_handshakes_and_callers_of_the_wrong_role() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let certs = dir.join("certs");
    let out = std::process::Command::new(hush_bin())
        .args(["certs", "--out", certs.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let c = |n: &str| certs.join(n).display().to_string();
    // A later shuffler: only shuffler-a may submit packets.
    let extra = format!(
        "{METRICS}[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\
         [peers]\nprevious = [\"shuffler-a\"]\nkey_directories = [\"collector\"]\n",
        c("shuffler-b.pem"),
        c("shuffler-b-key.pem"),
        c("ca.pem"),
    );
    let text = shuffler_config_text(
        "shuffler-b",
        &dir.join("shuffler-b"),
        "127.0.0.1:0".parse().unwrap(),
        ("leader", "leader", "https://localhost:1"),
        Mix {
            batch_size: 10,
            min_batch_size: 1,
            max_wait_ms: 100,
        },
        &extra,
    );
    let config = write(dir, "shuffler-b.toml", &text);
    let mut shuffler = HushProcess::spawn(
        hush_bin(),
        &["shuffler", "--config", &config].map(String::from),
        &dir.join("shuffler-b.log"),
    );
    let addr = shuffler.metrics_addr().expect("a metrics address");

    // Plaintext against a TLS listener: the handshake fails.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(shuffler.addr())
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
    }
    until(addr, "a failed handshake to be counted", 10, |s| {
        value(s, "hush_tls_handshake_failures_total", &[]) >= 1.0
    })
    .await;

    // The collector's certificate is valid but not a shuffler's.
    let material = hush_server::tls::TlsFiles {
        cert: certs.join("collector.pem"),
        key: certs.join("collector-key.pem"),
        ca: certs.join("ca.pem"),
    }
    .read_with(|p| std::fs::read(p))
    .unwrap();
    let url = format!("https://localhost:{}", shuffler.addr().port());
    let channel = hush_aggregator::client::channel(&url, Some(&material.client())).unwrap();
    let e = pb::shuffler_client::ShufflerClient::new(channel)
        .submit_packets(pb::SubmitPacketsRequest { packets: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    let s = scrape(addr).await;
    assert_eq!(
        value(&s, "hush_peer_refusals_total", &[("reason", "wrong_role")]),
        1.0
    );
    assert_eq!(
        value(
            &s,
            "hush_requests_total",
            &[
                ("method", "/hush.v1.Shuffler/SubmitPackets"),
                ("grpc_status", "7")
            ]
        ),
        1.0
    );
    shuffler.terminate();
}
