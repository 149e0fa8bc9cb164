//! The leader's ingest: accepted reports stored with their anti-replay entries, refused late
//! reports counted per window, and reading the pending reports back.

use std::collections::BTreeMap;

use super::backend::{T as Tb, TxResult, Txn};
use crate::error::Result;
use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{ReportId, TaskId, Time};

use super::*;

impl Store {
    /// Stores accepted reports (task, seq, report) with their anti-replay entries in one
    /// transaction. A report whose id was seen before (or twice in `reports`) is refused as a
    /// replay; one whose window is closed (collected) is marked seen and refused as late,
    /// counted per window. The closed
    /// check runs inside the transaction, so no report can enter a window once a collection
    /// closed it. The result says, in order, what happened to each report. `stats` is applied in
    /// the same transaction, plus one `Accepted`, `Rejected(Replay)` or
    /// `Rejected(BatchCollected)` per report. Report times are aligned to their task's window
    /// (the ingest checks that), so a report's time is its window.
    pub async fn store_pending(
        &self,
        reports: &[(TaskId, u64, PendingReport)],
        stats: &StatDelta,
    ) -> Result<Vec<Ingested>> {
        let encoded: Vec<EncodedPending> = reports
            .iter()
            .map(|(task, seq, r)| {
                (
                    *task.as_bytes(),
                    seen_key(task, r.time, &r.report_id),
                    pending_key(task, *seq),
                    batch_key(task, r.time),
                    r.to_bytes(),
                )
            })
            .collect();
        transact!(self, [Seen, Pending, Stats, Collected, Late], |tx| {
            store_pending_tx(tx, &encoded, stats)
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

async fn store_pending_tx<X: Txn>(
    tx: &mut X,
    encoded: &[EncodedPending],
    stats: &StatDelta,
) -> TxResult<Vec<Ingested>> {
    let seen_keys: Vec<Vec<u8>> = encoded.iter().map(|e| e.1.clone()).collect();
    let seen = tx.get_many(Tb::Seen, &seen_keys).await?;
    // A request's reports fall in a few windows: each is looked up once.
    let windows: Vec<Vec<u8>> = encoded
        .iter()
        .map(|e| e.3.clone())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let closed_windows: std::collections::HashSet<Vec<u8>> = windows
        .iter()
        .zip(tx.get_many(Tb::Collected, &windows).await?)
        .filter_map(|(w, c)| c.map(|_| w.clone()))
        .collect();
    let closed = encoded
        .iter()
        .map(|e| closed_windows.contains(&e.3).then_some(()));
    let mut stored = Vec::with_capacity(encoded.len());
    let mut delta = stats.clone();
    let mut late_delta: BTreeMap<&[u8], u64> = BTreeMap::new();
    // Ids seen earlier in this batch: a report sent twice in one request is a replay too.
    let mut fresh: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    for (((scope, sk, pk, wk, v), was_seen), closed) in encoded.iter().zip(seen).zip(closed) {
        if was_seen.is_some() || !fresh.insert(sk) {
            stored.push(Ingested::Replay);
            delta.incr(*scope, Stat::Rejected(RejectReason::Replay));
            continue;
        }
        // Seen either way: a late report counts once, however often it is resent.
        tx.insert(Tb::Seen, sk, &[])?;
        if closed.is_some() {
            stored.push(Ingested::Late);
            *late_delta.entry(wk).or_default() += 1;
            delta.incr(*scope, Stat::Rejected(RejectReason::BatchCollected));
            continue;
        }
        tx.insert(Tb::Pending, pk, v)?;
        stored.push(Ingested::Stored);
        delta.incr(*scope, Stat::Accepted);
    }
    for (k, n) in late_delta {
        let cur = tx.get(Tb::Late, k).await?.map(|v| be_u64(&v)).unwrap_or(0);
        tx.insert(Tb::Late, k, &(cur + n).to_be_bytes())?;
    }
    delta.apply(tx).await?;
    Ok(stored)
}
