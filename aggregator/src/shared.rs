//! State shared by the services and background jobs of one aggregator process.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};

use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{Clock, Role, TaskId, Time};
use hush_server::quota::TenantHoldings;
use tokio::sync::Notify;

use crate::config::AggregatorConfig;
use crate::keys::KeyManager;
use crate::store::Store;
use crate::tasks::{TaskCache, TaskEntry};

/// The leader's own state: reports waiting for aggregation.
#[derive(Clone, Debug)]
pub struct LeaderState {
    /// Woken when the leader stores new reports.
    pub new_reports: Arc<Notify>,
    /// Reports the leader holds that are not aggregated yet.
    pub pending: Arc<AtomicU64>,
    /// The same per tenant, against `[leader] tenant_max_pending`.
    pub pending_by_tenant: Arc<TenantHoldings>,
}

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
    /// What only the leader uses (idle at a helper).
    pub leader: LeaderState,
    /// Windows that were collected: reports for them are refused as `BatchCollected`.
    pub collected: Arc<RwLock<HashSet<(TaskId, Time)>>>,
    /// Serializes collections in this process.
    pub collect_lock: Arc<tokio::sync::Mutex<()>>,
    /// Audits refused collections at a bounded rate.
    pub collect_refusals: crate::audit::RefusalAudit,
    /// When this process last read what replicas sharing its database changed.
    pub synced: Arc<tokio::sync::Mutex<Option<std::time::Instant>>>,
}

impl Shared {
    /// Reads what other replicas on a shared database (PostgreSQL) may have changed: tasks
    /// they provisioned, HPKE keys they rotated, windows they collected. Nothing to do on sled
    /// (one process per database). At most once per `min_interval`; returns whether it read.
    pub async fn sync_from_store(&self, min_interval: std::time::Duration) -> crate::Result<bool> {
        if !self.store.is_shared() {
            return Ok(false);
        }
        let mut last = self.synced.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_interval) {
            return Ok(false);
        }
        *last = Some(std::time::Instant::now());
        for bytes in self.store.tasks().await? {
            let t = crate::tasks::TaskEntry::decode(&bytes)?;
            if self.tasks.get(&t.config.id()).is_none() {
                tracing::info!(task = %t.config.id(), "serving a task another replica provisioned");
                self.tasks.insert(t);
            }
        }
        // Replaced, not added to: a window a failed collection reopened at another replica is
        // open here too.
        let closed: HashSet<(TaskId, Time)> =
            self.store.collected_windows().await?.into_iter().collect();
        *self.collected.write().unwrap_or_else(|p| p.into_inner()) = closed;
        if self.role == Role::Leader {
            // Jobs of reports this replica took in may be committed by another: the pending
            // counts behind `max_pending_reports` and `tenant_max_pending` come from the
            // database, for the whole role.
            let mut total = 0;
            let mut by_tenant: std::collections::HashMap<String, u64> = Default::default();
            for t in self.tasks.all().iter().filter(|t| t.role == Role::Leader) {
                let n = self.store.pending_count(&t.config.id()).await?;
                total += n;
                *by_tenant.entry(t.config.tenant().to_owned()).or_default() += n;
            }
            self.leader
                .pending
                .store(total, std::sync::atomic::Ordering::Relaxed);
            self.leader.pending_by_tenant.set_all(by_tenant);
        }
        let keys = self.keys.clone();
        if tokio::task::spawn_blocking(move || keys.refresh())
            .await
            .map_err(hush_server::ServerError::from)??
        {
            tracing::info!("loaded HPKE keys another replica rotated");
        }
        Ok(true)
    }

    /// The tenant of a task provisioned here.
    pub fn tenant_of(&self, id: &TaskId) -> Option<String> {
        self.task(id).map(|t| t.config.tenant().to_owned())
    }

    /// `n` pending reports of `task` left the store (aggregated, expired).
    pub fn pending_released(&self, task: &TaskId, n: u64) {
        self.leader.pending.fetch_sub(
            n.min(
                self.leader
                    .pending
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            std::sync::atomic::Ordering::Relaxed,
        );
        if let Some(t) = self.tenant_of(task) {
            self.leader.pending_by_tenant.release(&t, n);
        }
    }

    /// Appends `e` to the audit trail at the current time (logged, never fails the caller).
    pub fn audit(&self, e: crate::audit::AuditEvent) {
        self.trail().record(e);
    }

    /// The audit trail with this process's clock.
    pub fn trail(&self) -> crate::audit::AuditTrail {
        crate::audit::AuditTrail {
            log: self.store.audit().clone(),
            clock: self.clock.clone(),
        }
    }

    /// The task if it is provisioned here for this process's role.
    pub fn task(&self, id: &TaskId) -> Option<Arc<TaskEntry>> {
        self.tasks.get(id).filter(|t| t.role == self.role)
    }

    /// Why a report time is not acceptable now, if it is not: not aligned to the task's
    /// precision (malformed), older than the report expiry, further ahead than the allowed
    /// clock skew, or in a window that was already collected.
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
        // A window past the task's retention has no aggregate and no records left.
        if task.config.aggregate_cutoff(now).is_some_and(|c| time < c) {
            return Err(RejectReason::TooOld);
        }
        if self.is_collected(&task.config.id(), task.config.window_of(time)) {
            return Err(RejectReason::BatchCollected);
        }
        Ok(())
    }

    /// Whether `window` of `task` was collected.
    pub fn is_collected(&self, task: &TaskId, window: Time) -> bool {
        self.collected
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(*task, window))
    }

    /// Forgets the collected marks of `task`'s windows before `cutoff`, in memory (retention).
    pub fn forget_collected_before(&self, task: &TaskId, cutoff: Time) {
        self.collected
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(t, w)| t != task || *w >= cutoff);
    }

    /// Records windows as collected, in memory (the store is written by the caller).
    pub fn set_collected(&self, task: &TaskId, windows: &[Time], collected: bool) {
        let mut c = self.collected.write().unwrap_or_else(|p| p.into_inner());
        for w in windows {
            if collected {
                c.insert((*task, *w));
            } else {
                c.remove(&(*task, *w));
            }
        }
    }
}
