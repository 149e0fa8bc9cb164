//! State shared by the services and background jobs of one aggregator process.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{Clock, Role, TaskId, Time};
use tokio::sync::Notify;

use crate::config::AggregatorConfig;
use crate::keys::KeyManager;
use crate::store::Store;
use crate::tasks::{TaskCache, TaskEntry};

/// What every service of an aggregator shares.
#[derive(Clone, Debug)]
pub struct Shared {
    /// This process's role.
    pub role: Role,
    /// The configuration.
    pub config: Arc<AggregatorConfig>,
    /// The database.
    pub store: Store,
    /// Provisioned tasks.
    pub tasks: TaskCache,
    /// HPKE keys.
    pub keys: KeyManager,
    /// The time source.
    pub clock: Arc<dyn Clock>,
    /// Woken when the leader stores new reports.
    pub new_reports: Arc<Notify>,
    /// Reports the leader holds that are not aggregated yet.
    pub pending: Arc<AtomicU64>,
}

impl Shared {
    /// The task if it is provisioned here for this process's role.
    pub fn task(&self, id: &TaskId) -> Option<Arc<TaskEntry>> {
        self.tasks.get(id).filter(|t| t.role == self.role)
    }

    /// Why a report time is not acceptable now, if it is not: not aligned to the task's
    /// precision (malformed), older than the report expiry, or further ahead than the allowed
    /// clock skew.
    pub fn check_time(&self, task: &TaskEntry, time: Time) -> Result<(), RejectReason> {
        if !time.is_aligned(task.config.time_precision_s()) {
            return Err(RejectReason::Malformed);
        }
        let now = self.clock.now();
        if time < now.sub_secs(task.config.report_expiry_s()) {
            return Err(RejectReason::TooOld);
        }
        if time > now.add_secs(self.config.clock_skew_s) {
            return Err(RejectReason::TooNew);
        }
        Ok(())
    }
}
