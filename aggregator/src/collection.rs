//! Collection: the leader's `Collection` service for tenants' collectors, and the helper's
//! answer to `GetAggregateShare`.
//!
//! The leader authenticates the collector with its tenant's token, checks the interval, the
//! report count against `min_batch_size` and its budget ledger, closes the interval's windows
//! (late reports are then refused), waits until no report of them is still being aggregated, and
//! asks the helper for its share of the same windows, passing the report count and the checksum
//! of report ids. The helper refuses if its own count or checksum differ. Each side adds
//! discrete Laplace noise at the task's ε to its own aggregate share, seals it to the collector,
//! and in one transaction spends the budget of every window and stores its answer, so a retry
//! with the same collection id gets the same answer (the same noise) and spends nothing more.

use std::time::{Duration, Instant};

use hush_protocol::auth::{bearer_token, token_hash, token_matches};
use hush_protocol::collect::seal_aggregate_share;
use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::collection_server::Collection;
use hush_protocol::{Epsilon, Interval, ReportIdChecksum, Role, TaskId, Time};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::leader::HelperClient;
use crate::shared::Shared;
use crate::store::{BatchAggregation, CollectionCommit};
use crate::tasks::TaskEntry;

/// How long the leader waits for in-flight aggregation of a collected interval.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

