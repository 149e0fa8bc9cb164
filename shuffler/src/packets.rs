//! Packet files: the bytes of buffered packets, kept outside sled.
//!
//! sled 0.34 keeps values inside its leaves and rewrites a whole leaf (up to 17 entries) when it
//! consolidates it, so 4 KB packets stored one entry each cost it splits, merges and copies per
//! packet. Here each batch of a lane (hop and task) has one append-only file; an accepted request
//! appends its packets of that batch in one write and syncs the file before sled records the
//! *extent* (offset, packet count, bytes). So an extent in
//! sled always points at durable bytes, and bytes with no extent (a crash between the write and
//! the sled commit) belong to packets that were never acknowledged: [`PacketFiles::remove_except`]
//! deletes such files at startup.
//!
//! A file holds its packets in arrival order, each as a 4-byte little-endian length of the
//! peeled bytes, the packet's replay tag under its key epoch (40 bytes, [`TAG_KEY`]; zeros for a
//! packet moved here from an earlier layout, whose tag is kept elsewhere) and the peeled bytes.
//! The tag is written with its packet so that one sync makes both durable: a buffered packet's
//! tag is in its file, and it moves to the tag log ([`crate::tags`]) before the file goes. A
//! file is deleted once every packet in it has been forwarded (or expired).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hush_server::db::{folder_bytes, sync_dir};
use prost::bytes::Bytes;

use crate::error::{Error, Result};

/// The files of one shuffler, in `dir`.
#[derive(Debug)]
pub struct PacketFiles {
    dir: PathBuf,
}

/// Bytes of a replay tag under its key epoch: epoch (8) ‖ tag (32).
pub const TAG_KEY: usize = 40;

/// A packet read back from its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilePacket {
    /// Its offset in the file: its identity within the batch.
    pub offset: u64,
    /// Its replay tag under its key epoch (zeros: kept elsewhere).
    pub tag_key: [u8; TAG_KEY],
    /// Its bytes: a slice of the extent read, not a copy.
    pub payload: Bytes,
}

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

    /// Appends `packets` (replay tag under its epoch, bytes) to the file of (`lane`, `batch`)
    /// in one write and makes them durable; returns the offset where they start and the bytes
    /// written.
    pub fn append<'a>(
        &self,
        lane: &[u8],
        batch: u64,
        packets: impl Iterator<Item = (&'a [u8; TAG_KEY], &'a [u8])>,
    ) -> Result<(u64, u64)> {
        let mut buf = Vec::new();
        for (tag_key, p) in packets {
            let len = u32::try_from(p.len())
                .map_err(|_| Error::InvalidRequest("a packet over 4 GiB".into()))?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(tag_key);
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
        // Read into spare capacity: the read would overwrite zeros anyway, and jemalloc makes a
        // zeroed buffer of megabytes by giving its pages back and faulting fresh ones in.
        let mut buf = Vec::with_capacity(len);
        (&f).seek(SeekFrom::Start(offset))
            .and_then(|_| (&f).take(len as u64).read_to_end(&mut buf))
            .and_then(|n| match n == len {
                true => Ok(()),
                false => Err(std::io::ErrorKind::UnexpectedEof.into()),
            })
            .map_err(|e| {
                Error::corrupt(
                    "packet file",
                    format!("{} is shorter than its extents: {e}", path.display()),
                )
            })?;
        let buf = Bytes::from(buf);
        let mut out = Vec::new();
        let mut at = 0usize;
        while at < buf.len() {
            let n = buf
                .get(at..at + 4)
                .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| Error::corrupt("packet file", "a cut length"))?;
            let start = at + 4 + TAG_KEY;
            if buf.len() < start || buf.len() - start < n {
                return Err(Error::corrupt("packet file", "a cut packet"));
            }
            let tag_key = buf[at + 4..start].try_into().expect("TAG_KEY bytes");
            out.push(FilePacket {
                offset: offset + at as u64,
                tag_key,
                payload: buf.slice(start..start + n),
            });
            at = start + n;
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
        folder_bytes(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(b: u8) -> [u8; TAG_KEY] {
        [b; TAG_KEY]
    }

    fn packet(offset: u64, t: u8, p: &'static [u8]) -> FilePacket {
        FilePacket {
            offset,
            tag_key: tag(t),
            payload: Bytes::from_static(p),
        }
    }

    #[test]
    fn appended_packets_read_back_by_extent() {
        let dir = tempfile::tempdir().unwrap();
        let f = PacketFiles::open(&dir.path().join("packets")).unwrap();
        let lane = b"\x01bTASK";
        let (t1, t2, t3) = (tag(1), tag(2), tag(3));
        let a: [(&[u8; TAG_KEY], &[u8]); 2] = [(&t1, b"one"), (&t2, b"two!")];
        let (o1, l1) = f.append(lane, 3, a.into_iter()).unwrap();
        let (o2, l2) = f
            .append(lane, 3, [(&t3, &b"three"[..])].into_iter())
            .unwrap();
        assert_eq!((o1, l1, o2, l2), (0, 95, 95, 49));
        assert_eq!(
            f.read(lane, 3, o1, l1).unwrap(),
            vec![packet(0, 1, b"one"), packet(47, 2, b"two!")]
        );
        assert_eq!(
            f.read(lane, 3, o2, l2).unwrap(),
            vec![packet(95, 3, b"three")]
        );
        // Another batch or lane is another file.
        assert!(f.read(lane, 4, 0, 1).is_err());
        assert!(f.read(b"\x01cTASK", 3, 0, 1).is_err());
        // An extent past the end is corrupt, not a panic.
        assert!(f.read(lane, 3, 100, 49).is_err());
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
        let t = tag(9);
        f.append(lane, 0, [(&t, &b"abcdef"[..])].into_iter())
            .unwrap();
        // The length says 6 bytes; extents of 20 and 48 bytes cut the tag and the packet.
        assert!(f.read(lane, 0, 0, 20).is_err());
        assert!(f.read(lane, 0, 0, 48).is_err());
        assert_eq!(
            f.read(lane, 0, 0, 50).unwrap(),
            vec![packet(0, 9, b"abcdef")]
        );
        f.append(lane, 1, [(&t, &b"x"[..])].into_iter()).unwrap();
        let keep: HashSet<String> = [PacketFiles::name(lane, 1)].into_iter().collect();
        assert_eq!(f.remove_except(&keep).unwrap(), 1);
        assert_eq!(f.read(lane, 1, 0, 45).unwrap(), vec![packet(0, 9, b"x")]);
        assert!(f.read(lane, 0, 0, 10).is_err());
        assert!(f.bytes() > 0);
    }
}
