//! The shuffler's sled database and its packet files.
//!
//! | tree | key | value |
//! | --- | --- | --- |
//! | `tasks` | task id | the task (protobuf `TaskConfig`) |
//! | `keys` | `"keyset"` | the HPKE [`KeySet`] |
//! | `tags` | key epoch ‖ replay tag | — (the layout before [`ReplayTags`], moved into its logs at startup) |
//! | `extents` | hop ‖ task ‖ batch ‖ offset | packets (u32 LE) ‖ bytes (u64 LE) of one request's packets in the batch's packet file |
//! | `sent` | hop ‖ task ‖ batch ‖ random | file offsets (u64 LE each) of packets the next hop acknowledged |
//! | `buffer` | hop ‖ task ‖ batch ‖ random | task id ‖ peeled packet: the layout before packet files, moved into them at startup |
//! | `stats` | task ‖ code | counters of accepted, forwarded and refused packets |
//! | `meta` | `"closed:"` ‖ task ‖ hop | number of the newest closed batch of a lane (hop and task) |
//!
//! The packets themselves are in [`PacketFiles`], one append-only file per batch of a lane,
//! written and synced before their extent is stored (see that module). A file, its extents and
//! its `sent` marks go once every packet in it was forwarded or expired. Replay tags are in
//! [`ReplayTags`]: in memory, and on disk in the packets' records and then in one log per key
//! epoch.
//!
//! The key epoch is the first 8 bytes of SHA-256 of the HPKE public key that opened the packet,
//! so a tag is only compared with tags of the same key, and all of a key's tags go when it does.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use hush_protocol::TaskId;
use hush_protocol::proto::v1::RejectReason;
use hush_server::db::tx_result;
use sled::transaction::{ConflictableTransactionError, TransactionalTree};
use sled::{Transactional, Tree};

use prost::bytes::Bytes;

use crate::error::{Error, Result};
use crate::packets::{PacketFiles, TAG_KEY};
use crate::tags::ReplayTags;

/// The tag of a packet moved into a packet file from sled's `buffer` tree: its real tag was
/// in sled's `tags` tree and is in a tag log.
const NO_TAG: [u8; TAG_KEY] = [0; TAG_KEY];

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
    /// The next hop's name.
    pub hop: String,
    /// Its task.
    pub task: TaskId,
    /// The batch of the lane it joins.
    pub batch: u64,
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

/// The key prefix of `hop`.
pub fn hop_prefix(hop: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + hop.len());
    // Hop names are 1 to 255 bytes (checked by the onion decoder and the config).
    k.push(hop.len() as u8);
    k.extend_from_slice(hop.as_bytes());
    k
}

/// The key prefix of a lane: hop ‖ task.
pub fn lane_prefix(hop: &str, task: &TaskId) -> Vec<u8> {
    let mut k = hop_prefix(hop);
    k.extend_from_slice(task.as_bytes());
    k
}

fn batch_prefix(lane: &[u8], batch: u64) -> Vec<u8> {
    let mut k = lane.to_vec();
    k.extend_from_slice(&batch.to_be_bytes());
    k
}

/// The keys of batches `lo..=hi` of a lane, in `extents` and `sent` (both lane ‖ batch ‖ 8 or
/// 16 more bytes).
fn batch_range(lane: &[u8], lo: u64, hi: u64) -> std::ops::RangeInclusive<Vec<u8>> {
    let mut end = batch_prefix(lane, hi);
    end.extend_from_slice(&[0xff; 16]);
    batch_prefix(lane, lo)..=end
}

/// A lane key (hop ‖ task ‖ batch ‖ `rest` bytes) split into hop name, task and batch.
fn parse_lane_key(k: &[u8], rest: usize, what: &'static str) -> Result<(String, TaskId, u64)> {
    let n = *k.first().ok_or_else(|| Error::corrupt(what, "empty"))? as usize;
    if k.len() != 1 + n + 32 + 8 + rest {
        return Err(Error::corrupt(what, "wrong length"));
    }
    let hop = String::from_utf8_lossy(&k[1..1 + n]).into_owned();
    let task = TaskId::try_from(&k[1 + n..1 + n + 32]).map_err(|e| Error::corrupt(what, e))?;
    let at = 1 + n + 32;
    let batch = u64::from_be_bytes(k[at..at + 8].try_into().expect("8 bytes"));
    Ok((hop, task, batch))
}

