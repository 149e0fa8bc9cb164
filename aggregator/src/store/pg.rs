//! The PostgreSQL backend: one table `(key bytea primary key, value bytea)` per store table, a
//! sequence for report sequence numbers, migrations applied at start under an advisory lock (so
//! replicas starting together apply each once), a connection pool, and `SERIALIZABLE`
//! transactions that are run again on a serialization failure.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{IsolationLevel, NoTls};

use super::backend::{Keys, PendingChange, Pick, T, TxError, TxResult, Txn, Writes};
use crate::error::{Error, Result};

/// How often a transaction is tried before a serialization failure is returned.
const ATTEMPTS: u32 = 50;

/// Rows read per page when scanning.
const PAGE: i64 = 1_000;

/// The migrations, in order. A migration is never changed once shipped: a change is a new one.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "tables, sequence", MIGRATION_1),
    (2, "job leases", MIGRATION_2),
    (3, "store metadata", MIGRATION_3),
    (4, "pending records", MIGRATION_4),
    (5, "helper jobs by commit time", MIGRATION_5),
];

/// Helper job records by commit time (`committed ‖ task ‖ job`, no value), so expiry reads only
/// what expires; the records already stored get theirs from the commit time in their value
/// (bytes 2–9, big-endian, after the version byte). A trigger does the same for every record
/// inserted later, so the records a helper replica still on an older binary writes during a
/// rolling upgrade expire too (this binary writes the entry itself as well: the second write
/// does nothing).
const MIGRATION_5: &str = r#"
CREATE TABLE IF NOT EXISTS "helper_job_times" (key bytea PRIMARY KEY, value bytea NOT NULL);
INSERT INTO "helper_job_times" (key, value)
    SELECT substring(value from 2 for 8) || key, ''::bytea FROM "helper_jobs"
    ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION hush_index_helper_job() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
    EXECUTE format(
        'INSERT INTO %I."helper_job_times" (key, value) VALUES ($1, $2) ON CONFLICT DO NOTHING',
        TG_TABLE_SCHEMA
    ) USING substring(NEW.value from 2 for 8) || NEW.key, ''::bytea;
    RETURN NULL;
END
$f$;
DROP TRIGGER IF EXISTS helper_jobs_indexed ON "helper_jobs";
CREATE TRIGGER helper_jobs_indexed AFTER INSERT ON "helper_jobs"
    FOR EACH ROW EXECUTE FUNCTION hush_index_helper_job();
"#;

/// Pending reports are kept as records of one ingest request's reports of a task (2026-11-28),
/// which a binary before them cannot read: this version makes such a binary refuse to start on
/// the schema instead of failing on the records. Nothing changes in the tables.
const MIGRATION_4: &str = r#"
COMMENT ON TABLE "pending" IS 'hush: one record per ingest request and task (format 2)';
"#;

/// What the store belongs to (the aggregator role that first opened it).
const MIGRATION_3: &str = r#"
CREATE TABLE IF NOT EXISTS "meta" (key bytea PRIMARY KEY, value bytea NOT NULL);
"#;

/// The job a pending report is in, and who holds each job until when (milliseconds since the
/// epoch, the database's clock), so replicas share the jobs and take over a dead one's.
const MIGRATION_2: &str = r#"
ALTER TABLE "pending" ADD COLUMN IF NOT EXISTS job bytea;
CREATE INDEX IF NOT EXISTS pending_unclaimed ON "pending" (key) WHERE job IS NULL;
ALTER TABLE "jobs" ADD COLUMN IF NOT EXISTS owner text NOT NULL DEFAULT '';
ALTER TABLE "jobs" ADD COLUMN IF NOT EXISTS lease_until bigint NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS jobs_by_lease ON "jobs" (lease_until);
"#;

