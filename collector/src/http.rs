//! The HTTP/JSON API of the results service.
//!
//! | method and path | answer |
//! | --- | --- |
//! | `GET /v1/tasks` | the tenant's tasks |
//! | `GET /v1/tasks/{task}/windows` | a page of a task's released windows |
//! | `GET /v1/tasks/{task}/windows/{start}` | one window |
//! | `POST /v1/tasks/{task}/collect` `{"start": s, "duration": d}` | an ad-hoc collection (spends budget; API token) |
//! | `GET /v1/tasks/{task}/budget` | what is left of a task's budget, spending nothing |
//! | `GET /v1/alerts` | a page of the alerts of the tenant's tasks |
//! | `GET /metrics` | the newest released results in the Prometheus text format |
//! | `GET /openapi.json` | this API's OpenAPI description ([`ApiDoc`]) |
//! | `GET /v1/tasks/{task}/alerts` | a page of a task's alerts |
//! | `GET /dashboard` | the results dashboard ([`crate::dashboard`]; no token: its script asks) |
//!
//! Lists take `from`, `to` (seconds since the epoch, window starts in `[from, to)`), `limit` and
//! `page_token` ([`crate::paging`]), and answer JSON or, with `Accept: text/csv` or
//! `format=csv`, CSV (the next page's token then in the `x-next-page-token` header).

use std::sync::Arc;

use crate::estimate::Estimate;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use hush_protocol::proto::v1 as pb;
use hush_protocol::{Interval, TaskId, Time};
use serde::{Deserialize, Serialize};

use crate::Shared;
use crate::error::Error;

/// A released window as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WindowJson {
    /// Task id (base64url).
    pub task_id: String,
    /// Interval start, seconds since the epoch.
    pub start: u64,
    /// Interval length in seconds.
    pub duration: u64,
    /// The noisy number of reports aggregated with its 95% interval (absent when the task
    /// releases no count): exact counts never leave the aggregators.
    pub reports: Option<Estimate>,
    /// The noisy number of reports that arrived after the window was collected, once known.
    pub late_reports: Option<Estimate>,
    /// Noisy counts per bucket (can be negative).
    pub noisy_counts: Vec<i64>,
    /// Bucket upper bounds in microseconds (the last bucket is open-ended).
    pub bucket_bounds_us: Vec<u64>,
    /// Standard deviation of the DP noise on each count.
    pub noise_stddev: f64,
    /// ε spent by each aggregator.
    pub epsilon: f64,
    /// Latency quantiles in ms with 95% intervals (`ci_high` null: open-ended).
    pub p50_ms: Option<Estimate>,
    /// 95th percentile.
    pub p95_ms: Option<Estimate>,
    /// 99th percentile.
    pub p99_ms: Option<Estimate>,
    /// The noisy total with its 95% interval.
    pub total: Option<Estimate>,
    /// Whether this was an ad-hoc collection.
    pub ad_hoc: bool,
    /// Quantiles the noise cannot bound at this volume and ε, with the reason (their fields
    /// are null).
    #[serde(default)]
    pub withheld: Vec<String>,
}

fn est(e: &Option<pb::Estimate>) -> Option<Estimate> {
    e.as_ref().map(|e| Estimate {
        value: e.value,
        ci_low: e.ci_low,
        ci_high: e.ci_high,
    })
}

impl From<&pb::WindowResult> for WindowJson {
    fn from(w: &pb::WindowResult) -> Self {
        let i = w.interval.unwrap_or_default();
        Self {
            task_id: TaskId::try_from(w.task_id.as_ref())
                .map(|t| t.to_string())
                .unwrap_or_default(),
            start: i.start,
            duration: i.duration,
            reports: est(&w.reports),
            late_reports: est(&w.late_reports),
            noisy_counts: w.noisy_counts.clone(),
            bucket_bounds_us: w.bucket_bounds_us.clone(),
            noise_stddev: w.noise_stddev,
            epsilon: w.epsilon_micro as f64 / 1e6,
            p50_ms: est(&w.p50_ms),
            p95_ms: est(&w.p95_ms),
            p99_ms: est(&w.p99_ms),
            total: est(&w.total),
            ad_hoc: w.ad_hoc,
            withheld: w.withheld.clone(),
        }
    }
}

