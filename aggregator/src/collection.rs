//! Collection: the leader's `Collection` service for tenants' collectors, and the helper's
//! answer to `GetAggregateShare`.
//!
//! The leader authenticates the collector with its tenant's token, checks the interval, the
//! batch rules, the report count against `min_batch_size` and its budget ledger, closes the
//! interval's windows (late reports are then refused), waits until no report of them is still
//! being aggregated, and asks the helper for its share of the same windows, passing the report
//! count and the checksum of report ids. The helper refuses if its own count or checksum differ.
//! Each side adds discrete Laplace noise to its own aggregate share (calibrated to one service
//! instance's whole contribution to a window) and to its secret share of the report count,
//! seals both to the collector, and in one transaction checks the batch rules, spends the budget
//! of every window, stores its answer and releases the windows, so a retry with the same
//! collection id gets the same answer (the same noise) and spends nothing more.
//!
//! Batch rules (as in DAP): an interval must equal a batch collected before or be disjoint from
//! every one, so no two answers can be differenced into a smaller batch than `min_batch_size`;
//! a batch is collected at most once for routine use, and at most `max_collections_per_batch`
//! times in all when the task sets it. Both aggregators enforce them.

use std::time::{Duration, Instant};

use hush_protocol::collect::{count_mask, count_share, seal_aggregate_share};
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::collection_server::Collection;
use hush_protocol::{BudgetPurpose, Epsilon, Interval, ReportIdChecksum, Role, TaskId, Time};
use hush_server::auth::{bearer_token, token_hash, token_matches};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::leader::HelperClient;
use crate::shared::Shared;
use crate::store::{BatchAggregation, BatchRule, CollectRefusal, CollectionCommit};
use crate::tasks::TaskEntry;

/// The most windows one collection may span.
pub const MAX_WINDOWS: u64 = 10_000;

/// How long the leader waits for in-flight aggregation of a collected interval.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn purpose_of(p: i32) -> Result<BudgetPurpose> {
    BudgetPurpose::from_proto(p).map_err(Error::InvalidRequest)
}

