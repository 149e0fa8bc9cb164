//! The aggregation job driver: pending reports grouped into jobs, `verify_init` on the leader's
//! shares, each job sent to the helper (one retry policy, [`hush_protocol::retry`]), verification
//! finished with the helper's messages and the job committed in one transaction. Committed jobs
//! are then named to the helper (`ForgetAggregationJobs`, once the commit is durable), so it
//! need not keep their answers for its whole job retention.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hush_protocol::proto::v1::helper_aggregation_client::HelperAggregationClient;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::retry::{Failure, RetryPolicy, what_to_fix};
use hush_protocol::{AggregationJobId, Role, TaskId};
use rayon::prelude::*;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use crate::checks::*;
use crate::config::LeaderConfig;
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{BatchAggregation, LeaderJob, Lease, NewJob, PendingReport, Stat, StatDelta};
use crate::tasks::TaskEntry;
use hush_protocol::link::AddBearer;

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
    /// Pending records in a job in flight, by task and seq.
    assigned: Mutex<HashSet<(TaskId, u64)>>,
    /// The jobs this process runs now (their leases are renewed on a shared database).
    held: Mutex<HashSet<AggregationJobId>>,
    /// This process's hold on the jobs it runs.
    lease: Lease,
    /// Committed jobs to name to the helper, and (until `run` takes it) where they arrive.
    forget: tokio::sync::mpsc::Sender<(TaskId, AggregationJobId)>,
    forget_rx: Mutex<Option<tokio::sync::mpsc::Receiver<(TaskId, AggregationJobId)>>>,
}

/// Committed jobs waiting to be named to the helper; past it a job's answer is left to the
/// helper's job retention.
const FORGET_QUEUE: usize = 10_000;
/// How long the leader gathers committed jobs before one flush and one request per task name
/// them to the helper.
const FORGET_EVERY: Duration = Duration::from_millis(500);

