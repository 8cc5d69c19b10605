//! Boot state: the VMM enters the kernel directly in 64-bit mode, with boot page
//! tables that map the kernel image high and all of RAM in a direct map (both with
//! 2 MiB pages), a three-entry GDT, and a [`BootInfo`] whose address is in `rdi`.
//!
//! These are plain functions over guest memory, tested without KVM.

use crate::machine::memory::{self, GuestMem};
use guest_abi::{
    BootInfo, BOOT_GDT_PHYS, BOOT_INFO_MAGIC, BOOT_INFO_PHYS, BOOT_PML4_PHYS, DIRECT_MAP_BASE, KERNEL_VIRT_BASE,
};
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

const P: u64 = 1;
const W: u64 = 2;
const PS: u64 = 1 << 7;
const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const GIB: u64 = 1 << 30;

const GDT: [u64; 3] = [0, 0x00af_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
/// SSE in ring 3 (Linux programs use it from their first instructions); ring 0 and the
/// runtime never do. OSXSAVE stays off: no AVX state (the emulated ring 0 cannot XSAVE).
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// `syscall` is enabled: on our hosts it lands at LSTAR, still in ring 3, where the
/// kernel's Linux gate traps (docs/linux-programs.md).
const EFER_SCE: u64 = 1;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

/// Writes the boot page tables for `mem_size` bytes of RAM (at most 3 GiB).
///
/// Layout: PML4 at [`BOOT_PML4_PHYS`]; then the PDPT and PD of the kernel's high
/// mapping (first GiB of RAM at [`KERNEL_VIRT_BASE`]); then the direct map's PDPT and
/// one PD per GiB.
pub fn write_page_tables(mem: &GuestMem, mem_size: u64) -> Result<(), memory::Error> {
    let pml4 = BOOT_PML4_PHYS;
    let (high_pdpt, high_pd, direct_pdpt) = (pml4 + PAGE, pml4 + 2 * PAGE, pml4 + 3 * PAGE);
    let set = |addr: u64, value: u64| memory::write(mem, addr, &value.to_le_bytes());
    set(pml4 + index(KERNEL_VIRT_BASE, 4) * 8, high_pdpt | P | W)?;
    set(high_pdpt + index(KERNEL_VIRT_BASE, 3) * 8, high_pd | P | W)?;
    for i in 0..512 {
        set(high_pd + i * 8, (i * HUGE) | P | W | PS)?;
    }
    set(pml4 + index(DIRECT_MAP_BASE, 4) * 8, direct_pdpt | P | W)?;
    for gib in 0..mem_size.div_ceil(GIB) {
        let pd = direct_pdpt + (gib + 1) * PAGE;
        set(direct_pdpt + gib * 8, pd | P | W)?;
        for i in 0..512 {
            let pa = gib * GIB + i * HUGE;
            if pa < mem_size {
                set(pd + i * 8, pa | P | W | PS)?;
            }
        }
    }
    Ok(())
}

pub fn write_gdt(mem: &GuestMem) -> Result<(), memory::Error> {
    let bytes: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    memory::write(mem, BOOT_GDT_PHYS, &bytes)
}

/// Where the script goes (the page after the kernel) and the first free page after
/// it: `(script_phys, free_phys)`, or `None` if that overflows. Callers check that it
/// fits in guest memory before writing anything.
pub fn place_script(kernel_end: u64, script_len: u64) -> Option<(u64, u64)> {
    let script_phys = kernel_end.checked_next_multiple_of(PAGE)?;
    let free_phys = script_phys.checked_add(script_len)?.checked_next_multiple_of(PAGE)?;
    Some((script_phys, free_phys))
}

/// Places the script after the kernel, then `exec` (a Linux program's
/// [`guest_abi::exec::Image`] and its frames, built for the address
/// `place_script(..).1`, empty for none), and writes the boot info; returns it.
pub fn write_boot_info(mem: &GuestMem, mem_size: u64, kernel_end: u64, script: &[u8], exec: &[u8]) -> Result<BootInfo, memory::Error> {
    let overflow = || memory::Error::OutOfRange { addr: kernel_end, len: script.len() + exec.len() };
    let (script_phys, after_script) = place_script(kernel_end, script.len() as u64).ok_or_else(overflow)?;
    memory::write(mem, script_phys, script)?;
    let (exec_phys, free_phys) = if exec.is_empty() {
        (0, after_script)
    } else {
        memory::write(mem, after_script, exec)?;
        (after_script, after_script.checked_add(exec.len() as u64).and_then(|e| e.checked_next_multiple_of(PAGE)).ok_or_else(overflow)?)
    };
    let info = BootInfo { magic: BOOT_INFO_MAGIC, mem_size, script_phys, script_len: script.len() as u64, free_phys, exec_phys, tsc_khz: 0, boot_unix_ns: 0 };
    let words = [info.magic, info.mem_size, info.script_phys, info.script_len, info.free_phys, info.exec_phys];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    memory::write(mem, BOOT_INFO_PHYS, &bytes)?;
    Ok(info)
}

/// Fills the boot info's clock: the guest TSC's rate and the wall-clock time now, just
/// before the vCPU first runs.
pub fn write_clock(mem: &GuestMem, tsc_khz: u64) -> Result<(), memory::Error> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos() as u64;
    let mut bytes = tsc_khz.to_le_bytes().to_vec();
    bytes.extend(now.to_le_bytes());
    memory::write(mem, BOOT_INFO_PHYS + guest_abi::BOOT_INFO_CLOCK_OFFSET, &bytes)
}

