//! The helper: verifies the leader's aggregation jobs and accumulates its own aggregate shares.
//!
//! For each report of a job the helper checks the time, opens its own input share, runs
//! `verify_init`, combines its verifier share with the leader's into the verifier message and
//! finishes. One transaction then refuses replays, records every report id, accumulates the
//! verified output shares, and stores the response under the job id and the request's hash, so a
//! retried job gets the same answer and is never counted twice.

pub mod share;

use hush_protocol::proto::v1::helper_aggregation_server::HelperAggregation;
use hush_protocol::proto::v1::{self as pb, RejectReason};
use hush_protocol::report::input_share_aad;
use hush_protocol::{AggregationJobId, Keyring, Label, ReportId, Role, TaskId, Time};
use prost::Message;
use rayon::prelude::*;
use tonic::{Request, Response, Status};

use crate::checks::{ciphertext, reject_reason};
use crate::error::{Error, Result};
use crate::shared::Shared;
use crate::store::{HelperCommit, HelperReport};
use crate::tasks::TaskEntry;

/// Job ids one `ForgetAggregationJobs` request may name.
pub const MAX_FORGET: usize = 1_000;

/// The `HelperAggregation` service.
#[derive(Clone, Debug)]
pub struct HelperService {
    shared: Shared,
}

impl HelperService {
    /// A service over `shared`.
    pub fn new(shared: Shared) -> Self {
        Self { shared }
    }

    /// Opens and verifies every report of a job on all cores.
    async fn process_all(
        &self,
        task: &std::sync::Arc<TaskEntry>,
        req: &std::sync::Arc<pb::AggregationJobInitRequest>,
    ) -> Result<Vec<HelperReport>> {
        let me = self.clone();
        let keyring = self.shared.keys.keyring();
        let (t, req) = (task.clone(), req.clone());
        tokio::task::spawn_blocking(move || {
            req.reports
                .par_iter()
                .map(|r| me.process(&t, &keyring, r))
                .collect::<Result<Vec<_>>>()
        })
        .await?
    }

    fn process(
        &self,
        task: &TaskEntry,
        keyring: &Keyring,
        r: &pb::ReportShare,
    ) -> Result<HelperReport> {
        let report_id = ReportId::try_from(r.report_id.as_ref())
            .map_err(|e| Error::InvalidRequest(format!("ReportShare.report_id: {e}")))?;
        let time = Time::from_secs(r.time);
        let outcome = (|| {
            self.shared.check_time(task, time)?;
            let ct = ciphertext(r.encrypted_input_share.as_ref())?;
            let aad = input_share_aad(&task.config.id(), &report_id, time, &r.public_share);
            let share = keyring
                .open(&Label::InputShare(Role::Helper), &ct, &aad)
                .map_err(|_| RejectReason::DecryptFailure)?;
            let (state, own) = task
                .vdaf
                .verify_init(
                    &task.verify_key,
                    Role::Helper,
                    &report_id,
                    &r.public_share,
                    &share,
                )
                .map_err(|e| reject_reason(&e))?;
            let msg = task
                .vdaf
                .verifier_message(&state, &r.leader_verifier_share, &own)
                .map_err(|e| reject_reason(&e))?;
            let out = task
                .vdaf
                .verify_finish(state, &msg)
                .map_err(|e| reject_reason(&e))?;
            Ok((out.into_aggregate(), msg))
        })();
        // Reports outside the time window never reach the anti-replay table, which only holds
        // times it can expire.
        let mark_seen = self.shared.check_time(task, time).is_ok();
        Ok(HelperReport {
            report_id,
            time,
            outcome,
            mark_seen,
        })
    }

