//! Full and diff snapshots of the whole VM, and restoring them (docs/snapshots.md).
//!
//! A snapshot is a directory:
//!
//! ```text
//! DIR/manifest.json   format, version, id, kind (full|diff), base {path, id}, guest size,
//!                     engine, guest image sha256, page count, sha256 of every file
//! DIR/state.bin       vCPU and VM state: tagged sections of KVM's own structs
//! DIR/memory.bin      full: guest RAM as one sparse file (zero pages are holes)
//!                     diff: the pages written since the base, in pfn order
//! DIR/pages.bin       diff only: their frame numbers, u64 little endian
//! ```
//!
//! Writing is transactional: everything goes to `DIR.tmp-<id>`, is fsynced, and the
//! directory is renamed into place; a failure leaves no DIR and the dirty information
//! for the next diff intact. Reading checks format, version, sizes and every checksum,
//! and a diff's base id, before a byte is used.

use crate::engine::EngineKind;
use crate::memory::GuestMem;
use crate::runner::VcpuContext;
use kvm_bindings::{kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress};

pub const FORMAT: &str = "softdirty-vmm-snapshot";
pub const VERSION: u32 = 1;
const PAGE: u64 = 4096;
/// MSRs saved besides what the sregs carry: APIC base, TSC, kernel GS base.
const MSRS: [u32; 3] = [0x1b, 0x10, 0xc000_0102];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0} already exists; snapshots never overwrite")]
    Exists(PathBuf),
    #[error("snapshot {path} is invalid: {why}")]
    Invalid { path: PathBuf, why: String },
    #[error("no base snapshot: create a full snapshot of this VM first")]
    NoBase,
    #[error("KVM {op} failed: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
    #[error(transparent)]
    Log(#[from] crate::dirty_log::Error),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Kvm { op, source })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Diff,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRef {
    pub path: String,
    pub id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub id: String,
    pub kind: Kind,
    pub base: Option<BaseRef>,
    pub mem_bytes: u64,
    pub engine: EngineKind,
    pub image_sha256: String,
    pub pages: u64,
    pub files: BTreeMap<String, String>,
}

/// The last snapshot written by this VM (the base of the next diff).
#[derive(Debug, Clone)]
pub struct Last {
    pub path: PathBuf,
    pub id: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Bytes of a plain-data KVM struct.
fn pod<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is one of KVM's repr(C) integer structs; reading its bytes is defined.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

/// A plain-data KVM struct back from bytes (size-checked; any bit pattern is valid).
fn from_pod<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: sizes are equal and T consists of integers only.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len()) };
    Some(v)
}

const TAGS: [&str; 11] =
    ["regs", "sregs", "fpu", "lapic", "events", "debugregs", "msrs", "pic0", "pic1", "ioapic", "clock"];

/// Saved sections by name.
type Sections = BTreeMap<String, Vec<u8>>;

fn encode(s: &Sections) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in s {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        out.extend(data);
    }
    out
}

fn decode(b: &[u8]) -> Option<Sections> {
    let mut s = Sections::new();
    let mut i = 0usize;
    while i < b.len() {
        let n = u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(b.get(i + 4..i + 4 + n)?).ok()?.to_string();
        i += 4 + n;
        let len = usize::try_from(u64::from_le_bytes(b.get(i..i + 8)?.try_into().ok()?)).ok()?;
        i += 8;
        s.insert(name, b.get(i..i.checked_add(len)?)?.to_vec());
        i += len;
    }
    Some(s)
}

