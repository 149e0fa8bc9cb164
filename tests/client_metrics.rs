//! The client runtime exports its own health through the `metrics` facade: with a recorder
//! installed (here metrics-util's debugging recorder, in this test's own process), recording,
//! failed uploads by gRPC code, retries and the queue show up under their Prometheus names.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hush_client::{Endpoints, HushClient, KeySource, RuntimeConfig};
use hush_protocol::{HpkeKeypair, MeasurementKind, MockClock, TaskConfig, Time};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// Every counter and gauge now, as "name{k=v,...}" → value.
fn values(snapshotter: &metrics_util::debugging::Snapshotter) -> HashMap<String, f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let k = key.key();
            let mut labels: Vec<String> = k
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            labels.sort();
            let name = if labels.is_empty() {
                k.name().to_owned()
            } else {
                format!("{}{{{}}}", k.name(), labels.join(","))
            };
            let v = match value {
                DebugValue::Counter(c) => c as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(h) => h.len() as f64,
            };
            (name, v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_runtime_exports_its_counters_through_the_metrics_facade() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this process");

    // A pinned key set and a first shuffler that is not there: every upload fails UNAVAILABLE.
    let keys = hush_tests::pinned_key_set();
    let mut p = hush_tests::task_params(MeasurementKind::EventHistogram, &HpkeKeypair::generate(4));
    p.contribution_bound = 10;
    let task = TaskConfig::new(p).unwrap();
    let window_s = task.time_precision_s();
    let clock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let client = HushClient::builder(Endpoints {
        shuffler_url: format!("http://{}", hush_tests::free_addr()),
        keys: KeySource::Pinned(keys),
        tls_ca: None,
    })
    .latency_task("checkout", "POST /pay", task)
    .config(RuntimeConfig {
        tick: Duration::from_millis(20),
        max_jitter: Duration::from_millis(1),
        retry_initial: Duration::from_millis(10),
        retry_max: Duration::from_millis(50),
        request_timeout: Duration::from_secs(1),
        ..RuntimeConfig::default()
    })
    .clock(clock.clone())
    .start()
    .await
    .unwrap();
    let pay = client.latency("checkout", "POST /pay");
    for i in 0..15u64 {
        pay.record(Duration::from_millis(5 + i));
    }
    client
        .latency("nobody", "registered")
        .record(Duration::from_millis(1));
    // Close the window: its reports are built and sent, and every upload fails.
    clock.advance(window_s);

    // The debugging recorder resets what it reports, so read it once, after the uploads
    // (retried every 10-100 ms) have failed several times and a tick has copied the counters.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let v = values(&snapshotter);
    assert_eq!(v["hush_client_measurements_recorded_total"], 15.0, "{v:?}");
    assert_eq!(
        v["hush_client_dropped_total{reason=over_bound}"], 5.0,
        "{v:?}"
    );
    assert_eq!(v["hush_client_unknown_metric_total"], 1.0, "{v:?}");
    assert_eq!(v["hush_client_reports_sent_total"], 10.0, "{v:?}");
    assert_eq!(v["hush_client_reports_accepted_total"], 0.0, "{v:?}");
    assert!(
        v["hush_client_upload_errors_total{code=Unavailable}"] >= 2.0,
        "{v:?}"
    );
    assert!(v["hush_client_upload_retries_total"] >= 2.0, "{v:?}");
    assert!(v.contains_key("hush_client_queued"), "{v:?}");
    // A pinned key set is never refreshed.
    assert!(
        !v.keys()
            .any(|k| k.starts_with("hush_client_key_refreshes_total")),
        "{v:?}"
    );
    client.shutdown(Duration::from_millis(100)).await;
}