    /// Deletes the stored answers of jobs the leader says it has committed. Nothing else
    /// changes: the jobs' reports stay in the anti-replay table and their shares in the
    /// aggregates, so a job sent again is refused report by report as replays.
    async fn forget_jobs(&self, req: pb::ForgetAggregationJobsRequest) -> Result<usize> {
        let task = TaskId::try_from(req.task_id.as_ref()).map_err(|e| {
            Error::InvalidRequest(format!("ForgetAggregationJobsRequest.task_id: {e}"))
        })?;
        if req.job_ids.len() > MAX_FORGET {
            return Err(Error::InvalidRequest(format!(
                "{} job ids in one request; the limit is {MAX_FORGET}",
                req.job_ids.len()
            )));
        }
        let jobs = req
            .job_ids
            .iter()
            .map(|j| {
                AggregationJobId::try_from(j.as_ref()).map_err(|e| {
                    Error::InvalidRequest(format!("ForgetAggregationJobsRequest.job_ids: {e}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.shared
            .store
            .run(move |store| async move { store.forget_helper_jobs(&task, &jobs).await })
            .await
    }

    async fn init_job(
        &self,
        req: pb::AggregationJobInitRequest,
    ) -> Result<(pb::AggregationJobResponse, bool)> {
        let task_id = TaskId::try_from(req.task_id.as_ref()).map_err(|e| {
            Error::InvalidRequest(format!("AggregationJobInitRequest.task_id: {e}"))
        })?;
        let job_id = AggregationJobId::try_from(req.job_id.as_ref())
            .map_err(|e| Error::InvalidRequest(format!("AggregationJobInitRequest.job_id: {e}")))?;
        let task = match self.shared.task(&task_id) {
            Some(t) => t,
            // Perhaps provisioned at another replica on the shared database a moment ago.
            None => {
                self.shared
                    .sync_from_store(std::time::Duration::from_secs(1))
                    .await?;
                self.shared
                    .task(&task_id)
                    .ok_or(Error::UnknownTask(task_id))?
            }
        };
        if req.reports.len() > self.shared.config.max_request_reports {
            return Err(Error::InvalidRequest(format!(
                "{} reports in one job; the limit is {}",
                req.reports.len(),
                self.shared.config.max_request_reports
            )));
        }
        let encoded = req.encode_to_vec();
        let hash: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &encoded)
            .as_ref()
            .try_into()
            .map_err(|_| Error::corrupt("request hash", "sha256 length"))?;

        // A retry of a finished job: answer from the record without doing the work again.
        if let Some(rec) = self.shared.store.helper_job(&task_id, &job_id).await? {
            if rec.request_hash != hash {
                return Err(Error::JobConflict(job_id.to_string()));
            }
            tracing::debug!(job = %job_id, "answering a retried aggregation job from its record");
            return pb::AggregationJobResponse::decode(rec.response.as_slice())
                .map(|r| (r, false))
                .map_err(|e| Error::corrupt("helper job response", e));
        }

        let req = std::sync::Arc::new(req);
        let mut processed = self.process_all(&task, &req).await?;
        // A share sealed to a key another replica rotated a moment ago: read its keys (at most
        // once a second) and process the job again.
        if processed
            .iter()
            .any(|r| r.outcome.as_ref().err() == Some(&RejectReason::DecryptFailure))
            && self
                .shared
                .sync_from_store(std::time::Duration::from_secs(1))
                .await?
        {
            processed = self.process_all(&task, &req).await?;
        }

        let len = task.vdaf.output_len();
        let now = self.shared.clock.now();
        let commit = self
            .shared
            .store
            .run(move |store| async move {
                store
                    .commit_helper_job(&task_id, &job_id, now, hash, len, &processed, |outcomes| {
                        pb::AggregationJobResponse {
                            outcomes: outcomes
                                .iter()
                                .map(|(id, o)| pb::ReportOutcome {
                                    report_id: id.as_bytes().to_vec().into(),
                                    result: Some(match o {
                                        Ok(msg) => pb::report_outcome::Result::VerifierMessage(
                                            msg.to_vec().into(),
                                        ),
                                        Err(r) => pb::report_outcome::Result::Rejected(*r as i32),
                                    }),
                                })
                                .collect(),
                        }
                        .encode_to_vec()
                    })
                    .await
            })
            .await?;
        let (bytes, fresh) = match commit {
            HelperCommit::Committed(b) => {
                self.shared.store.flush().await?;
                (b, true)
            }
            HelperCommit::Existing(b) => (b, false),
        };
        let response = pb::AggregationJobResponse::decode(bytes.as_slice())
            .map_err(|e| Error::corrupt("helper job response", e))?;
        if fresh {
            let mut counted = hush_protocol::Outcomes::default();
            for o in &response.outcomes {
                match o.result {
                    Some(pb::report_outcome::Result::VerifierMessage(_)) => counted.accept(),
                    Some(pb::report_outcome::Result::Rejected(code)) => counted
                        .reject(RejectReason::try_from(code).unwrap_or(RejectReason::Unspecified)),
                    None => {}
                }
            }
            hush_server::metrics::record_outcomes(
                hush_server::metrics::names::REPORTS_AGGREGATED,
                hush_server::metrics::names::REPORTS_REJECTED,
                &counted,
            );
        }
        Ok((response, fresh))
    }
}

#[tonic::async_trait]
impl HelperAggregation for HelperService {
    async fn init_aggregation_job(
        &self,
        request: Request<pb::AggregationJobInitRequest>,
    ) -> std::result::Result<Response<pb::AggregationJobResponse>, Status> {
        use hush_server::metrics::names;
        metrics::counter!(names::JOBS_STARTED).increment(1);
        let started = std::time::Instant::now();
        let out = self.init_job(request.into_inner()).await;
        // A retry the helper answers from its record is counted `repeated`, not committed
        // again.
        let outcome = match &out {
            Ok((_, true)) => "committed",
            Ok((_, false)) => "repeated",
            Err(_) => "refused",
        };
        metrics::counter!(names::JOBS_FINISHED, "outcome" => outcome).increment(1);
        if outcome == "committed" {
            metrics::histogram!(names::JOB_SECONDS).record(started.elapsed().as_secs_f64());
        }
        Ok(Response::new(out?.0))
    }

    async fn forget_aggregation_jobs(
        &self,
        request: Request<pb::ForgetAggregationJobsRequest>,
    ) -> std::result::Result<Response<pb::ForgetAggregationJobsResponse>, Status> {
        let forgotten = self.forget_jobs(request.into_inner()).await?;
        metrics::counter!(hush_server::metrics::names::JOBS_FORGOTTEN).increment(forgotten as u64);
        Ok(Response::new(pb::ForgetAggregationJobsResponse {
            forgotten: forgotten as u32,
        }))
    }

    async fn get_aggregate_share(
        &self,
        request: Request<pb::AggregateShareRequest>,
    ) -> std::result::Result<Response<pb::AggregateShareResponse>, Status> {
        let (started, req) = (std::time::Instant::now(), request.into_inner());
        let purpose = req.purpose;
        let out = share::helper_share(&self.shared, req).await;
        crate::checks::record_collection(purpose, started, &out);
        Ok(Response::new(out?))
    }
}
