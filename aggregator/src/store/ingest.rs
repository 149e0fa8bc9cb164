//! The leader's ingest: accepted reports stored with their anti-replay entries, refused late
//! reports counted per window, and reading the pending reports back.

use std::collections::BTreeMap;

use hush_protocol::codec::Codec;
use hush_protocol::proto::v1::RejectReason;
use hush_protocol::{ReportId, TaskId, Time};
use hush_server::db::tx_result;
use sled::Transactional;

use crate::error::Result;

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
    pub fn store_pending(
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
        let r = (
            &self.seen,
            &self.pending,
            &self.stats,
            &self.collected,
            &self.late,
        )
            .transaction(|(seen, pending, st, collected, late)| {
                let mut stored = Vec::with_capacity(encoded.len());
                let mut delta = stats.clone();
                let mut late_delta: BTreeMap<&[u8], u64> = BTreeMap::new();
                for (scope, sk, pk, wk, v) in &encoded {
                    if seen.get(sk)?.is_some() {
                        stored.push(Ingested::Replay);
                        delta.incr(*scope, Stat::Rejected(RejectReason::Replay));
                        continue;
                    }
                    // Seen either way: a late report counts once, however often it is resent.
                    seen.insert(&sk[..], &[][..])?;
                    if collected.get(wk)?.is_some() {
                        stored.push(Ingested::Late);
                        *late_delta.entry(wk).or_default() += 1;
                        delta.incr(*scope, Stat::Rejected(RejectReason::BatchCollected));
                        continue;
                    }
                    pending.insert(&pk[..], &v[..])?;
                    stored.push(Ingested::Stored);
                    delta.incr(*scope, Stat::Accepted);
                }
                for (k, n) in late_delta {
                    let cur = late.get(k)?.map(|v| be_u64(&v)).unwrap_or(0);
                    late.insert(k, &(cur + n).to_be_bytes()[..])?;
                }
                delta.apply(st)?;
                Ok(stored)
            });
        tx_result(r)
    }

    /// Late reports of `task` over `windows`.
    pub fn late_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let mut n = 0;
        for w in windows {
            n += self
                .late
                .get(batch_key(task, *w))?
                .map(|v| be_u64(&v))
                .unwrap_or(0);
        }
        Ok(n)
    }

    /// Applies counter increments on their own.
    pub fn add_stats(&self, stats: &StatDelta) -> Result<()> {
        tx_result(self.stats.transaction(|st| {
            stats.apply(st)?;
            Ok(())
        }))
    }

    /// Whether a report id is in the anti-replay table.
    pub fn is_seen(&self, task: &TaskId, time: Time, id: &ReportId) -> Result<bool> {
        Ok(self.seen.contains_key(seen_key(task, time, id))?)
    }
}
