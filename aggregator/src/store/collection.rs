//! Aggregates, counters, collection and the privacy ledger: summing windows, checking the batch
//! rules and committing a collection with the budget it spends, in one transaction.

use std::collections::BTreeMap;

use super::backend::{Keys, T as Tb, TxResult, Txn};
use crate::error::{Error, Result};
use hush_protocol::BudgetPurpose;
use hush_protocol::{ReportIdChecksum, TaskId, Time};

use super::*;

impl Store {
    /// The batch aggregation of `task` for the window starting at `window`.
    pub async fn batch(&self, task: &TaskId, window: Time) -> Result<Option<BatchAggregation>> {
        match self
            .backend
            .get(Tb::Batches, &batch_key(task, window))
            .await?
        {
            Some(v) => Ok(Some(BatchAggregation::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Every batch aggregation of `task`, by window.
    pub async fn batches(&self, task: &TaskId) -> Result<BTreeMap<Time, BatchAggregation>> {
        self.backend
            .entries(Tb::Batches, Keys::Prefix(task.as_bytes()))
            .await?
            .into_iter()
            .map(|(k, v)| {
                Ok((
                    Time::from_secs(be_u64(&k[32..])),
                    BatchAggregation::decode(&v)?,
                ))
            })
            .collect()
    }

    /// The counters of a scope.
    pub async fn stats(&self, scope: &[u8; 32]) -> Result<BTreeMap<Stat, u64>> {
        let mut out = BTreeMap::new();
        for (k, v) in self.backend.entries(Tb::Stats, Keys::Prefix(scope)).await? {
            if k.len() == 33
                && let Some(s) = Stat::from_code(k[32])
            {
                out.insert(s, be_u64(&v));
            }
        }
        Ok(out)
    }

    /// The sum of `task`'s batch aggregations over `windows`.
    pub async fn sum_batches(
        &self,
        task: &TaskId,
        windows: &[Time],
        len: usize,
    ) -> Result<BatchAggregation> {
        let mut sum = BatchAggregation::empty(len);
        for w in windows {
            if let Some(b) = self.batch(task, *w).await? {
                sum.merge(&b)?;
            }
        }
        Ok(sum)
    }

    /// Pending (accepted, not yet aggregated) reports of `task` in `windows`.
    pub async fn pending_in(&self, task: &TaskId, windows: &[Time]) -> Result<u64> {
        let set: std::collections::HashSet<Time> = windows.iter().copied().collect();
        let mut n = 0;
        for (_, v) in self
            .backend
            .entries(Tb::Pending, Keys::Prefix(task.as_bytes()))
            .await?
        {
            let record = PendingRecord::decode_stored(&v)?;
            n += record.0.iter().filter(|r| set.contains(&r.time)).count() as u64;
        }
        Ok(n)
    }

    /// ε spent so far (millionths) per window, for one purpose.
    pub async fn spent(
        &self,
        task: &TaskId,
        purpose: BudgetPurpose,
        windows: &[Time],
    ) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(windows.len());
        for w in windows {
            out.push(
                self.backend
                    .get(Tb::Ledger, &ledger_key(task, purpose, *w))
                    .await?
                    .map(|v| be_u64(&v))
                    .unwrap_or(0),
            );
        }
        Ok(out)
    }

    /// The stored request hash and answer of a collection, if it ran.
    pub async fn collection(
        &self,
        task: &TaskId,
        id: &[u8; 16],
    ) -> Result<Option<([u8; 32], Vec<u8>)>> {
        Ok(self
            .backend
            .get(Tb::Collections, &task_key(task, id))
            .await?
            .filter(|v| v.len() >= 32)
            .map(|v| {
                let mut h = [0u8; 32];
                h.copy_from_slice(&v[..32]);
                (h, v[32..].to_vec())
            }))
    }

    /// Every collected (closed) window, per task.
    pub async fn collected_windows(&self) -> Result<Vec<(TaskId, Time)>> {
        self.backend
            .keys(Tb::Collected, Keys::All)
            .await?
            .into_iter()
            .map(|k| {
                let t =
                    TaskId::try_from(&k[..32]).map_err(|e| Error::corrupt("collected key", e))?;
                Ok((t, Time::from_secs(be_u64(&k[32..]))))
            })
            .collect()
    }

    /// Routine and alert collections of a batch so far.
    pub async fn batch_collections(&self, task: &TaskId, batch: (Time, u64)) -> Result<(u32, u32)> {
        let rule = BatchRule {
            batch,
            purpose: BudgetPurpose::Routine,
            max_collections: 0,
        };
        Ok(decode_counts(
            self.backend
                .get(Tb::BatchCollections, &rule.counts_key(task))
                .await?
                .as_deref(),
        ))
    }

    /// Checks the batch rules without writing (the same checks run again inside
    /// [`Store::commit_collection`]'s transaction).
    pub async fn check_batch(
        &self,
        task: &TaskId,
        windows: &[Time],
        rule: &BatchRule,
    ) -> Result<Option<CollectRefusal>> {
        let mut ws: WindowBatches = Vec::with_capacity(windows.len());
        for w in windows {
            let b = self
                .backend
                .get(Tb::WindowBatches, &batch_key(task, *w))
                .await?
                .and_then(|v| decode_batch(&v));
            ws.push((*w, b));
        }
        Ok(rule.check(&ws, self.batch_collections(task, rule.batch).await?))
    }

    /// Checks the batch rules and that every window's budget covers the spend and, if so,
    /// spends it, stores the answer, counts the batch's collection and marks the windows
    /// collected and released, in one transaction. Concurrent commits are serialized (by sled,
    /// or by PostgreSQL across replicas), so two collections can never both spend the last of a
    /// budget, collect overlapping batches or exceed a batch's collections. Returns the smallest
    /// budget left over the windows, or why the collection is refused (nothing is written then).
    pub async fn commit_collection(
        &self,
        c: &CollectionCommit<'_>,
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        transact!(
            self,
            [
                Ledger,
                Collections,
                Collected,
                CollectionEnds,
                Released,
                WindowBatches,
                BatchCollections,
                Batches
            ],
            |tx| commit_collection_tx(tx, c)
        )
    }

    /// Spends `epsilon_micros` of the routine budget of every window and stores the answer of a
    /// late-count release under `key`, in one transaction; or says which window is over budget.
    pub async fn commit_late_count(
        &self,
        task: &TaskId,
        key: &[u8; 16],
        windows: &[Time],
        epsilon_micros: u64,
        budget_micros: u64,
        answer: &[u8],
    ) -> Result<std::result::Result<u64, CollectRefusal>> {
        transact!(self, [Ledger, Collections], |tx| async {
            let ck = task_key(task, key);
            if tx.get(Tb::Collections, &ck).await?.is_some() {
                return Err(Error::CollectionConflict(hex::encode(key)).into());
            }
            let lkeys: Vec<Vec<u8>> = windows
                .iter()
                .map(|w| ledger_key(task, BudgetPurpose::Routine, *w))
                .collect();
            let spent = spent_in(tx, &lkeys).await?;
            if let Err(refusal) = spend(tx, windows, &lkeys, &spent, epsilon_micros, budget_micros)?
            {
                return Ok(Err(refusal));
            }
            let mut v = [0u8; 32].to_vec();
            v.extend_from_slice(answer);
            tx.insert(Tb::Collections, &ck, &v)?;
            Ok(Ok(left_after(&spent, epsilon_micros, budget_micros)))
        })
    }

    /// Marks windows collected: the leader closes them before the final count, so no late
    /// report slips in ([`Store::reopen_windows`] opens them again if the collection fails
    /// before anything is released).
    pub async fn close_windows(&self, task: &TaskId, windows: &[Time]) -> Result<()> {
        let writes = windows
            .iter()
            .map(|w| (batch_key(task, *w), Some(Vec::new())))
            .collect();
        self.backend.apply(Tb::Collected, writes).await
    }

    /// Opens windows this collection closed again after it failed, except those a collection
    /// released meanwhile (another replica's, on a shared database): they stay closed.
    pub async fn reopen_windows(&self, task: &TaskId, windows: &[Time]) -> Result<()> {
        let keys: Vec<Vec<u8>> = windows.iter().map(|w| batch_key(task, *w)).collect();
        transact!(self, [Collected, Released], |tx| async {
            let released = tx.get_many(Tb::Released, &keys).await?;
            for (k, r) in keys.iter().zip(released) {
                if r.is_none() {
                    tx.remove(Tb::Collected, k)?;
                }
            }
            Ok(())
        })
    }

    /// Whether `window` of `task` was released (a share of it left this aggregator).
    pub async fn is_released(&self, task: &TaskId, window: Time) -> Result<bool> {
        Ok(self
            .backend
            .get(Tb::Released, &batch_key(task, window))
            .await?
            .is_some())
    }
}

/// ε spent so far on each ledger key, in transaction `tx`.
async fn spent_in<X: Txn>(tx: &mut X, lkeys: &[Vec<u8>]) -> TxResult<Vec<u64>> {
    Ok(tx
        .get_many(Tb::Ledger, lkeys)
        .await?
        .into_iter()
        .map(|v| v.map(|v| be_u64(&v)).unwrap_or(0))
        .collect())
}

/// Checks that every window's budget covers `epsilon_micros` and, if so, spends it (writes the
/// ledger); or says which window is over budget (nothing written).
fn spend<X: Txn>(
    tx: &mut X,
    windows: &[Time],
    lkeys: &[Vec<u8>],
    spent: &[u64],
    epsilon_micros: u64,
    budget_micros: u64,
) -> TxResult<std::result::Result<(), CollectRefusal>> {
    for (w, s) in windows.iter().zip(spent) {
        let remaining = budget_micros.saturating_sub(*s);
        if remaining < epsilon_micros {
            return Ok(Err(CollectRefusal::OverBudget {
                window: *w,
                left_micros: remaining,
            }));
        }
    }
    for (k, s) in lkeys.iter().zip(spent) {
        tx.insert(Tb::Ledger, k, &(s + epsilon_micros).to_be_bytes())?;
    }
    Ok(Ok(()))
}

/// The smallest budget left over the windows after spending `epsilon_micros` on each.
fn left_after(spent: &[u64], epsilon_micros: u64, budget_micros: u64) -> u64 {
    spent
        .iter()
        .map(|s| {
            budget_micros
                .saturating_sub(*s)
                .saturating_sub(epsilon_micros)
        })
        .min()
        .unwrap_or(u64::MAX)
}

async fn commit_collection_tx<X: Txn>(
    tx: &mut X,
    c: &CollectionCommit<'_>,
) -> TxResult<std::result::Result<u64, CollectRefusal>> {
    let last = c
        .windows
        .iter()
        .max()
        .copied()
        .unwrap_or(Time::from_secs(0));
    let mut end_key = batch_key(c.task, last);
    end_key.extend_from_slice(c.collection_id);
    let counts_key = c.rule.counts_key(c.task);
    let purpose = c.rule.purpose;
    let wkeys: Vec<Vec<u8>> = c.windows.iter().map(|w| batch_key(c.task, *w)).collect();
    // A retried collection that reached another replica (or raced its first attempt) finds
    // the first answer here, in the transaction that would spend.
    if let Some(v) = tx
        .get(Tb::Collections, &task_key(c.task, c.collection_id))
        .await?
    {
        if v.get(..32) == Some(&c.request_hash[..]) {
            return Ok(Err(CollectRefusal::Repeated));
        }
        return Err(Error::CollectionConflict(hex::encode(c.collection_id)).into());
    }
    // The answer must describe what the windows hold now: a job committed between the sum and
    // this transaction would otherwise be in the batch without being in the released share,
    // and show in a later collection.
    let mut count = 0u64;
    let mut checksum = ReportIdChecksum::default();
    for v in tx
        .get_many(Tb::Batches, &wkeys)
        .await?
        .into_iter()
        .flatten()
    {
        let b = BatchAggregation::decode(&v)?;
        count += b.report_count;
        checksum.combine(&b.checksum);
    }
    if (count, checksum) != c.summed {
        // No counts in the message: it can reach the collector.
        return Err(Error::Mismatch(
            "the interval's reports changed while it was being collected; retry".into(),
        )
        .into());
    }
    let seen: WindowBatches = c
        .windows
        .iter()
        .copied()
        .zip(
            tx.get_many(Tb::WindowBatches, &wkeys)
                .await?
                .into_iter()
                .map(|v| v.and_then(|v| decode_batch(&v))),
        )
        .collect();
    let counts = decode_counts(tx.get(Tb::BatchCollections, &counts_key).await?.as_deref());
    if let Some(refusal) = c.rule.check(&seen, counts) {
        return Ok(Err(refusal));
    }
    let lkeys: Vec<Vec<u8>> = c
        .windows
        .iter()
        .map(|w| ledger_key(c.task, purpose, *w))
        .collect();
    let spent = spent_in(tx, &lkeys).await?;
    if let Err(refusal) = spend(
        tx,
        c.windows,
        &lkeys,
        &spent,
        c.epsilon_micros,
        c.budget_micros,
    )? {
        return Ok(Err(refusal));
    }
    let batch_value = c.rule.batch_value();
    for wk in &wkeys {
        tx.insert(Tb::Collected, wk, &[])?;
        tx.insert(Tb::Released, wk, &[])?;
        tx.insert(Tb::WindowBatches, wk, &batch_value)?;
    }
    let (routine, alert) = counts;
    let (routine, alert) = if purpose == BudgetPurpose::Routine {
        (routine + 1, alert)
    } else {
        (routine, alert + 1)
    };
    let mut cv = routine.to_be_bytes().to_vec();
    cv.extend_from_slice(&alert.to_be_bytes());
    tx.insert(Tb::BatchCollections, &counts_key, &cv)?;
    let mut v = c.request_hash.to_vec();
    v.extend_from_slice(c.answer);
    tx.insert(Tb::Collections, &task_key(c.task, c.collection_id), &v)?;
    tx.insert(Tb::CollectionEnds, &end_key, &[])?;
    Ok(Ok(left_after(&spent, c.epsilon_micros, c.budget_micros)))
}
