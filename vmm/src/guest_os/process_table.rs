//! The guest-OS profile: finding guest processes from outside by reading the guest
//! kernel's process table (located through its ELF symbol) out of guest memory.
//!
//! The table is untrusted input: magic, version, sizes and every field are checked,
//! and a table the kernel is changing (odd sequence number) is refused.

use super::le::{u32_at, u64_at};
use crate::machine::memory::{self, GuestMem};
use guest_abi::{
    mapping_flags, state, MappingRecord, ProcSlot, ProcessTable, KERNEL_VIRT_BASE, MAX_MAPPINGS, MAX_PROCS,
    PROCESS_TABLE_MAGIC, PROCESS_TABLE_VERSION, PROC_NAME_LEN,
};
use mmu::Cr3;
use std::mem::{offset_of, size_of};

const USER_TOP: u64 = workload::USER_TOP;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the guest kernel image has no {0} symbol: cannot find its processes from outside")]
    NoSymbol(&'static str),
    #[error("cannot read the guest process table at {addr:#x}")]
    Unreadable { addr: u64 },
    #[error("guest process table: {0}")]
    Invalid(String),
    #[error("the guest is changing its process table right now; try again")]
    Busy,
}

/// Process state, as the guest reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Runnable,
    Exited,
    Killed,
}

impl ProcState {
    pub fn name(self) -> &'static str {
        match self {
            ProcState::Runnable => "running",
            ProcState::Exited => "exited",
            ProcState::Killed => "killed",
        }
    }
}

/// One mapping (like a Linux VMA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mapping {
    pub start: u64,
    pub pages: u64,
    pub read_only: bool,
    pub huge: bool,
    pub shared: bool,
    /// A Linux program's text (mapped executable).
    pub exec: bool,
    /// A Linux program's mapping of a file (`shared`: `MAP_SHARED`).
    #[serde(default)]
    pub file: bool,
    pub serial: u64,
}

impl Mapping {
    pub fn end(&self) -> u64 {
        self.start + self.pages * 4096
    }

    pub fn contains(&self, va: u64) -> bool {
        self.start <= va && va < self.end()
    }
}

/// One guest process as seen from outside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub slot: usize,
    pub pid: u32,
    pub name: String,
    pub state: ProcState,
    pub exit_code: u32,
    /// The process's address space (the guest stores its PML4's address, no PCID).
    pub cr3: Cr3,
    pub rss_pages: u64,
    pub peak_rss_pages: u64,
    pub mappings: Vec<Mapping>,
}

impl Process {
    pub fn mapping_at(&self, va: u64) -> Option<&Mapping> {
        self.mappings.iter().find(|m| m.contains(va))
    }

    pub fn is_live(&self) -> bool {
        self.state == ProcState::Runnable
    }
}

/// A validated snapshot of the process table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub processes: Vec<Process>,
    pub zero_frame: u64,
    /// The guest's 2 MiB zero block (0: none yet).
    pub huge_zero_frame: u64,
}

impl Snapshot {
    pub fn by_pid(&self, pid: u32) -> Option<&Process> {
        self.processes.iter().find(|p| p.pid == pid)
    }

    /// The live process whose page tables `cr3` points at (PCID or cache bits aside).
    pub fn by_cr3(&self, cr3: Cr3) -> Option<&Process> {
        self.processes.iter().find(|p| p.is_live() && p.cr3.same_tables(cr3))
    }
}

/// Where the table lives in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableLocation {
    pub phys: u64,
}

impl TableLocation {
    /// From the kernel's symbol (virtual, in the image mapping).
    pub fn from_symbol(virt: Option<u64>) -> Result<TableLocation, Error> {
        let virt = virt.ok_or(Error::NoSymbol(guest_abi::PROCESS_TABLE_SYMBOL))?;
        let phys = virt
            .checked_sub(KERNEL_VIRT_BASE)
            .ok_or_else(|| Error::Invalid(format!("symbol address {virt:#x} is not in the kernel image mapping")))?;
        Ok(TableLocation { phys })
    }

    /// Physical address of `peak_rss_pages` of `slot` (for `clear-refs 5`).
    pub fn peak_rss_addr(&self, slot: usize) -> u64 {
        self.phys + (offset_of!(ProcessTable, procs) + slot * size_of::<ProcSlot>() + offset_of!(ProcSlot, peak_rss_pages)) as u64
    }

    /// Reads and validates the table.
    pub fn read(&self, mem: &GuestMem) -> Result<Snapshot, Error> {
        let raw = memory::read(mem, self.phys, size_of::<ProcessTable>())
            .map_err(|_| Error::Unreadable { addr: self.phys })?;
        let mem_size = vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1;
        parse(&raw, mem_size)
    }
}



