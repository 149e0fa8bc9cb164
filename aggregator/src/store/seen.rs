//! How sled keeps the anti-replay table: an index in memory, and a log of each transaction's ids
//! in sled.
//!
//! The store names an anti-replay entry by its key `task ‖ window ‖ report id` (56 bytes,
//! [`super::seen_key`]), with no value. PostgreSQL keeps one row per key. On sled, one entry per
//! id made the aggregators' memory grow with every report until its id expired (sled's memory
//! grows with its number of entries: a leaf holds at most 16, and every leaf keeps its metadata
//! in memory even when paged out; sled 0.34, spacejam/sled#1093), and a read and a rewrite of an
//! entry per report, in buckets or not, was most of the store's time per report.
//!
//! So an id is first hashed with a secret of this store (HMAC-SHA256 under a random key kept in
//! `meta`, cut to 16 bytes), so that nobody who picks report ids — any client — can choose where
//! they land. Then:
//!
//! - **In memory** ([`SeenIndex`]), each window (`task ‖ window`) has a hash set of the first 8
//!   bytes of its ids' hashes. Every check reads only this. Two different ids share those 8
//!   bytes with probability 2⁻⁶⁴ per pair, and then the second is refused as a replay; nobody can
//!   aim for that without the key.
//! - **In sled**, each transaction that adds ids writes one log entry per window it touched:
//!   `task ‖ window ‖ 0xFF ‖ n` (n from sled's id generator, unique across restarts) → the
//!   16-byte hashes of the ids it added. The entry is written in the same transaction as what the
//!   ids came with (the pending records at the leader, the aggregate at the helper), so a crash
//!   keeps both or neither, and the index is loaded from the log when the store opens. Every
//!   entry keeps the `task ‖ window` prefix, so expiring a window's ids is still a range delete.
//!
//! A transaction that names the `seen` table holds the index's lock from before its first read
//! to after its ids are added (sled serializes transactions anyway), so two transactions cannot
//! both find an id missing and both add it. The ids are added to the index only once sled has
//! committed; a transaction that fails or runs again adds nothing.
//!
//! Stores written before this layout hold the ids in buckets (`task ‖ window ‖ hash[0..2]`, and
//! below a split mark `task ‖ window ‖ hash[0..2] ‖ hash[2] >> 4`, each the sorted 16-byte
//! hashes), or, earlier still, one entry per id; the index loads buckets as they are, and entries
//! of one per id move into the log when the store first opens.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

use sled::IVec;
use sled::transaction::{TransactionalTree, UnabortableTransactionError};

use super::backend::{TxError, TxResult};
use crate::error::{Error, Result};

/// Bytes of an anti-replay key: task (32) ‖ window (8) ‖ report id (16).
pub(crate) const KEY_LEN: usize = 56;
/// Bytes of the `task ‖ window` prefix.
const PREFIX: usize = 40;
/// Bytes of a hashed id, as kept in sled.
const HASH: usize = 16;
/// The byte after the prefix in a log entry's key.
const LOG: u8 = 0xFF;
/// Bytes of a log entry's key: prefix ‖ [`LOG`] ‖ n (big-endian).
const LOG_KEY_LEN: usize = PREFIX + 9;

/// Buckets of the layout before the log: a first-level bucket's value starts with this byte
/// when it holds hashes...
const LEAF: u8 = 0;
/// ...and is this one byte when its hashes are in second-level buckets.
const SPLIT: u8 = 1;

/// `meta` entries: the hashing key, and the mark that no entry of one per id is left.
const SALT_KEY: &[u8] = b"seen_salt";
const LAYOUT_KEY: &[u8] = b"seen_layout";
const LAYOUT_BUCKETS: &[u8] = b"buckets";

/// A window: `task ‖ window`.
pub(crate) type Window = [u8; PREFIX];
/// An id's keyed hash.
pub(crate) type Hash = [u8; HASH];

/// The store's secret hashing key for report ids.
#[derive(Clone, Debug)]
pub(crate) struct Salt {
    key: ring::hmac::Key,
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
        })
    }

    /// The window of an anti-replay key, and its id's hash.
    pub(crate) fn hash(&self, key: &[u8]) -> Result<(Window, Hash)> {
        if key.len() != KEY_LEN {
            return Err(Error::corrupt(
                "anti-replay key",
                format!("{} bytes, not {KEY_LEN}", key.len()),
            ));
        }
        let tag = ring::hmac::sign(&self.key, &key[PREFIX..]);
        let mut h = [0u8; HASH];
        h.copy_from_slice(&tag.as_ref()[..HASH]);
        let mut w = [0u8; PREFIX];
        w.copy_from_slice(&key[..PREFIX]);
        Ok((w, h))
    }
}

