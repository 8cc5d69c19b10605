//! Kernel images: the embedded guest kernel, loading an ELF into guest memory, and the
//! symbols the VMM needs to find things in the guest from outside.

use crate::machine::memory::GuestMem;
use guest_abi::KERNEL_PHYS_BASE;
use linux_loader::loader::{elf::Elf, KernelLoader};
use object::{Object, ObjectSymbol};
use std::io::Cursor;

/// The project's guest kernel, built by vmm/build.rs.
/// Largest guest image read (64 MiB): it must fit in guest memory, debug info aside.
pub const MAX_IMAGE_BYTES: u64 = 64 << 20;

pub static EMBEDDED_KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-kernel.elf"));

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} is not an x86-64 ELF executable: {detail}")]
    NotElf { what: String, detail: String },
    #[error("{what} needs guest memory up to {end:#x} but the guest has {mem_mib} MiB")]
    TooLarge { what: String, end: u64, mem_mib: u64 },
    #[error("{what} has a segment at {addr:#x}, below {KERNEL_PHYS_BASE:#x} where the VMM keeps boot structures")]
    LowSegment { what: String, addr: u64 },
    #[error("loading {what} failed: {detail}")]
    Load { what: String, detail: String },
}

/// Where a loaded kernel starts and ends.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: u64,
    /// First physical address after every loaded segment (bss included).
    pub end: u64,
}

/// A symbol table for turning guest addresses into names.
#[derive(Debug, Clone, Default)]
pub struct Symbols {
    entries: Vec<(u64, u64, String)>,
}

impl Symbols {
    pub fn parse(image: &[u8]) -> Symbols {
        let Ok(file) = object::File::parse(image) else { return Symbols::default() };
        let mut entries: Vec<(u64, u64, String)> = file
            .symbols()
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .filter(|(addr, _, name)| *addr != 0 && !name.is_empty())
            .collect();
        entries.sort();
        Symbols { entries }
    }

    pub fn address_of(&self, name: &str) -> Option<u64> {
        self.entries.iter().find(|(_, _, n)| n == name).map(|(a, _, _)| *a)
    }

    /// `name+0xoff` for the symbol containing `addr`.
    pub fn describe(&self, addr: u64) -> String {
        let idx = self.entries.partition_point(|(a, _, _)| *a <= addr);
        match idx.checked_sub(1).map(|i| &self.entries[i]) {
            Some((a, size, name)) if addr - a < (*size).max(1) || *size == 0 && addr - a < 0x1000 => {
                format!("{addr:#x} ({name}+{:#x})", addr - a)
            }
            _ => format!("{addr:#x}"),
        }
    }
}

/// Checks `image` and loads its PT_LOAD segments at their physical addresses.
pub fn load(mem: &GuestMem, mem_size: u64, image: &[u8], what: &str) -> Result<Loaded, Error> {
    let not_elf = |detail: String| Error::NotElf { what: what.to_string(), detail };
    let file = object::File::parse(image).map_err(|e| not_elf(e.to_string()))?;
    if file.architecture() != object::Architecture::X86_64 || !file.is_64() {
        return Err(not_elf(format!("architecture is {:?}", file.architecture())));
    }
    let object::File::Elf64(elf) = &file else { return Err(not_elf("not ELF64".into())) };
    let endian = elf.endian();
    let mut end = 0u64;
    for phdr in elf.elf_program_headers() {
        use object::read::elf::ProgramHeader;
        if phdr.p_type(endian) != object::elf::PT_LOAD {
            continue;
        }
        let (paddr, memsz) = (phdr.p_paddr(endian), phdr.p_memsz(endian));
        if paddr < KERNEL_PHYS_BASE {
            return Err(Error::LowSegment { what: what.into(), addr: paddr });
        }
        let seg_end = paddr.checked_add(memsz).ok_or_else(|| not_elf("segment size overflows".into()))?;
        end = end.max(seg_end);
    }
    if end == 0 || file.segments().next().is_none() {
        return Err(not_elf("no loadable segments".into()));
    }
    if end > mem_size {
        return Err(Error::TooLarge { what: what.into(), end, mem_mib: mem_size >> 20 });
    }
    let result = Elf::load(mem, None, &mut Cursor::new(image), None)
        .map_err(|e| Error::Load { what: what.into(), detail: e.to_string() })?;
    Ok(Loaded { entry: result.kernel_load.0, end: end.max(result.kernel_end) })
}
