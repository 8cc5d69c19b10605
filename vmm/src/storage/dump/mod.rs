//! Per-process incremental dumps from outside the guest, CRIU-style: `vmm dump` writes
//! a process's mappings and pages ([`create`]); with `--prev`, only the pages
//! soft-dirty since that dump. `vmm dump verify` rebuilds the process's memory from
//! the chain ([`reconstruct`]). Format: docs/snapshots.md.
//!
//! ```text
//! DIR/manifest.json  format "softdirty-vmm-dump", version, id, pid, name, prev {path, id},
//!                    mappings [{start, pages, read_only, huge, shared}], counts,
//!                    BLAKE3 of every file
//! DIR/pagemap.bin    runs of 16 bytes: [u64 va][u32 pages][u32 kind], by address;
//!                    kind 1 = zero page, 2 = data (next pages of pages.bin),
//!                    3 = unchanged since the previous dump (take it from there).
//!                    Pages in no run are not present.
//! DIR/pages.bin      the data pages back to back
//! ```
//!
//! Every file is untrusted: only regular files are read, a manifest up to
//! [`MANIFEST_LIMIT`](crate::storage::chain::MANIFEST_LIMIT) with at most as many mappings as a guest process can have,
//! `pagemap.bin` and `pages.bin` only at sizes the manifest implies. The work of
//! rebuilding is bounded by those sizes: zero pages are kept as ranges, never one by one.
//!
//! Why a page may be "unchanged": it is present and not soft-dirty, and soft-dirty was
//! cleared by the previous dump. Pages of shared mappings are always written in full:
//! soft-dirty is per page-table entry, so another process's write through its own
//! mapping would not show in this process's bits (Linux's CRIU dumps shared memory
//! separately for the same reason).
//!
//! Reading manifests and following `prev` is [`crate::storage::chain`]'s, shared with
//! snapshots.

mod create;

pub use create::{create, Last, Report, Source};

