//! What the store needs from a database, and the two databases that provide it: sled (embedded,
//! the default) and PostgreSQL (`[store] kind = "postgres"`, for several replicas per role).
//!
//! The store's records live in named key-value tables ([`T`]): sled trees, or PostgreSQL tables
//! of `(key bytea primary key, value bytea)`. Every change that must be atomic is a transaction
//! written once, generic over [`Txn`], and run by [`transact!`] on either backend:
//!
//! - on sled, as a sled transaction over the tables it names (sled serializes all transactions
//!   of a process and re-runs the closure on a conflict);
//! - on PostgreSQL, as a `SERIALIZABLE` transaction: reads go to the database, writes are kept
//!   and sent in one statement per table before `COMMIT`, and a serialization failure or deadlock
//!   runs the whole transaction again. Transactions of one process are serialized by a lock, as
//!   sled does; replicas on one database are serialized by PostgreSQL.
//!
//! Either way a check inside a transaction cannot race another transaction's commit.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use sled::transaction::{
    ConflictableTransactionError, TransactionalTree, UnabortableTransactionError,
};

use crate::error::{Error, Result};

use super::files::PendingFiles;
use super::pg::PgBackend;
use super::records::FileRecord;
use super::seen;

/// A table of the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum T {
    Tasks,
    Keys,
    Seen,
    Pending,
    Jobs,
    HelperJobs,
    /// `committed ‖ task ‖ job` for each helper job, so expiry reads only what expires.
    HelperJobTimes,
    Batches,
    Stats,
    Tenants,
    Ledger,
    Collections,
    Collected,
    Released,
    WindowBatches,
    BatchCollections,
    Late,
    CollectionEnds,
    Audit,
    AuditHead,
    Health,
    Meta,
}

impl T {
    /// Every table.
    pub(crate) const ALL: [T; 22] = [
        T::Tasks,
        T::Keys,
        T::Seen,
        T::Pending,
        T::Jobs,
        T::HelperJobs,
        T::HelperJobTimes,
        T::Batches,
        T::Stats,
        T::Tenants,
        T::Ledger,
        T::Collections,
        T::Collected,
        T::Released,
        T::WindowBatches,
        T::BatchCollections,
        T::Late,
        T::CollectionEnds,
        T::Audit,
        T::AuditHead,
        T::Health,
        T::Meta,
    ];

    /// The sled tree's and the PostgreSQL table's name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            T::Tasks => "tasks",
            T::Keys => "keys",
            T::Seen => "seen",
            T::Pending => "pending",
            T::Jobs => "jobs",
            T::HelperJobs => "helper_jobs",
            T::HelperJobTimes => "helper_job_times",
            T::Batches => "batches",
            T::Stats => "stats",
            T::Tenants => "tenants",
            T::Ledger => "ledger",
            T::Collections => "collections",
            T::Collected => "collected",
            T::Released => "released",
            T::WindowBatches => "window_batches",
            T::BatchCollections => "batch_collections",
            T::Late => "late",
            T::CollectionEnds => "collection_ends",
            T::Audit => "audit",
            T::AuditHead => "audit_head",
            T::Health => "health",
            T::Meta => "meta",
        }
    }
}

/// Which keys of a table: those with a prefix, those in `[lo, hi)`, or all.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Keys<'a> {
    /// Keys that begin with these bytes.
    Prefix(&'a [u8]),
    /// Keys from `lo` (included) to `hi` (excluded).
    Range(&'a [u8], &'a [u8]),
    /// Every key.
    All,
}

impl Keys<'_> {
    /// The bounds as owned keys: `lo` included, `hi` excluded (`None`: no upper bound).
    pub(crate) fn bounds(&self) -> (Vec<u8>, Option<Vec<u8>>) {
        match self {
            Keys::Prefix(p) => (p.to_vec(), prefix_end(p)),
            Keys::Range(lo, hi) => (lo.to_vec(), Some(hi.to_vec())),
            Keys::All => (Vec::new(), None),
        }
    }
}

