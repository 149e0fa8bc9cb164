//! The checks and steps both aggregators run on a collection, so the leader and the helper
//! cannot drift apart: the interval (window count bounded before anything is built), the budget
//! purpose, the batch rules, the budget ledger, the noisy sealed share and the one transaction
//! that commits it; and how a report's failures are classified.
//!
//! Batch rules (as in DAP): an interval must equal a batch collected before or be disjoint from
//! every one, so no two answers can be differenced into a smaller batch than `min_batch_size`;
//! a batch is collected at most once for routine use, and at most `max_collections_per_batch`
//! times in all when the task sets it. Both aggregators enforce them.

use std::time::Duration;

use hush_protocol::collect::{count_mask, count_share, seal_aggregate_share};
use hush_protocol::proto::v1 as pb;
use hush_protocol::{BudgetPurpose, Epsilon, Interval, Role, Time};

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{BatchAggregation, BatchRule, CollectRefusal, CollectionCommit};
use crate::tasks::TaskEntry;

use hush_protocol::HpkeCiphertext;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::vdaf::VdafError;

/// The most windows one collection may span.
pub const MAX_WINDOWS: u64 = 10_000;

/// How long the leader waits for in-flight aggregation of a collected interval.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

pub(crate) fn purpose_of(p: i32) -> Result<BudgetPurpose> {
    BudgetPurpose::from_proto(p).map_err(Error::InvalidRequest)
}

pub(crate) fn checked_interval(
    task: &TaskEntry,
    i: Option<&pb::Interval>,
    now: Time,
) -> Result<(Interval, Vec<Time>)> {
    let i =
        Interval::try_from(i.ok_or_else(|| Error::InvalidRequest("interval is missing".into()))?)
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let retention_s = task.config.retention_s();
    if let Some(cutoff) = crate::retention::aggregate_cutoff(&task.config, now)
        && i.start() < cutoff
    {
        return Err(Error::PastRetention {
            start: i.start().as_secs(),
            cutoff: cutoff.as_secs(),
            retention_s,
        });
    }
    let precision = task.config.time_precision_s();
    i.check_aligned(precision).map_err(|e| {
        Error::InvalidRequest(format!("{e} (the task's time precision is {precision} s)"))
    })?;
    // Counted before anything is built: an attacker's interval may span 2^58 windows.
    let n = i.bucket_count(precision);
    if n > MAX_WINDOWS {
        return Err(Error::InvalidRequest(format!(
            "the interval spans {n} windows; collect at most {MAX_WINDOWS} at once"
        )));
    }
    let windows: Vec<Time> = i.buckets(precision).collect();
    Ok((i, windows))
}

pub(crate) fn collection_id(b: &[u8]) -> Result<[u8; 16]> {
    if b.is_empty() {
        return Ok(rand::random());
    }
    b.try_into().map_err(|_| {
        Error::InvalidRequest(format!("collection_id must be 16 bytes, not {}", b.len()))
    })
}

pub(crate) fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(&(p.len() as u64).to_be_bytes());
        ctx.update(p);
    }
    let mut h = [0u8; 32];
    h.copy_from_slice(ctx.finish().as_ref());
    h
}

/// Adds noise to `batch`'s share at the task's aggregate ε and to this aggregator's secret
/// share of the report count at its count ε, and seals both to the collector.
pub(crate) fn noisy_sealed_share(
    task: &TaskEntry,
    role: Role,
    interval: &Interval,
    collection_id: &[u8; 16],
    batch: &BatchAggregation,
) -> Result<pb::HpkeCiphertext> {
    let mut share = batch.share.clone();
    task.vdaf
        .add_noise(
            task.config.aggregate_epsilon(),
            &mut share,
            batch.report_count as usize,
        )
        .map_err(|e| Error::corrupt("aggregate share", e))?;
    let count = match task.config.count_epsilon() {
        Some(eps) => {
            let noise = hush_protocol::dp::count_noise(task.config.reports_per_instance(), eps)
                .map_err(|e| Error::config(format!("sampling the count noise failed: {e}")))?;
            let mask = count_mask(&task.verify_key, &task.config.id(), collection_id, interval);
            Some(count_share(role, batch.report_count, mask, noise))
        }
        None => None,
    };
    let ct = seal_aggregate_share(
        task.config.collector_hpke_config(),
        role,
        &task.config,
        interval,
        &share,
        count,
    )
    .map_err(|e| Error::config(format!("sealing to the task's collector key failed: {e}")))?;
    Ok((&ct).into())
}

