//! Pending files: the bytes of the leader's pending reports, kept outside sled (sled only).
//!
//! sled 0.34 keeps a value inside its leaf and rewrites the whole leaf every tenth update of it
//! (a leaf holds up to 16 entries), and holds the old versions until its epoch advances. A
//! pending record holds up to a job's worth of reports (1,160 bytes each for Histogram(32)), so
//! leaves of pending records were hundreds of kilobytes, copied out whole every few inserts or
//! deletes: most of the leader's memory and of its blob writes under load. Here an ingest
//! appends its reports to an append-only file in one write and syncs it *before* the sled
//! transaction that stores their record, which then holds only where each report is
//! ([`super::FileRecord`]: a few bytes per report). So a record in sled always points at durable
//! bytes, and bytes no record points at (a crash or a refused report between the write and the
//! commit) belong to reports that were never acknowledged.
//!
//! Files are numbered; a process never appends to a file an earlier run wrote, and moves to a
//! new file past [`FILE_MAX`] bytes. A file is deleted once no record points into it, no append
//! to it is in flight, and the deletions of its records are durable
//! ([`super::Store::remove_unused_pending_files`]); at open, every file no record points into
//! goes.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, Result};
use hush_server::db::{folder_bytes, sync_dir};

/// A file takes appends until it holds this many bytes.
pub(crate) const FILE_MAX: u64 = 64 << 20;

/// The pending files of one leader, in `dir`.
#[derive(Debug)]
pub(crate) struct PendingFiles {
    dir: PathBuf,
    /// [`FILE_MAX`], smaller in tests.
    file_max: u64,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Whether the folder exists (it is made at the first append, so a helper or a tool that
    /// opens a store makes none).
    made: bool,
    /// The file taking appends: its number and length.
    active: Option<(u64, u64)>,
    /// The number the next file gets.
    next: u64,
    /// Appends in flight (written, their record not yet committed or given up), per file.
    writing: HashMap<u64, u32>,
}

/// An append in flight: where its bytes are. While it lives, its file is not deleted; drop it
/// once the record that points at the bytes is committed (or will not be).
#[derive(Debug)]
pub(crate) struct Appended<'a> {
    files: &'a PendingFiles,
    /// The file's number.
    pub(crate) file: u64,
    /// Where the bytes start in it.
    pub(crate) offset: u64,
}

impl Drop for Appended<'_> {
    fn drop(&mut self) {
        let mut s = self.files.lock();
        if let Some(n) = s.writing.get_mut(&self.file) {
            *n -= 1;
            if *n == 0 {
                s.writing.remove(&self.file);
            }
        }
    }
}

