//! Retention: everything past a task's report expiry or retention is deleted, per tree.

use super::backend::{Keys, PendingChange, Pick, T as Tb, TxResult, Txn};
use crate::error::{Error, Result};
use hush_protocol::BudgetPurpose;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{TaskId, Time};

use super::*;

/// Helper jobs deleted per transaction when they expire (two in unit tests, so they cover
/// passes of more than one transaction).
const EXPIRE_CHUNK: usize = if cfg!(test) { 2 } else { 1_000 };

/// The `helper_job_times` key of a helper job committed at `committed` and stored under `jkey`
/// (`task ‖ job`): expiry reads that index in time order.
pub(super) fn helper_job_time_key(committed: Time, jkey: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + jkey.len());
    k.extend_from_slice(&committed.as_secs().to_be_bytes());
    k.extend_from_slice(jkey);
    k
}

/// Deletes a helper job's record and its `helper_job_times` entry, named by that entry's key
/// (`committed ‖ task ‖ job`), in the caller's transaction: the two go together, so a crash
/// leaves neither alone.
pub(super) fn remove_helper_job<X: Txn>(tx: &mut X, time_key: &[u8]) -> TxResult<()> {
    let job = time_key
        .get(8..)
        .ok_or_else(|| Error::corrupt("helper job time", "a key of under 8 bytes"))?;
    tx.remove(Tb::HelperJobs, job)?;
    tx.remove(Tb::HelperJobTimes, time_key)
}

/// `meta` mark: every helper job record has its `helper_job_times` entry.
const TIMES_KEY: &[u8] = b"helper_job_times";
const TIMES_BUILT: &[u8] = b"built";

/// Writes the `helper_job_times` entry of each helper job record of a sled store made before
/// that index (2026-11-29), once: a store opened for the first time by this version. Records
/// are read one at a time, and a restart goes on safely (an entry is written again).
pub(crate) fn index_helper_jobs(
    jobs: &sled::Tree,
    times: &sled::Tree,
    meta: &sled::Tree,
) -> Result<usize> {
    if meta.get(TIMES_KEY)?.as_deref() == Some(TIMES_BUILT) {
        return Ok(0);
    }
    let mut n = 0;
    let mut batch = sled::Batch::default();
    for kv in jobs.iter() {
        let (k, v) = kv?;
        // A record that cannot be read cannot answer a retry either: indexed at time 0, it
        // goes at the next expiry pass instead of keeping the store from opening.
        let committed = HelperJobRecord::committed_of(&v).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "a helper job record cannot be read; it will expire");
            Time::from_secs(0)
        });
        batch.insert(helper_job_time_key(committed, &k), &[]);
        n += 1;
        if n % EXPIRE_CHUNK == 0 {
            times.apply_batch(std::mem::take(&mut batch))?;
        }
    }
    times.apply_batch(batch)?;
    meta.insert(TIMES_KEY, TIMES_BUILT)?;
    if n > 0 {
        tracing::info!(n, "indexed the helper job records by commit time (once)");
    }
    Ok(n)
}

impl Store {
    /// Deletes helper job records committed before `cutoff`; returns how many. A leader that
    /// retries such an old job no longer gets the recorded answer. Only what expires is read:
    /// the `helper_job_times` index in time order, [`EXPIRE_CHUNK`] entries per transaction.
    pub async fn expire_helper_jobs(&self, cutoff: Time) -> Result<usize> {
        let hi = cutoff.as_secs().to_be_bytes();
        let mut n = 0;
        loop {
            let due = self
                .backend
                .scan(
                    Tb::HelperJobTimes,
                    Keys::Range(&[], &hi),
                    EXPIRE_CHUNK,
                    |_, _| Pick::Take,
                )
                .await?;
            if due.is_empty() {
                return Ok(n);
            }
            transact!(self, [HelperJobs, HelperJobTimes], |tx| async {
                for (k, _) in &due {
                    remove_helper_job(tx, k)?;
                }
                Ok(())
            })?;
            n += due.len();
        }
    }

