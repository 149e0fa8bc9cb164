//! The aggregator's sled database.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `tasks` | task id | the task (protobuf `CreateTaskRequest`) |
//! | `keys` | `"keyset"` | the HPKE [`KeySet`] |
//! | `seen` | task ‖ time ‖ report id | — (anti-replay; expires with the task's report expiry) |
//! | `pending` | task ‖ seq | a leader's accepted, not yet aggregated report |
//! | `jobs` | job id | a leader's aggregation job in flight (task and report seqs) |
//! | `helper_jobs` | task ‖ job id | request hash and response of a helper's finished job |
//! | `batches` | task ‖ window start | aggregate share, report count and report-id checksum |
//! | `stats` | scope ‖ code | counters of accepted, aggregated and rejected reports |
//! | `tenants` | tenant name | SHA-256 of the tenant's collector bearer token |
//! | `ledger` | task ‖ purpose ‖ window start | ε spent on the window, in millionths |
//! | `collections` | task ‖ collection id | request hash and the stored answer of a collection |
//! | `collected` | task ‖ window start | — (the window is closed: the leader's ingest refuses its reports as late) |
//! | `released` | task ‖ window start | — (an aggregate share of the window left this aggregator: nothing more is accumulated into it) |
//! | `window_batches` | task ‖ window start | start ‖ duration of the batch (interval) the window was collected in |
//! | `batch_collections` | task ‖ batch start ‖ duration | routine u32 ‖ alert u32: collections of the batch |
//! | `late` | task ‖ window start | reports refused because the window was closed (leader) |
//! | `collection_ends` | task ‖ last window start ‖ collection id | — (finds answers to delete when their windows pass the task's retention) |
//!
//! Every change that must be atomic is one sled transaction over the trees involved: storing a
//! batch of ingested reports with their anti-replay entries (refusing reports of closed windows),
//! finishing an aggregation job (accumulating output shares into windows not yet released,
//! removing the reports, recording the outcome), and committing a collection (checking the batch
//! rules, checking and spending the budget of every window, recording the answer, closing and
//! releasing the windows). sled transactions are serializable, so a check inside one cannot race
//! a commit of another: no report enters a window after its share has left. A crash before a
//! transaction commits loses nothing that was acknowledged; after it, nothing is counted twice.

use std::path::Path;

use hush_protocol::TaskId;
use sled::Tree;

use crate::error::Result;

mod collection;
mod ingest;
mod jobs;
mod records;
mod retention;
#[cfg(test)]
mod tests;

pub use records::*;

/// The aggregator's database.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    tasks: Tree,
    keys: Tree,
    seen: Tree,
    pending: Tree,
    jobs: Tree,
    helper_jobs: Tree,
    batches: Tree,
    stats: Tree,
    tenants: Tree,
    ledger: Tree,
    collections: Tree,
    collected: Tree,
    released: Tree,
    window_batches: Tree,
    batch_collections: Tree,
    late: Tree,
    collection_ends: Tree,
    audit: crate::audit::AuditLog,
}

impl Store {
    /// The `keys` tree (the key manager reads and writes it).
    pub(crate) fn keys_tree(&self) -> &Tree {
        &self.keys
    }

    /// The database.
    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Writes and flushes a probe record: whether the store takes writes now (health).
    pub async fn probe_write(&self, now_s: u64) -> Result<()> {
        Ok(hush_server::db::probe_write(&self.db, now_s).await?)
    }

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open(dir, cache_mb)?;
        Ok(Self {
            tasks: db.open_tree("tasks")?,
            keys: db.open_tree("keys")?,
            seen: db.open_tree("seen")?,
            pending: db.open_tree("pending")?,
            jobs: db.open_tree("jobs")?,
            helper_jobs: db.open_tree("helper_jobs")?,
            batches: db.open_tree("batches")?,
            stats: db.open_tree("stats")?,
            tenants: db.open_tree("tenants")?,
            ledger: db.open_tree("ledger")?,
            collections: db.open_tree("collections")?,
            collected: db.open_tree("collected")?,
            released: db.open_tree("released")?,
            window_batches: db.open_tree("window_batches")?,
            batch_collections: db.open_tree("batch_collections")?,
            late: db.open_tree("late")?,
            collection_ends: db.open_tree("collection_ends")?,
            audit: crate::audit::AuditLog::open(&db)?,
            db,
        })
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        Ok(hush_server::db::flush(&self.db).await?)
    }

    /// The audit trail.
    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    /// A fresh, increasing sequence number.
    pub fn next_seq(&self) -> Result<u64> {
        Ok(self.db.generate_id()?)
    }

    /// Stores a task unless one with the same id exists; returns the existing one if so.
    pub fn put_task(&self, id: &TaskId, encoded: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let prev =
            self.tasks
                .compare_and_swap(id.as_bytes(), None as Option<&[u8]>, Some(encoded))?;
        Ok(prev.err().and_then(|e| e.current.map(|v| v.to_vec())))
    }

    /// All stored tasks, encoded.
    pub fn tasks(&self) -> Result<Vec<Vec<u8>>> {
        self.tasks
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// Sets the hash of a tenant's collector token, durably.
    pub async fn set_tenant_token_hash(&self, tenant: &str, hash: [u8; 32]) -> Result<()> {
        self.tenants.insert(tenant.as_bytes(), &hash[..])?;
        self.flush().await
    }

    /// The hash of a tenant's collector token.
    pub fn tenant_token_hash(&self, tenant: &str) -> Result<Option<[u8; 32]>> {
        Ok(self
            .tenants
            .get(tenant.as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok()))
    }

    /// The tenant whose collector token hashes to `hash`, if any.
    pub fn tenant_of_token_hash(&self, hash: &[u8; 32]) -> Result<Option<String>> {
        for kv in self.tenants.iter() {
            let (k, v) = kv?;
            if v.as_ref() == hash {
                return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
            }
        }
        Ok(None)
    }

    /// Every tree of the database with its number of entries.
    pub fn tree_sizes(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = [
            ("tasks", &self.tasks),
            ("keys", &self.keys),
            ("seen", &self.seen),
            ("pending", &self.pending),
            ("jobs", &self.jobs),
            ("helper_jobs", &self.helper_jobs),
            ("batches", &self.batches),
            ("stats", &self.stats),
            ("tenants", &self.tenants),
            ("ledger", &self.ledger),
            ("collections", &self.collections),
            ("collected", &self.collected),
            ("released", &self.released),
            ("window_batches", &self.window_batches),
            ("batch_collections", &self.batch_collections),
            ("late", &self.late),
            ("collection_ends", &self.collection_ends),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.len()))
        .collect();
        out.push(("audit".to_owned(), self.audit.len()));
        out
    }
}
