//! Packet files: the bytes of buffered packets, kept outside sled.
//!
//! sled 0.34 keeps values inside its leaves and rewrites a whole leaf (up to 17 entries) when it
//! consolidates it, so 4 KB packets stored one entry each cost it splits, merges and copies per
//! packet. Here each batch of a lane (hop and task) has one append-only file; an accepted request
//! appends its packets of that batch in one write and syncs the file before sled records the
//! *extent* (offset, packet count, bytes) in the same order as the replay tags. So an extent in
//! sled always points at durable bytes, and bytes with no extent (a crash between the write and
//! the sled commit) belong to packets that were never acknowledged: [`PacketFiles::remove_except`]
//! deletes such files at startup.
//!
//! A file holds its packets in arrival order, each as a 4-byte little-endian length and the
//! peeled bytes. A file is deleted once every packet in it has been forwarded (or expired).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The files of one shuffler, in `dir`.
#[derive(Debug)]
pub struct PacketFiles {
    dir: PathBuf,
}

/// A packet read back from its file: its offset in the file (its identity within the batch)
/// and its bytes.
pub type FilePacket = (u64, Vec<u8>);

impl PacketFiles {
    /// Opens (or creates) the folder of packet files.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        sync_dir(dir.parent().unwrap_or(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// The file name of batch `batch` of the lane with key prefix `lane` (hop ‖ task): a
    /// SHA-256 of the prefix (hop names can be longer than a file name may be) and the batch.
    pub fn name(lane: &[u8], batch: u64) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, lane);
        let mut s = String::with_capacity(32 + 1 + 16 + 4);
        for b in &d.as_ref()[..16] {
            s.push_str(&format!("{b:02x}"));
        }
        s.push_str(&format!("-{batch:016x}.pk"));
        s
    }

    fn path(&self, lane: &[u8], batch: u64) -> PathBuf {
        self.dir.join(Self::name(lane, batch))
    }

    /// Appends `payloads` to the file of (`lane`, `batch`) in one write and makes them durable;
    /// returns the offset where they start and the bytes written.
    pub fn append<'a>(
        &self,
        lane: &[u8],
        batch: u64,
        payloads: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(u64, u64)> {
        let mut buf = Vec::new();
        for p in payloads {
            let len = u32::try_from(p.len())
                .map_err(|_| Error::InvalidRequest("a packet over 4 GiB".into()))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(p);
        }
        let path = self.path(lane, batch);
        let mut f = OpenOptions::new().create(true).append(true).open(&path)?;
        let offset = f.metadata()?.len();
        f.write_all(&buf)?;
        f.sync_data()?;
        if offset == 0 {
            // The file's name must survive a crash too. A file empty until now may have been
            // made by this call or by one whose write failed after creating it (a full disk):
            // either way its entry in the folder was not synced yet.
            sync_dir(&self.dir)?;
        }
        Ok((offset, buf.len() as u64))
    }

    /// The packets of the extent at `offset`, `len` bytes long, of (`lane`, `batch`).
    pub fn read(&self, lane: &[u8], batch: u64, offset: u64, len: u64) -> Result<Vec<FilePacket>> {
        let path = self.path(lane, batch);
        let f = File::open(&path).map_err(|e| {
            Error::corrupt(
                "packet file",
                format!(
                    "{} holds acknowledged packets but cannot be opened: {e}",
                    path.display()
                ),
            )
        })?;
        let size = f.metadata()?.len();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(Error::corrupt(
                "packet file",
                format!(
                    "{} holds {size} bytes, less than its extent at {offset} of {len} bytes",
                    path.display()
                ),
            ));
        }
        let len = usize::try_from(len).map_err(|_| Error::corrupt("packet extent", "too long"))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).map_err(|e| {
            Error::corrupt(
                "packet file",
                format!("{} is shorter than its extents: {e}", path.display()),
            )
        })?;
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            let n = buf
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| Error::corrupt("packet file", "a cut length"))?;
            let p = buf
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| Error::corrupt("packet file", "a cut packet"))?;
            out.push((offset + at as u64, p.to_vec()));
            at += 4 + n;
        }
        Ok(out)
    }

    /// Deletes the file of (`lane`, `batch`), if there is one.
    pub fn remove(&self, lane: &[u8], batch: u64) -> Result<()> {
        match std::fs::remove_file(self.path(lane, batch)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every file whose name is not in `keep`; returns how many went.
    pub fn remove_except(&self, keep: &HashSet<String>) -> Result<usize> {
        let mut n = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".pk") && !keep.contains(&name) {
                std::fs::remove_file(entry.path())?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Bytes the files occupy.
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

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_packets_read_back_by_extent() {
        let dir = tempfile::tempdir().unwrap();
        let f = PacketFiles::open(&dir.path().join("packets")).unwrap();
        let lane = b"\x01bTASK";
        let a: [&[u8]; 2] = [b"one", b"two!"];
        let (o1, l1) = f.append(lane, 3, a.into_iter()).unwrap();
        let (o2, l2) = f.append(lane, 3, [&b"three"[..]].into_iter()).unwrap();
        assert_eq!((o1, l1, o2, l2), (0, 15, 15, 9));
        assert_eq!(
            f.read(lane, 3, o1, l1).unwrap(),
            vec![(0, b"one".to_vec()), (7, b"two!".to_vec())]
        );
        assert_eq!(
            f.read(lane, 3, o2, l2).unwrap(),
            vec![(15, b"three".to_vec())]
        );
        // Another batch or lane is another file.
        assert!(f.read(lane, 4, 0, 1).is_err());
        assert!(f.read(b"\x01cTASK", 3, 0, 1).is_err());
        // An extent past the end is corrupt, not a panic.
        assert!(f.read(lane, 3, 20, 9).is_err());
        // So is a corrupt extent length: refused before anything is allocated for it.
        assert!(f.read(lane, 3, 0, 1 << 40).is_err());
        assert!(f.read(lane, 3, u64::MAX, 2).is_err());
        f.remove(lane, 3).unwrap();
        f.remove(lane, 3).unwrap();
        assert!(f.read(lane, 3, o1, l1).is_err());
    }

    #[test]
    fn a_cut_record_is_an_error_and_unknown_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let f = PacketFiles::open(&dir.path().join("packets")).unwrap();
        let lane = b"\x01bTASK";
        f.append(lane, 0, [&b"abcdef"[..]].into_iter()).unwrap();
        // The length says 6 bytes; an extent of 8 bytes cuts the packet.
        assert!(f.read(lane, 0, 0, 8).is_err());
        f.append(lane, 1, [&b"x"[..]].into_iter()).unwrap();
        let keep: HashSet<String> = [PacketFiles::name(lane, 1)].into_iter().collect();
        assert_eq!(f.remove_except(&keep).unwrap(), 1);
        assert_eq!(f.read(lane, 1, 0, 5).unwrap(), vec![(0, b"x".to_vec())]);
        assert!(f.read(lane, 0, 0, 10).is_err());
        assert!(f.bytes() > 0);
    }
}
