//! The shuffler's sled database.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `tasks` | task id | the task (protobuf `TaskConfig`) |
//! | `keys` | `"keyset"` | the HPKE [`KeySet`] |
//! | `tags` | key epoch ‖ replay tag | — (anti-replay; deleted with the key) |
//! | `buffer` | hop ‖ task ‖ batch ‖ random | task id ‖ peeled packet, until the next hop acknowledges it |
//! | `stats` | task ‖ code | counters of accepted, forwarded and refused packets |
//! | `meta` | `"closed:"` ‖ task ‖ hop | number of the newest closed batch of a lane (hop and task) |
//!
//! The buffer key holds no arrival order: inside a batch, packets are keyed by 16 random bytes.
//! The key epoch is the first 8 bytes of SHA-256 of the HPKE public key that opened the packet,
//! so a tag is only compared with tags of the same key, and all of a key's tags go when it does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use hush_protocol::TaskId;
use hush_protocol::proto::v1::RejectReason;
use hush_server::db::tx_result;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use crate::error::{Error, Result};

/// The scope of counters for packets whose task is unknown.
pub const NO_TASK: [u8; 32] = [0; 32];

/// A counter kept per task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stat {
    /// Packets accepted and stored.
    Accepted,
    /// Packets acknowledged by the next hop and deleted.
    Forwarded,
    /// Packets refused, by reason.
    Rejected(RejectReason),
}

impl Stat {
    fn code(self) -> u8 {
        match self {
            Stat::Accepted => 0,
            Stat::Forwarded => 1,
            Stat::Rejected(r) => 16 + r as u8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Stat::Accepted),
            1 => Some(Stat::Forwarded),
            c if c >= 16 => RejectReason::try_from(i32::from(c - 16))
                .ok()
                .map(Stat::Rejected),
            _ => None,
        }
    }
}

/// Counter increments, applied in the same transaction as the change they count.
#[derive(Clone, Debug, Default)]
pub struct StatDelta(BTreeMap<([u8; 32], u8), u64>);

impl StatDelta {
    /// Adds `n` to `stat` of `scope`.
    pub fn add(&mut self, scope: [u8; 32], stat: Stat, n: u64) {
        if n > 0 {
            *self.0.entry((scope, stat.code())).or_default() += n;
        }
    }

    fn apply(
        &self,
        t: &TransactionalTree,
    ) -> std::result::Result<(), ConflictableTransactionError<Error>> {
        for ((scope, code), n) in &self.0 {
            let mut k = scope.to_vec();
            k.push(*code);
            let old = match t.get(&k)? {
                Some(v) => u64::from_le_bytes(v.as_ref().try_into().map_err(|_| {
                    ConflictableTransactionError::Abort(Error::corrupt("counter", "not 8 bytes"))
                })?),
                None => 0,
            };
            t.insert(k, &(old + n).to_le_bytes()[..])?;
        }
        Ok(())
    }
}

/// A peeled packet ready to be stored.
#[derive(Clone, Debug)]
pub struct Incoming {
    /// Key epoch ‖ replay tag.
    pub tag_key: [u8; 40],
    /// Where it goes in the buffer.
    pub buffer_key: Vec<u8>,
    /// Its task.
    pub task: TaskId,
    /// The peeled packet (or report) for the next hop.
    pub payload: Vec<u8>,
}

/// The key epoch of an HPKE public key.
pub fn key_epoch(public_key: &[u8]) -> [u8; 8] {
    let d = ring::digest::digest(&ring::digest::SHA256, public_key);
    let mut e = [0u8; 8];
    e.copy_from_slice(&d.as_ref()[..8]);
    e
}

/// The buffer key prefix of `hop`.
pub fn hop_prefix(hop: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + hop.len());
    // Hop names are 1 to 255 bytes (checked by the onion decoder and the config).
    k.push(hop.len() as u8);
    k.extend_from_slice(hop.as_bytes());
    k
}

/// The buffer key prefix of a lane: hop ‖ task.
pub fn lane_prefix(hop: &str, task: &TaskId) -> Vec<u8> {
    let mut k = hop_prefix(hop);
    k.extend_from_slice(task.as_bytes());
    k
}

/// A buffer key: hop ‖ task ‖ batch ‖ 16 random bytes.
pub fn buffer_key(hop: &str, task: &TaskId, batch: u64) -> Vec<u8> {
    let mut k = lane_prefix(hop, task);
    k.extend_from_slice(&batch.to_be_bytes());
    k.extend_from_slice(&rand::random::<[u8; 16]>());
    k
}

/// What the buffer holds for one lane, as found at startup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffered {
    /// Packets.
    pub count: u64,
    /// Lowest and highest batch number among them.
    pub batches: Option<(u64, u64)>,
}