impl JobDriver {
    /// A driver that talks to the helper at `cfg.helper_url` with `peer_token`.
    pub fn new(
        shared: Shared,
        cfg: LeaderConfig,
        peer_token: &str,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self> {
        let helper = helper_client(&cfg, shared.config.job_message_limit(), peer_token, tls)?;
        let lease = Lease {
            owner: format!("{:016x}", rand::random::<u64>()),
            ms: cfg.job_lease_ms,
        };
        let (forget, forget_rx) = tokio::sync::mpsc::channel(FORGET_QUEUE);
        Ok(Self {
            shared,
            cfg,
            helper,
            assigned: Mutex::new(HashSet::new()),
            held: Mutex::new(HashSet::new()),
            lease,
            forget,
            forget_rx: Mutex::new(Some(forget_rx)),
        })
    }

    /// Names committed jobs to the helper, gathered for [`FORGET_EVERY`], until `shutdown`.
    /// Their commits are made durable first: a leader that lost a commit in a crash sends the
    /// job again, and a helper that had forgotten its answer would refuse every report of it as
    /// a replay while keeping them in its aggregate. A batch that cannot be flushed or sent is
    /// dropped, and the helper's job retention removes those answers instead.
    async fn forget_committed(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::Receiver<(TaskId, AggregationJobId)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        use crate::helper::MAX_FORGET;
        loop {
            let mut batch = Vec::new();
            tokio::select! {
                n = rx.recv_many(&mut batch, MAX_FORGET) => if n == 0 { return },
                _ = shutdown.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(FORGET_EVERY) => {}
                _ = shutdown.changed() => return,
            }
            while let Ok(j) = rx.try_recv() {
                batch.push(j);
            }
            if let Err(e) = self.shared.store.flush().await {
                tracing::warn!(error = %e, jobs = batch.len(), "cannot make committed jobs durable; the helper keeps their answers until its job retention");
                continue;
            }
            // Committed jobs free pending files: those that filled up go now, not at the next
            // maintenance run.
            if let Err(e) = self
                .shared
                .store
                .run(|s| async move { s.remove_unused_pending_files(false).await })
                .await
            {
                tracing::warn!(error = %e, "deleting unused pending files failed; maintenance retries");
            }
            let mut by_task: BTreeMap<TaskId, Vec<AggregationJobId>> = BTreeMap::new();
            for (task, job) in batch {
                by_task.entry(task).or_default().push(job);
            }
            for (task, jobs) in by_task {
                for chunk in jobs.chunks(MAX_FORGET) {
                    let request = pb::ForgetAggregationJobsRequest {
                        task_id: task.as_bytes().to_vec().into(),
                        job_ids: chunk.iter().map(|j| j.as_bytes().to_vec().into()).collect(),
                    };
                    match self.helper.clone().forget_aggregation_jobs(request).await {
                        Ok(_) => metrics::counter!(hush_server::metrics::names::JOBS_FORGOTTEN)
                            .increment(chunk.len() as u64),
                        Err(status) => tracing::debug!(
                            code = ?status.code(),
                            jobs = chunk.len(),
                            "the helper did not take committed jobs to forget; their answers stay until its job retention"
                        ),
                    }
                }
            }
        }
    }

    /// Runs until `shutdown` turns true. Jobs in flight at shutdown stay recorded and resume on
    /// the next start.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut in_flight = JoinSet::new();
        if self.shared.store.is_shared() {
            tokio::spawn(self.clone().renew_leases(shutdown.clone()));
        }
        if let Some(rx) = self.forget_rx.lock().expect("forget queue").take() {
            tokio::spawn(self.clone().forget_committed(rx, shutdown.clone()));
        }
        // On a shared database the jobs of a replica that stopped are taken over once their
        // lease runs out (below); on sled every recorded job is this process's.
        let own = if self.shared.store.is_shared() {
            Ok(Vec::new())
        } else {
            self.shared.store.jobs().await
        };
        match own {
            Ok(jobs) => {
                for (id, job) in jobs {
                    tracing::info!(job = %id, reports = job.reports, "resuming an aggregation job");
                    self.spawn_job(&mut in_flight, id, job, None);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the jobs in flight"),
        }
        let poll = Duration::from_millis(self.cfg.job_poll_interval_ms);
        let takeover_every = Duration::from_millis((self.lease.ms / 4).min(1_000));
        let mut last_takeover: Option<std::time::Instant> = None;
        let mut next_task = 0usize;
        loop {
            if self.shared.store.is_shared()
                && last_takeover.is_none_or(|t| t.elapsed() >= takeover_every)
                && in_flight.len() < self.cfg.max_concurrent_jobs
            {
                last_takeover = Some(std::time::Instant::now());
                match self
                    .shared
                    .store
                    .take_expired_jobs(&self.lease, self.cfg.max_concurrent_jobs - in_flight.len())
                    .await
                {
                    Ok(jobs) => {
                        for (id, job) in jobs {
                            tracing::info!(job = %id, reports = job.reports, "took over an aggregation job whose lease ran out");
                            self.spawn_job(&mut in_flight, id, job, None);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot look for jobs to take over"),
                }
            }
            // A job must be durable before the helper sees it: otherwise a crash could forget a
            // job the helper has accumulated, and its reports would be sent again as replays.
            let mut created = Vec::new();
            let mut needs_flush = Vec::new();
            while in_flight.len() + created.len() < self.cfg.max_concurrent_jobs {
                match self.next_job(&mut next_task, &mut needs_flush).await {
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
                for (_, job, _) in &created {
                    self.mark(job, false);
                }
                created.clear();
            }
            for (id, job, reports) in created {
                self.spawn_job(&mut in_flight, id, job, reports);
            }
            tokio::select! {
                _ = self.shared.leader.new_reports.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
        }
        // Jobs are recorded; abandoning them here is safe: they resume after a restart (or at
        // another replica) and the helper answers a retried job from its record.
        in_flight.shutdown().await;
        if self.shared.store.is_shared() {
            // Let the other replicas take them over now rather than when the leases lapse.
            let held: Vec<AggregationJobId> = self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            let now = Lease {
                owner: self.lease.owner.clone(),
                ms: 0,
            };
            if let Err(e) = self.shared.store.renew_leases(&now, &held).await {
                tracing::warn!(error = %e, "cannot hand the aggregation jobs back; they are taken over when their leases lapse");
            }
        }
    }

    /// Runs a recorded job (new, resumed or taken over) until it is done; `reports` are its
    /// pending reports if they were read already.
    fn spawn_job(
        self: &Arc<Self>,
        in_flight: &mut JoinSet<()>,
        id: AggregationJobId,
        job: LeaderJob,
        reports: Option<Vec<PendingReport>>,
    ) {
        self.mark(&job, true);
        let me = self.clone();
        in_flight.spawn(async move { me.run_job_until_done(id, job, reports).await });
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
    async fn next_job(
        &self,
        next_task: &mut usize,
        needs_flush: &mut Vec<AggregationJobId>,
    ) -> Result<Option<NewJob>> {
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
            let taken: HashSet<u64> = self
                .assigned
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(t, _)| *t == id)
                .map(|(_, s)| *s)
                .collect();
            let Some((job_id, job, reports)) = self
                .shared
                .store
                .create_job(
                    &id,
                    self.shared.config.job_size(),
                    |seq| taken.contains(&seq),
                    self.shared.clock.now(),
                    &self.lease,
                )
                .await?
            else {
                continue;
            };
            *next_task = (*next_task + i + 1) % tasks.len();
            self.mark(&job, true);
            needs_flush.push(job_id);
            tracing::debug!(job = %job_id, reports = job.reports, "created an aggregation job");
            return Ok(Some((job_id, job, reports)));
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

    /// Renews the leases of the jobs this process runs every third of a lease, until
    /// `shutdown` (a shared database only).
    async fn renew_leases(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let every = Duration::from_millis(self.lease.ms / 3);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            let ids: Vec<AggregationJobId> = self
                .held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect();
            if ids.is_empty() {
                continue;
            }
            match self.shared.store.renew_leases(&self.lease, &ids).await {
                Ok(n) if n < ids.len() as u64 => tracing::warn!(
                    held = n,
                    running = ids.len(),
                    "another replica took over jobs this one runs (its leases ran out); whichever commits first counts them, the other finds them gone"
                ),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, "cannot renew the leases of aggregation jobs")
                }
            }
        }
    }

    async fn run_job_until_done(
        self: Arc<Self>,
        id: AggregationJobId,
        job: LeaderJob,
        reports: Option<Vec<PendingReport>>,
    ) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        self.run_job_to_the_end(id, &job, reports).await;
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.mark(&job, false);
    }

    async fn run_job_to_the_end(
        &self,
        id: AggregationJobId,
        job: &LeaderJob,
        reports: Option<Vec<PendingReport>>,
    ) {
        use hush_server::metrics::names;
        metrics::counter!(names::JOBS_STARTED).increment(1);
        let started = std::time::Instant::now();
        let mut backoff = RetryPolicy::new(
            Duration::from_millis(self.cfg.retry_initial_ms),
            Duration::from_millis(self.cfg.retry_max_ms),
        )
        .backoff();
        let deadline = self.resend_deadline(job, self.shared.clock.now());
        let mut reports = reports.map(Arc::new);
        loop {
            if self.shared.clock.now() >= deadline {
                self.abandon(&id, job).await;
                metrics::counter!(names::JOBS_FINISHED, "outcome" => "abandoned").increment(1);
                break;
            }
            match self.run_job(&id, job, &mut reports).await {
                Ok(()) => {
                    metrics::counter!(names::JOBS_FINISHED, "outcome" => "committed").increment(1);
                    metrics::histogram!(names::JOB_SECONDS).record(started.elapsed().as_secs_f64());
                    break;
                }
                Err(e) => {
                    metrics::counter!(names::JOB_RETRIES).increment(1);
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
                    // On a shared database another replica may have finished the job (it
                    // held it after this one's lease ran out): nothing is left to do.
                    if self.shared.store.is_shared()
                        && matches!(self.shared.store.has_job(&id).await, Ok(false))
                    {
                        tracing::info!(job = %id, "another replica finished this aggregation job");
                        metrics::counter!(names::JOBS_FINISHED, "outcome" => "taken_over")
                            .increment(1);
                        break;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Gives a job up: its reports are counted `TOO_OLD` and the windows they belong to will
    /// disagree with the helper if it had accumulated them (the collection says so).
    async fn abandon(&self, id: &AggregationJobId, job: &LeaderJob) {
        match self.shared.store.abandon_leader_job(id, job).await {
            // Another replica finished or gave it up first.
            Ok(0) => {}
            Ok(n) => {
                metrics::counter!(
                    hush_server::metrics::names::REPORTS_REJECTED,
                    "reason" => "too_old"
                )
                .increment(n);
                self.shared.pending_released(&job.task_id, job.reports);
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
    ///
    /// `reports` holds the job's pending reports once the first attempt has read them.
    async fn run_job(
        &self,
        id: &AggregationJobId,
        job: &LeaderJob,
        reports: &mut Option<Arc<Vec<PendingReport>>>,
    ) -> Result<()> {
        let Some(task) = self.shared.task(&job.task_id) else {
            return Err(Error::UnknownTask(job.task_id));
        };
        let reports = match reports {
            Some(r) => r.clone(),
            None => {
                // Not sized by `job.reports`: a stored count is not trusted with an allocation.
                let mut read = Vec::new();
                for (seq, r) in job.seqs.iter().zip(
                    self.shared
                        .store
                        .pending_reports(&job.task_id, &job.seqs)
                        .await?,
                ) {
                    read.extend(r.ok_or_else(|| {
                        Error::corrupt("job", format!("pending record {seq} of job {id} is gone"))
                    })?);
                }
                reports.insert(Arc::new(read)).clone()
            }
        };

        // verify_init for every report, on all cores.
        let t = task.clone();
        let all = reports.clone();
        let inits = tokio::task::spawn_blocking(move || {
            all.par_iter()
                .enumerate()
                .map(|(i, r)| {
                    let init = t.vdaf.verify_init(
                        &t.verify_key,
                        Role::Leader,
                        &r.report_id,
                        &r.public_share,
                        &r.leader_share,
                    );
                    (i, init)
                })
                .collect::<Vec<_>>()
        })
        .await?;

        let scope = *job.task_id.as_bytes();
        let mut stats = StatDelta::default();
        // What the metrics count once the job commits.
        let mut counted = hush_protocol::Outcomes::default();
        let mut sent = Vec::with_capacity(inits.len());
        let mut shares = Vec::with_capacity(inits.len());
        for (i, init) in inits {
            let r = &reports[i];
            match init {
                Ok((state, verifier_share)) => {
                    shares.push(pb::ReportShare {
                        report_id: r.report_id.as_bytes().to_vec().into(),
                        time: r.time.as_secs(),
                        public_share: r.public_share.clone().into(),
                        encrypted_input_share: Some((&r.helper_share).into()),
                        leader_verifier_share: verifier_share.into(),
                    });
                    sent.push((i, state));
                }
                Err(e) => {
                    stats.incr(scope, Stat::Rejected(reject_reason(&e)));
                    counted.reject(reject_reason(&e));
                }
            }
        }

        // A job none of whose reports the leader could verify never reaches the helper.
        let sent_to_helper = !shares.is_empty();
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
                    .any(|(o, (i, _))| o.report_id.as_ref() != reports[*i].report_id.as_bytes())
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
                .map(|((i, state), o)| match o.result {
                    Some(pb::report_outcome::Result::VerifierMessage(msg)) => {
                        let out = vdaf_task.vdaf.verify_finish(state, &msg);
                        (i, out.map_err(|e| reject_reason(&e)))
                    }
                    Some(pb::report_outcome::Result::Rejected(code)) => (
                        i,
                        Err(RejectReason::try_from(code).unwrap_or(RejectReason::Unspecified)),
                    ),
                    None => (i, Err(RejectReason::Unspecified)),
                })
                .collect::<Vec<_>>()
        })
        .await?;

        let len = task.vdaf.output_len();
        let mut batches: BTreeMap<hush_protocol::Time, BatchAggregation> = BTreeMap::new();
        for (i, out) in finished {
            let r = &reports[i];
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
                    counted.accept();
                }
                Err(reason) => {
                    stats.incr(scope, Stat::Rejected(reason));
                    counted.reject(reason);
                }
            }
        }
        let (id2, job2) = (*id, job.clone());
        let left_out = self
            .shared
            .store
            .run(move |store| async move {
                store.commit_leader_job(&id2, &job2, &batches, &stats).await
            })
            .await?;
        if left_out > 0 {
            tracing::warn!(job = %id, reports = left_out, "reports of windows already released were not aggregated");
        }
        metrics::counter!(hush_server::metrics::names::REPORTS_AGGREGATED)
            .increment(counted.accepted().saturating_sub(left_out as u64));
        if left_out > 0 {
            metrics::counter!(
                hush_server::metrics::names::REPORTS_REJECTED,
                "reason" => "batch_collected"
            )
            .increment(left_out as u64);
        }
        hush_server::metrics::record_rejections(
            hush_server::metrics::names::REPORTS_REJECTED,
            &counted,
        );
        self.shared.pending_released(&job.task_id, job.reports);
        // Full only if the helper has been unreachable for a while: the answer then stays until
        // the helper's job retention removes it.
        if sent_to_helper {
            let _ = self.forget.try_send((job.task_id, *id));
        }
        tracing::debug!(job = %id, "aggregation job committed");
        Ok(())
    }
}
