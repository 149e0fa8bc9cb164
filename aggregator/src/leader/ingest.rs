//! The leader's ingest: each report from the last shuffler decoded, checked (known task, time
//! window) and its leader share opened; the accepted ones stored with their anti-replay entries
//! in one transaction and flushed before the answer; per-tenant quotas.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use hush_protocol::proto::v1::leader_ingest_server::LeaderIngest;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::{Codec, Report, Role, TaskId};
use rayon::prelude::*;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::shared::Shared;
use crate::store::{GLOBAL_SCOPE, Ingested, PendingReport, Stat, StatDelta};
use hush_protocol::Outcomes;

/// Token buckets of reports per tenant.
type TenantQuota = governor::DefaultKeyedRateLimiter<String>;

/// The `LeaderIngest` service.
#[derive(Clone)]
pub struct IngestService {
    shared: Shared,
    quota: Option<Arc<TenantQuota>>,
}

impl std::fmt::Debug for IngestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestService").finish_non_exhaustive()
    }
}

impl IngestService {
    /// A service over `shared`, with the tenant quotas of its `[leader]` config.
    pub fn new(shared: Shared) -> Self {
        let quota = shared.config.leader.as_ref().map(|lc| {
            let rate = std::num::NonZeroU32::new(lc.tenant_reports_per_s)
                .unwrap_or(std::num::NonZeroU32::MIN);
            let burst =
                std::num::NonZeroU32::new(lc.tenant_burst).unwrap_or(std::num::NonZeroU32::MIN);
            Arc::new(governor::RateLimiter::keyed(
                governor::Quota::per_second(rate).allow_burst(burst),
            ))
        });
        Self { shared, quota }
    }

    /// Applies the tenant quotas to checked reports: first what each tenant may hold pending
    /// (reserved here; [`IngestService::settle_holdings`] gives back what was not stored), then
    /// its rate. Over-quota tenants' reports become `OVER_QUOTA` refusals; `Err` if every
    /// accepted report was over a quota.
    async fn apply_quota(
        &self,
        checked: Vec<Checked>,
    ) -> std::result::Result<Vec<Checked>, Status> {
        let Some(lc) = &self.shared.config.leader else {
            return Ok(checked);
        };
        let tenant = |id: &TaskId| self.shared.tenant_of(id);
        let mut per_tenant: BTreeMap<String, u64> = BTreeMap::new();
        for c in &checked {
            if let Checked::Accepted(id, _) = c
                && let Some(t) = tenant(id)
            {
                *per_tenant.entry(t).or_default() += 1;
            }
        }
        // A request refused whole is counted too: every report under OVER_QUOTA (a report the
        // shuffler retries is counted each time it is refused).
        let scopes: Vec<[u8; 32]> = checked
            .iter()
            .filter_map(|c| match c {
                Checked::Accepted(id, _) => Some(*id.as_bytes()),
                Checked::Rejected(..) => None,
            })
            .collect();
        let count_refused = async |status: Status| {
            let mut delta = StatDelta::default();
            let mut refused = hush_protocol::Outcomes::default();
            for scope in &scopes {
                delta.incr(*scope, Stat::Rejected(RejectReason::OverQuota));
                refused.reject(RejectReason::OverQuota);
            }
            hush_server::metrics::record_rejections(
                hush_server::metrics::names::REPORTS_REJECTED,
                &refused,
            );
            if let Err(e) = self.shared.store.add_stats(&delta).await {
                tracing::error!(error = %e, "counting refused reports failed");
            }
            status
        };
        let holdings = &self.shared.leader.pending_by_tenant;
        let full = holdings.reserve(&per_tenant);
        for t in &full {
            hush_server::metrics::record_quota_refusals(t, "pending", per_tenant[t]);
        }
        let checked = match refuse_tenants(checked, &full, &tenant, || {
            format!(
                "tenant {full:?} holds its limit of {} reports waiting for aggregation; retry later",
                lc.tenant_max_pending
            )
        }) {
            Ok(c) => c,
            Err(status) => return Err(count_refused(status).await),
        };
        let Some(q) = &self.quota else {
            return Ok(checked);
        };
        let over: BTreeSet<String> = per_tenant
            .iter()
            .filter(|(t, n)| {
                !full.contains(*t)
                    && u32::try_from(**n)
                        .ok()
                        .and_then(std::num::NonZeroU32::new)
                        .is_some_and(|n| !matches!(q.check_key_n(*t, n), Ok(Ok(_))))
            })
            .map(|(t, _)| t.clone())
            .collect();
        for t in &over {
            holdings.release(t, per_tenant[t]);
            hush_server::metrics::record_quota_refusals(t, "rate", per_tenant[t]);
        }
        match refuse_tenants(checked, &over, &tenant, || {
            format!(
                "tenant {over:?} is over its quota of {} reports/s; retry later",
                lc.tenant_reports_per_s
            )
        }) {
            Ok(c) => Ok(c),
            Err(status) => Err(count_refused(status).await),
        }
    }

