//! The leader: report ingest from the last shuffler, and the aggregation job driver.
//!
//! Ingest checks each report (decodes, known task, time window, opens the leader's share),
//! stores the accepted ones with their anti-replay entries in one transaction, flushes, and only
//! then answers. The job driver groups pending reports into jobs, runs `verify_init`, sends each job
//! to the helper with retries and backoff, finishes verification with the helper's verifier
//! messages and commits the job in one transaction.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hush_protocol::proto::v1::helper_aggregation_client::HelperAggregationClient;
use hush_protocol::proto::v1::leader_ingest_server::LeaderIngest;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::retry::{Failure, RetryPolicy, what_to_fix};
use hush_protocol::vdaf::VdafError;
use hush_protocol::{AggregationJobId, Codec, HpkeCiphertext, Report, Role, TaskId};
use rayon::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Request, Response, Status};

use crate::config::LeaderConfig;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{
    BatchAggregation, GLOBAL_SCOPE, Ingested, LeaderJob, PendingReport, Stat, StatDelta,
};
use crate::tasks::TaskEntry;
use hush_protocol::Outcomes;
use hush_protocol::link::AddBearer;

pub use hush_protocol::collect::MAX_COLLECTION_BYTES;

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
    fn apply_quota(&self, checked: Vec<Checked>) -> std::result::Result<Vec<Checked>, Status> {
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
        let count_refused = |status: Status| {
            let mut delta = StatDelta::default();
            for scope in &scopes {
                delta.incr(*scope, Stat::Rejected(RejectReason::OverQuota));
            }
            if let Err(e) = self.shared.store.add_stats(&delta) {
                tracing::error!(error = %e, "counting refused reports failed");
            }
            status
        };
        let holdings = &self.shared.pending_by_tenant;
        let full = holdings.reserve(&per_tenant);
        let checked = refuse_tenants(checked, &full, &tenant, || {
            format!(
                "tenant {full:?} holds its limit of {} reports waiting for aggregation; retry later",
                lc.tenant_max_pending
            )
        })
        .map_err(count_refused)?;
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
        }
        refuse_tenants(checked, &over, &tenant, || {
            format!(
                "tenant {over:?} is over its quota of {} reports/s; retry later",
                lc.tenant_reports_per_s
            )
        })
        .map_err(count_refused)
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
            self.shared.pending_by_tenant.release(&t, n);
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
            let pending = self.shared.pending.load(Ordering::Relaxed);
            if pending + reports.len() as u64 > lc.max_pending_reports {
                return Err(Status::resource_exhausted(format!(
                    "the leader holds {pending} reports waiting for aggregation (limit {}); retry later",
                    lc.max_pending_reports
                )));
            }
        }
        let shared = self.shared.clone();
        let keyring = self.shared.keys.keyring();
        // Opening shares is the expensive part: spread it over all cores.
        let checked: Vec<Checked> = tokio::task::spawn_blocking(move || {
            reports
                .par_iter()
                .map(|b| check_report(&shared, &keyring, b))
                .collect()
        })
        .await
        .map_err(Error::from)?;
        let checked = self.apply_quota(checked)?;

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
        let accepted = match accepted
            .into_iter()
            .map(|(t, r)| Ok((t, self.shared.store.next_seq()?, r)))
            .collect::<Result<Vec<_>>>()
        {
            Ok(a) => a,
            Err(e) => {
                self.settle_holdings(&tasks, None);
                return Err(e.into());
            }
        };
        let store = self.shared.store.clone();
        let stored = tokio::task::spawn_blocking(move || store.store_pending(&accepted, &stats))
            .await
            .map_err(Error::from)
            .and_then(|r| r);
        self.settle_holdings(&tasks, stored.as_ref().ok().map(Vec::as_slice));
        let stored = stored?;
        let n_stored = stored.iter().filter(|s| **s == Ingested::Stored).count() as u64;
        self.shared.pending.fetch_add(n_stored, Ordering::Relaxed);
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
            self.shared.new_reports.notify_one();
        }
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

/// A client of the helper's aggregation service that presents the peer token.
pub type HelperClient = HelperAggregationClient<InterceptedService<Channel, AddBearer>>;

