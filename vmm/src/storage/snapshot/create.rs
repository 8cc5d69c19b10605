//! Writing a snapshot of the stopped VM.

use super::{state, Error, Kind, Last, Manifest, BaseRef, FORMAT, PAGE, VERSION};
use crate::storage::durable::Staging;
use crate::storage::progress::Progress;
use crate::vcpu::runner::VcpuContext;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Most pages moved at once (1 MiB).
const RUN_PAGES: usize = 256;

/// What `create` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub kind: Kind,
    pub pages: u64,
    pub bytes: u64,
    /// Space the snapshot takes on disk (a full image is sparse).
    pub disk_bytes: u64,
    pub pause_ns: u64,
    /// Where the pause went.
    pub phases: Phases,
}

/// A snapshot's pause, by phase (ns). Memory I/O is `memory_ns` + `sync_ns`; the
/// rest is bookkeeping.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Phases {
    /// vCPU, VM and engine state.
    pub state_ns: u64,
    /// Collecting the dirty log and choosing the frames.
    pub select_ns: u64,
    /// Reading, hashing and writing the pages.
    pub memory_ns: u64,
    /// fsync of every file and the directory, and the rename.
    pub sync_ns: u64,
    /// Re-arming the dirty log for the next diff.
    pub rearm_ns: u64,
}

/// Writes a snapshot of the stopped VM to `out` (which must not exist). A diff holds
/// the pages written since the previous snapshot of this VM. The dirty information is
/// consumed only once the snapshot is on disk: a failed snapshot loses nothing.
pub fn create(ctx: &mut VcpuContext, out: &Path, diff: bool, progress: &Progress) -> Result<Report, Error> {
    let t0 = std::time::Instant::now();
    let base = if diff { Some(ctx.last_snapshot.clone().ok_or(Error::NoBase)?) } else { None };
    let id = super::new_id();
    let stage = Staging::new(out, &id)?;
    let mut phases = Phases::default();
    let mut lap = std::time::Instant::now();
    let mut mark = |slot: &mut u64| {
        *slot += lap.elapsed().as_nanos() as u64;
        lap = std::time::Instant::now();
    };
    let mem_bytes = vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1;
    let mut sections = state::capture(&ctx.vm, &mut ctx.vcpu)?;
    sections.insert("tracker".into(), ctx.tracker.export_state());
    sections.insert("serial".into(), ctx.device_state.clone());
    mark(&mut phases.state_ns);
    let log = &mut ctx.tracker.log;
    log.harvest(&ctx.mem)?;
    let frames: Vec<u64> = (0..mem_bytes / PAGE).filter(|&pfn| !diff || log.in_snapshot(pfn)).collect();
    progress.start(frames.len() as u64 * PAGE);
    mark(&mut phases.select_ns);

    let mut files = BTreeMap::new();
    let state_bin = state::encode(&sections);
    files.insert("state.bin".to_string(), crate::storage::checksum::of(&state_bin));
    stage.write("state.bin", &state_bin)?;

    let mem_path = stage.file("memory.bin");
    let f = std::fs::File::create(&mem_path).map_err(crate::storage::durable::io(&mem_path))?;
    let mut hasher = crate::storage::checksum::Hasher::new();
    let mut pages = 0u64;
    // Pages move in runs of consecutive frames (up to 1 MiB), read in place from guest
    // memory: one hash update and one write per run. Diffs are written sequentially
    // through a buffer; a full image by position, so that zero pages stay holes.
    let mut seq = std::io::BufWriter::with_capacity(1 << 20, &f);
    let mut i = 0;
    while i < frames.len() {
        let first = frames[i];
        let mut n = 1;
        while i + n < frames.len() && n < RUN_PAGES && frames[i + n] == first + n as u64 {
            n += 1;
        }
        let written = crate::machine::memory::with_stopped_guest_bytes(&ctx.mem, first * PAGE, n * PAGE as usize, |run| {
            write_run(run, first, diff, &f, &mut seq, &mut hasher, &mem_path)
        })
        .map_err(|e| Error::Io { path: mem_path.clone(), source: std::io::Error::other(e.to_string()) })??;
        pages += written;
        progress.advance(n as u64 * PAGE);
        i += n;
    }
    seq.flush().map_err(crate::storage::durable::io(&mem_path))?;
    drop(seq);
    if !diff {
        f.set_len(mem_bytes).map_err(crate::storage::durable::io(&mem_path))?;
    }
    mark(&mut phases.memory_ns);
    f.sync_all().map_err(crate::storage::durable::io(&mem_path))?;
    files.insert("memory.bin".to_string(), hasher.hex());
    if diff {
        let bytes: Vec<u8> = frames.iter().flat_map(|p| p.to_le_bytes()).collect();
        files.insert("pages.bin".to_string(), crate::storage::checksum::of(&bytes));
        stage.write("pages.bin", &bytes)?;
    }
    let kind = if diff { Kind::Diff } else { Kind::Full };
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        id: id.clone(),
        kind,
        base: base.as_ref().map(|b| BaseRef { path: b.path.display().to_string(), id: b.id.clone() }),
        mem_bytes,
        engine: ctx.tracker.engine(),
        image_sha256: ctx.image_sha256.clone(),
        pages,
        checksum: crate::storage::checksum::NAME.into(),
        files,
        merged: Vec::new(),
    };
    stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    stage.commit()?;
    mark(&mut phases.sync_ns);

    // Only now is the dirty information consumed.
    ctx.tracker.log.snapshot_start()?;
    mark(&mut phases.rearm_ns);
    let abs = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    ctx.last_snapshot = Some(Last { path: abs, id: id.clone() });
    let bytes = std::fs::metadata(out.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
    let disk_bytes = crate::storage::durable::disk_usage(out);
    Ok(Report { id, kind, pages, bytes, disk_bytes, pause_ns: t0.elapsed().as_nanos() as u64, phases })
}

/// Hashes and writes one run of consecutive frames starting at `first`; returns the
/// pages written. A full image hashes as the whole RAM (its holes read as zeros) and
/// writes non-zero pages at their offsets; a diff appends every page.
fn write_run(
    run: &[u8],
    first: u64,
    diff: bool,
    f: &std::fs::File,
    seq: &mut impl Write,
    hasher: &mut crate::storage::checksum::Hasher,
    path: &Path,
) -> Result<u64, Error> {
    static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
    hasher.update(run);
    let n = run.len() / PAGE as usize;
    if diff {
        seq.write_all(run).map_err(crate::storage::durable::io(path))?;
        return Ok(n as u64);
    }
    let is_zero = |k: usize| run[k * PAGE as usize..(k + 1) * PAGE as usize] == ZERO;
    let (mut k, mut pages) = (0, 0);
    while k < n {
        if is_zero(k) {
            k += 1;
            continue;
        }
        let start = k;
        while k < n && !is_zero(k) {
            k += 1;
        }
        f.write_all_at(&run[start * PAGE as usize..k * PAGE as usize], (first + start as u64) * PAGE)
            .map_err(crate::storage::durable::io(path))?;
        pages += (k - start) as u64;
    }
    Ok(pages)
}