/// Now on the database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// How many reports the pending record in `value` holds, in SQL: the big-endian count after a
/// version 2 header, or one for a record of the earlier format
/// ([`super::PendingRecord::count_encoded`]). Only the first five bytes are read (a large
/// record is stored out of line, and a substring fetches only its first chunk).
const RECORD_REPORTS: &str = "(CASE \
     WHEN octet_length(substring(value from 1 for 5)) < 5 THEN 1 \
     WHEN get_byte(substring(value from 1 for 1), 0) <> 2 THEN 1 \
     ELSE ('x' || encode(substring(value from 2 for 4), 'hex'))::bit(32)::bigint END)";

const MIGRATION_1: &str = r#"
CREATE SEQUENCE IF NOT EXISTS hush_seq START 1;
CREATE TABLE IF NOT EXISTS "tasks" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "keys" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "seen" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "pending" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "jobs" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "helper_jobs" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "batches" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "stats" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "tenants" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "ledger" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "collections" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "collected" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "released" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "window_batches" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "batch_collections" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "late" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "collection_ends" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "audit" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "audit_head" (key bytea PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS "health" (key bytea PRIMARY KEY, value bytea NOT NULL);
"#;

/// Where the database is and how many connections to keep.
#[derive(Clone)]
pub struct PgSettings {
    /// A `postgres://` URL or a `key=value` connection string.
    pub url: String,
    /// The schema the tables live in (created if missing).
    pub schema: String,
    /// Connections in the pool.
    pub pool_size: usize,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgSettings")
            .field("schema", &self.schema)
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

/// A pool of connections to one database, shared by a process's store.
#[derive(Clone)]
pub(crate) struct PgBackend {
    pool: Pool,
    config: tokio_postgres::Config,
    serial: Arc<tokio::sync::Mutex<()>>,
    settings: PgSettings,
}

impl std::fmt::Debug for PgBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the URL: it may hold a password.
        f.debug_struct("PgBackend")
            .field("schema", &self.settings.schema)
            .finish_non_exhaustive()
    }
}

fn db_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Server(hush_server::ServerError::Database(format!("{what}: {e}")))
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        db_err("PostgreSQL", e)
    }
}

/// The connection is not encrypted (no TLS in this version): refuses a database on another host,
/// which the store's contents (HPKE private keys, report shares) would cross in the clear. A
/// Unix socket or a loopback address is the only transport allowed.
fn check_transport(config: &tokio_postgres::Config) -> Result<()> {
    use tokio_postgres::config::Host;
    for h in config.get_hosts() {
        let local = match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        };
        if !local {
            return Err(Error::config(format!(
                "the PostgreSQL URL names host {h:?}, but this version connects without TLS, so \
                 the store (HPKE private keys, report shares) would cross the network in the \
                 clear: run PostgreSQL on this host (a Unix socket or 127.0.0.1), or tunnel to \
                 it (e.g. stunnel or an SSH tunnel ending on 127.0.0.1)"
            )));
        }
    }
    Ok(())
}

/// Whether a schema name is a plain identifier (it is spliced into SQL).
fn plain_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

impl PgBackend {
    /// Connects, creates the schema if missing and applies the migrations not applied yet.
    pub(crate) async fn connect(s: &PgSettings) -> Result<Self> {
        let me = Self::connect_only(s).await?;
        me.migrate().await?;
        Ok(me)
    }

    /// Connects to a store the aggregators made, changing nothing: refused unless its schema is
    /// at the version this binary knows (tools beside running replicas).
    pub(crate) async fn connect_existing(s: &PgSettings) -> Result<Self> {
        let me = Self::connect_only(s).await?;
        let c = me.client().await?;
        let version: Option<i32> = c
            .query_one("SELECT max(version) FROM hush_migrations", &[])
            .await
            .map_err(|e| {
                Error::config(format!(
                    "no hush store in schema {:?} ({e}); start an aggregator on it first",
                    s.schema
                ))
            })?
            .get(0);
        let known = MIGRATIONS.len() as i32;
        if version != Some(known) {
            return Err(Error::config(format!(
                "the store's schema is at version {}, and this hush knows version {known}: use \
                 the hush the aggregators run",
                version.unwrap_or(0)
            )));
        }
        Ok(me)
    }

