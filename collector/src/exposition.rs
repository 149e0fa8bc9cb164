//! `GET /metrics` on the results API: the newest released results in the Prometheus text format,
//! so Prometheus, Grafana and Alertmanager read hush's statistics without an adapter. Everything
//! here was released with noise already; rendering it spends nothing (the budget comes from the
//! leader's ledger, read without spending).
//!
//! Per task (labels `task`, the id, and `name`), from its newest released window:
//! - `hush_result_window_start_seconds`, `hush_result_window_end_seconds`: which window;
//! - `hush_result_latency_milliseconds{quantile, bound}`: p50, p95, p99 (`bound` = `estimate`,
//!   `low`, `high`; an open-ended high bound is left out);
//! - `hush_result_total{bound}`: the noisy total (events or the count);
//! - `hush_result_reports{bound}`: the noisy number of reports;
//! - `hush_result_error_rate`: errors over requests, for a counter that `[detection]
//!   error_rates` pairs with latency tasks (same window);
//! - `hush_result_alerts{detector}`: alerts raised on that window (open alerts);
//! - `hush_result_epsilon_left{purpose}`: what the leader's ledger has left for that window;
//! - `hush_result_leader_reachable`: 1 if the budget could be read.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use hush_protocol::proto::v1 as pb;
use hush_protocol::{TaskId, Time};

use crate::Shared;
use crate::error::Result;

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>;

fn family(registry: &mut Registry, name: &str, help: &str) -> Gauges {
    let f = Gauges::default();
    registry.register(name, help, f.clone());
    f
}

fn set(f: &Gauges, labels: &Labels, extra: &[(&str, &str)], v: f64) {
    let mut l = labels.clone();
    l.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    f.get_or_create(&l).set(v);
}

fn estimate(f: &Gauges, labels: &Labels, extra: &[(&str, &str)], e: &Option<pb::Estimate>) {
    let Some(e) = e else { return };
    for (bound, v) in [
        ("estimate", e.value),
        ("low", e.ci_low),
        ("high", e.ci_high),
    ] {
        if v.is_finite() {
            let mut x = extra.to_vec();
            x.push(("bound", bound));
            set(f, labels, &x, v);
        }
    }
}

/// The newest released results of every task, in the Prometheus text format.
pub(crate) async fn render(inner: &Shared) -> Result<String> {
    let mut registry = Registry::default();
    let start = family(
        &mut registry,
        "hush_result_window_start_seconds",
        "Start of the task's newest released window",
    );
    let end = family(
        &mut registry,
        "hush_result_window_end_seconds",
        "End of the task's newest released window",
    );
    let latency = family(
        &mut registry,
        "hush_result_latency_milliseconds",
        "Released latency quantile of the newest window, with its 95% interval (bound)",
    );
    let total = family(
        &mut registry,
        "hush_result_total",
        "Released noisy total of the newest window (events or the count), with its 95% interval",
    );
    let reports = family(
        &mut registry,
        "hush_result_reports",
        "Released noisy number of reports of the newest window, with its 95% interval",
    );
    let error_rate = family(
        &mut registry,
        "hush_result_error_rate",
        "Errors over requests in the newest window of an error counter paired by [detection] error_rates",
    );
    let alerts = family(
        &mut registry,
        "hush_result_alerts",
        "Alerts raised on the task's newest released window, per detector",
    );
    let epsilon = family(
        &mut registry,
        "hush_result_epsilon_left",
        "Privacy budget left for the task's newest window in the leader's ledger, per purpose",
    );
    let reachable = family(
        &mut registry,
        "hush_result_leader_reachable",
        "1 if the leader answered the budget question at this scrape",
    );

    let mut newest: std::collections::HashMap<String, pb::WindowResult> = Default::default();
    let mut leader_ok = true;
    let mut tasks: Vec<(&TaskId, &hush_protocol::TaskConfig)> = inner.tasks.iter().collect();
    tasks.sort_by_key(|(id, _)| **id);
    for (id, task) in tasks {
        let Some(s) = inner.store.newest_window_start(id)? else {
            continue;
        };
        let Some(w) = inner.store.window(id, Time::from_secs(s))? else {
            continue;
        };
        let labels: Labels = vec![
            ("task".into(), id.to_string()),
            ("name".into(), task.name().to_owned()),
        ];
        let i = w.interval.unwrap_or_default();
        set(&start, &labels, &[], i.start as f64);
        set(&end, &labels, &[], (i.start + i.duration) as f64);
        for (q, e) in [("0.5", &w.p50_ms), ("0.95", &w.p95_ms), ("0.99", &w.p99_ms)] {
            estimate(&latency, &labels, &[("quantile", q)], e);
        }
        estimate(&total, &labels, &[], &w.total);
        estimate(&reports, &labels, &[], &w.reports);
        let mut raised: std::collections::BTreeMap<String, u64> = Default::default();
        let req = crate::PageRequest {
            from: i.start,
            to: i.start + 1,
            limit: 1_000,
            after: None,
        };
        for a in inner.store.alerts_page(&[*id], &req)?.items {
            *raised.entry(a.detector).or_default() += 1;
        }
        for d in ["latency_regression", "error_spike"] {
            raised.entry(d.to_owned()).or_default();
        }
        for (d, n) in raised {
            set(&alerts, &labels, &[("detector", &d)], n as f64);
        }
        if leader_ok {
            match inner.budget(id, None).await {
                Ok(b) => {
                    for p in &b.purposes {
                        let purpose = hush_protocol::BudgetPurpose::from_proto(p.purpose)
                            .map_or("unknown", |p| p.name());
                        set(
                            &epsilon,
                            &labels,
                            &[("purpose", purpose)],
                            p.left_micro as f64 / 1e6,
                        );
                    }
                }
                Err(e) => {
                    let away = match &e {
                        crate::Error::NotReady(_) => true,
                        crate::Error::Peer(s) => matches!(
                            s.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ),
                        _ => false,
                    };
                    if away {
                        // The leader is away: ask no more this scrape.
                        tracing::warn!(error = %e, "the leader did not answer the budget for /metrics");
                        leader_ok = false;
                    } else {
                        // A refusal (e.g. the window is past retention) concerns this task only.
                        tracing::debug!(task = %id, error = %e, "no budget for /metrics");
                    }
                }
            }
        }
        newest.insert(task.name().to_owned(), w);
    }
    for r in &inner.config.detection.error_rates {
        let Some(errors) = newest.get(&r.errors) else {
            continue;
        };
        let start_of = |w: &pb::WindowResult| w.interval.map(|i| i.start);
        let mut requests = 0.0;
        let mut complete = true;
        for name in &r.requests {
            match newest.get(name) {
                Some(w) if start_of(w) == start_of(errors) => {
                    requests += w.total.as_ref().map_or(0.0, |t| t.value)
                }
                _ => complete = false,
            }
        }
        let errs = errors.total.as_ref().map_or(0.0, |t| t.value);
        if complete && requests > 0.0 {
            let id = TaskId::try_from(errors.task_id.as_ref())
                .map(|t| t.to_string())
                .unwrap_or_default();
            let labels: Labels = vec![("task".into(), id), ("name".into(), r.errors.clone())];
            set(&error_rate, &labels, &[], (errs / requests).max(0.0));
        }
    }
    set(
        &reachable,
        &Vec::new(),
        &[],
        if leader_ok { 1.0 } else { 0.0 },
    );
    let mut out = String::new();
    encode(&mut out, &registry).map_err(|e| crate::Error::InvalidRequest(e.to_string()))?;
    Ok(out)
}