/// The smallest key greater than every key that begins with `p` (`None`: there is none).
pub(crate) fn prefix_end(p: &[u8]) -> Option<Vec<u8>> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// What a scan does with an entry it meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pick {
    /// Return it.
    Take,
    /// Leave it out and go on.
    Skip,
    /// Leave it out and end the scan.
    Stop,
}

/// A pending record as [`Backend::pending_records`] reads it: key, value stored (`None`: the
/// record bytes themselves), record bytes.
pub(crate) type PendingEntry = (Vec<u8>, Option<Vec<u8>>, Vec<u8>);

/// Writes to one table applied together: a value to set, or `None` to delete.
pub(crate) type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Why a transaction stopped: the caller's error (nothing is written), or the database's, which
/// the runner handles (a conflict runs the transaction again).
#[derive(Debug)]
pub(crate) enum TxError {
    /// The transaction's own refusal or a corrupt record: nothing is written.
    Abort(Error),
    /// sled's conflict or storage error.
    Sled(UnabortableTransactionError),
    /// PostgreSQL's error (a serialization failure runs the transaction again).
    Pg(tokio_postgres::Error),
}

impl From<Error> for TxError {
    fn from(e: Error) -> Self {
        TxError::Abort(e)
    }
}

impl From<UnabortableTransactionError> for TxError {
    fn from(e: UnabortableTransactionError) -> Self {
        TxError::Sled(e)
    }
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

/// The result of a step of a transaction.
pub(crate) type TxResult<R> = std::result::Result<R, TxError>;

/// A transaction over the store's tables. Reads see the transaction's own writes.
pub(crate) trait Txn {
    /// The value under `k` in `t`. (On sled a pending record may come back as a reference to
    /// its pending file, [`FileRecord`]: count it with `PendingRecord::count_encoded`; reads
    /// outside a transaction return its reports.)
    fn get(&mut self, t: T, k: &[u8]) -> impl Future<Output = TxResult<Option<Vec<u8>>>> + Send;
    /// The values under `keys` in `t`, in order (one round trip on PostgreSQL).
    fn get_many(
        &mut self,
        t: T,
        keys: &[Vec<u8>],
    ) -> impl Future<Output = TxResult<Vec<Option<Vec<u8>>>>> + Send;
    /// Sets `k` in `t` to `v`.
    fn insert(&mut self, t: T, k: &[u8], v: &[u8]) -> TxResult<()>;
    /// Deletes `k` from `t`.
    fn remove(&mut self, t: T, k: &[u8]) -> TxResult<()>;
    /// Applies those of `changes` (a pending record's key, the value stored when it was read
    /// ([`Backend::pending_records`]), and its new value or `None` to delete it) whose record still holds that value and that no
    /// aggregation job holds; returns their indices. (On sled this process knows its jobs and
    /// leaves their records out; on PostgreSQL a replica's claim marks the rows.)
    fn replace_unclaimed_pending(
        &mut self,
        changes: &[PendingChange],
    ) -> impl Future<Output = TxResult<Vec<usize>>> + Send;
}

/// A change to a pending record: its key, the value stored when it was read, and its new value
/// (`None`: delete it).
pub(crate) type PendingChange = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

/// A sled transaction's view of the trees it named.
pub(crate) struct SledTx<'a> {
    tables: &'a [T],
    views: &'a [TransactionalTree],
    backend: &'a SledBackend,
    /// The anti-replay index, locked for the whole transaction if it names `seen`
    /// ([`SledBackend::lock_seen`]).
    seen: Option<&'a seen::SeenIndex>,
    /// The ids this transaction adds (written by [`SledTx::finish`]).
    staged: seen::Staged,
}

impl<'a> SledTx<'a> {
    /// The views of `tables`, in order, of the store `backend`; `seen` is the anti-replay
    /// index, locked, if `tables` holds `seen`.
    pub(crate) fn new(
        tables: &'a [T],
        views: &'a [TransactionalTree],
        backend: &'a SledBackend,
        seen: Option<&'a seen::SeenIndex>,
    ) -> Self {
        Self {
            tables,
            views,
            backend,
            seen,
            staged: Default::default(),
        }
    }

