//! The runtime's own health through the `metrics` facade, so a service's existing Prometheus
//! (or any `metrics` recorder it installs) shows it. Names follow Prometheus conventions; every
//! label takes a bounded set of values (drop reasons, gRPC codes, reject reasons, outcomes),
//! never a measurement, a task id or an address. Without a recorder every call is a no-op.
//!
//! | metric | kind | meaning |
//! | --- | --- | --- |
//! | `hush_client_measurements_recorded_total` | counter | events and counts recorded |
//! | `hush_client_dropped_total{reason}` | counter | `over_bound` (past the task's contribution bound), `queue_full` (oldest dropped from a full queue) |
//! | `hush_client_unknown_metric_total` | counter | records to a metric that was never registered |
//! | `hush_client_queued` | gauge | measurements waiting to be sent |
//! | `hush_client_reports_sent_total` | counter | reports built into packets and sent |
//! | `hush_client_reports_accepted_total` | counter | reports the first shuffler acknowledged |
//! | `hush_client_reports_rejected_total{reason}` | counter | reports the first shuffler refused, by reason |
//! | `hush_client_upload_retries_total` | counter | uploads that failed and will be retried |
//! | `hush_client_upload_errors_total{code}` | counter | failed uploads by gRPC code |
//! | `hush_client_key_refreshes_total{outcome}` | counter | key-set fetches from the directory, `ok` or `error` |
//!
//! The counters are copied from the runtime's own atomics by the background task once per
//! tick, so recording a latency stays one short lock and never touches the recorder.

use std::sync::atomic::Ordering;

use hush_protocol::proto::v1::RejectReason;

use super::{Inner, lock};

/// Copies the runtime's counters and queue length to the recorder.
pub(super) fn export(inner: &Inner) {
    let c = &inner.counters;
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    metrics::counter!("hush_client_measurements_recorded_total").absolute(get(&c.recorded));
    metrics::counter!("hush_client_dropped_total", "reason" => "over_bound")
        .absolute(get(&c.dropped_over_bound));
    metrics::counter!("hush_client_dropped_total", "reason" => "queue_full")
        .absolute(get(&c.dropped_queue_full));
    metrics::counter!("hush_client_unknown_metric_total").absolute(get(&c.unknown_metric));
    metrics::counter!("hush_client_reports_sent_total").absolute(get(&c.reports_sent));
    metrics::counter!("hush_client_reports_accepted_total").absolute(get(&c.accepted));
    metrics::counter!("hush_client_upload_retries_total").absolute(get(&c.upload_retries));
    let rejected: Vec<(i32, u64)> = lock(&c.rejected).iter().map(|(r, n)| (*r, *n)).collect();
    for (reason, n) in rejected {
        let name = RejectReason::try_from(reason)
            .map(|r| r.as_str_name())
            .unwrap_or("UNKNOWN");
        metrics::counter!("hush_client_reports_rejected_total", "reason" => name).absolute(n);
    }
    metrics::gauge!("hush_client_queued").set(lock(&inner.queue).len() as f64);
}

/// Counts a failed upload by its gRPC code.
pub(super) fn upload_error(code: tonic::Code) {
    metrics::counter!("hush_client_upload_errors_total", "code" => format!("{code:?}"))
        .increment(1);
}

/// Counts a key-set fetch from the directory.
pub(super) fn key_refresh(ok: bool) {
    metrics::counter!("hush_client_key_refreshes_total", "outcome" => if ok { "ok" } else { "error" })
        .increment(1);
}
