//! Full and diff snapshots of the whole VM: writing them ([`create`]), folding a diff
//! into its base ([`merge`]), reading and checking a chain ([`load`]), and restoring
//! ([`apply`]). Format and guarantees: docs/snapshots.md.
//!
//! A snapshot is a directory:
//!
//! ```text
//! DIR/manifest.json   format, version, id, kind (full|diff), base {path, id}, guest size,
//!                     engine, guest image SHA-256, page count, BLAKE3 of every file,
//!                     ids merged into it
//! DIR/state.bin       vCPU and VM state: tagged sections of KVM's own structs
//! DIR/memory.bin      full: guest RAM as one sparse file (zero pages are holes)
//!                     diff: the pages written since the base, in pfn order
//! DIR/pages.bin       diff only: their frame numbers, u64 little endian
//! ```
//!
//! Writing is transactional (see [`crate::storage::durable`]); reading checks format, version,
//! sizes and every checksum, and every base's id, before a byte is used. Every file is
//! untrusted: only regular files are read, manifests up to
//! [`MANIFEST_LIMIT`](crate::storage::chain::MANIFEST_LIMIT) and state up to
//! [`STATE_LIMIT`], memory files only at the size the manifest and guest imply. Reading
//! manifests and following bases is [`crate::storage::chain`]'s, shared with dumps.

mod create;
pub mod live;
mod merge;
mod state;

pub use create::{create, Phases, Report, Source};
pub use merge::{merge, Merged};
pub use state::{apply, capture, Sections};

use crate::machine::memory::GuestMem;
use crate::storage::chain::{self, check_sum, Header, Linked, Ref, Refusal, Step};
use crate::tracking::engine::EngineKind;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

pub const FORMAT: &str = "softdirty-vmm-snapshot";
/// 2: BLAKE3 checksums (1 had SHA-256).
pub const VERSION: u32 = 2;
const PAGE: u64 = 4096;
/// Largest `state.bin` read (4 MiB; a 3 GiB guest's is about 400 KiB).
pub const STATE_LIMIT: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that cannot be read, or a snapshot that is invalid.
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error("no base snapshot: create a full snapshot of this VM first")]
    NoBase,
    #[error("a live snapshot of this VM is being committed; try again when it is done")]
    LiveCommitting,
    #[error("cannot merge {dir} into {into}: {why}")]
    Merge { dir: PathBuf, into: PathBuf, why: String },
    #[error("KVM {op} failed: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Durable(#[from] crate::storage::durable::Error),
    #[error(transparent)]
    Log(#[from] crate::tracking::dirty_log::Error),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| chain::io(path)(source).into()
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Kvm { op, source })
}

fn invalid(path: &Path, why: impl Into<String>) -> Error {
    chain::invalid::<Manifest>(path, why).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Diff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub kind: Kind,
    pub base: Option<Ref>,
    pub mem_bytes: u64,
    pub engine: EngineKind,
    /// SHA-256 of the guest image ([`sha256_hex`]), in hex.
    pub image_sha256: String,
    pub pages: u64,
    /// How `files` are checksummed: [`crate::storage::checksum::NAME`].
    pub checksum: String,
    pub files: BTreeMap<String, String>,
    /// Ids of the snapshots folded into this one by `merge`, oldest first (it stands in
    /// for each of them as the base of later diffs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub merged: Vec<String>,
}

impl Manifest {
    /// A new snapshot's manifest, in this build's format and version, checksummed with
    /// this build's checksum, merged from nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn new(id: String, kind: Kind, base: Option<Ref>, mem_bytes: u64, engine: EngineKind, image_sha256: String, pages: u64,
        files: BTreeMap<String, String>) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id,
            kind,
            base,
            mem_bytes,
            engine,
            image_sha256,
            pages,
            checksum: crate::storage::checksum::NAME.into(),
            files,
            merged: Vec::new(),
        }
    }
}

impl Linked for Manifest {
    const WHAT: &'static str = "snapshot";
    const PREVIOUS: &'static str = "base";
    const FORMAT: &'static str = FORMAT;
    const VERSION: u32 = VERSION;