/// A task as listed.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskJson {
    /// Task id.
    pub task_id: String,
    /// Name.
    pub name: String,
    /// Measurement kind.
    pub kind: String,
    /// Window length in seconds.
    pub window_s: u64,
    /// For an error counter that `[detection] error_rates` pairs with latency tasks: their
    /// names, whose noisy totals are its error rate's denominator (same window). Empty
    /// otherwise.
    #[serde(default)]
    pub error_rate_over: Vec<String>,
}

/// The answer to an ad-hoc collection.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdHocJson {
    /// The result.
    pub window: WindowJson,
    /// ε this collection spent at each aggregator.
    pub epsilon_spent: f64,
    /// ε left of the paying share of the budget for the interval's windows.
    pub budget_left: f64,
}

/// An ad-hoc request body.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
pub struct AdHocRequest {
    /// Interval start, seconds since the epoch (aligned to the task's window).
    pub start: u64,
    /// Interval length in seconds (a multiple of the window).
    pub duration: u64,
    /// Which share of the budget pays: `"alert"` (the default: a drill-down after an alert) or
    /// `"routine"`.
    #[serde(default)]
    pub purpose: Option<String>,
}

type Reply<T> = Result<Json<T>, (StatusCode, Json<serde_json::Value>)>;

/// The query of a list: a time range, a page, and the format.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Window starts from (seconds since the epoch).
    pub from: Option<u64>,
    /// Window starts before (seconds since the epoch, exclusive).
    pub to: Option<u64>,
    /// At most this many items (default 1,000, at most 5,000).
    pub limit: Option<u32>,
    /// The previous page's `next_page_token`.
    pub page_token: Option<String>,
    /// `json` (the default) or `csv`.
    pub format: Option<String>,
}

impl ListQuery {
    fn page(&self) -> Result<crate::PageRequest, (StatusCode, Json<serde_json::Value>)> {
        crate::paging::page_request(
            self.from.unwrap_or(0),
            self.to.unwrap_or(0),
            self.limit.unwrap_or(0),
            self.page_token.as_deref().unwrap_or(""),
        )
        .map_err(fail)
    }

    /// Whether the answer is CSV: `format=csv`, or `Accept: text/csv` without a `format`.
    fn csv(&self, headers: &HeaderMap) -> Result<bool, (StatusCode, Json<serde_json::Value>)> {
        match self.format.as_deref() {
            Some("csv") => Ok(true),
            Some("json") => Ok(false),
            Some(other) => Err(fail(Error::InvalidRequest(format!(
                "format {other:?} is neither \"json\" nor \"csv\""
            )))),
            None => Ok(headers
                .get(axum::http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("text/csv"))),
        }
    }
}

/// A list's query, or the JSON error a malformed one gets.
fn list_query(
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ListQuery, (StatusCode, Json<serde_json::Value>)> {
    q.map(|q| q.0).map_err(|e| {
        fail(Error::InvalidRequest(format!(
            "{}; lists take from, to, limit, page_token and format",
            e.body_text()
        )))
    })
}

/// The budget of one purpose as JSON (ε).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PurposeBudgetJson {
    /// `routine` or `alert`.
    pub purpose: String,
    /// The purpose's share of each window's budget.
    pub budget: f64,
    /// What is left in the interval's most spent window.
    pub left: f64,
    /// What one collection spends.
    pub epsilon_per_collection: f64,
    /// How many more collections of the interval fit.
    pub collections_left: u64,
}

