//! What snapshots and dumps share: a directory with a `manifest.json` that lists its
//! files' checksums and may name the directory before it, so that directories form a
//! chain back to a full one. This module reads such a manifest within limits
//! ([`read_manifest`]), follows a chain with loop detection ([`resolve`]), and reads a
//! listed file against its checksum ([`read_checked`]). What a kind of manifest holds,
//! and when one may follow another, the kind says by implementing [`Linked`].
//!
//! Every directory is untrusted: staging directories (never committed) are refused,
//! only regular files are read, a manifest up to [`MANIFEST_LIMIT`], and a chain that
//! meets a directory or an id twice is a loop, so a walk ends.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Largest `manifest.json` read (1 MiB; a snapshot's is a few hundred bytes plus 20 per
/// merged id, a dump's a few KiB at most).
pub const MANIFEST_LIMIT: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// `what` is [`Linked::WHAT`]: "snapshot" or "dump".
    #[error("{what} {path} is invalid: {why}")]
    Invalid { what: &'static str, path: PathBuf, why: String },
}

pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// A manifest's reference to the directory before it in its chain: a diff's `base`,
/// a dump's `prev`. It holds if the manifest at `path` has this `id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ref {
    pub path: String,
    pub id: String,
}

/// How a manifest read at a [`Ref`]'s path takes its place in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// It is the link before the current top.
    Follows,
    /// It absorbed the current top (a merge) and replaces it.
    Replaces,
}

/// Why a manifest read at a [`Ref`]'s path cannot take its place in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The chain came back to itself (reported like a directory met twice).
    Loop,
    /// Anything else, as a sentence about the manifest read.
    Invalid(String),
}

/// The fields every chain manifest has, borrowed from it.
pub struct Header<'a> {
    /// The `format` and `version` the manifest claims.
    pub format: &'a str,
    pub version: u32,
    pub id: &'a str,
    /// How `files` are checksummed.
    pub checksum: &'a str,
    /// Checksums of the directory's files, by name.
    pub files: &'a BTreeMap<String, String>,
    /// The reference to the link before this one; `None` ends the chain.
    pub previous: Option<&'a Ref>,
}

/// A kind of manifest that is one link of a chain (a snapshot's, a dump's).
pub trait Linked: DeserializeOwned + Sized {
    /// What such a directory is called in messages: "snapshot", "dump".
    const WHAT: &'static str;
    /// What its reference to the link before it is called in messages: "base",
    /// "previous dump".
    const PREVIOUS: &'static str;
    const FORMAT: &'static str;
    const VERSION: u32;

    fn header(&self) -> Header<'_>;
    /// The kind's own checks of a parsed manifest of the right format; the error is a
    /// sentence naming what is wrong.
    fn check(&self) -> Result<(), String>;
    /// May `next`, read at `link` (the top's [`Header::previous`]), come before the top
    /// of `chain` (newest last, never empty)?
    fn follow(chain: &[(PathBuf, Self)], link: &Ref, next: &Self) -> Result<Step, Refusal>;
}

/// An error that `M`'s directory `dir` is invalid.
pub fn invalid<M: Linked>(dir: &Path, why: impl Into<String>) -> Error {
    Error::Invalid { what: M::WHAT, path: dir.to_path_buf(), why: why.into() }
}

/// Reads and checks `dir/manifest.json`: not a staging directory, a regular file of at
/// most [`MANIFEST_LIMIT`] bytes, `M`'s format and version, this build's checksum,
/// and then `M`'s own checks.
pub fn read_manifest<M: Linked>(dir: &Path) -> Result<M, Error> {
    if crate::storage::durable::is_staging(dir) {
        return Err(invalid::<M>(dir, format!("its name marks the staging directory of a {} that was never committed (the VMM stopped before renaming it into place)", M::WHAT)));
    }
    let path = dir.join("manifest.json");
    let raw = crate::input::read_limited(&path, MANIFEST_LIMIT).map_err(io(&path))?;
    let m: M = serde_json::from_slice(&raw).map_err(|e| invalid::<M>(dir, format!("manifest.json: {e}")))?;
    let h = m.header();
    if h.format != M::FORMAT || h.version != M::VERSION {
        return Err(invalid::<M>(dir, format!("format {} version {} is not {} {}", h.format, h.version, M::FORMAT, M::VERSION)));
    }
    crate::storage::checksum::check_kind(h.checksum).map_err(|why| invalid::<M>(dir, why))?;
    m.check().map_err(|why| invalid::<M>(dir, why))?;
    Ok(m)
}