    fn header(&self) -> Header<'_> {
        let Manifest { format, version, id, checksum, files, base, .. } = self;
        Header { format, version: *version, id, checksum, files, previous: base.as_ref() }
    }

    fn check(&self) -> Result<(), String> {
        if self.mem_bytes == 0 || !self.mem_bytes.is_multiple_of(PAGE) || self.mem_bytes > guest_abi::MAX_MEM {
            return Err(format!("guest size {} is not valid", self.mem_bytes));
        }
        if (self.kind == Kind::Diff) != self.base.is_some() {
            return Err("a diff needs a base and a full snapshot has none".into());
        }
        Ok(())
    }

    /// A base holds if it has the id the link names; if instead it carries the id of
    /// the snapshot the link starts from, that snapshot was merged into it, which then
    /// takes its place.
    fn follow(chain: &[(PathBuf, Manifest)], link: &Ref, base: &Manifest) -> Result<Step, Refusal> {
        let top = &chain.last().expect("non-empty").1;
        if base.mem_bytes != top.mem_bytes || base.image_sha256 != top.image_sha256 {
            return Err(Refusal::Invalid("guest size or image differs from the snapshot built on it".into()));
        }
        if base.id == link.id {
            Ok(Step::Follows)
        } else if base.id == top.id && base.merged.contains(&link.id) {
            Ok(Step::Replaces)
        } else {
            Err(Refusal::Invalid(format!("is snapshot {}, but {} expects base {}", base.id, top.id, link.id)))
        }
    }
}

/// The last snapshot written or restored by this VM (the base of the next diff).
#[derive(Debug, Clone)]
pub struct Last {
    pub path: PathBuf,
    pub id: String,
}

impl Last {
    /// Snapshot `id` at `dir`, by its absolute path where there is one (a later diff
    /// names it as its base from wherever it is written).
    pub fn at(dir: &Path, id: &str) -> Last {
        Last { path: std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf()), id: id.to_string() }
    }
}

/// The SHA-256 of `data` (a guest image) as 64 lowercase hex digits: what manifests
/// record as `image_sha256`. File checksums are BLAKE3 instead
/// ([`crate::storage::checksum`]).
pub fn sha256_hex(data: &[u8]) -> String {
    chain::hex(&Sha256::digest(data))
}

/// Reads `name` (a regular file of at most `limit` bytes) from snapshot `dir`,
/// checking it against the manifest's checksum.
fn read_checked(dir: &Path, m: &Manifest, name: &str, limit: u64) -> Result<Vec<u8>, Error> {
    Ok(chain::read_checked(dir, m, name, limit)?)
}

/// Reads `name`, which the manifest says is `want` bytes, checking its size before
/// reading it and its checksum after.
fn read_sized(dir: &Path, m: &Manifest, name: &str, want: u64) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let (f, len) = crate::input::open_regular(&path).map_err(io(&path))?;
    if len != want {
        return Err(invalid(dir, format!("{name} is {len} bytes, but pages = {} needs {want}", m.pages)));
    }
    let data = crate::input::read_at_most(f, want).map_err(io(&path))?;
    if data.len() as u64 != want {
        return Err(invalid(dir, format!("{name} changed size while being read")));
    }
    check_sum(dir, m, name, &crate::storage::checksum::of(&data))?;
    Ok(data)
}

/// Reads and checks snapshot `dir`'s manifest (see [`chain::read_manifest`]).
pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    Ok(chain::read_manifest(dir)?)
}

/// A diff's pages, checked: (frame numbers, their contents back to back).
fn read_diff_pages(dir: &Path, m: &Manifest) -> Result<(Vec<u64>, Vec<u8>), Error> {
    // At most one page per guest frame: this bounds what is read by the guest's size.
    let frames = m.mem_bytes / PAGE;
    if m.pages > frames {
        return Err(invalid(dir, format!("pages = {} is more than the guest's {frames} frames", m.pages)));
    }
    let (Some(index_len), Some(data_len)) = (m.pages.checked_mul(8), m.pages.checked_mul(PAGE)) else {
        return Err(invalid(dir, format!("pages = {} overflows", m.pages)));
    };
    let raw = read_sized(dir, m, "pages.bin", index_len)?;
    let data = read_sized(dir, m, "memory.bin", data_len)?;
    let pfns: Vec<u64> = raw.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
    for w in pfns.windows(2) {
        if w[0] >= w[1] {
            return Err(invalid(dir, format!("pages.bin is not in increasing order at frame {:#x}", w[1])));
        }
    }
    if let Some(&last) = pfns.last() {
        if last.checked_mul(PAGE).and_then(|a| a.checked_add(PAGE)).is_none_or(|end| end > m.mem_bytes) {
            return Err(invalid(dir, format!("page {last:#x} is outside the guest")));
        }
    }
    Ok((pfns, data))
}

