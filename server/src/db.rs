//! The embedded sled database every hush server keeps its state in: opening it (one process per
//! directory), flushing it on our own threads, and the transaction helpers every store uses.

use std::path::Path;

use sled::transaction::{ConflictableTransactionError, TransactionError};

use crate::error::ServerError;

/// Opens (or creates) the database in `dir/db` with a page cache of `cache_mb` MiB.
pub fn open(dir: &Path, cache_mb: u64) -> Result<sled::Db, ServerError> {
    open_at(dir, "db", cache_mb)
}

/// Opens (or creates) the database in `dir/name`.
pub fn open_at(dir: &Path, name: &str, cache_mb: u64) -> Result<sled::Db, ServerError> {
    std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir {
        path: dir.to_path_buf(),
        source,
    })?;
    sled::Config::new()
        .path(dir.join(name))
        .cache_capacity(cache_mb * 1024 * 1024)
        .mode(sled::Mode::HighThroughput)
        .open()
        .map_err(|e| match e {
            // sled 0.34 reports a held lock as an `Other` error that names it.
            sled::Error::Io(io)
                if io.kind() == std::io::ErrorKind::WouldBlock
                    || io.to_string().contains("could not acquire lock") =>
            {
                ServerError::InUse(dir.to_path_buf())
            }
            e => ServerError::Storage(e),
        })
}

/// Makes a folder's entries (a file created in it or deleted from it) durable: for the files
/// the servers keep beside sled (a shuffler's packets and tags, a leader's pending reports).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Bytes the files directly in `dir` occupy (0 if it cannot be read).
pub fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Makes everything written to `db` so far durable, on a blocking thread of tokio's pool.
///
/// Not `sled::Db::flush_async`: it flushes on sled's small I/O pool while holding sled's
/// process-wide read lock, and under load every pool thread ends up in a flush waiting for a log
/// write that only a pool thread can do, once a batch or transaction is queued for the write lock
/// (sled 0.34, spacejam/sled#1308): the whole process stalls. A flush on our own thread leaves
/// sled's pool free to write.
pub async fn flush(db: &sled::Db) -> Result<(), ServerError> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || db.flush())
        .await
        .map_err(|e| ServerError::Join(format!("the flush thread failed: {e}")))??;
    Ok(())
}

/// Writes and flushes a probe record (tree `health`, one key): whether the store can take a
/// write now, as the health protocol reports it.
pub async fn probe_write(db: &sled::Db, now_s: u64) -> Result<(), ServerError> {
    db.open_tree("health")?
        .insert(b"probe", &now_s.to_be_bytes())?;
    flush(db).await
}

/// Aborts a transaction with `e`.
pub fn abort<E>(e: E) -> ConflictableTransactionError<E> {
    ConflictableTransactionError::Abort(e)
}

/// A transaction's result with an abort as the caller's error and a storage failure converted.
pub fn tx_result<T, E: From<sled::Error>>(r: Result<T, TransactionError<E>>) -> Result<T, E> {
    r.map_err(|e| match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => E::from(e),
    })
}

/// The entries of every tree of `db` (the default tree left out), by name: what a soak test
/// watches for growth.
pub fn tree_sizes(db: &sled::Db) -> Vec<(String, usize)> {
    db.tree_names()
        .into_iter()
        .filter(|n| n.as_ref() != b"__sled__default")
        .filter_map(|n| {
            let t = db.open_tree(&n).ok()?;
            Some((String::from_utf8_lossy(&n).into_owned(), t.len()))
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_one_directory_says_it_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _db = open(dir.path(), 4).unwrap();
        let e = open(dir.path(), 4).unwrap_err();
        assert!(e.to_string().contains("in use by another process"), "{e}");
        assert!(dir.path().join("db").exists());
    }

    #[test]
    fn tree_sizes_counts_every_named_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = open(dir.path(), 4).unwrap();
        db.open_tree("a").unwrap().insert(b"k", b"v").unwrap();
        db.open_tree("b").unwrap();
        let sizes = tree_sizes(&db);
        assert_eq!(sizes, vec![("a".into(), 1), ("b".into(), 0)]);
    }
}
