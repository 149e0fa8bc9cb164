//! Replay tags: looked up in memory, durable in files.
//!
//! A shuffler refuses a packet whose replay tag it has seen under the same key (a replayed
//! packet would let whoever replays it follow it through the batch). Every tag of a live key is
//! kept in a hash set in memory: its first 16 bytes ([`HELD`]) and the set's overhead, 19–39
//! bytes per tag with the set 44–88% full. sled kept one entry per tag before, which cost a
//! lookup and an insert in its tree per packet and several hundred bytes of memory per tag
//! (docs/architecture.md, "Where the time goes").
//!
//! Sixteen bytes are enough: a tag is a SHA-256 output of the packet's encapsulated key, so
//! two packets share a prefix only by chance (about N² / 2¹²⁹ for N tags of a key, 2⁻⁶⁹ at a
//! billion), and making a packet whose prefix is that of a given tag takes about 2¹²⁸ hashes.
//! All a collision does is refuse one packet as a replay. The logs keep all 32 bytes.
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
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::Result;
use crate::packets::TAG_KEY;
use hush_server::db::{folder_bytes, sync_dir};

/// Bytes of a tag in a log.
const TAG: usize = TAG_KEY - 8;

/// Bytes of a tag held in memory: its prefix (see the module's comment for why that is enough).
pub const HELD: usize = 16;

/// The part of `tag` held in memory.
fn held(tag: &[u8; TAG]) -> [u8; HELD] {
    tag[..HELD].try_into().expect("HELD bytes")
}

/// What is in memory.
#[derive(Debug, Default)]
struct State {
    /// The tags of each live epoch (one with a log), by their first [`HELD`] bytes.
    live: HashMap<[u8; 8], HashSet<[u8; HELD]>>,
    /// Epochs deleted since start: never opened again (a packet opened with a key just before
    /// it retired may reach the store after).
    retired: HashSet<[u8; 8]>,
}

/// The replay tags of one shuffler.
#[derive(Debug)]
pub struct ReplayTags {
    dir: PathBuf,
    state: Mutex<State>,
    /// Held across every change to the logs, so that a deletion cannot fall between an append's
    /// check that its epoch is live and its write. Taken before `state`.
    files: Mutex<()>,
}

fn split(key: &[u8; TAG_KEY]) -> ([u8; 8], [u8; TAG]) {
    (
        key[..8].try_into().expect("8 bytes"),
        key[8..].try_into().expect("TAG bytes"),
    )
}

fn is_zero(key: &[u8; TAG_KEY]) -> bool {
    key.iter().all(|&b| b == 0)
}

impl ReplayTags {
    /// Opens the logs in `dir` (made if missing) and loads their tags. A log whose length is not
    /// a whole number of tags ends in a write that a crash or an error cut short (whose tags are
    /// still in their packet files): the next append starts at its last whole tag.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        sync_dir(dir.parent().unwrap_or(dir))?;
        let mut live: HashMap<[u8; 8], HashSet<[u8; HELD]>> = HashMap::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(epoch) = name.strip_suffix(".tags").and_then(parse_epoch) else {
                continue;
            };
            let set = live.entry(epoch).or_default();
            let mut f = std::io::BufReader::with_capacity(1 << 16, File::open(entry.path())?);
            let mut t = [0u8; TAG];
            loop {
                match f.read_exact(&mut t) {
                    Ok(()) => {
                        set.insert(held(&t));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(State {
                live,
                retired: HashSet::new(),
            }),
            files: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn files(&self) -> MutexGuard<'_, ()> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, epoch: &[u8; 8]) -> PathBuf {
        self.dir
            .join(format!("{:016x}.tags", u64::from_be_bytes(*epoch)))
    }

    /// Whether `key` (epoch ‖ tag) was seen: a tag of its epoch with the same first [`HELD`]
    /// bytes.
    pub fn contains(&self, key: &[u8; TAG_KEY]) -> bool {
        let (epoch, tag) = split(key);
        self.state()
            .live
            .get(&epoch)
            .is_some_and(|s| s.contains(&held(&tag)))
    }

    /// Makes the (empty) log of every epoch among `keys` that has none and was not deleted, so
    /// that their tags are kept: called before packets of a new key are stored.
    pub fn open_epochs<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) -> Result<()> {
        let mut new: Vec<[u8; 8]> = Vec::new();
        {
            let st = self.state();
            for k in keys {
                let (epoch, _) = split(k);
                if !is_zero(k)
                    && !st.live.contains_key(&epoch)
                    && !st.retired.contains(&epoch)
                    && !new.contains(&epoch)
                {
                    new.push(epoch);
                }
            }
        }
        if new.is_empty() {
            return Ok(());
        }
        let _files = self.files();
        for epoch in &new {
            if self.state().retired.contains(epoch) {
                continue;
            }
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(epoch))?;
        }
        sync_dir(&self.dir)?;
        let mut st = self.state();
        for epoch in new {
            if !st.retired.contains(&epoch) {
                st.live.entry(epoch).or_default();
            }
        }
        Ok(())
    }

