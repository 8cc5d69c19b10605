//! Per-process incremental dumps from outside the guest, CRIU-style: `vmm dump` writes
//! a process's mappings and pages ([`create`]); with `--prev`, only the pages
//! soft-dirty since that dump. `vmm dump verify` rebuilds the process's memory from
//! the chain ([`reconstruct`]). Format: docs/snapshots.md.
//!
//! ```text
//! DIR/manifest.json  format "softdirty-vmm-dump", version, id, pid, name, prev {path, id},
//!                    mappings [{start, pages, read_only, huge, shared}], counts,
//!                    sha256 of every file
//! DIR/pagemap.bin    runs of 16 bytes: [u64 va][u32 pages][u32 kind], by address;
//!                    kind 1 = zero page, 2 = data (next pages of pages.bin),
//!                    3 = unchanged since the previous dump (take it from there).
//!                    Pages in no run are not present.
//! DIR/pages.bin      the data pages back to back
//! ```
//!
//! Why a page may be "unchanged": it is present and not soft-dirty, and soft-dirty was
//! cleared by the previous dump. Pages of shared mappings are always written in full:
//! soft-dirty is per page-table entry, so another process's write through its own
//! mapping would not show in this process's bits (Linux's CRIU dumps shared memory
//! separately for the same reason).

mod create;

pub use create::{create, Last, Report};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "softdirty-vmm-dump";
pub const VERSION: u32 = 1;
const PAGE: u64 = 4096;
/// Longest chain `reconstruct` follows.
const MAX_CHAIN: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("dump {path} is invalid: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("cannot use {prev} as the previous dump: {why}")]
    BadPrev { prev: PathBuf, why: String },
    #[error("pid {pid}: {why}")]
    Guest { pid: u32, why: String },
    #[error(transparent)]
    SoftDirty(#[from] crate::softdirty::Error),
    #[error(transparent)]
    Durable(#[from] crate::durable::Error),
}

fn invalid(path: &Path, why: impl Into<String>) -> Error {
    Error::Invalid { path: path.to_path_buf(), why: why.into() }
}

/// What a run of pages is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    Zero = 1,
    Data = 2,
    Parent = 3,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        [Kind::Zero, Kind::Data, Kind::Parent].into_iter().find(|k| *k as u32 == v)
    }
}

/// One run of `pagemap.bin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub va: u64,
    pub pages: u32,
    pub kind: Kind,
}

const RUN_BYTES: usize = 16;

pub fn encode_runs(runs: &[Run]) -> Vec<u8> {
    let mut out = Vec::with_capacity(runs.len() * RUN_BYTES);
    for r in runs {
        out.extend(r.va.to_le_bytes());
        out.extend(r.pages.to_le_bytes());
        out.extend((r.kind as u32).to_le_bytes());
    }
    out
}