/// The `extents` entry of `count` packets, `len` bytes at `offset` in a batch's file.
fn extent_entry(
    lane: &[u8],
    batch: u64,
    offset: u64,
    count: usize,
    len: u64,
) -> (Vec<u8>, Vec<u8>) {
    let mut k = batch_prefix(lane, batch);
    k.extend_from_slice(&offset.to_be_bytes());
    let mut v = Vec::with_capacity(12);
    v.extend_from_slice(&(count as u32).to_le_bytes());
    v.extend_from_slice(&len.to_le_bytes());
    (k, v)
}

/// An extent: packets and bytes.
fn parse_extent(v: &[u8]) -> Result<(u64, u64)> {
    if v.len() != 12 {
        return Err(Error::corrupt("packet extent", "not 12 bytes"));
    }
    let count = u32::from_le_bytes(v[..4].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(v[4..].try_into().expect("8 bytes"));
    Ok((u64::from(count), len))
}

fn parse_offsets(v: &[u8]) -> Result<impl Iterator<Item = u64> + '_> {
    if !v.len().is_multiple_of(8) {
        return Err(Error::corrupt("sent mark", "not a list of offsets"));
    }
    Ok(v.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))))
}

/// What the buffer holds for one lane, as found at startup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buffered {
    /// Packets not yet acknowledged by the next hop.
    pub count: u64,
    /// Lowest and highest batch number among them.
    pub batches: Option<(u64, u64)>,
}

/// A buffered packet read back for forwarding.
#[derive(Clone, Debug)]
pub struct StoredPacket {
    /// Its batch.
    pub batch: u64,
    /// Its offset in the batch's packet file.
    pub offset: u64,
    /// The peeled bytes for the next hop (a slice of the extent read from the file).
    pub payload: Bytes,
}

impl StoredPacket {
    /// Where it is stored: (batch, offset), what [`Store::mark_forwarded`] takes.
    pub fn at(&self) -> (u64, u64) {
        (self.batch, self.offset)
    }
}

/// The database of one shuffler.
#[derive(Clone, Debug)]
pub struct Store {
    db: sled::Db,
    tasks: Tree,
    keys: Tree,
    tags: Tree,
    extents: Tree,
    sent: Tree,
    buffer: Tree,
    stats: Tree,
    meta: Tree,
    files: Arc<PacketFiles>,
    replay: Arc<ReplayTags>,
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

    /// Opens (or creates) the database in `dir` and its packet files in `dir/packets`.
    pub fn open(dir: &Path, cache_mb: u64) -> Result<Self> {
        let db = hush_server::db::open(dir, cache_mb)?;
        let store = Self {
            tasks: db.open_tree("tasks")?,
            keys: db.open_tree("keys")?,
            tags: db.open_tree("tags")?,
            extents: db.open_tree("extents")?,
            sent: db.open_tree("sent")?,
            buffer: db.open_tree("buffer")?,
            stats: db.open_tree("stats")?,
            meta: db.open_tree("meta")?,
            files: Arc::new(PacketFiles::open(&dir.join("packets"))?),
            replay: Arc::new(ReplayTags::open(&dir.join("tags"))?),
            db,
        };
        let moved = store.migrate_sled_tags()?;
        if moved > 0 {
            tracing::info!(tags = moved, "moved replay tags from sled into tag logs");
        }
        store.remember_buffered_tags()?;
        Ok(store)
    }

    /// Moves the replay tags of the layout before [`ReplayTags`] (one sled entry per tag) into
    /// the tag logs, then deletes them from sled. A crash in between logs them twice, which is
    /// harmless. Returns how many moved.
    fn migrate_sled_tags(&self) -> Result<usize> {
        let mut keys = Vec::new();
        for k in self.tags.iter().keys() {
            let k = k?;
            let key: [u8; TAG_KEY] = k
                .as_ref()
                .try_into()
                .map_err(|_| Error::corrupt("replay tag", "not epoch and tag"))?;
            keys.push(key);
        }
        if keys.is_empty() {
            return Ok(0);
        }
        self.replay.open_epochs(keys.iter())?;
        self.replay.log(keys.iter())?;
        self.tags.clear()?;
        self.db.flush()?;
        Ok(keys.len())
    }

