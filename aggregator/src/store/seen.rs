//! How sled keeps the anti-replay table: report ids in buckets, not one entry per id.
//!
//! The store names an anti-replay entry by its key `task ‖ window ‖ report id` (56 bytes,
//! [`super::seen_key`]), with no value. PostgreSQL keeps one row per key. On sled, one entry per
//! id made the aggregators' memory grow with every report until its id expired: sled's memory
//! grows with its number of entries, not with their bytes (a leaf holds at most 16 entries, and
//! every leaf keeps its metadata in memory even when paged out; sled 0.34, spacejam/sled#1093).
//!
//! So sled keeps ids in buckets. An id is first hashed with a secret of this store (HMAC-SHA256
//! under a random key kept in `meta`, cut to 16 bytes), so that nobody who picks report ids —
//! any client — can pile them into one bucket. A window's first-level bucket is
//! `task ‖ window ‖ hash[0..2]` (at most 65,536 per window) and holds the sorted hashes of its
//! ids, up to [`SPLIT_AT`]. The id that would go past that splits it: its hashes move to the
//! second-level buckets `task ‖ window ‖ hash[0..2] ‖ the high four bits of hash[2]` (16 under
//! each first-level one, about 16 ids each when made) and the first-level bucket keeps only a
//! mark. Second-level buckets do not split: they hold about one id per million of the window's
//! ids, 16 bytes each, so a window of 100 million ids writes buckets of about 1.5 KiB. Every bucket keeps the `task ‖ window` prefix, so
//! expiring a window's ids is still a range delete. A write reads and rewrites one bucket (a split
//! writes up to 17, once); sled's transactions are serializable, so two ingests adding ids to one
//! bucket at once cannot lose either.

use sled::IVec;
use sled::transaction::TransactionalTree;

use super::backend::TxResult;
use crate::error::{Error, Result};

/// Bytes of an anti-replay key: task (32) ‖ window (8) ‖ report id (16).
pub(crate) const KEY_LEN: usize = 56;
/// Bytes of the `task ‖ window` prefix.
const PREFIX: usize = 40;
/// Bytes of a hashed id, as kept in a bucket.
const HASH: usize = 16;
/// Ids a first-level bucket holds before it splits (4 KiB of hashes).
pub(crate) const SPLIT_AT: usize = 256;

/// A first-level bucket's value starts with this byte when it holds hashes...
const LEAF: u8 = 0;
/// ...and is this one byte when its hashes moved to the second level.
const SPLIT: u8 = 1;

/// `meta` entries: the hashing key, and the mark that every entry is in a bucket (set once the
/// entries of an earlier version, one per id, are moved).
const SALT_KEY: &[u8] = b"seen_salt";
const LAYOUT_KEY: &[u8] = b"seen_layout";
const LAYOUT_BUCKETS: &[u8] = b"buckets";

/// The store's secret hashing key for report ids.
#[derive(Clone, Debug)]
pub(crate) struct Salt {
    key: ring::hmac::Key,
    /// [`SPLIT_AT`], smaller in tests.
    split_at: usize,
}

