//! Replay tags: looked up in memory, durable in files.
//!
//! A shuffler refuses a packet whose replay tag it has seen under the same key (a replayed
//! packet would let whoever replays it follow it through the batch). Every tag of a live key is
//! kept in a hash set in memory, 32 bytes and the set's overhead per tag; sled kept one entry
//! per tag before, which cost a lookup and an insert in its tree per packet and several hundred
//! bytes of memory per tag (docs/architecture.md, "Where the time goes").
//!
//! On disk a tag is in one of two places:
//! - while its packet is buffered, in the packet's record in its packet file
//!   ([`crate::packets`]), written and synced with the packet, so a tag is never durable without
//!   its packet (which would make the sender's retry of an unacknowledged packet a "replay");
//! - once its packet is forwarded or expired, in the log of its key epoch,
//!   `data_dir/tags/<epoch>.tags` (32 bytes per tag, appended and synced before the packet file
//!   goes).
//!
//! An epoch is live while its log exists: the log is made (empty) before the first packet of
//! its key is stored, and deleted with the key ([`ReplayTags::delete_epoch`]). Tags of an epoch
//! without a log are neither kept nor logged, so the packets of a retired key still buffered
//! (a next hop down past the grace period) do not bring its tags back when they leave. At
//! startup the set is rebuilt from the logs and the records of every stored extent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::Result;
use crate::packets::TAG_KEY;

/// Bytes of a tag in a log.
const TAG: usize = TAG_KEY - 8;

/// The replay tags of one shuffler.
#[derive(Debug)]
pub struct ReplayTags {
    dir: PathBuf,
    live: Mutex<HashMap<[u8; 8], HashSet<[u8; TAG]>>>,
}

fn split(key: &[u8; TAG_KEY]) -> ([u8; 8], [u8; TAG]) {
    (
        key[..8].try_into().expect("8 bytes"),
        key[8..].try_into().expect("TAG bytes"),
    )
}