/// What is left of a task's budget over an interval.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BudgetJson {
    /// Task id.
    pub task_id: String,
    /// Interval start, seconds since the epoch.
    pub start: u64,
    /// Interval length in seconds.
    pub duration: u64,
    /// Per purpose.
    pub purposes: Vec<PurposeBudgetJson>,
}

impl BudgetJson {
    /// The JSON form of the leader's answer for `task`.
    pub fn new(task: &TaskId, b: &pb::BudgetAnswer) -> Self {
        let i = b.interval.unwrap_or_default();
        Self {
            task_id: task.to_string(),
            start: i.start,
            duration: i.duration,
            purposes: b
                .purposes
                .iter()
                .map(|p| PurposeBudgetJson {
                    purpose: hush_protocol::BudgetPurpose::from_proto(p.purpose)
                        .map_or("unknown", |p| p.name())
                        .to_owned(),
                    budget: p.budget_micro as f64 / 1e6,
                    left: p.left_micro as f64 / 1e6,
                    epsilon_per_collection: p.epsilon_per_collection_micro as f64 / 1e6,
                    collections_left: p.collections_left,
                })
                .collect(),
        }
    }
}

/// The query of the budget: an aligned interval `[from, to)`, or nothing for the newest
/// released window.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct BudgetQuery {
    /// Interval start (seconds since the epoch, aligned to the task's window).
    pub from: Option<u64>,
    /// Interval end (exclusive).
    pub to: Option<u64>,
}

#[utoipa::path(get, path = "/metrics", tag = "results", security(("read_token" = [])),
    responses((status = 200, description = "The newest released results in the Prometheus text format", content_type = "application/openmetrics-text", body = String)))]