    /// Gives back the pending-report reservations of reports that were not stored (replays,
    /// late reports, or a failed write).
    fn settle_holdings(&self, accepted: &[TaskId], stored: Option<&[Ingested]>) {
        let mut unused: BTreeMap<String, u64> = BTreeMap::new();
        for (i, task) in accepted.iter().enumerate() {
            if stored.is_none_or(|s| s[i] != Ingested::Stored)
                && let Some(t) = self.shared.tenant_of(task)
            {
                *unused.entry(t).or_default() += 1;
            }
        }
        for (t, n) in unused {
            self.shared.leader.pending_by_tenant.release(&t, n);
        }
    }
}

/// Turns the accepted reports of tenants in `over` into `OVER_QUOTA` refusals; `Err` with
/// RESOURCE_EXHAUSTED (nothing stored, the shuffler retries) if no other report is left.
fn refuse_tenants(
    checked: Vec<Checked>,
    over: &BTreeSet<String>,
    tenant: &impl Fn(&TaskId) -> Option<String>,
    message: impl FnOnce() -> String,
) -> std::result::Result<Vec<Checked>, Status> {
    if over.is_empty() {
        return Ok(checked);
    }
    let is_over = |id: &TaskId| tenant(id).is_some_and(|t| over.contains(&t));
    if checked
        .iter()
        .all(|c| matches!(c, Checked::Accepted(id, _) if is_over(id)))
    {
        return Err(Status::resource_exhausted(message()));
    }
    tracing::debug!(tenants = ?over, "refused reports over a tenant quota");
    Ok(checked
        .into_iter()
        .map(|c| match c {
            Checked::Accepted(id, _) if is_over(&id) => {
                Checked::Rejected(*id.as_bytes(), RejectReason::OverQuota)
            }
            c => c,
        })
        .collect())
}

/// Checks and opens `reports` on all cores (opening shares is the expensive part).
async fn check_all(
    shared: Shared,
    reports: Vec<bytes::Bytes>,
) -> std::result::Result<(Vec<bytes::Bytes>, Vec<Checked>), Error> {
    let keyring = shared.keys.keyring();
    Ok(tokio::task::spawn_blocking(move || {
        let checked = reports
            .par_iter()
            .map(|b| check_report(&shared, &keyring, b))
            .collect();
        (reports, checked)
    })
    .await?)
}

enum Checked {
    Accepted(TaskId, PendingReport),
    Rejected([u8; 32], RejectReason),
}

fn check_report(shared: &Shared, keyring: &hush_protocol::Keyring, bytes: &[u8]) -> Checked {
    let Ok(report) = Report::from_bytes(bytes) else {
        return Checked::Rejected(GLOBAL_SCOPE, RejectReason::Malformed);
    };
    let Some(task) = shared.task(report.task_id()) else {
        return Checked::Rejected(GLOBAL_SCOPE, RejectReason::UnknownTask);
    };
    let scope = *report.task_id().as_bytes();
    match shared.check_time(&task, report.time()) {
        // A report of a closed window is opened and checked for replay like any other before
        // the store counts it as late: junk and replays never inflate the late count.
        Ok(()) | Err(RejectReason::BatchCollected) => {}
        Err(r) => return Checked::Rejected(scope, r),
    }
    let Ok(leader_share) = report.open_share(Role::Leader, keyring) else {
        return Checked::Rejected(scope, RejectReason::DecryptFailure);
    };
    let (task_id, report_id, time, public_share, _, helper_share) = report.into_parts();
    Checked::Accepted(
        task_id,
        PendingReport {
            report_id,
            time,
            public_share,
            leader_share,
            helper_share,
        },
    )
}