fn purpose_code(p: i32) -> Result<(u8, &'static str)> {
    match pb::BudgetPurpose::try_from(p) {
        Ok(pb::BudgetPurpose::Unspecified | pb::BudgetPurpose::Routine) => Ok((0, "routine")),
        Ok(pb::BudgetPurpose::Alert) => Ok((1, "alert")),
        Err(_) => Err(Error::InvalidRequest(format!("unknown budget purpose {p}"))),
    }
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
    let windows: Vec<Time> = i.buckets(precision).collect();
    if windows.len() > 10_000 {
        return Err(Error::InvalidRequest(format!(
            "the interval spans {} windows; collect at most 10000 at once",
            windows.len()
        )));
    }
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

/// Adds noise to `batch`'s share at the task's ε and seals it to the collector.
fn noisy_sealed_share(
    task: &TaskEntry,
    role: Role,
    interval: &Interval,
    batch: &BatchAggregation,
) -> Result<pb::HpkeCiphertext> {
    let eps = task.config.epsilon_per_collection();
    let mut share = batch.share.clone();
    task.vdaf
        .add_noise(eps, &mut share, batch.report_count as usize)
        .map_err(|e| Error::corrupt("aggregate share", e))?;
    let ct = seal_aggregate_share(
        task.config.collector_hpke_config(),
        role,
        &task.config.id(),
        interval,
        batch.report_count,
        eps,
        &share,
    )
    .map_err(|e| Error::Config(format!("sealing to the task's collector key failed: {e}")))?;
    Ok((&ct).into())
}

/// Checks the ledger without spending: the smallest ε left over the windows, or the error.
fn check_budget(
    shared: &Shared,
    task: &TaskEntry,
    purpose: (u8, &'static str),
    windows: &[Time],
) -> Result<u64> {
    let eps = task.config.epsilon_per_collection();
    let budget = task.config.budget_for(purpose.0 == 1).micros();
    let spent = shared.store.spent(&task.config.id(), purpose.0, windows)?;
    let mut min_left = u64::MAX;
    for (w, s) in windows.iter().zip(spent) {
        let left = budget.saturating_sub(s);
        if left < eps.micros() {
            return Err(Error::OverBudget {
                window: *w,
                left: Epsilon::from_micros(left),
                needed: eps,
                purpose: purpose.1,
            });
        }
        min_left = min_left.min(left - eps.micros());
    }
    Ok(min_left)
}

/// Spends the budget, stores the answer and closes the windows in one transaction.
fn commit(
    shared: &Shared,
    task: &TaskEntry,
    cid: &[u8; 16],
    purpose: (u8, &'static str),
    windows: &[Time],
    request_hash: [u8; 32],
    answer: &[u8],
) -> Result<()> {
    let eps = task.config.epsilon_per_collection();
    let r = shared.store.commit_collection(&CollectionCommit {
        task: &task.config.id(),
        collection_id: cid,
        purpose: purpose.0,
        windows,
        epsilon_micros: eps.micros(),
        budget_micros: task.config.budget_for(purpose.0 == 1).micros(),
        request_hash,
        answer,
    })?;
    match r {
        Ok(_) => {
            shared.set_collected(&task.config.id(), windows, true);
            Ok(())
        }
        Err(over) => Err(Error::OverBudget {
            window: over.window,
            left: Epsilon::from_micros(over.left_micros),
            needed: eps,
            purpose: purpose.1,
        }),
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
    let purpose = purpose_code(req.purpose)?;
    let cid: [u8; 16] = req
        .collection_id
        .as_ref()
        .try_into()
        .map_err(|_| Error::InvalidRequest("collection_id must be 16 bytes".into()))?;
    let request_hash = hash(&[&pb::AggregateShareRequest {
        purpose: i32::from(purpose.0) + 1,
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
        shared.audit(AuditEvent {
            actor: "leader".into(),
            action: "aggregate_share".into(),
            tenant: task.config.tenant().into(),
            task: task_id.to_string(),
            outcome: "refused: the aggregators aggregated different reports".into(),
            detail: format!(
                "helper {} reports, leader {}",
                batch.report_count, req.report_count
            ),
        });
        shared.store.flush().await?;
        return Err(Error::Mismatch(format!(
            "the helper aggregated {} reports (checksum {}) but the leader {} (checksum {})",
            batch.report_count,
            hex::encode(batch.checksum.as_bytes()),
            req.report_count,
            hex::encode(leader_checksum.as_bytes())
        )));
    }
    if batch.report_count < task.config.min_batch_size() {
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
            &batch,
        )?),
    };
    commit(
        shared,
        &task,
        &cid,
        purpose,
        &windows,
        request_hash,
        &answer.encode_to_vec(),
    )?;
    shared.audit(spend_event(
        "leader".into(),
        "aggregate_share",
        &task,
        &interval,
        batch.report_count,
        purpose.1,
        left,
    ));
    shared.store.flush().await?;
    tracing::info!(
        task = %task_id,
        start = interval.start().as_secs(),
        duration = interval.duration(),
        reports = batch.report_count,
        purpose = purpose.1,
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

    /// Only the task's tenant's collector may collect it.
    fn authorize(&self, token: Option<&str>, task: &TaskEntry) -> Result<()> {
        let tenant = task.config.tenant();
        let refuse = |actor: String, why: &str| {
            self.shared.audit(AuditEvent {
                actor,
                action: "collect".into(),
                tenant: tenant.into(),
                task: task.config.id().to_string(),
                outcome: format!("refused: {why}"),
                detail: String::new(),
            });
        };
        let Some(token) = token else {
            refuse("unknown".into(), "no collector token");
            return Err(Error::Unauthenticated(
                "missing collector token: send \"authorization: Bearer <tenant token>\"".into(),
            ));
        };
        if let Some(expected) = self.shared.store.tenant_token_hash(tenant)?
            && token_matches(token, &expected)
        {
            return Ok(());
        }
        match self.shared.store.tenant_of_token_hash(&token_hash(token))? {
            Some(other) => {
                refuse(format!("collector:{other}"), "cross-tenant request");
                tracing::warn!(task = %task.config.id(), owner = tenant, requester = %other, "refused a cross-tenant collection");
                Err(Error::PermissionDenied(format!(
                    "task {} belongs to another tenant",
                    task.config.id()
                )))
            }
            None => {
                refuse("unknown".into(), "wrong collector token");
                tracing::warn!(task = %task.config.id(), "refused a collection with a wrong token");
                Err(Error::Unauthenticated("wrong collector token".into()))
            }
        }
    }

    async fn collect(
        &self,
        token: Option<&str>,
        req: pb::CollectRequest,
    ) -> Result<pb::CollectResponse> {
        let shared = &self.shared;
        let task_id = TaskId::try_from(req.task_id.as_ref())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let Some(task) = shared.task(&task_id) else {
            shared.audit(AuditEvent {
                actor: "unknown".into(),
                action: "collect".into(),
                task: task_id.to_string(),
                outcome: "refused: unknown task".into(),
                ..AuditEvent::default()
            });
            // Same answer as a wrong token, so task ids of other tenants cannot be probed.
            return Err(Error::Unauthenticated(format!(
                "unknown task {task_id} or wrong collector token"
            )));
        };
        self.authorize(token, &task)?;
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
        let purpose = purpose_code(req.purpose)?;
        let cid = collection_id(&req.collection_id)?;
        let request_hash = hash(&[
            task_id.as_bytes(),
            &interval.start().as_secs().to_be_bytes(),
            &interval.duration().to_be_bytes(),
            &[purpose.0],
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
        let min = task.config.min_batch_size();
        let expected = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())?
            .report_count
            + shared.store.pending_in(&task_id, &windows)?;
        if expected < min {
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
                return reopen(Error::NotReady(format!(
                    "{pending} reports of the interval are still being aggregated; retry later"
                )));
            }
            shared.new_reports.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let batch = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())?;
        if batch.report_count < min {
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
            purpose: i32::from(purpose.0) + 1,
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
            report_count: batch.report_count,
            leader_encrypted_share: Some(noisy_sealed_share(
                &task,
                Role::Leader,
                &interval,
                &batch,
            )?),
            helper_encrypted_share: Some(helper_share),
            epsilon_micro: task.config.epsilon_per_collection().micros(),
            sensitivity: task.config.sensitivity(),
            budget_left_micro: left,
        };
        commit(
            shared,
            &task,
            &cid,
            purpose,
            &windows,
            request_hash,
            &answer.encode_to_vec(),
        )?;
        shared.audit(spend_event(
            format!("collector:{}", task.config.tenant()),
            "collect",
            &task,
            &interval,
            batch.report_count,
            purpose.1,
            left,
        ));
        shared.store.flush().await?;
        tracing::info!(
            task = %task_id,
            start = interval.start().as_secs(),
            duration = interval.duration(),
            reports = batch.report_count,
            purpose = purpose.1,
            epsilon = %task.config.epsilon_per_collection(),
            "released a noisy collection"
        );
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
}