    /// Adds tags whose packets are durable (or tags already in a log) to the set. Tags of an
    /// epoch without a log, and the all-zero key (a packet whose tag is kept elsewhere), are
    /// skipped.
    pub fn remember<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) {
        let mut st = self.state();
        for k in keys {
            let (epoch, tag) = split(k);
            if let Some(set) = st.live.get_mut(&epoch).filter(|_| !is_zero(k)) {
                set.insert(held(&tag));
            }
        }
    }

    /// Appends `keys` to their epochs' logs, one write and `fdatasync` per epoch, and adds them
    /// to the set. Called before the packet files that held them go, once per forwarded (or
    /// expired) batch, and each write is sorted, so a log does not keep the packets' arrival
    /// order within a batch. Tags of an epoch without a log (a retired key's) and all-zero keys
    /// are skipped. A write starts at the log's last whole tag, so one that failed halfway
    /// leaves nothing misaligned.
    pub fn log<'a>(&self, keys: impl Iterator<Item = &'a [u8; TAG_KEY]>) -> Result<()> {
        let _files = self.files();
        let mut per_epoch: BTreeMap<[u8; 8], Vec<[u8; TAG]>> = BTreeMap::new();
        {
            let st = self.state();
            for k in keys {
                let (epoch, tag) = split(k);
                if !is_zero(k) && st.live.contains_key(&epoch) {
                    per_epoch.entry(epoch).or_default().push(tag);
                }
            }
        }
        for (epoch, tags) in per_epoch.iter_mut() {
            tags.sort_unstable();
            // Live, so its log exists (made by `open_epochs`, deleted only with the epoch,
            // under the same lock).
            let f = OpenOptions::new().write(true).open(self.path(epoch))?;
            let len = f.metadata()?.len();
            let at = len - len % TAG as u64;
            let written = f
                .write_all_at(tags.as_flattened(), at)
                .and_then(|()| f.sync_data());
            if let Err(e) = written {
                // Whatever reached the file past `at` is cut at the next whole tag anyway.
                let _ = f.set_len(at);
                return Err(e.into());
            }
        }
        let mut st = self.state();
        for (epoch, tags) in per_epoch {
            if let Some(set) = st.live.get_mut(&epoch) {
                set.extend(tags.iter().map(held));
            }
        }
        Ok(())
    }

    /// Forgets every tag of `epoch`, never to open it again in this process, and deletes its
    /// log (the deletion synced, so that a crash does not bring back the tags of a retired key);
    /// returns how many tags it had. A log left by a failure here or a crash before it is
    /// deleted at the next start ([`ReplayTags::retain`]).
    pub fn delete_epoch(&self, epoch: [u8; 8]) -> std::io::Result<usize> {
        let _files = self.files();
        let n = {
            let mut st = self.state();
            st.retired.insert(epoch);
            st.live.remove(&epoch).map_or(0, |s| s.len())
        };
        match std::fs::remove_file(self.path(&epoch)) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(n)
    }

    /// Deletes the logs of every epoch not in `keep` (the node's keys): those of keys that
    /// retired while a deletion failed or a crash cut it short. Returns how many went.
    pub fn retain(&self, keep: &HashSet<[u8; 8]>) -> std::io::Result<usize> {
        let gone: Vec<[u8; 8]> = self
            .state()
            .live
            .keys()
            .filter(|e| !keep.contains(*e))
            .copied()
            .collect();
        for e in &gone {
            self.delete_epoch(*e)?;
        }
        Ok(gone.len())
    }

    /// Tags held, all epochs.
    pub fn count(&self) -> usize {
        self.state().live.values().map(HashSet::len).sum()
    }

    /// Logs on disk.
    pub fn logs(&self) -> usize {
        self.state().live.len()
    }

    /// Bytes the logs occupy.
    pub fn bytes(&self) -> u64 {
        folder_bytes(&self.dir)
    }
}