/// Captures vCPU and VM state. First completes any pending I/O exit (KVM finishes an
/// `out` only on the next KVM_RUN), as KVM requires before saving state.
fn capture(vm: &VmFd, vcpu: &mut VcpuFd) -> Result<Sections, Error> {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    let mut s = Sections::new();
    s.insert("regs".into(), pod(&kvm("GET_REGS", vcpu.get_regs())?));
    s.insert("sregs".into(), pod(&kvm("GET_SREGS", vcpu.get_sregs())?));
    s.insert("fpu".into(), pod(&kvm("GET_FPU", vcpu.get_fpu())?));
    s.insert("lapic".into(), pod(&kvm("GET_LAPIC", vcpu.get_lapic())?));
    s.insert("events".into(), pod(&kvm("GET_VCPU_EVENTS", vcpu.get_vcpu_events())?));
    s.insert("debugregs".into(), pod(&kvm("GET_DEBUGREGS", vcpu.get_debug_regs())?));
    let entries: Vec<kvm_msr_entry> = MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).expect("3 entries fit");
    kvm("GET_MSRS", vcpu.get_msrs(&mut msrs))?;
    s.insert("msrs".into(), msrs.as_slice().iter().flat_map(|e| [e.index as u64, e.data]).flat_map(u64::to_le_bytes).collect());
    for (name, chip) in [("pic0", 0), ("pic1", 1), ("ioapic", 2)] {
        let mut c = kvm_irqchip { chip_id: chip, ..Default::default() };
        kvm("GET_IRQCHIP", vm.get_irqchip(&mut c))?;
        s.insert(name.into(), pod(&c));
    }
    s.insert("clock".into(), pod(&kvm("GET_CLOCK", vm.get_clock())?));
    Ok(s)
}

