//! The tasks provisioned at a shuffler: what it needs of them (packet size, tenant).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hush_protocol::{TaskConfig, TaskId};

/// Provisioned tasks: what a shuffler needs of them (packet size, tenant).
#[derive(Clone, Debug, Default)]
pub struct Tasks(Arc<RwLock<HashMap<TaskId, TaskConfig>>>);

impl Tasks {
    /// The task, if provisioned.
    pub fn get(&self, id: &TaskId) -> Option<TaskConfig> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// A copy of every task.
    pub fn snapshot(&self) -> HashMap<TaskId, TaskConfig> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tenant of a task, if provisioned.
    pub fn tenant(&self, id: &TaskId) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|t| t.tenant().to_owned())
    }

    /// Adds or replaces a task.
    pub fn insert(&self, t: TaskConfig) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(t.id(), t);
    }
}
