//! Aggregation jobs: the leader's jobs in flight, committed or given up, and the helper's finished
//! jobs with their answers.

use std::collections::BTreeMap;

use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{AggregationJobId, ReportId, TaskId, Time};
use hush_server::db::{abort, tx_result};
use sled::Transactional;

use crate::error::{Error, Result};

use super::*;

impl Store {
    /// Up to `limit` pending reports of `task` in seq order, skipping seqs for which `skip`
    /// is true (reports already in a job).
    pub fn scan_pending(
        &self,
        task: &TaskId,
        limit: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, PendingReport)>> {
        let mut out = Vec::new();
        for kv in self.pending.scan_prefix(task.as_bytes()) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let seq = be_u64(&k[32..]);
            if skip(seq) {
                continue;
            }
            out.push((
                seq,
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?,
            ));
        }
        Ok(out)
    }

    /// The pending report `seq` of `task`.
    pub fn pending_report(&self, task: &TaskId, seq: u64) -> Result<Option<PendingReport>> {
        match self.pending.get(pending_key(task, seq))? {
            Some(v) => Ok(Some(
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?,
            )),
            None => Ok(None),
        }
    }

    /// Number of pending reports of all tasks.
    pub fn pending_total(&self) -> u64 {
        self.pending.len() as u64
    }

    /// Number of pending reports of `task`.
    pub fn pending_count(&self, task: &TaskId) -> Result<u64> {
        Ok(self.pending.scan_prefix(task.as_bytes()).keys().count() as u64)
    }

    /// Records a job before its reports are sent to the helper.
    pub fn put_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<()> {
        self.jobs.insert(id.as_bytes(), job.to_bytes())?;
        Ok(())
    }

    /// Jobs that were in flight, e.g. when the process stopped.
    pub fn jobs(&self) -> Result<Vec<(AggregationJobId, LeaderJob)>> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id =
                    AggregationJobId::try_from(&k[..]).map_err(|e| Error::corrupt("job id", e))?;
                Ok((
                    id,
                    LeaderJob::from_bytes(&v).map_err(|e| Error::corrupt("job", e))?,
                ))
            })
            .collect()
    }

    /// Finishes a leader job in one transaction: merges `batches` into the task's batch
    /// aggregations, removes the job's pending reports and the job, and applies `stats` plus one
    /// `Aggregated` per accumulated report. A batch whose window was released (its share left
    /// this aggregator) is not merged: its reports are counted `Rejected(BatchCollected)`
    /// instead, so nothing enters a window after its share has left. Returns how many reports
    /// were left out that way.
    pub fn commit_leader_job(
        &self,
        id: &AggregationJobId,
        job: &LeaderJob,
        batches: &BTreeMap<Time, BatchAggregation>,
        stats: &StatDelta,
    ) -> Result<u64> {
        let pkeys: Vec<Vec<u8>> = job
            .seqs
            .iter()
            .map(|s| pending_key(&job.task_id, *s))
            .collect();
        let bkeys: Vec<(Vec<u8>, &BatchAggregation)> = batches
            .iter()
            .map(|(w, b)| (batch_key(&job.task_id, *w), b))
            .collect();
        let scope = *job.task_id.as_bytes();
        let r = (
            &self.pending,
            &self.jobs,
            &self.batches,
            &self.stats,
            &self.released,
        )
            .transaction(|(pending, jobs, bt, st, released)| {
                if jobs.get(id.as_bytes())?.is_none() {
                    return Err(abort(Error::corrupt(
                        "job",
                        format!("job {id} vanished before it finished"),
                    )));
                }
                for k in &pkeys {
                    pending.remove(&k[..])?;
                }
                jobs.remove(&id.as_bytes()[..])?;
                let mut delta = stats.clone();
                let mut open = Vec::with_capacity(bkeys.len());
                let mut left_out = 0;
                for (k, b) in &bkeys {
                    if released.get(k)?.is_some() {
                        left_out += b.report_count;
                        delta.add(
                            scope,
                            Stat::Rejected(RejectReason::BatchCollected),
                            b.report_count,
                        );
                    } else {
                        delta.add(scope, Stat::Aggregated, b.report_count);
                        open.push((k.clone(), *b));
                    }
                }
                merge_batches(bt, &open)?;
                delta.apply(st)?;
                Ok(left_out)
            });
        tx_result(r)
    }

    /// Gives up a leader job the helper may no longer remember: removes its pending reports
    /// and the job, counting the reports as refused `TOO_OLD`, in one transaction. Returns how
    /// many reports went.
    pub fn abandon_leader_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<u64> {
        let pkeys: Vec<Vec<u8>> = job
            .seqs
            .iter()
            .map(|s| pending_key(&job.task_id, *s))
            .collect();
        let mut delta = StatDelta::default();
        delta.add(
            *job.task_id.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            pkeys.len() as u64,
        );
        tx_result(
            (&self.pending, &self.jobs, &self.stats).transaction(|(pending, jobs, st)| {
                for k in &pkeys {
                    pending.remove(&k[..])?;
                }
                jobs.remove(&id.as_bytes()[..])?;
                delta.apply(st)?;
                Ok(())
            }),
        )?;
        Ok(pkeys.len() as u64)
    }

    /// The stored outcome of a helper job, if it finished.
    pub fn helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
    ) -> Result<Option<HelperJobRecord>> {
        match self.helper_jobs.get(task_key(task, job.as_bytes()))? {
            Some(v) => Ok(Some(HelperJobRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Commits a helper job in one transaction: refuses reports seen before, marks the others
    /// seen, accumulates the verified ones, stores the response built by `respond` from the
    /// final outcomes, and applies the counters. If the job was committed before with the same
    /// request hash, returns the stored response instead; with another hash, fails.
    #[allow(clippy::too_many_arguments)]
    pub fn commit_helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
        now: Time,
        request_hash: [u8; 32],
        output_len: usize,
        reports: &[HelperReport],
        respond: impl Fn(&[(ReportId, std::result::Result<&[u8], RejectReason>)]) -> Vec<u8>,
    ) -> Result<HelperCommit> {
        let jkey = task_key(task, job.as_bytes());
        let scope = *task.as_bytes();
        let r = (
            &self.seen,
            &self.batches,
            &self.helper_jobs,
            &self.stats,
            &self.released,
        )
            .transaction(|(seen, bt, hj, st, released)| {
                if let Some(v) = hj.get(&jkey)? {
                    let rec = HelperJobRecord::decode(&v).map_err(abort)?;
                    if rec.request_hash != request_hash {
                        return Err(abort(Error::JobConflict(job.to_string())));
                    }
                    return Ok(HelperCommit::Existing(rec.response));
                }
                let mut stats = StatDelta::default();
                let mut batches: BTreeMap<Time, BatchAggregation> = BTreeMap::new();
                let mut outcomes = Vec::with_capacity(reports.len());
                for r in reports {
                    let mut outcome = r
                        .outcome
                        .as_ref()
                        .map(|(_, msg)| msg.as_slice())
                        .map_err(|e| *e);
                    if r.mark_seen {
                        let sk = seen_key(task, r.time, &r.report_id);
                        if seen.insert(sk, &[][..])?.is_some() {
                            outcome = Err(RejectReason::Replay);
                        }
                    }
                    // Checked here, in the transaction that accumulates: however a leader
                    // interleaves jobs with collections, no report enters a window whose share
                    // has left.
                    if outcome.is_ok() && released.get(batch_key(task, r.time))?.is_some() {
                        outcome = Err(RejectReason::BatchCollected);
                    }
                    match (&outcome, &r.outcome) {
                        (Ok(_), Ok((share, _))) => {
                            let b = batches
                                .entry(r.time)
                                .or_insert_with(|| BatchAggregation::empty(output_len));
                            b.share
                                .merge(share)
                                .map_err(|e| abort(Error::corrupt("output share", e)))?;
                            b.report_count += 1;
                            b.checksum.update(&r.report_id);
                            stats.incr(scope, Stat::Accepted);
                            stats.incr(scope, Stat::Aggregated);
                        }
                        (Err(reason), _) => stats.incr(scope, Stat::Rejected(*reason)),
                        (Ok(_), Err(_)) => unreachable!("an outcome only turns from Ok to Err"),
                    }
                    outcomes.push((r.report_id, outcome));
                }
                let bkeys: Vec<(Vec<u8>, &BatchAggregation)> = batches
                    .iter()
                    .map(|(w, b)| (batch_key(task, *w), b))
                    .collect();
                merge_batches(bt, &bkeys)?;
                let response = respond(&outcomes);
                let rec = HelperJobRecord {
                    committed: now,
                    request_hash,
                    response: response.clone(),
                };
                hj.insert(&jkey[..], rec.encode())?;
                stats.apply(st)?;
                Ok(HelperCommit::Committed(response))
            });
        tx_result(r)
    }
}