/// A flat 64-bit code or data segment with privilege level `dpl`.
pub fn flat_segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode with the boot GDT and page tables, starting from KVM's reset values.
pub fn long_mode_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    sregs.cs = flat_segment(CODE_SEL, true, 0);
    let data = flat_segment(DATA_SEL, false, 0);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.gdt.base = BOOT_GDT_PHYS;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = BOOT_PML4_PHYS;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA | EFER_NXE;
    sregs
}

/// The kernel's entry registers: `rip` = entry, `rdi` = boot info.
pub fn entry_regs(entry: u64) -> kvm_regs {
    kvm_regs { rip: entry, rdi: BOOT_INFO_PHYS, rflags: 2, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu::{GuestPhysAddr, GuestVirtAddr, PagingMode, Translation, Walker};

    #[test]
    fn boot_tables_map_kernel_and_direct_map() {
        let size = 3 * GIB;
        let mem = memory::create(size).unwrap();
        write_page_tables(&mem, size).unwrap();
        let phys = memory::Phys(&mem);
        let w = Walker::new(PagingMode::Level4);
        let t = |va| match w.translate(&phys, GuestPhysAddr(BOOT_PML4_PHYS), GuestVirtAddr(va)).unwrap() {
            Translation::Mapped { frame, offset, .. } => Some(frame.0 + offset),
            Translation::NotMapped { .. } => None,
        };
        assert_eq!(t(KERNEL_VIRT_BASE + 0x10_0123), Some(0x10_0123));
        assert_eq!(t(DIRECT_MAP_BASE + 0x8765_4321), Some(0x8765_4321));
        assert_eq!(t(DIRECT_MAP_BASE + size - 1), Some(size - 1));
        assert_eq!(t(DIRECT_MAP_BASE + size), None);
        assert_eq!(t(0x40_0000), None, "the user half is empty at boot");
    }

    #[test]
    fn boot_info_places_script_after_kernel() {
        let mem = memory::create(64 << 20).unwrap();
        let info = write_boot_info(&mem, 64 << 20, 0x12_3456, b"proc a\n", &[]).unwrap();
        assert_eq!(info.script_phys, 0x12_4000);
        assert_eq!(info.free_phys, 0x12_5000);
        assert_eq!(info.exec_phys, 0);
        let info = write_boot_info(&mem, 64 << 20, 0x12_3456, b"proc a\n", &[7; 4097]).unwrap();
        assert_eq!((info.exec_phys, info.free_phys), (0x12_5000, 0x12_7000), "a program goes after the script");
        assert_eq!(memory::read(&mem, 0x12_5000 + 4096, 1).unwrap(), [7]);
        assert_eq!(memory::read(&mem, 0x12_4000, 7).unwrap(), b"proc a\n");
        assert_eq!(memory::read(&mem, BOOT_INFO_PHYS, 8).unwrap(), BOOT_INFO_MAGIC.to_le_bytes());
        assert_eq!(place_script(0x12_3456, 7), Some((0x12_4000, 0x12_5000)));
        assert_eq!(place_script(u64::MAX - 5, 0), None);
        assert_eq!(place_script(0x1000, u64::MAX), None);
    }
}
