//! Folding a diff into its base: `vmm snapshot merge DIR --into BASE`.
//!
//! The result replaces BASE atomically and *is* DIR's point in time: DIR's id, vCPU
//! state and engine state, BASE's kind and base, memory = BASE overlaid with DIR's
//! pages. It lists the ids folded into it (`merged`), so later diffs built on DIR still
//! find their base: following a link to DIR, whose own base now carries DIR's id, the
//! chain takes the merged snapshot instead (see [`super::resolve_chain`] and `Manifest`'s `follow`). Merging again
//! (`merge D2 --into BASE`) rolls the base forward. DIR itself is left alone.

use super::{invalid, read_checked, read_diff_pages, read_full_memory, read_manifest, Error, Kind, Manifest, PAGE};
use crate::storage::durable::Staging;
use crate::storage::progress::Progress;
use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What `merge` wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Merged {
    pub id: String,
    pub kind: Kind,
    pub pages: u64,
    pub bytes: u64,
}

/// Page `i` of pages stored back to back.
fn page_of(data: &[u8], i: usize) -> &[u8] {
    &data[i * PAGE as usize..(i + 1) * PAGE as usize]
}

fn refuse(dir: &Path, into: &Path, why: impl Into<String>) -> Error {
    Error::Merge { dir: dir.to_path_buf(), into: into.to_path_buf(), why: why.into() }
}

/// Folds diff `dir` into `into`, its base. Both are fully checked first; on any
/// failure `into` is untouched.
pub fn merge(dir: &Path, into: &Path, progress: &Progress) -> Result<Merged, Error> {
    let top = read_manifest(dir)?;
    let base = read_manifest(into)?;
    let Some(link) = &top.base else {
        return Err(refuse(dir, into, "it is a full snapshot; only a diff can be merged into its base"));
    };
    if link.id != base.id {
        return Err(refuse(dir, into, format!("its base is snapshot {}, but {} is snapshot {}", link.id, into.display(), base.id)));
    }
    if top.mem_bytes != base.mem_bytes || top.image_sha256 != base.image_sha256 {
        return Err(refuse(dir, into, "guest size or image differ"));
    }
    let (top_pfns, top_data) = read_diff_pages(dir, &top)?;
    let state = read_checked(dir, &top, "state.bin", super::STATE_LIMIT)?;
    let id = crate::storage::chain::new_id();
    let stage = Staging::replacing(into, &id)?;
    let mem_path = stage.file("memory.bin");
    let f = std::fs::File::create(&mem_path).map_err(crate::storage::durable::io(&mem_path))?;
    let mut hasher = crate::storage::checksum::Hasher::new();
    let (pages, pfns) = match base.kind {
        Kind::Full => {
            progress.start(base.mem_bytes);
            let mut next = 0usize; // the first of DIR's pages not yet laid over
            let mut written = 0u64;
            static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
            read_full_memory(into, &base, |off, chunk| {
                let mut chunk = chunk.to_vec();
                let end = off + chunk.len() as u64;
                while next < top_pfns.len() && top_pfns[next] * PAGE < end {
                    let at = (top_pfns[next] * PAGE - off) as usize;
                    chunk[at..at + PAGE as usize].copy_from_slice(page_of(&top_data, next));
                    next += 1;
                }
                hasher.update(&chunk);
                for (i, page) in chunk.chunks(PAGE as usize).enumerate() {
                    if page != ZERO {
                        f.write_all_at(page, off + (i as u64) * PAGE).map_err(crate::storage::durable::io(&mem_path))?;
                        written += 1;
                    }
                }
                progress.advance(chunk.len() as u64);
                Ok(())
            })?;
            f.set_len(base.mem_bytes).map_err(crate::storage::durable::io(&mem_path))?;
            (written, None)
        }
        Kind::Diff => {
            let (base_pfns, base_data) = read_diff_pages(into, &base)?;
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &f);
            let (mut i, mut j) = (0usize, 0usize);
            let mut pfns = Vec::with_capacity(base_pfns.len() + top_pfns.len());
            progress.start((base_pfns.len() + top_pfns.len()) as u64 * PAGE);
            while i < base_pfns.len() || j < top_pfns.len() {
                // DIR's page wins where both have one.
                let take_top = j < top_pfns.len() && (i >= base_pfns.len() || top_pfns[j] <= base_pfns[i]);
                let (pfn, page) = if take_top {
                    if i < base_pfns.len() && base_pfns[i] == top_pfns[j] {
                        i += 1;
                    }
                    j += 1;
                    (top_pfns[j - 1], page_of(&top_data, j - 1))
                } else {
                    i += 1;
                    (base_pfns[i - 1], page_of(&base_data, i - 1))
                };
                hasher.update(page);
                out.write_all(page).map_err(crate::storage::durable::io(&mem_path))?;
                pfns.push(pfn);
                progress.advance(PAGE);
            }
            out.flush().map_err(crate::storage::durable::io(&mem_path))?;
            (pfns.len() as u64, Some(pfns))
        }
    };
    f.sync_all().map_err(crate::storage::durable::io(&mem_path))?;
    let mut files = std::collections::BTreeMap::new();
    files.insert("memory.bin".to_string(), hasher.hex());
    files.insert("state.bin".to_string(), crate::storage::checksum::of(&state));
    stage.write("state.bin", &state)?;
    if let Some(pfns) = pfns {
        let raw: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        files.insert("pages.bin".to_string(), crate::storage::checksum::of(&raw));
        stage.write("pages.bin", &raw)?;
    }
    let mut merged = base.merged.clone();
    merged.push(base.id.clone());
    let manifest = Manifest { id: top.id.clone(), kind: base.kind, base: base.base.clone(), engine: top.engine, pages, files, merged, ..base };
    stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
    if read_manifest(into)?.id != manifest.merged.last().cloned().unwrap_or_default() {
        return Err(invalid(into, "changed while it was being merged into"));
    }
    stage.replace()?;
    let bytes = std::fs::metadata(into.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
    Ok(Merged { id: manifest.id, kind: manifest.kind, pages, bytes })
}
