//! The results service against a real leader and helper: scheduled collection of closed windows,
//! the HTTP/JSON and gRPC APIs, and ad-hoc collection that spends budget only with the API token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hush_aggregator::client;
use hush_collector::http::{BudgetJson, WindowJson, WindowsPage};
use hush_collector::{ResultsConfig, ResultsSecrets, ResultsService};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::results_client::ResultsClient;
use hush_protocol::{
    Clock, Codec, Epsilon, HpkeKeypair, Measurement, MeasurementKind, MockClock, ReportId,
    TaskConfig, Time, VerifyKey,
};
use hush_tests::cluster::{
    InProcessPair, client_task, provision, set_tenant_token, submit, url, wait_drained,
};
use hush_tests::http::request;
use hush_tests::task_params;

const TENANT_TOKEN: &str = "acme-collector-token-0123456789";
const API_TOKEN: &str = "results-api-token-0123456789";
const READ_TOKEN: &str = "results-read-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_windows_are_collected_and_served_over_http_and_grpc() {
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let pair = InProcessPair::start(clock.clone()).await;
    set_tenant_token(&pair.leader_url(), &pair.helper_url(), "acme", TENANT_TOKEN).await;
    let collector = HpkeKeypair::generate(1);
    let mut p = task_params(MeasurementKind::EventHistogram, &collector);
    p.min_batch_size = 10;
    // One event per instance and window: the noise protects one event (sensitivity 2).
    p.contribution_bound = 1;
    // The count's share at 50%: the intervals of the report and late counts are narrower
    // than one report, so any nonzero draw would fail (at 10% about once in 4,000 runs).
    p.count_epsilon_percent = 50;
    p.epsilon_per_collection = Epsilon::from_micros(100_000_000);
    p.epsilon_budget = Epsilon::from_micros(1_000_000_000);
    let task = TaskConfig::new(p.clone()).unwrap();
    provision(
        &pair.leader_url(),
        &pair.helper_url(),
        &task,
        &VerifyKey::random(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let task_file = dir.path().join("task.toml");
    std::fs::write(&task_file, toml::to_string(&p).unwrap()).unwrap();
    let config = ResultsConfig::from_toml(&format!(
        "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         leader_url = \"{}\"\ntask_files = [\"{}\"]\ncollect_delay_s = 5\npoll_interval_ms = 50\n",
        dir.path().join("data").display(),
        pair.leader_url(),
        task_file.display()
    ))
    .unwrap();
    let secrets = ResultsSecrets {
        tenant_token: TENANT_TOKEN.into(),
        collector_key: collector.clone(),
        api_token: Some(API_TOKEN.into()),
        read_token: READ_TOKEN.into(),
    };
    let results = ResultsService::start(config, secrets, clock.clone())
        .await
        .unwrap();

    // 200 events: latencies of 3 ms (150) and 40 ms (50).
    let client = client_task(&pair.leader_url(), &pair.helper_url(), &task).await;
    let window = task.window_of(clock.now());
    let mut expect = vec![0i64; task.output_len()];
    let reports: Vec<Vec<u8>> = (0..200)
        .map(|i| {
            let ms = if i < 150 { 3 } else { 40 };
            let m = client.latency_event(Duration::from_millis(ms)).unwrap();
            if let Measurement::Bucket(b) = m {
                expect[b] += 1;
            }
            client
                .seal(client.shard(&m, ReportId::random()).unwrap(), clock.now())
                .unwrap()
                .to_bytes()
        })
        .collect();
    assert_eq!(
        submit(&pair.leader_url(), &reports, 100).await.accepted,
        200
    );
    wait_drained(&pair.leader_url(), &task, Duration::from_secs(60)).await;

    // Closed, but within the collection delay: nothing yet.
    mock.advance(62);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let path = format!("/v1/tasks/{}/windows", task.id());
    let window_path = format!("/v1/tasks/{}/windows/{}", task.id(), window.as_secs());
    let (code, body) = request(results.http_addr(), "GET", &path, Some(READ_TOKEN), None).await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"windows":[],"next_page_token":null}"#)
    );
    mock.advance(5);
    let start = Instant::now();
    let windows: Vec<WindowJson> = loop {
        let (code, body) = request(results.http_addr(), "GET", &path, Some(READ_TOKEN), None).await;
        assert_eq!(code, 200, "{body}");
        let w: WindowsPage = serde_json::from_str(&body).unwrap();
        if !w.windows.is_empty() {
            break w.windows;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the window was not collected"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(windows.len(), 1);
    let w = &windows[0];
    assert_eq!((w.start, w.duration), (window.as_secs(), 60));
    // The report count is released only with noise, and its interval covers the truth.
    assert!(w.reports.unwrap().covers(200.0), "{:?}", w.reports);
    assert!(!w.ad_hoc);
    for (i, (v, e)) in w.noisy_counts.iter().zip(&expect).enumerate() {
        assert!(
            ((v - e) as f64).abs() <= 1.96 * w.noise_stddev + 1.0,
            "bucket {i}: {v} vs {e}"
        );
    }
    let p50 = w.p50_ms.unwrap();
    let p99 = w.p99_ms.unwrap();
    assert!(p50.covers(3.0), "{p50:?}");
    assert!(p99.covers(40.0), "{p99:?}");
    assert!(w.total.unwrap().covers(200.0));

    // The API describes itself (no token: it says nothing about results), every route of it.
    let (code, text) = request(results.http_addr(), "GET", "/openapi.json", None, None).await;
    assert_eq!(code, 200, "{text}");
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    for (path, method) in [
        ("/v1/tasks", "get"),
        ("/v1/tasks/{task}/windows", "get"),
        ("/v1/tasks/{task}/windows/{start}", "get"),
        ("/v1/tasks/{task}/collect", "post"),
        ("/v1/tasks/{task}/alerts", "get"),
        ("/v1/tasks/{task}/budget", "get"),
        ("/v1/alerts", "get"),
        ("/metrics", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
    ] {
        assert!(
            doc["paths"][path][method].is_object(),
            "{method} {path} is not described"
        );
    }
    let params: Vec<&str> = doc["paths"]["/v1/tasks/{task}/windows"]["get"]["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for p in ["task", "from", "to", "limit", "page_token", "format"] {
        assert!(params.contains(&p), "{params:?}");
    }
    for s in [
        "WindowsPage",
        "WindowJson",
        "Estimate",
        "BudgetJson",
        "AlertsPage",
    ] {
        assert!(
            doc["components"]["schemas"][s].is_object(),
            "schema {s} missing"
        );
    }
    assert!(doc["components"]["securitySchemes"]["read_token"].is_object());

    // Kinds are spelled as in task files.
    let (_, text) = request(
        results.http_addr(),
        "GET",
        "/v1/tasks",
        Some(READ_TOKEN),
        None,
    )
    .await;
    let tasks: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        tasks[0]["kind"],
        serde_json::to_value(task.kind()).unwrap(),
        "{text}"
    );

    // Lists take a time range, a page size and a format.
    let http = results.http_addr();
    let get = |q: String| {
        let p = format!("{path}?{q}");
        async move { request(http, "GET", &p, Some(READ_TOKEN), None).await }
    };
    let (code, body) = get(format!("from={}", window.as_secs() + 60)).await;
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"windows":[],"next_page_token":null}"#)
    );
    let (code, body) = get(format!(
        "from={}&to={}&limit=1",
        window.as_secs(),
        window.as_secs() + 60
    ))
    .await;
    let page: WindowsPage = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (code, page.windows.len(), page.next_page_token),
        (200, 1, None)
    );
    let (code, csv_body) = get("format=csv".into()).await;
    assert_eq!(code, 200, "{csv_body}");
    let mut rows = csv::Reader::from_reader(csv_body.as_bytes());
    let head = rows.headers().unwrap().clone();
    let rows: Vec<csv::StringRecord> = rows.records().map(Result::unwrap).collect();
    assert_eq!(rows.len(), 1);
    let cell = |name: &str| rows[0][head.iter().position(|h| h == name).unwrap()].to_owned();
    assert_eq!(cell("start"), window.as_secs().to_string());
    assert!((cell("p95_ms").parse::<f64>().unwrap() - w.p95_ms.unwrap().value).abs() < 1e-9);
    for (q, says) in [
        ("limit=100000".to_owned(), "at most 5000"),
        ("from=10&to=5".to_owned(), "from <= to"),
        ("page_token=%21%21".to_owned(), "next_page_token"),
        ("format=xml".to_owned(), "neither"),
        ("limt=5".to_owned(), "lists take"),
    ] {
        let (code, body) = get(q.clone()).await;
        assert_eq!(code, 400, "{q}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{q}: {body}"));
        assert!(v["error"].as_str().unwrap().contains(says), "{q}: {body}");
    }

    // The same window over gRPC.
    // Every read needs the read token, on both APIs.
    let (code, _) = request(results.http_addr(), "GET", &path, None, None).await;
    assert_eq!(code, 401);
    let (code, _) = request(
        results.http_addr(),
        "GET",
        &path,
        Some("wrong-token-0123456789"),
        None,
    )
    .await;
    assert_eq!(code, 401);
    let e = ResultsClient::new(client::channel(&url(results.grpc_addr()), None).unwrap())
        .list_windows(pb::ListWindowsRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let mut grpc = ResultsClient::with_interceptor(
        client::channel(&url(results.grpc_addr()), None).unwrap(),
        hush_protocol::link::AddBearer::new(READ_TOKEN).unwrap(),
    );
    let g = grpc
        .get_window(pb::GetWindowRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            window_start: window.as_secs(),
        })
        .await
        .unwrap()
        .into_inner();
    let g = WindowJson::from(&g);
    assert_eq!((g.reports, &g.noisy_counts), (w.reports, &w.noisy_counts));
    assert!((g.p95_ms.unwrap().value - w.p95_ms.unwrap().value).abs() < 1e-9);
    // One window is no baseline: detection ran on it and raised nothing, on both APIs.
    let alerts = grpc
        .list_alerts(pb::ListAlertsRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(alerts.alerts.is_empty(), "{alerts:?}");
    let listed = grpc
        .list_windows(pb::ListWindowsRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            from: window.as_secs(),
            to: window.as_secs() + 60,
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (listed.windows.len(), listed.next_page_token.as_str()),
        (1, "")
    );
    let e = grpc
        .list_windows(pb::ListWindowsRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    let (code, text) = request(
        results.http_addr(),
        "GET",
        "/v1/alerts",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(
        (code, text.as_str()),
        (200, r#"{"alerts":[],"next_page_token":null}"#)
    );
    let (code, _) = request(
        results.http_addr(),
        "GET",
        &format!("/v1/tasks/{}/alerts", task.id()),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 200);
    let e = grpc
        .get_window(pb::GetWindowRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            window_start: window.as_secs() + 60,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    // What is left, before anything more is spent: the window's routine collection spent 100
    // of the routine 300; the alert share (700) is whole.
    let budget_path = format!("/v1/tasks/{}/budget", task.id());
    let budget = |q: &'static str| {
        let p = format!("{budget_path}{q}");
        async move { request(http, "GET", &p, Some(READ_TOKEN), None).await }
    };
    let (code, text) = budget("").await;
    assert_eq!(code, 200, "{text}");
    let b: BudgetJson = serde_json::from_str(&text).unwrap();
    assert_eq!((b.start, b.duration), (window.as_secs(), 60));
    let left = |b: &BudgetJson, p: &str| {
        let x = b.purposes.iter().find(|x| x.purpose == p).unwrap();
        (x.left, x.collections_left)
    };
    assert_eq!(left(&b, "routine"), (200.0, 2));
    assert_eq!(left(&b, "alert"), (700.0, 7));
    let (code, text) = budget("?from=5").await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("both from and to"), "{text}");
    let g = grpc
        .get_budget(pb::GetBudgetRequest {
            task_id: task.id().as_bytes().to_vec().into(),
            interval: Some(pb::Interval {
                start: window.as_secs(),
                duration: 60,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(BudgetJson::new(&task.id(), &g), b);

    // Ad-hoc: refused without the API token, spends budget with it and says so.
    let body = format!("{{\"start\": {}, \"duration\": 60}}", window.as_secs());
    let collect = format!("/v1/tasks/{}/collect", task.id());
    let (code, _) = request(results.http_addr(), "POST", &collect, None, Some(&body)).await;
    assert_eq!(code, 401);
    // The read token reads; it cannot spend budget.
    let (code, _) = request(
        results.http_addr(),
        "POST",
        &collect,
        Some(READ_TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(code, 401);
    // Without the Content-Type (as `curl -d` sends form data), or with a broken body: the JSON
    // error body every refusal has, saying what to send; nothing is spent.
    for (content_type, payload) in [
        (None, body.as_str()),
        (Some("application/x-www-form-urlencoded"), body.as_str()),
        (Some("application/json"), "{\"start\": "),
    ] {
        let mut s = tokio::net::TcpStream::connect(results.http_addr())
            .await
            .unwrap();
        let head = content_type.map_or(String::new(), |c| format!("Content-Type: {c}\r\n"));
        let req = format!(
            "POST {collect} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n{head}\
             Content-Length: {}\r\nConnection: close\r\n\r\n{payload}",
            payload.len()
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let (status_line, rest) = out.split_once("\r\n").unwrap();
        assert!(
            status_line.contains(" 415 ")
                || status_line.contains(" 400 ")
                || status_line.contains(" 422 "),
            "{out}"
        );
        let json_body = rest.split_once("\r\n\r\n").unwrap().1;
        let v: serde_json::Value = serde_json::from_str(json_body)
            .unwrap_or_else(|e| panic!("{content_type:?}: not a JSON body ({e}): {out}"));
        assert!(
            v["error"]
                .as_str()
                .unwrap()
                .contains("send Content-Type: application/json"),
            "{v}"
        );
    }
    let (code, text) = request(
        results.http_addr(),
        "POST",
        &collect,
        Some(API_TOKEN),
        Some(&body),
    )
    .await;
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["epsilon_spent"], 100.0);
    assert_eq!(v["window"]["ad_hoc"], true);
    // A drill-down spends from the alert share (700 of 1000) by default.
    assert_eq!(v["budget_left"], 600.0);
    let (_, text) = budget("").await;
    let b: BudgetJson = serde_json::from_str(&text).unwrap();
    assert_eq!(left(&b, "alert"), (600.0, 6));

    // The newest results for Prometheus, behind the read token.
    let (code, _) = request(http, "GET", "/metrics", None, None).await;
    assert_eq!(code, 401);
    let (code, text) = request(http, "GET", "/metrics", Some(READ_TOKEN), None).await;
    assert_eq!(code, 200, "{text}");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap();
    let gauge = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let hits: Vec<f64> = scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| s.labels.get("task") == Some(task.id().to_string().as_str()))
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
            .collect();
        assert_eq!(hits.len(), 1, "{name} {labels:?} in\n{text}");
        hits[0]
    };
    assert_eq!(
        gauge("hush_result_window_start_seconds", &[]),
        window.as_secs() as f64
    );
    let p95 = gauge(
        "hush_result_latency_milliseconds",
        &[("quantile", "0.95"), ("bound", "estimate")],
    );
    assert!((p95 - w.p95_ms.unwrap().value).abs() < 1e-6, "{p95}");
    assert!(
        (gauge("hush_result_total", &[("bound", "estimate")]) - w.total.unwrap().value).abs()
            < 1e-6
    );
    assert_eq!(
        gauge("hush_result_epsilon_left", &[("purpose", "routine")]),
        200.0
    );
    assert_eq!(
        gauge("hush_result_epsilon_left", &[("purpose", "alert")]),
        600.0
    );
    assert_eq!(
        gauge("hush_result_alerts", &[("detector", "latency_regression")]),
        0.0
    );
    // A second routine collection of the batch is refused: routine collection is once per batch.
    let routine = format!(
        "{{\"start\": {}, \"duration\": 60, \"purpose\": \"routine\"}}",
        window.as_secs()
    );
    let (code, text) = request(
        results.http_addr(),
        "POST",
        &collect,
        Some(API_TOKEN),
        Some(&routine),
    )
    .await;
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("one routine collection per batch"), "{text}");
    let bad = format!(
        "{{\"start\": {}, \"duration\": 60, \"purpose\": \"x\"}}",
        window.as_secs()
    );
    let (code, text) = request(
        results.http_addr(),
        "POST",
        &collect,
        Some(API_TOKEN),
        Some(&bad),
    )
    .await;
    assert_eq!(code, 400, "{text}");
    let (code, text) = request(
        results.http_addr(),
        "GET",
        &format!("/v1/tasks/{}/windows/{}", task.id(), window.as_secs() + 60),
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(code, 404, "{text}");

    // Two reports of the window arrive after it was collected. Once no more can arrive (the
    // report expiry and the clock skew past its end), the service asks for the noisy late count
    // once and shows it with the window.
    let late: Vec<Vec<u8>> = (0..2)
        .map(|_| {
            let m = client.latency_event(Duration::from_millis(3)).unwrap();
            client
                .seal(client.shard(&m, ReportId::random()).unwrap(), window)
                .unwrap()
                .to_bytes()
        })
        .collect();
    let r = submit(&pair.leader_url(), &late, 10).await;
    assert_eq!(r.rejected[&pb::RejectReason::BatchCollected], 2);
    let (_, text) = request(
        results.http_addr(),
        "GET",
        &window_path,
        Some(READ_TOKEN),
        None,
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["late_reports"].is_null(), "not known yet: {text}");
    mock.advance(task.report_expiry_s() + 300);
    let start = Instant::now();
    let late = loop {
        let (_, text) = request(
            results.http_addr(),
            "GET",
            &window_path,
            Some(READ_TOKEN),
            None,
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if !v["late_reports"].is_null() {
            break v["late_reports"].clone();
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (lo, hi) = (
        late["ci_low"].as_f64().unwrap(),
        late["ci_high"].as_f64().unwrap(),
    );
    assert!(lo <= 2.0 && 2.0 <= hi, "{late}");

    results.shutdown().await.unwrap();
    pair.shutdown().await;
}

/// Task names come from task files and explanations from the detectors: both reach the
/// dashboard. A name and an explanation full of markup must render as the text they are,
/// adding no element, and the page must load nothing its policy refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_renders_hostile_names_and_explanations_as_text() {
    use scraper::{Html, Selector};
    const NAME: &str = r#"<img src=x onerror="console.log('XSS-RAN')">pay</title><script>console.log('XSS-RAN')</script>"#;
    const EXPLANATION: &str =
        r#""><svg onload="console.log('XSS-RAN')"></svg><b>bold</b> & </text></svg>"#;
    let mock = Arc::new(MockClock::new(Time::from_secs(1_800_000_000)));
    let clock: Arc<dyn Clock> = mock.clone();
    let collector = HpkeKeypair::generate(1);
    let mut p = task_params(MeasurementKind::WindowHistogram, &collector);
    p.name = NAME.into();
    let task = TaskConfig::new(p.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let task_file = dir.path().join("task.toml");
    std::fs::write(&task_file, toml::to_string(&p).unwrap()).unwrap();
    // No leader: the page shows the budget as unavailable and everything stored.
    let config = ResultsConfig::from_toml(&format!(
        "tenant = \"acme\"\nlisten_grpc = \"127.0.0.1:0\"\nlisten_http = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         leader_url = \"http://127.0.0.1:9\"\ntask_files = [\"{}\"]\npoll_interval_ms = 3600000\n",
        dir.path().join("data").display(),
        task_file.display()
    ))
    .unwrap();
    let secrets = ResultsSecrets {
        tenant_token: TENANT_TOKEN.into(),
        collector_key: collector.clone(),
        api_token: None,
        read_token: READ_TOKEN.into(),
    };
    let results = ResultsService::start(config, secrets, clock.clone())
        .await
        .unwrap();
    let first = task.window_of(clock.now()).as_secs() - 3 * 60;
    let estimate = |v: f64| pb::Estimate {
        value: v,
        ci_low: v * 0.8,
        ci_high: v * 1.25,
    };
    for i in 0..3u64 {
        let start = first + i * 60;
        let r = pb::WindowResult {
            task_id: task.id().as_bytes().to_vec().into(),
            interval: Some(pb::Interval {
                start,
                duration: 60,
            }),
            noisy_counts: vec![0; task.output_len()],
            bucket_bounds_us: task.bucket_bounds_us().to_vec(),
            noise_stddev: 1.0,
            epsilon_micro: 1_000_000,
            p50_ms: Some(estimate(10.0 + i as f64)),
            p95_ms: Some(estimate(50.0 + i as f64)),
            p99_ms: Some(estimate(90.0 + i as f64)),
            total: Some(estimate(1_000.0)),
            ..Default::default()
        };
        results
            .store()
            .put_window(
                &task.id(),
                Time::from_secs(start),
                Time::from_secs(start + 60),
                &r,
            )
            .await
            .unwrap();
    }
    let alert = pb::Alert {
        task_id: task.id().as_bytes().to_vec().into(),
        window_start: first + 120,
        detector: "latency_regression".into(),
        statistic: 9.0,
        threshold: 2.3,
        baseline: 0.01,
        observed: 0.2,
        explanation: EXPLANATION.into(),
    };
    results
        .store()
        .put_tested(&task.id(), first + 120, &[alert])
        .await
        .unwrap();

    let profile = tempfile::tempdir().unwrap();
    let page = hush_tests::browser::render(
        &format!(
            "http://{}/dashboard#token={READ_TOKEN}&from={first}&to={}",
            results.http_addr(),
            first + 180
        ),
        profile.path(),
    );
    assert!(
        !page
            .console
            .iter()
            .any(|l| l.contains("Content Security Policy") || l.contains("XSS-RAN")),
        "{:?}",
        page.console
    );
    let doc = Html::parse_document(&page.dom);
    let one = |s: &str| {
        doc.select(&Selector::parse(s).unwrap())
            .next()
            .unwrap_or_else(|| panic!("no {s} in:\n{}", page.dom))
    };
    assert_eq!(one("body").value().attr("data-state"), Some("ready"));
    // The markup is text: the name and the explanation read back exactly.
    assert_eq!(one("section.task h2").text().collect::<String>(), NAME);
    assert_eq!(
        one("li.alert .explanation").text().collect::<String>(),
        EXPLANATION
    );
    // ... and added no element: one script (the page's own), no image, no bold, no SVG but
    // the charts, no event handler anywhere.
    let count = |s: &str| doc.select(&Selector::parse(s).unwrap()).count();
    assert_eq!(count("script"), 1);
    assert_eq!(count("img"), 0);
    assert_eq!(count("b"), 0);
    assert_eq!(count("svg"), count("svg.chart"));
    assert_eq!(count("[onerror], [onload]"), 0);
    // The stored values are drawn, and the budget says why it is missing.
    assert_eq!(
        count(r#"svg[data-chart="latency"] circle.point[data-series="p95"]"#),
        3
    );
    assert_eq!(
        one(".budget").value().attr("data-budget"),
        Some("unavailable")
    );
    results.shutdown().await.unwrap();
}