/// A client for the helper at `cfg.helper_url`, connected lazily, presenting the leader's
/// certificate when `tls` is set.
pub fn helper_client(
    cfg: &LeaderConfig,
    message_limit: usize,
    peer_token: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<HelperClient> {
    let endpoint = hush_protocol::link::endpoint(&cfg.helper_url, tls, "leader.helper_url")
        .map_err(|e| Error::config(e.to_string()))?
        .timeout(Duration::from_millis(cfg.helper_timeout_ms))
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let auth = AddBearer::new(peer_token).map_err(|e| Error::config(e.message().to_owned()))?;
    Ok(
        HelperAggregationClient::with_interceptor(endpoint.connect_lazy(), auth)
            .max_decoding_message_size(message_limit)
            .max_encoding_message_size(message_limit),
    )
}

/// Drives aggregation jobs from the leader to the helper.
#[derive(Debug)]
pub struct JobDriver {
    shared: Shared,
    cfg: LeaderConfig,
    helper: HelperClient,
    /// Pending reports in a job in flight, by task and seq.
    assigned: Mutex<HashSet<(TaskId, u64)>>,
}

impl JobDriver {
    /// A driver that talks to the helper at `cfg.helper_url` with `peer_token`.
    pub fn new(
        shared: Shared,
        cfg: LeaderConfig,
        peer_token: &str,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self> {
        let helper = helper_client(&cfg, shared.config.job_message_limit(), peer_token, tls)?;
        Ok(Self {
            shared,
            cfg,
            helper,
            assigned: Mutex::new(HashSet::new()),
        })
    }

    /// Runs until `shutdown` turns true. Jobs in flight at shutdown stay recorded and resume on
    /// the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight = JoinSet::new();
        match self.shared.store.jobs() {
            Ok(jobs) => {
                for (id, job) in jobs {
                    tracing::info!(job = %id, reports = job.seqs.len(), "resuming an aggregation job");
                    self.mark(&job, true);
                    let me = self.clone();
                    in_flight.spawn(async move { me.run_job_until_done(id, job).await });
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the jobs in flight"),
        }
        let poll = Duration::from_millis(self.cfg.job_poll_interval_ms);
        let mut next_task = 0usize;
        loop {
            // A job must be durable before the helper sees it: otherwise a crash could forget a
            // job the helper has accumulated, and its reports would be sent again as replays.
            let mut created = Vec::new();
            let mut needs_flush = Vec::new();
            while in_flight.len() + created.len() < self.cfg.max_concurrent_jobs {
                match self.next_job(&mut next_task, &mut needs_flush) {
                    Ok(Some(j)) => created.push(j),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot create an aggregation job");
                        break;
                    }
                }
            }
            if !needs_flush.is_empty()
                && let Err(e) = self.shared.store.flush().await
            {
                tracing::error!(error = %e, "cannot make new aggregation jobs durable");
                for (_, job) in &created {
                    self.mark(job, false);
                }
                created.clear();
            }
            for (id, job) in created {
                let me = self.clone();
                in_flight.spawn(async move { me.run_job_until_done(id, job).await });
            }
            tokio::select! {
                _ = self.shared.new_reports.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        // Jobs are recorded; abandoning them here is safe: they resume after a restart and the
        // helper answers a retried job from its record.
        in_flight.shutdown().await;
    }

    fn mark(&self, job: &LeaderJob, on: bool) {
        let mut a = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        for s in &job.seqs {
            if on {
                a.insert((job.task_id, *s));
            } else {
                a.remove(&(job.task_id, *s));
            }
        }
    }

    /// Picks the next job, visiting tasks round robin. The job is recorded but not yet durable:
    /// its id is added to `needs_flush`, and the store must be flushed before the job is sent.
    fn next_job(
        &self,
        next_task: &mut usize,
        needs_flush: &mut Vec<AggregationJobId>,
    ) -> Result<Option<(AggregationJobId, LeaderJob)>> {
        let tasks: Vec<Arc<TaskEntry>> = self
            .shared
            .tasks
            .all()
            .into_iter()
            .filter(|t| t.role == Role::Leader)
            .collect();
        for i in 0..tasks.len() {
            let task = &tasks[(*next_task + i) % tasks.len()];
            let id = task.config.id();
            let pending = {
                let assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
                self.shared
                    .store
                    .scan_pending(&id, self.cfg.job_size, |seq| assigned.contains(&(id, seq)))?
            };
            if pending.is_empty() {
                continue;
            }
            *next_task = (*next_task + i + 1) % tasks.len();
            let job = LeaderJob {
                task_id: id,
                seqs: pending.iter().map(|(s, _)| *s).collect(),
                created: Some(self.shared.clock.now()),
            };
            let job_id = AggregationJobId::random();
            self.shared.store.put_job(&job_id, &job)?;
            self.mark(&job, true);
            needs_flush.push(job_id);
            tracing::debug!(job = %job_id, reports = job.seqs.len(), "created an aggregation job");
            return Ok(Some((job_id, job)));
        }
        Ok(None)
    }

    /// The oldest a job may be and still be sent to the helper: 90% of the helper's job
    /// retention (`helper_job_retention_s`, the same in both configs). Past it the helper may
    /// have forgotten that it already accumulated the job, and would refuse its reports as
    /// replays: the leader gives the job up visibly instead.
    fn resend_deadline(
        &self,
        job: &LeaderJob,
        first_seen: hush_protocol::Time,
    ) -> hush_protocol::Time {
        let retention = self.shared.config.helper_job_retention_s;
        job.created
            .unwrap_or(first_seen)
            .add_secs(retention - retention / 10)
    }

    async fn run_job_until_done(self: Arc<Self>, id: AggregationJobId, job: LeaderJob) {
        let mut backoff = RetryPolicy::new(
            Duration::from_millis(self.cfg.retry_initial_ms),
            Duration::from_millis(self.cfg.retry_max_ms),
        )
        .backoff();
        let deadline = self.resend_deadline(&job, self.shared.clock.now());
        loop {
            if self.shared.clock.now() >= deadline {
                self.abandon(&id, &job);
                break;
            }
            match self.run_job(&id, &job).await {
                Ok(()) => break,
                Err(e) => {
                    let (delay, failure) = match &e {
                        Error::Peer(status) => backoff.after(status.code()),
                        _ => (backoff.next_transient(), Failure::Transient),
                    };
                    match (failure, &e) {
                        (Failure::Permanent, Error::Peer(status)) => tracing::warn!(
                            job = %id,
                            error = %e,
                            fix = what_to_fix(status.code()),
                            retry_in_ms = delay.as_millis() as u64,
                            "the helper refuses an aggregation job; holding it"
                        ),
                        _ => tracing::warn!(
                            job = %id,
                            error = %e,
                            retry_in_ms = delay.as_millis() as u64,
                            "aggregation job failed; retrying"
                        ),
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        self.mark(&job, false);
    }

    /// Gives a job up: its reports are counted `TOO_OLD` and the windows they belong to will
    /// disagree with the helper if it had accumulated them (the collection says so).
    fn abandon(&self, id: &AggregationJobId, job: &LeaderJob) {
        match self.shared.store.abandon_leader_job(id, job) {
            Ok(n) => {
                self.shared
                    .pending_released(&job.task_id, job.seqs.len() as u64);
                tracing::error!(
                    job = %id,
                    reports = n,
                    "gave up an aggregation job older than 90% of the helper's job retention; its reports are counted too_old"
                );
                self.shared.audit(crate::audit::AuditEvent {
                    actor: "leader".into(),
                    action: "aggregation.job".into(),
                    tenant: self.shared.tenant_of(&job.task_id).unwrap_or_default(),
                    task: job.task_id.to_string(),
                    outcome: "abandoned: older than the helper's job retention".into(),
                    detail: format!("job {id}, {n} reports counted too_old"),
                });
            }
            Err(e) => tracing::error!(job = %id, error = %e, "giving up an aggregation job failed"),
        }
    }

    /// One attempt at a job. Every step before the commit is deterministic, so a retry (even
    /// after a restart) sends the helper the same request.
    async fn run_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<()> {
        let Some(task) = self.shared.task(&job.task_id) else {
            return Err(Error::UnknownTask(job.task_id));
        };
        let mut reports = Vec::with_capacity(job.seqs.len());
        for seq in &job.seqs {
            match self.shared.store.pending_report(&job.task_id, *seq)? {
                Some(r) => reports.push(r),
                None => {
                    return Err(Error::corrupt(
                        "job",
                        format!("pending report {seq} of job {id} is gone"),
                    ));
                }
            }
        }

        // verify_init for every report, on all cores.
        let t = task.clone();
        let inits = tokio::task::spawn_blocking(move || {
            reports
                .into_par_iter()
                .map(|r| {
                    let init = t.vdaf.verify_init(
                        &t.verify_key,
                        Role::Leader,
                        &r.report_id,
                        &r.public_share,
                        &r.leader_share,
                    );
                    (r, init)
                })
                .collect::<Vec<_>>()
        })
        .await?;

        let scope = *job.task_id.as_bytes();
        let mut stats = StatDelta::default();
        let mut sent = Vec::with_capacity(inits.len());
        let mut shares = Vec::with_capacity(inits.len());
        for (r, init) in inits {
            match init {
                Ok((state, verifier_share)) => {
                    shares.push(pb::ReportShare {
                        report_id: r.report_id.as_bytes().to_vec().into(),
                        time: r.time.as_secs(),
                        public_share: r.public_share.clone().into(),
                        encrypted_input_share: Some((&r.helper_share).into()),
                        leader_verifier_share: verifier_share.into(),
                    });
                    sent.push((r, state));
                }
                Err(e) => stats.incr(scope, Stat::Rejected(reject_reason(&e))),
            }
        }

        let outcomes = if shares.is_empty() {
            Vec::new()
        } else {
            let request = pb::AggregationJobInitRequest {
                task_id: job.task_id.as_bytes().to_vec().into(),
                job_id: id.as_bytes().to_vec().into(),
                reports: shares,
            };
            let response = self
                .helper
                .clone()
                .init_aggregation_job(request)
                .await?
                .into_inner();
            if response.outcomes.len() != sent.len()
                || response
                    .outcomes
                    .iter()
                    .zip(&sent)
                    .any(|(o, (r, _))| o.report_id.as_ref() != r.report_id.as_bytes())
            {
                return Err(Error::InvalidRequest(format!(
                    "the helper answered job {id} with outcomes that do not match its reports"
                )));
            }
            response.outcomes
        };

        // Finish verification with the helper's verifier messages and accumulate.
        let vdaf_task = task.clone();
        let finished = tokio::task::spawn_blocking(move || {
            sent.into_par_iter()
                .zip(outcomes.into_par_iter())
                .map(|((r, state), o)| match o.result {
                    Some(pb::report_outcome::Result::VerifierMessage(msg)) => {
                        let out = vdaf_task.vdaf.verify_finish(state, &msg);
                        (r, out.map_err(|e| reject_reason(&e)))
                    }
                    Some(pb::report_outcome::Result::Rejected(code)) => (
                        r,
                        Err(RejectReason::try_from(code).unwrap_or(RejectReason::Unspecified)),
                    ),
                    None => (r, Err(RejectReason::Unspecified)),
                })
                .collect::<Vec<_>>()
        })
        .await?;

        let len = task.vdaf.output_len();
        let mut batches: BTreeMap<hush_protocol::Time, BatchAggregation> = BTreeMap::new();
        for (r, out) in finished {
            match out {
                Ok(share) => {
                    let b = batches
                        .entry(r.time)
                        .or_insert_with(|| BatchAggregation::empty(len));
                    b.share
                        .accumulate(&share)
                        .map_err(|e| Error::corrupt("output share", e))?;
                    b.report_count += 1;
                    b.checksum.update(&r.report_id);
                }
                Err(reason) => stats.incr(scope, Stat::Rejected(reason)),
            }
        }
        let store = self.shared.store.clone();
        let (id2, job2) = (*id, job.clone());
        let left_out = tokio::task::spawn_blocking(move || {
            store.commit_leader_job(&id2, &job2, &batches, &stats)
        })
        .await??;
        if left_out > 0 {
            tracing::warn!(job = %id, reports = left_out, "reports of windows already released were not aggregated");
        }
        self.shared
            .pending_released(&job.task_id, job.seqs.len() as u64);
        tracing::debug!(job = %id, "aggregation job committed");
        Ok(())
    }
}

/// How a VDAF failure is reported.
pub fn reject_reason(e: &VdafError) -> RejectReason {
    match e {
        VdafError::Malformed(_) => RejectReason::Malformed,
        _ => RejectReason::InvalidProof,
    }
}

/// Checks that a protobuf ciphertext converts.
pub fn ciphertext(
    p: Option<&pb::HpkeCiphertext>,
) -> std::result::Result<HpkeCiphertext, RejectReason> {
    p.and_then(|c| HpkeCiphertext::try_from(c).ok())
        .ok_or(RejectReason::Malformed)
}