async fn results_metrics(
    State(inner): State<Arc<Shared>>,
) -> Result<
    ([(axum::http::HeaderName, &'static str); 1], String),
    (StatusCode, Json<serde_json::Value>),
> {
    let text = crate::exposition::render(&inner).await.map_err(fail)?;
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

#[utoipa::path(get, path = "/v1/tasks/{task}/budget", tag = "results", security(("read_token" = [])),
    params(("task" = String, Path, description = "Task id (base64url)"), BudgetQuery),
    responses((status = 200, description = "What is left of the budget; spends nothing", body = BudgetJson)))]
async fn budget(
    State(inner): State<Arc<Shared>>,
    Path(task): Path<String>,
    q: Result<axum::extract::Query<BudgetQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply<BudgetJson> {
    let q = q.map(|q| q.0).map_err(|e| {
        fail(Error::InvalidRequest(format!(
            "{}; the budget takes from and to",
            e.body_text()
        )))
    })?;
    let id = parse_task(&task)?;
    let interval = match (q.from, q.to) {
        (None, None) => None,
        (Some(from), Some(to)) if to > from => Some(
            Interval::new(Time::from_secs(from), to - from)
                .map_err(|e| fail(Error::InvalidRequest(e.to_string())))?,
        ),
        _ => {
            return Err(fail(Error::InvalidRequest(
                "give both from and to (from < to, aligned to the task's window), or neither for the newest window".into(),
            )));
        }
    };
    let b = inner.budget(&id, interval).await.map_err(fail)?;
    Ok(Json(BudgetJson::new(&id, &b)))
}

/// A page of windows as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WindowsPage {
    /// The windows, oldest first.
    pub windows: Vec<WindowJson>,
    /// Pass as `page_token` (with the same range) for the next page; null on the last.
    pub next_page_token: Option<String>,
}

/// A page of alerts as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertsPage {
    /// The alerts, oldest window first.
    pub alerts: Vec<AlertJson>,
    /// Pass as `page_token` (with the same range) for the next page; null on the last.
    pub next_page_token: Option<String>,
}

type Listed = Result<axum::response::Response, (StatusCode, Json<serde_json::Value>)>;

/// A page as JSON, or as CSV rows with the next token in a header.
fn listed<T: Serialize>(
    csv: Option<Result<String, csv::Error>>,
    json: T,
    next: Option<&[u8]>,
) -> Listed {
    use axum::response::IntoResponse;
    match csv {
        None => Ok(Json(json).into_response()),
        Some(body) => {
            let body = body.map_err(|e| fail(Error::InvalidRequest(format!("CSV: {e}"))))?;
            let mut resp = (
                [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
                body,
            )
                .into_response();
            if let Some(n) = next {
                let token = crate::paging::next_token(Some(n));
                if let Ok(v) = axum::http::HeaderValue::from_str(&token) {
                    resp.headers_mut().insert("x-next-page-token", v);
                }
            }
            Ok(resp)
        }
    }
}

fn est_cells(e: &Option<Estimate>) -> [String; 3] {
    match e {
        Some(e) => [
            e.value.to_string(),
            e.ci_low.to_string(),
            // An open interval: empty, as a spreadsheet reads "no bound".
            if e.ci_high.is_finite() {
                e.ci_high.to_string()
            } else {
                String::new()
            },
        ],
        None => Default::default(),
    }
}

/// Windows as CSV: one row each, estimates as value, low, high; noisy counts `;`-separated.
pub fn windows_csv(ws: &[WindowJson]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut head = vec!["task_id", "start", "duration"];
    let ests = [
        "reports",
        "late_reports",
        "total",
        "p50_ms",
        "p95_ms",
        "p99_ms",
    ];
    let cols: Vec<String> = ests
        .iter()
        .flat_map(|e| [(*e).to_owned(), format!("{e}_low"), format!("{e}_high")])
        .collect();
    head.extend(cols.iter().map(String::as_str));
    head.extend([
        "noise_stddev",
        "epsilon",
        "ad_hoc",
        "noisy_counts",
        "withheld",
    ]);
    w.write_record(&head)?;
    for x in ws {
        let mut row = vec![
            x.task_id.clone(),
            x.start.to_string(),
            x.duration.to_string(),
        ];
        for e in [
            &x.reports,
            &x.late_reports,
            &x.total,
            &x.p50_ms,
            &x.p95_ms,
            &x.p99_ms,
        ] {
            row.extend(est_cells(e));
        }
        row.push(x.noise_stddev.to_string());
        row.push(x.epsilon.to_string());
        row.push(x.ad_hoc.to_string());
        row.push(
            x.noisy_counts
                .iter()
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(";"),
        );
        row.push(x.withheld.join("; "));
        w.write_record(&row)?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Alerts as CSV, one row each.
pub fn alerts_csv(alerts: &[AlertJson]) -> Result<String, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for a in alerts {
        w.serialize(a)?;
    }
    if alerts.is_empty() {
        w.write_record([
            "task_id",
            "window_start",
            "detector",
            "statistic",
            "threshold",
            "baseline",
            "observed",
            "explanation",
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.into_error())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn fail(e: Error) -> (StatusCode, Json<serde_json::Value>) {
    let status: tonic::Status = e.into();
    let code = match status.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => StatusCode::BAD_REQUEST,
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    (code, Json(serde_json::json!({ "error": status.message() })))
}

fn parse_task(s: &str) -> Result<TaskId, (StatusCode, Json<serde_json::Value>)> {
    s.parse()
        .map_err(|e: hush_protocol::ids::IdError| fail(Error::InvalidRequest(e.to_string())))
}

#[utoipa::path(get, path = "/v1/tasks", tag = "results", security(("read_token" = [])),
    responses((status = 200, description = "The tenant's tasks", body = [TaskJson])))]
async fn tasks(State(inner): State<Arc<Shared>>) -> Json<Vec<TaskJson>> {
    Json(
        inner
            .tasks
            .values()
            .map(|t| TaskJson {
                task_id: t.id().to_string(),
                name: t.name().to_owned(),
                // Spelled as in task files (`window_histogram`), not as Rust names it.
                kind: serde_json::to_value(t.kind())
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                window_s: t.time_precision_s(),
                error_rate_over: inner
                    .config
                    .detection
                    .error_rates
                    .iter()
                    .find(|r| r.errors == t.name())
                    .map(|r| r.requests.clone())
                    .unwrap_or_default(),
            })
            .collect(),
    )
}

#[utoipa::path(get, path = "/v1/tasks/{task}/windows", tag = "results", security(("read_token" = [])),
    params(("task" = String, Path, description = "Task id (base64url)"), ListQuery),
    responses((status = 200, description = "A page of released windows, oldest first (CSV with format=csv or Accept: text/csv)", body = WindowsPage),
        (status = 400, description = "A bad range, page or format"), (status = 401, description = "No or wrong read token")))]
async fn windows(
    State(inner): State<Arc<Shared>>,
    Path(task): Path<String>,
    headers: HeaderMap,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Listed {
    let q = list_query(q)?;
    let id = parse_task(&task)?;
    inner.task(&id).map_err(fail)?;
    let page = inner.store.windows_page(&id, &q.page()?).map_err(fail)?;
    let windows: Vec<WindowJson> = page.items.iter().map(WindowJson::from).collect();
    let csv = q.csv(&headers)?.then(|| windows_csv(&windows));
    listed(
        csv,
        WindowsPage {
            windows,
            next_page_token: page
                .next
                .as_deref()
                .map(|n| crate::paging::next_token(Some(n))),
        },
        page.next.as_deref(),
    )
}

#[utoipa::path(get, path = "/v1/tasks/{task}/windows/{start}", tag = "results", security(("read_token" = [])),
    params(("task" = String, Path, description = "Task id (base64url)"), ("start" = u64, Path, description = "Window start, seconds since the epoch")),
    responses((status = 200, description = "One window", body = WindowJson), (status = 404, description = "No result, with the reason")))]
async fn window(
    State(inner): State<Arc<Shared>>,
    Path((task, start)): Path<(String, u64)>,
) -> Reply<WindowJson> {
    let id = parse_task(&task)?;
    inner.task(&id).map_err(fail)?;
    let start = Time::from_secs(start);
    match inner.store.window(&id, start).map_err(fail)? {
        Some(w) => Ok(Json(WindowJson::from(&w))),
        None => {
            let why = inner.store.skipped(&id, start).map_err(fail)?;
            Err((
                StatusCode::NOT_FOUND,
                Json(
                    serde_json::json!({ "error": why.map(|w| format!("no result: {w}")).unwrap_or_else(|| "not collected yet".into()) }),
                ),
            ))
        }
    }
}

#[utoipa::path(post, path = "/v1/tasks/{task}/collect", tag = "results", security(("api_token" = [])),
    params(("task" = String, Path, description = "Task id (base64url)")), request_body = AdHocRequest,
    responses((status = 200, description = "An ad-hoc collection; spends privacy budget", body = AdHocJson),
        (status = 400, description = "Refused: budget, overlap, too few reports"), (status = 401, description = "No or wrong API token")))]
