//! Aggregation jobs: the leader's jobs in flight, committed or given up, and the helper's finished
//! jobs with their answers.

use std::collections::BTreeMap;

use super::backend::{Backend, Keys, PendingChange, Pick, T as Tb, TxResult, Txn};
use crate::error::{Error, Result};
use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{AggregationJobId, ReportId, TaskId, Time};

use super::*;

/// A job [`Store::create_job`] recorded, with its reports when they were read on the way.
pub type NewJob = (AggregationJobId, LeaderJob, Option<Vec<PendingReport>>);

impl Store {
    /// Pending records of `task` in seq order, skipping seqs for which `skip` is true (records
    /// already in a job), while their reports add up to at most `limit`: the first one always
    /// (a record written under a larger job size that [`Store::split_pending_records`] has not
    /// split yet may hold more), the scan ending at the first that does not fit.
    pub async fn scan_pending(
        &self,
        task: &TaskId,
        limit: usize,
        skip: impl Fn(u64) -> bool + Send + Sync,
    ) -> Result<Vec<(u64, Vec<PendingReport>)>> {
        use std::sync::atomic::Ordering::Relaxed;
        let limit = limit.max(1) as u64;
        let taken = std::sync::atomic::AtomicU64::new(0);
        self.backend
            .scan(
                Tb::Pending,
                Keys::Prefix(task.as_bytes()),
                usize::MAX,
                |k, v| {
                    if skip(be_u64(&k[32..])) {
                        return Pick::Skip;
                    }
                    let (n, so_far) = (PendingRecord::count_encoded(v), taken.load(Relaxed));
                    if so_far > 0 && so_far + n > limit {
                        return Pick::Stop;
                    }
                    taken.store(so_far + n, Relaxed);
                    Pick::Take
                },
            )
            .await?
            .into_iter()
            .map(|(k, v)| Ok((be_u64(&k[32..]), PendingRecord::decode_stored(&v)?.0)))
            .collect()
    }

    /// Splits the pending records that no job holds and that hold more than `record_max`
    /// reports (written under a larger job size) into records of at most `record_max`: the
    /// first part stays under its key, the others get new seqs. The leader runs it at start, so
    /// its jobs fit the job size it runs with, which the helper's `max_request_reports` bounds.
    /// Records are read and split a few at a time, each few in one transaction. Returns how
    /// many records were split.
    pub async fn split_pending_records(&self, record_max: usize) -> Result<u64> {
        /// Records read and rewritten per transaction: what is held in memory at once.
        const AT_ONCE: usize = 16;
        let record_max = record_max.max(1);
        let _no_new_jobs = self.pending_lock.lock().await;
        let in_jobs: std::collections::HashSet<Vec<u8>> = self
            .jobs()
            .await?
            .into_iter()
            .flat_map(|(_, j)| {
                j.seqs
                    .iter()
                    .map(|q| pending_key(&j.task_id, *q))
                    .collect::<Vec<_>>()
            })
            .collect();
        let keys: Vec<Vec<u8>> = self
            .backend
            .oversize_pending(record_max as u64)
            .await?
            .into_iter()
            .filter(|k| !in_jobs.contains(k))
            .collect();
        let mut split = 0;
        for keys in keys.chunks(AT_ONCE) {
            split += self.split_records(keys, record_max).await?;
        }
        Ok(split)
    }

    async fn split_records(&self, keys: &[Vec<u8>], record_max: usize) -> Result<u64> {
        let mut changes: Vec<PendingChange> = Vec::new();
        let mut rest: Vec<Vec<Vec<u8>>> = Vec::new();
        for (k, v) in keys.iter().zip(self.backend.pending_get_many(keys).await?) {
            let Some((stored, v)) = v else { continue };
            let record = PendingRecord::decode_stored(&v)?;
            if record.0.len() <= record_max {
                // Another replica split it meanwhile.
                continue;
            }
            let mut parts = record
                .0
                .chunks(record_max)
                .map(|c| PendingRecord::encode_refs(&c.iter().collect::<Vec<_>>()));
            let first = parts.next().expect("a record holds a report");
            changes.push((k.clone(), stored.unwrap_or(v), Some(first)));
            rest.push(parts.collect());
        }
        if changes.is_empty() {
            return Ok(0);
        }
        let mut seqs = self
            .next_seqs(rest.iter().map(Vec::len).sum())
            .await?
            .into_iter();
        let rest: Vec<Vec<(Vec<u8>, Vec<u8>)>> = changes
            .iter()
            .zip(rest)
            .map(|((k, _, _), parts)| {
                let task = k
                    .get(..32)
                    .and_then(|t| TaskId::try_from(t).ok())
                    .ok_or_else(|| Error::corrupt("pending key", "shorter than a task id"))?;
                Ok(parts
                    .into_iter()
                    .map(|p| (pending_key(&task, seqs.next().expect("a seq per part")), p))
                    .collect())
            })
            .collect::<Result<_>>()?;
        transact!(self, [Pending], |tx| async {
            let done = tx.replace_unclaimed_pending(&changes).await?;
            for i in &done {
                for (k, v) in &rest[*i] {
                    tx.insert(Tb::Pending, k, v)?;
                }
            }
            Ok(done.len() as u64)
        })
    }