/// Streams a full snapshot's memory.bin, checking its size and checksum; `sink` gets
/// each chunk with its offset.
fn read_full_memory(dir: &Path, m: &Manifest, mut sink: impl FnMut(u64, &[u8]) -> Result<(), Error>) -> Result<(), Error> {
    let path = dir.join("memory.bin");
    let (f, len) = crate::input::open_regular(&path).map_err(io(&path))?;
    // Never more than the guest's size, even if the file grows meanwhile.
    let mut f = f.take(m.mem_bytes.saturating_add(1));
    if len != m.mem_bytes {
        return Err(invalid(dir, format!("memory.bin holds {len} bytes, not the guest's {}", m.mem_bytes)));
    }
    let mut hasher = crate::storage::checksum::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        // Whole buffers (short only at the end), so chunks stay page-aligned.
        let mut n = 0;
        while n < buf.len() {
            match f.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&path)(e)),
            }
        }
        if n == 0 {
            break;
        }
        if !(n as u64).is_multiple_of(PAGE) || off + n as u64 > m.mem_bytes {
            return Err(invalid(dir, "memory.bin changed size while being read"));
        }
        hasher.update(&buf[..n]);
        sink(off, &buf[..n])?;
        off += n as u64;
    }
    if off != m.mem_bytes {
        return Err(invalid(dir, "memory.bin changed size while being read"));
    }
    Ok(check_sum(dir, m, "memory.bin", &hasher.hex())?)
}

/// A snapshot read back and checked.
pub struct Loaded {
    pub manifest: Manifest,
    pub state: Sections,
    /// Manifests from the base to this one.
    pub chain: Vec<Manifest>,
}