async fn ad_hoc(
    State(inner): State<Arc<Shared>>,
    Path(task): Path<String>,
    headers: HeaderMap,
    req: Result<Json<AdHocRequest>, axum::extract::rejection::JsonRejection>,
) -> Reply<AdHocJson> {
    // The token first: a caller without it learns nothing about what the body should be.
    inner.check_api(bearer(&headers)).map_err(fail)?;
    // A missing or wrong Content-Type or a malformed body gets the same JSON error body as
    // every other refusal, with its status (415 or 400/422) and what to send.
    let Json(req) = req.map_err(|e| {
        (
            e.status(),
            Json(serde_json::json!({ "error": format!(
                "{}; send Content-Type: application/json and a body like \
                 {{\"start\": 1764201600, \"duration\": 3600}}",
                e.body_text()
            ) })),
        )
    })?;
    let id = parse_task(&task)?;
    let token = bearer(&headers);
    let interval = Interval::new(Time::from_secs(req.start), req.duration)
        .map_err(|e| fail(Error::InvalidRequest(e.to_string())))?;
    let purpose = match req.purpose.as_deref() {
        None | Some("alert") => pb::BudgetPurpose::Alert,
        Some("routine") => pb::BudgetPurpose::Routine,
        Some(other) => {
            return Err(fail(Error::InvalidRequest(format!(
                "purpose {other:?} is neither \"alert\" nor \"routine\""
            ))));
        }
    };
    let (w, left) = inner
        .ad_hoc(token, &id, interval, purpose)
        .await
        .map_err(fail)?;
    Ok(Json(AdHocJson {
        epsilon_spent: w.epsilon_micro as f64 / 1e6,
        window: WindowJson::from(&w),
        budget_left: left as f64 / 1e6,
    }))
}