    /// The pending records `seqs` of `task`, in order (one read on PostgreSQL); `None` for one
    /// that is gone.
    pub async fn pending_reports(
        &self,
        task: &TaskId,
        seqs: &[u64],
    ) -> Result<Vec<Option<Vec<PendingReport>>>> {
        let keys: Vec<Vec<u8>> = seqs.iter().map(|s| pending_key(task, *s)).collect();
        self.backend
            .get_many(Tb::Pending, &keys)
            .await?
            .into_iter()
            .map(|v| {
                v.map(|v| PendingRecord::decode_stored(&v).map(|r| r.0))
                    .transpose()
            })
            .collect()
    }

    /// Deletes the pending files (sled; none on PostgreSQL) that no record points into and
    /// that take no append, once the deletions of their records are durable; returns how many
    /// went. With `retire_active`, the file taking appends is one of them when no append to it
    /// is in flight (the next ingest starts a new file), so a quiet leader's disk empties too.
    pub async fn remove_unused_pending_files(&self, retire_active: bool) -> Result<usize> {
        let Backend::Sled(s) = &self.backend else {
            return Ok(0);
        };
        // Idle first: a file idle now gets no new record (only an ingest's append makes one,
        // and it counts as in flight until its record is committed), so a scan after this sees
        // every record that will ever point into it.
        let idle = s.files().idle(retire_active)?;
        if idle.is_empty() {
            return Ok(0);
        }
        let used = s.referenced_files()?;
        let unused: Vec<u64> = idle.difference(&used).copied().collect();
        if unused.is_empty() {
            return Ok(0);
        }
        // The deletions of the records that pointed into them, durable before the files go: a
        // crash must not bring back a record whose bytes are gone.
        self.flush().await?;
        s.remove_files(unused)
    }

    /// Bytes of the pending files (0 on PostgreSQL).
    pub fn pending_file_bytes(&self) -> u64 {
        match &self.backend {
            Backend::Sled(s) => s.files().bytes(),
            Backend::Pg(_) => 0,
        }
    }

    /// The anti-replay ids held in memory (sled; `None` on PostgreSQL, which keeps them in
    /// its tables).
    pub fn anti_replay_ids_in_memory(&self) -> Option<u64> {
        match &self.backend {
            Backend::Sled(s) => Some(s.seen_ids()),
            Backend::Pg(_) => None,
        }
    }

    /// Number of pending reports of all tasks.
    pub async fn pending_total(&self) -> Result<u64> {
        self.backend.count_pending(Keys::All).await
    }

    /// Number of pending reports of `task`.
    pub async fn pending_count(&self, task: &TaskId) -> Result<u64> {
        self.backend
            .count_pending(Keys::Prefix(task.as_bytes()))
            .await
    }