impl Salt {
    /// Reads the store's key from `meta`, making one on first use.
    pub(crate) fn load(meta: &sled::Tree) -> Result<Self> {
        let fresh: [u8; 32] = rand::random();
        let stored =
            match meta.compare_and_swap(SALT_KEY, None as Option<&[u8]>, Some(&fresh[..]))? {
                Ok(()) => fresh.to_vec(),
                Err(e) => e.current.map(|v| v.to_vec()).unwrap_or_default(),
            };
        if stored.len() != 32 {
            return Err(Error::corrupt(
                "anti-replay hashing key",
                format!("{} bytes, not 32", stored.len()),
            ));
        }
        Ok(Self {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &stored),
            split_at: SPLIT_AT,
        })
    }

    /// The first-level bucket key of an anti-replay key, and its id's hash.
    fn place(&self, key: &[u8]) -> Result<(Vec<u8>, [u8; HASH])> {
        if key.len() != KEY_LEN {
            return Err(Error::corrupt(
                "anti-replay key",
                format!("{} bytes, not {KEY_LEN}", key.len()),
            ));
        }
        let tag = ring::hmac::sign(&self.key, &key[PREFIX..]);
        let mut h = [0u8; HASH];
        h.copy_from_slice(&tag.as_ref()[..HASH]);
        let mut first = Vec::with_capacity(PREFIX + 3);
        first.extend_from_slice(&key[..PREFIX]);
        first.extend_from_slice(&h[..2]);
        Ok((first, h))
    }

    /// Whether the id of `key` is in the table; `get` reads a bucket.
    pub(crate) fn contains<E: From<Error>>(
        &self,
        key: &[u8],
        get: impl Fn(&[u8]) -> std::result::Result<Option<IVec>, E>,
    ) -> std::result::Result<bool, E> {
        let (first, h) = self.place(key)?;
        let Some(v) = get(&first)? else {
            return Ok(false);
        };
        Ok(match first_level(&v)? {
            Some(hashes) => find(hashes, &h)?.is_ok(),
            None => match get(&second(&first, &h))? {
                Some(v) => find(&v, &h)?.is_ok(),
                None => false,
            },
        })
    }

    /// Adds the id of `key` (a no-op if it is there).
    pub(crate) fn insert(&self, tx: &TransactionalTree, key: &[u8]) -> TxResult<()> {
        let (first, h) = self.place(key)?;
        let cur = tx.get(&first)?;
        let hashes = match &cur {
            None => &[][..],
            Some(v) => match first_level(v)? {
                Some(hashes) => hashes,
                None => {
                    let second = second(&first, &h);
                    let cur = tx.get(&second)?;
                    if let Some(next) = with(cur.as_deref().unwrap_or(&[]), &h)? {
                        tx.insert(second, next)?;
                    }
                    return Ok(());
                }
            },
        };
        let Some(next) = with(hashes, &h)? else {
            return Ok(());
        };
        if next.len() / HASH <= self.split_at {
            let mut v = Vec::with_capacity(1 + next.len());
            v.push(LEAF);
            v.extend_from_slice(&next);
            tx.insert(first, v)?;
            return Ok(());
        }
        // Split: sorted hashes share their first two bytes, so each second-level bucket is a
        // run of them, in order.
        let mut rest = &next[..];
        while !rest.is_empty() {
            let high = rest[2] >> 4;
            let run = rest.chunks(HASH).take_while(|c| c[2] >> 4 == high).count() * HASH;
            tx.insert(second(&first, rest), &rest[..run])?;
            rest = &rest[run..];
        }
        tx.insert(first, &[SPLIT][..])?;
        Ok(())
    }

    /// Removes the id of `key` (a no-op if it is not there).
    pub(crate) fn remove(&self, tx: &TransactionalTree, key: &[u8]) -> TxResult<()> {
        let (first, h) = self.place(key)?;
        let Some(v) = tx.get(&first)? else {
            return Ok(());
        };
        let (k, hashes, leaf) = match first_level(&v)? {
            Some(hashes) => (first, hashes.to_vec(), true),
            None => match tx.get(second(&first, &h))? {
                Some(v) => (second(&first, &h), v.to_vec(), false),
                None => return Ok(()),
            },
        };
        match without(&hashes, &h)? {
            None => {}
            Some(next) if next.is_empty() => drop(tx.remove(k)?),
            Some(next) if leaf => {
                let mut v = vec![LEAF];
                v.extend_from_slice(&next);
                tx.insert(k, v)?;
            }
            Some(next) => drop(tx.insert(k, next)?),
        }
        Ok(())
    }
}

/// The second-level bucket of hash `h` under the first-level bucket `first` (built only for a
/// split one).
fn second(first: &[u8], h: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(first.len() + 1);
    k.extend_from_slice(first);
    k.push(h[2] >> 4);
    k
}

/// The hashes of a first-level bucket, or `None` if it is split.
fn first_level(v: &[u8]) -> Result<Option<&[u8]>> {
    match v.split_first() {
        Some((&LEAF, hashes)) => Ok(Some(hashes)),
        Some((&SPLIT, [])) => Ok(None),
        _ => Err(Error::corrupt(
            "anti-replay bucket",
            "neither hashes nor a split mark",
        )),
    }
}

/// Where `h` is in the sorted `hashes`, or where it would go.
fn find(hashes: &[u8], h: &[u8]) -> Result<std::result::Result<usize, usize>> {
    if !hashes.len().is_multiple_of(HASH) {
        return Err(Error::corrupt(
            "anti-replay bucket",
            format!("{} bytes of hashes, not a multiple of {HASH}", hashes.len()),
        ));
    }
    let (mut lo, mut hi) = (0, hashes.len() / HASH);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match hashes[mid * HASH..(mid + 1) * HASH].cmp(h) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Ok(Ok(mid)),
        }
    }
    Ok(Err(lo))
}