/// The epoch a log's name stands for: exactly 16 lower-case hex digits, as [`ReplayTags`]
/// writes it (anything else in the folder is not a log and is left alone).
fn parse_epoch(hex: &str) -> Option<[u8; 8]> {
    if hex.len() != 16 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    u64::from_str_radix(hex, 16).ok().map(u64::to_be_bytes)
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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
            assert_eq!(t.logs(), 3);
            t.log([key(1, 2), key(1, 1), key(2, 3), [0; TAG_KEY]].iter())
                .unwrap();
            t.remember([key(3, 4)].iter());
            assert!(t.contains(&key(1, 2)) && t.contains(&key(3, 4)));
            assert!(!t.contains(&key(2, 2)), "tags of other epochs are apart");
            assert!(!t.contains(&[0; TAG_KEY]), "the zero key is never held");
            assert_eq!(t.count(), 4);
            // Held by its first HELD bytes: a tag that differs only past them counts as seen.
            let mut near = key(1, 2);
            near[8 + HELD] ^= 1;
            assert!(t.contains(&near));
            near[8 + HELD - 1] ^= 1;
            assert!(!t.contains(&near));
        }
        // Sorted, not in the order given.
        let log = d.join("0101010101010101.tags");
        let bytes = std::fs::read(&log).unwrap();
        assert_eq!(bytes, [[1u8; TAG], [2u8; TAG]].concat());
        // A torn append: part of a tag at the end of epoch 1's log.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[9; 10]).unwrap();
        drop(f);
        // Names that are not exactly a log's are not logs.
        std::fs::write(d.join("0101010101010101.TAGS"), [5u8; TAG]).unwrap();
        std::fs::write(d.join("+101010101010101.tags"), [5u8; TAG]).unwrap();
        std::fs::write(d.join("ABABABABABABABAB.tags"), [5u8; TAG]).unwrap();
        let t = ReplayTags::open(&d).unwrap();
        // Remembered tags are not in a log: their packet files hold them.
        assert_eq!((t.count(), t.logs()), (3, 3));
        t.remember([key(3, 4)].iter());
        assert!(
            t.contains(&key(3, 4)),
            "epoch 3's log, empty, keeps it live"
        );
        assert!(t.contains(&key(1, 1)) && t.contains(&key(2, 3)));
        // The next append starts at the last whole tag.
        t.log([key(1, 5)].iter()).unwrap();
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 3 * TAG as u64);
        assert!(ReplayTags::open(&d).unwrap().contains(&key(1, 5)));
        assert_eq!(t.delete_epoch([1; 8]).unwrap(), 3);
        assert!(!log.exists());
        assert_eq!(t.delete_epoch([1; 8]).unwrap(), 0);
        // A retired key's packets, stored or leaving later, do not bring its tags back.
        t.open_epochs([key(1, 6)].iter()).unwrap();
        t.log([key(1, 6)].iter()).unwrap();
        t.remember([key(1, 7)].iter());
        assert!(!log.exists() && !t.contains(&key(1, 6)) && !t.contains(&key(1, 7)));
        let t = ReplayTags::open(&d).unwrap();
        assert_eq!((t.count(), t.logs()), (1, 2));
        assert!(t.contains(&key(2, 3)));
        // At start, the logs of keys the node no longer has go.
        assert_eq!(t.retain(&[[2u8; 8]].into_iter().collect()).unwrap(), 1);
        assert_eq!(ReplayTags::open(&d).unwrap().logs(), 1);
    }
}