/// The batch rules of a collection of `interval` for `purpose`.
pub(crate) fn batch_rule(
    task: &TaskEntry,
    interval: &Interval,
    purpose: BudgetPurpose,
) -> BatchRule {
    BatchRule {
        batch: (interval.start(), interval.duration()),
        purpose,
        max_collections: task.config.max_collections_per_batch(),
    }
}

/// The error of a refused collection.
pub(crate) fn refusal_error(task: &TaskEntry, purpose: BudgetPurpose, r: CollectRefusal) -> Error {
    match r {
        CollectRefusal::OverBudget {
            window,
            left_micros,
        } => Error::OverBudget {
            window,
            left: Epsilon::from_micros(left_micros),
            needed: task.config.epsilon_per_collection(),
            purpose: purpose.name(),
        },
        CollectRefusal::Overlaps { window, batch } => Error::BatchOverlap {
            window,
            start: batch.0,
            duration: batch.1,
        },
        CollectRefusal::Exhausted { routine, alert } => Error::BatchExhausted {
            routine,
            alert,
            purpose: purpose.name(),
            max: task.config.max_collections_per_batch(),
        },
        // Not a refusal: `commit` answers with the stored answer instead.
        CollectRefusal::Repeated => Error::CollectionConflict("committed before".into()),
    }
}

/// Checks the batch rules of a collection before anything is closed or spent; a refusal is
/// audited.
pub(crate) async fn check_batch_rules(
    shared: &Shared,
    task: &TaskEntry,
    actor: &str,
    action: &str,
    windows: &[Time],
    rule: &BatchRule,
    purpose: BudgetPurpose,
) -> Result<()> {
    match shared
        .store
        .check_batch(&task.config.id(), windows, rule)
        .await?
    {
        None => Ok(()),
        Some(r) => {
            let e = refusal_error(task, purpose, r);
            shared.collect_refusals.record(
                &shared.trail(),
                AuditEvent {
                    actor: actor.into(),
                    action: action.into(),
                    tenant: task.config.tenant().into(),
                    task: task.config.id().to_string(),
                    outcome: "refused: batch rules".into(),
                    detail: e.to_string(),
                },
            );
            Err(e)
        }
    }
}

/// Checks the ledger without spending: the smallest ε left over the windows, or the error.
pub(crate) async fn check_budget(
    shared: &Shared,
    task: &TaskEntry,
    purpose: BudgetPurpose,
    windows: &[Time],
) -> Result<u64> {
    let eps = task.config.epsilon_per_collection();
    let budget = task.config.budget_for(purpose).micros();
    let spent = shared
        .store
        .spent(&task.config.id(), purpose, windows)
        .await?;
    let mut min_left = u64::MAX;
    for (w, s) in windows.iter().zip(spent) {
        let left = budget.saturating_sub(s);
        if left < eps.micros() {
            return Err(Error::OverBudget {
                window: *w,
                left: Epsilon::from_micros(left),
                needed: eps,
                purpose: purpose.name(),
            });
        }
        min_left = min_left.min(left - eps.micros());
    }
    Ok(min_left)
}

/// Checks the batch rules, spends the budget, stores the answer and closes and releases the
/// windows in one transaction.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn commit(
    shared: &Shared,
    task: &TaskEntry,
    cid: &[u8; 16],
    purpose: BudgetPurpose,
    interval: &Interval,
    windows: &[Time],
    batch: &BatchAggregation,
    request_hash: [u8; 32],
    answer: &[u8],
) -> Result<Committed> {
    let eps = task.config.epsilon_per_collection();
    let r = shared
        .store
        .commit_collection(&CollectionCommit {
            task: &task.config.id(),
            collection_id: cid,
            rule: batch_rule(task, interval, purpose),
            windows,
            summed: (batch.report_count, batch.checksum),
            epsilon_micros: eps.micros(),
            budget_micros: task.config.budget_for(purpose).micros(),
            request_hash,
            answer,
        })
        .await?;
    match r {
        Ok(_) => {
            shared.set_collected(&task.config.id(), windows, true);
            Ok(Committed::Now)
        }
        Err(CollectRefusal::Repeated) => Ok(Committed::Before(
            shared
                .store
                .collection(&task.config.id(), cid)
                .await?
                .map(|(_, answer)| answer)
                .ok_or_else(|| Error::corrupt("collection", "its answer vanished"))?,
        )),
        Err(r) => Err(refusal_error(task, purpose, r)),
    }
}