    /// Writes the log entries of the ids this transaction added; returns them, for the index
    /// once sled has committed.
    pub(crate) fn finish(self) -> TxResult<seen::Staged> {
        if self.seen.is_some() {
            self.staged.write(self.view(T::Seen)?)?;
        }
        Ok(self.staged)
    }

    /// The index, which the transaction locked if it named `seen`.
    fn seen_index(&self) -> TxResult<&'a seen::SeenIndex> {
        self.seen.ok_or_else(|| {
            TxError::Abort(Error::corrupt(
                "transaction",
                "table seen is not in this transaction",
            ))
        })
    }

    fn view(&self, t: T) -> TxResult<&TransactionalTree> {
        self.tables
            .iter()
            .position(|x| *x == t)
            .map(|i| &self.views[i])
            .ok_or_else(|| {
                TxError::Abort(Error::corrupt(
                    "transaction",
                    format!("table {} is not in this transaction", t.name()),
                ))
            })
    }

    fn get_now(&self, t: T, k: &[u8]) -> TxResult<Option<Vec<u8>>> {
        if t == T::Seen {
            // Ids are in the index on sled (super::seen).
            let (w, h) = self.backend.salt.hash(k)?;
            let found = self.seen_index()?.contains(&w, &h) || self.staged.contains(&w, &h);
            return Ok(found.then(Vec::new));
        }
        Ok(self.view(t)?.get(k)?.map(|v| v.to_vec()))
    }
}

impl Txn for SledTx<'_> {
    fn get(&mut self, t: T, k: &[u8]) -> impl Future<Output = TxResult<Option<Vec<u8>>>> + Send {
        std::future::ready(self.get_now(t, k))
    }

    fn get_many(
        &mut self,
        t: T,
        keys: &[Vec<u8>],
    ) -> impl Future<Output = TxResult<Vec<Option<Vec<u8>>>>> + Send {
        std::future::ready(keys.iter().map(|k| self.get_now(t, k)).collect())
    }

    fn insert(&mut self, t: T, k: &[u8], v: &[u8]) -> TxResult<()> {
        if t == T::Seen {
            if !v.is_empty() {
                return Err(TxError::Abort(Error::corrupt(
                    "anti-replay entry",
                    "has a value; entries are keys only",
                )));
            }
            let (w, h) = self.backend.salt.hash(k)?;
            if !self.seen_index()?.contains(&w, &h) {
                self.staged.insert(w, h);
            }
            return Ok(());
        }
        self.view(t)?.insert(k, v)?;
        Ok(())
    }

    fn remove(&mut self, t: T, k: &[u8]) -> TxResult<()> {
        if t == T::Seen {
            // Ids leave only with their window ([`SledBackend::expire_seen`]).
            return Err(TxError::Abort(Error::corrupt(
                "transaction",
                "anti-replay ids are not removed one by one",
            )));
        }
        self.view(t)?.remove(k)?;
        Ok(())
    }

    fn replace_unclaimed_pending(
        &mut self,
        changes: &[PendingChange],
    ) -> impl Future<Output = TxResult<Vec<usize>>> + Send {
        let r = (|| {
            let pending = self.view(T::Pending)?;
            let mut done = Vec::new();
            for (i, (k, old, new)) in changes.iter().enumerate() {
                if pending.get(&k[..])?.as_deref() != Some(&old[..]) {
                    continue;
                }
                match new {
                    Some(v) => pending.insert(&k[..], &v[..])?,
                    None => pending.remove(&k[..])?,
                };
                done.push(i);
            }
            Ok(done)
        })();
        std::future::ready(r)
    }
}

/// Runs a future that cannot wait (a transaction body over sled) to its end.
pub(crate) fn run_now<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("a sled transaction body never waits"),
    }
}

