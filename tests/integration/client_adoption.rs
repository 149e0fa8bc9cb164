//! A service adopts hush without rewriting its instrumentation: spans it already has (told apart
//! by a field, as tower-http's "request" spans are by `http.route`) and histograms and counters
//! it already records with the `metrics` facade become measurements of hush tasks, while its own
//! recorder still gets every metric.

use std::sync::Arc;

use hush_client::{
    Endpoints, HushClient, HushLayer, HushRecorder, KeySource, LatencyUnit, RuntimeConfig,
};
use hush_protocol::{HpkeKeypair, MeasurementKind, MockClock, TaskConfig, Time};
use metrics_util::debugging::DebuggingRecorder;
use tracing_subscriber::prelude::*;

/// A client with two latency tasks and a counter, pinned keys and a first shuffler that is not
/// there (nothing here needs an upload).
async fn client() -> HushClient {
    let keys = hush_tests::pinned_key_set();
    let task = |kind| {
        let mut p = hush_tests::task_params(kind, &HpkeKeypair::generate(4));
        p.contribution_bound = 100;
        TaskConfig::new(p).unwrap()
    };
    HushClient::builder(Endpoints {
        shuffler_url: format!("http://{}", hush_tests::free_addr()),
        keys: KeySource::Pinned(keys),
        tls_ca: None,
    })
    .latency_task(
        "checkout",
        "POST /pay",
        task(MeasurementKind::EventHistogram),
    )
    .latency_task(
        "checkout",
        "GET /cart",
        task(MeasurementKind::EventHistogram),
    )
    .counter_task("errors", task(MeasurementKind::Counter))
    .config(RuntimeConfig::default())
    .clock(Arc::new(MockClock::new(Time::from_secs(1_800_000_000))))
    .start()
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_told_apart_by_a_field_become_their_routes_latencies() {
    let c = client().await;
    let layer = HushLayer::new(c.clone())
        .span_with_field("request", "http.route", "/pay", "checkout", "POST /pay")
        .span_with_field("request", "http.route", "/cart", "checkout", "GET /cart");
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        // A plain string, a Display and a Debug value all match.
        let _s = tracing::info_span!("request", http.route = "/pay").entered();
        drop(_s);
        let _s = tracing::info_span!("request", http.route = %"/pay").entered();
        drop(_s);
        let _s = tracing::info_span!("request", http.route = ?"/pay").entered();
        drop(_s);
        assert_eq!(c.stats().recorded, 3);
        // The route known only later, as a router records it once matched.
        for _ in 0..2 {
            let s = tracing::info_span!("request", http.route = tracing::field::Empty);
            s.record("http.route", "/cart");
            drop(s.entered());
        }
        assert_eq!(c.stats().recorded, 5);
        // Another route, another span name: nothing.
        let _ = tracing::info_span!("request", http.route = "/admin").entered();
        let _ = tracing::info_span!("db", http.route = "/pay").entered();
    });
    let s = c.stats();
    assert_eq!((s.recorded, s.unknown_metric), (5, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_facade_feeds_hush_and_the_services_own_recorder() {
    let c = client().await;
    let local = DebuggingRecorder::new();
    let snapshot = local.snapshotter();
    let recorder = HushRecorder::new(&c, local)
        .histogram(
            "http_request_duration_seconds",
            &[("route", "/pay")],
            LatencyUnit::Seconds,
            "checkout",
            "POST /pay",
        )
        .counter("http_errors_total", &[("route", "/pay")], "errors")
        // The client's own counters are never routed.
        .counter("hush_client_reports_sent_total", &[], "errors");
    metrics::with_local_recorder(&recorder, || {
        for ms in [12.0, 30.0, 250.0] {
            metrics::histogram!("http_request_duration_seconds", "route" => "/pay", "method" => "POST")
                .record(ms / 1e3);
        }
        metrics::histogram!("http_request_duration_seconds", "route" => "/health").record(0.001);
        metrics::counter!("http_errors_total", "route" => "/pay").increment(2);
        metrics::counter!("http_errors_total", "route" => "/cart").increment(7);
        metrics::counter!("hush_client_reports_sent_total").increment(1);
        metrics::gauge!("inflight").set(3.0);
    });
    // Three latencies and two errors reached hush; nothing else did.
    let s = c.stats();
    assert_eq!((s.recorded, s.unknown_metric), (5, 0), "{s:?}");
    // The service's recorder got every series, routed or not.
    let names: Vec<String> = snapshot
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(k, _, _, _)| {
            let k = k.key();
            let mut l: Vec<String> = k
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            l.sort();
            format!("{}{{{}}}", k.name(), l.join(","))
        })
        .collect();
    for want in [
        "http_request_duration_seconds{method=POST,route=/pay}",
        "http_request_duration_seconds{route=/health}",
        "http_errors_total{route=/pay}",
        "http_errors_total{route=/cart}",
        "hush_client_reports_sent_total{}",
        "inflight{}",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_starts_from_the_config_a_service_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/samples");
    for f in ["task-checkout-latency.toml", "task-errors.toml"] {
        std::fs::copy(samples.join(f), dir.path().join(f)).unwrap();
    }
    // The service's own config, with hush's as one section.
    #[derive(serde::Deserialize)]
    struct ServiceConfig {
        #[allow(dead_code)]
        port: u16,
        hush: hush_client::ClientConfig,
    }
    let text = format!(
        "port = 8080\n[hush]\nshuffler_url = \"http://{}\"\nkey_directory = \"http://{}\"\n\
         [[hush.latency]]\nservice = \"checkout\"\noperation = \"POST /pay\"\n\
         task_file = \"task-checkout-latency.toml\"\n\
         [[hush.counter]]\nname = \"errors\"\ntask_file = \"task-errors.toml\"\n",
        hush_tests::free_addr(),
        hush_tests::free_addr()
    );
    let mut svc: ServiceConfig = toml::from_str(&text).unwrap();
    svc.hush.base_dir = Some(dir.path().to_owned());
    let c = HushClient::from_config(&svc.hush).await.unwrap();
    c.latency("checkout", "POST /pay")
        .record(std::time::Duration::from_millis(20));
    c.counter("errors").add(1);
    let s = c.stats();
    assert_eq!((s.recorded, s.unknown_metric), (2, 0), "{s:?}");

    // What cannot work is refused with what to change.
    let path = dir.path().join("client.toml");
    let bad = [
        (
            "shuffler_url = \"x\"\nkey_directory = \"y\"\n[[latency]]\nservice = \"a\"\noperation = \"b\"\n",
            "exactly one of task",
        ),
        (
            "shuffler_url = \"x\"\nkey_directory = \"y\"\n[[counter]]\nname = \"e\"\ntask_file = \"nope.toml\"\n",
            "nope.toml",
        ),
        (
            "shuffler_url = \"x\"\nkey_directory = \"y\"\nshufler = 1\n",
            "unknown field",
        ),
    ];
    for (text, says) in bad {
        std::fs::write(&path, text).unwrap();
        let e = hush_client::ClientConfig::from_file(&path).and_then(|c| c.check().map(|_| c));
        let e = e.unwrap_err().to_string();
        assert!(e.contains(says), "{e}");
    }
}