fn checked_interval(
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

fn collection_id(b: &[u8]) -> Result<[u8; 16]> {
    if b.is_empty() {
        return Ok(rand::random());
    }
    b.try_into().map_err(|_| {
        Error::InvalidRequest(format!("collection_id must be 16 bytes, not {}", b.len()))
    })
}

fn hash(parts: &[&[u8]]) -> [u8; 32] {
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
fn noisy_sealed_share(
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
fn batch_rule(task: &TaskEntry, interval: &Interval, purpose: BudgetPurpose) -> BatchRule {
    BatchRule {
        batch: (interval.start(), interval.duration()),
        purpose,
        max_collections: task.config.max_collections_per_batch(),
    }
}

/// The error of a refused collection.
fn refusal_error(task: &TaskEntry, purpose: BudgetPurpose, r: CollectRefusal) -> Error {
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
    }
}

/// Checks the batch rules of a collection before anything is closed or spent; a refusal is
/// audited.
fn check_batch_rules(
    shared: &Shared,
    task: &TaskEntry,
    actor: &str,
    action: &str,
    windows: &[Time],
    rule: &BatchRule,
    purpose: BudgetPurpose,
) -> Result<()> {
    match shared.store.check_batch(&task.config.id(), windows, rule)? {
        None => Ok(()),
        Some(r) => {
            let e = refusal_error(task, purpose, r);
            shared.collect_refusals.record(
                shared,
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
fn check_budget(
    shared: &Shared,
    task: &TaskEntry,
    purpose: BudgetPurpose,
    windows: &[Time],
) -> Result<u64> {
    let eps = task.config.epsilon_per_collection();
    let budget = task.config.budget_for(purpose).micros();
    let spent = shared.store.spent(&task.config.id(), purpose, windows)?;
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
fn commit(
    shared: &Shared,
    task: &TaskEntry,
    cid: &[u8; 16],
    purpose: BudgetPurpose,
    interval: &Interval,
    windows: &[Time],
    batch: &BatchAggregation,
    request_hash: [u8; 32],
    answer: &[u8],
) -> Result<()> {
    let eps = task.config.epsilon_per_collection();
    let r = shared.store.commit_collection(&CollectionCommit {
        task: &task.config.id(),
        collection_id: cid,
        rule: batch_rule(task, interval, purpose),
        windows,
        summed: (batch.report_count, batch.checksum),
        epsilon_micros: eps.micros(),
        budget_micros: task.config.budget_for(purpose).micros(),
        request_hash,
        answer,
    })?;
    match r {
        Ok(_) => {
            shared.set_collected(&task.config.id(), windows, true);
            Ok(())
        }
        Err(r) => Err(refusal_error(task, purpose, r)),
    }
}

/// The audit entry of a collection that spent budget.
fn spend_event(
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

/// The helper's `GetAggregateShare`.
pub async fn helper_share(
    shared: &Shared,
    req: pb::AggregateShareRequest,
) -> Result<pb::AggregateShareResponse> {
    let task_id =
        TaskId::try_from(req.task_id.as_ref()).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    let task = shared.task(&task_id).ok_or(Error::UnknownTask(task_id))?;
    let (interval, windows) = checked_interval(&task, req.interval.as_ref(), shared.clock.now())?;
    let purpose = purpose_of(req.purpose)?;
    let cid: [u8; 16] = req
        .collection_id
        .as_ref()
        .try_into()
        .map_err(|_| Error::InvalidRequest("collection_id must be 16 bytes".into()))?;
    let request_hash = hash(&[&pb::AggregateShareRequest {
        purpose: purpose.to_proto() as i32,
        ..req.clone()
    }
    .encode_to_vec()]);
    let _guard = shared.collect_lock.lock().await;
    if let Some((h, answer)) = shared.store.collection(&task_id, &cid)? {
        if h != request_hash {
            return Err(Error::JobConflict(format!(
                "collection {} ran with another request",
                hex::encode(cid)
            )));
        }
        return pb::AggregateShareResponse::decode(answer.as_slice())
            .map_err(|e| Error::corrupt("collection answer", e));
    }
    let rule = batch_rule(&task, &interval, purpose);
    check_batch_rules(
        shared,
        &task,
        "leader",
        "aggregate_share",
        &windows,
        &rule,
        purpose,
    )?;
    let batch = shared
        .store
        .sum_batches(&task_id, &windows, task.config.output_len())?;
    let leader_checksum = ReportIdChecksum::from(
        <[u8; 32]>::try_from(req.checksum.as_ref())
            .map_err(|_| Error::InvalidRequest("checksum must be 32 bytes".into()))?,
    );
    if batch.report_count != req.report_count || batch.checksum != leader_checksum {
        tracing::error!(
            task = %task_id,
            start = interval.start().as_secs(),
            duration = interval.duration(),
            helper_count = batch.report_count,
            leader_count = req.report_count,
            "the leader and the helper aggregated different reports; refusing the collection"
        );
        shared.collect_refusals.record(
            shared,
            AuditEvent {
                actor: "leader".into(),
                action: "aggregate_share".into(),
                tenant: task.config.tenant().into(),
                task: task_id.to_string(),
                outcome: "refused: the aggregators aggregated different reports".into(),
                detail: format!(
                    "helper {} reports, leader {}",
                    batch.report_count, req.report_count
                ),
            },
        );
        shared.store.flush().await?;
        // No counts in the answer: it reaches the collector. Both audit trails have them.
        return Err(Error::Mismatch(
            "the helper and the leader aggregated different reports (report counts or report-id \
             checksums differ; both operators' audit trails and logs have the numbers)"
                .into(),
        ));
    }
    if batch.report_count < task.config.min_batch_size() {
        tracing::info!(task = %task_id, reports = batch.report_count, "refused a collection under min_batch_size");
        return Err(Error::BatchTooSmall {
            count: batch.report_count,
            min: task.config.min_batch_size(),
        });
    }
    let left = check_budget(shared, &task, purpose, &windows)?;
    let answer = pb::AggregateShareResponse {
        encrypted_aggregate_share: Some(noisy_sealed_share(
            &task,
            Role::Helper,
            &interval,
            &cid,
            &batch,
        )?),
    };
    commit(
        shared,
        &task,
        &cid,
        purpose,
        &interval,
        &windows,
        &batch,
        request_hash,
        &answer.encode_to_vec(),
    )?;
    shared.audit(spend_event(
        "leader".into(),
        "aggregate_share",
        &task,
        &interval,
        batch.report_count,
        purpose.name(),
        left,
    ));
    shared.store.flush().await?;
    tracing::info!(
        task = %task_id,
        start = interval.start().as_secs(),
        duration = interval.duration(),
        reports = batch.report_count,
        purpose = purpose.name(),
        epsilon = %task.config.epsilon_per_collection(),
        "released a noisy aggregate share"
    );
    Ok(answer)
}

/// The leader's `Collection` service.
#[derive(Clone, Debug)]
pub struct CollectionService {
    shared: Shared,
    helper: HelperClient,
}

impl CollectionService {
    /// A service over `shared` that asks `helper` for its shares.
    pub fn new(shared: Shared, helper: HelperClient) -> Self {
        Self { shared, helper }
    }

    /// The answer to every request that names an unknown task or presents a token that is not
    /// the task's tenant's: one answer, so task ids of other tenants cannot be probed.
    fn not_yours(task_id: &TaskId) -> Error {
        Error::Unauthenticated(format!("unknown task {task_id} or wrong collector token"))
    }

    /// The task, if it is provisioned and `token` is its tenant's collector token; otherwise
    /// the same refusal for every case (audited with the real reason).
    fn authorized_task(
        &self,
        token: Option<&str>,
        task_id: &TaskId,
        action: &str,
    ) -> Result<std::sync::Arc<TaskEntry>> {
        let refuse = |actor: String, tenant: &str, why: &str| {
            self.shared.collect_refusals.record(
                &self.shared,
                AuditEvent {
                    actor,
                    action: action.into(),
                    tenant: tenant.into(),
                    task: task_id.to_string(),
                    outcome: format!("refused: {why}"),
                    detail: String::new(),
                },
            );
        };
        let Some(token) = token else {
            refuse("unknown".into(), "", "no collector token");
            return Err(Error::Unauthenticated(
                "missing collector token: send \"authorization: Bearer <tenant token>\"".into(),
            ));
        };
        let Some(task) = self.shared.task(task_id) else {
            refuse("unknown".into(), "", "unknown task");
            return Err(Self::not_yours(task_id));
        };
        let tenant = task.config.tenant();
        if let Some(expected) = self.shared.store.tenant_token_hash(tenant)?
            && token_matches(token, &expected)
        {
            return Ok(task);
        }
        match self.shared.store.tenant_of_token_hash(&token_hash(token))? {
            Some(other) => {
                refuse(format!("collector:{other}"), tenant, "cross-tenant request");
                tracing::warn!(task = %task_id, owner = tenant, requester = %other, "refused a cross-tenant collection");
            }
            None => {
                refuse("unknown".into(), tenant, "wrong collector token");
                tracing::warn!(task = %task_id, "refused a collection with a wrong token");
            }
        }
        Err(Self::not_yours(task_id))
    }

    async fn collect(
        &self,
        token: Option<&str>,
        req: pb::CollectRequest,
    ) -> Result<pb::CollectResponse> {
        let shared = &self.shared;
        let task_id = TaskId::try_from(req.task_id.as_ref())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let task = self.authorized_task(token, &task_id, "collect")?;
        let (interval, windows) =
            checked_interval(&task, req.interval.as_ref(), shared.clock.now())?;
        let now = shared.clock.now();
        if interval.end() > now {
            return Err(Error::NotReady(format!(
                "the interval ends at {}, which is still {} s away; collect closed windows only",
                interval.end().as_secs(),
                interval.end().as_secs() - now.as_secs()
            )));
        }
        let purpose = purpose_of(req.purpose)?;
        let cid = collection_id(&req.collection_id)?;
        let request_hash = hash(&[
            task_id.as_bytes(),
            &interval.start().as_secs().to_be_bytes(),
            &interval.duration().to_be_bytes(),
            &[purpose.code()],
        ]);

        let _guard = shared.collect_lock.lock().await;
        if let Some((h, answer)) = shared.store.collection(&task_id, &cid)? {
            if h != request_hash {
                return Err(Error::JobConflict(format!(
                    "collection {} ran with another request",
                    hex::encode(cid)
                )));
            }
            return pb::CollectResponse::decode(answer.as_slice())
                .map_err(|e| Error::corrupt("collection answer", e));
        }
        // Cheap checks first: nothing is closed or spent if they fail.
        let actor = format!("collector:{}", task.config.tenant());
        let rule = batch_rule(&task, &interval, purpose);
        check_batch_rules(shared, &task, &actor, "collect", &windows, &rule, purpose)?;
        let min = task.config.min_batch_size();
        let expected = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())?
            .report_count
            + shared.store.pending_in(&task_id, &windows)?;
        if expected < min {
            tracing::info!(task = %task_id, reports = expected, "refused a collection under min_batch_size");
            return Err(Error::BatchTooSmall {
                count: expected,
                min,
            });
        }
        check_budget(shared, &task, purpose, &windows)?;

        // Close the windows, then wait for reports of them still in aggregation jobs.
        let newly: Vec<Time> = windows
            .iter()
            .copied()
            .filter(|w| !shared.is_collected(&task_id, *w))
            .collect();
        shared.store.mark_collected(&task_id, &newly, true)?;
        shared.set_collected(&task_id, &newly, true);
        let reopen = |e: Error| -> Result<pb::CollectResponse> {
            shared.store.mark_collected(&task_id, &newly, false)?;
            shared.set_collected(&task_id, &newly, false);
            Err(e)
        };
        let start = Instant::now();
        loop {
            let pending = shared.store.pending_in(&task_id, &windows)?;
            if pending == 0 {
                break;
            }
            if start.elapsed() > DRAIN_TIMEOUT {
                tracing::warn!(task = %task_id, pending, "collection gave up waiting for aggregation");
                return reopen(Error::NotReady(
                    "reports of the interval are still being aggregated; retry later".into(),
                ));
            }
            shared.new_reports.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let batch = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())?;
        if batch.report_count < min {
            tracing::info!(task = %task_id, reports = batch.report_count, "refused a collection under min_batch_size");
            return reopen(Error::BatchTooSmall {
                count: batch.report_count,
                min,
            });
        }

        let helper_req = pb::AggregateShareRequest {
            task_id: task_id.as_bytes().to_vec().into(),
            collection_id: cid.to_vec().into(),
            interval: Some((&interval).into()),
            report_count: batch.report_count,
            checksum: batch.checksum.as_bytes().to_vec().into(),
            purpose: purpose.to_proto() as i32,
        };
        let helper_share = self
            .helper
            .clone()
            .get_aggregate_share(helper_req)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::FailedPrecondition => {
                    Error::Mismatch(format!("the helper refused: {}", s.message()))
                }
                _ => Error::Peer(s),
            })?
            .into_inner()
            .encrypted_aggregate_share
            .ok_or_else(|| Error::Peer(Status::internal("the helper sent no aggregate share")))?;

        let left = check_budget(shared, &task, purpose, &windows)?;
        let answer = pb::CollectResponse {
            interval: Some((&interval).into()),
            leader_encrypted_share: Some(noisy_sealed_share(
                &task,
                Role::Leader,
                &interval,
                &cid,
                &batch,
            )?),
            helper_encrypted_share: Some(helper_share),
            epsilon_micro: task.config.aggregate_epsilon().micros(),
            sensitivity: task.config.sensitivity(),
            count_epsilon_micro: task.config.count_epsilon().map_or(0, Epsilon::micros),
            count_sensitivity: task.config.reports_per_instance(),
            budget_left_micro: left,
        };
        commit(
            shared,
            &task,
            &cid,
            purpose,
            &interval,
            &windows,
            &batch,
            request_hash,
            &answer.encode_to_vec(),
        )?;
        shared.audit(spend_event(
            actor,
            "collect",
            &task,
            &interval,
            batch.report_count,
            purpose.name(),
            left,
        ));
        shared.store.flush().await?;
        tracing::info!(
            task = %task_id,
            start = interval.start().as_secs(),
            duration = interval.duration(),
            reports = batch.report_count,
            purpose = purpose.name(),
            epsilon = %task.config.epsilon_per_collection(),
            "released a noisy collection"
        );
        Ok(answer)
    }

    /// The noisy count of a collected batch's late reports (see `CollectLateCount`).
    async fn late_count(
        &self,
        token: Option<&str>,
        req: pb::LateCountRequest,
    ) -> Result<pb::LateCountResponse> {
        let shared = &self.shared;
        let task_id = TaskId::try_from(req.task_id.as_ref())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let task = self.authorized_task(token, &task_id, "late_count")?;
        let now = shared.clock.now();
        let (interval, windows) = checked_interval(&task, req.interval.as_ref(), now)?;
        let Some(eps) = task.config.count_epsilon() else {
            return Err(Error::WrongRole(format!(
                "task {task_id} releases no counts (count_epsilon_percent = 0)"
            )));
        };
        let batch = (interval.start(), interval.duration());
        if shared.store.batch_collections(&task_id, batch)? == (0, 0) {
            return Err(Error::WrongRole(format!(
                "the interval {}+{} s was not collected as a batch; late reports are counted per collected batch",
                interval.start().as_secs(),
                interval.duration()
            )));
        }
        // Until the report expiry (and the clock skew) has passed the batch's end, a late
        // report can still arrive and would change the count after its release.
        let final_at = interval
            .end()
            .add_secs(task.config.report_expiry_s())
            .add_secs(shared.config.clock_skew_s);
        if now < final_at {
            return Err(Error::NotReady(format!(
                "late reports of this batch can arrive until {}; ask again then",
                final_at.as_secs()
            )));
        }
        let key = {
            let h = hash(&[
                b"late count",
                task_id.as_bytes(),
                &interval.start().as_secs().to_be_bytes(),
                &interval.duration().to_be_bytes(),
            ]);
            let mut k = [0u8; 16];
            k.copy_from_slice(&h[..16]);
            k
        };
        let _guard = shared.collect_lock.lock().await;
        if let Some((_, answer)) = shared.store.collection(&task_id, &key)? {
            return pb::LateCountResponse::decode(answer.as_slice())
                .map_err(|e| Error::corrupt("late count answer", e));
        }
        let late = shared.store.late_in(&task_id, &windows)?;
        let sensitivity = task.config.reports_per_instance();
        let noise = hush_protocol::dp::count_noise(sensitivity, eps)
            .map_err(|e| Error::config(format!("sampling the count noise failed: {e}")))?;
        let mut answer = pb::LateCountResponse {
            interval: Some((&interval).into()),
            noisy_late_reports: i64::try_from(late)
                .unwrap_or(i64::MAX)
                .saturating_add(noise),
            epsilon_micro: eps.micros(),
            sensitivity,
            budget_left_micro: 0,
        };
        let routine = task.config.budget_for(BudgetPurpose::Routine).micros();
        let spent = shared
            .store
            .spent(&task_id, BudgetPurpose::Routine, &windows)?;
        answer.budget_left_micro = spent
            .iter()
            .map(|s| routine.saturating_sub(*s).saturating_sub(eps.micros()))
            .min()
            .unwrap_or(0);
        let r = shared.store.commit_late_count(
            &task_id,
            &key,
            &windows,
            eps.micros(),
            routine,
            &answer.encode_to_vec(),
        )?;
        if let Err(r) = r {
            return Err(refusal_error(&task, BudgetPurpose::Routine, r));
        }
        shared.audit(AuditEvent {
            actor: format!("collector:{}", task.config.tenant()),
            action: "late_count".into(),
            tenant: task.config.tenant().into(),
            task: task_id.to_string(),
            outcome: "ok".into(),
            detail: format!(
                "interval {}+{} s, {late} late reports, spent ε {eps} of the routine budget",
                interval.start().as_secs(),
                interval.duration()
            ),
        });
        shared.store.flush().await?;
        Ok(answer)
    }
}

#[tonic::async_trait]
impl Collection for CollectionService {
    async fn collect(
        &self,
        request: Request<pb::CollectRequest>,
    ) -> std::result::Result<Response<pb::CollectResponse>, Status> {
        let token = bearer_token(&request).map(str::to_owned);
        Ok(Response::new(
            self.collect(token.as_deref(), request.into_inner()).await?,
        ))
    }

    async fn collect_late_count(
        &self,
        request: Request<pb::LateCountRequest>,
    ) -> std::result::Result<Response<pb::LateCountResponse>, Status> {
        let token = bearer_token(&request).map(str::to_owned);
        Ok(Response::new(
            self.late_count(token.as_deref(), request.into_inner())
                .await?,
        ))
    }
}