/// An anomaly alert as JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AlertJson {
    /// Task id (base64url).
    pub task_id: String,
    /// Start of the flagged window, seconds since the epoch.
    pub window_start: u64,
    /// `latency_regression` or `error_spike`.
    pub detector: String,
    /// The test statistic (z).
    pub statistic: f64,
    /// The threshold it exceeded.
    pub threshold: f64,
    /// The baseline value of the tested quantity.
    pub baseline: f64,
    /// Its value in the flagged window.
    pub observed: f64,
    /// What was tested, in words.
    pub explanation: String,
}

impl From<&pb::Alert> for AlertJson {
    fn from(a: &pb::Alert) -> Self {
        Self {
            task_id: TaskId::try_from(a.task_id.as_ref())
                .map(|t| t.to_string())
                .unwrap_or_default(),
            window_start: a.window_start,
            detector: a.detector.clone(),
            statistic: a.statistic,
            threshold: a.threshold,
            baseline: a.baseline,
            observed: a.observed,
            explanation: a.explanation.clone(),
        }
    }
}

#[utoipa::path(get, path = "/v1/alerts", tag = "results", security(("read_token" = [])), params(ListQuery),
    responses((status = 200, description = "A page of the alerts of every task", body = AlertsPage)))]
async fn all_alerts(
    State(inner): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Listed {
    alerts_of(&inner, None, &headers, list_query(q)?)
}

#[utoipa::path(get, path = "/v1/tasks/{task}/alerts", tag = "results", security(("read_token" = [])),
    params(("task" = String, Path, description = "Task id (base64url)"), ListQuery),
    responses((status = 200, description = "A page of a task's alerts", body = AlertsPage)))]
async fn task_alerts(
    State(inner): State<Arc<Shared>>,
    Path(task): Path<String>,
    headers: HeaderMap,
    q: Result<axum::extract::Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Listed {
    let q = list_query(q)?;
    let id = parse_task(&task)?;
    inner.task(&id).map_err(fail)?;
    alerts_of(&inner, Some(&id), &headers, q)
}

fn alerts_of(inner: &Shared, task: Option<&TaskId>, headers: &HeaderMap, q: ListQuery) -> Listed {
    let tasks: Vec<TaskId> = match task {
        Some(t) => vec![*t],
        None => inner.tasks.keys().copied().collect(),
    };
    let page = inner.store.alerts_page(&tasks, &q.page()?).map_err(fail)?;
    let alerts: Vec<AlertJson> = page.items.iter().map(AlertJson::from).collect();
    let csv = q.csv(headers)?.then(|| alerts_csv(&alerts));
    listed(
        csv,
        AlertsPage {
            alerts,
            next_page_token: page
                .next
                .as_deref()
                .map(|n| crate::paging::next_token(Some(n))),
        },
        page.next.as_deref(),
    )
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// Every read needs the read token (or the ad-hoc token).
async fn require_read(
    State(inner): State<Arc<Shared>>,
    headers: HeaderMap,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match inner.check_read(bearer(&headers)) {
        Ok(()) => next.run(req).await,
        Err(e) => fail(e).into_response(),
    }
}

/// One span per HTTP request, like [`hush_server::trace`] on the gRPC side: the party, the
/// method and matched route (never the query or a token), and on completion the HTTP status and
/// latency (a debug event, `request served`). HTTP callers carry no certificate: `peer` is
/// `http`.
async fn span_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use tracing::Instrument;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let span = tracing::info_span!(
        "request",
        party = "results",
        method = %format!("{} {route}", req.method()),
        peer = "http",
    );
    let start = std::time::Instant::now();
    async move {
        let resp = next.run(req).await;
        let latency_ms = start.elapsed().as_secs_f64() * 1e3;
        tracing::debug!(
            http_status = resp.status().as_u16(),
            latency_ms,
            "request served"
        );
        resp
    }
    .instrument(span)
    .await
}

/// Ready while every service is SERVING (not draining, the store takes writes): 200, else 503.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, description = "Serving"), (status = 503, description = "Draining or the store cannot be written")))]
async fn readyz(State(inner): State<Arc<Shared>>) -> (StatusCode, &'static str) {
    if inner.probes.serving() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

#[utoipa::path(get, path = "/healthz", tag = "probes", responses((status = 200, description = "The process serves HTTP")))]
async fn healthz() -> &'static str {
    "ok"
}

/// The bearer tokens of the API.
struct Tokens;

impl utoipa::Modify for Tokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let c = openapi.components.get_or_insert_with(Default::default);
        for name in ["read_token", "api_token"] {
            c.add_security_scheme(
                name,
                SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
            );
        }
    }
}