use crate::storage::chain::{self, Header, Linked, Ref, Refusal, Step};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "softdirty-vmm-dump";
pub const VERSION: u32 = 1;
const PAGE: u64 = 4096;
/// Most data pages a dump may hold: as many as the largest guest has frames.
const MAX_DATA_PAGES: u64 = guest_abi::MAX_MEM / PAGE;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file that cannot be read, or a dump that is invalid.
    #[error(transparent)]
    Chain(#[from] chain::Error),
    #[error("cannot use {prev} as the previous dump: {why}")]
    BadPrev { prev: PathBuf, why: String },
    #[error("pid {pid}: {why}")]
    Guest { pid: u32, why: String },
    #[error(transparent)]
    SoftDirty(#[from] crate::tracking::softdirty::Error),
    #[error(transparent)]
    Durable(#[from] crate::storage::durable::Error),
}

fn invalid(path: &Path, why: impl Into<String>) -> Error {
    chain::invalid::<Manifest>(path, why).into()
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

impl Run {
    /// The first address after the run (checked by [`decode_runs`]).
    pub fn end(&self) -> u64 {
        self.va + self.pages as u64 * PAGE
    }
}

/// Parses `pagemap.bin`; every run must lie inside one of `mappings` (which must not
/// overlap), in increasing address order and without overlap. One sweep over runs and
/// sorted mappings.
pub fn decode_runs(raw: &[u8], mappings: &[MappingRecord]) -> Result<Vec<Run>, String> {
    if !raw.len().is_multiple_of(RUN_BYTES) {
        return Err(format!("pagemap.bin is {} bytes, not a multiple of {RUN_BYTES}", raw.len()));
    }
    let mut maps: Vec<&MappingRecord> = mappings.iter().collect();
    maps.sort_by_key(|m| m.start);
    let mut cursor = 0usize; // the first mapping that may hold the next run
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
        while maps.get(cursor).is_some_and(|m| m.end() <= va) {
            cursor += 1;
        }
        if !maps.get(cursor).is_some_and(|m| m.start <= va && end <= m.end()) {
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
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub pid: u32,
    pub name: String,
    pub prev: Option<Ref>,
    pub mappings: Vec<MappingRecord>,
    pub counts: Counts,
    /// How `files` are checksummed: [`crate::storage::checksum::NAME`].
    pub checksum: String,
    pub files: BTreeMap<String, String>,
}

impl Linked for Manifest {
    const WHAT: &'static str = "dump";
    const PREVIOUS: &'static str = "previous dump";
    const FORMAT: &'static str = FORMAT;
    const VERSION: u32 = VERSION;

    fn header(&self) -> Header<'_> {
        let Manifest { format, version, id, checksum, files, prev, .. } = self;
        Header { format, version: *version, id, checksum, files, previous: prev.as_ref() }
    }

    fn check(&self) -> Result<(), String> {
        if self.mappings.len() > guest_abi::MAX_MAPPINGS {
            return Err(format!("{} mappings, more than a guest process can have ({})", self.mappings.len(), guest_abi::MAX_MAPPINGS));
        }
        if self.counts.data > MAX_DATA_PAGES {
            return Err(format!("counts.data = {} is more than the largest guest's {MAX_DATA_PAGES} frames", self.counts.data));
        }
        let mut sorted = self.mappings.clone();
        sorted.sort_by_key(|r| r.start);
        for w in sorted.windows(2) {
            if w[0].end() > w[1].start {
                return Err(format!("mappings at {:#x} and {:#x} overlap", w[0].start, w[1].start));
            }
        }
        if sorted.iter().any(|r| r.start % PAGE != 0 || r.pages == 0 || r.end() > workload::USER_TOP) {
            return Err("a mapping is empty, unaligned or outside user space".into());
        }
        Ok(())
    }

    /// The previous dump must have the id the link names and the same pid.
    fn follow(chain: &[(PathBuf, Manifest)], link: &Ref, prev: &Manifest) -> Result<Step, Refusal> {
        let top = &chain.last().expect("non-empty").1;
        if chain.iter().any(|(_, m)| m.id == prev.id) {
            return Err(Refusal::Loop);
        }
        if prev.id != link.id {
            return Err(Refusal::Invalid(format!("is dump {}, but {} expects previous dump {}", prev.id, top.id, link.id)));
        }
        if prev.pid != top.pid {
            return Err(Refusal::Invalid(format!("is a dump of pid {}, not of pid {}", prev.pid, top.pid)));
        }
        Ok(Step::Follows)
    }
}

/// Reads and checks dump `dir`'s manifest (see [`chain::read_manifest`]).
pub fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    Ok(chain::read_manifest(dir)?)
}

/// Reads `name` (a regular file of at most `limit` bytes) and checks its checksum.
fn read_checked(dir: &Path, m: &Manifest, name: &str, limit: u64) -> Result<Vec<u8>, Error> {
    Ok(chain::read_checked(dir, m, name, limit)?)
}

/// The runs of dump `dir`, checked. `pagemap.bin` cannot hold more runs than its
/// mappings have pages.
pub(crate) fn read_runs(dir: &Path, m: &Manifest) -> Result<Vec<Run>, Error> {
    let pages = m.mappings.iter().fold(0u64, |n, r| n.saturating_add(r.pages));
    let raw = read_checked(dir, m, "pagemap.bin", pages.saturating_mul(RUN_BYTES as u64))?;
    decode_runs(&raw, &m.mappings).map_err(|why| invalid(dir, why))
}

/// A process's memory as a dump chain says it was at its last dump.
#[derive(Debug, Clone)]
pub struct Image {
    pub pid: u32,
    pub name: String,
    pub mappings: Vec<MappingRecord>,
    /// Present pages holding data, by virtual address.
    pub pages: BTreeMap<u64, Box<[u8]>>,
    /// Present pages mapping the zero page: maximal ranges `[start, end)`, by address.
    pub zero: Vec<(u64, u64)>,
    /// Dumps from the first (full) one to `dir`.
    pub chain: Vec<Manifest>,
}

/// Appends `[start, end)` to sorted, maximal ranges that end at or before `start`.
fn push_range(ranges: &mut Vec<(u64, u64)>, start: u64, end: u64) {
    match ranges.last_mut() {
        Some(last) if last.1 == start => last.1 = end,
        _ => ranges.push((start, end)),
    }
}

/// The end of the range of `ranges` (sorted, disjoint) that holds `va`.
fn range_end(ranges: &[(u64, u64)], va: u64) -> Option<u64> {
    let i = ranges.partition_point(|&(_, end)| end <= va);
    ranges.get(i).filter(|&&(start, _)| start <= va).map(|&(_, end)| end)
}

impl Image {
    /// Zero pages present.
    pub fn zero_pages(&self) -> u64 {
        self.zero.iter().map(|&(s, e)| (e - s) / PAGE).sum()
    }

    /// A checksum over the mappings and the present pages, in address order: each data
    /// page's address and contents, each range of zero pages' bounds.
    pub fn digest(&self) -> String {
        let mut h = crate::storage::checksum::Hasher::new();
        let mut maps = self.mappings.clone();
        maps.sort_by_key(|m| m.start);
        for m in &maps {
            h.update(m.start.to_le_bytes());
            h.update(m.pages.to_le_bytes());
            h.update([m.read_only as u8, m.huge as u8, m.shared as u8]);
        }
        let mut zero = self.zero.iter().peekable();
        for (va, page) in &self.pages {
            while let Some(&&(s, e)) = zero.peek().filter(|z| z.0 < *va) {
                h.update([b'z']);
                h.update(s.to_le_bytes());
                h.update(e.to_le_bytes());
                zero.next();
            }
            h.update([b'd']);
            h.update(va.to_le_bytes());
            h.update(page);
        }
        for &(s, e) in zero {
            h.update([b'z']);
            h.update(s.to_le_bytes());
            h.update(e.to_le_bytes());
        }
        h.hex()
    }
}

/// The chain from the first dump to `dir`, each link checked (id, pid; see
/// [`chain::resolve`]).
fn resolve_chain(dir: &Path) -> Result<Vec<(PathBuf, Manifest)>, Error> {
    Ok(chain::resolve(dir)?)
}

/// Rebuilds the process memory at dump `dir` from its chain, checking every file. The
/// work is bounded by the files: data pages by `pages.bin`, runs by `pagemap.bin`.
pub fn reconstruct(dir: &Path) -> Result<Image, Error> {
    let chain = resolve_chain(dir)?;
    let mut pages: BTreeMap<u64, Box<[u8]>> = BTreeMap::new();
    let mut zero: Vec<(u64, u64)> = Vec::new();
    for (i, (d, m)) in chain.iter().enumerate() {
        let runs = read_runs(d, m)?;
        let want = runs.iter().filter(|r| r.kind == Kind::Data).try_fold(0u64, |n, r| n.checked_add(r.pages as u64));
        if want != Some(m.counts.data) {
            return Err(invalid(d, format!("pagemap.bin's data runs do not add up to counts.data = {}", m.counts.data)));
        }
        // counts.data is bounded by read_manifest: no overflow.
        let data = read_checked(d, m, "pages.bin", m.counts.data * PAGE)?;
        if data.len() as u64 != m.counts.data * PAGE {
            return Err(invalid(d, format!("pages.bin holds {} bytes for {} data pages", data.len(), m.counts.data)));
        }
        let (mut old, old_zero) = (std::mem::take(&mut pages), std::mem::take(&mut zero));
        let mut pages_of_data = data.chunks_exact(PAGE as usize);
        for r in &runs {
            match r.kind {
                Kind::Zero => push_range(&mut zero, r.va, r.end()),
                Kind::Data => {
                    for k in 0..r.pages as u64 {
                        let page = pages_of_data.next().expect("counted above");
                        pages.insert(r.va + k * PAGE, page.into());
                    }
                }
                Kind::Parent => {
                    // Page by page through the previous data, range by range through its zero pages.
                    let mut va = r.va;
                    while va < r.end() {
                        if let Some(page) = old.remove(&va) {
                            pages.insert(va, page);
                            va += PAGE;
                        } else if let Some(stop) = range_end(&old_zero, va) {
                            let stop = stop.min(r.end());
                            push_range(&mut zero, va, stop);
                            va = stop;
                        } else {
                            let why = if i == 0 {
                                format!("page {va:#x} refers to a previous dump, but this is the first")
                            } else {
                                format!("page {va:#x} is unchanged since dump {}, which does not have it", chain[i - 1].1.id)
                            };
                            return Err(invalid(d, why));
                        }
                    }
                }
            }
        }
    }
    let (_, top) = chain.last().expect("non-empty").clone();
    Ok(Image { pid: top.pid, name: top.name.clone(), mappings: top.mappings.clone(), pages, zero, chain: chain.into_iter().map(|(_, m)| m).collect() })
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
        // Mappings in any order; a run between them, or across two, fits none.
        let maps = [map(0x10000, 2), map(0x1000, 4), map(0x5000, 1)];
        assert_eq!(decode_runs(&encode_runs(&runs), &maps).unwrap(), runs);
        for va in [0x4000, 0x8000] {
            let e = decode_runs(&encode_runs(&[Run { va, pages: 2, kind: Kind::Zero }]), &maps).unwrap_err();
            assert!(e.contains("not inside one mapping"), "{e}");
        }
    }

    /// Writes dump `dir` with id `id`, `prev` and `runs` (data pages filled with `fill`).
    fn put(dir: &Path, id: &str, prev: Option<(&Path, &str)>, maps: &[MappingRecord], runs: &[Run], fill: u8) {
        std::fs::create_dir_all(dir).unwrap();
        let data_pages: u64 = runs.iter().filter(|r| r.kind == Kind::Data).map(|r| r.pages as u64).sum();
        let (raw, data) = (encode_runs(runs), vec![fill; (data_pages * PAGE) as usize]);
        std::fs::write(dir.join("pagemap.bin"), &raw).unwrap();
        std::fs::write(dir.join("pages.bin"), &data).unwrap();
        let files = [("pagemap.bin", &raw), ("pages.bin", &data)].map(|(n, b)| (n.to_string(), crate::storage::checksum::of(b)));
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id: id.into(),
            pid: 1,
            name: "p".into(),
            prev: prev.map(|(p, id)| Ref { path: p.display().to_string(), id: id.into() }),
            mappings: maps.to_vec(),
            counts: Counts { data: data_pages, ..Counts::default() },
            checksum: crate::storage::checksum::NAME.into(),
            files: files.into_iter().collect(),
        };
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn zero_pages_are_rebuilt_as_ranges_and_unchanged_pages_taken_from_the_previous_dump() {
        let t = tempfile::tempdir().unwrap();
        let (d0, d1) = (t.path().join("d0"), t.path().join("d1"));
        // 16 TiB of zero pages from 16 bytes of pagemap.bin: kept as one range.
        let maps = [map(0x40_0000, u32::MAX as u64), map(0x1000, 4)];
        let zero = Run { va: 0x40_0000, pages: u32::MAX, kind: Kind::Zero };
        put(&d0, "a", None, &maps, &[Run { va: 0x1000, pages: 2, kind: Kind::Data }, zero], 7);
        let img = reconstruct(&d0).unwrap();
        assert_eq!((img.pages.len(), img.zero_pages()), (2, u32::MAX as u64));
        // d1: the data pages and part of the zero range unchanged, one zero page rewritten.
        let runs = [
            Run { va: 0x1000, pages: 2, kind: Kind::Parent },
            Run { va: 0x3000, pages: 1, kind: Kind::Data },
            Run { va: 0x40_0000, pages: 10, kind: Kind::Parent },
            Run { va: 0x40_a000, pages: 1, kind: Kind::Data },
            Run { va: 0x40_b000, pages: 5, kind: Kind::Parent },
        ];
        put(&d1, "b", Some((&d0, "a")), &maps, &runs, 9);
        let img = reconstruct(&d1).unwrap();
        assert_eq!(img.zero, [(0x40_0000, 0x40_a000), (0x40_b000, 0x41_0000)]);
        assert_eq!(img.pages.keys().copied().collect::<Vec<_>>(), [0x1000, 0x2000, 0x3000, 0x40_a000]);
        assert_eq!((img.pages[&0x1000][0], img.pages[&0x3000][0]), (7, 9));
        // The same memory dumped in full has the same digest.
        let full = t.path().join("full");
        let runs = [
            Run { va: 0x1000, pages: 2, kind: Kind::Data },
            Run { va: 0x40_0000, pages: 10, kind: Kind::Zero },
            Run { va: 0x40_b000, pages: 5, kind: Kind::Zero },
        ];
        put(&full, "c", None, &maps, &runs, 7);
        let mut want = reconstruct(&full).unwrap();
        assert_ne!(want.digest(), img.digest());
        want.pages.insert(0x3000, vec![9; PAGE as usize].into());
        want.pages.insert(0x40_a000, vec![9; PAGE as usize].into());
        assert_eq!(want.digest(), img.digest());
        // A page unchanged since a dump that does not have it.
        put(&d1, "b", Some((&d0, "a")), &maps, &[Run { va: 0x3000, pages: 2, kind: Kind::Parent }], 0);
        let e = reconstruct(&d1).unwrap_err().to_string();
        assert!(e.contains("page 0x3000 is unchanged since dump a, which does not have it"), "{e}");
    }

    #[test]
    fn chains_that_loop_and_too_many_mappings_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        let maps = [map(0x1000, 1)];
        put(&a, "a", Some((&a, "a")), &maps, &[], 0);
        let e = reconstruct(&a).unwrap_err().to_string();
        assert!(e.contains(&format!("its previous dump {} is already in the chain", a.display())), "{e}");
        put(&a, "a", Some((&b, "b")), &maps, &[], 0);
        put(&b, "b", Some((&a, "a")), &maps, &[], 0);
        assert!(reconstruct(&a).unwrap_err().to_string().contains("(a loop)"));
        // A copy of a dump (same id, another directory) as its own previous dump.
        put(&b, "a", None, &maps, &[], 0);
        put(&a, "a", Some((&b, "a")), &maps, &[], 0);
        let e = reconstruct(&a).unwrap_err().to_string();
        assert!(e.contains(&format!("dump {} is invalid: its previous dump {} is already in the chain", a.display(), b.display())), "{e}");
        let many: Vec<_> = (1..=65).map(|i| map(i * 0x1000, 1)).collect();
        put(&a, "a", None, &many, &[], 0);
        let e = reconstruct(&a).unwrap_err().to_string();
        assert!(e.contains("65 mappings, more than a guest process can have (64)"), "{e}");
    }
}
