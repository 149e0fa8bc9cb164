//! The aggregator's database (sled by default, or PostgreSQL: [`backend`]).
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `tasks` | task id | the task (protobuf `CreateTaskRequest`) |
//! | `keys` | `"keyset"` | the HPKE [`KeySet`] |
//! | `seen` | task ‖ time ‖ report id | — (anti-replay; expires with the task's report expiry) |
//! | `pending` | task ‖ seq | a leader's accepted, not yet aggregated reports of one task from one ingest request, at most a job's worth ([`PendingRecord`]; on sled, where each of them is in a pending file: [`files`]) |
//! | `jobs` | job id | a leader's aggregation job in flight (task, record seqs, report count) |
//! | `helper_jobs` | task ‖ job id | request hash and response of a helper's finished job |
//! | `helper_job_times` | commit time ‖ task ‖ job id | — (finds helper jobs past `helper_job_retention_s`) |
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
//! On sled the pending reports' bytes are in append-only files in `data_dir/pending`, written
//! and synced before the transaction that records where they are ([`files`]).
//!
//! Every change that must be atomic is one transaction over the tables involved: storing a
//! batch of ingested reports with their anti-replay entries (refusing reports of closed windows),
//! finishing an aggregation job (accumulating output shares into windows not yet released,
//! removing the reports, recording the outcome), and committing a collection (checking the batch
//! rules, checking and spending the budget of every window, recording the answer, closing and
//! releasing the windows). Transactions are serializable on both backends, so a check inside
//! one cannot race a commit of another: no report enters a window after its share has left. A crash before a
//! transaction commits loses nothing that was acknowledged; after it, nothing is counted twice.

use std::path::Path;

use hush_protocol::TaskId;

use crate::error::Result;

pub(crate) mod backend;
mod collection;
mod files;
mod ingest;
mod jobs;
pub(crate) mod pg;
mod records;
mod retention;
mod seen;
#[cfg(test)]
mod tests;
pub mod throwaway;

use backend::{Backend, Keys, SledBackend, T, transact};
pub use jobs::{Lease, NewJob};
pub use pg::PgSettings;
pub use records::*;

/// The aggregator's database: sled or PostgreSQL, the same records and transactions on both.
#[derive(Clone, Debug)]
pub struct Store {
    pub(crate) backend: Backend,
    audit: crate::audit::AuditLog,
    /// Held while a job is created and while retention picks the pending reports to delete:
    /// retention leaves out the reports of recorded jobs, so a job recorded between its reading
    /// the jobs and its deleting could otherwise lose a report it holds. (On PostgreSQL the
    /// delete itself also skips claimed rows, for other replicas.)
    pending_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Store {
    /// The sled database, if the store is on sled.
    pub fn sled_db(&self) -> Option<&sled::Db> {
        match &self.backend {
            Backend::Sled(s) => Some(s.db()),
            Backend::Pg(_) => None,
        }
    }

    /// Whether other processes may share this database (PostgreSQL replicas).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Pg(_))
    }

