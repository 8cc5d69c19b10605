//! Reading a static x86-64 Linux executable: the ELF header and program headers,
//! checked before anything of it reaches the guest. The file is untrusted input: every
//! offset and size is bounded by the file, every address by the user half.

use crate::guest_os::le::{u32_at, u64_at};
use super::Error;

pub const PAGE: u64 = 4096;
/// Lowest address a program may map (Linux's default `vm.mmap_min_addr`).
pub const MIN_ADDR: u64 = 0x1_0000;
/// End of the user half that our kernel gives processes.
pub const USER_TOP: u64 = 0x0000_8000_0000_0000;
/// Where a position-independent executable (static-PIE) is loaded: Linux's base for
/// `ET_DYN` programs without address-space randomization.
pub const PIE_BASE: u64 = 0x5555_5555_4000;

const PT_LOAD: u32 = 1;
const PT_INTERP: u32 = 3;
const PT_PHDR: u32 = 6;
const PF_X: u32 = 1;
const PF_W: u32 = 2;
const PHDR_SIZE: usize = 56;
/// More program headers than any linker writes for a static program.
const MAX_PHDRS: usize = 64;

/// One `PT_LOAD`, at its address in the process (the load bias added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub vaddr: u64,
    pub memsz: u64,
    /// The file's bytes for `[vaddr, vaddr + filesz)`, from `offset`.
    pub offset: u64,
    pub filesz: u64,
    pub write: bool,
    pub exec: bool,
}

/// A program ready to be laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    /// Entry point (bias added).
    pub entry: u64,
    /// Where the program headers are in the process (for `AT_PHDR`), and how many.
    pub phdr: u64,
    pub phnum: u64,
    /// In address order, not overlapping.
    pub loads: Vec<Load>,
    /// Position-independent (`ET_DYN`), loaded at [`PIE_BASE`].
    pub pie: bool,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}