    /// Creates the next aggregation job of `task`: pending records that no job holds, up to
    /// `limit` reports between them (see [`Store::scan_pending`]), recorded as a job created at
    /// `created`. On sled this process's jobs are known to
    /// it (`skip` says which records they hold) and the job must be flushed before it is sent;
    /// on PostgreSQL the reports are claimed in the database (`FOR UPDATE SKIP LOCKED`, so two
    /// replicas never claim one report) and the job is held under `lease`, committed. On sled
    /// the job's reports come with it (the scan read them); on PostgreSQL they are read when
    /// the job runs.
    pub async fn create_job(
        &self,
        task: &TaskId,
        limit: usize,
        skip: impl Fn(u64) -> bool + Send + Sync,
        created: Time,
        lease: &Lease,
    ) -> Result<Option<NewJob>> {
        let id = AggregationJobId::random();
        let job = |seqs: Vec<u64>, reports: u64| LeaderJob {
            task_id: *task,
            seqs,
            reports,
            created: Some(created),
        };
        match &self.backend {
            Backend::Sled(_) => {
                let _no_retention = self.pending_lock.lock().await;
                let pending = self.scan_pending(task, limit, skip).await?;
                if pending.is_empty() {
                    return Ok(None);
                }
                let (seqs, records): (Vec<u64>, Vec<Vec<PendingReport>>) =
                    pending.into_iter().unzip();
                let reports: Vec<PendingReport> = records.into_iter().flatten().collect();
                let job = job(seqs, reports.len() as u64);
                self.put_job(&id, &job).await?;
                Ok(Some((id, job, Some(reports))))
            }
            Backend::Pg(p) => {
                let lo = task_key(task, &[]);
                let hi = task_key(task, &[0xff; 9]);
                let job_of = |claimed: &[(Vec<u8>, u64)]| {
                    job(
                        claimed.iter().map(|(k, _)| be_u64(&k[32..])).collect(),
                        claimed.iter().map(|(_, n)| n).sum(),
                    )
                };
                let claimed = p
                    .claim_job(
                        &lo,
                        &hi,
                        limit,
                        id.as_bytes(),
                        |claimed| job_of(claimed).to_bytes(),
                        lease,
                    )
                    .await?;
                Ok((!claimed.is_empty()).then(|| (id, job_of(&claimed), None)))
            }
        }
    }

    /// Jobs another replica held whose lease ran out, now held under `lease` (PostgreSQL; none
    /// on sled, where this process's jobs are resumed at start by [`Store::jobs`]).
    pub async fn take_expired_jobs(
        &self,
        lease: &Lease,
        limit: usize,
    ) -> Result<Vec<(AggregationJobId, LeaderJob)>> {
        let Backend::Pg(p) = &self.backend else {
            return Ok(Vec::new());
        };
        p.take_expired_jobs(&lease.owner, lease.ms, limit)
            .await?
            .into_iter()
            .map(|(k, v)| decode_job(&k, &v))
            .collect()
    }

    /// Extends the leases on `ids` (PostgreSQL); returns how many this process still held.
    pub async fn renew_leases(&self, lease: &Lease, ids: &[AggregationJobId]) -> Result<u64> {
        let Backend::Pg(p) = &self.backend else {
            return Ok(ids.len() as u64);
        };
        let ids: Vec<Vec<u8>> = ids.iter().map(|i| i.as_bytes().to_vec()).collect();
        p.renew_leases(&lease.owner, &ids, lease.ms).await
    }

    /// Whether job `id` is still recorded (another replica may have finished it).
    pub async fn has_job(&self, id: &AggregationJobId) -> Result<bool> {
        Ok(self.backend.get(Tb::Jobs, id.as_bytes()).await?.is_some())
    }

    /// Records a job before its reports are sent to the helper.
    pub async fn put_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<()> {
        self.backend
            .apply(
                Tb::Jobs,
                vec![(id.as_bytes().to_vec(), Some(job.to_bytes()))],
            )
            .await
    }

    /// Jobs that were in flight, e.g. when the process stopped.
    pub async fn jobs(&self) -> Result<Vec<(AggregationJobId, LeaderJob)>> {
        self.backend
            .entries(Tb::Jobs, Keys::All)
            .await?
            .into_iter()
            .map(|(k, v)| decode_job(&k, &v))
            .collect()
    }

    /// Finishes a leader job in one transaction: merges `batches` into the task's batch
    /// aggregations, removes the job's pending records and the job, and applies `stats` plus one
    /// `Aggregated` per accumulated report. A batch whose window was released (its share left
    /// this aggregator) is not merged: its reports are counted `Rejected(BatchCollected)`
    /// instead, so nothing enters a window after its share has left. Returns how many reports
    /// were left out that way.
    pub async fn commit_leader_job(
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
        transact!(self, [Pending, Jobs, Batches, Stats, Released], |tx| {
            commit_leader_job_tx(tx, id, &pkeys, &bkeys, scope, stats)
        })
    }

