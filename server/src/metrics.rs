//! Prometheus metrics for every hush server: the process records through the `metrics` facade
//! (the same facade the client runtime and most Rust services use), and
//! `metrics-exporter-prometheus` renders the text exposition format on a listener of its own,
//! `[metrics] listen`, at `GET /metrics`. Off unless `listen` is set.
//!
//! Why the `metrics` facade and not the OpenTelemetry SDK: the client runtime already records
//! through it (a service's own Prometheus recorder shows the client's counters), recording is a
//! relaxed atomic add when no recorder is installed, and the exporter renders without an extra
//! collector process. OpenTelemetry would add an SDK, a meter provider and its own exporter for
//! the same text.
//!
//! What the metrics may carry: counts and durations, labelled only by values the operator's
//! configuration or hush's code bounds (a task id, a tenant, a reject reason, a gRPC method of
//! a served service, a tree name). Never a report id, a packet, an address or a certificate.
//!
//! [`CATALOG`] lists every metric a hush server exports with its meaning; docs/operators.md
//! lists the same (a test keeps them in step).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::ServerError;

/// `[metrics]`: where the Prometheus endpoint listens.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the plaintext `GET /metrics` listener (e.g. `127.0.0.1:9464`); none, no
    /// endpoint. Bind it to an interface only the operator's Prometheus reaches.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// What kind of series a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_seconds`).
    Histogram,
}

/// A metric a hush server exports: its name, kind, labels and meaning.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    /// The Prometheus name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// Which servers export it.
    pub parties: &'static str,
    /// Its labels.
    pub labels: &'static [&'static str],
    /// What it counts.
    pub help: &'static str,
}

macro_rules! catalog {
    ($($id:ident = $name:literal, $kind:ident, $parties:literal, [$($l:literal),*], $help:literal;)*) => {
        /// The names of the metrics, for recording sites.
        pub mod names {
            $(
                #[doc = $help]
                pub const $id: &str = $name;
            )*
        }
        /// Every metric hush servers export (besides the `process_*` family).
        pub const CATALOG: &[Metric] = &[
            $(Metric { name: $name, kind: Kind::$kind, parties: $parties, labels: &[$($l),*], help: $help },)*
        ];
    };
}