    /// Deletes the pending reports of `task` whose time is before `cutoff` and that are in no
    /// job in flight (they could never be accepted again, and the helper would refuse them),
    /// counting each as refused `TOO_OLD`; returns how many. A record left with none is
    /// deleted, one left with some is rewritten with those.
    pub async fn expire_pending(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let _no_new_jobs = self.pending_lock.lock().await;
        let in_jobs: std::collections::HashSet<u64> = self
            .jobs()
            .await?
            .into_iter()
            .filter(|(_, j)| j.task_id == *task)
            .flat_map(|(_, j)| j.seqs)
            .collect();
        // Each change with the number of reports it expires.
        let mut changes: Vec<PendingChange> = Vec::new();
        let mut expired: Vec<u64> = Vec::new();
        // Records in a job are left unread: their job may commit and delete them meanwhile.
        for (k, stored, v) in self
            .backend
            .pending_records(Keys::Prefix(task.as_bytes()), |q| in_jobs.contains(&q))
            .await?
        {
            let record = PendingRecord::decode_stored(&v)?;
            let (old, fresh): (Vec<&PendingReport>, Vec<&PendingReport>) =
                record.0.iter().partition(|r| r.time < cutoff);
            if old.is_empty() {
                continue;
            }
            let new = (!fresh.is_empty()).then(|| PendingRecord::encode_refs(&fresh));
            expired.push(old.len() as u64);
            changes.push((k, stored.unwrap_or(v), new));
        }
        if changes.is_empty() {
            return Ok(0);
        }
        let scope = *task.as_bytes();
        // Counted inside the transaction: only the reports it deleted (a replica may have
        // expired or claimed some meanwhile).
        transact!(self, [Pending, Stats], |tx| async {
            let done = tx.replace_unclaimed_pending(&changes).await?;
            let n: u64 = done.iter().map(|i| expired[*i]).sum();
            let mut delta = StatDelta::default();
            delta.add(scope, Stat::Rejected(RejectReason::TooOld), n);
            delta.apply(tx).await?;
            Ok(n)
        })
    }

    /// Deletes the keys of `t` in `[lo, hi)`; returns how many.
    async fn delete_range(&self, t: Tb, lo: &[u8], hi: &[u8]) -> Result<u64> {
        if let (Backend::Sled(s), Tb::Seen) = (&self.backend, t) {
            // sled's anti-replay ids are logged per transaction and held in memory
            // (super::seen): both go, counted in ids.
            return s.expire_seen(lo, hi);
        }
        let keys = self.backend.keys(t, Keys::Range(lo, hi)).await?;
        let n = keys.len() as u64;
        self.backend
            .apply(t, keys.into_iter().map(|k| (k, None)).collect())
            .await?;
        Ok(n)
    }

    /// Deletes the aggregate shares of `task`'s windows that start before `cutoff`; returns how
    /// many. The budget ledger and the collected marks of those windows stay (a few bytes each),
    /// so a deleted window can never be collected again on a fresh budget.
    pub async fn expire_aggregates(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        self.delete_range(
            Tb::Batches,
            &batch_key(task, Time::from_secs(0)),
            &batch_key(task, cutoff),
        )
        .await
    }

    /// Deletes what `task` keeps per window for windows that start before `cutoff` (past its
    /// retention): the ledger of both purposes, the closed, released and batch marks, the batch
    /// collection counts (of batches starting before it) and the late counts; returns how many
    /// records went. Collections of intervals that start before the cutoff are refused anyway
    /// and ingest refuses reports that old, so nothing needs these any more.
    pub async fn expire_window_marks(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let mut n = 0;
        let (lo, hi) = (batch_key(task, Time::from_secs(0)), batch_key(task, cutoff));
        for t in [
            Tb::Collected,
            Tb::Released,
            Tb::WindowBatches,
            Tb::Late,
            Tb::BatchCollections,
        ] {
            n += self.delete_range(t, &lo, &hi).await?;
        }
        for purpose in BudgetPurpose::ALL {
            n += self
                .delete_range(
                    Tb::Ledger,
                    &ledger_key(task, purpose, Time::from_secs(0)),
                    &ledger_key(task, purpose, cutoff),
                )
                .await?;
        }
        Ok(n)
    }

    /// Deletes the stored answers of `task`'s collections whose last window starts before
    /// `cutoff`; returns how many.
    pub async fn expire_collections(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let (lo, hi) = (batch_key(task, Time::from_secs(0)), batch_key(task, cutoff));
        let keys = self
            .backend
            .keys(Tb::CollectionEnds, Keys::Range(&lo, &hi))
            .await?;
        let n = keys.len() as u64;
        transact!(self, [Collections, CollectionEnds], |tx| async {
            for k in &keys {
                tx.remove(Tb::Collections, &task_key(task, &k[40..]))?;
                tx.remove(Tb::CollectionEnds, k)?;
            }
            Ok(())
        })?;
        Ok(n)
    }

    /// Number of anti-replay entries of `task`.
    pub async fn seen_count(&self, task: &TaskId) -> Result<u64> {
        self.backend
            .count(Tb::Seen, Keys::Prefix(task.as_bytes()))
            .await
    }

    /// Deletes anti-replay entries of `task` with a time before `cutoff`; returns how many.
    pub async fn expire_seen(&self, task: &TaskId, cutoff: Time) -> Result<usize> {
        let n = self
            .delete_range(
                Tb::Seen,
                &task_key(task, &0u64.to_be_bytes()),
                &task_key(task, &cutoff.as_secs().to_be_bytes()),
            )
            .await?;
        Ok(n as usize)
    }
}