    /// Gives up a leader job the helper may no longer remember: removes its pending records
    /// and the job, counting the reports as refused `TOO_OLD`, in one transaction. Returns how
    /// many reports went.
    pub async fn abandon_leader_job(&self, id: &AggregationJobId, job: &LeaderJob) -> Result<u64> {
        let pkeys: Vec<Vec<u8>> = job
            .seqs
            .iter()
            .map(|s| pending_key(&job.task_id, *s))
            .collect();
        let scope = *job.task_id.as_bytes();
        transact!(self, [Pending, Jobs, Stats], |tx| async {
            // Another replica may have finished or given up the job meanwhile.
            if tx.get(Tb::Jobs, id.as_bytes()).await?.is_none() {
                return Ok(0);
            }
            // Only the reports still there count.
            let present = tx.get_many(Tb::Pending, &pkeys).await?;
            let mut n = 0;
            for (k, p) in pkeys.iter().zip(present) {
                if let Some(v) = p {
                    tx.remove(Tb::Pending, k)?;
                    n += PendingRecord::count_encoded(&v);
                }
            }
            tx.remove(Tb::Jobs, id.as_bytes())?;
            let mut delta = StatDelta::default();
            delta.add(scope, Stat::Rejected(RejectReason::TooOld), n);
            delta.apply(tx).await?;
            Ok(n)
        })
    }