    /// Adds the tags of every buffered packet (in its record, durable with it) to the set. An
    /// extent whose file is damaged or missing is logged and skipped: its packets cannot be
    /// forwarded either (their batch fails as corrupt), and their tags are lost.
    fn remember_buffered_tags(&self) -> Result<()> {
        for kv in self.extents.iter() {
            let (k, v) = kv?;
            let (hop, task, batch) = parse_lane_key(&k, 8, "packet extent")?;
            let lane = lane_prefix(&hop, &task);
            let offset = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
            let (_, len) = parse_extent(&v)?;
            let tags = self.extent_tags((&hop, &task, &lane), batch, offset, len);
            self.replay.remember(tags.iter());
        }
        Ok(())
    }

    /// The replay tags in the records of one extent; none, logged, if its file is damaged or
    /// missing (its packets cannot be forwarded either, and replays of them will not be
    /// recognized).
    fn extent_tags(
        &self,
        (hop, task, lane): (&str, &TaskId, &[u8]),
        batch: u64,
        offset: u64,
        len: u64,
    ) -> Vec<[u8; TAG_KEY]> {
        match self.files.read(lane, batch, offset, len) {
            Ok(packets) => packets.iter().map(|p| p.tag_key).collect(),
            Err(e) => {
                tracing::error!(%hop, %task, batch, error = %e, "the replay tags of stored packets cannot be read; replays of those packets will not be recognized");
                Vec::new()
            }
        }
    }

    /// Deletes the tag logs of epochs not in `keep` (the node's keys); returns how many went.
    pub fn retain_tag_epochs(&self, keep: &HashSet<[u8; 8]>) -> Result<usize> {
        Ok(self.replay.retain(keep)?)
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
    /// Callers serialize calls (the mixer's admission lock), so the tag check cannot race. The packets of
    /// each batch go with their tags to its packet file in one synced write; then sled stores
    /// the extents, the tags join the set in memory, and sled stores the counters. A tag is
    /// never durable without its packet (which would lose the packet on the sender's retry):
    /// bytes without an extent are not read back at startup.
    pub fn accept(&self, items: &[Incoming], stats: &StatDelta) -> Result<Vec<bool>> {
        let mut stored = Vec::with_capacity(items.len());
        let mut delta = stats.clone();
        let mut in_request = HashSet::with_capacity(items.len());
        let mut groups: BTreeMap<(Vec<u8>, u64), Vec<usize>> = BTreeMap::new();
        for (i, item) in items.iter().enumerate() {
            let scope = *item.task.as_bytes();
            if !in_request.insert(item.tag_key) || self.replay.contains(&item.tag_key) {
                stored.push(false);
                delta.add(scope, Stat::Rejected(RejectReason::Replay), 1);
                continue;
            }
            groups
                .entry((lane_prefix(&item.hop, &item.task), item.batch))
                .or_default()
                .push(i);
            stored.push(true);
            delta.add(scope, Stat::Accepted, 1);
        }
        self.replay
            .open_epochs(groups.values().flatten().map(|&i| &items[i].tag_key))?;
        let mut extents = sled::Batch::default();
        for ((lane, batch), members) in &groups {
            let (offset, len) = self.files.append(
                lane,
                *batch,
                members
                    .iter()
                    .map(|&i| (&items[i].tag_key, items[i].payload.as_slice())),
            )?;
            let (k, v) = extent_entry(lane, *batch, offset, members.len(), len);
            extents.insert(k, v);
        }
        self.extents.apply_batch(extents)?;
        // The packets are stored from here on (the extents reach disk with the next flush),
        // whatever happens to the counters.
        self.replay
            .remember(groups.values().flatten().map(|&i| &items[i].tag_key));
        self.add_stats(&delta)?;
        Ok(stored)
    }

    /// Counts refusals on their own.
    pub fn add_stats(&self, stats: &StatDelta) -> Result<()> {
        tx_result(self.stats.transaction(|st| {
            stats.apply(st)?;
            Ok(())
        }))
    }

    /// The file offsets of the packets of batches `lo..=hi` of `lane` already forwarded, per
    /// batch.
    fn sent_offsets(&self, lane: &[u8], lo: u64, hi: u64) -> Result<HashSet<(u64, u64)>> {
        let mut out = HashSet::new();
        for kv in self.sent.range(batch_range(lane, lo, hi)) {
            let (k, v) = kv?;
            let batch = u64::from_be_bytes(
                k.get(lane.len()..lane.len() + 8)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::corrupt("sent mark", "short key"))?,
            );
            out.extend(parse_offsets(&v)?.map(|o| (batch, o)));
        }
        Ok(out)
    }

