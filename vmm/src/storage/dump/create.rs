//! Writing a dump of one process, with the guest stopped.

use super::{encode_runs, read_manifest, Counts, Error, Kind, Manifest, MappingRecord, Run, FORMAT, PAGE, VERSION};
use crate::machine::memory::GuestMem;
use crate::storage::chain::Ref;
use crate::storage::durable::{io, Staging};
use crate::storage::progress::Progress;
use crate::tracking::softdirty::{ClearRefs, PageInfo, Tracker};
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

/// The latest dump of a pid by this VMM: the only valid `--prev` for its next dump.
#[derive(Debug, Clone)]
pub struct Last {
    pub path: PathBuf,
    pub id: String,
    /// The pid's soft-dirty clear count right after that dump's own clear.
    pub clears: u64,
}

/// What `create` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub pid: u32,
    pub counts: Counts,
    /// Data pages written (`counts.data`).
    pub pages: u64,
    /// Bytes of page data written.
    pub bytes: u64,
    /// Space the dump takes on disk.
    pub disk_bytes: u64,
    pub pause_ns: u64,
}

fn bad_prev(prev: &Path, why: impl Into<String>) -> Error {
    Error::BadPrev { prev: prev.to_path_buf(), why: why.into() }
}

/// What a dump reads: the stopped guest and its tracker (the process table, the
/// pagemap, the soft-dirty bits it clears after the dump).
pub struct Source<'a> {
    pub mem: &'a GuestMem,
    pub vcpu: &'a VcpuFd,
    pub tracker: &'a mut Tracker,
}

/// Checks that `prev` is `latest`, the latest dump of `pid` by this VMM, with no
/// soft-dirty clear since, and returns its reference and the addresses it holds pages for.
fn check_prev(tracker: &Tracker, latest: Option<&Last>, pid: u32, prev: &Path) -> Result<(Ref, Vec<(u64, u64)>), Error> {
    let pm = read_manifest(prev).map_err(|e| bad_prev(prev, e.to_string()))?;
    if pm.pid != pid {
        return Err(bad_prev(prev, format!("it is a dump of pid {}, not of pid {pid}", pm.pid)));
    }
    let last = latest.ok_or_else(|| {
        bad_prev(prev, format!("this VMM has not dumped pid {pid}, so soft-dirty says nothing about what changed since; dump it without --prev first"))
    })?;
    if last.id != pm.id {
        return Err(bad_prev(prev, format!("it is dump {}, but the latest dump of pid {pid} is {} ({})", pm.id, last.id, last.path.display())));
    }
    if tracker.clears_of(pid) != last.clears {
        return Err(bad_prev(prev, format!(
            "pid {pid}'s soft-dirty bits were cleared (clear-refs) after that dump, so what changed since is unknown; dump without --prev"
        )));
    }
    let runs = super::read_runs(prev, &pm).map_err(|e| bad_prev(prev, e.to_string()))?;
    let held = runs.iter().map(|r| (r.va, r.end())).collect();
    Ok((Ref { path: last.path.display().to_string(), id: pm.id }, held))
}

/// Dumps `pid` into `out` (which must not exist): every present page, or with `prev`
/// only those soft-dirty since. `prev` must be `latest`, the latest dump of `pid` by
/// this VMM. Then clears the pid's soft-dirty bits for the next round; nothing is
/// cleared if the dump fails. Returns what was written and the dump as the only valid
/// `prev` of the pid's next one.
pub fn create(mut src: Source, pid: u32, out: &Path, prev: Option<&Path>, latest: Option<&Last>, progress: &Progress) -> Result<(Report, Last), Error> {
    let t0 = std::time::Instant::now();
    let (report, path) = write(&mut src, latest, pid, out, prev, progress)?;
    let Source { mem, vcpu, tracker } = src;
    tracker.clear_refs(mem, vcpu, pid, ClearRefs::SoftDirty).map_err(|e| Error::Guest {
        pid,
        why: format!("dump {} was written, but clearing soft-dirty failed ({e}); the next dump must be a full one", report.id),
    })?;
    let last = Last { path, id: report.id.clone(), clears: tracker.clears_of(pid) };
    Ok((Report { pause_ns: t0.elapsed().as_nanos() as u64, ..report }, last))
}