catalog! {
    REQUESTS = "hush_requests_total", Counter, "all", ["method", "grpc_status"],
        "gRPC requests answered, by method and status code (a path no service serves as method=\"unknown\"; 8 is RESOURCE_EXHAUSTED: load shed, or a quota or capacity refusal).";
    REQUEST_SECONDS = "hush_request_duration_seconds", Histogram, "all", ["method"],
        "Time to serve a gRPC request.";
    TLS_HANDSHAKE_FAILURES = "hush_tls_handshake_failures_total", Counter, "all", [],
        "TLS handshakes that failed or timed out (untrusted certificate, plaintext or stalled peer).";
    PEER_REFUSALS = "hush_peer_refusals_total", Counter, "all", ["expected", "reason"],
        "Requests refused before a handler ran because of who sent them (expected: the callers the service is for): reason no_certificate or wrong_role.";
    CONNECTIONS_REFUSED = "hush_connections_refused_total", Counter, "all", [],
        "Connections closed at accept because the server held [server] max_connections.";
    REPORTS_ACCEPTED = "hush_reports_accepted_total", Counter, "leader", [],
        "Reports the leader stored for aggregation.";
    REPORTS_REJECTED = "hush_reports_rejected_total", Counter, "leader, helper", ["reason"],
        "Reports refused, at ingest or in aggregation, by reason (e.g. replay, decrypt_failure, invalid_proof, over_quota).";
    REPORTS_AGGREGATED = "hush_reports_aggregated_total", Counter, "leader, helper", [],
        "Reports whose output shares were added to an aggregate share.";
    REPORTS_PENDING = "hush_reports_pending", Gauge, "leader", [],
        "Reports stored and waiting for an aggregation job.";
    QUOTA_REFUSALS = "hush_quota_refusals_total", Counter, "leader, shuffler", ["tenant", "limit"],
        "Reports (packets at a shuffler) refused over a limit: per tenant, limit pending (what a tenant may hold) or rate; at a shuffler also source_rate and capacity (tenant of the refused packets' task, \"\" if unknown).";
    JOBS_STARTED = "hush_aggregation_jobs_started_total", Counter, "leader, helper", [],
        "Aggregation jobs started (the leader: created or resumed; the helper: requests received).";
    JOBS_FINISHED = "hush_aggregation_jobs_finished_total", Counter, "leader, helper", ["outcome"],
        "Aggregation jobs finished: outcome committed, abandoned (leader, past the helper's retention), refused (helper) or repeated (helper: a retry answered from its record).";
    JOBS_FORGOTTEN = "hush_aggregation_jobs_forgotten_total", Counter, "leader, helper", [],
        "Committed jobs whose stored answer the helper deleted at the leader's word (the leader: jobs it named; the helper: answers deleted).";
    JOB_RETRIES = "hush_aggregation_job_retries_total", Counter, "leader", [],
        "Attempts of an aggregation job that failed and will be retried.";
    JOB_SECONDS = "hush_aggregation_job_duration_seconds", Histogram, "leader, helper", [],
        "Time from a job's start to its commit, retries included.";
    COLLECTIONS = "hush_collections_total", Counter, "leader, helper, results", ["purpose", "outcome"],
        "Collections (aggregate share requests at the helper): outcome released, refused (budget, overlap, too few reports) or failed.";
    COLLECTION_SECONDS = "hush_collection_duration_seconds", Histogram, "leader, helper, results", [],
        "Time to answer a collection (at the results service: a whole collection through the leader).";
    EPSILON_SPENT = "hush_epsilon_spent", Gauge, "leader, helper", ["task", "purpose"],
        "ε this aggregator charged to its privacy ledger since the process started (collections and late-report counts): ε spent times the windows charged (a gauge: ε is not a whole number).";
    EPSILON_LEFT = "hush_epsilon_left", Gauge, "leader, helper", ["task", "purpose"],
        "ε left in the most spent window of the task's latest release.";
    AUDIT_ENTRIES = "hush_audit_entries_total", Counter, "leader, helper", [],
        "Entries appended to the audit trail.";
    AUDIT_FAILURES = "hush_audit_write_failures_total", Counter, "leader, helper", [],
        "Audit entries that could not be written (the store failed).";
    AUDIT_NOT_RECORDED = "hush_audit_refusals_not_recorded_total", Counter, "leader, helper", [],
        "Refusals left out of the audit trail by its rate limit (counted in the next entry).";
    PACKETS_ACCEPTED = "hush_packets_accepted_total", Counter, "shuffler", [],
        "Packets a shuffler buffered for mixing.";
    PACKETS_REJECTED = "hush_packets_rejected_total", Counter, "shuffler", ["reason"],
        "Packets a shuffler refused, by reason.";
    PACKETS_BUFFERED = "hush_shuffler_buffered_packets", Gauge, "shuffler", [],
        "Packets held, waiting for a batch or for the next hop.";
    BATCHES = "hush_shuffler_batches_total", Counter, "shuffler", [],
        "Batches the shuffler mixed and forwarded.";
    PACKETS_FORWARDED = "hush_shuffler_forwarded_packets_total", Counter, "shuffler", [],
        "Packets the next hop (shuffler or leader) accepted.";
    FORWARD_RETRIES = "hush_shuffler_forward_retries_total", Counter, "shuffler", [],
        "Forwarding attempts that failed and will be retried.";
    WINDOWS_RELEASED = "hush_results_windows_total", Counter, "results", ["outcome"],
        "Windows the results service closed: outcome released (a result stored) or skipped (the leader refused, e.g. too few reports).";
    ALERTS = "hush_results_alerts_total", Counter, "results", [],
        "Alerts the detector raised.";
    ANTI_REPLAY_IDS = "hush_anti_replay_ids", Gauge, "leader, helper", [],
        "Report ids an aggregator on sled holds in memory against replays (read at scrape time): about rate × (report_expiry_s + clock_skew_s), 10–21 bytes each.";
    STORE_ENTRIES = "hush_store_tree_entries", Gauge, "all", ["tree"],
        "Entries in each sled tree of the server's store (read at scrape time).";
    STORE_BYTES = "hush_store_disk_bytes", Gauge, "all", [],
        "Bytes the server's store occupies on disk: sled, and a shuffler's packet files (read at scrape time).";
}

/// The buckets of every `_seconds` histogram: 1 ms to 60 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// The process's Prometheus recorder, installed as the global `metrics` recorder on first use.
/// Every server of one process shares it (one process, one registry).
pub fn handle() -> Result<PrometheusHandle, ServerError> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
                .map_err(|e| e.to_string())?
                .install_recorder()
                .map_err(|e| {
                    format!("another metrics recorder is installed in this process ({e})")
                })?;
            for m in CATALOG {
                let help = m.help;
                match m.kind {
                    Kind::Counter => metrics::describe_counter!(m.name, help),
                    Kind::Gauge => metrics::describe_gauge!(m.name, help),
                    Kind::Histogram => {
                        metrics::describe_histogram!(m.name, metrics::Unit::Seconds, help)
                    }
                }
            }
            process().describe();
            Ok(recorder)
        })
        .clone()
        .map_err(|e| ServerError::Config(format!("metrics: {e}")))
}

fn process() -> &'static metrics_process::Collector {
    static P: OnceLock<metrics_process::Collector> = OnceLock::new();
    P.get_or_init(metrics_process::Collector::default)
}

/// Gauges a server reads when it is scraped (its store's sizes, pending work).
pub type Refresh = Arc<dyn Fn() + Send + Sync>;

