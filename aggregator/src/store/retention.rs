//! Retention: everything past a task's report expiry or retention is deleted, per tree.

use hush_protocol::BudgetPurpose;
use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{TaskId, Time};
use hush_server::db::tx_result;
use sled::Transactional;

use crate::error::{Error, Result};

use super::*;

impl Store {
    /// Deletes helper job records committed before `cutoff`; returns how many. A leader that
    /// retries such an old job no longer gets the recorded answer.
    pub fn expire_helper_jobs(&self, cutoff: Time) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.helper_jobs.iter() {
            let (k, v) = kv?;
            if HelperJobRecord::decode(&v)?.committed < cutoff {
                batch.remove(k);
                n += 1;
            }
        }
        self.helper_jobs.apply_batch(batch)?;
        Ok(n)
    }

    /// Deletes the pending reports of `task` whose time is before `cutoff` and that are in no
    /// job in flight (they could never be accepted again, and the helper would refuse them),
    /// counting each as refused `TOO_OLD`; returns how many.
    pub fn expire_pending(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let in_jobs: std::collections::HashSet<u64> = self
            .jobs()?
            .into_iter()
            .filter(|(_, j)| j.task_id == *task)
            .flat_map(|(_, j)| j.seqs)
            .collect();
        let mut expired = Vec::new();
        for kv in self.pending.scan_prefix(task.as_bytes()) {
            let (k, v) = kv?;
            let seq = be_u64(&k[32..]);
            let r =
                PendingReport::from_bytes(&v).map_err(|e| Error::corrupt("pending report", e))?;
            if r.time < cutoff && !in_jobs.contains(&seq) {
                expired.push(k);
            }
        }
        if expired.is_empty() {
            return Ok(0);
        }
        let mut delta = StatDelta::default();
        delta.add(
            *task.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            expired.len() as u64,
        );
        let n = expired.len() as u64;
        tx_result((&self.pending, &self.stats).transaction(|(pending, st)| {
            for k in &expired {
                pending.remove(k)?;
            }
            delta.apply(st)?;
            Ok(())
        }))?;
        Ok(n)
    }

    /// Deletes the aggregate shares of `task`'s windows that start before `cutoff`; returns how
    /// many. The budget ledger and the collected marks of those windows stay (a few bytes each),
    /// so a deleted window can never be collected again on a fresh budget.
    pub fn expire_aggregates(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.batches.range(range).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.batches.apply_batch(batch)?;
        Ok(n)
    }

    /// Deletes what `task` keeps per window for windows that start before `cutoff` (past its
    /// retention): the ledger of both purposes, the closed, released and batch marks, the batch
    /// collection counts (of batches starting before it) and the late counts; returns how many
    /// records went. Collections of intervals that start before the cutoff are refused anyway
    /// and ingest refuses reports that old, so nothing needs these any more.
    pub fn expire_window_marks(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let mut n = 0;
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        for tree in [
            &self.collected,
            &self.released,
            &self.window_batches,
            &self.late,
            &self.batch_collections,
        ] {
            let mut b = sled::Batch::default();
            for k in tree.range(range.clone()).keys() {
                b.remove(k?);
                n += 1;
            }
            tree.apply_batch(b)?;
        }
        let mut b = sled::Batch::default();
        for purpose in BudgetPurpose::ALL {
            let r =
                ledger_key(task, purpose, Time::from_secs(0))..ledger_key(task, purpose, cutoff);
            for k in self.ledger.range(r).keys() {
                b.remove(k?);
                n += 1;
            }
        }
        self.ledger.apply_batch(b)?;
        Ok(n)
    }

    /// Deletes the stored answers of `task`'s collections whose last window starts before
    /// `cutoff`; returns how many.
    pub fn expire_collections(&self, task: &TaskId, cutoff: Time) -> Result<u64> {
        let range = batch_key(task, Time::from_secs(0))..batch_key(task, cutoff);
        let keys: Vec<sled::IVec> = self
            .collection_ends
            .range(range)
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let n = keys.len() as u64;
        tx_result::<_, Error>((&self.collections, &self.collection_ends).transaction(
            |(collections, ends)| {
                for k in &keys {
                    collections.remove(task_key(task, &k[40..]))?;
                    ends.remove(k)?;
                }
                Ok(())
            },
        ))?;
        Ok(n)
    }

    /// Number of anti-replay entries of `task`.
    pub fn seen_count(&self, task: &TaskId) -> u64 {
        self.seen.scan_prefix(task.as_bytes()).keys().count() as u64
    }

    /// Deletes anti-replay entries of `task` with a time before `cutoff`; returns how many.
    pub fn expire_seen(&self, task: &TaskId, cutoff: Time) -> Result<usize> {
        let start = task_key(task, &0u64.to_be_bytes());
        let end = task_key(task, &cutoff.as_secs().to_be_bytes());
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.seen.range(start..end).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.seen.apply_batch(batch)?;
        Ok(n)
    }
}