/// Turns a body's error into sled's.
pub(crate) fn to_sled(e: TxError) -> ConflictableTransactionError<Error> {
    match e {
        TxError::Abort(e) => ConflictableTransactionError::Abort(e),
        TxError::Sled(e) => e.into(),
        TxError::Pg(e) => ConflictableTransactionError::Abort(Error::corrupt(
            "transaction",
            format!("a PostgreSQL error in a sled transaction: {e}"),
        )),
    }
}

/// Runs `$body` (an expression over `$tx: &mut impl Txn`, a future of a `TxResult`) as one
/// transaction over the tables named, on the store's backend; evaluates to a `Result`.
macro_rules! transact {
    ($store:expr, [$($t:ident),+ $(,)?], |$tx:ident| $body:expr) => {{
        let tables = [$($crate::store::backend::T::$t),+];
        match &$store.backend {
            $crate::store::backend::Backend::Sled(s) => {
                let trees: Vec<&sled::Tree> = tables.iter().map(|t| s.tree(*t)).collect();
                // Held until the ids this transaction adds are in the index (super::seen).
                let mut seen = s.lock_seen(&tables);
                let staged = std::cell::RefCell::new(None);
                let r = sled::Transactional::transaction(&trees[..], |views| {
                    let mut tx =
                        $crate::store::backend::SledTx::new(&tables, views, s, seen.as_deref());
                    let out = {
                        let $tx = &mut tx;
                        $crate::store::backend::run_now($body)
                            .map_err($crate::store::backend::to_sled)?
                    };
                    staged.replace(Some(tx.finish().map_err($crate::store::backend::to_sled)?));
                    Ok(out)
                });
                let r = hush_server::db::tx_result(r);
                if let (Ok(_), Some(index), Some(staged)) = (&r, seen.as_mut(), staged.take()) {
                    index.add(staged);
                }
                r
            }
            $crate::store::backend::Backend::Pg(p) => {
                let r: $crate::error::Result<_> = async {
                    let _serial = p.serial().await;
                    let mut client = p.client().await?;
                    let mut attempt = 0u32;
                    loop {
                        attempt += 1;
                        let mut tx = $crate::store::pg::PgTx::begin(&mut client).await?;
                        let r = {
                            let $tx = &mut tx;
                            $body.await
                        };
                        match $crate::store::pg::finish(tx, r, attempt).await {
                            $crate::store::pg::Finish::Done(r) => break r,
                            $crate::store::pg::Finish::Again => {
                                $crate::store::pg::pause(attempt).await;
                                continue;
                            }
                        }
                    }
                }
                .await;
                r
            }
        }
    }};
}

pub(crate) use transact;

/// The database under a store.
#[derive(Clone, Debug)]
pub(crate) enum Backend {
    /// An embedded sled database.
    Sled(SledBackend),
    /// A PostgreSQL database, possibly shared by replicas.
    Pg(Box<PgBackend>),
}

/// sled: one tree per table.
#[derive(Clone, Debug)]
pub(crate) struct SledBackend {
    db: sled::Db,
    trees: Arc<BTreeMap<T, sled::Tree>>,
    salt: Arc<seen::Salt>,
    /// The anti-replay ids of every window not yet expired ([`seen`]).
    seen: Arc<std::sync::RwLock<seen::SeenIndex>>,
    /// The bytes of the leader's pending reports ([`super::files`]).
    files: Arc<PendingFiles>,
    /// Held (shared) from reading a pending record in sled to reading its bytes from its file,
    /// and (exclusively) while unused files are deleted: a record read just before its last
    /// job committed is still read whole, not found missing its file.
    file_reads: Arc<std::sync::RwLock<()>>,
}