#[tonic::async_trait]
impl LeaderIngest for IngestService {
    async fn submit_reports(
        &self,
        request: Request<pb::SubmitReportsRequest>,
    ) -> std::result::Result<Response<pb::SubmitReportsResponse>, Status> {
        let reports = request.into_inner().reports;
        if reports.len() > self.shared.config.max_request_reports {
            return Err(Status::invalid_argument(format!(
                "{} reports in one request; the limit is {}",
                reports.len(),
                self.shared.config.max_request_reports
            )));
        }
        if let Some(lc) = &self.shared.config.leader {
            let pending = self.shared.leader.pending.load(Ordering::Relaxed);
            if pending + reports.len() as u64 > lc.max_pending_reports {
                hush_server::metrics::record_quota_refusals("", "capacity", reports.len() as u64);
                return Err(Status::resource_exhausted(format!(
                    "the leader holds {pending} reports waiting for aggregation (limit {}); retry later",
                    lc.max_pending_reports
                )));
            }
        }
        let (reports, mut checked) = check_all(self.shared.clone(), reports).await?;
        // An unknown task or key may be one another replica on the shared database provisioned
        // or rotated a moment ago: read its changes (at most once a second) and check those
        // reports again.
        let missed: Vec<usize> = (0..checked.len())
            .filter(|i| {
                matches!(
                    checked[*i],
                    Checked::Rejected(_, RejectReason::UnknownTask | RejectReason::DecryptFailure)
                )
            })
            .collect();
        if !missed.is_empty()
            && self
                .shared
                .sync_from_store(std::time::Duration::from_secs(1))
                .await?
        {
            let again: Vec<bytes::Bytes> = missed.iter().map(|i| reports[*i].clone()).collect();
            let (_, rechecked) = check_all(self.shared.clone(), again).await?;
            for (i, c) in missed.into_iter().zip(rechecked) {
                checked[i] = c;
            }
        }
        let checked = self.apply_quota(checked).await?;

        let mut outcomes = Outcomes::default();
        let mut stats = StatDelta::default();
        let mut accepted = Vec::with_capacity(checked.len());
        let mut tasks: Vec<TaskId> = Vec::with_capacity(checked.len());
        for c in checked {
            match c {
                Checked::Accepted(task, r) => {
                    tasks.push(task);
                    accepted.push((task, r));
                }
                Checked::Rejected(scope, reason) => {
                    outcomes.reject(reason);
                    stats.incr(scope, Stat::Rejected(reason));
                }
            }
        }
        let record_max = self.shared.config.job_size();
        let stored =
            self.shared
                .store
                .run(move |store| async move {
                    store.store_pending(&accepted, record_max, &stats).await
                })
                .await;
        self.settle_holdings(&tasks, stored.as_ref().ok().map(Vec::as_slice));
        let stored = stored?;
        let n_stored = stored.iter().filter(|s| **s == Ingested::Stored).count() as u64;
        self.shared
            .leader
            .pending
            .fetch_add(n_stored, Ordering::Relaxed);
        for s in &stored {
            match s {
                Ingested::Stored => outcomes.accept(),
                Ingested::Replay => outcomes.reject(RejectReason::Replay),
                Ingested::Late => outcomes.reject(RejectReason::BatchCollected),
            }
        }
        // Durable before acknowledged.
        self.shared.store.flush().await?;
        if outcomes.accepted() > 0 {
            self.shared.leader.new_reports.notify_one();
        }
        hush_server::metrics::record_outcomes(
            hush_server::metrics::names::REPORTS_ACCEPTED,
            hush_server::metrics::names::REPORTS_REJECTED,
            &outcomes,
        );
        tracing::debug!(
            accepted = outcomes.accepted(),
            "ingested a batch of reports"
        );
        Ok(Response::new(pb::SubmitReportsResponse {
            accepted: outcomes.accepted(),
            rejected: outcomes.reason_counts(),
        }))
    }
}
