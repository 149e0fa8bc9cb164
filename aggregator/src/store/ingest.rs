//! The leader's ingest: accepted reports stored with their anti-replay entries, refused late
//! reports counted per window, and reading the pending reports back.

use std::collections::BTreeMap;

use super::backend::{T as Tb, TxResult, Txn};
use crate::error::Result;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{ReportId, TaskId, Time};

use super::*;

impl Store {
    /// Stores accepted reports with their anti-replay entries in one transaction. A report whose
    /// id was seen before (or twice in `reports`) is refused as a replay; one whose window is
    /// closed (collected) is marked seen and refused as late, counted per window. The closed
    /// check runs inside the transaction, so no report can enter a window once a collection
    /// closed it. The stored reports of each task become pending records of at most
    /// `record_max` reports (the leader's job size), in the order given. The result says, in
    /// order, what happened to each report. `stats` is applied in the same transaction, plus one
    /// `Accepted`, `Rejected(Replay)` or `Rejected(BatchCollected)` per report. Report times are
    /// aligned to their task's window (the ingest checks that), so a report's time is its
    /// window.
    pub async fn store_pending(
        &self,
        reports: &[(TaskId, PendingReport)],
        record_max: usize,
        stats: &StatDelta,
    ) -> Result<Vec<Ingested>> {
        let record_max = record_max.max(1);
        // Enough record seqs for every report to be stored: a task's reports fill
        // ceil(n / record_max) records (replays and late ones leave some unused).
        // Each report's task, as an index into `per_task` (found once, here).
        let mut per_task: Vec<(TaskId, usize)> = Vec::new();
        let mut task_of = Vec::with_capacity(reports.len());
        for (task, _) in reports {
            let i = match per_task.iter().position(|(t, _)| t == task) {
                Some(i) => i,
                None => {
                    per_task.push((*task, 0));
                    per_task.len() - 1
                }
            };
            per_task[i].1 += 1;
            task_of.push(i);
        }
        let needed: usize = per_task.iter().map(|(_, n)| n.div_ceil(record_max)).sum();
        let mut seqs = self.next_seqs(needed).await?.into_iter();
        let record_seqs: Vec<(TaskId, Vec<u64>)> = per_task
            .iter()
            .map(|(t, n)| (*t, seqs.by_ref().take(n.div_ceil(record_max)).collect()))
            .collect();
        let encoded: Vec<EncodedPending> = reports
            .iter()
            .map(|(task, r)| {
                (
                    *task.as_bytes(),
                    seen_key(task, r.time, &r.report_id),
                    batch_key(task, r.time),
                )
            })
            .collect();
        let input = PendingInput {
            encoded: &encoded,
            reports,
            task_of: &task_of,
            record_max,
            record_seqs: &record_seqs,
        };
        transact!(self, [Seen, Pending, Stats, Collected, Late], |tx| {
            store_pending_tx(tx, &input, stats)
        })
    }

    /// Late reports of `task` over `windows`.
    pub async fn late_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let mut n = 0;
        for w in windows {
            n += self
                .backend
                .get(Tb::Late, &batch_key(task, *w))
                .await?
                .map(|v| be_u64(&v))
                .unwrap_or(0);
        }
        Ok(n)
    }

    /// Applies counter increments on their own.
    pub async fn add_stats(&self, stats: &StatDelta) -> Result<()> {
        transact!(self, [Stats], |tx| stats.apply(tx))
    }

    /// Whether a report id is in the anti-replay table.
    pub async fn is_seen(&self, task: &TaskId, time: Time, id: &ReportId) -> Result<bool> {
        Ok(self
            .backend
            .get(Tb::Seen, &seen_key(task, time, id))
            .await?
            .is_some())
    }
}

/// What [`Store::store_pending`] stores.
struct PendingInput<'a> {
    encoded: &'a [EncodedPending],
    reports: &'a [(TaskId, PendingReport)],
    /// Each report's task, as an index into `record_seqs`.
    task_of: &'a [usize],
    record_max: usize,
    record_seqs: &'a [(TaskId, Vec<u64>)],
}

async fn store_pending_tx<X: Txn>(
    tx: &mut X,
    input: &PendingInput<'_>,
    stats: &StatDelta,
) -> TxResult<Vec<Ingested>> {
    let encoded = input.encoded;
    let seen_keys: Vec<Vec<u8>> = encoded.iter().map(|e| e.1.clone()).collect();
    let seen = tx.get_many(Tb::Seen, &seen_keys).await?;
    // A request's reports fall in a few windows: each is looked up once.
    let windows: Vec<Vec<u8>> = encoded
        .iter()
        .map(|e| e.2.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let closed_windows: std::collections::HashSet<Vec<u8>> = windows
        .iter()
        .zip(tx.get_many(Tb::Collected, &windows).await?)
        .filter_map(|(w, c)| c.map(|_| w.clone()))
        .collect();
    let mut stored = Vec::with_capacity(encoded.len());
    let mut delta = stats.clone();
    let mut late_delta: BTreeMap<&[u8], u64> = BTreeMap::new();
    // Ids seen earlier in this batch: a report sent twice in one request is a replay too.
    let mut fresh: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    // The stored reports of each task, in order.
    let mut kept: Vec<Vec<&PendingReport>> = vec![Vec::new(); input.record_seqs.len()];
    for ((((scope, sk, wk), was_seen), (_, r)), i) in encoded
        .iter()
        .zip(seen)
        .zip(input.reports)
        .zip(input.task_of)
    {
        if was_seen.is_some() || !fresh.insert(sk) {
            stored.push(Ingested::Replay);
            delta.incr(*scope, Stat::Rejected(RejectReason::Replay));
            continue;
        }
        // Seen either way: a late report counts once, however often it is resent.
        tx.insert(Tb::Seen, sk, &[])?;
        if closed_windows.contains(wk) {
            stored.push(Ingested::Late);
            *late_delta.entry(wk).or_default() += 1;
            delta.incr(*scope, Stat::Rejected(RejectReason::BatchCollected));
            continue;
        }
        kept[*i].push(r);
        stored.push(Ingested::Stored);
        delta.incr(*scope, Stat::Accepted);
    }
    for ((task, seqs), reports) in input.record_seqs.iter().zip(&kept) {
        for (seq, chunk) in seqs.iter().zip(reports.chunks(input.record_max)) {
            tx.insert(
                Tb::Pending,
                &pending_key(task, *seq),
                &PendingRecord::encode_refs(chunk),
            )?;
        }
    }
    for (k, n) in late_delta {
        let cur = tx.get(Tb::Late, k).await?.map(|v| be_u64(&v)).unwrap_or(0);
        tx.insert(Tb::Late, k, &(cur + n).to_be_bytes())?;
    }
    delta.apply(tx).await?;
    Ok(stored)
}