impl SledBackend {
    /// Opens the trees of `db`, with the pending files in `files_dir`; deletes the pending files
    /// no record points into (left by a crash).
    pub(crate) fn new(db: sled::Db, files_dir: &std::path::Path) -> Result<Self> {
        let mut trees = BTreeMap::new();
        for t in T::ALL {
            trees.insert(t, db.open_tree(t.name())?);
        }
        let salt = seen::Salt::load(&trees[&T::Meta])?;
        seen::migrate(&salt, &trees[&T::Seen], &trees[&T::Meta])?;
        let loading = std::time::Instant::now();
        let index = seen::SeenIndex::load(&trees[&T::Seen])?;
        if index.ids() > 0 {
            tracing::info!(
                ids = index.ids(),
                ms = loading.elapsed().as_millis() as u64,
                "loaded the anti-replay ids of the windows not yet expired into memory"
            );
        }
        super::retention::index_helper_jobs(
            &trees[&T::HelperJobs],
            &trees[&T::HelperJobTimes],
            &trees[&T::Meta],
        )?;
        let files = PendingFiles::open(files_dir)?;
        let backend = Self {
            db,
            trees: Arc::new(trees),
            salt: Arc::new(salt),
            seen: Arc::new(std::sync::RwLock::new(index)),
            files: Arc::new(files),
            file_reads: Default::default(),
        };
        // Nothing is in flight yet, and what sled holds now is what it recovered. A damaged
        // record keeps every file (and the store opens: its task's reads name the damage).
        let idle = backend.files.idle(true)?;
        let used = backend.referenced_files();
        // New files are numbered past every file a record names, not only past those on disk:
        // a folder restored older than sled must not get a file that old records read as theirs.
        // (Past a damaged record, the records are read again for the files the others name.)
        let named = match &used {
            Ok(used) => used.iter().max().copied(),
            Err(_) => backend
                .tree(T::Pending)
                .iter()
                .values()
                .filter_map(|v| v.ok().and_then(|v| FileRecord::file_of(&v).ok()))
                .max(),
        };
        if let Some(n) = named {
            backend.files.number_past(n);
        }
        match used {
            Ok(used) => {
                let orphans = backend.files.remove(idle.difference(&used).copied())?;
                if orphans > 0 {
                    tracing::info!(
                        files = orphans,
                        "deleted pending files no record points into (reports never acknowledged)"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "kept every pending file"),
        }
        Ok(backend)
    }

    /// The pending files.
    pub(crate) fn files(&self) -> &PendingFiles {
        &self.files
    }

    /// The numbers of the pending files that records point into (read from each record's
    /// header: a record damaged past it still keeps its file).
    pub(crate) fn referenced_files(&self) -> Result<std::collections::HashSet<u64>> {
        let mut out = std::collections::HashSet::new();
        for kv in self.tree(T::Pending).iter() {
            let (k, v) = kv?;
            if FileRecord::is(&v) {
                out.insert(FileRecord::file_of(&v).map_err(|e| {
                    Error::corrupt(
                        "pending record",
                        format!("{e} (key {}); no pending file is deleted", hex(&k)),
                    )
                })?);
            }
        }
        Ok(out)
    }

    /// Deletes pending files `unused` if no read of a record's bytes is under way; if one is,
    /// deletes none (the next call does), rather than make the reads queued behind it wait.
    pub(crate) fn remove_files(&self, unused: Vec<u64>) -> Result<usize> {
        let _no_reads = match self.file_reads.try_write() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(0),
        };
        self.files.remove(unused)
    }

    /// Holds off file deletion while records are read and resolved.
    fn reading_files(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.file_reads.read().unwrap_or_else(|e| e.into_inner())
    }

    /// A stored pending value as the bytes of its record: read from its pending file if it
    /// points into one, as it is otherwise. Call it holding [`Self::reading_files`] since the
    /// value was read.
    fn resolve(&self, v: Vec<u8>) -> Result<Vec<u8>> {
        if !FileRecord::is(&v) {
            return Ok(v);
        }
        let r = FileRecord::decode_stored(&v)?;
        let span = self.files.read(r.file, r.base, u64::from(r.span))?;
        Ok(r.to_record_bytes(&span))
    }

    /// The tree of `t`.
    pub(crate) fn tree(&self, t: T) -> &sled::Tree {
        &self.trees[&t]
    }

    /// The database.
    pub(crate) fn db(&self) -> &sled::Db {
        &self.db
    }

    /// The anti-replay index, locked for a transaction over `tables` if they hold `seen`.
    pub(crate) fn lock_seen(
        &self,
        tables: &[T],
    ) -> Option<std::sync::RwLockWriteGuard<'_, seen::SeenIndex>> {
        tables.contains(&T::Seen).then(|| self.seen_write())
    }

