//! Writing a directory of files so that it appears whole or not at all.
//!
//! ```no_run
//! # fn main() -> Result<(), vmm::storage::durable::Error> {
//! let stage = vmm::storage::durable::Staging::new(std::path::Path::new("snaps/full"), "3f2a")?;
//! stage.write("manifest.json", b"{}")?;
//! stage.commit()?; // fsync files and directory, rename to snaps/full, fsync snaps/
//! # Ok(()) }
//! ```
//!
//! Files go to `TARGET.tmp-<id>` next to the target (same file system, so the final
//! rename is atomic). Every file is fsynced before the directory is renamed, and the
//! parent afterwards. A staging directory that is dropped uncommitted is removed; one
//! left by a killed process is never mistaken for a snapshot (its name says `.tmp-`).
//! Limits: `commit` refuses to overwrite (a directory rename over a non-empty one
//! fails); `replace` swaps atomically with `renameat2(RENAME_EXCHANGE)` (Linux ≥ 3.15,
//! and a file system that supports it — ext4, xfs, btrfs, tmpfs do).
//!
//! Reading goes the other way, through [`crate::input`]: every snapshot, dump, image
//! and script is untrusted.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    #[error("{0}: names containing `{STAGING_MARK}` are reserved for directories being written")]
    ReservedName(PathBuf),
}

/// What every staging directory's name contains (`TARGET.tmp-<id>`).
pub const STAGING_MARK: &str = ".tmp-";

/// `dir` is (by its name) a staging directory: possibly complete inside, but never
/// committed — a process was killed between writing its last file and renaming it.
/// Readers refuse it, so that only committed snapshots and dumps are ever used.
pub fn is_staging(dir: &Path) -> bool {
    dir.file_name().is_some_and(|n| n.to_string_lossy().contains(STAGING_MARK))
}

pub fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// A directory being written, to become `target` on commit.
pub struct Staging {
    target: PathBuf,
    tmp: PathBuf,
    done: bool,
}

fn parent_of(p: &Path) -> &Path {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    }
}

fn fsync_dir(dir: &Path) -> Result<(), Error> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl Staging {
    /// Starts `target.tmp-<id>`. Fails if `target` exists.
    pub fn new(target: &Path, id: &str) -> Result<Staging, Error> {
        if is_staging(target) {
            return Err(Error::ReservedName(target.to_path_buf()));
        }
        if target.exists() {
            return Err(Error::Exists(target.to_path_buf()));
        }
        Staging::beside(target, id)
    }

    /// Starts `target.tmp-<id>` to [`Staging::replace`] `target`, which must exist.
    pub fn replacing(target: &Path, id: &str) -> Result<Staging, Error> {
        if !target.is_dir() {
            return Err(Error::Io { path: target.to_path_buf(), source: std::io::ErrorKind::NotFound.into() });
        }
        Staging::beside(target, id)
    }

    /// Creates the staging directory `target.tmp-<id>` next to `target`.
    fn beside(target: &Path, id: &str) -> Result<Staging, Error> {
        let name = target.file_name().map_or("out".into(), |n| n.to_string_lossy().into_owned());
        let tmp = target.with_file_name(format!("{name}.tmp-{id}"));
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        Ok(Staging { target: target.to_path_buf(), tmp, done: false })
    }

    /// Where files are being written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.tmp.join(name)
    }

    /// Writes and fsyncs one whole file.
    pub fn write(&self, name: &str, data: &[u8]) -> Result<(), Error> {
        let path = self.file(name);
        let mut f = std::fs::File::create(&path).map_err(io(&path))?;
        f.write_all(data).map_err(io(&path))?;
        f.sync_all().map_err(io(&path))
    }

    /// Makes the directory `target`: fsync it, rename it into place, fsync the parent.
    /// (Files written through [`Staging::write`] are already synced; callers that
    /// write their own must sync them.)
    pub fn commit(mut self) -> Result<(), Error> {
        fsync_dir(&self.tmp)?;
        if self.target.exists() {
            return Err(Error::Exists(self.target.clone()));
        }
        std::fs::rename(&self.tmp, &self.target).map_err(io(&self.target))?;
        self.done = true;
        fsync_dir(parent_of(&self.target))
    }

    /// Atomically puts this directory where `target` (which must exist) is, and removes
    /// the old one. A crash leaves either the old or the new directory at `target`,
    /// never neither, and at worst a `.tmp-` directory behind.
    pub fn replace(self) -> Result<(), Error> {
        fsync_dir(&self.tmp)?;
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::Io {
            path: p.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "path contains a NUL byte"),
        });
        let (from, to) = (c(&self.tmp)?, c(&self.target)?);
        // SAFETY: two valid NUL-terminated paths; renameat2 only reads them.
        let rc = unsafe {
            libc::renameat2(libc::AT_FDCWD, from.as_ptr(), libc::AT_FDCWD, to.as_ptr(), libc::RENAME_EXCHANGE)
        };
        if rc != 0 {
            return Err(Error::Io { path: self.target.clone(), source: std::io::Error::last_os_error() });
        }
        fsync_dir(parent_of(&self.target))?;
        // The old directory is now at the temporary name; Drop removes it.
        Ok(())
    }
}

/// Bytes the files of `dir` occupy on disk (holes of sparse files excluded).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir).map(|d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.blocks() * 512).sum()).unwrap_or(0)
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_reserved_and_never_read() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("snap");
        let stage = Staging::new(&target, "abc").unwrap();
        assert!(is_staging(stage.path()) && !is_staging(&target));
        assert!(matches!(Staging::new(&dir.path().join("x.tmp-1"), "2"), Err(Error::ReservedName(_))));
    }

    #[test]
    fn commit_appears_whole_and_never_overwrites() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("snap");
        let s = Staging::new(&target, "1").unwrap();
        s.write("a", b"x").unwrap();
        assert!(!target.exists());
        s.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a")).unwrap(), b"x");
        assert!(matches!(Staging::new(&target, "2"), Err(Error::Exists(_))));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "no staging left behind");
    }

    #[test]
    fn dropped_staging_leaves_nothing_and_replace_swaps() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("snap");
        {
            let s = Staging::new(&target, "1").unwrap();
            s.write("a", b"x").unwrap();
        }
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("old"), b"o").unwrap();
        let s = Staging::replacing(&target, "2").unwrap();
        s.write("new", b"n").unwrap();
        s.replace().unwrap();
        assert!(target.join("new").exists() && !target.join("old").exists());
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1, "the old directory is gone");
    }
}