/// Parses and checks `file`: a static x86-64 ELF executable (`ET_EXEC`, or `ET_DYN`
/// without an interpreter: static-PIE) whose segments lie in the user half.
pub fn parse(file: &[u8]) -> Result<Program, Error> {
    let bad = |why: String| Error::BadElf(why);
    if file.len() < 64 || file[..4] != *b"\x7fELF" {
        return Err(Error::NotElf);
    }
    if file[4] != 2 {
        return Err(bad(format!("ELF class {} (32-bit?): only 64-bit x86-64 programs run here", file[4])));
    }
    if file[5] != 1 {
        return Err(bad("big-endian ELF: only x86-64 programs run here".into()));
    }
    let machine = u16_at(file, 18);
    if machine != 62 {
        return Err(bad(format!("machine {machine}, not x86-64 (62)")));
    }
    let pie = match u16_at(file, 16) {
        2 => false,
        3 => true,
        t => return Err(bad(format!("ELF type {t}: not an executable (ET_EXEC or static-PIE ET_DYN)"))),
    };
    let bias = if pie { PIE_BASE } else { 0 };
    let entry = u64_at(file, 24);
    let phoff = u64_at(file, 32);
    let phentsize = u16_at(file, 54) as usize;
    let phnum = u16_at(file, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(bad(format!("program header size {phentsize}, not {PHDR_SIZE}")));
    }
    if phnum == 0 || phnum > MAX_PHDRS {
        return Err(bad(format!("{phnum} program headers (1 to {MAX_PHDRS} expected)")));
    }
    let table = usize::try_from(phoff)
        .ok()
        .and_then(|off| file.get(off..off.checked_add(phnum * PHDR_SIZE)?))
        .ok_or_else(|| bad(format!("program headers at {phoff:#x} run past the end of the file ({} bytes)", file.len())))?;
    let mut loads: Vec<Load> = Vec::new();
    let mut phdr_vaddr = None;
    for (i, h) in table.chunks_exact(PHDR_SIZE).enumerate() {
        let (kind, flags) = (u32_at(h, 0), u32_at(h, 4));
        let (offset, vaddr, filesz, memsz, align) = (u64_at(h, 8), u64_at(h, 16), u64_at(h, 32), u64_at(h, 40), u64_at(h, 48));
        match kind {
            PT_INTERP => return Err(Error::Dynamic),
            PT_PHDR => phdr_vaddr = Some(vaddr),
            PT_LOAD => {
                let seg = |why: &str| bad(format!("segment {i} (at {vaddr:#x}): {why}"));
                if memsz == 0 {
                    continue;
                }
                if filesz > memsz {
                    return Err(seg("more file bytes than memory"));
                }
                if offset.checked_add(filesz).is_none_or(|end| end > file.len() as u64) {
                    return Err(seg(&format!("its {filesz} bytes at {offset:#x} run past the end of the file")));
                }
                if offset % PAGE != vaddr % PAGE || (align > 1 && !align.is_power_of_two()) {
                    return Err(seg("file offset and address are not congruent modulo the page size"));
                }
                let start = vaddr.checked_add(bias).ok_or_else(|| seg("address overflows"))?;
                let end = start.checked_add(memsz).ok_or_else(|| seg("size overflows"))?;
                if start < MIN_ADDR || end > USER_TOP {
                    return Err(seg(&format!("[{start:#x}, {end:#x}) is outside the user half [{MIN_ADDR:#x}, {USER_TOP:#x})")));
                }
                if let Some(prev) = loads.last() {
                    // Segments in address order, never sharing a page: each page has one
                    // set of rights.
                    if start / PAGE * PAGE < (prev.vaddr + prev.memsz).next_multiple_of(PAGE) {
                        return Err(seg("overlaps the page of the segment before it (or is out of order)"));
                    }
                }
                loads.push(Load { vaddr: start, memsz, offset, filesz, write: flags & PF_W != 0, exec: flags & PF_X != 0 });
            }
            _ => {}
        }
    }
    if loads.is_empty() {
        return Err(bad("no loadable segment".into()));
    }
    let entry = entry.checked_add(bias).filter(|e| loads.iter().any(|l| l.exec && l.vaddr <= *e && *e < l.vaddr + l.memsz));
    let entry = entry.ok_or_else(|| bad(format!("the entry point {:#x} is not in an executable segment", u64_at(file, 24))))?;
    // AT_PHDR: PT_PHDR if there is one, else where the segment holding the headers maps them.
    let phdr = match phdr_vaddr {
        Some(v) => v + bias,
        None => loads
            .iter()
            .find(|l| l.offset <= phoff && phoff + (phnum * PHDR_SIZE) as u64 <= l.offset + l.filesz)
            .map(|l| l.vaddr + (phoff - l.offset))
            .ok_or_else(|| bad("the program headers are in no loaded segment (AT_PHDR)".into()))?,
    };
    Ok(Program { entry, phdr, phnum: phnum as u64, loads, pie })
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A minimal ELF: header, then `loads` as (vaddr, filesz, memsz, flags), each
    /// segment's bytes at a page-aligned offset, filled with its index + 1.
    pub fn elf(kind: u16, entry: u64, loads: &[(u64, u64, u64, u32)]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + loads.len() * PHDR_SIZE];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&kind.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&(loads.len() as u16).to_le_bytes());
        let mut data = Vec::new();
        for (i, &(vaddr, filesz, memsz, flags)) in loads.iter().enumerate() {
            // The first segment maps the headers too (offset 0), as linkers do.
            let offset = if i == 0 { vaddr % PAGE } else { (PAGE * (i as u64 + 1)) + vaddr % PAGE };
            let h = 64 + i * PHDR_SIZE;
            f[h..h + 4].copy_from_slice(&PT_LOAD.to_le_bytes());
            f[h + 4..h + 8].copy_from_slice(&(flags | 4).to_le_bytes());
            f[h + 8..h + 16].copy_from_slice(&offset.to_le_bytes());
            f[h + 16..h + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[h + 32..h + 40].copy_from_slice(&filesz.to_le_bytes());
            f[h + 40..h + 48].copy_from_slice(&memsz.to_le_bytes());
            f[h + 48..h + 56].copy_from_slice(&PAGE.to_le_bytes());
            data.push((offset, filesz, i as u8 + 1));
        }
        for (offset, filesz, fill) in data {
            let end = (offset + filesz) as usize;
            if f.len() < end {
                f.resize(end, 0);
            }
            // The header of the first segment stays (it is part of its bytes).
            let from = (offset as usize).max(if offset < PAGE { 64 + loads.len() * PHDR_SIZE } else { 0 });
            f[from.min(end)..end].fill(fill);
        }
        f
    }

    #[test]
    fn a_static_executable_is_read_with_its_segments_and_headers() {
        let f = elf(2, 0x40_1000, &[(0x40_0000, 0x2000, 0x2000, PF_X), (0x40_3010, 0x100, 0x3000, PF_W)]);
        let p = parse(&f).unwrap();
        assert!(!p.pie);
        assert_eq!(p.entry, 0x40_1000);
        assert_eq!((p.phdr, p.phnum), (0x40_0040, 2), "the headers, mapped by the first segment");
        assert_eq!(p.loads.len(), 2);
        assert!(p.loads[0].exec && !p.loads[0].write);
        assert!(p.loads[1].write && !p.loads[1].exec);
        assert_eq!((p.loads[1].vaddr, p.loads[1].filesz, p.loads[1].memsz), (0x40_3010, 0x100, 0x3000));
    }

    #[test]
    fn a_static_pie_is_loaded_at_linux_base() {
        let p = parse(&elf(3, 0x1000, &[(0, 0x2000, 0x2000, PF_X)])).unwrap();
        assert!(p.pie);
        assert_eq!(p.entry, PIE_BASE + 0x1000);
        assert_eq!(p.loads[0].vaddr, PIE_BASE);
    }

    #[test]
    fn what_cannot_run_here_is_refused_by_name() {
        let good = elf(2, 0x40_1000, &[(0x40_0000, 0x2000, 0x2000, PF_X)]);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            parse(&b).unwrap_err().to_string()
        };
        assert!(matches!(parse(b"#!/bin/sh\n"), Err(Error::NotElf)));
        assert!(with(&|b| b[4] = 1).contains("32-bit"));
        assert!(with(&|b| b[18] = 3).contains("not x86-64"));
        assert!(with(&|b| b[16] = 1).contains("not an executable"));
        assert!(with(&|b| b[64..68].copy_from_slice(&PT_INTERP.to_le_bytes())).contains("dynamically linked"));
        assert!(with(&|b| b.truncate(0x800)).contains("past the end of the file"));
        assert!(with(&|b| b[32..40].copy_from_slice(&0xffff_0000u64.to_le_bytes())).contains("program headers"));
        assert!(with(&|b| b[24..32].copy_from_slice(&0x50_0000u64.to_le_bytes())).contains("entry point"));
        let kernel = elf(2, 0xffff_ffff_8000_1000, &[(0xffff_ffff_8000_0000, 0x2000, 0x2000, PF_X)]);
        assert!(parse(&kernel).unwrap_err().to_string().contains("outside the user half"));
        let low = elf(2, 0x1000, &[(0x0, 0x2000, 0x2000, PF_X)]);
        assert!(parse(&low).unwrap_err().to_string().contains("outside the user half"));
        let overlap = elf(2, 0x40_1000, &[(0x40_0000, 0x1800, 0x1800, PF_X), (0x40_1900, 0x10, 0x10, PF_W)]);
        assert!(parse(&overlap).unwrap_err().to_string().contains("overlaps"));
    }
}