    /// The anti-replay index, locked for writing. (A panic under the lock can only have come
    /// before a commit's ids were added, which leaves the index as it was: it is used as is.)
    fn seen_write(&self) -> std::sync::RwLockWriteGuard<'_, seen::SeenIndex> {
        self.seen.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The anti-replay index, locked for reading.
    fn seen_read(&self) -> std::sync::RwLockReadGuard<'_, seen::SeenIndex> {
        self.seen.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The anti-replay ids held in memory.
    pub(crate) fn seen_ids(&self) -> u64 {
        self.seen_read().ids()
    }

    /// Whether a transaction holds the anti-replay index's lock.
    #[cfg(test)]
    pub(crate) fn seen_is_locked(&self) -> bool {
        self.seen.try_read().is_err()
    }

    /// Deletes the anti-replay ids of the windows in `[lo, hi)` (`task ‖ window` bounds), from
    /// sled and then from the index, under the index's lock; returns how many ids there were.
    pub(crate) fn expire_seen(&self, lo: &[u8], hi: &[u8]) -> Result<u64> {
        let mut index = self.seen_write();
        let tree = self.tree(T::Seen);
        let mut batch = sled::Batch::default();
        for k in tree.range(lo..hi).keys() {
            batch.remove(k?);
        }
        tree.apply_batch(batch)?;
        Ok(index.forget(lo, hi))
    }

    /// The value under `k` in `t` (for the anti-replay table, an empty value if the id is in
    /// the index).
    fn get(&self, t: T, k: &[u8]) -> Result<Option<Vec<u8>>> {
        if t == T::Seen {
            let (w, h) = self.salt.hash(k)?;
            return Ok(self.seen_read().contains(&w, &h).then(Vec::new));
        }
        if t == T::Pending {
            let _reading = self.reading_files();
            return self
                .tree(t)
                .get(k)?
                .map(|v| self.resolve(v.to_vec()))
                .transpose();
        }
        Ok(self.tree(t).get(k)?.map(|v| v.to_vec()))
    }

    fn iter(&self, t: T, keys: Keys<'_>) -> sled::Iter {
        let tree = self.tree(t);
        match keys {
            Keys::Prefix(p) => tree.scan_prefix(p),
            Keys::Range(lo, hi) => tree.range(lo.to_vec()..hi.to_vec()),
            Keys::All => tree.iter(),
        }
    }
}

impl Backend {
    /// The value under `k` in `t`.
    pub(crate) async fn get(&self, t: T, k: &[u8]) -> Result<Option<Vec<u8>>> {
        match self {
            Backend::Sled(s) => s.get(t, k),
            Backend::Pg(p) => p.get(t, k).await,
        }
    }

    /// The values under `keys` in `t`, in order (one query on PostgreSQL).
    pub(crate) async fn get_many(&self, t: T, keys: &[Vec<u8>]) -> Result<Vec<Option<Vec<u8>>>> {
        match self {
            Backend::Sled(s) => keys.iter().map(|k| s.get(t, k)).collect(),
            Backend::Pg(p) => p.get_many(t, keys).await,
        }
    }

    /// Up to `limit` entries of `t` among `keys`, in key order, that `pick(key, value)` takes,
    /// ending early where it says [`Pick::Stop`].
    pub(crate) async fn scan(
        &self,
        t: T,
        keys: Keys<'_>,
        limit: usize,
        pick: impl Fn(&[u8], &[u8]) -> Pick + Send,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        match self {
            Backend::Sled(s) => {
                let _reading = (t == T::Pending).then(|| s.reading_files());
                let mut out = Vec::new();
                for kv in s.iter(t, keys) {
                    if out.len() >= limit {
                        break;
                    }
                    let (k, v) = kv?;
                    match pick(&k, &v) {
                        // A pending record's header says how many reports it holds: only
                        // the records taken are read from their file.
                        Pick::Take if t == T::Pending => {
                            out.push((k.to_vec(), s.resolve(v.to_vec())?))
                        }
                        Pick::Take => out.push((k.to_vec(), v.to_vec())),
                        Pick::Skip => {}
                        Pick::Stop => break,
                    }
                }
                Ok(out)
            }
            Backend::Pg(p) => p.scan(t, keys, limit, pick).await,
        }
    }