    /// Which backend, for logs: `sled` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match &self.backend {
            Backend::Sled(_) => "sled",
            Backend::Pg(_) => "postgres",
        }
    }

    /// Writes a probe record and makes it durable: whether the store takes writes now (health).
    pub async fn probe_write(&self, now_s: u64) -> Result<()> {
        self.backend
            .apply(
                T::Health,
                vec![(b"probe".to_vec(), Some(now_s.to_be_bytes().to_vec()))],
            )
            .await?;
        self.flush().await
    }

    /// Opens (or creates) the sled database in `dir`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open(dir, cache_mb)?;
        Self::with_backend(Backend::Sled(SledBackend::new(db, &dir.join("pending"))?))
    }

    /// Connects to PostgreSQL, applying the schema migrations this binary ships.
    pub async fn connect(settings: &PgSettings) -> Result<Self> {
        Self::with_backend(Backend::Pg(Box::new(
            pg::PgBackend::connect(settings).await?,
        )))
    }

    /// Opens the store an aggregator's configuration names: sled in `data_dir`, or the
    /// PostgreSQL database whose URL is in the `[store] url_env` variable.
    pub async fn from_config(config: &crate::config::AggregatorConfig) -> Result<Self> {
        Self::from_config_with(config, true).await
    }

    /// The same for a tool beside running aggregators: on PostgreSQL nothing is created or
    /// migrated, and a schema of another version is refused.
    pub async fn from_config_existing(config: &crate::config::AggregatorConfig) -> Result<Self> {
        Self::from_config_with(config, false).await
    }

    async fn from_config_with(
        config: &crate::config::AggregatorConfig,
        migrate: bool,
    ) -> Result<Self> {
        use crate::config::StoreKind;
        match config.store.kind {
            StoreKind::Sled => Self::open(&config.data_dir, config.cache_mb),
            StoreKind::Postgres => {
                let url = std::env::var(&config.store.url_env).map_err(|_| {
                    crate::Error::config(format!(
                        "[store] kind = \"postgres\" reads the database URL from ${}, which is \
                         not set; export it (postgres://user:password@host:port/database)",
                        config.store.url_env
                    ))
                })?;
                let settings = PgSettings {
                    url,
                    schema: config.store.schema.clone(),
                    pool_size: config.store.pool_size,
                };
                let backend = if migrate {
                    pg::PgBackend::connect(&settings).await?
                } else {
                    pg::PgBackend::connect_existing(&settings).await?
                };
                Self::with_backend(Backend::Pg(Box::new(backend)))
            }
        }
    }

    fn with_backend(backend: Backend) -> Result<Self> {
        Ok(Self {
            audit: crate::audit::AuditLog::new(backend.clone()),
            backend,
            pending_lock: Default::default(),
        })
    }

    /// Runs `f` on a clone of the store: on a blocking thread when the store is sled (its
    /// transactions hold the thread), on this task when it is PostgreSQL (its calls wait on the
    /// network, not the CPU).
    pub async fn run<R, F, Fut>(&self, f: F) -> Result<R>
    where
        F: FnOnce(Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<R>> + Send,
        R: Send + 'static,
    {
        let store = self.clone();
        match &self.backend {
            Backend::Sled(_) => {
                let handle = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || handle.block_on(f(store)))
                    .await
                    .map_err(hush_server::ServerError::from)?
            }
            Backend::Pg(_) => f(store).await,
        }
    }

    /// Records that this store belongs to `role` (the first process to open it decides), or
    /// refuses a store another role keeps: a leader and a helper on one store would share one
    /// HPKE key set and mix their aggregates and ledgers.
    pub async fn claim_role(&self, role: hush_protocol::Role) -> Result<()> {
        let mine = role.as_str().as_bytes().to_vec();
        match self
            .backend
            .insert_new(T::Meta, b"role", mine.clone())
            .await?
        {
            None => self.flush().await,
            Some(held) if held == mine => Ok(()),
            Some(held) => Err(crate::Error::config(format!(
                "this store belongs to the {} (it opened it first); give the {role} its own {}",
                String::from_utf8_lossy(&held),
                match self.backend {
                    Backend::Sled(_) => "data_dir",
                    Backend::Pg(_) => "database or [store] schema",
                }
            ))),
        }
    }

    /// Makes everything written so far durable.
    pub async fn flush(&self) -> Result<()> {
        self.backend.flush().await
    }

    /// The audit trail.
    pub fn audit(&self) -> &crate::audit::AuditLog {
        &self.audit
    }

    /// A fresh, increasing sequence number (unique across replicas of one database).
    pub async fn next_seq(&self) -> Result<u64> {
        self.backend.next_seq().await
    }

    /// `n` fresh sequence numbers (one round trip on PostgreSQL).
    pub async fn next_seqs(&self, n: usize) -> Result<Vec<u64>> {
        self.backend.next_seqs(n).await
    }

    /// Stores a task unless one with the same id exists; returns the existing one if so.
    pub async fn put_task(&self, id: &TaskId, encoded: Vec<u8>) -> Result<Option<Vec<u8>>> {
        self.backend
            .insert_new(T::Tasks, id.as_bytes(), encoded)
            .await
    }

    /// All stored tasks, encoded.
    pub async fn tasks(&self) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .backend
            .entries(T::Tasks, Keys::All)
            .await?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    /// Sets the hash of a tenant's collector token, durably.
    pub async fn set_tenant_token_hash(&self, tenant: &str, hash: [u8; 32]) -> Result<()> {
        self.backend
            .apply(
                T::Tenants,
                vec![(tenant.as_bytes().to_vec(), Some(hash.to_vec()))],
            )
            .await?;
        self.flush().await
    }

    /// The hash of a tenant's collector token.
    pub async fn tenant_token_hash(&self, tenant: &str) -> Result<Option<[u8; 32]>> {
        Ok(self
            .backend
            .get(T::Tenants, tenant.as_bytes())
            .await?
            .and_then(|v| v.as_slice().try_into().ok()))
    }

    /// The tenant whose collector token hashes to `hash`, if any.
    pub async fn tenant_of_token_hash(&self, hash: &[u8; 32]) -> Result<Option<String>> {
        Ok(self
            .backend
            .entries(T::Tenants, Keys::All)
            .await?
            .into_iter()
            .find(|(_, v)| v.as_slice() == hash)
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned()))
    }

    /// Every table of the database with its number of entries (on sled, and `pending files`
    /// with the number of pending files).
    pub async fn tree_sizes(&self) -> Result<Vec<(String, u64)>> {
        self.backend.sizes().await
    }
}
