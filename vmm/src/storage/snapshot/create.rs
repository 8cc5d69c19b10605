//! Writing a snapshot of the stopped VM.

use super::{state, Error, Kind, Last, Manifest, PAGE};
use crate::machine::memory::GuestMem;
use crate::storage::chain::Ref;
use crate::storage::durable::Staging;
use crate::storage::progress::Progress;
use crate::tracking::dirty_log::GpaLog;
use crate::tracking::engine::EngineKind;
use kvm_ioctls::{VcpuFd, VmFd};
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

/// What a snapshot is made of: the stopped VM, and the state its devices and its
/// tracker saved at the stop.
pub struct Source<'a> {
    pub mem: &'a GuestMem,
    pub vm: &'a VmFd,
    /// Mutable because KVM must complete a pending I/O exit before its state is read.
    pub vcpu: &'a mut VcpuFd,
    /// The guest-physical dirty log: harvested to choose a diff's pages, re-armed once
    /// the snapshot is on disk (so the next diff is relative to this snapshot).
    pub log: &'a mut GpaLog,
    /// The engine the VM tracks with (a restore uses the same).
    pub engine: EngineKind,
    /// The tracker's own state, saved as section "tracker".
    pub tracker_state: Vec<u8>,
    /// The devices' state, saved as section "serial".
    pub device_state: &'a [u8],
    /// SHA-256 of the guest image (see [`super::sha256_hex`]).
    pub image_sha256: &'a str,
}

/// Writes a snapshot of the stopped VM to `out` (which must not exist): a full one, or
/// with `base` (the last snapshot this VM wrote or was restored from: the dirty log
/// counts from there) a diff holding the pages written since. The dirty information is
/// consumed only once the snapshot is on disk: a failed snapshot loses nothing. Returns
/// what was written and the snapshot as the base of the next diff.
pub fn create(src: Source, base: Option<&Last>, out: &Path, progress: &Progress) -> Result<(Report, Last), Error> {
    let t0 = std::time::Instant::now();
    let diff = base.is_some();
    let id = crate::storage::chain::new_id();
    let stage = Staging::new(out, &id)?;
    let mut phases = Phases::default();
    let mut lap = std::time::Instant::now();
    let mut mark = |slot: &mut u64| {
        *slot += lap.elapsed().as_nanos() as u64;
        lap = std::time::Instant::now();
    };
    let Source { mem, vm, vcpu, log, engine, tracker_state, device_state, image_sha256 } = src;
    let mem_bytes = vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1;
    let mut sections = state::capture(vm, vcpu)?;
    sections.insert("tracker".into(), tracker_state);
    sections.insert("serial".into(), device_state.to_vec());
    mark(&mut phases.state_ns);
    log.harvest(mem)?;
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
        let written = crate::machine::memory::with_stopped_guest_bytes(mem, first * PAGE, n * PAGE as usize, |run| {
            write_run(run, first, diff, &f, &mut seq, &mut hasher, &mem_path)
        })
        .map_err(|e| super::io(&mem_path)(std::io::Error::other(e.to_string())))??;
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
    let base = base.map(|b| Ref { path: b.path.display().to_string(), id: b.id.clone() });
    let manifest = Manifest::new(id.clone(), kind, base, mem_bytes, engine, image_sha256.to_string(), pages, files);
    stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    stage.commit()?;
    mark(&mut phases.sync_ns);

    // Only now is the dirty information consumed.
    log.snapshot_start()?;
    mark(&mut phases.rearm_ns);
    let last = Last::at(out, &id);
    let bytes = std::fs::metadata(out.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
    let disk_bytes = crate::storage::durable::disk_usage(out);
    Ok((Report { id, kind, pages, bytes, disk_bytes, pause_ns: t0.elapsed().as_nanos() as u64, phases }, last))
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
    hasher.update(run);
    let n = run.len() / PAGE as usize;
    if diff {
        seq.write_all(run).map_err(crate::storage::durable::io(path))?;
        return Ok(n as u64);
    }
    let mut pages = 0;
    for (start, count, zero) in crate::machine::memory::zero_runs(run) {
        if zero {
            continue;
        }
        f.write_all_at(&run[start * PAGE as usize..(start + count) * PAGE as usize], (first + start as u64) * PAGE)
            .map_err(crate::storage::durable::io(path))?;
        pages += count as u64;
    }
    Ok(pages)
}