    /// The pending records among `keys` whose seq (the key's last 8 bytes) `skip` does not
    /// name, in key order: key, the value stored (what [`Txn::replace_unclaimed_pending`]
    /// compares) and the record's bytes (the same on PostgreSQL; on sled read from its file if
    /// it is in one).
    pub(crate) async fn pending_records(
        &self,
        keys: Keys<'_>,
        skip: impl Fn(u64) -> bool + Send + Sync,
    ) -> Result<Vec<PendingEntry>> {
        let seq = |k: &[u8]| k.len() >= 8 && skip(super::records::be_u64(&k[k.len() - 8..]));
        match self {
            Backend::Sled(s) => {
                let _reading = s.reading_files();
                let mut out = Vec::new();
                for kv in s.iter(T::Pending, keys) {
                    let (k, v) = kv?;
                    if seq(&k) {
                        continue;
                    }
                    let stored = FileRecord::is(&v).then(|| v.to_vec());
                    out.push((k.to_vec(), stored, s.resolve(v.to_vec())?));
                }
                Ok(out)
            }
            Backend::Pg(p) => Ok(p
                .scan(T::Pending, keys, usize::MAX, |k, _| {
                    if seq(k) { Pick::Skip } else { Pick::Take }
                })
                .await?
                .into_iter()
                .map(|(k, v)| (k, None, v))
                .collect()),
        }
    }

    /// The pending records under `keys`, in order, as [`Backend::pending_records`] reads them
    /// (value stored if not the record bytes, record bytes); `None` for one that is not there.
    pub(crate) async fn pending_get_many(
        &self,
        keys: &[Vec<u8>],
    ) -> Result<Vec<Option<(Option<Vec<u8>>, Vec<u8>)>>> {
        match self {
            Backend::Sled(s) => {
                let _reading = s.reading_files();
                let tree = s.tree(T::Pending);
                keys.iter()
                    .map(|k| {
                        tree.get(k)?
                            .map(|v| {
                                let stored = FileRecord::is(&v).then(|| v.to_vec());
                                Ok((stored, s.resolve(v.to_vec())?))
                            })
                            .transpose()
                    })
                    .collect()
            }
            Backend::Pg(p) => Ok(p
                .get_many(T::Pending, keys)
                .await?
                .into_iter()
                .map(|v| v.map(|v| (None, v)))
                .collect()),
        }
    }

    /// Every entry of `t` among `keys`, in key order.
    pub(crate) async fn entries(&self, t: T, keys: Keys<'_>) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(t, keys, usize::MAX, |_, _| Pick::Take).await
    }

    /// The keys of the pending records that no job holds (on PostgreSQL; on sled, all of them:
    /// this process knows its jobs) and that hold more than `max` reports.
    pub(crate) async fn oversize_pending(&self, max: u64) -> Result<Vec<Vec<u8>>> {
        match self {
            Backend::Sled(s) => s
                .tree(T::Pending)
                .iter()
                .filter_map(|kv| match kv {
                    Ok((k, v)) => {
                        (super::PendingRecord::count_encoded(&v) > max).then(|| Ok(k.to_vec()))
                    }
                    Err(e) => Some(Err(e.into())),
                })
                .collect(),
            Backend::Pg(p) => p.oversize_pending(max).await,
        }
    }

    /// The keys of `t` among `keys`, in order (for the anti-replay table on sled, its log
    /// entries' keys).
    pub(crate) async fn keys(&self, t: T, keys: Keys<'_>) -> Result<Vec<Vec<u8>>> {
        match self {
            Backend::Sled(s) => s.iter(t, keys).keys().map(|k| Ok(k?.to_vec())).collect(),
            Backend::Pg(p) => p.keys(t, keys).await,
        }
    }