/// Follows `dir`'s bases back to a full snapshot, checking every link (see
/// [`chain::resolve`] and [`Manifest`]'s `follow`): the chain oldest first.
pub fn resolve_chain(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, Error> {
    Ok(chain::resolve(dir)?)
}

/// Follows a snapshot's chain back to its full base, checking every link and
/// checksum, and writes the resulting memory into `mem` (fresh, zero-filled guest
/// memory of the snapshot's size) when given. Memory is written only from files whose checksums are being verified; the
/// caller must not run a VM unless this returns `Ok`.
pub fn load(dir: &Path, mem: Option<&GuestMem>) -> Result<Loaded, Error> {
    let chain = resolve_chain(dir)?;
    for (d, m) in &chain {
        let bad_mem = |e: vm_memory::GuestMemoryError| invalid(d, e.to_string());
        if m.kind == Kind::Full {
            // `mem` is fresh (all zeros): only non-zero pages are written, which keeps
            // the never-used part of the guest unbacked and the restore short.
            read_full_memory(d, m, |off, chunk| {
                let Some(mem) = mem else { return Ok(()) };
                static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
                for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                    if page != ZERO {
                        mem.write_slice(page, GuestAddress(off + (i as u64) * PAGE)).map_err(bad_mem)?;
                    }
                }
                Ok(())
            })?;
        } else {
            let (pfns, data) = read_diff_pages(d, m)?;
            if let Some(mem) = mem {
                for (i, pfn) in pfns.iter().enumerate() {
                    let page = &data[i * PAGE as usize..(i + 1) * PAGE as usize];
                    mem.write_slice(page, GuestAddress(pfn * PAGE)).map_err(bad_mem)?;
                }
            }
        }
    }
    let (top_dir, manifest) = chain.last().expect("non-empty").clone();
    let state_raw = read_checked(&top_dir, &manifest, "state.bin", STATE_LIMIT)?;
    let state = state::decode(&state_raw).ok_or_else(|| invalid(&top_dir, "state.bin is malformed"))?;
    for tag in state::TAGS {
        if !state.contains_key(tag) {
            return Err(invalid(&top_dir, format!("state.bin lacks '{tag}'")));
        }
    }
    Ok(Loaded { manifest, state, chain: chain.into_iter().map(|(_, m)| m).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(id: &str, base: Option<(&Path, &str)>, merged: &[&str]) -> Manifest {
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id: id.into(),
            kind: if base.is_some() { Kind::Diff } else { Kind::Full },
            base: base.map(|(p, id)| Ref { path: p.display().to_string(), id: id.into() }),
            mem_bytes: 1 << 20,
            engine: EngineKind::Pte,
            image_sha256: "i".into(),
            pages: 0,
            checksum: crate::storage::checksum::NAME.into(),
            files: BTreeMap::new(),
            merged: merged.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn put(dir: &Path, m: &Manifest) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(m).unwrap()).unwrap();
    }

    fn why(r: Result<Vec<(PathBuf, Manifest)>, Error>) -> String {
        r.expect_err("a loop is refused").to_string()
    }

    #[test]
    fn chains_that_loop_are_refused_by_identity() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        // A merge result naming itself as its base: the merged branch would replace
        // it by itself forever.
        put(&a, &manifest("x", Some((&a, "y")), &["y"]));
        assert!(why(resolve_chain(&a)).contains("is already in the chain"), "{}", why(resolve_chain(&a)));
        // The same directory by another path.
        let alias = t.path().join("alias");
        std::os::unix::fs::symlink(&a, &alias).unwrap();
        put(&a, &manifest("x", Some((&alias, "y")), &["y"]));
        assert!(why(resolve_chain(&a)).contains("(a loop)"));
        // Two diffs each the other's base.
        put(&a, &manifest("x", Some((&b, "y")), &[]));
        put(&b, &manifest("y", Some((&a, "x")), &[]));
        assert!(why(resolve_chain(&a)).contains(&format!("its base {} is already in the chain", a.display())));
        // The same id in two directories (a copy) is a loop too.
        let c = t.path().join("c");
        put(&b, &manifest("y", Some((&c, "x")), &[]));
        put(&c, &manifest("x", Some((&b, "z")), &[]));
        put(&a, &manifest("x", Some((&b, "y")), &[]));
        assert!(why(resolve_chain(&a)).contains("snapshot x is already in the chain"), "{}", why(resolve_chain(&a)));
    }

    #[test]
    fn a_merged_base_stands_in_for_the_diff_it_absorbed() {
        let t = tempfile::tempdir().unwrap();
        let (full, d1, d2) = (t.path().join("full"), t.path().join("d1"), t.path().join("d2"));
        put(&full, &manifest("d1", None, &["f"]));
        put(&d1, &manifest("d1", Some((&full, "f")), &[]));
        put(&d2, &manifest("d2", Some((&d1, "d1")), &[]));
        let chain = resolve_chain(&d2).unwrap();
        assert_eq!(chain.iter().map(|(p, m)| (p.clone(), m.id.as_str())).collect::<Vec<_>>(), [(full, "d1"), (d2, "d2")]);
    }

    #[test]
    fn claimed_page_counts_are_checked_against_the_guest_and_the_files() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path();
        let mut m = manifest("x", Some((d, "y")), &[]);
        std::fs::write(d.join("pages.bin"), b"").unwrap();
        std::fs::write(d.join("memory.bin"), b"").unwrap();
        m.files.insert("pages.bin".into(), crate::storage::checksum::of(b""));
        m.files.insert("memory.bin".into(), crate::storage::checksum::of(b""));
        // 2^61 * 8 wraps to 0: it must not pass as an empty diff.
        m.pages = 1 << 61;
        let e = read_diff_pages(d, &m).err().unwrap().to_string();
        assert!(e.contains("pages = 2305843009213693952 is more than the guest's 256 frames"), "{e}");
        m.pages = 2;
        let e = read_diff_pages(d, &m).err().unwrap().to_string();
        assert!(e.contains("pages.bin is 0 bytes, but pages = 2 needs 16"), "{e}");
        m.pages = 0;
        assert!(read_diff_pages(d, &m).unwrap().0.is_empty());
    }
}