/// A running metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    join: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Starts `GET /metrics` on `config.listen` if it is set, for the server of `party`
    /// ("leader", "helper", "shuffler", "results"): its unlabelled counters and gauges are
    /// exported from the start, at zero. `refresh` runs (on a blocking thread) before each
    /// scrape renders; the listener stops when `shutdown` turns true.
    pub async fn start(
        config: &MetricsConfig,
        party: &str,
        refresh: Refresh,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<Option<Self>, ServerError> {
        let Some(listen) = config.listen else {
            return Ok(None);
        };
        let handle = handle()?;
        for m in CATALOG.iter().filter(|m| {
            m.labels.is_empty() && (m.parties == "all" || m.parties.split(", ").any(|p| p == party))
        }) {
            match m.kind {
                Kind::Counter => metrics::counter!(m.name).increment(0),
                Kind::Gauge => metrics::gauge!(m.name).increment(0.0),
                Kind::Histogram => {}
            }
        }
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| ServerError::Config(format!("metrics: cannot listen on {listen}: {e}")))?;
        let addr = listener.local_addr()?;
        // One scrape at a time: a flood of scrapes waits instead of walking the store in
        // parallel.
        let one = Arc::new(tokio::sync::Mutex::new(()));
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let (handle, refresh, one) = (handle.clone(), refresh.clone(), one.clone());
                async move {
                    let _turn = one.lock().await;
                    scrape(handle, refresh).await
                }
            }),
        );
        let join = tokio::spawn(async move {
            let stop = async move {
                let _ = shutdown.wait_for(|v| *v).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
        tracing::info!(%addr, "metrics listening at /metrics");
        Ok(Some(Self { addr, join }))
    }

    /// The address `/metrics` is served on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the listener to stop (after shutdown).
    pub async fn join(self) {
        let _ = self.join.await;
    }
}

async fn scrape(
    handle: PrometheusHandle,
    refresh: Refresh,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let body = tokio::task::spawn_blocking(move || {
        refresh();
        process().collect();
        handle.run_upkeep();
        handle.render()
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// How often a scrape counts the entries of the store's trees (a walk of every tree); scrapes
/// in between report the last count.
pub const TREE_COUNT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// The store gauges of one server: entries per tree (counted at most every
/// [`TREE_COUNT_EVERY`]) and bytes on disk.
#[derive(Debug)]
pub struct StoreGauges {
    db: sled::Db,
    counted: std::sync::Mutex<Option<std::time::Instant>>,
}

impl StoreGauges {
    /// Gauges of `db`.
    pub fn new(db: sled::Db) -> Self {
        Self {
            db,
            counted: std::sync::Mutex::new(None),
        }
    }

    /// Sets the gauges (call it from a scrape's refresh).
    pub fn record(&self) {
        let due = {
            let mut last = self.counted.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.is_none_or(|t| t.elapsed() >= TREE_COUNT_EVERY);
            if due {
                *last = Some(std::time::Instant::now());
            }
            due
        };
        if due {
            for (tree, n) in crate::db::tree_sizes(&self.db) {
                metrics::gauge!(names::STORE_ENTRIES, "tree" => tree).set(n as f64);
            }
        }
        if let Ok(bytes) = self.db.size_on_disk() {
            metrics::gauge!(names::STORE_BYTES).set(bytes as f64);
        }
    }
}

/// Counts `n` reports or packets of `tenant` refused over `limit`. `tenant` comes from a
/// provisioned task (bounded by configuration), or is empty.
pub fn record_quota_refusals(tenant: &str, limit: &'static str, n: u64) {
    metrics::counter!(names::QUOTA_REFUSALS, "tenant" => tenant.to_owned(), "limit" => limit)
        .increment(n);
}

/// A reject reason as a label: `REJECT_REASON_OVER_QUOTA` → `over_quota`.
pub fn reason_label(r: hush_protocol::proto::v1::RejectReason) -> String {
    r.as_str_name()
        .trim_start_matches("REJECT_REASON_")
        .to_ascii_lowercase()
}

/// Counts `outcomes`: accepted into `accepted`, each refusal into `rejected` by reason.
pub fn record_outcomes(
    accepted: &'static str,
    rejected: &'static str,
    outcomes: &hush_protocol::Outcomes,
) {
    if outcomes.accepted() > 0 {
        metrics::counter!(accepted).increment(outcomes.accepted());
    }
    record_rejections(rejected, outcomes);
}

/// Counts each refusal of `outcomes` into `rejected` by reason.
pub fn record_rejections(rejected: &'static str, outcomes: &hush_protocol::Outcomes) {
    for rc in outcomes.reason_counts() {
        let reason = hush_protocol::proto::v1::RejectReason::try_from(rc.reason)
            .unwrap_or(hush_protocol::proto::v1::RejectReason::Unspecified);
        metrics::counter!(rejected, "reason" => reason_label(reason)).increment(rc.count);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("hush_"), "{}", m.name);
            match m.kind {
                Kind::Counter => assert!(m.name.ends_with("_total"), "{}", m.name),
                Kind::Histogram => assert!(m.name.ends_with("_seconds"), "{}", m.name),
                Kind::Gauge => assert!(!m.name.ends_with("_total"), "{}", m.name),
            }
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
            );
        }
    }

    #[test]
    fn reasons_become_short_labels() {
        assert_eq!(
            reason_label(hush_protocol::proto::v1::RejectReason::OverQuota),
            "over_quota"
        );
    }
}