    /// How many keys of `t` are among `keys` (for the anti-replay table, how many ids).
    pub(crate) async fn count(&self, t: T, keys: Keys<'_>) -> Result<u64> {
        match self {
            Backend::Sled(s) if t == T::Seen => s.iter(t, keys).try_fold(0, |n, kv| {
                let (k, v) = kv?;
                Ok(n + seen::ids_in(&k, &v))
            }),
            Backend::Sled(s) => Ok(match keys {
                Keys::All => s.tree(t).len() as u64,
                k => s.iter(t, k).keys().count() as u64,
            }),
            Backend::Pg(p) => p.count(t, keys).await,
        }
    }

    /// How many reports the pending records among `keys` hold.
    pub(crate) async fn count_pending(&self, keys: Keys<'_>) -> Result<u64> {
        match self {
            Backend::Sled(s) => s
                .iter(T::Pending, keys)
                .values()
                .try_fold(0, |n, v| Ok(n + super::PendingRecord::count_encoded(&v?))),
            Backend::Pg(p) => p.count_pending(keys).await,
        }
    }

    /// Applies `writes` to `t` atomically.
    pub(crate) async fn apply(&self, t: T, writes: Writes) -> Result<()> {
        if writes.is_empty() {
            return Ok(());
        }
        match self {
            Backend::Sled(_) if t == T::Seen => Err(Error::corrupt(
                "anti-replay table",
                "written only by transactions and deleted by window (expire_seen)",
            )),
            Backend::Sled(s) => {
                let mut b = sled::Batch::default();
                for (k, v) in writes {
                    match v {
                        Some(v) => b.insert(k, v),
                        None => b.remove(k),
                    }
                }
                s.tree(t).apply_batch(b)?;
                Ok(())
            }
            Backend::Pg(p) => p.apply(t, writes).await,
        }
    }

    /// Stores `v` under `k` in `t` unless the key exists; returns the existing value if so.
    pub(crate) async fn insert_new(&self, t: T, k: &[u8], v: Vec<u8>) -> Result<Option<Vec<u8>>> {
        match self {
            Backend::Sled(s) => {
                let prev = s
                    .tree(t)
                    .compare_and_swap(k, None as Option<&[u8]>, Some(v))?;
                Ok(prev.err().and_then(|e| e.current.map(|v| v.to_vec())))
            }
            Backend::Pg(p) => p.insert_new(t, k, v).await,
        }
    }

    /// A fresh, increasing number, unique across replicas.
    pub(crate) async fn next_seq(&self) -> Result<u64> {
        match self {
            Backend::Sled(s) => Ok(s.db.generate_id()?),
            Backend::Pg(p) => p.next_seq().await,
        }
    }

    /// `n` fresh numbers.
    pub(crate) async fn next_seqs(&self, n: usize) -> Result<Vec<u64>> {
        match self {
            Backend::Sled(s) => (0..n).map(|_| Ok(s.db.generate_id()?)).collect(),
            Backend::Pg(p) => p.next_seqs(n).await,
        }
    }

    /// Makes everything written so far durable (PostgreSQL commits are durable already).
    pub(crate) async fn flush(&self) -> Result<()> {
        match self {
            Backend::Sled(s) => Ok(hush_server::db::flush(&s.db).await?),
            Backend::Pg(_) => Ok(()),
        }
    }

    /// Entries per table (on sled, and the number of pending files).
    pub(crate) async fn sizes(&self) -> Result<Vec<(String, u64)>> {
        let mut out = Vec::new();
        for t in T::ALL {
            if t == T::AuditHead || t == T::Health || t == T::Meta {
                continue;
            }
            out.push((t.name().to_owned(), self.count(t, Keys::All).await?));
        }
        if let Backend::Sled(s) = self {
            out.push(("pending files".to_owned(), s.files.count()? as u64));
        }
        Ok(out)
    }
}

/// `b` in lowercase hex, for error messages.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_after_its_last_key() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