/// Hashes a `u64` to itself: the index's keys are already keyed hashes, uniform and unknown to
/// whoever picks report ids.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type Ids = HashSet<u64, BuildHasherDefault<Identity>>;

/// The first 8 bytes of a hash, as the index keeps it.
fn short(h: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_le_bytes(b)
}

/// The ids of every window not yet expired, in memory (see the module's comment).
#[derive(Default)]
pub(crate) struct SeenIndex {
    windows: BTreeMap<Window, Ids>,
}

impl std::fmt::Debug for SeenIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeenIndex")
            .field("windows", &self.windows.len())
            .field("ids", &self.ids())
            .finish()
    }
}

impl SeenIndex {
    /// Loads every id in `seen`: log entries and the buckets of the earlier layout. An entry of
    /// any other shape is an error naming it: a store missing ids would accept their replays.
    pub(crate) fn load(seen: &sled::Tree) -> Result<Self> {
        let mut index = Self::default();
        for kv in seen.iter() {
            let (k, v) = kv?;
            let hashes = match k.len() {
                LOG_KEY_LEN if k[PREFIX] == LOG => &v[..],
                n if n == PREFIX + 2 => match v.split_first() {
                    Some((&LEAF, hashes)) => hashes,
                    Some((&SPLIT, [])) => &[][..],
                    _ => return Err(damaged(&k, "neither hashes nor a split mark")),
                },
                n if n == PREFIX + 3 => &v[..],
                LOG_KEY_LEN => {
                    return Err(damaged(
                        &k,
                        "a key of a log entry's size, not marked as one",
                    ));
                }
                n => return Err(damaged(&k, &format!("a key of {n} bytes"))),
            };
            if !hashes.len().is_multiple_of(HASH) {
                return Err(damaged(
                    &k,
                    &format!("{} bytes of hashes, not a multiple of {HASH}", hashes.len()),
                ));
            }
            let mut w = [0u8; PREFIX];
            w.copy_from_slice(&k[..PREFIX]);
            let ids = index.windows.entry(w).or_default();
            ids.extend(hashes.chunks(HASH).map(short));
        }
        Ok(index)
    }

    /// Whether the id hashed to `h` is in window `w`.
    pub(crate) fn contains(&self, w: &Window, h: &Hash) -> bool {
        self.windows
            .get(w)
            .is_some_and(|ids| ids.contains(&short(h)))
    }

    /// Adds what a committed transaction logged.
    pub(crate) fn add(&mut self, staged: Staged) {
        for (w, hashes) in staged.windows {
            let ids = self.windows.entry(w).or_default();
            ids.extend(hashes.iter().map(|h| short(h)));
        }
    }

    /// Ids held, over every window.
    pub(crate) fn ids(&self) -> u64 {
        self.windows.values().map(|ids| ids.len() as u64).sum()
    }

    /// Forgets the windows whose `task ‖ window` lies in `[lo, hi)`; returns how many ids they
    /// held.
    pub(crate) fn forget(&mut self, lo: &[u8], hi: &[u8]) -> u64 {
        let mut gone = 0;
        self.windows.retain(|w, ids| {
            let expired = &w[..] >= lo && &w[..] < hi;
            if expired {
                gone += ids.len() as u64;
            }
            !expired
        });
        gone
    }
}

/// The ids a transaction adds, per window, until it commits.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    windows: BTreeMap<Window, BTreeSet<Hash>>,
}

impl Staged {
    /// Whether the transaction added the id hashed to `h` in window `w`.
    pub(crate) fn contains(&self, w: &Window, h: &Hash) -> bool {
        self.windows.get(w).is_some_and(|hs| hs.contains(h))
    }

    /// Adds an id.
    pub(crate) fn insert(&mut self, w: Window, h: Hash) {
        self.windows.entry(w).or_default().insert(h);
    }

    /// Writes one log entry per window into `seen`, each under a fresh number from sled's id
    /// generator (the transaction's own: the database's would wait for the transaction).
    pub(crate) fn write(&self, seen: &TransactionalTree) -> TxResult<()> {
        for (w, hashes) in &self.windows {
            let mut v = Vec::with_capacity(hashes.len() * HASH);
            for h in hashes {
                v.extend_from_slice(h);
            }
            let n = seen
                .generate_id()
                .map_err(|e| TxError::Sled(UnabortableTransactionError::Storage(e)))?;
            seen.insert(&log_key(w, n)[..], v)?;
        }
        Ok(())
    }
}

/// The key of log entry `n` of window `w`.
fn log_key(w: &Window, n: u64) -> [u8; LOG_KEY_LEN] {
    let mut k = [0u8; LOG_KEY_LEN];
    k[..PREFIX].copy_from_slice(w);
    k[PREFIX] = LOG;
    k[PREFIX + 1..].copy_from_slice(&n.to_be_bytes());
    k
}

