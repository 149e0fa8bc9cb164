//! Provisioned tasks: the public config, this aggregator's role in it, and the Prio3 verification
//! key shared with the other aggregator.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hush_protocol::proto::v1 as pb;
use hush_protocol::{Role, TaskConfig, TaskId, Vdaf, VerifyKey};
use prost::Message;

use crate::error::{Error, Result};

/// One task as this aggregator runs it.
#[derive(Clone, Debug)]
pub struct TaskEntry {
    /// The public configuration.
    pub config: TaskConfig,
    /// This aggregator's role in the task.
    pub role: Role,
    /// The verification key shared with the other aggregator.
    pub verify_key: VerifyKey,
    /// The task's Prio3 instance.
    pub vdaf: Vdaf,
}

impl TaskEntry {
    /// Checks and builds an entry.
    pub fn new(config: TaskConfig, role: Role, verify_key: VerifyKey) -> Result<Self> {
        let vdaf = Vdaf::new(&config).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        Ok(Self {
            config,
            role,
            verify_key,
            vdaf,
        })
    }

    /// From an admin request.
    pub fn from_request(req: &pb::CreateTaskRequest) -> Result<Self> {
        let task = req
            .task
            .as_ref()
            .ok_or_else(|| Error::InvalidRequest("CreateTaskRequest.task is missing".into()))?;
        let config =
            TaskConfig::try_from(task).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let role: Role = req.role.parse().map_err(Error::InvalidRequest)?;
        let verify_key = VerifyKey::try_from(req.vdaf_verify_key.as_ref())
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        Self::new(config, role, verify_key)
    }

    /// As an admin request, which is also the stored form.
    pub fn to_request(&self) -> pb::CreateTaskRequest {
        pb::CreateTaskRequest {
            task: Some((&self.config).into()),
            vdaf_verify_key: self.verify_key.as_bytes().to_vec().into(),
            role: self.role.as_str().into(),
        }
    }

    /// The stored encoding.
    pub fn encode(&self) -> Vec<u8> {
        self.to_request().encode_to_vec()
    }

    /// Decodes the stored encoding.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let req = pb::CreateTaskRequest::decode(bytes).map_err(|e| Error::corrupt("task", e))?;
        Self::from_request(&req).map_err(|e| Error::corrupt("task", e))
    }

    /// Whether two entries provision the same task identically.
    pub fn same_as(&self, other: &TaskEntry) -> bool {
        self.config == other.config
            && self.role == other.role
            && self.verify_key == other.verify_key
    }
}

/// The tasks in memory, shared by all services; the store is the source of truth.
#[derive(Clone, Debug, Default)]
pub struct TaskCache {
    inner: Arc<RwLock<HashMap<TaskId, Arc<TaskEntry>>>>,
}

impl TaskCache {
    /// A cache holding `tasks`.
    pub fn new(tasks: Vec<TaskEntry>) -> Self {
        let map = tasks
            .into_iter()
            .map(|t| (t.config.id(), Arc::new(t)))
            .collect();
        Self {
            inner: Arc::new(RwLock::new(map)),
        }
    }

    /// The task, if provisioned.
    pub fn get(&self, id: &TaskId) -> Option<Arc<TaskEntry>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Adds or replaces a task.
    pub fn insert(&self, t: TaskEntry) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.config.id(), Arc::new(t));
    }

    /// All tasks.
    pub fn all(&self) -> Vec<Arc<TaskEntry>> {
        let mut v: Vec<_> = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|t| t.config.id());
        v
    }
}
