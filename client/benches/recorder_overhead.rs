//! What `HushRecorder` adds to a service's `metrics` calls, against the service's recorder
//! alone, in one run (`cargo bench -p hush-client --features metrics --bench recorder_overhead`):
//!
//! * `direct`: `histogram!(name, labels).record(v)` on the service's recorder: a no-op one (the
//!   ratio shows hush's part at its largest) and metrics-exporter-prometheus's (what a service
//!   runs);
//! * `unmatched`: the same call through a `HushRecorder` with routes for other names;
//! * `routed`: a call that matches a route (also recorded into a hush task).
//!
//! It prints `unmatched / direct` and `routed / direct` for both. The macro registers on every call, so
//! this is the per-call cost of a service that does not keep its handles.

use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hush_client::{Endpoints, HushClient, HushRecorder, KeySet, KeySource, LatencyUnit};
use hush_protocol::task::log_spaced_bounds;
use hush_protocol::{Epsilon, HpkeKeypair, MeasurementKind, TaskConfig, TaskId, TaskParams, Time};

static SAMPLES: Mutex<Vec<(&'static str, Duration)>> = Mutex::new(Vec::new());

fn timed<F: FnMut()>(name: &'static str, mut f: F) -> impl FnMut(u64) -> Duration {
    move |iters| {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        let d = start.elapsed();
        SAMPLES
            .lock()
            .unwrap()
            .push((name, d / iters.max(1) as u32));
        d
    }
}

fn client(rt: &tokio::runtime::Runtime) -> HushClient {
    let key = |id| HpkeKeypair::generate(id).config().clone();
    let keys = KeySet {
        epoch: 1,
        epoch_start: Time::from_secs(0),
        epoch_s: 86_400,
        shufflers: vec![("shuffler-a".into(), key(1))],
        leader: ("leader".into(), key(2)),
        helper: key(3),
    };
    let task = TaskConfig::new(TaskParams {
        task_id: TaskId::random(),
        tenant: "bench".into(),
        name: "checkout".into(),
        kind: MeasurementKind::EventHistogram,
        bucket_bounds_us: log_spaced_bounds(1_000, 10_000_000, 32),
        contribution_bound: 1_000_000,
        clip_contributions: true,
        time_precision_s: 60,
        min_batch_size: 10,
        epsilon_per_collection: Epsilon::from_micros(1_000_000),
        epsilon_budget: Epsilon::from_micros(10_000_000),
        report_expiry_s: 3_600,
        packet_size: 4_096,
        collector_hpke_config: key(4),
        alert_budget_percent: 70,
        retention_s: 86_400,
        count_epsilon_percent: 10,
        max_collections_per_batch: 0,
    })
    .expect("task");
    rt.block_on(
        HushClient::builder(Endpoints {
            // Nothing listens: the bench never uploads within its run.
            shuffler_url: "http://127.0.0.1:9".into(),
            keys: KeySource::Pinned(keys),
            tls_ca: None,
        })
        .latency_task("checkout", "POST /pay", task)
        .start(),
    )
    .expect("client")
}

/// `inner` with routes for two names other than the unmatched one.
fn routes<R: metrics::Recorder>(client: &HushClient, inner: R) -> HushRecorder<R> {
    HushRecorder::new(client, inner)
        .histogram(
            "http_request_duration_seconds",
            &[("route", "/pay")],
            LatencyUnit::Seconds,
            "checkout",
            "POST /pay",
        )
        .histogram(
            "rpc_duration_seconds",
            &[("method", "Get")],
            LatencyUnit::Seconds,
            "checkout",
            "POST /pay",
        )
}

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let client = client(&rt);
    let mut c = Criterion::default()
        .configure_from_args()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    macro_rules! trio {
        ($direct:expr, $hush:expr, $d:literal, $u:literal, $r:literal) => {
            let direct = $direct;
            let hush = $hush;
            c.bench_function($d, |b| {
                b.iter_custom(timed($d, || {
                    metrics::with_local_recorder(&direct, || {
                        metrics::histogram!("db_query_seconds", "table" => "users")
                            .record(black_box(0.003))
                    })
                }))
            });
            c.bench_function($u, |b| {
                b.iter_custom(timed($u, || {
                    metrics::with_local_recorder(&hush, || {
                        metrics::histogram!("db_query_seconds", "table" => "users")
                            .record(black_box(0.003))
                    })
                }))
            });
            c.bench_function($r, |b| {
                b.iter_custom(timed($r, || {
                    metrics::with_local_recorder(&hush, || {
                        metrics::histogram!("http_request_duration_seconds", "route" => "/pay")
                            .record(black_box(0.012))
                    })
                }))
            });
        };
    }
    trio!(
        metrics::NoopRecorder,
        routes(&client, metrics::NoopRecorder),
        "noop/direct",
        "noop/unmatched",
        "noop/routed"
    );
    let prom = || metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    trio!(
        prom(),
        routes(&client, prom()),
        "prometheus/direct",
        "prometheus/unmatched",
        "prometheus/routed"
    );
    c.final_summary();
    let samples = SAMPLES.lock().unwrap();
    let median = |name: &str| {
        let mut v: Vec<Duration> = samples
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, d)| *d)
            .collect();
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    for inner in ["noop", "prometheus"] {
        let m = |what: &str| median(&format!("{inner}/{what}"));
        let (d, u, r) = (m("direct"), m("unmatched"), m("routed"));
        println!(
            "{inner}: per call direct {d:?}, unmatched {u:?} ({:.2}x), routed {r:?} ({:.2}x)",
            u.as_secs_f64() / d.as_secs_f64().max(1e-12),
            r.as_secs_f64() / d.as_secs_f64().max(1e-12)
        );
    }
}