/// The OpenAPI description of this API, generated from the handlers and types above.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(title = "hush results API", description = "Released noisy statistics of a tenant's tasks. Reads need the read token; ad-hoc collection needs the API token and spends privacy budget."),
    paths(tasks, windows, window, ad_hoc, all_alerts, task_alerts, budget, results_metrics, healthz, readyz),
    components(schemas(Estimate)),
    modifiers(&Tokens)
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// The API's routes: reads behind the read token, ad-hoc collection behind the API token, all
/// under the server's limit of requests in flight (the excess answered 503 at once).
pub(super) fn router(inner: Arc<Shared>) -> Router {
    use tower::ServiceBuilder;
    let limit = inner.config.server.max_concurrent_requests;
    let reads = Router::new()
        .route("/v1/tasks", get(tasks))
        .route("/v1/tasks/{task}/windows", get(windows))
        .route("/v1/tasks/{task}/windows/{start}", get(window))
        .route("/v1/tasks/{task}/alerts", get(task_alerts))
        .route("/v1/tasks/{task}/budget", get(budget))
        .route("/metrics", get(results_metrics))
        .route("/v1/alerts", get(all_alerts))
        .route_layer(axum::middleware::from_fn_with_state(
            inner.clone(),
            require_read,
        ));
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/readyz", get(readyz))
        // The dashboard's static assets: they hold no data (its script reads the API above
        // with the read token).
        .route("/", get(crate::dashboard::root))
        .route("/dashboard", get(crate::dashboard::page))
        .route("/dashboard/app.js", get(crate::dashboard::script))
        .route("/dashboard/app.css", get(crate::dashboard::style))
        .with_state(inner.clone());
    Router::new()
        .route("/v1/tasks/{task}/collect", post(ad_hoc))
        .merge(reads)
        .with_state(inner)
        .layer(
            ServiceBuilder::new()
                .layer(axum::error_handling::HandleErrorLayer::new(
                    |_: tower::BoxError| async {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            Json(serde_json::json!({ "error": "the results service is busy; retry later" })),
                        )
                    },
                ))
                .load_shed()
                // One semaphore for the whole API: `Router::layer` wraps each route on its own,
                // and a per-route limit would let a flood of one route pass while another is busy.
                .layer(tower::limit::GlobalConcurrencyLimitLayer::new(limit)),
        )
        // Probes answer outside the limit: a busy service is alive and ready.
        .merge(probes)
        .layer(axum::middleware::from_fn(span_request))
}
