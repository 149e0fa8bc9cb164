//! The shuffler's operator API (`Admin`, admin bearer token) and its public HPKE configs
//! (`HpkeKeys`). A shuffler knows of a task only its public configuration: packet size and
//! tenant. It never holds a verification key.

use hush_protocol::proto::v1 as pb;
use hush_protocol::proto::v1::admin_server::Admin;
use hush_protocol::proto::v1::{ReasonCount, RejectReason};
use hush_protocol::{TaskConfig, TaskId};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{NO_TASK, Stat};

/// The `Admin` service of a shuffler.
#[derive(Clone, Debug)]
pub struct AdminService {
    shared: Shared,
}

impl AdminService {
    /// A service over `node`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    async fn create_task(&self, req: pb::CreateTaskRequest) -> Result<bool> {
        if req.role != "shuffler" {
            return Err(Error::InvalidRequest(format!(
                "this is a shuffler; provision the task here with role \"shuffler\", not {:?}",
                req.role
            )));
        }
        if !req.vdaf_verify_key.is_empty() {
            return Err(Error::InvalidRequest(
                "a shuffler must never hold a task's verification key; send it only to the aggregators"
                    .into(),
            ));
        }
        let task = req
            .task
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("CreateTaskRequest.task is missing".into()))?;
        let config =
            TaskConfig::try_from(task).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let max = self.shared.config.limits.max_packet_size;
        if config.packet_size() > max {
            return Err(Error::InvalidRequest(format!(
                "the task's packet_size {} is above this shuffler's limits.max_packet_size {max}; \
                 raise it in its config (request size limits follow from it)",
                config.packet_size()
            )));
        }
        let id = config.id();
        let encoded = pb::TaskConfig::from(&config).encode_to_vec();
        if let Some(prev) = self.shared.store.task(&id)? {
            return if prev == encoded {
                Ok(false)
            } else {
                Err(Error::TaskConflict(id))
            };
        }
        self.shared.store.put_task(&id, encoded)?;
        self.shared.store.flush().await?;
        tracing::info!(task = %id, tenant = config.tenant(), packet_size = config.packet_size(), "provisioned a task");
        self.shared.tasks.insert(config);
        Ok(true)
    }

    fn stats(&self, task_id: &[u8]) -> Result<pb::TaskStats> {
        let scope = if task_id.is_empty() {
            NO_TASK
        } else {
            let id = TaskId::try_from(task_id).map_err(|e| Error::InvalidRequest(e.to_string()))?;
            if self.shared.tasks.get(&id).is_none() {
                return Err(Error::InvalidRequest(format!(
                    "task {id} is not provisioned at this shuffler"
                )));
            }
            *id.as_bytes()
        };
        let counters = self.shared.store.stats(&scope)?;
        let get = |s: Stat| counters.get(&s).copied().unwrap_or(0);
        Ok(pb::TaskStats {
            task_id: task_id.to_vec().into(),
            reports_accepted: get(Stat::Accepted),
            reports_aggregated: get(Stat::Forwarded),
            // Held: accepted, neither forwarded nor dropped past the report expiry.
            reports_pending: get(Stat::Accepted)
                .saturating_sub(get(Stat::Forwarded))
                .saturating_sub(get(Stat::Rejected(RejectReason::TooOld))),
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
            reports_late: 0,
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
        let mut tasks: Vec<TaskConfig> = self
            .shared
            .tasks
            .snapshot()
            .into_values()
            .filter(|t| tenant.is_empty() || t.tenant() == tenant)
            .collect();
        tasks.sort_by_key(|t| t.id());
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(Into::into).collect(),
        }))
    }

    /// For a shuffler, `reports_aggregated` counts packets forwarded and `reports_pending`
    /// packets held.
    async fn get_task_stats(
        &self,
        request: Request<pb::GetTaskStatsRequest>,
    ) -> std::result::Result<Response<pb::TaskStats>, Status> {
        Ok(Response::new(self.stats(&request.into_inner().task_id)?))
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
        Ok(Response::new(pb::HpkeConfigList {
            configs: configs.iter().map(Into::into).collect(),
        }))
    }

    async fn set_tenant_token(
        &self,
        _request: Request<pb::SetTenantTokenRequest>,
    ) -> std::result::Result<Response<pb::SetTenantTokenResponse>, Status> {
        Err(Status::failed_precondition(
            "shufflers have no collectors; set tenant tokens at the aggregators",
        ))
    }

    async fn list_hpke_keys(
        &self,
        _request: Request<pb::ListHpkeKeysRequest>,
    ) -> std::result::Result<Response<pb::HpkeConfigList>, Status> {
        Ok(Response::new(self.shared.keys.config_list()))
    }
}