/// Parses a raw table (exactly `size_of::<ProcessTable>()` bytes) against `mem_size`.
pub fn parse(raw: &[u8], mem_size: u64) -> Result<Snapshot, Error> {
    let bad = |m: String| Err(Error::Invalid(m));
    if raw.len() != size_of::<ProcessTable>() {
        return bad(format!("{} bytes read, {} expected", raw.len(), size_of::<ProcessTable>()));
    }
    let magic = u64_at(raw, offset_of!(ProcessTable, magic));
    if magic != PROCESS_TABLE_MAGIC {
        return bad(format!("bad magic {magic:#x}"));
    }
    let version = u32_at(raw, offset_of!(ProcessTable, version));
    if version != PROCESS_TABLE_VERSION {
        return bad(format!("unsupported version {version} (this VMM reads {PROCESS_TABLE_VERSION})"));
    }
    let (max_procs, max_maps, slot_size) = (
        u32_at(raw, offset_of!(ProcessTable, max_procs)) as usize,
        u32_at(raw, offset_of!(ProcessTable, max_mappings)) as usize,
        u32_at(raw, offset_of!(ProcessTable, slot_size)) as usize,
    );
    if max_procs != MAX_PROCS || max_maps != MAX_MAPPINGS || slot_size != size_of::<ProcSlot>() {
        return bad(format!("layout {max_procs} procs x {max_maps} mappings x {slot_size} bytes does not match this VMM"));
    }
    if u64_at(raw, offset_of!(ProcessTable, seq)) % 2 == 1 {
        return Err(Error::Busy);
    }
    let nprocs = u32_at(raw, offset_of!(ProcessTable, nprocs)) as usize;
    if nprocs > MAX_PROCS {
        return bad(format!("nprocs {nprocs} exceeds {MAX_PROCS}"));
    }
    let zero_frame = u64_at(raw, offset_of!(ProcessTable, zero_frame));
    if !zero_frame.is_multiple_of(4096) || zero_frame >= mem_size {
        return bad(format!("zero frame {zero_frame:#x} is not a page of guest memory"));
    }
    let huge_zero_frame = u64_at(raw, offset_of!(ProcessTable, huge_zero_frame));
    if !huge_zero_frame.is_multiple_of(2 << 20) || (huge_zero_frame != 0 && huge_zero_frame.checked_add(2 << 20).is_none_or(|e| e > mem_size)) {
        return bad(format!("huge zero frame {huge_zero_frame:#x} is not a 2 MiB block of guest memory"));
    }
    let mut processes = Vec::new();
    for slot in 0..nprocs {
        let base = offset_of!(ProcessTable, procs) + slot * size_of::<ProcSlot>();
        let s = &raw[base..base + size_of::<ProcSlot>()];
        let field = |name: &str, m: String| Error::Invalid(format!("slot {slot} {name}: {m}"));
        let pid = u32_at(s, offset_of!(ProcSlot, pid));
        let state = match u32_at(s, offset_of!(ProcSlot, state)) {
            state::FREE => continue,
            state::RUNNABLE => ProcState::Runnable,
            state::EXITED => ProcState::Exited,
            state::KILLED => ProcState::Killed,
            other => return Err(field("state", format!("unknown value {other}"))),
        };
        let nmaps = u32_at(s, offset_of!(ProcSlot, nmappings)) as usize;
        if nmaps > MAX_MAPPINGS {
            return Err(field("nmappings", format!("{nmaps} exceeds {MAX_MAPPINGS}")));
        }
        let name_raw = &s[offset_of!(ProcSlot, name)..offset_of!(ProcSlot, name) + PROC_NAME_LEN];
        let name_len = name_raw.iter().position(|&b| b == 0).unwrap_or(PROC_NAME_LEN);
        if !name_raw[..name_len].iter().all(|b| b.is_ascii_graphic()) {
            return Err(field("name", "is not printable ASCII".into()));
        }
        let cr3 = u64_at(s, offset_of!(ProcSlot, cr3));
        if !cr3.is_multiple_of(4096) || cr3 >= mem_size {
            return Err(field("cr3", format!("{cr3:#x} is not a page of guest memory")));
        }
        let mut mappings = Vec::with_capacity(nmaps);
        for i in 0..nmaps {
            let m = offset_of!(ProcSlot, mappings) + i * size_of::<MappingRecord>();
            let (start, pages, flags, serial) = (
                u64_at(s, m + offset_of!(MappingRecord, start)),
                u64_at(s, m + offset_of!(MappingRecord, pages)),
                u32_at(s, m + offset_of!(MappingRecord, flags)),
                u64_at(s, m + offset_of!(MappingRecord, serial)),
            );
            let end = pages.checked_mul(4096).and_then(|l| l.checked_add(start));
            if start % 4096 != 0 || pages == 0 || end.is_none_or(|e| e > USER_TOP) {
                return Err(field("mapping", format!("{i} ({start:#x}, {pages} pages) is not a user range")));
            }
            if flags & !(mapping_flags::READ_ONLY | mapping_flags::HUGE | mapping_flags::SHARED | mapping_flags::EXEC | mapping_flags::FILE) != 0 {
                return Err(field("mapping", format!("{i} has unknown flags {flags:#x}")));
            }
            mappings.push(Mapping {
                start,
                pages,
                read_only: flags & mapping_flags::READ_ONLY != 0,
                huge: flags & mapping_flags::HUGE != 0,
                shared: flags & mapping_flags::SHARED != 0,
                exec: flags & mapping_flags::EXEC != 0,
                file: flags & mapping_flags::FILE != 0,
                serial,
            });
        }
        mappings.sort_by_key(|m| m.start);
        if mappings.windows(2).any(|w| w[0].end() > w[1].start) {
            return Err(field("mappings", "overlap".into()));
        }
        processes.push(Process {
            slot,
            pid,
            name: String::from_utf8_lossy(&name_raw[..name_len]).into_owned(),
            state,
            exit_code: u32_at(s, offset_of!(ProcSlot, exit_code)),
            cr3: Cr3(cr3),
            rss_pages: u64_at(s, offset_of!(ProcSlot, rss_pages)),
            peak_rss_pages: u64_at(s, offset_of!(ProcSlot, peak_rss_pages)),
            mappings,
        });
    }
    Ok(Snapshot { processes, zero_frame, huge_zero_frame })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Vec<u8> {
        let mut t = ProcessTable::with_header();
        t.nprocs = 2;
        t.zero_frame = 0x5000;
        t.procs[0].pid = 1;
        t.procs[0].state = state::RUNNABLE;
        t.procs[0].name[..6].copy_from_slice(b"writer");
        t.procs[0].cr3 = 0x8000;
        t.procs[0].nmappings = 1;
        t.procs[0].mappings[0] = MappingRecord { start: 0x400000, pages: 4, flags: 1, _pad: 0, serial: 7 };
        t.procs[1].pid = 2;
        t.procs[1].state = state::KILLED;
        t.procs[1].exit_code = 139;
        t.procs[1].cr3 = 0x9000;
        t.as_bytes().to_vec()
    }

    fn set_u64(raw: &mut [u8], off: usize, v: u64) {
        raw[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn parses_a_valid_table() {
        let s = parse(&table(), 1 << 30).unwrap();
        assert_eq!(s.processes.len(), 2);
        let p = s.by_pid(1).unwrap();
        assert_eq!((p.name.as_str(), p.cr3, p.state), ("writer", Cr3(0x8000), ProcState::Runnable));
        assert_eq!(p.mappings, vec![Mapping { start: 0x400000, pages: 4, read_only: true, huge: false, shared: false, exec: false, file: false, serial: 7 }]);
        assert_eq!(s.by_pid(2).unwrap().state, ProcState::Killed);
        assert!(s.by_cr3(Cr3(0x9000)).is_none(), "dead processes have no address space");
        assert_eq!(s.by_cr3(Cr3(0x8000 | 0x18)).map(|p| p.pid), Some(1), "cache bits do not change the address space");
    }

    #[test]
    fn hostile_tables_are_refused_with_the_culprit_named() {
        let slot0 = offset_of!(ProcessTable, procs);
        let map0 = slot0 + offset_of!(ProcSlot, mappings);
        type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Corrupt, &str)> = vec![
            (Box::new(|r| r[0] ^= 1), "bad magic"),
            (Box::new(|r| r[8] = 9), "unsupported version 9"),
            (Box::new(|r| r[12] = 200), "does not match"),
            (Box::new(move |r| set_u64(r, offset_of!(ProcessTable, nprocs), 99)), "nprocs 99"),
            (Box::new(move |r| set_u64(r, slot0 + offset_of!(ProcSlot, cr3), 1 << 40)), "slot 0 cr3"),
            (Box::new(move |r| set_u64(r, slot0 + offset_of!(ProcSlot, state), 7)), "slot 0 state"),
            (Box::new(move |r| set_u64(r, slot0 + offset_of!(ProcSlot, nmappings), 65)), "nmappings: 65 exceeds 64"),
            (Box::new(move |r| r[slot0 + offset_of!(ProcSlot, name)] = 0xff), "slot 0 name"),
            (Box::new(move |r| set_u64(r, map0 + 8, u64::MAX)), "is not a user range"),
            (Box::new(move |r| set_u64(r, map0, 0x7fff_ffff_f000)), "is not a user range"),
            (Box::new(move |r| r[map0 + 16] = 0x80), "unknown flags"),
            (Box::new(move |r| r[map0 + 16] = 0x20), "unknown flags"),
        ];
        for (corrupt, msg) in cases {
            let mut raw = table();
            corrupt(&mut raw);
            let err = parse(&raw, 1 << 30).unwrap_err().to_string();
            assert!(err.contains(msg), "{err} should mention {msg}");
        }
        let mut raw = table();
        set_u64(&mut raw, offset_of!(ProcessTable, seq), 3);
        assert_eq!(parse(&raw, 1 << 30), Err(Error::Busy));
        assert!(parse(&raw[..100], 1 << 30).is_err());
    }
}