    async fn connect_only(s: &PgSettings) -> Result<Self> {
        if !plain_identifier(&s.schema) {
            return Err(Error::config(format!(
                "[store] schema {:?} must be lowercase letters, digits and '_' (at most 63, not \
                 starting with a digit)",
                s.schema
            )));
        }
        let mut config = tokio_postgres::Config::from_str(&s.url).map_err(|e| {
            Error::config(format!(
                "the PostgreSQL URL does not parse ({e}); expected postgres://user:password@host:port/database"
            ))
        })?;
        config.options(format!("-c search_path={}", s.schema));
        // A database that does not answer fails a call instead of stalling it.
        config.connect_timeout(std::time::Duration::from_secs(5));
        check_transport(&config)?;
        let mgr = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(s.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| db_err("the PostgreSQL pool", e))?;
        Ok(Self {
            pool,
            config,
            serial: Default::default(),
            settings: s.clone(),
        })
    }

    async fn migrate(&self) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // One replica migrates at a time, from the first statement on (two concurrent
        // `CREATE … IF NOT EXISTS` can collide); the others find the work done.
        tx.execute("SELECT pg_advisory_xact_lock(7234012)", &[])
            .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.hush_migrations (
                 version integer PRIMARY KEY,
                 name text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
            schema = self.settings.schema
        ))
        .await?;
        let done: Vec<i32> = tx
            .query("SELECT version FROM hush_migrations", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if let Some(newer) = done.iter().find(|v| **v > MIGRATIONS.len() as i32) {
            return Err(Error::config(format!(
                "the database schema is at version {newer}, newer than this binary knows ({}); \
                 run the newer hush, or restore a backup taken before the upgrade",
                MIGRATIONS.len()
            )));
        }
        for (version, name, sql) in MIGRATIONS {
            if done.contains(version) {
                continue;
            }
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO hush_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            tracing::info!(version, name, "applied a database migration");
        }
        tx.commit().await?;
        Ok(())
    }

    /// What it was connected with.
    #[cfg(test)]
    pub(crate) fn settings(&self) -> &PgSettings {
        &self.settings
    }

    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<Object> {
        self.pool
            .get()
            .await
            .map_err(|e| db_err("no PostgreSQL connection", e))
    }

    /// Held while a transaction runs: one transaction of this process at a time, as sled does.
    pub(crate) async fn serial(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.serial.lock().await
    }

    pub(super) async fn get(&self, t: T, k: &[u8]) -> Result<Option<Vec<u8>>> {
        let c = self.client().await?;
        let sql = format!(r#"SELECT value FROM "{}" WHERE key = $1"#, t.name());
        Ok(c.query_opt(&sql, &[&k]).await?.map(|r| r.get(0)))
    }

    pub(super) async fn get_many(&self, t: T, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        let c = self.client().await?;
        let sql = format!(
            r#"SELECT key, value FROM "{}" WHERE key = ANY($1)"#,
            t.name()
        );
        let found: BTreeMap<Vec<u8>, Vec<u8>> = c
            .query(&sql, &[&keys])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
    }

    pub(super) async fn scan(
        &self,
        t: T,
        keys: Keys<'_>,
        limit: usize,
        pick: impl Fn(&[u8], &[u8]) -> Pick + Send,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let c = self.client().await?;
        let (lo, hi) = keys.bounds();
        let page = |op: &str| {
            format!(
                r#"SELECT key, value FROM "{}" WHERE key {op} $1 AND ($2::bytea IS NULL OR key < $2)
                   ORDER BY key LIMIT $3"#,
                t.name()
            )
        };
        let (first, next) = (page(">="), page(">"));
        let mut out = Vec::new();
        let mut after = lo;
        let mut sql = &first;
        loop {
            let rows = c.query(sql.as_str(), &[&after, &hi, &PAGE]).await?;
            sql = &next;
            let n = rows.len();
            for r in rows {
                if out.len() >= limit {
                    return Ok(out);
                }
                let k: Vec<u8> = r.get(0);
                let v: Vec<u8> = r.get(1);
                match pick(&k, &v) {
                    Pick::Take => out.push((k.clone(), v)),
                    Pick::Skip => {}
                    Pick::Stop => return Ok(out),
                }
                after = k;
            }
            if (n as i64) < PAGE || out.len() >= limit {
                return Ok(out);
            }
        }
    }

    pub(super) async fn keys(&self, t: T, keys: Keys<'_>) -> Result<Vec<Vec<u8>>> {
        let c = self.client().await?;
        let (lo, hi) = keys.bounds();
        let rows = match hi {
            Some(hi) => {
                let sql = format!(
                    r#"SELECT key FROM "{}" WHERE key >= $1 AND key < $2 ORDER BY key"#,
                    t.name()
                );
                c.query(&sql, &[&lo, &hi]).await?
            }
            None => {
                let sql = format!(
                    r#"SELECT key FROM "{}" WHERE key >= $1 ORDER BY key"#,
                    t.name()
                );
                c.query(&sql, &[&lo]).await?
            }
        };
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(super) async fn count(&self, t: T, keys: Keys<'_>) -> Result<u64> {
        self.sum(t, keys, "count(*)").await
    }

    /// The reports the pending records among `keys` hold.
    pub(super) async fn count_pending(&self, keys: Keys<'_>) -> Result<u64> {
        self.sum(
            T::Pending,
            keys,
            &format!("COALESCE(SUM({RECORD_REPORTS}), 0)::bigint"),
        )
        .await
    }

    /// The keys of the unclaimed pending records that hold more than `max` reports.
    pub(super) async fn oversize_pending(&self, max: u64) -> Result<Vec<Vec<u8>>> {
        let c = self.client().await?;
        Ok(c.query(
            &format!(
                r#"SELECT key FROM "pending" WHERE job IS NULL AND {RECORD_REPORTS} > $1
                       ORDER BY key"#
            ),
            &[&(max as i64)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
    }

    /// `what` (a bigint aggregate) over the rows of `t` among `keys`.
    async fn sum(&self, t: T, keys: Keys<'_>, what: &str) -> Result<u64> {
        let c = self.client().await?;
        let (lo, hi) = keys.bounds();
        let row = match hi {
            Some(hi) => {
                let sql = format!(
                    r#"SELECT {what} FROM "{}" WHERE key >= $1 AND key < $2"#,
                    t.name()
                );
                c.query_one(&sql, &[&lo, &hi]).await?
            }
            None => {
                let sql = format!(r#"SELECT {what} FROM "{}" WHERE key >= $1"#, t.name());
                c.query_one(&sql, &[&lo]).await?
            }
        };
        Ok(row.get::<_, i64>(0) as u64)
    }

    pub(super) async fn apply(&self, t: T, writes: Writes) -> Result<()> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        write_table(&tx, t, writes.into_iter().collect()).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn insert_new(&self, t: T, k: &[u8], v: Vec<u8>) -> Result<Option<Vec<u8>>> {
        let c = self.client().await?;
        let sql = format!(
            r#"INSERT INTO "{}" (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING"#,
            t.name()
        );
        if c.execute(&sql, &[&k, &v]).await? == 1 {
            return Ok(None);
        }
        let sql = format!(r#"SELECT value FROM "{}" WHERE key = $1"#, t.name());
        Ok(c.query_opt(&sql, &[&k]).await?.map(|r| r.get(0)))
    }

    pub(super) async fn next_seq(&self) -> Result<u64> {
        let c = self.client().await?;
        let row = c.query_one("SELECT nextval('hush_seq')", &[]).await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Each store table's estimated rows and bytes on disk (indexes included).
    pub(crate) async fn table_stats(&self) -> Result<Vec<(String, f64, f64)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT c.relname::text, c.reltuples::float8, pg_total_relation_size(c.oid)::float8
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind = 'r' AND c.relname <> 'hush_migrations'",
                &[&self.settings.schema],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub(super) async fn next_seqs(&self, n: usize) -> Result<Vec<u64>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT nextval('hush_seq') FROM generate_series(1, $1::bigint)",
                &[&(n as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0) as u64).collect())
    }

    /// Claims pending records of the task whose keys are in `[lo, hi)` that no job holds
    /// (skipping rows another replica is claiming), those in key order whose reports add up to
    /// at most `limit` (the first one always), records them as job `id` held by `lease`, in one
    /// transaction; returns their keys in order with their report counts (none: no job).
    pub(crate) async fn claim_job(
        &self,
        lo: &[u8],
        hi: &[u8],
        limit: usize,
        id: &[u8],
        job: impl FnOnce(&[(Vec<u8>, u64)]) -> Vec<u8>,
        lease: &super::Lease,
    ) -> Result<Vec<(Vec<u8>, u64)>> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        // Up to `limit` unclaimed records are locked (each holds at least one report), then
        // those in key order whose running total of reports stays within `limit` are claimed:
        // the first one always. The others are unlocked at commit.
        let mut claimed: Vec<(Vec<u8>, u64)> = tx
            .query(
                &format!(
                    r#"WITH picked AS (
                           SELECT key, {RECORD_REPORTS} AS n FROM "pending"
                           WHERE key >= $1 AND key < $2 AND job IS NULL
                           ORDER BY key LIMIT $3::bigint FOR UPDATE SKIP LOCKED),
                       sized AS (
                           SELECT key, n, SUM(n) OVER (ORDER BY key) AS upto FROM picked),
                       chosen AS (SELECT key, n FROM sized WHERE upto <= $3::bigint OR upto = n)
                       UPDATE "pending" SET job = $4 FROM chosen
                       WHERE "pending".key = chosen.key
                       RETURNING "pending".key, chosen.n"#
                ),
                &[&lo, &hi, &(limit.max(1) as i64), &id],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as u64))
            .collect();
        if claimed.is_empty() {
            tx.rollback().await?;
            return Ok(claimed);
        }
        claimed.sort();
        let value = job(&claimed);
        tx.execute(
            &format!(
                r#"INSERT INTO "jobs" (key, value, owner, lease_until)
                   VALUES ($1, $2, $3, {NOW_MS} + $4)"#
            ),
            &[&id, &value, &lease.owner, &(lease.ms as i64)],
        )
        .await?;
        tx.commit().await?;
        Ok(claimed)
    }

    /// Takes over up to `limit` jobs whose lease ran out (their replica stopped or stalled):
    /// each is held by `owner` for `lease_ms` from now. Returns their ids and records.
    pub(crate) async fn take_expired_jobs(
        &self,
        owner: &str,
        lease_ms: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                &format!(
                    r#"UPDATE "jobs" SET owner = $1, lease_until = {NOW_MS} + $2
                       WHERE key IN (
                           SELECT key FROM "jobs" WHERE lease_until < {NOW_MS}
                           ORDER BY lease_until LIMIT $3 FOR UPDATE SKIP LOCKED)
                       RETURNING key, value"#
                ),
                &[&owner, &(lease_ms as i64), &(limit as i64)],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Extends the leases `owner` holds on `ids` to `lease_ms` from now; returns how many it
    /// still held.
    pub(crate) async fn renew_leases(
        &self,
        owner: &str,
        ids: &[Vec<u8>],
        lease_ms: u64,
    ) -> Result<u64> {
        let c = self.client().await?;
        Ok(c.execute(
            &format!(
                r#"UPDATE "jobs" SET lease_until = {NOW_MS} + $2
                   WHERE owner = $1 AND key = ANY($3)"#
            ),
            &[&owner, &(lease_ms as i64), &ids],
        )
        .await?)
    }

    /// Runs `f` with a connection of its own on a thread of its own, waiting for it: for the
    /// store's few synchronous callers (the key manager, the audit trail), which must not wait
    /// on this process's runtime from inside it.
    pub(crate) fn blocking<R: Send>(
        &self,
        f: impl for<'c> FnOnce(
            &'c mut tokio_postgres::Client,
        )
            -> std::pin::Pin<Box<dyn Future<Output = Result<R>> + Send + 'c>>
        + Send,
    ) -> Result<R> {
        let config = self.config.clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| db_err("a runtime for a database call", e))?;
                rt.block_on(async move {
                    let (mut client, conn) = config.connect(NoTls).await?;
                    let conn = tokio::spawn(conn);
                    let r = f(&mut client).await;
                    drop(client);
                    let _ = conn.await;
                    r
                })
            })
            .join()
            .map_err(|_| db_err("a database call", "its thread panicked"))?
        })
    }
}