/// How a collection's commit ended.
pub(crate) enum Committed {
    /// This call spent the budget and stored the answer.
    Now,
    /// The same request was committed before (here or at a replica): its stored answer, which
    /// is the one to give.
    Before(Vec<u8>),
}

/// The audit entry of a collection that spent budget.
pub(crate) fn spend_event(
    actor: String,
    action: &str,
    task: &TaskEntry,
    interval: &Interval,
    reports: u64,
    purpose: &str,
    left_micros: u64,
) -> AuditEvent {
    AuditEvent {
        actor,
        action: action.into(),
        tenant: task.config.tenant().into(),
        task: task.config.id().to_string(),
        outcome: "ok".into(),
        detail: format!(
            "interval {}+{} s, {reports} reports, spent ε {} of the {purpose} budget, ε {} left",
            interval.start().as_secs(),
            interval.duration(),
            task.config.epsilon_per_collection(),
            Epsilon::from_micros(left_micros)
        ),
    }
}

/// How a VDAF failure is reported.
pub fn reject_reason(e: &VdafError) -> RejectReason {
    match e {
        VdafError::Malformed(_) => RejectReason::Malformed,
        _ => RejectReason::InvalidProof,
    }
}

/// Checks that a protobuf ciphertext converts.
pub fn ciphertext(
    p: Option<&pb::HpkeCiphertext>,
) -> std::result::Result<HpkeCiphertext, RejectReason> {
    p.and_then(|c| HpkeCiphertext::try_from(c).ok())
        .ok_or(RejectReason::Malformed)
}

/// Counts a collection (an aggregate share request at the helper) that took since `started`:
/// released, refused (a rule said no: budget, overlap, size, retention, authorization, a bad
/// request) or failed.
pub(crate) fn record_collection<T>(purpose: i32, started: std::time::Instant, out: &Result<T>) {
    use hush_server::metrics::names;
    let purpose = BudgetPurpose::from_proto(purpose).map_or("unknown", |p| p.name());
    let outcome = match out {
        Ok(_) => "released",
        Err(
            Error::OverBudget { .. }
            | Error::BatchOverlap { .. }
            | Error::BatchExhausted { .. }
            | Error::BatchTooSmall { .. }
            | Error::PastRetention { .. }
            | Error::Unauthenticated(_)
            | Error::PermissionDenied(_)
            | Error::InvalidRequest(_)
            | Error::UnknownTask(_)
            | Error::CollectionConflict(_),
        ) => "refused",
        Err(_) => "failed",
    };
    metrics::counter!(names::COLLECTIONS, "purpose" => purpose, "outcome" => outcome).increment(1);
    metrics::histogram!(names::COLLECTION_SECONDS).record(started.elapsed().as_secs_f64());
}

/// Counts `spent` ε (summed over the windows charged) of `purpose` for `task`, with `left_micros`
/// left in its most spent window.
pub(crate) fn record_epsilon(
    task: &TaskEntry,
    purpose: BudgetPurpose,
    spent: f64,
    left_micros: u64,
) {
    use hush_server::metrics::names;
    let labels = [
        ("task", task.config.id().to_string()),
        ("purpose", purpose.name().to_owned()),
    ];
    metrics::gauge!(names::EPSILON_SPENT, &labels).increment(spent);
    metrics::gauge!(names::EPSILON_LEFT, &labels).set(Epsilon::from_micros(left_micros).as_f64());
}

/// After a share was committed: the audit entry of what it spent, a flush, and the log line
/// (`what`: "collection" at the leader, "aggregate share" at the helper).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record_release(
    shared: &Shared,
    actor: String,
    action: &str,
    task: &TaskEntry,
    interval: &Interval,
    reports: u64,
    purpose: BudgetPurpose,
    left_micros: u64,
    what: &str,
) -> Result<()> {
    shared.audit(spend_event(
        actor,
        action,
        task,
        interval,
        reports,
        purpose.name(),
        left_micros,
    ));
    shared.store.flush().await?;
    record_epsilon(
        task,
        purpose,
        task.config.epsilon_per_collection().as_f64()
            * interval.bucket_count(task.config.time_precision_s()) as f64,
        left_micros,
    );
    tracing::info!(
        task = %task.config.id(),
        start = interval.start().as_secs(),
        duration = interval.duration(),
        reports,
        purpose = purpose.name(),
        epsilon = %task.config.epsilon_per_collection(),
        "released a noisy {what}"
    );
    Ok(())
}
