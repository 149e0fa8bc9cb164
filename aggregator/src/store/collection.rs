//! Aggregates, counters, collection and the privacy ledger: summing windows, checking the batch
//! rules and committing a collection with the budget it spends, in one transaction.

use std::collections::BTreeMap;

use hush_protocol::BudgetPurpose;
use hush_protocol::codec::Codec;
use hush_protocol::{ReportIdChecksum, TaskId, Time};
use hush_server::db::{abort, tx_result};
use sled::Transactional;

use crate::error::{Error, Result};

use super::*;

impl Store {
    /// The batch aggregation of `task` for the window starting at `window`.
    pub fn batch(&self, task: &TaskId, window: Time) -> Result<Option<BatchAggregation>> {
        match self.batches.get(batch_key(task, window))? {
            Some(v) => Ok(Some(BatchAggregation::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every batch aggregation of `task`, by window.
    pub fn batches(&self, task: &TaskId) -> Result<BTreeMap<Time, BatchAggregation>> {
        self.batches
            .scan_prefix(task.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    Time::from_secs(be_u64(&k[32..])),
                    BatchAggregation::decode(&v)?,
                ))
            })
            .collect()
    }

    /// The counters of a scope.
    pub fn stats(&self, scope: &[u8; 32]) -> Result<BTreeMap<Stat, u64>> {
        let mut out = BTreeMap::new();
        for kv in self.stats.scan_prefix(scope) {
            let (k, v) = kv?;
            if k.len() == 33
                && let Some(s) = Stat::from_code(k[32])
            {
                out.insert(s, be_u64(&v));
            }
        }
        Ok(out)
    }

    /// The sum of `task`'s batch aggregations over `windows`.
    pub fn sum_batches(
        &self,
        task: &TaskId,
        windows: &[Time],
        len: usize,
    ) -> Result<BatchAggregation> {
        let mut sum = BatchAggregation::empty(len);
        for w in windows {
            if let Some(b) = self.batch(task, *w)? {
                sum.merge(&b)?;
            }
        }
        Ok(sum)
    }

    /// Pending (accepted, not yet aggregated) reports of `task` in `windows`.
    pub fn pending_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let set: std::collections::HashSet<Time> = windows.iter().copied().collect();
        let mut n = 0;
        for v in self.pending.scan_prefix(task.as_bytes()).values() {
            let r =
                PendingReport::from_bytes(&v?).map_err(|e| Error::corrupt("pending report", e))?;
            if set.contains(&r.time) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// ε spent so far (millionths) per window, for one purpose.
    pub fn spent(
        &self,
        task: &TaskId,
        purpose: BudgetPurpose,
        windows: &[Time],
    ) -> Result<Vec<u64>> {
        windows
            .iter()
            .map(|w| {
                Ok(self
                    .ledger
                    .get(ledger_key(task, purpose, *w))?
                    .map(|v| be_u64(&v))
                    .unwrap_or(0))
            })
            .collect()
    }

    /// The stored request hash and answer of a collection, if it ran.
    pub fn collection(&self, task: &TaskId, id: &[u8; 16]) -> Result<Option<([u8; 32], Vec<u8>)>> {
        Ok(self.collections.get(task_key(task, id))?.map(|v| {
            let mut h = [0u8; 32];
            h.copy_from_slice(&v[..32]);
            (h, v[32..].to_vec())
        }))
    }

    /// Every collected (closed) window, per task.
    pub fn collected_windows(&self) -> Result<Vec<(TaskId, Time)>> {
        self.collected
            .iter()
            .keys()
            .map(|k| {
                let k = k?;
                let t =
                    TaskId::try_from(&k[..32]).map_err(|e| Error::corrupt("collected key", e))?;
                Ok((t, Time::from_secs(be_u64(&k[32..]))))
            })
            .collect()
    }

    /// How each of `windows` was collected before: the batch (start, duration) it was in.
    fn window_batches_of(&self, task: &TaskId, windows: &[Time]) -> Result<WindowBatches> {
        windows
            .iter()
            .map(|w| {
                Ok((
                    *w,
                    self.window_batches
                        .get(batch_key(task, *w))?
                        .and_then(|v| decode_batch(&v)),
                ))
            })
            .collect()
    }

    /// Routine and alert collections of a batch so far.
    pub fn batch_collections(&self, task: &TaskId, batch: (Time, u64)) -> Result<(u32, u32)> {
        let rule = BatchRule {
            batch,
            purpose: BudgetPurpose::Routine,
            max_collections: 0,
        };
        Ok(decode_counts(
            self.batch_collections
                .get(rule.counts_key(task))?
                .as_deref(),
        ))
    }

    /// Checks the batch rules without writing (the same checks run again inside
    /// [`Store::commit_collection`]'s transaction).
    pub fn check_batch(
        &self,
        task: &TaskId,
        windows: &[Time],
        rule: &BatchRule,
    ) -> Result<Option<CollectRefusal>> {
        let ws = self.window_batches_of(task, windows)?;
        Ok(rule.check(&ws, self.batch_collections(task, rule.batch)?))
    }

    /// Checks the batch rules and that every window's budget covers the spend and, if so,
    /// spends it, stores the answer, counts the batch's collection and marks the windows
    /// collected and released, in one transaction. Concurrent commits are serialized by sled, so
    /// two collections can never both spend the last of a budget, collect overlapping batches or
    /// exceed a batch's collections. Returns the smallest budget left over the windows, or why
    /// the collection is refused (nothing is written then).
    pub fn commit_collection(
        &self,
        c: &CollectionCommit<'_>,
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        let last = c
            .windows
            .iter()
            .max()
            .copied()
            .unwrap_or(Time::from_secs(0));
        let mut end_key = batch_key(c.task, last);
        end_key.extend_from_slice(c.collection_id);
        let counts_key = c.rule.counts_key(c.task);
        let batch_value = c.rule.batch_value();
        let purpose = c.rule.purpose;
        let r = (
            &self.ledger,
            &self.collections,
            &self.collected,
            &self.collection_ends,
            &self.released,
            &self.window_batches,
            &self.batch_collections,
            &self.batches,
        )
            .transaction(
                |(ledger, collections, collected, ends, released, wb, bc, bt)| {
                    // The answer must describe what the windows hold now: a job committed
                    // between the sum and this transaction would otherwise be in the batch
                    // without being in the released share, and show in a later collection.
                    let mut count = 0u64;
                    let mut checksum = ReportIdChecksum::default();
                    for w in c.windows {
                        if let Some(v) = bt.get(batch_key(c.task, *w))? {
                            let b = BatchAggregation::decode(&v).map_err(abort)?;
                            count += b.report_count;
                            checksum.combine(&b.checksum);
                        }
                    }
                    if (count, checksum) != c.summed {
                        // No counts in the message: it can reach the collector.
                        return Err(abort(Error::Mismatch(
                            "the interval's reports changed while it was being collected; retry"
                                .into(),
                        )));
                    }
                    let mut seen = Vec::with_capacity(c.windows.len());
                    for w in c.windows {
                        let b = wb
                            .get(batch_key(c.task, *w))?
                            .and_then(|v| decode_batch(&v));
                        seen.push((*w, b));
                    }
                    let counts = decode_counts(bc.get(&counts_key)?.as_deref());
                    if let Some(refusal) = c.rule.check(&seen, counts) {
                        return Ok(Err(refusal));
                    }
                    let mut left = u64::MAX;
                    for w in c.windows {
                        let k = ledger_key(c.task, purpose, *w);
                        let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                        let remaining = c.budget_micros.saturating_sub(spent);
                        if remaining < c.epsilon_micros {
                            return Ok(Err(CollectRefusal::OverBudget {
                                window: *w,
                                left_micros: remaining,
                            }));
                        }
                        left = left.min(remaining - c.epsilon_micros);
                    }
                    for w in c.windows {
                        let k = ledger_key(c.task, purpose, *w);
                        let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                        ledger.insert(k, &(spent + c.epsilon_micros).to_be_bytes()[..])?;
                        let wk = batch_key(c.task, *w);
                        collected.insert(wk.clone(), &[][..])?;
                        released.insert(wk.clone(), &[][..])?;
                        wb.insert(wk, &batch_value[..])?;
                    }
                    let (routine, alert) = counts;
                    let (routine, alert) = if purpose == BudgetPurpose::Routine {
                        (routine + 1, alert)
                    } else {
                        (routine, alert + 1)
                    };
                    let mut cv = routine.to_be_bytes().to_vec();
                    cv.extend_from_slice(&alert.to_be_bytes());
                    bc.insert(&counts_key[..], cv)?;
                    let mut v = c.request_hash.to_vec();
                    v.extend_from_slice(c.answer);
                    collections.insert(task_key(c.task, c.collection_id), v)?;
                    ends.insert(&end_key[..], &[][..])?;
                    Ok(Ok(left))
                },
            );
        tx_result(r)
    }

    /// Spends `epsilon_micros` of the routine budget of every window and stores the answer of a
    /// late-count release under `key`, in one transaction; or says which window is over budget.
    pub fn commit_late_count(
        &self,
        task: &TaskId,
        key: &[u8; 16],
        windows: &[Time],
        epsilon_micros: u64,
        budget_micros: u64,
        answer: &[u8],
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        let r = (&self.ledger, &self.collections).transaction(|(ledger, collections)| {
            let ck = task_key(task, key);
            if collections.get(&ck)?.is_some() {
                return Err(abort(Error::CollectionConflict(hex::encode(key))));
            }
            let mut left = u64::MAX;
            for w in windows {
                let k = ledger_key(task, BudgetPurpose::Routine, *w);
                let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                let remaining = budget_micros.saturating_sub(spent);
                if remaining < epsilon_micros {
                    return Ok(Err(CollectRefusal::OverBudget {
                        window: *w,
                        left_micros: remaining,
                    }));
                }
                left = left.min(remaining - epsilon_micros);
            }
            for w in windows {
                let k = ledger_key(task, BudgetPurpose::Routine, *w);
                let spent = ledger.get(&k)?.map(|v| be_u64(&v)).unwrap_or(0);
                ledger.insert(k, &(spent + epsilon_micros).to_be_bytes()[..])?;
            }
            let mut v = [0u8; 32].to_vec();
            v.extend_from_slice(answer);
            collections.insert(ck, v)?;
            Ok(Ok(left))
        });
        tx_result(r)
    }

    /// Marks windows collected or open again (the leader closes them before the final count,
    /// so no late report slips in, and reopens them if the collection fails before anything is
    /// released).
    pub fn mark_collected(&self, task: &TaskId, windows: &[Time], collected: bool) -> Result<()> {
        let mut b = sled::Batch::default();
        for w in windows {
            if collected {
                b.insert(batch_key(task, *w), &[][..]);
            } else {
                b.remove(batch_key(task, *w));
            }
        }
        self.collected.apply_batch(b)?;
        Ok(())
    }

    /// Whether `window` of `task` was released (a share of it left this aggregator).
    pub fn is_released(&self, task: &TaskId, window: Time) -> Result<bool> {
        Ok(self.released.contains_key(batch_key(task, window))?)
    }
}