use std::future::Future;

/// Sets and deletes keys of `t` in two statements.
async fn write_table(
    tx: &tokio_postgres::Transaction<'_>,
    t: T,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
) -> std::result::Result<(), tokio_postgres::Error> {
    let mut set_k: Vec<&[u8]> = Vec::new();
    let mut set_v: Vec<&[u8]> = Vec::new();
    let mut del: Vec<&[u8]> = Vec::new();
    for (k, v) in &writes {
        match v {
            Some(v) => {
                set_k.push(k);
                set_v.push(v);
            }
            None => del.push(k),
        }
    }
    if !set_k.is_empty() {
        let sql = format!(
            r#"INSERT INTO "{}" (key, value) SELECT * FROM unnest($1::bytea[], $2::bytea[])
               ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value"#,
            t.name()
        );
        tx.execute(&sql, &[&set_k, &set_v]).await?;
    }
    if !del.is_empty() {
        let sql = format!(r#"DELETE FROM "{}" WHERE key = ANY($1)"#, t.name());
        tx.execute(&sql, &[&del]).await?;
    }
    Ok(())
}

/// A `SERIALIZABLE` transaction whose writes are kept until it commits.
pub(crate) struct PgTx<'a> {
    tx: tokio_postgres::Transaction<'a>,
    writes: BTreeMap<T, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<'a> PgTx<'a> {
    /// Begins a transaction on `client`.
    pub(crate) async fn begin(client: &'a mut tokio_postgres::Client) -> Result<Self> {
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::Serializable)
            .start()
            .await?;
        Ok(Self {
            tx,
            writes: BTreeMap::new(),
        })
    }

    fn written(&self, t: T, k: &[u8]) -> Option<Option<Vec<u8>>> {
        self.writes.get(&t).and_then(|w| w.get(k)).cloned()
    }
}

