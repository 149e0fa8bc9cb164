//! The leader's `Collection` service for tenants' collectors (the helper's side is
//! [`crate::helper::share`]).
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

use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::collection_server::Collection;
use hush_protocol::{BudgetPurpose, Epsilon, Role, TaskId, Time};
use hush_server::auth::{bearer_token, token_hash, token_matches};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::tasks::TaskEntry;

use crate::checks::*;
use crate::leader::HelperClient;

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
    async fn authorized_task(
        &self,
        token: Option<&str>,
        task_id: &TaskId,
        action: &str,
    ) -> Result<std::sync::Arc<TaskEntry>> {
        let refuse = |actor: String, tenant: &str, why: &str| {
            self.shared.collect_refusals.record(
                &self.shared.trail(),
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
        if let Some(expected) = self.shared.store.tenant_token_hash(tenant).await?
            && token_matches(token, &expected)
        {
            return Ok(task);
        }
        match self
            .shared
            .store
            .tenant_of_token_hash(&token_hash(token))
            .await?
        {
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
        let task = self.authorized_task(token, &task_id, "collect").await?;
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
        if let Some((h, answer)) = shared.store.collection(&task_id, &cid).await? {
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
        check_batch_rules(shared, &task, &actor, "collect", &windows, &rule, purpose).await?;
        let min = task.config.min_batch_size();
        let expected = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())
            .await?
            .report_count
            + shared.store.pending_in(&task_id, &windows).await?;
        if expected < min {
            tracing::info!(task = %task_id, reports = expected, "refused a collection under min_batch_size");
            return Err(Error::BatchTooSmall {
                count: expected,
                min,
            });
        }
        check_budget(shared, &task, purpose, &windows).await?;

        // Close the windows, then wait for reports of them still in aggregation jobs.
        let newly: Vec<Time> = windows
            .iter()
            .copied()
            .filter(|w| !shared.is_collected(&task_id, *w))
            .collect();
        shared.store.close_windows(&task_id, &newly).await?;
        shared.set_collected(&task_id, &newly, true);
        let reopen = async |e: Error| -> Result<pb::CollectResponse> {
            shared.store.reopen_windows(&task_id, &newly).await?;
            shared.set_collected(&task_id, &newly, false);
            Err(e)
        };
        let start = Instant::now();
        loop {
            let pending = shared.store.pending_in(&task_id, &windows).await?;
            if pending == 0 {
                break;
            }
            if start.elapsed() > DRAIN_TIMEOUT {
                tracing::warn!(task = %task_id, pending, "collection gave up waiting for aggregation");
                return reopen(Error::NotReady(
                    "reports of the interval are still being aggregated; retry later".into(),
                ))
                .await;
            }
            shared.leader.new_reports.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let batch = shared
            .store
            .sum_batches(&task_id, &windows, task.config.output_len())
            .await?;
        if batch.report_count < min {
            tracing::info!(task = %task_id, reports = batch.report_count, "refused a collection under min_batch_size");
            return reopen(Error::BatchTooSmall {
                count: batch.report_count,
                min,
            })
            .await;
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

        let left = check_budget(shared, &task, purpose, &windows).await?;
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
        if let Committed::Before(stored) = commit(
            shared,
            &task,
            &cid,
            purpose,
            &interval,
            &windows,
            &batch,
            request_hash,
            &answer.encode_to_vec(),
        )
        .await?
        {
            // The same request reached another replica first: its answer is the one.
            return pb::CollectResponse::decode(stored.as_slice())
                .map_err(|e| Error::corrupt("collection answer", e));
        }
        record_release(
            shared,
            actor,
            "collect",
            &task,
            &interval,
            batch.report_count,
            purpose,
            left,
            "collection",
        )
        .await?;
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
        let task = self.authorized_task(token, &task_id, "late_count").await?;
        let now = shared.clock.now();
        let (interval, windows) = checked_interval(&task, req.interval.as_ref(), now)?;
        let Some(eps) = task.config.count_epsilon() else {
            return Err(Error::WrongRole(format!(
                "task {task_id} releases no counts (count_epsilon_percent = 0)"
            )));
        };
        let batch = (interval.start(), interval.duration());
        if shared.store.batch_collections(&task_id, batch).await? == (0, 0) {
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
        if let Some((_, answer)) = shared.store.collection(&task_id, &key).await? {
            return pb::LateCountResponse::decode(answer.as_slice())
                .map_err(|e| Error::corrupt("late count answer", e));
        }
        let late = shared.store.late_in(&task_id, &windows).await?;
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
            .spent(&task_id, BudgetPurpose::Routine, &windows)
            .await?;
        answer.budget_left_micro = spent
            .iter()
            .map(|s| routine.saturating_sub(*s).saturating_sub(eps.micros()))
            .min()
            .unwrap_or(0);
        let r = shared
            .store
            .commit_late_count(
                &task_id,
                &key,
                &windows,
                eps.micros(),
                routine,
                &answer.encode_to_vec(),
            )
            .await?;
        if let Err(r) = r {
            return Err(refusal_error(&task, BudgetPurpose::Routine, r));
        }
        crate::checks::record_epsilon(
            &task,
            BudgetPurpose::Routine,
            eps.as_f64() * windows.len() as f64,
            answer.budget_left_micro,
        );
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

impl CollectionService {
    /// What is left of the budget over an interval's windows, per purpose; spends nothing.
    async fn budget(
        &self,
        token: Option<&str>,
        req: pb::GetBudgetRequest,
    ) -> Result<pb::BudgetAnswer> {
        let task_id = TaskId::try_from(req.task_id.as_ref())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let task = self.authorized_task(token, &task_id, "budget").await?;
        let (interval, windows) =
            checked_interval(&task, req.interval.as_ref(), self.shared.clock.now())?;
        let per = task.config.epsilon_per_collection().micros();
        let mut purposes = Vec::with_capacity(BudgetPurpose::ALL.len());
        for p in BudgetPurpose::ALL {
            let budget = task.config.budget_for(p).micros();
            let spent = self.shared.store.spent(&task_id, p, &windows).await?;
            let left = budget.saturating_sub(spent.into_iter().max().unwrap_or(0));
            purposes.push(pb::PurposeBudget {
                purpose: p.to_proto() as i32,
                budget_micro: budget,
                left_micro: left,
                epsilon_per_collection_micro: per,
                collections_left: left.checked_div(per).unwrap_or(0),
            });
        }
        Ok(pb::BudgetAnswer {
            interval: Some((&interval).into()),
            purposes,
        })
    }
}

#[tonic::async_trait]
impl Collection for CollectionService {
    async fn get_budget(
        &self,
        request: Request<pb::GetBudgetRequest>,
    ) -> std::result::Result<Response<pb::BudgetAnswer>, Status> {
        let token = bearer_token(&request).map(str::to_owned);
        Ok(Response::new(
            self.budget(token.as_deref(), request.into_inner()).await?,
        ))
    }

    async fn collect(
        &self,
        request: Request<pb::CollectRequest>,
    ) -> std::result::Result<Response<pb::CollectResponse>, Status> {
        let token = bearer_token(&request).map(str::to_owned);
        let (started, req) = (std::time::Instant::now(), request.into_inner());
        let purpose = req.purpose;
        let out = self.collect(token.as_deref(), req).await;
        crate::checks::record_collection(purpose, started, &out);
        Ok(Response::new(out?))
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