fn damaged(key: &[u8], what: &str) -> Error {
    let hex = super::backend::hex(key);
    Error::corrupt(
        "anti-replay table",
        format!(
            "entry {hex} holds {what}; restore the data directory from a backup (a store \
             missing ids would accept their replays)"
        ),
    )
}

/// Ids in the entry `key` → `v` of sled's anti-replay table (a split first-level bucket of
/// the earlier layout holds none itself).
pub(crate) fn ids_in(key: &[u8], v: &[u8]) -> u64 {
    let hashes = if key.len() == PREFIX + 2 {
        v.len().saturating_sub(1)
    } else {
        v.len()
    };
    (hashes / HASH) as u64
}

/// Moves the anti-replay entries of an earlier version (one per id, 56-byte keys) into log
/// entries, a few thousand per transaction; a no-op once done (a `meta` entry says so). Every
/// step is one transaction, so a crash midway leaves entries the next start moves. Returns how
/// many moved.
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
                "moving the anti-replay entries of the earlier layout into the log (once; a \
                 large store takes a while, and a restart goes on where this one stopped)"
            );
        }
        let mut staged = Staged::default();
        for k in &old {
            let (w, h) = salt.hash(k)?;
            staged.insert(w, h);
        }
        let r = seen.transaction(|tx| {
            staged.write(tx).map_err(super::backend::to_sled)?;
            for k in &old {
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
            "moved anti-replay entries of the earlier layout into the log"
        );
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, sled::Db, sled::Tree, sled::Tree, Salt) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let (seen, meta) = (db.open_tree("seen").unwrap(), db.open_tree("meta").unwrap());
        let salt = Salt::load(&meta).unwrap();
        (dir, db, seen, meta, salt)
    }

    fn key(window: u8, id: u32) -> Vec<u8> {
        let mut k = vec![7; 32];
        k.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, window]);
        k.extend_from_slice(&[0; 12]);
        k.extend_from_slice(&id.to_be_bytes());
        k
    }

    fn has(salt: &Salt, index: &SeenIndex, k: &[u8]) -> bool {
        let (w, h) = salt.hash(k).unwrap();
        index.contains(&w, &h)
    }

    /// Logs `keys` in one transaction, as the store does.
    fn log(seen: &sled::Tree, salt: &Salt, keys: &[Vec<u8>]) -> Staged {
        let mut staged = Staged::default();
        for k in keys {
            let (w, h) = salt.hash(k).unwrap();
            staged.insert(w, h);
        }
        let r = seen.transaction(|tx| staged.write(tx).map_err(super::super::backend::to_sled));
        hush_server::db::tx_result::<(), Error>(r).unwrap();
        staged
    }

    #[test]
    fn logged_ids_are_found_in_memory_and_after_a_reload() {
        let (_d, _db, seen, _m, salt) = db();
        let ids: Vec<Vec<u8>> = (0..20_000).map(|i| key(1 + (i % 3) as u8, i)).collect();
        let mut index = SeenIndex::default();
        for chunk in ids[..15_000].chunks(1_000) {
            index.add(log(&seen, &salt, chunk));
        }
        // One entry per window per transaction.
        assert_eq!(seen.len(), 15 * 3);
        let reloaded = SeenIndex::load(&seen).unwrap();
        for (i, k) in ids.iter().enumerate() {
            assert_eq!(has(&salt, &index, k), i < 15_000, "id {i}");
            assert_eq!(has(&salt, &reloaded, k), i < 15_000, "id {i}, reloaded");
        }
        assert!(!has(&salt, &index, &key(9, 0)));
        assert_eq!(index.ids(), 15_000);
        let total: u64 = seen
            .iter()
            .map(|kv| kv.unwrap())
            .map(|(k, v)| ids_in(&k, &v))
            .sum();
        assert_eq!(total, 15_000);
    }

    #[test]
    fn staged_ids_are_kept_once_per_window() {
        let (_d, _db, _seen, _m, salt) = db();
        let mut staged = Staged::default();
        let (w, h) = salt.hash(&key(1, 1)).unwrap();
        assert!(!staged.contains(&w, &h));
        staged.insert(w, h);
        staged.insert(w, h);
        assert!(staged.contains(&w, &h));
        let (w2, h2) = salt.hash(&key(2, 1)).unwrap();
        assert_eq!(h, h2, "the hash is of the id alone");
        assert!(!staged.contains(&w2, &h2), "another window");
        let mut index = SeenIndex::default();
        index.add(staged);
        assert_eq!(index.ids(), 1);
    }

    #[test]
    fn forgetting_windows_drops_only_those_in_range() {
        let (_d, _db, seen, _m, salt) = db();
        let mut index = SeenIndex::default();
        let ids: Vec<Vec<u8>> = (0..30).map(|i| key(1 + (i % 3) as u8, i)).collect();
        index.add(log(&seen, &salt, &ids));
        let (lo, hi) = (key(1, 0)[..PREFIX].to_vec(), key(3, 0)[..PREFIX].to_vec());
        assert_eq!(index.forget(&lo, &hi), 20);
        assert_eq!(index.ids(), 10);
        assert!(ids.iter().all(|k| has(&salt, &index, k) == (k[39] == 3)));
    }

    #[test]
    fn buckets_of_the_earlier_layout_are_loaded() {
        let (_d, _db, seen, _m, salt) = db();
        // As that layout wrote them: two ids in one first-level bucket (sorted), and a third
        // under a first-level bucket that split, in its second-level bucket.
        let a = key(4, 1);
        let (w, ha) = salt.hash(&a).unwrap();
        let mut ids = (2..).map(|i| key(4, i));
        let b = ids
            .find(|k| salt.hash(k).unwrap().1[..2] == ha[..2])
            .unwrap();
        let c = ids
            .find(|k| salt.hash(k).unwrap().1[..2] != ha[..2])
            .unwrap();
        let (hb, hc) = (salt.hash(&b).unwrap().1, salt.hash(&c).unwrap().1);
        let mut first = w.to_vec();
        first.extend_from_slice(&ha[..2]);
        let mut v = vec![LEAF];
        let (lo, hi) = if ha < hb { (ha, hb) } else { (hb, ha) };
        v.extend_from_slice(&lo);
        v.extend_from_slice(&hi);
        seen.insert(&first, v).unwrap();
        let mut split = w.to_vec();
        split.extend_from_slice(&hc[..2]);
        seen.insert(&split, &[SPLIT][..]).unwrap();
        let mut second = split.clone();
        second.push(hc[2] >> 4);
        seen.insert(&second, &hc[..]).unwrap();
        let index = SeenIndex::load(&seen).unwrap();
        assert!([&a, &b, &c].iter().all(|k| has(&salt, &index, k)));
        assert_eq!(index.ids(), 3);
        assert!(!has(&salt, &index, &key(4, 4)));
    }

    #[test]
    fn the_hashing_key_is_made_once_and_kept() {
        let (_d, _db, seen, meta, salt) = db();
        log(&seen, &salt, &[key(5, 1)]);
        let again = Salt::load(&meta).unwrap();
        assert!(has(&again, &SeenIndex::load(&seen).unwrap(), &key(5, 1)));
        meta.insert(SALT_KEY, &[1u8; 3][..]).unwrap();
        assert!(
            Salt::load(&meta)
                .unwrap_err()
                .to_string()
                .contains("3 bytes")
        );
    }

    #[test]
    fn a_key_or_entry_of_the_wrong_size_is_an_error_not_a_panic() {
        let (_d, _db, seen, _m, salt) = db();
        let e = salt.hash(&[0; 55]).unwrap_err();
        assert!(e.to_string().contains("55 bytes"), "{e}");
        let mut k = key(6, 1)[..PREFIX].to_vec();
        k.push(LOG);
        k.extend_from_slice(&7u64.to_be_bytes());
        seen.insert(&k, &[1, 2][..]).unwrap();
        let e = SeenIndex::load(&seen).unwrap_err();
        assert!(e.to_string().contains("2 bytes of hashes"), "{e}");
        seen.clear().unwrap();
        seen.insert(&k[..45], &[][..]).unwrap();
        let e = SeenIndex::load(&seen).unwrap_err();
        assert!(e.to_string().contains("a key of 45 bytes"), "{e}");
        seen.clear().unwrap();
        k[PREFIX] = 0;
        seen.insert(&k, &[][..]).unwrap();
        let e = SeenIndex::load(&seen).unwrap_err();
        assert!(e.to_string().contains("not marked as one"), "{e}");
    }

    #[test]
    fn entries_of_one_per_id_move_into_the_log_once() {
        let (_d, _db, seen, meta, salt) = db();
        let keys: Vec<Vec<u8>> = (0..5_000).map(|i| key(8, i)).collect();
        for k in &keys {
            seen.insert(k, &[]).unwrap();
        }
        assert_eq!(migrate(&salt, &seen, &meta).unwrap(), 5_000);
        assert!(seen.iter().keys().all(|k| k.unwrap().len() == LOG_KEY_LEN));
        let index = SeenIndex::load(&seen).unwrap();
        assert!(keys.iter().all(|k| has(&salt, &index, k)));
        assert_eq!(index.ids(), 5_000);
        // Done once: a key of the earlier size written afterwards is not touched.
        seen.insert(&keys[0], &[]).unwrap();
        assert_eq!(migrate(&salt, &seen, &meta).unwrap(), 0);
        assert!(seen.get(&keys[0]).unwrap().is_some());
    }
}
