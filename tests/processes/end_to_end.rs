//! The whole cluster as real processes: two shufflers, the leader, the helper and a results
//! service, each a `hush` binary with its own sled directory, fed by a few hundred client
//! instances (the real client runtime) on the system clock. What the results service releases
//! must equal what the clients submitted within the stated noise, and every report must be
//! accounted for.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hush_aggregator::AggregatorConfig;
use hush_client::{Endpoints, HushClient, KeySource, RuntimeConfig, fetch_key_set};
use hush_protocol::{Clock, Codec, Epsilon, HpkeKeypair, MeasurementKind, SystemClock, TaskConfig};
use hush_shuffler::ShufflerConfig;
use hush_tests::cluster::{ADMIN_TOKEN, client_task, rejections, set_tenant_token, stats, submit};
use hush_tests::http::request;
use hush_tests::mixnet::{Mix, shuffler_config_text};
use hush_tests::process::{HushProcess, insecure_aggregator};
use hush_tests::task_params;
use rand::{Rng, SeedableRng, rngs::StdRng};

use crate::hush_bin;

const CLIENTS: usize = 300;
const READ_TOKEN: &str = "results-read-token-0123456789";
const WINDOW_S: u64 = 4;
const BOUND: u64 = 20;
const TENANT_TOKEN: &str = "e2e-tenant-token";
/// How far a noisy count may sit from the truth, in standard deviations of its noise. The
/// results carry 95% intervals (1.96 σ); checking ~36 counts at 1.96 σ would fail by chance in
/// most runs. The noise is the sum of two discrete Laplace draws, whose tail at x is about
/// e^{-x/t}(1 + x/2t), far heavier than a normal's: at 5 σ (t = 5.6, 32 buckets) the test
/// failed about once in 100 runs; at 10 σ it fails about once in a million. A lost or doubled
/// report shows in the exact report counts, which carry no noise.
const SIGMAS: f64 = 10.0;

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn aggregator(dir: &Path, role: &str, helper_url: Option<&str>) -> HushProcess {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\ncache_mb = 32\n",
        dir.join(role).display()
    );
    if let Some(u) = helper_url {
        text.push_str(&format!(
            "[leader]\nhelper_url = \"{u}\"\njob_size = 200\njob_poll_interval_ms = 20\n"
        ));
    }
    AggregatorConfig::from_toml(&text).expect("valid aggregator config");
    insecure_aggregator(hush_bin(), dir, role, &text)
}

fn shuffler(dir: &Path, name: &str, next: (&str, &str, &str)) -> HushProcess {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mix = Mix {
        batch_size: 1_000,
        min_batch_size: 1,
        max_wait_ms: 200,
    };
    let text = shuffler_config_text(name, &dir.join(name), any, next, mix, "");
    ShufflerConfig::from_toml(&text).expect("valid shuffler config");
    let config = write(dir, &format!("{name}.toml"), &text);
    HushProcess::spawn(
        hush_bin(),
        &["shuffler", "--insecure", "--config", &config].map(String::from),
        &dir.join(format!("{name}.log")),
    )
}

fn task(kind: MeasurementKind, collector: &HpkeKeypair) -> TaskConfig {
    let mut p = task_params(kind, collector);
    p.time_precision_s = WINDOW_S;
    p.contribution_bound = BOUND;
    p.clip_contributions = true;
    p.min_batch_size = 50;
    // A generous ε keeps the noise small next to the counts, so a wrong count stands out.
    p.epsilon_per_collection = Epsilon::from_f64(8.0).unwrap();
    p.epsilon_budget = Epsilon::from_f64(100.0).unwrap();
    TaskConfig::new(p).unwrap()
}