impl Txn for PgTx<'_> {
    fn get(&mut self, t: T, k: &[u8]) -> impl Future<Output = TxResult<Option<Vec<u8>>>> + Send {
        let written = self.written(t, k);
        let k = k.to_vec();
        async move {
            if let Some(v) = written {
                return Ok(v);
            }
            let sql = format!(r#"SELECT value FROM "{}" WHERE key = $1"#, t.name());
            Ok(self.tx.query_opt(&sql, &[&k]).await?.map(|r| r.get(0)))
        }
    }

    fn get_many(
        &mut self,
        t: T,
        keys: &[Vec<u8>],
    ) -> impl Future<Output = TxResult<Vec<Option<Vec<u8>>>>> + Send {
        let mut out: Vec<Option<Option<Vec<u8>>>> =
            keys.iter().map(|k| self.written(t, k)).collect();
        let ask: Vec<Vec<u8>> = keys
            .iter()
            .zip(&out)
            .filter(|(_, w)| w.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let keys = keys.to_vec();
        async move {
            if !ask.is_empty() {
                let sql = format!(
                    r#"SELECT key, value FROM "{}" WHERE key = ANY($1)"#,
                    t.name()
                );
                let found: BTreeMap<Vec<u8>, Vec<u8>> = self
                    .tx
                    .query(&sql, &[&ask])
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                for (k, o) in keys.iter().zip(out.iter_mut()) {
                    if o.is_none() {
                        *o = Some(found.get(k).cloned());
                    }
                }
            }
            Ok(out.into_iter().map(Option::flatten).collect())
        }
    }

    fn insert(&mut self, t: T, k: &[u8], v: &[u8]) -> TxResult<()> {
        self.writes
            .entry(t)
            .or_default()
            .insert(k.to_vec(), Some(v.to_vec()));
        Ok(())
    }

    fn remove(&mut self, t: T, k: &[u8]) -> TxResult<()> {
        self.writes.entry(t).or_default().insert(k.to_vec(), None);
        Ok(())
    }

    fn replace_unclaimed_pending(
        &mut self,
        changes: &[PendingChange],
    ) -> impl Future<Output = TxResult<Vec<usize>>> + Send {
        let (mut gone, mut gone_old, mut gone_at) = (Vec::new(), Vec::new(), Vec::new());
        let (mut kept, mut kept_old, mut kept_new, mut kept_at) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (k, old, new)) in changes.iter().enumerate() {
            match new {
                None => {
                    gone.push(k.clone());
                    gone_old.push(old.clone());
                    gone_at.push(i);
                }
                Some(v) => {
                    kept.push(k.clone());
                    kept_old.push(old.clone());
                    kept_new.push(v.clone());
                    kept_at.push(i);
                }
            }
        }
        async move {
            // In this transaction, and only rows unclaimed and unchanged since they were read: a
            // replica claiming or trimming one of them meanwhile holds its lock, and the other
            // statement fails to serialize and runs again, or finds the row changed and leaves it.
            let mut done: Vec<usize> = Vec::new();
            if !gone.is_empty() {
                let rows = self
                    .tx
                    .query(
                        r#"DELETE FROM "pending" p USING unnest($1::bytea[], $2::bytea[]) AS c(k, v)
                           WHERE p.key = c.k AND p.value = c.v AND p.job IS NULL
                           RETURNING p.key"#,
                        &[&gone, &gone_old],
                    )
                    .await?;
                done.extend(applied(&rows, &gone_at, &gone));
            }
            if !kept.is_empty() {
                let rows = self
                    .tx
                    .query(
                        r#"UPDATE "pending" p SET value = c.n
                           FROM unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS c(k, v, n)
                           WHERE p.key = c.k AND p.value = c.v AND p.job IS NULL
                           RETURNING p.key"#,
                        &[&kept, &kept_old, &kept_new],
                    )
                    .await?;
                done.extend(applied(&rows, &kept_at, &kept));
            }
            done.sort_unstable();
            Ok(done)
        }
    }
}