fn write(
    src: &mut Source,
    latest: Option<&Last>,
    pid: u32,
    out: &Path,
    prev: Option<&Path>,
    progress: &Progress,
) -> Result<(Report, PathBuf), Error> {
    let Source { mem, tracker, .. } = src;
    let (prev_ref, held) = match prev {
        Some(p) => {
            let (r, h) = check_prev(tracker, latest, pid, p)?;
            (Some(r), h)
        }
        None => (None, Vec::new()),
    };
    let in_prev = |va: u64| {
        let i = held.partition_point(|&(_, end)| end <= va);
        held.get(i).is_some_and(|&(s, _)| s <= va)
    };
    let snap = tracker.snapshot(*mem)?;
    let mut pages: Vec<PageInfo> = tracker.pagemap(*mem, pid, None)?;
    pages.sort_unstable_by_key(|p| p.addr);
    let proc = snap.by_pid(pid).ok_or(crate::tracking::softdirty::Error::UnknownPid(pid))?;
    let mut mappings: Vec<MappingRecord> = proc
        .mappings
        .iter()
        .map(|m| MappingRecord { start: m.start, pages: m.pages, read_only: m.read_only, huge: m.huge, shared: m.shared })
        .collect();
    mappings.sort_by_key(|m| m.start);
    let zero = snap.zero_frame / PAGE;
    let huge_zero = (snap.huge_zero_frame != 0).then(|| snap.huge_zero_frame / PAGE..snap.huge_zero_frame / PAGE + 512);

    // Classify every page, mapping by mapping (runs never cross a mapping's edge).
    // Both `mappings` and `pages` are in address order: one cursor walks the pages.
    let mut cursor = 0usize;
    let mut runs: Vec<Run> = Vec::new();
    let mut data_pfns: Vec<(u64, u64)> = Vec::new(); // (va, pfn)
    let mut counts = Counts::default();
    for m in &mappings {
        let mut open: Option<Run> = None;
        for k in 0..m.pages {
            let va = m.start + k * PAGE;
            while cursor < pages.len() && pages[cursor].addr < va {
                cursor += 1;
            }
            let page = pages.get(cursor).filter(|p| p.addr == va);
            let kind = match page.filter(|p| p.entry.is_present()).and_then(|p| p.entry.pfn().map(|f| (p, f))) {
                None => None,
                Some((_, pfn)) if pfn == zero || huge_zero.as_ref().is_some_and(|z| z.contains(&pfn)) => Some(Kind::Zero),
                Some((p, pfn)) => {
                    if prev_ref.is_none() || m.shared || p.entry.soft_dirty() || !in_prev(va) {
                        data_pfns.push((va, pfn));
                        Some(Kind::Data)
                    } else {
                        Some(Kind::Parent)
                    }
                }
            };
            match kind {
                None => counts.absent += 1,
                Some(Kind::Zero) => counts.zero += 1,
                Some(Kind::Data) => counts.data += 1,
                Some(Kind::Parent) => counts.parent += 1,
            }
            match (&mut open, kind) {
                (Some(r), Some(kind)) if r.kind == kind && r.va + r.pages as u64 * PAGE == va && r.pages < u32::MAX => r.pages += 1,
                (_, kind) => {
                    runs.extend(open.take());
                    open = kind.map(|kind| Run { va, pages: 1, kind });
                }
            }
        }
        runs.extend(open);
    }

    let id = crate::storage::chain::new_id();
    let stage = Staging::new(out, &id)?;
    progress.start(data_pfns.len() as u64 * PAGE);
    let pages_path = stage.file("pages.bin");
    let f = std::fs::File::create(&pages_path).map_err(io(&pages_path))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, &f);
    let mut hasher = crate::storage::checksum::Hasher::new();
    let mut page = [0u8; PAGE as usize];
    for &(va, pfn) in &data_pfns {
        mem.read_slice(&mut page, GuestAddress(pfn.saturating_mul(PAGE))).map_err(|_| Error::Guest {
            pid,
            why: format!("page {va:#x} maps frame {pfn:#x}, outside guest memory"),
        })?;
        hasher.update(page);
        w.write_all(&page).map_err(io(&pages_path))?;
        progress.advance(PAGE);
    }
    w.flush().map_err(io(&pages_path))?;
    drop(w);
    f.sync_all().map_err(io(&pages_path))?;
    let runs_raw = encode_runs(&runs);
    let mut files = std::collections::BTreeMap::new();
    files.insert("pages.bin".to_string(), hasher.hex());
    files.insert("pagemap.bin".to_string(), crate::storage::checksum::of(&runs_raw));
    stage.write("pagemap.bin", &runs_raw)?;
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: id.clone(),
        pid,
        name: proc.name.clone(),
        prev: prev_ref,
        mappings,
        counts: counts.clone(),
        checksum: crate::storage::checksum::NAME.into(),
        files,
    };
    stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    stage.commit()?;
    let path = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    let disk_bytes = crate::storage::durable::disk_usage(out);
    Ok((Report { id, pid, counts, pages: data_pfns.len() as u64, bytes: data_pfns.len() as u64 * PAGE, disk_bytes, pause_ns: 0 }, path))
}
