//! A full snapshot written while the guest runs (`vmm snapshot create --live`): memory
//! goes into the image frame by frame, in as many passes as pre-copy needs, and only
//! the last dirty set and the state are written with the guest stopped. The result is
//! an ordinary full snapshot, byte for byte what [`super::create`] would have written
//! at the moment of the stop: same files, same checksums, restorable and verifiable.
//!
//! The image is hashed (and its pages counted) by reading it back once the guest runs
//! again, so neither costs pause time.

use super::{state, Error, Kind, Last, Manifest, Sections, PAGE};
use crate::storage::durable::{self, Staging};
use crate::tracking::engine::EngineKind;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// A full snapshot being written.
pub struct LiveFull {
    id: String,
    stage: Staging,
    out: PathBuf,
    file: File,
    mem_path: PathBuf,
    mem_bytes: u64,
}

/// What the stopped guest adds: its state, and what names the snapshot's guest.
pub struct Stop {
    pub sections: Sections,
    pub engine: EngineKind,
    pub image_sha256: String,
}

impl LiveFull {
    /// Starts a full snapshot of a guest of `mem_bytes` at `out` (which must not exist).
    pub fn start(out: &Path, mem_bytes: u64) -> Result<LiveFull, Error> {
        let id = crate::storage::chain::new_id();
        let stage = Staging::new(out, &id)?;
        let mem_path = stage.file("memory.bin");
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&mem_path).map_err(durable::io(&mem_path))?;
        file.set_len(mem_bytes).map_err(durable::io(&mem_path))?;
        Ok(LiveFull { id, stage, out: out.to_path_buf(), file, mem_path, mem_bytes })
    }

    /// Writes `bytes` (whole pages) as the frames from `pfn` on.
    pub fn write(&self, pfn: u64, bytes: &[u8]) -> Result<(), Error> {
        let end = pfn * PAGE + bytes.len() as u64;
        assert!(end <= self.mem_bytes && (bytes.len() as u64).is_multiple_of(PAGE), "frames inside guest RAM");
        Ok(self.file.write_all_at(bytes, pfn * PAGE).map_err(durable::io(&self.mem_path))?)
    }

    /// The guest stopped and its last frames are written: the state goes in, the image
    /// is hashed, everything is synced and the directory committed. Returns the
    /// manifest's page count, the image's size and the snapshot as the base of the next
    /// diff.
    pub fn finish(self, stop: Stop) -> Result<(u64, Last), Error> {
        let LiveFull { id, stage, out, file, mem_path, mem_bytes } = self;
        let (hash, pages) = hash_image(&file, &mem_path, mem_bytes)?;
        file.sync_all().map_err(durable::io(&mem_path))?;
        let mut files = BTreeMap::new();
        files.insert("memory.bin".to_string(), hash);
        let state_bin = state::encode(&stop.sections);
        files.insert("state.bin".to_string(), crate::storage::checksum::of(&state_bin));
        stage.write("state.bin", &state_bin)?;
        let manifest = Manifest::new(id.clone(), Kind::Full, None, mem_bytes, stop.engine, stop.image_sha256, pages, files);
        stage.write("manifest.json", &serde_json::to_vec_pretty(&manifest).expect("manifest serializes"))?;
        stage.commit()?;
        Ok((pages, Last::at(&out, &id)))
    }
}

/// The image's checksum (over all of guest RAM, holes reading as zeros, as `create`
/// hashes it) and its count of non-zero pages.
fn hash_image(file: &File, path: &Path, mem_bytes: u64) -> Result<(String, u64), Error> {
    let mut hasher = crate::storage::checksum::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let (mut done, mut pages) = (0u64, 0u64);
    while done < mem_bytes {
        let n = (mem_bytes - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], done).map_err(durable::io(path))?;
        hasher.update(&buf[..n]);
        pages += crate::machine::memory::zero_runs(&buf[..n]).iter().filter(|r| !r.2).map(|r| r.1 as u64).sum::<u64>();
        done += n as u64;
    }
    Ok((hasher.hex(), pages))
}