/// Checks that file `name` of `dir` has checksum `have`, as its manifest `m` lists.
pub fn check_sum<M: Linked>(dir: &Path, m: &M, name: &str, have: &str) -> Result<(), Error> {
    crate::storage::checksum::check(m.header().files, name, have).map_err(|why| invalid::<M>(dir, why))
}

/// Reads `name` (a regular file of at most `limit` bytes) from `dir`, checking it
/// against the checksum its manifest `m` lists.
pub fn read_checked<M: Linked>(dir: &Path, m: &M, name: &str, limit: u64) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let data = crate::input::read_limited(&path, limit).map_err(io(&path))?;
    check_sum(dir, m, name, &crate::storage::checksum::of(&data))?;
    Ok(data)
}

/// Directories already visited while following a chain, by (device, inode): whatever
/// path names them, a second visit is a loop.
#[derive(Default)]
struct Visited(HashSet<(u64, u64)>);

impl Visited {
    /// Records `dir`; false if it was visited before.
    fn first_visit(&mut self, dir: &Path) -> Result<bool, Error> {
        let md = std::fs::metadata(dir).map_err(io(dir))?;
        Ok(self.0.insert((md.dev(), md.ino())))
    }
}

/// Follows `dir`'s references back to the first link (one without a previous), each
/// manifest read with [`read_manifest`] and accepted by [`Linked::follow`]; returns
/// the chain oldest first, with each link's directory. A directory (by device and
/// inode) or an id met twice is a loop: each step visits a new directory, so the walk
/// ends.
pub fn resolve<M: Linked>(dir: &Path) -> Result<Vec<(PathBuf, M)>, Error> {
    let mut visited = Visited::default();
    let mut chain = vec![(dir.to_path_buf(), read_manifest::<M>(dir)?)];
    visited.first_visit(dir)?;
    while let Some(link) = chain.last().expect("non-empty").1.header().previous.cloned() {
        let next_dir = PathBuf::from(&link.path);
        let next = read_manifest::<M>(&next_dir)?;
        let top_dir = &chain.last().expect("non-empty").0;
        let looped = || {
            invalid::<M>(top_dir, format!("its {} {} is already in the chain of {} (a loop)", M::PREVIOUS, next_dir.display(), dir.display()))
        };
        if !visited.first_visit(&next_dir)? {
            return Err(looped());
        }
        match M::follow(&chain, &link, &next) {
            Ok(Step::Follows) => {}
            Ok(Step::Replaces) => {
                chain.pop();
            }
            Err(Refusal::Loop) => return Err(looped()),
            Err(Refusal::Invalid(why)) => return Err(invalid::<M>(&next_dir, why)),
        }
        let id = next.header().id;
        if chain.iter().any(|(_, m)| m.header().id == id) {
            return Err(invalid::<M>(&next_dir, format!("{} {id} is already in the chain of {} (a loop)", M::WHAT, dir.display())));
        }
        chain.push((next_dir, next));
    }
    chain.reverse();
    Ok(chain)
}

/// `bytes` as lowercase hex digits.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A fresh random-enough id for a snapshot or dump (16 hex digits).
pub fn new_id() -> String {
    let mut seed = [0u8; 16];
    // getrandom(2) cannot fail for 16 bytes once the pool is initialized; fall back to
    // time and pid if it does.
    // SAFETY: writes at most 16 bytes into `seed`.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    let extra = if n == 16 { String::new() } else { format!("{:?}{}", std::time::SystemTime::now(), std::process::id()) };
    let mut h = Sha256::new();
    h.update(seed);
    h.update(extra.as_bytes());
    hex(&h.finalize())[..16].to_string()
}
