//! Writing a snapshot of the stopped VM.

use super::{hex, state, Error, Kind, Last, Manifest, BaseRef, FORMAT, PAGE, VERSION};
use crate::durable::Staging;
use crate::progress::Progress;
use crate::runner::VcpuContext;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::{Bytes, GuestAddress};

/// What `create` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub id: String,
    pub kind: Kind,
    pub pages: u64,
    pub bytes: u64,
    pub pause_ns: u64,
}

/// Writes a snapshot of the stopped VM to `out` (which must not exist). A diff holds
/// the pages written since the previous snapshot of this VM. The dirty information is
/// consumed only once the snapshot is on disk: a failed snapshot loses nothing.
pub fn create(ctx: &mut VcpuContext, out: &Path, diff: bool, progress: &Progress) -> Result<Report, Error> {
    let t0 = std::time::Instant::now();
    let base = if diff { Some(ctx.last_snapshot.clone().ok_or(Error::NoBase)?) } else { None };
    let id = super::new_id();
    let stage = Staging::new(out, &id)?;
    let mem_bytes = vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1;
    let mut sections = state::capture(&ctx.vm, &mut ctx.vcpu)?;
    sections.insert("tracker".into(), ctx.tracker.export_state());
    let log = &mut ctx.tracker.log;
    log.harvest(&ctx.vm, &ctx.mem)?;
    let frames: Vec<u64> = (0..mem_bytes / PAGE).filter(|&pfn| !diff || log.in_snapshot(pfn)).collect();
    progress.start(frames.len() as u64 * PAGE);

    let mut files = BTreeMap::new();
    let state_bin = state::encode(&sections);
    files.insert("state.bin".to_string(), super::sha256_hex(&state_bin));
    stage.write("state.bin", &state_bin)?;

    let mem_path = stage.file("memory.bin");
    let f = std::fs::File::create(&mem_path).map_err(crate::durable::io(&mem_path))?;
    let mut hasher = Sha256::new();
    let mut pages = 0u64;
    let mut page = [0u8; PAGE as usize];
    static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
    // Diffs are written sequentially through a buffer; a full image by position, so
    // that zero pages stay holes.
    let mut seq = std::io::BufWriter::with_capacity(1 << 20, &f);
    for &pfn in &frames {
        ctx.mem
            .read_slice(&mut page, GuestAddress(pfn * PAGE))
            .map_err(|e| Error::Io { path: mem_path.clone(), source: std::io::Error::other(e.to_string()) })?;
        // A full image hashes as the whole RAM (its holes read as zeros).
        hasher.update(page);
        if diff {
            seq.write_all(&page).map_err(crate::durable::io(&mem_path))?;
            pages += 1;
        } else if page != ZERO {
            f.write_all_at(&page, pfn * PAGE).map_err(crate::durable::io(&mem_path))?;
            pages += 1;
        }
        progress.advance(PAGE);
    }
    seq.flush().map_err(crate::durable::io(&mem_path))?;
    drop(seq);
    if !diff {
        f.set_len(mem_bytes).map_err(crate::durable::io(&mem_path))?;
    }
    f.sync_all().map_err(crate::durable::io(&mem_path))?;
    files.insert("memory.bin".to_string(), hex(&hasher.finalize()));
    if diff {
        let bytes: Vec<u8> = frames.iter().flat_map(|p| p.to_le_bytes()).collect();
        files.insert("pages.bin".to_string(), super::sha256_hex(&bytes));
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
        files,
        merged: Vec::new(),
    };
    stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    stage.commit()?;

    // Only now is the dirty information consumed.
    ctx.tracker.log.snapshot_start(&ctx.vm)?;
    let abs = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
    ctx.last_snapshot = Some(Last { path: abs, id: id.clone() });
    let bytes = std::fs::metadata(out.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
    Ok(Report { id, kind, pages, bytes, pause_ns: t0.elapsed().as_nanos() as u64 })
}