/// Parses `pagemap.bin`; every run must lie inside one of `mappings`, in increasing
/// address order and without overlap.
pub fn decode_runs(raw: &[u8], mappings: &[MappingRecord]) -> Result<Vec<Run>, String> {
    if !raw.len().is_multiple_of(RUN_BYTES) {
        return Err(format!("pagemap.bin is {} bytes, not a multiple of {RUN_BYTES}", raw.len()));
    }
    let mut runs = Vec::with_capacity(raw.len() / RUN_BYTES);
    let mut next_free = 0u64;
    for c in raw.chunks_exact(RUN_BYTES) {
        let va = u64::from_le_bytes(c[..8].try_into().expect("8"));
        let pages = u32::from_le_bytes(c[8..12].try_into().expect("4"));
        let kind = u32::from_le_bytes(c[12..].try_into().expect("4"));
        let kind = Kind::from_u32(kind).ok_or(format!("run at {va:#x} has unknown kind {kind}"))?;
        let end = (pages as u64).checked_mul(PAGE).and_then(|b| va.checked_add(b)).ok_or(format!("run at {va:#x} overflows"))?;
        if pages == 0 || va % PAGE != 0 || va < next_free {
            return Err(format!("run at {va:#x} is empty, unaligned, or out of order"));
        }
        if !mappings.iter().any(|m| m.start <= va && end <= m.end()) {
            return Err(format!("run {va:#x}..{end:#x} is not inside one mapping"));
        }
        next_free = end;
        runs.push(Run { va, pages, kind });
    }
    Ok(runs)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MappingRecord {
    pub start: u64,
    pub pages: u64,
    pub read_only: bool,
    pub huge: bool,
    pub shared: bool,
}

impl MappingRecord {
    pub fn end(&self) -> u64 {
        self.start.saturating_add(self.pages.saturating_mul(PAGE))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub data: u64,
    pub zero: u64,
    pub parent: u64,
    pub absent: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrevRef {
    pub path: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub pid: u32,
    pub name: String,
    pub prev: Option<PrevRef>,
    pub mappings: Vec<MappingRecord>,
    pub counts: Counts,
    /// How `files` are checksummed: [`crate::checksum::NAME`].
    pub checksum: String,
    pub files: BTreeMap<String, String>,
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join("manifest.json");
    let raw = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    let m: Manifest = serde_json::from_slice(&raw).map_err(|e| invalid(dir, format!("manifest.json: {e}")))?;
    if m.format != FORMAT || m.version != VERSION {
        return Err(invalid(dir, format!("format {} version {} is not {FORMAT} {VERSION}", m.format, m.version)));
    }
    crate::checksum::check_kind(&m.checksum).map_err(|why| invalid(dir, why))?;
    let mut sorted = m.mappings.clone();
    sorted.sort_by_key(|r| r.start);
    for w in sorted.windows(2) {
        if w[0].end() > w[1].start {
            return Err(invalid(dir, format!("mappings at {:#x} and {:#x} overlap", w[0].start, w[1].start)));
        }
    }
    if sorted.iter().any(|r| r.start % PAGE != 0 || r.pages == 0 || r.end() > workload::USER_TOP) {
        return Err(invalid(dir, "a mapping is empty, unaligned or outside user space"));
    }
    Ok(m)
}

fn read_checked(dir: &Path, m: &Manifest, name: &str) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
    crate::checksum::check(&m.files, name, &crate::checksum::of(&data)).map_err(|why| invalid(dir, why))?;
    Ok(data)
}

/// A page of a rebuilt process: the zero page or data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Page {
    Zero,
    Data(Box<[u8]>),
}

impl Page {
    pub fn bytes(&self) -> &[u8] {
        static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
        match self {
            Page::Zero => &ZERO,
            Page::Data(d) => d,
        }
    }
}

/// A process's memory as a dump chain says it was at its last dump.
#[derive(Debug, Clone)]
pub struct Image {
    pub pid: u32,
    pub name: String,
    pub mappings: Vec<MappingRecord>,
    /// Present pages by virtual address.
    pub pages: BTreeMap<u64, Page>,
    /// Dumps from the first (full) one to `dir`.
    pub chain: Vec<Manifest>,
}

impl Image {
    /// A checksum over the mappings and every present page's address and contents.
    pub fn digest(&self) -> String {
        let mut h = crate::checksum::Hasher::new();
        let mut maps = self.mappings.clone();
        maps.sort_by_key(|m| m.start);
        for m in &maps {
            h.update(m.start.to_le_bytes());
            h.update(m.pages.to_le_bytes());
            h.update([m.read_only as u8, m.huge as u8, m.shared as u8]);
        }
        for (va, page) in &self.pages {
            h.update(va.to_le_bytes());
            h.update(page.bytes());
        }
        h.hex()
    }
}

/// The chain from the first dump to `dir`, each link checked (id, pid).
fn resolve_chain(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, Error> {
    let mut chain = vec![(dir.to_path_buf(), read_manifest(dir)?)];
    while let Some(prev) = chain.last().expect("non-empty").1.prev.clone() {
        if chain.len() >= MAX_CHAIN {
            return Err(invalid(dir, format!("the chain of previous dumps is longer than {MAX_CHAIN} (a loop?)")));
        }
        let pdir = PathBuf::from(&prev.path);
        let pm = read_manifest(&pdir)?;
        let top = &chain.last().expect("non-empty").1;
        if pm.id != prev.id {
            return Err(invalid(&pdir, format!("is dump {}, but {} expects previous dump {}", pm.id, top.id, prev.id)));
        }
        if pm.pid != top.pid {
            return Err(invalid(&pdir, format!("is a dump of pid {}, not of pid {}", pm.pid, top.pid)));
        }
        chain.push((pdir, pm));
    }
    chain.reverse();
    Ok(chain)
}

/// Rebuilds the process memory at dump `dir` from its chain, checking every file.
pub fn reconstruct(dir: &Path) -> Result<Image, Error> {
    let chain = resolve_chain(dir)?;
    let mut pages: BTreeMap<u64, Page> = BTreeMap::new();
    for (i, (d, m)) in chain.iter().enumerate() {
        let runs = decode_runs(&read_checked(d, m, "pagemap.bin")?, &m.mappings).map_err(|why| invalid(d, why))?;
        let data = read_checked(d, m, "pages.bin")?;
        let want: u64 = runs.iter().filter(|r| r.kind == Kind::Data).map(|r| r.pages as u64).sum();
        if data.len() as u64 != want * PAGE || want != m.counts.data {
            return Err(invalid(d, format!("pages.bin holds {} bytes for {want} data pages", data.len())));
        }
        let mut old = std::mem::take(&mut pages);
        let mut at = 0usize;
        for r in &runs {
            for k in 0..r.pages as u64 {
                let va = r.va + k * PAGE;
                let page = match r.kind {
                    Kind::Zero => Page::Zero,
                    Kind::Data => {
                        let p = Page::Data(data[at..at + PAGE as usize].into());
                        at += PAGE as usize;
                        p
                    }
                    Kind::Parent => old.remove(&va).ok_or_else(|| {
                        let why = if i == 0 {
                            format!("page {va:#x} refers to a previous dump, but this is the first")
                        } else {
                            format!("page {va:#x} is unchanged since dump {}, which does not have it", chain[i - 1].1.id)
                        };
                        invalid(d, why)
                    })?,
                };
                pages.insert(va, page);
            }
        }
    }
    let (_, top) = chain.last().expect("non-empty").clone();
    Ok(Image { pid: top.pid, name: top.name.clone(), mappings: top.mappings.clone(), pages, chain: chain.into_iter().map(|(_, m)| m).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, pages: u64) -> MappingRecord {
        MappingRecord { start, pages, read_only: false, huge: false, shared: false }
    }

    #[test]
    fn runs_round_trip_and_bad_runs_are_named() {
        let maps = [map(0x1000, 4), map(0x10000, 2)];
        let runs = vec![
            Run { va: 0x1000, pages: 2, kind: Kind::Data },
            Run { va: 0x3000, pages: 1, kind: Kind::Zero },
            Run { va: 0x10000, pages: 2, kind: Kind::Parent },
        ];
        assert_eq!(decode_runs(&encode_runs(&runs), &maps).unwrap(), runs);
        let bad = |r: Run| decode_runs(&encode_runs(&[r]), &maps).unwrap_err();
        assert!(bad(Run { va: 0x4000, pages: 2, kind: Kind::Data }).contains("not inside one mapping"));
        assert!(bad(Run { va: 0x1000, pages: 0, kind: Kind::Data }).contains("empty"));
        let mut raw = encode_runs(&runs[..1]);
        raw[12] = 9;
        assert!(decode_runs(&raw, &maps).unwrap_err().contains("unknown kind 9"));
        let mut twice = encode_runs(&runs[..1]);
        twice.extend(encode_runs(&runs[..1]));
        assert!(decode_runs(&twice, &maps).unwrap_err().contains("out of order"));
        assert!(decode_runs(&[0; 15], &maps).is_err());
    }
}