    /// The extents of batches `lo..=hi` of `lane`: (batch, offset, packets, bytes).
    fn extents_of(&self, lane: &[u8], lo: u64, hi: u64) -> Result<Vec<(u64, u64, u64, u64)>> {
        let mut out = Vec::new();
        for kv in self.extents.range(batch_range(lane, lo, hi)) {
            let (k, v) = kv?;
            let tail = k
                .get(lane.len()..)
                .filter(|t| t.len() == 16)
                .ok_or_else(|| Error::corrupt("packet extent", "wrong key length"))?;
            let batch = u64::from_be_bytes(tail[..8].try_into().expect("8 bytes"));
            let offset = u64::from_be_bytes(tail[8..].try_into().expect("8 bytes"));
            let (count, len) = parse_extent(&v)?;
            out.push((batch, offset, count, len));
        }
        Ok(out)
    }

    /// The packets of `task`'s lane to `hop` in batches `lo..=hi` that the next hop has not
    /// acknowledged.
    pub fn batch_packets(
        &self,
        hop: &str,
        task: &TaskId,
        lo: u64,
        hi: u64,
    ) -> Result<Vec<StoredPacket>> {
        let lane = lane_prefix(hop, task);
        let sent = self.sent_offsets(&lane, lo, hi)?;
        let mut out = Vec::new();
        for (batch, offset, count, len) in self.extents_of(&lane, lo, hi)? {
            let packets = self.files.read(&lane, batch, offset, len)?;
            if packets.len() as u64 != count {
                return Err(Error::corrupt(
                    "packet file",
                    format!("an extent of {count} packets holds {}", packets.len()),
                ));
            }
            for p in packets {
                if !sent.contains(&(batch, p.offset)) {
                    out.push(StoredPacket {
                        batch,
                        offset: p.offset,
                        payload: p.payload,
                    });
                }
            }
        }
        Ok(out)
    }

    /// How many packets of `task`'s lane to `hop` in batches `lo..=hi` the next hop has not
    /// acknowledged.
    pub fn unsent(&self, hop: &str, task: &TaskId, lo: u64, hi: u64) -> Result<u64> {
        let lane = lane_prefix(hop, task);
        let stored: u64 = self.extents_of(&lane, lo, hi)?.iter().map(|e| e.2).sum();
        Ok(stored.saturating_sub(self.sent_offsets(&lane, lo, hi)?.len() as u64))
    }

    /// Marks packets of `task`'s lane to `hop` the next hop acknowledged, given as (batch,
    /// offset in the batch's file) ([`StoredPacket::at`]), and counts them as forwarded, in one
    /// transaction.
    pub fn mark_forwarded(&self, hop: &str, task: &TaskId, done: &[(u64, u64)]) -> Result<()> {
        let lane = lane_prefix(hop, task);
        let mut per_batch: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
        for &(batch, offset) in done {
            per_batch
                .entry(batch)
                .or_default()
                .extend_from_slice(&offset.to_le_bytes());
        }
        let marks: Vec<(Vec<u8>, Vec<u8>)> = per_batch
            .into_iter()
            .map(|(batch, offsets)| {
                let mut k = batch_prefix(&lane, batch);
                k.extend_from_slice(&rand::random::<[u8; 8]>());
                (k, offsets)
            })
            .collect();
        let mut delta = StatDelta::default();
        delta.add(*task.as_bytes(), Stat::Forwarded, done.len() as u64);
        tx_result((&self.sent, &self.stats).transaction(|(sent, st)| {
            for (k, v) in &marks {
                sent.insert(&k[..], &v[..])?;
            }
            delta.apply(st)?;
            Ok(())
        }))
    }