/// `hashes` with `h` added, or `None` if it holds it already.
fn with(hashes: &[u8], h: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(match find(hashes, h)? {
        Ok(_) => None,
        Err(i) => {
            let mut v = Vec::with_capacity(hashes.len() + HASH);
            v.extend_from_slice(&hashes[..i * HASH]);
            v.extend_from_slice(h);
            v.extend_from_slice(&hashes[i * HASH..]);
            Some(v)
        }
    })
}

/// `hashes` without `h` (empty if it was the last), or `None` if it does not hold it.
fn without(hashes: &[u8], h: &[u8]) -> Result<Option<Vec<u8>>> {
    Ok(match find(hashes, h)? {
        Err(_) => None,
        Ok(i) => {
            let mut v = hashes[..i * HASH].to_vec();
            v.extend_from_slice(&hashes[(i + 1) * HASH..]);
            Some(v)
        }
    })
}

/// Ids in the bucket `key` → `v` (a split first-level bucket holds none itself).
pub(crate) fn ids_in(key: &[u8], v: &[u8]) -> u64 {
    let hashes = if key.len() == PREFIX + 2 {
        v.len().saturating_sub(1)
    } else {
        v.len()
    };
    (hashes / HASH) as u64
}

/// Moves the anti-replay entries of an earlier version (one per id, 56-byte keys) into buckets,
/// a few thousand per transaction; a no-op once done (a `meta` entry says so). Every step is
/// idempotent, so a crash midway leaves entries the next start moves. Returns how many moved.
pub(crate) fn migrate(salt: &Salt, seen: &sled::Tree, meta: &sled::Tree) -> Result<usize> {
    use std::ops::Bound;
    if meta.get(LAYOUT_KEY)?.as_deref() == Some(LAYOUT_BUCKETS) {
        return Ok(0);
    }
    let mut moved = 0;
    // Each pass goes on after the last key the one before moved.
    let mut after: Bound<IVec> = Bound::Unbounded;
    loop {
        let old: Vec<IVec> = seen
            .range::<IVec, _>((after.clone(), Bound::Unbounded))
            .keys()
            .filter(|k| k.as_ref().map_or(true, |k| k.len() == KEY_LEN))
            .take(4_096)
            .collect::<std::result::Result<_, _>>()?;
        let Some(last) = old.last() else {
            break;
        };
        after = Bound::Excluded(last.clone());
        if moved == 0 {
            tracing::info!(
                "moving the anti-replay entries of the earlier layout into buckets (once; a \
                 large store takes a while, and a restart goes on where this one stopped)"
            );
        }
        let r = seen.transaction(|tx| {
            for k in &old {
                salt.insert(tx, k).map_err(super::backend::to_sled)?;
                tx.remove(k.clone())?;
            }
            Ok(())
        });
        hush_server::db::tx_result(r)?;
        moved += old.len();
    }
    meta.insert(LAYOUT_KEY, LAYOUT_BUCKETS)?;
    if moved > 0 {
        tracing::info!(
            moved,
            "moved anti-replay entries of the earlier layout into buckets"
        );
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, sled::Tree, sled::Tree, Salt) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (seen, meta) = (db.open_tree("seen").unwrap(), db.open_tree("meta").unwrap());
        let salt = Salt::load(&meta).unwrap();
        (dir, seen, meta, salt)
    }

    fn key(window: u8, id: u32) -> Vec<u8> {
        let mut k = vec![7; 32];
        k.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, window]);
        k.extend_from_slice(&[0; 12]);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn has(salt: &Salt, seen: &sled::Tree, k: &[u8]) -> bool {
        salt.contains(k, |b| seen.get(b).map_err(Error::from))
            .unwrap()
    }

    fn apply(seen: &sled::Tree, f: impl Fn(&TransactionalTree) -> TxResult<()>) {
        let r = seen.transaction(|tx| f(tx).map_err(super::super::backend::to_sled));
        hush_server::db::tx_result::<(), Error>(r).unwrap();
    }

    #[test]
    fn ids_are_found_once_added_and_not_after_removal() {
        let (_d, seen, _m, salt) = db();
        let ids: Vec<Vec<u8>> = (0..100).map(|i| key(1, i)).collect();
        for k in &ids[..50] {
            apply(&seen, |tx| salt.insert(tx, k));
        }
        // Again: a no-op.
        apply(&seen, |tx| salt.insert(tx, &ids[0]));
        for (i, k) in ids.iter().enumerate() {
            assert_eq!(has(&salt, &seen, k), i < 50, "id {i}");
        }
        for k in &ids[..25] {
            apply(&seen, |tx| salt.remove(tx, k));
        }
        for (i, k) in ids.iter().enumerate() {
            assert_eq!(has(&salt, &seen, k), (25..50).contains(&i), "id {i}");
        }
        let total: u64 = seen
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| ids_in(&k, &v))
            .sum();
        assert_eq!(total, 25);
    }

    #[test]
    fn many_ids_in_one_window_are_all_found() {
        let (_d, seen, _m, salt) = db();
        let n = 20_000;
        let ids: Vec<Vec<u8>> = (0..n).map(|i| key(2, i)).collect();
        for chunk in ids.chunks(1_000) {
            apply(&seen, |tx| {
                chunk.iter().try_for_each(|k| salt.insert(tx, k))
            });
        }
        let total: u64 = seen
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| ids_in(&k, &v))
            .sum();
        assert_eq!(total, u64::from(n));
        assert!(ids.iter().all(|k| has(&salt, &seen, k)));
        assert!(!has(&salt, &seen, &key(2, n)));
        assert!(!has(&salt, &seen, &key(3, 0)));
    }

    #[test]
    fn one_bucket_past_its_limit_splits() {
        let (_d, seen, _m, mut salt) = db();
        salt.split_at = 4;
        // Ids that hash into one first-level bucket: found by trying.
        let target = salt.place(&key(4, 0)).unwrap().0;
        let same: Vec<Vec<u8>> = (0..)
            .map(|i| key(4, i))
            .filter(|k| salt.place(k).unwrap().0 == target)
            .take(salt.split_at + 10)
            .collect();
        for k in &same[..salt.split_at] {
            apply(&seen, |tx| salt.insert(tx, k));
        }
        assert_eq!(seen.get(&target).unwrap().unwrap()[0], LEAF);
        apply(&seen, |tx| salt.insert(tx, &same[salt.split_at]));
        assert_eq!(seen.get(&target).unwrap().unwrap().as_ref(), [SPLIT]);
        for k in &same[salt.split_at + 1..] {
            apply(&seen, |tx| salt.insert(tx, k));
        }
        assert!(same.iter().all(|k| has(&salt, &seen, k)));
        let total: u64 = seen
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| ids_in(&k, &v))
            .sum();
        assert_eq!(total, same.len() as u64);
        apply(&seen, |tx| salt.remove(tx, &same[0]));
        assert!(!has(&salt, &seen, &same[0]));
        assert!(has(&salt, &seen, &same[1]));
    }

    #[test]
    fn the_hashing_key_is_made_once_and_kept() {
        let (_d, seen, meta, salt) = db();
        apply(&seen, |tx| salt.insert(tx, &key(5, 1)));
        let again = Salt::load(&meta).unwrap();
        assert!(has(&again, &seen, &key(5, 1)));
        meta.insert(SALT_KEY, &[1u8; 3][..]).unwrap();
        assert!(
            Salt::load(&meta)
                .unwrap_err()
                .to_string()
                .contains("3 bytes")
        );
    }

    #[test]
    fn a_key_or_bucket_of_the_wrong_size_is_an_error_not_a_panic() {
        let (_d, seen, _m, salt) = db();
        let e = salt
            .contains(&[0; 55], |b| seen.get(b).map_err(Error::from))
            .unwrap_err();
        assert!(e.to_string().contains("55 bytes"), "{e}");
        let first = salt.place(&key(6, 1)).unwrap().0;
        seen.insert(&first, &[LEAF, 1, 2][..]).unwrap();
        let e = salt
            .contains(&key(6, 1), |b| seen.get(b).map_err(Error::from))
            .unwrap_err();
        assert!(e.to_string().contains("2 bytes of hashes"), "{e}");
    }

    #[test]
    fn entries_of_the_earlier_layout_move_into_buckets_once() {
        let (_d, seen, meta, salt) = db();
        let keys: Vec<Vec<u8>> = (0..5_000).map(|i| key(8, i)).collect();
        for k in &keys {
            seen.insert(k, &[]).unwrap();
        }
        assert_eq!(migrate(&salt, &seen, &meta).unwrap(), 5_000);
        assert!(seen.iter().keys().all(|k| k.unwrap().len() < KEY_LEN));
        assert!(keys.iter().all(|k| has(&salt, &seen, k)));
        // Done once: a key of the earlier size written afterwards is not touched.
        seen.insert(&keys[0], &[]).unwrap();
        assert_eq!(migrate(&salt, &seen, &meta).unwrap(), 0);
        assert!(seen.get(&keys[0]).unwrap().is_some());
    }
}
