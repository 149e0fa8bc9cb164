//! The leader's ingest: accepted reports stored with their anti-replay entries, refused late
//! reports counted per window, and reading the pending reports back.

use std::collections::BTreeMap;

use super::backend::{Backend, T as Tb, TxResult, Txn};
use super::records::FileRecord;
use crate::error::{Error, Result};
use hush_protocol::codec::Codec;
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
        // On sled the reports' bytes go to a pending file first, made durable before the
        // transaction, and the records in sled point at them (super::files). `appended` lives
        // until the transaction is over, so the file is not deleted under it.
        let mut at: Vec<Option<(u32, u32)>> = vec![None; reports.len()];
        let appended = match &self.backend {
            Backend::Sled(s) => {
                // Only reports that look new go to the file: a replay or a report of a closed
                // window would otherwise cost disk for as long as its file holds a pending
                // report. The transaction decides; one it stores that was not written (its id
                // expired or its window's marks went in between) it refuses as this said.
                let refused = self.likely_refused(&encoded).await?;
                let mut bytes = Vec::new();
                // Task by task (a stable sort keeps each task's order), so a record's reports
                // lie together in the file.
                let mut order: Vec<usize> = (0..reports.len())
                    .filter(|j| refused[*j].is_none())
                    .collect();
                order.sort_by_key(|j| task_of[*j]);
                for j in order {
                    let start = bytes.len();
                    reports[j].1.encode(&mut bytes);
                    at[j] = Some((start as u32, (bytes.len() - start) as u32));
                }
                if u32::try_from(bytes.len()).is_err() {
                    return Err(Error::InvalidRequest(format!(
                        "{} bytes of reports in one request; send fewer at a time",
                        bytes.len()
                    )));
                }
                let appended = if bytes.is_empty() {
                    None
                } else {
                    Some(s.files().append(&bytes)?)
                };
                Some((appended, refused))
            }
            Backend::Pg(_) => None,
        };
        let input = PendingInput {
            encoded: &encoded,
            reports,
            task_of: &task_of,
            record_max,
            record_seqs: &record_seqs,
            in_file: appended.as_ref().map(|(a, refused)| InFile {
                file: a.as_ref().map_or((0, 0), |a| (a.file, a.offset)),
                at: &at,
                refused,
            }),
        };
        let stored = transact!(self, [Seen, Pending, Stats, Collected, Late], |tx| {
            store_pending_tx(tx, &input, stats)
        });
        drop(appended);
        stored
    }

    /// For each report, `Some(Replay)` if its id is in the anti-replay table or earlier in
    /// `encoded`, else `Some(Late)` if its window is closed, else `None`: outside a
    /// transaction, so only a guess of what storing them will do.
    async fn likely_refused(&self, encoded: &[EncodedPending]) -> Result<Vec<Option<Ingested>>> {
        let mut closed: std::collections::HashMap<&[u8], bool> = Default::default();
        let mut fresh: std::collections::HashSet<&[u8]> = Default::default();
        let mut out = Vec::with_capacity(encoded.len());
        for (_, sk, wk) in encoded {
            if !fresh.insert(sk) || self.backend.get(Tb::Seen, sk).await?.is_some() {
                out.push(Some(Ingested::Replay));
                continue;
            }
            let is_closed = match closed.get(&wk[..]) {
                Some(c) => *c,
                None => {
                    let c = self.backend.get(Tb::Collected, wk).await?.is_some();
                    closed.insert(wk, c);
                    c
                }
            };
            out.push(is_closed.then_some(Ingested::Late));
        }
        Ok(out)
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
    /// On sled, where the reports were written.
    in_file: Option<InFile<'a>>,
}

/// Where an ingest wrote its reports on sled.
struct InFile<'a> {
    /// The pending file and the offset of the first report written.
    file: (u64, u64),
    /// Each report's offset from it and length; `None` for one not written.
    at: &'a [Option<(u32, u32)>],
    /// Why a report was not written: it looked like a replay or a late report.
    refused: &'a [Option<Ingested>],
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
    // The stored reports of each task, in order, as indices into `input.reports`.
    let mut kept: Vec<Vec<usize>> = vec![Vec::new(); input.record_seqs.len()];
    for (j, (((scope, sk, wk), was_seen), i)) in
        encoded.iter().zip(seen).zip(input.task_of).enumerate()
    {
        let refused_before = input.in_file.as_ref().and_then(|f| f.refused[j]);
        if was_seen.is_some() || !fresh.insert(sk) || refused_before == Some(Ingested::Replay) {
            stored.push(Ingested::Replay);
            delta.incr(*scope, Stat::Rejected(RejectReason::Replay));
            continue;
        }
        // Seen either way: a late report counts once, however often it is resent.
        tx.insert(Tb::Seen, sk, &[])?;
        if closed_windows.contains(wk) || refused_before == Some(Ingested::Late) {
            stored.push(Ingested::Late);
            *late_delta.entry(wk).or_default() += 1;
            delta.incr(*scope, Stat::Rejected(RejectReason::BatchCollected));
            continue;
        }
        kept[*i].push(j);
        stored.push(Ingested::Stored);
        delta.incr(*scope, Stat::Accepted);
    }
    for ((task, seqs), reports) in input.record_seqs.iter().zip(&kept) {
        for (seq, chunk) in seqs.iter().zip(reports.chunks(input.record_max)) {
            let record = match &input.in_file {
                Some(f) => file_record(f.file.0, f.file.1, f.at, chunk)?,
                None => PendingRecord::encode_refs(
                    &chunk
                        .iter()
                        .map(|j| &input.reports[*j].1)
                        .collect::<Vec<_>>(),
                ),
            };
            tx.insert(Tb::Pending, &pending_key(task, *seq), &record)?;
        }
    }
    for (k, n) in late_delta {
        let cur = tx.get(Tb::Late, k).await?.map(|v| be_u64(&v)).unwrap_or(0);
        tx.insert(Tb::Late, k, &(cur + n).to_be_bytes())?;
    }
    delta.apply(tx).await?;
    Ok(stored)
}

/// The record of the reports `chunk` (indices into `at`, at least one, in order) of an ingest
/// written at `base` of pending file `file`: its span runs from the first of them to the end of
/// the last. A request's reports are written task by task, so that span holds only reports of
/// the record's task (some of them refused, or in the task's other records).
fn file_record(
    file: u64,
    base: u64,
    at: &[Option<(u32, u32)>],
    chunk: &[usize],
) -> TxResult<Vec<u8>> {
    let at = chunk
        .iter()
        .map(|j| {
            at[*j].ok_or_else(|| {
                Error::corrupt("ingest", "a report to store was not written to its file").into()
            })
        })
        .collect::<TxResult<Vec<(u32, u32)>>>()?;
    let first = at.iter().map(|a| a.0).min().unwrap_or(0);
    let end = at.iter().map(|a| a.0 + a.1).max().unwrap_or(first);
    let reports: Vec<(u32, u32)> = at.iter().map(|a| (a.0 - first, a.1)).collect();
    Ok(FileRecord::encode(
        file,
        base + u64::from(first),
        end - first,
        &reports,
    ))
}