/// Puts captured state into a fresh VM and vCPU.
pub fn apply(vm: &VmFd, vcpu: &VcpuFd, s: &Sections) -> Result<(), Error> {
    let bad = |what: &str| Error::Invalid { path: PathBuf::new(), why: format!("state section '{what}' is malformed") };
    let get = |name: &str| s.get(name).ok_or_else(|| bad(name));
    for (name, chip) in [("pic0", 0u32), ("pic1", 1), ("ioapic", 2)] {
        let c: kvm_irqchip = from_pod(get(name)?).ok_or_else(|| bad(name))?;
        if c.chip_id != chip {
            return Err(bad(name));
        }
        kvm("SET_IRQCHIP", vm.set_irqchip(&c))?;
    }
    let clock: kvm_clock_data = from_pod(get("clock")?).ok_or_else(|| bad("clock"))?;
    let clock = kvm_clock_data { clock: clock.clock, ..Default::default() };
    kvm("SET_CLOCK", vm.set_clock(&clock))?;
    let sregs: kvm_sregs = from_pod(get("sregs")?).ok_or_else(|| bad("sregs"))?;
    kvm("SET_SREGS", vcpu.set_sregs(&sregs))?;
    let regs: kvm_regs = from_pod(get("regs")?).ok_or_else(|| bad("regs"))?;
    kvm("SET_REGS", vcpu.set_regs(&regs))?;
    let fpu: kvm_fpu = from_pod(get("fpu")?).ok_or_else(|| bad("fpu"))?;
    kvm("SET_FPU", vcpu.set_fpu(&fpu))?;
    let raw = get("msrs")?;
    if raw.len() % 16 != 0 {
        return Err(bad("msrs"));
    }
    let entries: Vec<kvm_msr_entry> = raw
        .chunks_exact(16)
        .map(|c| kvm_msr_entry {
            index: u64::from_le_bytes(c[..8].try_into().expect("8")) as u32,
            data: u64::from_le_bytes(c[8..].try_into().expect("8")),
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| bad("msrs"))?;
    kvm("SET_MSRS", vcpu.set_msrs(&msrs))?;
    let lapic: kvm_lapic_state = from_pod(get("lapic")?).ok_or_else(|| bad("lapic"))?;
    kvm("SET_LAPIC", vcpu.set_lapic(&lapic))?;
    let events: kvm_vcpu_events = from_pod(get("events")?).ok_or_else(|| bad("events"))?;
    kvm("SET_VCPU_EVENTS", vcpu.set_vcpu_events(&events))?;
    let dr: kvm_debugregs = from_pod(get("debugregs")?).ok_or_else(|| bad("debugregs"))?;
    kvm("SET_DEBUGREGS", vcpu.set_debug_regs(&dr))?;
    Ok(())
}

fn write_synced(path: &Path, data: &[u8]) -> Result<(), Error> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

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
/// the pages written since the previous snapshot of this VM.
pub fn create(ctx: &mut VcpuContext, out: &Path, diff: bool) -> Result<Report, Error> {
    let t0 = std::time::Instant::now();
    if out.exists() {
        return Err(Error::Exists(out.to_path_buf()));
    }
    let base = if diff { Some(ctx.last_snapshot.clone().ok_or(Error::NoBase)?) } else { None };
    let mem_bytes = vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1;
    let mut state = capture(&ctx.vm, &mut ctx.vcpu)?;
    state.insert("tracker".into(), ctx.tracker.export_state());
    let engine = ctx.tracker.engine();
    let image_sha256 = ctx.image_sha256.clone();
    let log = &mut ctx.tracker.log;
    log.harvest(&ctx.vm, &ctx.mem)?;
    let id = sha256_hex(format!("{:?}{}", std::time::SystemTime::now(), std::process::id()).as_bytes())[..16].to_string();
    let tmp = out.with_file_name(format!("{}.tmp-{id}", out.file_name().map_or("snapshot".into(), |n| n.to_string_lossy())));
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        let mut files = BTreeMap::new();
        let state_bin = encode(&state);
        files.insert("state.bin".to_string(), sha256_hex(&state_bin));
        write_synced(&tmp.join("state.bin"), &state_bin)?;
        let mem_path = tmp.join("memory.bin");
        let mut hasher = Sha256::new();
        let mut pages = 0u64;
        let mut f = std::fs::File::create(&mem_path).map_err(io(&mem_path))?;
        let mut page = [0u8; PAGE as usize];
        let mut pfns = Vec::new();
        static ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
        for pfn in 0..mem_bytes / PAGE {
            if diff && !log.in_snapshot(pfn) {
                continue;
            }
            ctx.mem.read_slice(&mut page, GuestAddress(pfn * PAGE)).map_err(|e| Error::Io {
                path: mem_path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
            // A full image hashes as the whole RAM (its holes read as zeros).
            hasher.update(page);
            if diff {
                f.write_all(&page).map_err(io(&mem_path))?;
                pfns.push(pfn);
                pages += 1;
            } else if page != ZERO {
                use std::os::unix::fs::FileExt;
                f.write_all_at(&page, pfn * PAGE).map_err(io(&mem_path))?;
                pages += 1;
            }
        }
        if !diff {
            f.set_len(mem_bytes).map_err(io(&mem_path))?;
        }
        f.sync_all().map_err(io(&mem_path))?;
        files.insert("memory.bin".to_string(), hex(&hasher.finalize()));
        if diff {
            let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
            files.insert("pages.bin".to_string(), sha256_hex(&bytes));
            write_synced(&tmp.join("pages.bin"), &bytes)?;
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            id: id.clone(),
            kind: if diff { Kind::Diff } else { Kind::Full },
            base: base.as_ref().map(|b| BaseRef { path: b.path.display().to_string(), id: b.id.clone() }),
            mem_bytes,
            engine,
            image_sha256: image_sha256.clone(),
            pages,
            files,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("manifest serializes");
        write_synced(&tmp.join("manifest.json"), &json)?;
        std::fs::File::open(&tmp).and_then(|d| d.sync_all()).map_err(io(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io(out))?;
        if let Some(parent) = out.parent() {
            let _ = std::fs::File::open(if parent.as_os_str().is_empty() { Path::new(".") } else { parent }).and_then(|d| d.sync_all());
        }
        Ok(pages)
    })();
    match result {
        Ok(pages) => {
            // Only now is the dirty information consumed: a failed snapshot loses nothing.
            log.snapshot_start(&ctx.vm)?;
            let abs = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
            ctx.last_snapshot = Some(Last { path: abs, id: id.clone() });
            let bytes = std::fs::metadata(out.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
            Ok(Report { id, kind: if diff { Kind::Diff } else { Kind::Full }, pages, bytes, pause_ns: t0.elapsed().as_nanos() as u64 })
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// A snapshot read back and checked.
pub struct Loaded {
    pub manifest: Manifest,
    pub state: Sections,
    /// Manifests from the base to this one.
    pub chain: Vec<Manifest>,
}

fn read_checked(dir: &Path, m: &Manifest, name: &str) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let data = std::fs::read(&path).map_err(io(&path))?;
    let want = m.files.get(name).ok_or_else(|| Error::Invalid { path: dir.into(), why: format!("manifest lists no {name}") })?;
    if &sha256_hex(&data) != want {
        return Err(Error::Invalid { path: dir.into(), why: format!("{name} does not match its checksum (corrupted or truncated)") });
    }
    Ok(data)
}

fn read_manifest(dir: &Path) -> Result<Manifest, Error> {
    let path = dir.join("manifest.json");
    let raw = std::fs::read(&path).map_err(io(&path))?;
    let m: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| Error::Invalid { path: dir.into(), why: format!("manifest.json: {e}") })?;
    if m.format != FORMAT || m.version != VERSION {
        return Err(Error::Invalid { path: dir.into(), why: format!("format {} version {} is not {FORMAT} {VERSION}", m.format, m.version) });
    }
    if m.mem_bytes == 0 || m.mem_bytes % PAGE != 0 || m.mem_bytes > guest_abi::MAX_MEM {
        return Err(Error::Invalid { path: dir.into(), why: format!("guest size {} is not valid", m.mem_bytes) });
    }
    if (m.kind == Kind::Diff) != m.base.is_some() {
        return Err(Error::Invalid { path: dir.into(), why: "a diff needs a base and a full snapshot has none".into() });
    }
    Ok(m)
}

/// Follows a snapshot's chain back to its full base, checking every link, and writes the
/// resulting memory into `mem` (which must be of the snapshot's size) when given.
pub fn load(dir: &Path, mem: Option<&GuestMem>) -> Result<Loaded, Error> {
    let mut chain = vec![(dir.to_path_buf(), read_manifest(dir)?)];
    while let Some(base) = chain.last().expect("non-empty").1.base.clone() {
        if chain.len() > 1000 {
            return Err(Error::Invalid { path: dir.into(), why: "the chain of bases is longer than 1000 (a loop?)".into() });
        }
        let bdir = PathBuf::from(&base.path);
        let bm = read_manifest(&bdir)?;
        let top = &chain.last().expect("non-empty").1;
        if bm.id != base.id {
            return Err(Error::Invalid { path: bdir, why: format!("is snapshot {}, but {} expects base {}", bm.id, top.id, base.id) });
        }
        if bm.mem_bytes != top.mem_bytes || bm.image_sha256 != top.image_sha256 {
            return Err(Error::Invalid { path: bdir, why: "guest size or image differs from the snapshot built on it".into() });
        }
        chain.push((bdir, bm));
    }
    chain.reverse();
    for (d, m) in &chain {
        let mem_data = read_checked(d, m, "memory.bin")?;
        if m.kind == Kind::Full {
            if mem_data.len() as u64 != m.mem_bytes {
                return Err(Error::Invalid { path: d.clone(), why: "memory.bin is not the guest's size".into() });
            }
            if let Some(mem) = mem {
                mem.write_slice(&mem_data, GuestAddress(0)).map_err(|e| Error::Invalid { path: d.clone(), why: e.to_string() })?;
            }
        } else {
            let pfns_raw = read_checked(d, m, "pages.bin")?;
            if pfns_raw.len() as u64 != m.pages * 8 || mem_data.len() as u64 != m.pages * PAGE {
                return Err(Error::Invalid { path: d.clone(), why: "page count does not match pages.bin and memory.bin".into() });
            }
            for (i, c) in pfns_raw.chunks_exact(8).enumerate() {
                let pfn = u64::from_le_bytes(c.try_into().expect("8"));
                if pfn.checked_mul(PAGE).is_none_or(|a| a + PAGE > m.mem_bytes) {
                    return Err(Error::Invalid { path: d.clone(), why: format!("page {pfn:#x} is outside the guest") });
                }
                if let Some(mem) = mem {
                    let page = &mem_data[i * PAGE as usize..(i + 1) * PAGE as usize];
                    mem.write_slice(page, GuestAddress(pfn * PAGE)).map_err(|e| Error::Invalid { path: d.clone(), why: e.to_string() })?;
                }
            }
        }
    }
    let (top_dir, manifest) = chain.last().expect("non-empty").clone();
    let state_raw = read_checked(&top_dir, &manifest, "state.bin")?;
    let state = decode(&state_raw).ok_or_else(|| Error::Invalid { path: top_dir.clone(), why: "state.bin is malformed".into() })?;
    for tag in TAGS {
        if !state.contains_key(tag) {
            return Err(Error::Invalid { path: top_dir.clone(), why: format!("state.bin lacks '{tag}'") });
        }
    }
    Ok(Loaded { manifest, state, chain: chain.into_iter().map(|(_, m)| m).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip_and_reject_garbage() {
        let mut s = Sections::new();
        s.insert("regs".into(), vec![1, 2, 3]);
        s.insert("x".into(), vec![]);
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let mut bad = encode(&s);
        bad.truncate(bad.len() - 1);
        assert!(decode(&bad).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(from_pod::<kvm_regs>(&[0u8; 3]).is_none());
    }
}