/// The indices (`at`, beside `keys`) of the changes whose keys a statement returned in `rows`.
fn applied(rows: &[tokio_postgres::Row], at: &[usize], keys: &[Vec<u8>]) -> Vec<usize> {
    let hit: std::collections::HashSet<Vec<u8>> = rows.iter().map(|r| r.get(0)).collect();
    at.iter()
        .zip(keys)
        .filter(|(_, k)| hit.contains(*k))
        .map(|(i, _)| *i)
        .collect()
}

/// What to do after a transaction body ran.
pub(crate) enum Finish<R> {
    /// Committed, or failed for good.
    Done(Result<R>),
    /// A serialization failure: run it again.
    Again,
}

/// A short random pause before attempt `attempt + 1`, growing with the attempts, so replicas
/// that keep conflicting spread out.
pub(crate) async fn pause(attempt: u32) {
    let ms = rand::random::<u64>() % (2 * u64::from(attempt.min(20)) + 1);
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
}

fn retryable(e: &tokio_postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

/// Commits `tx` if the body succeeded (writing its kept writes first), rolls it back if not;
/// says whether to run the body again.
pub(crate) async fn finish<R>(tx: PgTx<'_>, r: TxResult<R>, attempt: u32) -> Finish<R> {
    let again = |e: tokio_postgres::Error| {
        if retryable(&e) && attempt < ATTEMPTS {
            Finish::Again
        } else {
            Finish::Done(Err(e.into()))
        }
    };
    match r {
        Ok(v) => {
            let PgTx { tx, writes } = tx;
            for (t, w) in writes {
                if let Err(e) = write_table(&tx, t, w).await {
                    let _ = tx.rollback().await;
                    return again(e);
                }
            }
            match tx.commit().await {
                Ok(()) => Finish::Done(Ok(v)),
                Err(e) => again(e),
            }
        }
        Err(e) => {
            let _ = tx.tx.rollback().await;
            match e {
                TxError::Abort(e) => Finish::Done(Err(e)),
                TxError::Pg(e) => again(e),
                TxError::Sled(e) => Finish::Done(Err(Error::corrupt(
                    "transaction",
                    format!("a sled error in a PostgreSQL transaction: {e}"),
                ))),
            }
        }
    }
}

/// Sets the store gauges of a PostgreSQL store every 10 s until `shutdown`: rows per table (the
/// planner's estimate, so a scrape never counts a large table) and bytes on disk.
pub(crate) async fn record_gauges(
    store: super::Store,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use hush_server::metrics::names;
    let super::backend::Backend::Pg(p) = &store.backend else {
        return;
    };
    loop {
        match p.table_stats().await {
            Ok(tables) => {
                let mut total = 0.0;
                for (name, rows, bytes) in tables {
                    metrics::gauge!(names::STORE_ENTRIES, "tree" => name).set(rows.max(0.0));
                    total += bytes;
                }
                metrics::gauge!(names::STORE_BYTES).set(total);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the database's table sizes"),
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_name_is_a_plain_identifier_or_refused() {
        for ok in ["hush", "t_0123abcd", "leader_2"] {
            assert!(plain_identifier(ok), "{ok}");
        }
        for bad in [
            "",
            "Hush",
            "2x",
            "a-b",
            "x; DROP TABLE keys",
            "a\"b",
            &"a".repeat(64),
        ] {
            assert!(!plain_identifier(bad), "{bad}");
        }
    }

    #[test]
    fn a_database_on_another_host_is_refused_while_the_link_has_no_tls() {
        let check = |url: &str| check_transport(&tokio_postgres::Config::from_str(url).unwrap());
        assert!(check("postgres://u@127.0.0.1:5432/db").is_ok());
        assert!(check("postgres://u@localhost/db").is_ok());
        assert!(check("host=/run/postgresql user=u dbname=db").is_ok());
        let e = check("postgres://u:pw@db.example:5432/db")
            .unwrap_err()
            .to_string();
        assert!(e.contains("without TLS"), "{e}");
        assert!(!e.contains("pw"), "{e}");
        assert!(check("postgres://u@10.0.0.5/db").is_err());
    }

    #[test]
    fn the_settings_never_show_the_url() {
        let s = PgSettings {
            url: "postgres://hush:s3cret-password@db:5432/hush".into(),
            schema: "hush".into(),
            pool_size: 4,
        };
        let shown = format!("{s:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(!shown.contains("postgres://"), "{shown}");
    }

    #[tokio::test]
    async fn a_database_newer_than_the_binary_or_a_bad_schema_is_refused_at_start() {
        let url = super::super::throwaway::ThrowawayPostgres::shared()
            .url()
            .to_owned();
        let schema = super::super::throwaway::fresh_schema();
        let settings = PgSettings {
            url: url.clone(),
            schema: schema.clone(),
            pool_size: 1,
        };
        let p = PgBackend::connect(&settings).await.unwrap();
        // A second start applies nothing again.
        PgBackend::connect(&settings).await.unwrap();
        p.client()
            .await
            .unwrap()
            .execute(
                "INSERT INTO hush_migrations (version, name) VALUES (99, 'from the future')",
                &[],
            )
            .await
            .unwrap();
        let e = PgBackend::connect(&settings).await.unwrap_err().to_string();
        assert!(e.contains("version 99, newer than this binary"), "{e}");
        let e = PgBackend::connect(&PgSettings {
            url,
            schema: "x; DROP SCHEMA public".into(),
            pool_size: 1,
        })
        .await
        .unwrap_err()
        .to_string();
        assert!(e.contains("must be lowercase letters"), "{e}");
    }
}