impl PendingFiles {
    /// Opens the folder of pending files (made at the first append); the next file is numbered
    /// after every file there.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, FILE_MAX)
    }

    fn open_with(dir: &Path, file_max: u64) -> Result<Self> {
        let made = dir.is_dir();
        let next = if made {
            Self::numbers_in(dir)?
                .into_iter()
                .max()
                .map_or(0, |n| n + 1)
        } else {
            0
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            file_max,
            state: Mutex::new(State {
                made,
                next,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while it was held left plain numbers behind: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file name of file `n`.
    fn name(n: u64) -> String {
        format!("{n:016x}.pending")
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(Self::name(n))
    }

    /// The numbers of the files in `dir` (other names are left alone; none if there is no
    /// `dir`).
    fn numbers_in(dir: &Path) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e.into()),
        };
        for e in entries {
            let name = e?.file_name();
            let Some(n) = name
                .to_str()
                .and_then(|s| s.strip_suffix(".pending"))
                .filter(|s| s.len() == 16)
                .and_then(|s| u64::from_str_radix(s, 16).ok())
            else {
                continue;
            };
            out.push(n);
        }
        Ok(out)
    }

    /// Appends `bytes` (not empty) to the active file in one write and makes them durable.
    ///
    /// Appends to one file may run at once (each writes its own range). Each opens the file
    /// itself: Linux reports a failed write-back once per open file, so a shared handle could
    /// hand one append's failure to another's sync and let the first report success. A file
    /// whose write or sync failed takes no more appends.
    pub(crate) fn append(&self, bytes: &[u8]) -> Result<Appended<'_>> {
        let len = bytes.len() as u64;
        let (file, offset) = {
            let mut s = self.lock();
            if !s.made {
                std::fs::create_dir_all(&self.dir)?;
                sync_dir(self.dir.parent().unwrap_or(&self.dir))?;
                s.made = true;
            }
            if s.active
                .is_some_and(|(_, at)| at > 0 && at + len > self.file_max)
            {
                s.active = None;
            }
            if s.active.is_none() {
                let n = s.next;
                // Numbered before anything can fail: a file left by a failure below is not
                // named again (it has no record, so it is deleted later).
                s.next = n + 1;
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(self.path(n))?;
                sync_dir(&self.dir)?;
                s.active = Some((n, 0));
            }
            let (n, at) = s.active.as_mut().expect("an active file");
            let (n, offset) = (*n, *at);
            *at += len;
            *s.writing.entry(n).or_default() += 1;
            (n, offset)
        };
        // Counted as writing from here: a failed write or sync still ends it.
        let appended = Appended {
            files: self,
            file,
            offset,
        };
        let written = OpenOptions::new()
            .write(true)
            .open(self.path(file))
            .and_then(|f| {
                f.write_all_at(bytes, offset)?;
                f.sync_data()
            });
        if let Err(e) = written {
            let mut s = self.lock();
            if s.active.is_some_and(|(n, _)| n == file) {
                s.active = None;
            }
            return Err(e.into());
        }
        Ok(appended)
    }

    /// `len` bytes at `offset` of file `file`.
    pub(crate) fn read(&self, file: u64, offset: u64, len: u64) -> Result<Vec<u8>> {
        let corrupt = |what: String| {
            Error::corrupt(
                "pending file",
                format!(
                    "{what}; a pending record points at bytes {offset}..{} of {}: restore the data \
                     directory (sled and `pending/` together) from a backup taken with the leader \
                     stopped",
                    offset.saturating_add(len),
                    self.path(file).display()
                ),
            )
        };
        let f = File::open(self.path(file)).map_err(|e| corrupt(format!("cannot open it: {e}")))?;
        let size = f
            .metadata()
            .map_err(|e| corrupt(format!("cannot read its size: {e}")))?
            .len();
        if offset.saturating_add(len) > size {
            return Err(corrupt(format!("it holds only {size} bytes")));
        }
        let mut out = vec![0; usize::try_from(len).map_err(|_| corrupt("too long".into()))?];
        f.read_exact_at(&mut out, offset)
            .map_err(|e| corrupt(format!("cannot read it: {e}")))?;
        Ok(out)
    }

    /// The files that take no append and have none in flight: only these may be deleted. With
    /// `retire_active`, the active file joins them if no append to it is in flight (the next
    /// append starts a new file), so a quiet leader's last file can go too.
    pub(crate) fn idle(&self, retire_active: bool) -> Result<HashSet<u64>> {
        let mut s = self.lock();
        if retire_active
            && let Some((n, at)) = s.active
            && at > 0
            && !s.writing.contains_key(&n)
        {
            s.active = None;
        }
        let active = s.active.map(|(n, _)| n);
        Ok(Self::numbers_in(&self.dir)?
            .into_iter()
            .filter(|n| Some(*n) != active && !s.writing.contains_key(n))
            .collect())
    }

    /// Deletes files `numbers`; returns how many were there.
    pub(crate) fn remove(&self, numbers: impl IntoIterator<Item = u64>) -> Result<usize> {
        let mut n = 0;
        for f in numbers {
            match std::fs::remove_file(self.path(f)) {
                Ok(()) => n += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }

    /// Numbers the next file past `n` (a file a record names), if it is not already.
    pub(crate) fn number_past(&self, n: u64) {
        let mut s = self.lock();
        s.next = s.next.max(n.saturating_add(1));
    }

    /// How many pending files there are.
    pub(crate) fn count(&self) -> Result<usize> {
        Ok(Self::numbers_in(&self.dir)?.len())
    }

    /// Bytes of every pending file.
    pub(crate) fn bytes(&self) -> u64 {
        folder_bytes(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appended_bytes_read_back_and_a_new_run_starts_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = PendingFiles::open(dir.path()).unwrap();
        let (a, b) = {
            let a = files.append(b"first").unwrap();
            let b = files.append(b"second!").unwrap();
            ((a.file, a.offset), (b.file, b.offset))
        };
        assert_eq!(a, (0, 0));
        assert_eq!(b, (0, 5));
        assert_eq!(files.read(0, 5, 7).unwrap(), b"second!");
        assert_eq!(files.read(0, 0, 5).unwrap(), b"first");
        // Past the end, or a file that is not there: an error naming the file.
        let e = files.read(0, 10, 8).unwrap_err().to_string();
        assert!(e.contains("0000000000000000.pending"), "{e}");
        assert!(files.read(7, 0, 1).is_err());
        drop(files);
        let again = PendingFiles::open(dir.path()).unwrap();
        assert_eq!(again.append(b"x").unwrap().file, 1);
        assert_eq!(again.read(0, 0, 5).unwrap(), b"first");
    }

    #[test]
    fn the_folder_is_made_at_the_first_append() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pending");
        let files = PendingFiles::open(&path).unwrap();
        assert!(files.idle(true).unwrap().is_empty());
        assert_eq!(files.remove([0]).unwrap(), 0);
        assert!(!path.exists());
        assert_eq!(files.append(b"a").unwrap().file, 0);
        assert!(path.join("0000000000000000.pending").exists());
    }

    #[test]
    fn only_files_with_no_append_in_flight_are_idle() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("not-ours.txt"), b"kept").unwrap();
        let files = PendingFiles::open(dir.path()).unwrap();
        let held = files.append(b"abc").unwrap();
        // The active file with an append in flight is never idle, even when retiring.
        assert_eq!(files.idle(true).unwrap(), HashSet::new());
        drop(held);
        // Without retiring, the active file keeps taking appends and is not idle.
        assert_eq!(files.idle(false).unwrap(), HashSet::new());
        assert_eq!(files.idle(true).unwrap(), HashSet::from([0]));
        // The next append starts file 1; file 0 can go.
        let next = files.append(b"def").unwrap();
        assert_eq!(next.file, 1);
        assert_eq!(files.remove([0, 5]).unwrap(), 1);
        assert!(files.read(0, 0, 3).is_err());
        assert_eq!(files.read(1, 0, 3).unwrap(), b"def");
        assert!(dir.path().join("not-ours.txt").exists());
    }

    #[test]
    fn a_full_file_gives_way_to_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let files = PendingFiles::open_with(dir.path(), 100).unwrap();
        let big = vec![7u8; 51];
        let a = files.append(&big).unwrap();
        let b = files.append(&big).unwrap();
        assert_eq!((a.file, b.file), (0, 1));
        // File 0 is full but its append is still in flight: not idle yet.
        assert!(files.idle(false).unwrap().is_empty());
        drop(a);
        assert_eq!(files.idle(false).unwrap(), HashSet::from([0]));
        // A single append larger than a file still goes in (one file of its own).
        drop(b);
        let huge = files.append(&[1u8; 101]).unwrap();
        assert_eq!(huge.file, 2);
    }
}
