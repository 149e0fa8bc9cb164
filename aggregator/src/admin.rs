//! The operator's API (admin bearer token) and HPKE config discovery (public).

use hush_protocol::proto::v1::admin_server::Admin;
use hush_protocol::proto::v1::{self as pb, ReasonCount, RejectReason};
use hush_protocol::{Role, TaskId};
use tonic::{Request, Response, Status};

use crate::audit::AuditEvent;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{GLOBAL_SCOPE, Stat};
use crate::tasks::TaskEntry;
use hush_server::auth::token_hash;

/// The `Admin` service.
#[derive(Clone, Debug)]
pub struct AdminService {
    shared: Shared,
}

impl AdminService {
    /// A service over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    async fn create_task(&self, req: pb::CreateTaskRequest) -> Result<bool> {
        let entry = TaskEntry::from_request(&req)?;
        if entry.role != self.shared.role {
            return Err(Error::WrongRole(format!(
                "this aggregator is the {}; provision the task with role \"{}\" here",
                self.shared.role, self.shared.role
            )));
        }
        if entry.config.packet_size() > self.shared.config.max_packet_size {
            return Err(Error::InvalidRequest(format!(
                "the task's packet_size {} is above this aggregator's max_packet_size {}; raise \
                 max_packet_size in its config (request size limits follow from it)",
                entry.config.packet_size(),
                self.shared.config.max_packet_size
            )));
        }
        let id = entry.config.id();
        let event = |outcome: &str| AuditEvent {
            actor: "admin".into(),
            action: "task.create".into(),
            tenant: entry.config.tenant().into(),
            task: id.to_string(),
            outcome: outcome.into(),
            detail: format!(
                "name {:?}, kind {:?}, ε {} per collection, budget {}",
                entry.config.name(),
                entry.config.kind(),
                entry.config.epsilon_per_collection(),
                entry.config.epsilon_budget()
            ),
        };
        let existing = self.shared.store.put_task(&id, entry.encode()).await?;
        if let Some(prev) = existing {
            let prev = TaskEntry::decode(&prev)?;
            if prev.same_as(&entry) {
                self.shared.audit(event("unchanged"));
                return Ok(false);
            }
            self.shared
                .audit(event("refused: another task exists under this id"));
            return Err(Error::TaskConflict(id));
        }
        self.shared.audit(event("ok"));
        self.shared.store.flush().await?;
        tracing::info!(task = %id, tenant = entry.config.tenant(), kind = ?entry.config.kind(), "provisioned a task");
        self.shared.tasks.insert(entry);
        Ok(true)
    }

    async fn stats(&self, task_id: &[u8]) -> Result<pb::TaskStats> {
        let (scope, pending) = if task_id.is_empty() {
            (GLOBAL_SCOPE, 0)
        } else {
            let id = TaskId::try_from(task_id).map_err(|e| Error::InvalidRequest(e.to_string()))?;
            self.shared.task(&id).ok_or(Error::UnknownTask(id))?;
            let pending = if self.shared.role == Role::Leader {
                self.shared.store.pending_count(&id).await?
            } else {
                0
            };
            (*id.as_bytes(), pending)
        };
        let counters = self.shared.store.stats(&scope).await?;
        let get = |s: Stat| counters.get(&s).copied().unwrap_or(0);
        Ok(pb::TaskStats {
            task_id: task_id.to_vec().into(),
            reports_accepted: get(Stat::Accepted),
            reports_aggregated: get(Stat::Aggregated),
            reports_pending: pending,
            rejected: counters
                .iter()
                .filter_map(|(s, n)| match s {
                    Stat::Rejected(r) => Some(ReasonCount {
                        reason: *r as i32,
                        count: *n,
                    }),
                    _ => None,
                })
                .collect(),
            reports_late: get(Stat::Rejected(RejectReason::BatchCollected)),
        })
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_task(
        &self,
        request: Request<pb::CreateTaskRequest>,
    ) -> std::result::Result<Response<pb::CreateTaskResponse>, Status> {
        let created = self.create_task(request.into_inner()).await?;
        Ok(Response::new(pb::CreateTaskResponse { created }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> std::result::Result<Response<pb::ListTasksResponse>, Status> {
        let tenant = request.into_inner().tenant;
        let tasks = self
            .shared
            .tasks
            .all()
            .iter()
            .filter(|t| tenant.is_empty() || t.config.tenant() == tenant)
            .map(|t| (&t.config).into())
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn get_task_stats(
        &self,
        request: Request<pb::GetTaskStatsRequest>,
    ) -> std::result::Result<Response<pb::TaskStats>, Status> {
        Ok(Response::new(
            self.stats(&request.into_inner().task_id).await?,
        ))
    }

    async fn rotate_hpke_key(
        &self,
        _request: Request<pb::RotateHpkeKeyRequest>,
    ) -> std::result::Result<Response<pb::HpkeConfigList>, Status> {
        let configs = self
            .shared
            .keys
            .rotate_off_thread()
            .await
            .map_err(Error::from)?;
        self.shared.audit(AuditEvent {
            actor: "admin".into(),
            action: "key.rotate".into(),
            outcome: "ok".into(),
            detail: format!(
                "published HPKE config ids {:?}",
                configs.iter().map(|c| c.id()).collect::<Vec<_>>()
            ),
            ..AuditEvent::default()
        });
        self.shared.store.flush().await?;
        Ok(Response::new(pb::HpkeConfigList {
            configs: configs.iter().map(Into::into).collect(),
        }))
    }

    async fn set_tenant_token(
        &self,
        request: Request<pb::SetTenantTokenRequest>,
    ) -> std::result::Result<Response<pb::SetTenantTokenResponse>, Status> {
        let req = request.into_inner();
        if req.tenant.is_empty() || req.token.len() < 16 {
            return Err(Status::invalid_argument(
                "give a tenant name and a token of at least 16 characters",
            ));
        }
        self.shared
            .store
            .set_tenant_token_hash(&req.tenant, token_hash(&req.token))
            .await?;
        self.shared.audit(AuditEvent {
            actor: "admin".into(),
            action: "tenant.token".into(),
            tenant: req.tenant.clone(),
            outcome: "ok".into(),
            detail: "set the collector token (its hash is stored)".into(),
            ..AuditEvent::default()
        });
        self.shared.store.flush().await?;
        tracing::info!(tenant = %req.tenant, "set a tenant's collector token");
        Ok(Response::new(pb::SetTenantTokenResponse {}))
    }

    async fn list_hpke_keys(
        &self,
        _request: Request<pb::ListHpkeKeysRequest>,
    ) -> std::result::Result<Response<pb::HpkeConfigList>, Status> {
        Ok(Response::new(self.shared.keys.config_list()))
    }
}