/// Waits for the results service to release `task`'s window starting at `start`.
async fn released(results: SocketAddr, task: &TaskConfig, start: u64) -> serde_json::Value {
    let path = format!("/v1/tasks/{}/windows/{start}", task.id());
    let begun = Instant::now();
    loop {
        let (status, body) = request(results, "GET", &path, Some(READ_TOKEN), None).await;
        if status == 200 {
            return serde_json::from_str(&body).expect("JSON");
        }
        assert!(
            begun.elapsed() < Duration::from_secs(60),
            "window {start} of {} was not released: {status} {body}",
            task.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn f(v: &serde_json::Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The noisy total lies within `SIGMAS` of the truth (σ recovered from its 95% interval).
fn check_total(w: &serde_json::Value, truth: f64, what: &str) {
    let t = &w["total"];
    let sigma = (f(t, "ci_high") - f(t, "ci_low")) / 2.0 / 1.96;
    assert!(
        (f(t, "value") - truth).abs() <= SIGMAS * sigma.max(0.5),
        "{what}: released total {t} against {truth} submitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_clients_through_the_real_binaries_are_counted_exactly_within_the_noise() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut helper = aggregator(dir, "helper", None);
    let mut leader = aggregator(dir, "leader", Some(&helper.url()));
    let mut b = shuffler(dir, "shuffler-b", ("leader", "leader", &leader.url()));
    let mut a = shuffler(dir, "shuffler-a", ("shuffler-b", "shuffler", &b.url()));

    let collector = HpkeKeypair::generate(1);
    let latency = task(MeasurementKind::WindowHistogram, &collector);
    let errors = task(MeasurementKind::Counter, &collector);
    let mut files = Vec::new();
    for t in [&latency, &errors] {
        let name = format!("task-{}.toml", t.id());
        let file = write(dir, &name, &toml::to_string(t.params()).unwrap());
        // One command provisions the leader, the helper and every shuffler of the route.
        let out = std::process::Command::new(hush_bin())
            .args(["task", "create", "--config", &file])
            .args(["--leader", &leader.url(), "--helper", &helper.url()])
            .args(["--route", &a.url(), &b.url()])
            .env_remove("HUSH_CA")
            .env_remove("HUSH_ADMIN_TOKEN")
            .env_remove("HUSH_VDAF_VERIFY_KEY")
            .env("HUSH_LEADER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HUSH_HELPER_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("HUSH_SHUFFLER_ADMIN_TOKEN", ADMIN_TOKEN)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("created on the leader, created on the helper")
                && stdout.matches("created on the shuffler at").count() == 2,
            "{stdout}"
        );
        files.push(format!("\"{file}\""));
    }
    set_tenant_token(&leader.url(), &helper.url(), "acme", TENANT_TOKEN).await;
    let results_config = write(
        dir,
        "results.toml",
        &format!(
            "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\n\
             data_dir = \"{}\"\nleader_url = \"{}\"\ntask_files = [{}]\n\
             poll_interval_ms = 100\n\
             [cascade]\nhelper_url = \"{}\"\nclient_max_jitter_ms = 200\nclient_tick_ms = 200\n\
             shufflers = [{{ name = \"shuffler-a\", url = \"{}\", max_wait_ms = 200 }}, \
             {{ name = \"shuffler-b\", url = \"{}\", max_wait_ms = 200 }}]\n",
            dir.join("results").display(),
            leader.url(),
            files.join(", "),
            helper.url(),
            a.url(),
            b.url(),
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
    let results_http = results
        .http_addr()
        .expect("the results service serves HTTP");

    // A few hundred service instances, each with its own client and connection, getting their
    // keys from the results service (the tenant's key directory), never from a party.
    let endpoints = Endpoints {
        shuffler_url: a.url(),
        keys: KeySource::Directory(results.url()),
        tls_ca: None,
    };
    let begun = Instant::now();
    let keys = loop {
        match fetch_key_set(&results.url(), None, Duration::from_secs(10)).await {
            Ok(k) => break k,
            Err(e) => {
                assert!(begun.elapsed() < Duration::from_secs(30), "{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let config = RuntimeConfig {
        tick: Duration::from_millis(200),
        max_jitter: Duration::from_millis(200),
        ..RuntimeConfig::default()
    };
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(
            HushClient::builder(endpoints.clone())
                .latency_task("checkout", "POST /pay", latency.clone())
                .counter_task("errors", errors.clone())
                .config(config.clone())
                .keys(keys.clone())
                .start()
                .await
                .unwrap(),
        );
    }

    // Record at the start of a fresh window, so all of it falls in one window.
    let now = SystemClock.now();
    let window = latency.window_of(now).add_secs(WINDOW_S);
    while SystemClock.now() < window {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut rng = StdRng::seed_from_u64(17);
    let mut truth = vec![0i64; latency.output_len()];
    let (mut events, mut error_total, mut over_bound) = (0u64, 0u64, 0u64);
    for c in &clients {
        // Some instances serve more requests than the bound: the excess is dropped, counted.
        let n: u64 = rng.random_range(5..=25);
        let pay = c.latency("checkout", "POST /pay");
        for i in 0..n {
            let tail = if i % 10 == 0 { 3.0 } else { 1.0 };
            let ms = (40.0 * tail * (rng.random::<f64>() - 0.5).exp()) as u64;
            pay.record(Duration::from_millis(ms));
            if i < BOUND {
                truth[latency.bucket_of(ms * 1_000)] += 1;
                events += 1;
            } else {
                over_bound += 1;
            }
        }
        let e: u64 = rng.random_range(0..=3);
        c.counter("errors").add(e);
        error_total += e;
    }
    assert!(
        SystemClock.now() < window.add_secs(WINDOW_S),
        "recording spilled past the window; the machine is too slow for this test"
    );

    // The window closes; every client uploads it through the cascade.
    while SystemClock.now() < window.add_secs(WINDOW_S) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flushes: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| tokio::spawn(async move { c.flush(Duration::from_secs(30)).await }))
        .collect();
    for f in flushes {
        assert!(f.await.unwrap(), "a client could not upload its window");
    }

    // Every report is accounted for at the client: sent = accepted, nothing refused or dropped.
    let (mut sent, mut accepted, mut dropped_over_bound) = (0, 0, 0);
    for c in &clients {
        let s = c.stats();
        assert_eq!(s.dropped_queue_full, 0, "{s:?}");
        assert!(s.rejected.is_empty(), "{s:?}");
        assert_eq!(s.unknown_metric, 0, "{s:?}");
        sent += s.reports_sent;
        accepted += s.accepted;
        dropped_over_bound += s.dropped_over_bound;
    }
    // Both metrics report every window, also the partial one the clients started in: at least
    // one report per client and metric for the recorded window.
    assert!(sent >= 2 * CLIENTS as u64, "{sent}");
    assert_eq!(accepted, sent);
    assert_eq!(dropped_over_bound, over_bound);

    // The results service collects the window once it is closed and released.
    let lat = released(results_http, &latency, window.as_secs()).await;
    let err = released(results_http, &errors, window.as_secs()).await;
    // Report counts are released only with noise.
    check_total(
        &serde_json::json!({ "total": lat["reports"] }),
        CLIENTS as f64,
        "latency reports",
    );
    check_total(
        &serde_json::json!({ "total": err["reports"] }),
        CLIENTS as f64,
        "error reports",
    );
    let sigma = f(&lat, "noise_stddev");
    assert!(sigma > 0.0, "both aggregators add noise: {lat}");
    let noisy: Vec<i64> = lat["noisy_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(noisy.len(), truth.len());
    for (i, (n, t)) in noisy.iter().zip(&truth).enumerate() {
        assert!(
            ((n - t) as f64).abs() <= SIGMAS * sigma,
            "bucket {i}: released {n}, submitted {t}, noise σ {sigma:.2}"
        );
    }
    check_total(&lat, events as f64, "latency events");
    check_total(&err, error_total as f64, "errors");

    // The clients stop (reporting their open windows); then at the leader every report any
    // client had accepted is aggregated once, none refused, none left pending.
    let stops: Vec<_> = clients
        .iter()
        .cloned()
        .map(|c| tokio::spawn(async move { c.shutdown(Duration::from_secs(30)).await }))
        .collect();
    for s in stops {
        assert!(
            s.await.unwrap(),
            "a client could not upload its last window"
        );
    }
    let accepted: u64 = clients.iter().map(|c| c.stats().accepted).sum();
    let begun = Instant::now();
    loop {
        let (mut aggregated, mut pending) = (0, 0);
        for t in [&latency, &errors] {
            let s = stats(&leader.url(), Some(t)).await;
            assert!(rejections(&s).is_empty(), "{}: {s:?}", t.name());
            assert!(
                s.reports_aggregated >= CLIENTS as u64,
                "{}: {s:?}",
                t.name()
            );
            aggregated += s.reports_aggregated;
            pending += s.reports_pending;
        }
        if aggregated == accepted && pending == 0 {
            break;
        }
        assert!(
            aggregated <= accepted,
            "{aggregated} aggregated of {accepted}"
        );
        assert!(
            begun.elapsed() < Duration::from_secs(30),
            "{aggregated} of {accepted} aggregated, {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A report for the released window arrives late: refused, and counted in `hush task stats`.
    let late_client = client_task(&leader.url(), &helper.url(), &latency).await;
    let late = late_client
        .seal(
            late_client
                .shard(
                    &hush_protocol::Measurement::Counts({
                        let mut c = vec![0; latency.output_len()];
                        c[0] = 1;
                        c
                    }),
                    hush_protocol::ReportId::random(),
                )
                .unwrap(),
            window,
        )
        .unwrap();
    let r = submit(&leader.url(), &[late.to_bytes()], 1).await;
    assert_eq!(
        r.rejected[&hush_protocol::proto::v1::RejectReason::BatchCollected],
        1
    );
    let out = std::process::Command::new(hush_bin())
        .args(["task", "stats", "--aggregator", &leader.url(), "--task"])
        .arg(latency.id().to_string())
        .env("HUSH_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("late:       1 "), "{text}");
    results.terminate();
    a.terminate();
    b.terminate();
    leader.terminate();
    helper.terminate();
}