    /// The stored outcome of a helper job, if it finished.
    pub async fn helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
    ) -> Result<Option<HelperJobRecord>> {
        match self
            .backend
            .get(Tb::HelperJobs, &task_key(task, job.as_bytes()))
            .await?
        {
            Some(v) => Ok(Some(HelperJobRecord::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Commits a helper job in one transaction: refuses reports seen before, marks the others
    /// seen, accumulates the verified ones, stores the response built by `respond` from the
    /// final outcomes, and applies the counters. If the job was committed before with the same
    /// request hash, returns the stored response instead; with another hash, fails.
    #[allow(clippy::too_many_arguments)]
    pub async fn commit_helper_job(
        &self,
        task: &TaskId,
        job: &AggregationJobId,
        now: Time,
        request_hash: [u8; 32],
        output_len: usize,
        reports: &[HelperReport],
        respond: impl Fn(&[(ReportId, std::result::Result<&[u8], RejectReason>)]) -> Vec<u8> + Sync,
    ) -> Result<HelperCommit> {
        let c = HelperJobCommit {
            task,
            job,
            now,
            request_hash,
            output_len,
            reports,
        };
        transact!(
            self,
            [Seen, Batches, HelperJobs, HelperJobTimes, Stats, Released],
            |tx| commit_helper_job_tx(tx, &c, &respond)
        )
    }
}

impl Store {
    /// Deletes the stored answers of `jobs` of `task` (jobs the leader has committed, so it
    /// never needs their answer again) with their `helper_job_times` entries, in one
    /// transaction; returns how many there were.
    pub async fn forget_helper_jobs(
        &self,
        task: &TaskId,
        jobs: &[AggregationJobId],
    ) -> Result<usize> {
        let keys: Vec<Vec<u8>> = jobs.iter().map(|j| task_key(task, j.as_bytes())).collect();
        transact!(self, [HelperJobs, HelperJobTimes], |tx| async {
            let mut n = 0;
            for (k, v) in keys.iter().zip(tx.get_many(Tb::HelperJobs, &keys).await?) {
                let Some(v) = v else {
                    continue;
                };
                let committed = HelperJobRecord::committed_of(&v)?;
                super::retention::remove_helper_job(
                    tx,
                    &super::retention::helper_job_time_key(committed, k),
                )?;
                n += 1;
            }
            Ok(n)
        })
    }
}

/// Who holds the jobs this process runs, and for how long a lease lasts before another replica
/// may take a job over.
#[derive(Clone, Debug)]
pub struct Lease {
    /// This process, as the database records it.
    pub owner: String,
    /// How long a lease lasts, in milliseconds.
    pub ms: u64,
}

fn decode_job(k: &[u8], v: &[u8]) -> Result<(AggregationJobId, LeaderJob)> {
    let id = AggregationJobId::try_from(k).map_err(|e| Error::corrupt("job id", e))?;
    Ok((
        id,
        LeaderJob::from_bytes(v).map_err(|e| Error::corrupt("job", e))?,
    ))
}

async fn commit_leader_job_tx<X: Txn>(
    tx: &mut X,
    id: &AggregationJobId,
    pkeys: &[Vec<u8>],
    bkeys: &[(Vec<u8>, &BatchAggregation)],
    scope: [u8; 32],
    stats: &StatDelta,
) -> TxResult<u64> {
    if tx.get(Tb::Jobs, id.as_bytes()).await?.is_none() {
        return Err(Error::corrupt("job", format!("job {id} vanished before it finished")).into());
    }
    for k in pkeys {
        tx.remove(Tb::Pending, k)?;
    }
    tx.remove(Tb::Jobs, id.as_bytes())?;
    let mut delta = stats.clone();
    let mut open = Vec::with_capacity(bkeys.len());
    let mut left_out = 0;
    let keys: Vec<Vec<u8>> = bkeys.iter().map(|(k, _)| k.clone()).collect();
    let released = tx.get_many(Tb::Released, &keys).await?;
    for ((k, b), released) in bkeys.iter().zip(released) {
        if released.is_some() {
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
    merge_batches(tx, &open).await?;
    delta.apply(tx).await?;
    Ok(left_out)
}

/// What [`Store::commit_helper_job`] commits.
struct HelperJobCommit<'a> {
    task: &'a TaskId,
    job: &'a AggregationJobId,
    now: Time,
    request_hash: [u8; 32],
    output_len: usize,
    reports: &'a [HelperReport],
}

async fn commit_helper_job_tx<X: Txn>(
    tx: &mut X,
    c: &HelperJobCommit<'_>,
    respond: &(impl Fn(&[(ReportId, std::result::Result<&[u8], RejectReason>)]) -> Vec<u8> + Sync),
) -> TxResult<HelperCommit> {
    let (task, job) = (c.task, c.job);
    let jkey = task_key(task, job.as_bytes());
    let scope = *task.as_bytes();
    if let Some(v) = tx.get(Tb::HelperJobs, &jkey).await? {
        let rec = HelperJobRecord::decode(&v)?;
        if rec.request_hash != c.request_hash {
            return Err(Error::JobConflict(job.to_string()).into());
        }
        return Ok(HelperCommit::Existing(rec.response));
    }
    let seen_keys: Vec<Vec<u8>> = c
        .reports
        .iter()
        .map(|r| seen_key(task, r.time, &r.report_id))
        .collect();
    let seen = tx.get_many(Tb::Seen, &seen_keys).await?;
    // A job's reports fall in a few windows: each is looked up once.
    let windows: Vec<Time> = c
        .reports
        .iter()
        .map(|r| r.time)
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let window_keys: Vec<Vec<u8>> = windows.iter().map(|w| batch_key(task, *w)).collect();
    let released_windows: std::collections::HashSet<Time> = windows
        .iter()
        .zip(tx.get_many(Tb::Released, &window_keys).await?)
        .filter_map(|(w, r)| r.map(|_| *w))
        .collect();
    let released = c.reports.iter().map(|r| released_windows.contains(&r.time));
    let mut marked: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut stats = StatDelta::default();
    let mut batches: BTreeMap<Time, BatchAggregation> = BTreeMap::new();
    let mut outcomes = Vec::with_capacity(c.reports.len());
    for (((r, sk), was_seen), released) in c.reports.iter().zip(&seen_keys).zip(seen).zip(released)
    {
        let mut outcome = r
            .outcome
            .as_ref()
            .map(|(_, msg)| msg.as_slice())
            .map_err(|e| *e);
        if r.mark_seen {
            if was_seen.is_some() || !marked.insert(sk) {
                outcome = Err(RejectReason::Replay);
            }
            tx.insert(Tb::Seen, sk, &[])?;
        }
        // Checked here, in the transaction that accumulates: however a leader interleaves jobs
        // with collections, no report enters a window whose share has left.
        if outcome.is_ok() && released {
            outcome = Err(RejectReason::BatchCollected);
        }
        match (&outcome, &r.outcome) {
            (Ok(_), Ok((share, _))) => {
                let b = batches
                    .entry(r.time)
                    .or_insert_with(|| BatchAggregation::empty(c.output_len));
                b.share
                    .merge(share)
                    .map_err(|e| Error::corrupt("output share", e))?;
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
    merge_batches(tx, &bkeys).await?;
    let response = respond(&outcomes);
    let rec = HelperJobRecord {
        committed: c.now,
        request_hash: c.request_hash,
        response: response.clone(),
    };
    tx.insert(Tb::HelperJobs, &jkey, &rec.encode())?;
    tx.insert(
        Tb::HelperJobTimes,
        &super::retention::helper_job_time_key(c.now, &jkey),
        &[],
    )?;
    stats.apply(tx).await?;
    Ok(HelperCommit::Committed(response))
}