    /// Deletes batches `lo..=hi` of `task`'s lane to `hop`: their extents, marks and files,
    /// after appending their packets' replay tags to the tag logs.
    /// Returns the packets among them not yet forwarded, counted as refused `TOO_OLD` in the
    /// same transaction (none, for a batch the next hop took whole).
    pub fn remove_batches(&self, hop: &str, task: &TaskId, lo: u64, hi: u64) -> Result<u64> {
        let lane = lane_prefix(hop, task);
        let extents = self.extents_of(&lane, lo, hi)?;
        let stored: u64 = extents.iter().map(|e| e.2).sum();
        let unsent = stored.saturating_sub(self.sent_offsets(&lane, lo, hi)?.len() as u64);
        let range = batch_range(&lane, lo, hi);
        // The extents were just read: their keys follow from their batch and offset.
        let ext_keys: Vec<Vec<u8>> = extents
            .iter()
            .map(|&(batch, offset, count, len)| {
                extent_entry(&lane, batch, offset, count as usize, len).0
            })
            .collect();
        let sent_keys: Vec<sled::IVec> = self
            .sent
            .range(range)
            .keys()
            .collect::<std::result::Result<_, _>>()?;
        let mut delta = StatDelta::default();
        delta.add(
            *task.as_bytes(),
            Stat::Rejected(RejectReason::TooOld),
            unsent,
        );
        // The packets' tags outlive them: into the tag logs, in one write per epoch, before
        // their records can go. A damaged file's tags are lost (logged); its packets were.
        let tags: Vec<[u8; TAG_KEY]> = extents
            .iter()
            .flat_map(|&(batch, offset, _, len)| {
                self.extent_tags((hop, task, &lane), batch, offset, len)
            })
            .collect();
        self.replay.log(tags.iter())?;
        tx_result(
            (&self.extents, &self.sent, &self.stats).transaction(|(ext, sent, st)| {
                for k in &ext_keys {
                    ext.remove(&k[..])?;
                }
                for k in &sent_keys {
                    sent.remove(k)?;
                }
                delta.apply(st)?;
                Ok(())
            }),
        )?;
        // The batches are gone from here on: what fails below only leaves files that no
        // extent points at, which startup deletes, so it is logged and the count returned (a
        // caller that saw an error would never give back the packets' place in its counts).
        // The deletions must be durable before the files go: a crash in between would
        // otherwise bring back extents whose file is gone.
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "removed batches are not yet durable; their packet files stay until the next start");
            return Ok(unsent);
        }
        let batches: HashSet<u64> = extents.iter().map(|e| e.0).collect();
        for b in batches {
            if let Err(e) = self.files.remove(&lane, b) {
                tracing::warn!(error = %e, "a removed batch's packet file could not be deleted; the next start deletes it");
            }
        }
        Ok(unsent)
    }

    /// Every lane's unacknowledged packets and batch range, keyed by hop name and task.
    pub fn buffered(&self) -> Result<BTreeMap<(String, TaskId), Buffered>> {
        let mut out: BTreeMap<(String, TaskId), Buffered> = BTreeMap::new();
        for kv in self.extents.iter() {
            let (k, v) = kv?;
            let (hop, task, batch) = parse_lane_key(&k, 8, "packet extent")?;
            let (count, _) = parse_extent(&v)?;
            let e = out.entry((hop, task)).or_default();
            e.count += count;
            e.batches = Some(match e.batches {
                None => (batch, batch),
                Some((lo, hi)) => (lo.min(batch), hi.max(batch)),
            });
        }
        for kv in self.sent.iter() {
            let (k, v) = kv?;
            let (hop, task, _) = parse_lane_key(&k, 8, "sent mark")?;
            let n = parse_offsets(&v)?.count() as u64;
            if let Some(e) = out.get_mut(&(hop, task)) {
                e.count = e.count.saturating_sub(n);
            }
        }
        Ok(out)
    }

    /// How many packets the buffer holds per task (read once at start).
    pub fn buffered_per_task(&self) -> Result<HashMap<TaskId, u64>> {
        let mut out: HashMap<TaskId, u64> = HashMap::new();
        for ((_, task), b) in self.buffered()? {
            *out.entry(task).or_default() += b.count;
        }
        Ok(out)
    }

    /// Deletes packet files no extent points at: bytes written for a request that crashed
    /// before its extents were stored (never acknowledged), or of a batch whose extents were
    /// deleted just before a crash. Runs at startup, before anything is written. Returns how
    /// many files went.
    pub fn remove_orphan_files(&self) -> Result<usize> {
        let mut keep = HashSet::new();
        for k in self.extents.iter().keys() {
            let k = k?;
            let (hop, task, batch) = parse_lane_key(&k, 8, "packet extent")?;
            keep.insert(PacketFiles::name(&lane_prefix(&hop, &task), batch));
        }
        self.files.remove_except(&keep)
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

    /// Moves packets stored in sled's `buffer` tree (the layout before packet files) into
    /// packet files, keeping their lane and batch; returns how many moved. Each batch's packets
    /// are written and synced first, then their extent is stored and the old entries deleted in
    /// one transaction, so a crash midway leaves every packet in exactly one of the two places
    /// (an unfinished file has no extent and is deleted at the next start, before this runs
    /// again).
    pub fn migrate_buffer_to_files(&self) -> Result<usize> {
        type Entries = Vec<(sled::IVec, sled::IVec)>;
        let mut groups: BTreeMap<(Vec<u8>, u64), Entries> = BTreeMap::new();
        for kv in self.buffer.iter() {
            let (k, v) = kv?;
            let (hop, task, batch) = parse_lane_key(&k, 16, "buffer key")?;
            if v.len() < 32 {
                return Err(Error::corrupt("buffered packet", "shorter than a task id"));
            }
            groups
                .entry((lane_prefix(&hop, &task), batch))
                .or_default()
                .push((k, v));
        }
        let mut moved = 0;
        for ((lane, batch), entries) in groups {
            let (offset, len) = self.files.append(
                &lane,
                batch,
                entries.iter().map(|(_, v)| (&NO_TAG, &v[32..])),
            )?;
            let (k, ext) = extent_entry(&lane, batch, offset, entries.len(), len);
            tx_result::<_, Error>((&self.extents, &self.buffer).transaction(
                |(extents, buffer)| {
                    extents.insert(&k[..], &ext[..])?;
                    for (old, _) in &entries {
                        buffer.remove(old)?;
                    }
                    Ok(())
                },
            ))?;
            moved += entries.len();
        }
        if moved > 0 {
            self.db.flush()?;
        }
        Ok(moved)
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

    /// Every tree of the database with its number of entries, and `tags`: the replay tags
    /// held (in memory and the tag logs; sled's `tags` tree is empty after the first start).
    pub fn tree_sizes(&self) -> Vec<(String, usize)> {
        let mut sizes: Vec<(String, usize)> = [
            ("tasks", &self.tasks),
            ("keys", &self.keys),
            ("extents", &self.extents),
            ("sent", &self.sent),
            ("buffer", &self.buffer),
            ("stats", &self.stats),
            ("meta", &self.meta),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), t.len()))
        .collect();
        sizes.insert(2, ("tags".to_owned(), self.tag_count() + self.tags.len()));
        sizes
    }

    /// Packets held and not yet acknowledged by a next hop (reads every extent).
    pub fn buffered_total(&self) -> Result<u64> {
        Ok(self.buffered()?.values().map(|b| b.count).sum())
    }

    /// Bytes the packet files and the tag logs occupy on disk.
    pub fn file_bytes(&self) -> u64 {
        self.files.bytes() + self.replay.bytes()
    }

    /// Deletes every replay tag of a key epoch; returns how many.
    pub fn delete_tags(&self, epoch: [u8; 8]) -> std::io::Result<usize> {
        self.replay.delete_epoch(epoch)
    }

    /// Replay tags stored (all key epochs).
    pub fn tag_count(&self) -> usize {
        self.replay.count()
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
            hop: hop.to_owned(),
            task: TaskId::from(TASK),
            batch,
            payload: vec![tag; 10],
        }
    }

    fn refs(p: &[StoredPacket]) -> Vec<(u64, u64)> {
        p.iter().map(StoredPacket::at).collect()
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
        assert!(s.batch_packets("b", &task, 1, 5).unwrap().is_empty());
        let p = s.batch_packets("b", &task, 0, 0).unwrap();
        let mut got: Vec<Vec<u8>> = p.iter().map(|p| p.payload.to_vec()).collect();
        got.sort();
        assert_eq!(got, vec![vec![1u8; 10], vec![2u8; 10]]);
        assert!(
            s.batch_packets("bb", &task, 0, 0).unwrap().is_empty(),
            "hop prefixes do not overlap"
        );
        assert!(
            s.batch_packets("b", &TaskId::from([8u8; 32]), 0, 0)
                .unwrap()
                .is_empty(),
            "lanes of other tasks are apart"
        );
        s.mark_forwarded("b", &task, &refs(&p)).unwrap();
        assert_eq!(s.buffered_total().unwrap(), 0);
        assert!(s.batch_packets("b", &task, 0, 0).unwrap().is_empty());
        assert_eq!(s.remove_batches("b", &task, 0, 0).unwrap(), 0);
        assert_eq!(s.extents.len() + s.sent.len(), 0);
        assert_eq!(s.files.bytes(), 0, "the batch's file went");
        let st = s.stats(&[7u8; 32]).unwrap();
        assert_eq!(st[&Stat::Accepted], 2);
        assert_eq!(st[&Stat::Forwarded], 2);
        assert_eq!(st[&Stat::Rejected(RejectReason::Replay)], 2);
        assert!(!st.contains_key(&Stat::Rejected(RejectReason::TooOld)));
        assert_eq!(s.delete_tags([0; 8]).unwrap(), 2);
        assert_eq!(s.tag_count(), 0);
    }

    #[test]
    fn a_partly_forwarded_batch_reopens_with_only_its_unsent_packets() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::from(TASK);
        {
            let s = Store::open(dir.path(), 8).unwrap();
            let items: Vec<Incoming> = (1..=6).map(|t| incoming("b", 4, t)).collect();
            s.accept(&items[..3], &StatDelta::default()).unwrap();
            s.accept(&items[3..], &StatDelta::default()).unwrap();
            let p = s.batch_packets("b", &task, 4, 4).unwrap();
            assert_eq!(p.len(), 6);
            // The next hop acknowledged two slices of two packets.
            s.mark_forwarded("b", &task, &refs(&p[..2])).unwrap();
            s.mark_forwarded("b", &task, &refs(&p[4..])).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path(), 8).unwrap();
        assert_eq!(s.remove_orphan_files().unwrap(), 0);
        assert_eq!(s.unsent("b", &task, 4, 4).unwrap(), 2);
        assert_eq!(s.buffered_per_task().unwrap()[&task], 2);
        let left: Vec<u8> = s
            .batch_packets("b", &task, 4, 4)
            .unwrap()
            .iter()
            .map(|p| p.payload[0])
            .collect();
        assert_eq!(left.len(), 2);
        // Expiring the batch drops the two unsent packets as TOO_OLD.
        assert_eq!(s.remove_batches("b", &task, 4, 4).unwrap(), 2);
        let st = s.stats(&TASK).unwrap();
        assert_eq!(st[&Stat::Forwarded], 4);
        assert_eq!(st[&Stat::Rejected(RejectReason::TooOld)], 2);
        assert_eq!(s.buffered_total().unwrap(), 0);
    }

    #[test]
    fn bytes_written_without_their_extent_are_deleted_at_startup() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::from(TASK);
        let s = Store::open(dir.path(), 8).unwrap();
        s.accept(&[incoming("b", 0, 1)], &StatDelta::default())
            .unwrap();
        // A crash between a file write and its extents: bytes in batch 0's file after the
        // stored extent, and a file of batch 1 with no extent at all.
        let lane = lane_prefix("b", &task);
        s.files
            .append(&lane, 0, [(&NO_TAG, &b"torn"[..])].into_iter())
            .unwrap();
        s.files
            .append(&lane, 1, [(&NO_TAG, &b"lost"[..])].into_iter())
            .unwrap();
        assert_eq!(s.remove_orphan_files().unwrap(), 1);
        let p = s.batch_packets("b", &task, 0, 1).unwrap();
        assert_eq!(p.len(), 1, "only the acknowledged packet is forwarded");
        assert_eq!(p[0].payload, vec![1u8; 10]);
        // A later request appends after the stray bytes and reads back whole.
        s.accept(&[incoming("b", 0, 2)], &StatDelta::default())
            .unwrap();
        assert_eq!(s.batch_packets("b", &task, 0, 0).unwrap().len(), 2);
    }

    #[test]
    fn replays_are_refused_after_a_restart_whether_buffered_or_forwarded() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::from(TASK);
        let lane = lane_prefix("b", &task);
        {
            let s = Store::open(dir.path(), 8).unwrap();
            s.accept(
                &[incoming("b", 0, 1), incoming("b", 1, 2)],
                &StatDelta::default(),
            )
            .unwrap();
            let p = s.batch_packets("b", &task, 0, 0).unwrap();
            s.mark_forwarded("b", &task, &refs(&p)).unwrap();
            assert_eq!(s.remove_batches("b", &task, 0, 0).unwrap(), 0);
            // A crash between a file write and its extent: a packet never acknowledged.
            let torn = incoming("b", 1, 3).tag_key;
            s.files
                .append(&lane, 1, [(&torn, &b"torn"[..])].into_iter())
                .unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path(), 8).unwrap();
        assert_eq!(s.remove_orphan_files().unwrap(), 0);
        assert_eq!(
            s.tag_count(),
            2,
            "tag 1 from its log, tag 2 from its packet's record"
        );
        assert_eq!(
            s.accept(
                &[
                    incoming("b", 2, 1),
                    incoming("b", 2, 2),
                    incoming("b", 2, 3)
                ],
                &StatDelta::default()
            )
            .unwrap(),
            vec![false, false, true],
            "the unacknowledged packet's retry is taken"
        );
        assert_eq!(s.delete_tags([0; 8]).unwrap(), 3);
        drop(s);
        assert_eq!(
            Store::open(dir.path(), 8).unwrap().tag_count(),
            0,
            "a retired key's tags stay gone, though two of its packets are still buffered"
        );
    }

    #[test]
    fn a_missing_or_short_packet_file_is_a_corrupt_store_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::from(TASK);
        let s = Store::open(dir.path(), 8).unwrap();
        s.accept(&[incoming("b", 0, 1)], &StatDelta::default())
            .unwrap();
        let lane = lane_prefix("b", &task);
        s.files.remove(&lane, 0).unwrap();
        let e = s.batch_packets("b", &task, 0, 0).unwrap_err();
        assert!(e.to_string().contains("corrupt stored packet file"), "{e}");
    }

    #[test]
    fn packets_under_both_earlier_layouts_move_into_packet_files() {
        let dir = tempfile::tempdir().unwrap();
        let task = TaskId::from(TASK);
        {
            let s = Store::open(dir.path(), 8).unwrap();
            // The per-hop key (hop ‖ batch ‖ random) of the first layout.
            let mut old = hop_prefix("b");
            old.extend_from_slice(&3u64.to_be_bytes());
            old.extend_from_slice(&[1; 16]);
            let mut v = TASK.to_vec();
            v.extend_from_slice(b"packet");
            s.buffer.insert(old, v).unwrap();
            // The per-lane key (hop ‖ task ‖ batch ‖ random) of the second.
            for (batch, r) in [(3u64, 2u8), (5, 3)] {
                let mut k = lane_prefix("b", &task);
                k.extend_from_slice(&batch.to_be_bytes());
                k.extend_from_slice(&[r; 16]);
                let mut v = TASK.to_vec();
                v.extend_from_slice(&[r; 5]);
                s.buffer.insert(k, v).unwrap();
            }
            assert_eq!(s.migrate_buffer_keys().unwrap(), 1);
            assert_eq!(s.migrate_buffer_keys().unwrap(), 0);
            assert_eq!(s.migrate_buffer_to_files().unwrap(), 3);
            assert_eq!(s.migrate_buffer_to_files().unwrap(), 0);
            // A replay tag of the layout before the tag logs: one sled entry.
            s.tags.insert(incoming("b", 6, 9).tag_key, &[][..]).unwrap();
            s.db.flush().unwrap();
        }
        let s = Store::open(dir.path(), 8).unwrap();
        assert_eq!(
            (s.tags.len(), s.tag_count()),
            (0, 1),
            "the tag moved to its log"
        );
        assert_eq!(
            s.accept(&[incoming("b", 6, 9)], &StatDelta::default())
                .unwrap(),
            vec![false]
        );
        assert_eq!(s.remove_orphan_files().unwrap(), 0);
        assert_eq!(s.buffer.len(), 0);
        let b = s.buffered().unwrap()[&("b".to_owned(), task)];
        assert_eq!(
            b,
            Buffered {
                count: 3,
                batches: Some((3, 5))
            }
        );
        let mut got: Vec<Vec<u8>> = s
            .batch_packets("b", &task, 3, 3)
            .unwrap()
            .into_iter()
            .map(|p| p.payload.to_vec())
            .collect();
        got.sort();
        assert_eq!(got, vec![vec![2u8; 5], b"packet".to_vec()]);
        assert_eq!(
            s.batch_packets("b", &task, 5, 5).unwrap()[0].payload,
            vec![3u8; 5]
        );
    }
}
