//! Retention: what an aggregator deletes as it ages, run by background maintenance.
//!
//! Per task, each run deletes
//! - anti-replay entries older than the report expiry (a report that old is refused anyway);
//! - the leader's pending reports older than the report expiry that are in no job in flight
//!   (counted as refused `TOO_OLD`: the helper would refuse them too);
//! - aggregate shares of windows that start more than `retention_s` ago, and stored collection
//!   answers whose last window does (`retention_s = 0` keeps them forever);
//! - what is kept per window (budget ledger, closed, released and batch marks, late counts) for
//!   windows past `retention_s`: collections of intervals that start before the retention cutoff
//!   are refused, and ingest refuses reports that old, so deleting them never frees budget or
//!   lets a window be collected again.
//!
//! Every run that deleted something appends one audit entry per task with the counts (never
//! data).

use hush_protocol::{TaskConfig, Time};

use crate::audit::AuditEvent;
use crate::error::Result;
use crate::shared::Shared;

/// What one run deleted for one task.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deleted {
    /// Anti-replay entries.
    pub seen_ids: u64,
    /// Pending reports (leader).
    pub pending_reports: u64,
    /// Aggregate shares, one per window.
    pub aggregates: u64,
    /// Stored collection answers.
    pub collections: u64,
    /// Per-window records (ledger, marks, late counts).
    pub window_marks: u64,
}

impl Deleted {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Reports with a time before this are past the task's expiry (with the allowed clock skew).
pub fn report_cutoff(task: &TaskConfig, now: Time, clock_skew_s: u64) -> Time {
    now.sub_secs(task.report_expiry_s() + clock_skew_s)
}

/// Windows that start before this are past the task's retention; `None` keeps them forever.
pub fn aggregate_cutoff(task: &TaskConfig, now: Time) -> Option<Time> {
    task.aggregate_cutoff(now)
}

/// Applies retention to every task once; returns what was deleted, per task.
pub async fn run_once(shared: &Shared) -> Result<Vec<(TaskConfig, Deleted)>> {
    let now = shared.clock.now();
    let mut out = Vec::new();
    for t in shared.tasks.all() {
        let task = &t.config;
        let id = task.id();
        let cutoff = report_cutoff(task, now, shared.config.clock_skew_s);
        let mut d = Deleted {
            seen_ids: shared.store.expire_seen(&id, cutoff).await? as u64,
            ..Deleted::default()
        };
        if shared.role == hush_protocol::Role::Leader {
            d.pending_reports = shared.store.expire_pending(&id, cutoff).await?;
            shared.pending_released(&id, d.pending_reports);
        }
        if let Some(cutoff) = aggregate_cutoff(task, now) {
            d.aggregates = shared.store.expire_aggregates(&id, cutoff).await?;
            d.collections = shared.store.expire_collections(&id, cutoff).await?;
            d.window_marks = shared.store.expire_window_marks(&id, cutoff).await?;
            shared.forget_collected_before(&id, cutoff);
        }
        if d.is_empty() {
            continue;
        }
        tracing::info!(
            task = %id,
            seen_ids = d.seen_ids,
            pending_reports = d.pending_reports,
            aggregates = d.aggregates,
            collections = d.collections,
            "retention deleted expired data"
        );
        shared.audit(AuditEvent {
            actor: "retention".into(),
            action: "retention.delete".into(),
            tenant: task.tenant().into(),
            task: id.to_string(),
            outcome: "ok".into(),
            detail: format!(
                "{} report ids and {} pending reports older than {}; {} window aggregates, {} collection answers and {} per-window records older than {}",
                d.seen_ids,
                d.pending_reports,
                cutoff.as_secs(),
                d.aggregates,
                d.collections,
                d.window_marks,
                aggregate_cutoff(task, now).map_or("never (retention_s = 0)".into(), |c| c.as_secs().to_string()),
            ),
        });
        out.push((task.clone(), d));
    }
    Ok(out)
}
