//! The results dashboard in a real headless browser: `hush demo --serve` releases windows and
//! flags an injected regression and error spike; Debian's chromium loads the dashboard against
//! that results service; the rendered DOM must show exactly the values the API serves — every
//! window's quantiles with their intervals, the rates, each alert with its explanation on the
//! timeline and in the list, and the budget left.
//!
//! The browser is [`hush_tests::browser`] (Debian's chromium; .ci/run installs it when
//! missing); without one the test fails and says so.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use hush_collector::http::{AlertJson, AlertsPage, BudgetJson, TaskJson, WindowJson, WindowsPage};
use hush_tests::http::request_tls_headers;
use scraper::{ElementRef, Html, Selector};

use crate::served_demo::ServedDemo;

const READ_TOKEN: &str = "demo-read-token-not-secret";

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap_or_else(|e| panic!("selector {s}: {e}"))
}

fn attr_f64(e: &ElementRef<'_>, name: &str) -> f64 {
    let v = e
        .value()
        .attr(name)
        .unwrap_or_else(|| panic!("no {name} on {:?}", e.value()));
    v.parse()
        .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
}

/// `a` and `b` agree to the last few bits (the page computes rates in JavaScript doubles).
fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

async fn get<T: serde::de::DeserializeOwned>(addr: SocketAddr, ca: &[u8], path: &str) -> T {
    let (code, _, body) = request_tls_headers(addr, ca, "GET", path, Some(READ_TOKEN)).await;
    assert_eq!(code, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_released_windows_alerts_and_budget_in_a_real_browser() {
    let demo = ServedDemo::start(&[
        "--windows",
        "5",
        "--agents",
        "600",
        "--epsilon",
        "4",
        "--regression-window",
        "3",
        "--spike-window",
        "4",
        // The instances stop after the simulated windows: nothing more is released while
        // the test reads, and the API and the page agree.
        "--idle",
    ]);
    let addr = demo.results;
    let ca = demo.ca();

    // The page is served with a policy that lets only its own script run.
    let (code, headers, page) = request_tls_headers(addr, &ca, "GET", "/dashboard", None).await;
    assert_eq!(code, 200, "{page}");
    let header = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        header("content-security-policy"),
        hush_collector::dashboard::CONTENT_SECURITY_POLICY
    );
    assert_eq!(header("x-content-type-options"), "nosniff");

    // What the API serves over the five simulated windows: every task's windows, alerts and
    // budget. The page is given the same range.
    let tasks: Vec<TaskJson> = get(addr, &ca, "/v1/tasks").await;
    assert_eq!(tasks.len(), 4, "{tasks:?}");
    let errors = tasks.iter().find(|t| t.name == "errors").unwrap();
    assert_eq!(errors.error_rate_over.len(), 3, "{errors:?}");
    let oldest: WindowsPage = get(
        addr,
        &ca,
        &format!("/v1/tasks/{}/windows?limit=1", tasks[0].task_id),
    )
    .await;
    let first = oldest.windows[0].start;
    let end = first + 5 * oldest.windows[0].duration;
    let range = format!("from={first}&to={end}");
    let mut windows: BTreeMap<String, Vec<WindowJson>> = BTreeMap::new();
    let mut alerts: BTreeMap<String, Vec<AlertJson>> = BTreeMap::new();
    let mut budgets: BTreeMap<String, BudgetJson> = BTreeMap::new();
    for t in &tasks {
        let path = format!("/v1/tasks/{}", t.task_id);
        let w: WindowsPage = get(addr, &ca, &format!("{path}/windows?{range}")).await;
        let a: AlertsPage = get(addr, &ca, &format!("{path}/alerts?{range}")).await;
        let b: BudgetJson = get(addr, &ca, &format!("{path}/budget")).await;
        assert!(w.next_page_token.is_none() && a.next_page_token.is_none());
        assert_eq!(w.windows.len(), 5, "{}: {:?}", t.name, w.windows);
        windows.insert(t.task_id.clone(), w.windows);
        alerts.insert(t.task_id.clone(), a.alerts);
        budgets.insert(t.task_id.clone(), b);
    }
    assert!(
        alerts.values().map(Vec::len).sum::<usize>() >= 2,
        "the injected regression and spike were not flagged: {alerts:?}"
    );

    // The page, rendered by chromium over the same range.
    let profile = tempfile::tempdir().unwrap();
    let page = hush_tests::browser::render(
        &format!("https://{addr}/dashboard#token={READ_TOKEN}&{range}"),
        profile.path(),
    );
    // Nothing the page needs was refused by its Content-Security-Policy.
    assert!(
        !page
            .console
            .iter()
            .any(|l| l.contains("Content Security Policy")),
        "{:?}",
        page.console
    );
    let dom = page.dom;
    let doc = Html::parse_document(&dom);
    let body = doc.select(&sel("body")).next().unwrap();
    assert_eq!(
        body.value().attr("data-state"),
        Some("ready"),
        "the page did not finish loading:\n{dom}"
    );
    for t in &tasks {
        let section = doc
            .select(&sel(&format!(
                r#"section.task[data-task-id="{}"]"#,
                t.task_id
            )))
            .next()
            .unwrap_or_else(|| panic!("no section for {}:\n{dom}", t.name));
        let text: String = section.text().collect();
        assert!(text.contains(&t.name), "{text}");
        let ws = &windows[&t.task_id];
        assert!(!ws.is_empty(), "{} released nothing", t.name);
        // Every window's quantiles with their intervals, on the latency chart.
        for q in ["p50", "p95", "p99"] {
            let points: Vec<ElementRef<'_>> = section
                .select(&sel(&format!(
                    r#"svg[data-chart="latency"] circle.point[data-series="{q}"]"#
                )))
                .collect();
            let expect: Vec<(u64, hush_collector::estimate::Estimate)> = ws
                .iter()
                .filter_map(|w| {
                    let e = match q {
                        "p50" => w.p50_ms,
                        "p95" => w.p95_ms,
                        _ => w.p99_ms,
                    };
                    e.map(|e| (w.start, e))
                })
                .collect();
            assert_eq!(points.len(), expect.len(), "{} {q}", t.name);
            for (p, (start, e)) in points.iter().zip(&expect) {
                assert_eq!(attr_f64(p, "data-start"), *start as f64);
                // Drawn inside the chart (a NaN position would not be).
                for (c, limit) in [("cx", 1000.0), ("cy", 230.0)] {
                    let v = attr_f64(p, c);
                    assert!((0.0..=limit).contains(&v), "{} {q}: {c}={v}", t.name);
                }
                assert_eq!(
                    attr_f64(p, "data-value"),
                    e.value,
                    "{} {q} at {start}",
                    t.name
                );
                assert_eq!(attr_f64(p, "data-low"), e.ci_low);
                let high = p.value().attr("data-high").unwrap();
                if e.ci_high.is_finite() {
                    assert_eq!(high.parse::<f64>().unwrap(), e.ci_high);
                } else {
                    assert_eq!(high, "", "an open interval drawn as closed");
                }
            }
        }
        // The rate chart: requests per second of a latency task, the error rate of the counter
        // that [detection] pairs with them.
        let rates: Vec<ElementRef<'_>> = section
            .select(&sel(r#"svg[data-chart="rate"] circle.point"#))
            .collect();
        let expect: Vec<(u64, f64)> = if t.error_rate_over.is_empty() {
            assert_ne!(t.kind, "counter", "every counter of the demo is paired");
            ws.iter()
                .filter_map(|w| {
                    w.total
                        .map(|e| (w.start, e.value * (1.0 / w.duration as f64)))
                })
                .collect()
        } else {
            ws.iter()
                .filter_map(|w| {
                    let errors = w.total?.value;
                    let mut requests = 0.0;
                    for name in &t.error_rate_over {
                        let other = tasks.iter().find(|o| &o.name == name)?;
                        let o = windows[&other.task_id]
                            .iter()
                            .find(|o| o.start == w.start)?;
                        // The page leaves out a rate whose request count may be 0.
                        let total = o.total?;
                        if total.ci_low <= 0.0 {
                            return None;
                        }
                        requests += total.value;
                    }
                    (requests > 0.0).then(|| (w.start, 100.0 * errors / requests))
                })
                .collect()
        };
        assert!(!expect.is_empty(), "{}: no rate", t.name);
        assert_eq!(rates.len(), expect.len(), "{} rates", t.name);
        for (p, (start, v)) in rates.iter().zip(&expect) {
            assert_eq!(attr_f64(p, "data-start"), *start as f64);
            assert!(
                close(attr_f64(p, "data-value"), *v),
                "{} rate at {start}: {:?} vs {v}",
                t.name,
                p.value().attr("data-value")
            );
        }
        // Every alert: in the list with its explanation, and marked on each chart's timeline.
        let listed: Vec<ElementRef<'_>> = section.select(&sel("ul.alerts li.alert")).collect();
        let task_alerts = &alerts[&t.task_id];
        assert_eq!(listed.len(), task_alerts.len(), "{} alerts", t.name);
        let charts = section.select(&sel("svg.chart")).count();
        assert_eq!(
            section.select(&sel("svg.chart g.alert-mark")).count(),
            charts * task_alerts.len()
        );
        for (li, a) in listed.iter().zip(task_alerts) {
            assert_eq!(attr_f64(li, "data-start"), a.window_start as f64);
            assert_eq!(li.value().attr("data-detector"), Some(a.detector.as_str()));
            let explanation: String = li
                .select(&sel(".explanation"))
                .next()
                .unwrap()
                .text()
                .collect();
            assert_eq!(explanation, a.explanation);
        }
        // The budget left, per purpose.
        for p in &budgets[&t.task_id].purposes {
            let span = section
                .select(&sel(&format!(r#".budget [data-purpose="{}"]"#, p.purpose)))
                .next()
                .unwrap_or_else(|| panic!("{}: no {} budget", t.name, p.purpose));
            assert_eq!(attr_f64(&span, "data-left"), p.left);
            assert_eq!(attr_f64(&span, "data-of"), p.budget);
        }
    }

    // Stopped, the demo drains and exits 0 with its summary.
    demo.stop();
}