impl ReplayTags {
    /// Opens the logs in `dir` (made if missing) and loads their tags. A log whose length is not
    /// a whole number of tags ends in a write a crash cut short (whose tags are still in their
    /// packet files): it is cut back to its last whole tag.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        File::open(dir.parent().unwrap_or(dir))?.sync_all()?;
        let mut live: HashMap<[u8; 8], HashSet<[u8; TAG]>> = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(epoch) = name.strip_suffix(".tags").and_then(parse_epoch) else {
                continue;
            };
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(entry.path())?;
            let mut buf = Vec::new();
            f.read_to_end(&mut buf)?;
            let whole = buf.len() - buf.len() % TAG;
            if whole != buf.len() {
                f.set_len(whole as u64)?;
                f.sync_data()?;
            }
            let set = live.entry(epoch).or_default();
            for t in buf[..whole].chunks_exact(TAG) {
                set.insert(t.try_into().expect("TAG bytes"));
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            live: Mutex::new(live),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 8], HashSet<[u8; TAG]>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, epoch: &[u8; 8]) -> PathBuf {
        let mut name = String::with_capacity(16 + 5);
        for b in epoch {
            name.push_str(&format!("{b:02x}"));
        }
        name.push_str(".tags");
        self.dir.join(name)
    }

    /// Whether `key` (epoch ‖ tag) was seen.
    pub fn contains(&self, key: &[u8; TAG_KEY]) -> bool {
        let (epoch, tag) = split(key);
        self.lock().get(&epoch).is_some_and(|s| s.contains(&tag))
    }

    /// Makes the (empty) log of every epoch among `keys` that has none, so that their tags are
    /// kept: called before packets of a new key are stored.
    pub fn open_epochs<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) -> Result<()> {
        let mut live = self.lock();
        let mut made = false;
        for k in keys {
            let (epoch, _) = split(k);
            if is_zero(k) || live.contains_key(&epoch) {
                continue;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(&epoch))?;
            live.insert(epoch, HashSet::new());
            made = true;
        }
        if made {
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Adds tags whose packets are durable (or tags already in a log) to the set. Tags of an
    /// epoch without a log, and the all-zero key (a packet whose tag is kept elsewhere), are
    /// skipped.
    pub fn remember<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) {
        let mut live = self.lock();
        for k in keys {
            let (epoch, tag) = split(k);
            if let Some(set) = live.get_mut(&epoch).filter(|_| !is_zero(k)) {
                set.insert(tag);
            }
        }
    }

    /// Appends `keys` to their epochs' logs, one write and `fdatasync` per epoch (and a sync of
    /// the folder for a new log), and adds them to the set. Called before the packet files that
    /// held them go. Each write is sorted, so the log does not keep the packets' arrival order.
    /// Tags of an epoch without a log (a retired key's) and all-zero keys are skipped.
    pub fn log<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) -> Result<()> {
        let mut per_epoch: BTreeMap<[u8; 8], Vec<[u8; TAG]>> = BTreeMap::new();
        {
            let live = self.lock();
            for k in keys {
                let (epoch, tag) = split(k);
                if !is_zero(k) && live.contains_key(&epoch) {
                    per_epoch.entry(epoch).or_default().push(tag);
                }
            }
        }
        for (epoch, tags) in per_epoch.iter_mut() {
            tags.sort_unstable();
            // Made (and its name synced) by `open_epochs`; `create` only for a log lost
            // since, which then holds from here on.
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(epoch))?;
            f.write_all(tags.as_flattened())?;
            f.sync_data()?;
        }
        let mut live = self.lock();
        for (epoch, tags) in per_epoch {
            if let Some(set) = live.get_mut(&epoch) {
                set.extend(tags);
            }
        }
        Ok(())
    }

    /// Forgets every tag of `epoch` and deletes its log (the deletion synced, so that a crash
    /// does not bring back the tags of a retired key); returns how many tags it had.
    pub fn delete_epoch(&self, epoch: [u8; 8]) -> std::io::Result<usize> {
        let n = self.lock().remove(&epoch).map_or(0, |s| s.len());
        match std::fs::remove_file(self.path(&epoch)) {
            Ok(()) => File::open(&self.dir)?.sync_all()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(n)
    }

    /// Tags held, all epochs.
    pub fn count(&self) -> usize {
        self.lock().values().map(HashSet::len).sum()
    }

    /// Bytes the logs occupy.
    pub fn bytes(&self) -> u64 {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

fn is_zero(key: &[u8; TAG_KEY]) -> bool {
    key.iter().all(|&b| b == 0)
}

/// The epoch a log's name (16 hex digits) stands for.
fn parse_epoch(hex: &str) -> Option<[u8; 8]> {
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(u64::to_be_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u8, t: u8) -> [u8; TAG_KEY] {
        let mut k = [t; TAG_KEY];
        k[..8].copy_from_slice(&[epoch; 8]);
        k
    }

    #[test]
    fn logged_tags_survive_a_restart_and_go_with_their_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("tags");
        {
            let t = ReplayTags::open(&d).unwrap();
            // No log yet: not kept.
            t.log([key(1, 9)].iter()).unwrap();
            t.remember([key(3, 9)].iter());
            assert_eq!(t.count(), 0);
            t.open_epochs([key(1, 0), key(2, 0), key(3, 0), [0; TAG_KEY]].iter())
                .unwrap();
            t.log([key(1, 1), key(1, 2), key(2, 3), [0; TAG_KEY]].iter())
                .unwrap();
            t.remember([key(3, 4)].iter());
            assert!(t.contains(&key(1, 2)) && t.contains(&key(3, 4)));
            assert!(!t.contains(&key(2, 2)), "tags of other epochs are apart");
            assert!(!t.contains(&[0; TAG_KEY]), "the zero key is never held");
            assert_eq!(t.count(), 4);
        }
        // A torn append: half a tag at the end of epoch 1's log.
        let log = d.join("0101010101010101.tags");
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9; 10]).unwrap();
        drop(f);
        let t = ReplayTags::open(&d).unwrap();
        // Remembered tags are not in a log: their packet files hold them.
        assert_eq!(t.count(), 3);
        t.remember([key(3, 4)].iter());
        assert!(
            t.contains(&key(3, 4)),
            "epoch 3's log, empty, keeps it live"
        );
        assert!(t.contains(&key(1, 1)) && t.contains(&key(2, 3)));
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 2 * TAG as u64);
        t.log([key(1, 5)].iter()).unwrap();
        assert_eq!(t.delete_epoch([1; 8]).unwrap(), 3);
        assert!(!log.exists());
        assert_eq!(t.delete_epoch([1; 8]).unwrap(), 0);
        // A retired key's packets leaving later do not bring its tags back.
        t.log([key(1, 6)].iter()).unwrap();
        t.remember([key(1, 7)].iter());
        assert!(!log.exists() && !t.contains(&key(1, 6)) && !t.contains(&key(1, 7)));
        let t = ReplayTags::open(&d).unwrap();
        assert_eq!(t.count(), 1);
        assert!(t.contains(&key(2, 3)));
    }
}