/// A buffered packet: its buffer key, task and peeled bytes.
pub type StoredPacket = (Vec<u8>, TaskId, Vec<u8>);

/// The database of one shuffler.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    tasks: Tree,
    keys: Tree,
    tags: Tree,
    buffer: Tree,
    stats: Tree,
    meta: Tree,
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

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open(dir, cache_mb)?;
        Ok(Self {
            tasks: db.open_tree("tasks")?,
            keys: db.open_tree("keys")?,
            tags: db.open_tree("tags")?,
            buffer: db.open_tree("buffer")?,
            stats: db.open_tree("stats")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    /// Makes everything written so far durable ([`hush_server::db::flush`]).
    pub async fn flush(&self) -> Result<()> {
        Ok(hush_server::db::flush(&self.db).await?)
    }

    /// Stores a task; returns the previous encoding, if any.
    pub fn put_task(&self, id: &TaskId, encoded: Vec<u8>) -> Result<Option<Vec<u8>>> {
        Ok(self
            .tasks
            .insert(id.as_bytes(), encoded)?
            .map(|v| v.to_vec()))
    }

    /// The stored encoding of a task.
    pub fn task(&self, id: &TaskId) -> Result<Option<Vec<u8>>> {
        Ok(self.tasks.get(id.as_bytes())?.map(|v| v.to_vec()))
    }

    /// Every stored task encoding.
    pub fn tasks(&self) -> Result<Vec<Vec<u8>>> {
        self.tasks
            .iter()
            .values()
            .map(|v| Ok(v?.to_vec()))
            .collect()
    }

    /// Stores peeled packets with their replay tags. A packet whose tag is already stored (or
    /// repeated within `items`) is not stored; the result says which, in order. `stats` and one
    /// `Accepted` or `Rejected(Replay)` per item are counted too.
    ///
    /// Callers serialize calls (the mixer's lock), so the tag check cannot race. The writes are
    /// three atomic batches in this order: buffer, counters, tags. sled recovers a prefix of
    /// them, so after a crash a packet may be stored without its tag (it was not acknowledged;
    /// if the sender retries, the next hop's replay check drops the second copy) but a tag is
    /// never stored without its packet, which would lose the packet on the sender's retry.
    pub fn accept(&self, items: &[Incoming], stats: &StatDelta) -> Result<Vec<bool>> {
        let mut stored = Vec::with_capacity(items.len());
        let mut delta = stats.clone();
        let mut in_request = std::collections::HashSet::with_capacity(items.len());
        let mut buffer = sled::Batch::default();
        let mut tags = sled::Batch::default();
        for item in items {
            let scope = *item.task.as_bytes();
            if !in_request.insert(item.tag_key) || self.tags.contains_key(item.tag_key)? {
                stored.push(false);
                delta.add(scope, Stat::Rejected(RejectReason::Replay), 1);
                continue;
            }
            let mut v = Vec::with_capacity(32 + item.payload.len());
            v.extend_from_slice(item.task.as_bytes());
            v.extend_from_slice(&item.payload);
            buffer.insert(&item.buffer_key[..], v);
            tags.insert(&item.tag_key[..], &[][..]);
            stored.push(true);
            delta.add(scope, Stat::Accepted, 1);
        }
        self.buffer.apply_batch(buffer)?;
        self.add_stats(&delta)?;
        self.tags.apply_batch(tags)?;
        Ok(stored)
    }

    /// Counts refusals on their own.
    pub fn add_stats(&self, stats: &StatDelta) -> Result<()> {
        tx_result(self.stats.transaction(|st| {
            stats.apply(st)?;
            Ok(())
        }))
    }

    /// The buffer keys of the packets of `task`'s lane to `hop` in batches `lo..=hi`.
    pub fn batch_keys(&self, hop: &str, task: &TaskId, lo: u64, hi: u64) -> Result<Vec<Vec<u8>>> {
        let mut start = lane_prefix(hop, task);
        start.extend_from_slice(&lo.to_be_bytes());
        let mut end = lane_prefix(hop, task);
        end.extend_from_slice(&hi.to_be_bytes());
        end.extend_from_slice(&[0xff; 17]);
        self.buffer
            .range(start..end)
            .keys()
            .map(|k| Ok(k?.to_vec()))
            .collect()
    }

    /// The stored packets under `keys` (task id, payload); keys no longer present are skipped.
    pub fn packets(&self, keys: &[Vec<u8>]) -> Result<Vec<StoredPacket>> {
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let Some(v) = self.buffer.get(k)? else {
                continue;
            };
            if v.len() < 32 {
                return Err(Error::corrupt("buffered packet", "shorter than a task id"));
            }
            let task =
                TaskId::try_from(&v[..32]).map_err(|e| Error::corrupt("buffered packet", e))?;
            out.push((k.clone(), task, v[32..].to_vec()));
        }
        Ok(out)
    }

    /// Deletes packets the next hop acknowledged and counts them as forwarded, in one
    /// transaction.
    pub fn remove_forwarded(&self, done: &[(Vec<u8>, TaskId)]) -> Result<()> {
        let mut delta = StatDelta::default();
        for (_, task) in done {
            delta.add(*task.as_bytes(), Stat::Forwarded, 1);
        }
        tx_result((&self.buffer, &self.stats).transaction(|(buffer, st)| {
            for (k, _) in done {
                buffer.remove(&k[..])?;
            }
            delta.apply(st)?;
            Ok(())
        }))
    }

    /// Deletes packets of `task` that waited past its report expiry, counting each as refused
    /// `TOO_OLD`, in one transaction.
    pub fn remove_expired(&self, keys: &[Vec<u8>], task: &TaskId) -> Result<()> {
        let mut delta = StatDelta::default();
        delta.add(
            *task.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            keys.len() as u64,
        );
        tx_result((&self.buffer, &self.stats).transaction(|(buffer, st)| {
            for k in keys {
                buffer.remove(&k[..])?;
            }
            delta.apply(st)?;
            Ok(())
        }))
    }

    /// How many packets the buffer holds per task (read once at start).
    pub fn buffered_per_task(&self) -> Result<HashMap<TaskId, u64>> {
        let mut out: HashMap<TaskId, u64> = HashMap::new();
        for v in self.buffer.iter().values() {
            let v = v?;
            let task = v
                .get(..32)
                .and_then(|b| TaskId::try_from(b).ok())
                .ok_or_else(|| Error::corrupt("buffered packet", "no task id"))?;
            *out.entry(task).or_default() += 1;
        }
        Ok(out)
    }

    /// What the buffer holds, per lane (hop name and task).
    pub fn buffered(&self) -> Result<BTreeMap<(String, TaskId), Buffered>> {
        let mut out: BTreeMap<(String, TaskId), Buffered> = BTreeMap::new();
        for k in self.buffer.iter().keys() {
            let k = k?;
            let n = *k
                .first()
                .ok_or_else(|| Error::corrupt("buffer key", "empty"))? as usize;
            if k.len() != 1 + n + 32 + 8 + 16 {
                return Err(Error::corrupt("buffer key", "wrong length"));
            }
            let hop = String::from_utf8_lossy(&k[1..1 + n]).into_owned();
            let task = TaskId::try_from(&k[1 + n..1 + n + 32])
                .map_err(|e| Error::corrupt("buffer key", e))?;
            let at = 1 + n + 32;
            let batch = u64::from_be_bytes(k[at..at + 8].try_into().expect("8 bytes"));
            let e = out.entry((hop, task)).or_default();
            e.count += 1;
            e.batches = Some(match e.batches {
                None => (batch, batch),
                Some((lo, hi)) => (lo.min(batch), hi.max(batch)),
            });
        }
        Ok(out)
    }

    /// Moves packets stored under the earlier per-hop key (hop ‖ batch ‖ random) to their
    /// task's lane, keeping their batch number; returns how many moved.
    pub fn migrate_buffer_keys(&self) -> Result<usize> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for kv in self.buffer.iter() {
            let (k, v) = kv?;
            let Some(&len) = k.first() else { continue };
            let len = len as usize;
            if k.len() != 1 + len + 8 + 16 || v.len() < 32 {
                continue;
            }
            let mut nk = k[..1 + len].to_vec();
            nk.extend_from_slice(&v[..32]);
            nk.extend_from_slice(&k[1 + len..]);
            batch.remove(k);
            batch.insert(nk, v);
            n += 1;
        }
        if n > 0 {
            self.buffer.apply_batch(batch)?;
            self.db.flush()?;
        }
        Ok(n)
    }

    /// The newest closed batch of each lane of `hop` that has one.
    pub fn closed_marks(&self, hop: &str) -> Result<Vec<(TaskId, u64)>> {
        let mut out = Vec::new();
        for kv in self.meta.scan_prefix(b"closed:") {
            let (k, v) = kv?;
            let rest = &k[7..];
            if rest.len() != 32 + hop.len() || &rest[32..] != hop.as_bytes() {
                continue;
            }
            let task =
                TaskId::try_from(&rest[..32]).map_err(|e| Error::corrupt("closed mark", e))?;
            let c = u64::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::corrupt("meta value", "not 8 bytes"))?,
            );
            out.push((task, c));
        }
        Ok(out)
    }

    /// A stored number.
    pub fn meta_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        match self.meta.get(key)? {
            Some(v) => {
                Ok(Some(u64::from_be_bytes(v.as_ref().try_into().map_err(
                    |_| Error::corrupt("meta value", "not 8 bytes"),
                )?)))
            }
            None => Ok(None),
        }
    }

    /// Stores a number (durable with the next flush).
    pub fn set_meta_u64(&self, key: &[u8], v: u64) -> Result<()> {
        self.meta.insert(key, &v.to_be_bytes()[..])?;
        Ok(())
    }

    /// Every tree of the database with its number of entries.
    pub fn tree_sizes(&self) -> Vec<(String, usize)> {
        [
            ("tasks", &self.tasks),
            ("keys", &self.keys),
            ("tags", &self.tags),
            ("buffer", &self.buffer),
            ("stats", &self.stats),
            ("meta", &self.meta),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.len()))
        .collect()
    }

    /// Packets in the buffer.
    pub fn buffered_total(&self) -> usize {
        self.buffer.len()
    }

    /// Deletes every replay tag of a key epoch; returns how many.
    pub fn delete_tags(&self, epoch: [u8; 8]) -> std::result::Result<usize, sled::Error> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for k in self.tags.scan_prefix(epoch).keys() {
            batch.remove(k?);
            n += 1;
        }
        self.tags.apply_batch(batch)?;
        Ok(n)
    }

    /// Replay tags stored (all key epochs).
    pub fn tag_count(&self) -> usize {
        self.tags.len()
    }

    /// The counters of one scope (a task id, or [`NO_TASK`]).
    pub fn stats(&self, scope: &[u8; 32]) -> Result<BTreeMap<Stat, u64>> {
        let mut out = BTreeMap::new();
        for kv in self.stats.scan_prefix(scope) {
            let (k, v) = kv?;
            let code = *k
                .last()
                .ok_or_else(|| Error::corrupt("counter", "empty key"))?;
            let n = u64::from_le_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| Error::corrupt("counter", "not 8 bytes"))?,
            );
            if let Some(s) = Stat::from_code(code) {
                out.insert(s, n);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TASK: [u8; 32] = [7u8; 32];

    fn incoming(hop: &str, batch: u64, tag: u8) -> Incoming {
        let mut tag_key = [0u8; 40];
        tag_key[8] = tag;
        Incoming {
            tag_key,
            buffer_key: buffer_key(hop, &TaskId::from(TASK), batch),
            task: TaskId::from(TASK),
            payload: vec![tag; 10],
        }
    }

    #[test]
    fn accept_refuses_replays_and_forwarding_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 8).unwrap();
        let items = vec![
            incoming("b", 0, 1),
            incoming("b", 0, 2),
            incoming("b", 1, 1),
        ];
        assert_eq!(
            s.accept(&items, &StatDelta::default()).unwrap(),
            vec![true, true, false]
        );
        assert_eq!(
            s.accept(&items[..1], &StatDelta::default()).unwrap(),
            vec![false]
        );
        let b = s.buffered().unwrap();
        let task = TaskId::from(TASK);
        assert_eq!(
            b[&("b".to_owned(), task)],
            Buffered {
                count: 2,
                batches: Some((0, 0))
            }
        );
        assert_eq!(s.batch_keys("b", &task, 1, 5).unwrap().len(), 0);
        let keys = s.batch_keys("b", &task, 0, 0).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(
            s.batch_keys("bb", &task, 0, 0).unwrap().is_empty(),
            "hop prefixes do not overlap"
        );
        assert!(
            s.batch_keys("b", &TaskId::from([8u8; 32]), 0, 0)
                .unwrap()
                .is_empty(),
            "lanes of other tasks are apart"
        );
        let p = s.packets(&keys).unwrap();
        s.remove_forwarded(
            &p.iter()
                .map(|(k, t, _)| (k.clone(), *t))
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(s.buffered_total(), 0);
        let st = s.stats(&[7u8; 32]).unwrap();
        assert_eq!(st[&Stat::Accepted], 2);
        assert_eq!(st[&Stat::Forwarded], 2);
        assert_eq!(st[&Stat::Rejected(RejectReason::Replay)], 2);
        assert_eq!(s.delete_tags([0; 8]).unwrap(), 2);
        assert_eq!(s.tag_count(), 0);
    }

    #[test]
    fn packets_under_the_earlier_per_hop_keys_move_to_their_lanes() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 8).unwrap();
        let mut old = hop_prefix("b");
        old.extend_from_slice(&3u64.to_be_bytes());
        old.extend_from_slice(&[1; 16]);
        let mut v = TASK.to_vec();
        v.extend_from_slice(b"packet");
        s.buffer.insert(old, v).unwrap();
        assert_eq!(s.migrate_buffer_keys().unwrap(), 1);
        assert_eq!(s.migrate_buffer_keys().unwrap(), 0);
        let task = TaskId::from(TASK);
        let keys = s.batch_keys("b", &task, 3, 3).unwrap();
        assert_eq!(s.packets(&keys).unwrap()[0].2, b"packet");
    }
}
