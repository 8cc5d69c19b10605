//! A deliberately hostile guest, for the VMM's robustness tests (tests/hostile_guest.rs).
//!
//! The VMM trusts nothing it reads from guest memory; this image attacks that promise.
//! It publishes a valid process table (so the VMM's `ps`, `clear-refs`, `pagemap`,
//! `dirty-rate`, dumps, … all act on its "processes"), but the page tables behind those
//! processes are built to hurt: leaves that cover frames past the end of guest RAM,
//! tables that fan out to themselves, thousands of 1 GiB leaves, RAM full of tables.
//! No process ever runs: the image stays in ring 0 (which KVM emulates here, so it builds
//! everything with `rep stosq` and short loops), reports one `sync` so that a client can
//! attack the VMM while it is paused, then proves that guest RAM is still writable
//! everywhere and exits 0.
//!
//! The shape is chosen by the workload script: the name of its first `proc` (`pastram`,
//! `fanout`, `giant`, `ramfull`, `manymaps`). Every `proc` line becomes one process; all of them
//! share the same page tables (cross-process aliasing).
#![no_std]
#![no_main]

#[path = "../mem.rs"]
mod mem;

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};
use guest_abi::{
    state, BootInfo, MappingRecord, ProcSlot, ProcessTable, SyncRecord, DIRECT_MAP_BASE, EXIT_KERNEL_PANIC,
    EXIT_PORT, KERNEL_VIRT_BASE, MAX_MAPPINGS, MAX_PROCS, PROCESS_TABLE_MAGIC, PROCESS_TABLE_VERSION,
    PROC_NAME_LEN, SYNC_PORT,
};

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
// Accessed and dirty, as a CPU leaves them after use: `clear-refs 1` acts on accessed leaves.
const LEAF: u64 = P | W | U | A | D;
const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;

#[no_mangle]
static mut PROCESS_TABLE: ProcessTable = ProcessTable::EMPTY;
static mut SYNC: SyncRecord = SyncRecord { pid: 1, label_len: 7, label: *b"hostile\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0" };

#[repr(C, align(16))]
struct Stack([u8; 16384]);
#[no_mangle]
static mut HOSTILE_STACK: Stack = Stack([0; 16384]);

/// An IDT whose #PF gate exists (the VMM's pte engine arms its trap on it); every gate
/// points at `hostile_fault`, which ends the run as a kernel panic.
#[no_mangle]
static mut HOSTILE_IDT: [u64; 64] = [0; 64];

global_asm!(
    r#"
.section .text.entry, "ax"
.global _start
_start:
    cli
    lea rsp, [rip + HOSTILE_STACK + 16384]
    call {main}
2:  hlt
    jmp 2b
.global hostile_fault
hostile_fault:
    mov dx, {exit_port}
    mov eax, {panic}
    out dx, eax
3:  hlt
    jmp 3b
"#,
    main = sym hostile_main,
    exit_port = const EXIT_PORT,
    panic = const EXIT_KERNEL_PANIC + 1,
);

extern "C" {
    fn hostile_fault();
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    exit(EXIT_KERNEL_PANIC + 2)
}

fn outl(port: u16, value: u32) {
    // SAFETY: port I/O to the VMM's own devices; touches no memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) }
}

fn exit(status: u32) -> ! {
    outl(EXIT_PORT, status);
    loop {
        // SAFETY: halting with interrupts off; the VMM ends the run at the exit port.
        unsafe { asm!("hlt", options(nomem, nostack)) }
    }
}

/// Physical address of a kernel-image object.
fn phys_of<T>(p: *const T) -> u64 {
    p as u64 - KERNEL_VIRT_BASE
}

/// The direct map: every guest-physical byte, from the boot page tables.
fn virt(phys: u64) -> *mut u64 {
    (DIRECT_MAP_BASE + phys) as *mut u64
}

fn set(phys: u64, value: u64) {
    // SAFETY: `phys` is inside guest RAM (every caller's frame comes from `Frames`),
    // reached through the boot direct map.
    unsafe { virt(phys).write_volatile(value) }
}

/// Fills the 4 KiB page at `phys` with 512 copies of `value` (one emulated instruction).
fn fill_page(phys: u64, value: u64) {
    // SAFETY: one page of guest RAM through the direct map (as `set`).
    unsafe {
        asm!("rep stosq", inout("rdi") virt(phys) => _, inout("rcx") 512u64 => _, in("rax") value,
             options(nostack, preserves_flags))
    }
}

/// Hands out never-used (zero) frames from the end of the boot data up.
struct Frames {
    next: u64,
    end: u64,
}

impl Frames {
    fn take(&mut self) -> u64 {
        if self.next + 4096 > self.end {
            exit(EXIT_KERNEL_PANIC + 3);
        }
        let f = self.next;
        self.next += 4096;
        f
    }

    fn left(&self) -> u64 {
        (self.end - self.next) / 4096
    }
}

/// What one shape builds: the root table and the mappings to publish.
struct Shape {
    cr3: u64,
    mappings: [MappingRecord; MAX_MAPPINGS],
    nmappings: usize,
}

impl Shape {
    fn new(cr3: u64) -> Shape {
        Shape { cr3, mappings: [MappingRecord::default(); MAX_MAPPINGS], nmappings: 0 }
    }

    fn map(&mut self, start: u64, pages: u64) {
        let serial = self.nmappings as u64 + 1;
        self.mappings[self.nmappings] = MappingRecord { start, pages, flags: 0, _pad: 0, serial };
        self.nmappings += 1;
    }
}

/// Leaves past the end of RAM: a 1 GiB leaf at frame 0 (RAM is smaller), a 1 GiB leaf
/// wholly above RAM, a 2 MiB leaf just past the end, and 4 KiB leaves at the last page of
/// RAM (honest) and right after it.
fn past_ram(f: &mut Frames, mem_size: u64) -> Shape {
    let (pml4, pdpt, pd, pt) = (f.take(), f.take(), f.take(), f.take());
    set(pml4, pdpt | LEAF);
    set(pdpt + 8, LEAF | PS); // 0x4000_0000: 1 GiB at frame 0
    set(pdpt + 2 * 8, (4 * GIB) | LEAF | PS); // 0x8000_0000: 1 GiB at 4 GiB
    set(pdpt + 3 * 8, pd | LEAF); // 0xc000_0000
    set(pd, mem_size.next_multiple_of(MIB2) | LEAF | PS); // 2 MiB just past RAM
    set(pd + 8, pt | LEAF); // 0xc020_0000
    set(pt, (mem_size - 4096) | LEAF);
    set(pt + 8, mem_size | LEAF);
    set(pt + 2 * 8, (mem_size + 5 * 4096) | LEAF);
    let mut s = Shape::new(pml4);
    s.map(0x4000_0000, (3 * GIB + MIB2) / 4096);
    s
}

/// Every table fans out to one table of the next level; the PML4 also points at itself.
/// The lower halves lead to 1 GiB and 2 MiB leaves at frame 0.
fn fan_out(f: &mut Frames) -> Shape {
    let (pml4, pdpt, pd, pt) = (f.take(), f.take(), f.take(), f.take());
    fill_page(pml4, pdpt | LEAF);
    set(pml4 + 255 * 8, pml4 | LEAF);
    fill_page(pdpt, LEAF | PS);
    fill_page(pd, LEAF | PS);
    fill_page(pt, f.take() | LEAF);
    for i in 0..256 {
        set(pdpt + i * 8, pd | LEAF);
        set(pd + i * 8, pt | LEAF);
    }
    // The kernel half of a real PML4 belongs to the kernel; leave it empty.
    for i in 256..512 {
        set(pml4 + i * 8, 0);
    }
    let mut s = Shape::new(pml4);
    s.map(0x10000, (1 << 35) - 16);
    s
}

/// 256 distinct PDPTs full of 1 GiB leaves at frame 0: 131072 leaves, each claiming all
/// of RAM (and more).
fn giant(f: &mut Frames) -> Shape {
    let pml4 = f.take();
    for i in 0..256 {
        let pdpt = f.take();
        fill_page(pdpt, LEAF | PS);
        set(pml4 + i * 8, pdpt | LEAF);
    }
    let mut s = Shape::new(pml4);
    s.map(0x10000, (1 << 35) - 16);
    s
}

/// Free RAM full of page directories of 2 MiB leaves (all at frame 0), reached through
/// distinct PDPTs: the most leaves guest RAM can hold.
fn ram_full(f: &mut Frames) -> Shape {
    let pml4 = f.take();
    let mut pdpt = 0;
    let mut slot = 512;
    let mut top = 0;
    // Keep a few frames for the PDPTs: one per 512 directories.
    let pds = f.left() * 511 / 512 - 2;
    for _ in 0..pds {
        if slot == 512 {
            if top == 256 {
                break;
            }
            pdpt = f.take();
            set(pml4 + top * 8, pdpt | LEAF);
            top += 1;
            slot = 0;
        }
        let pd = f.take();
        fill_page(pd, LEAF | PS);
        set(pdpt + slot * 8, pd | LEAF);
        slot += 1;
    }
    let mut s = Shape::new(pml4);
    s.map(0x10000, (1 << 35) - 16);
    s
}

/// 64 mappings of 2^29 pages each (2 TiB), one small real table.
fn many_maps(f: &mut Frames) -> Shape {
    let (pml4, pdpt) = (f.take(), f.take());
    set(pml4, pdpt | LEAF);
    set(pdpt, LEAF | PS);
    let mut s = Shape::new(pml4);
    for i in 0..MAX_MAPPINGS as u64 {
        s.map(0x10000 + i * (1 << 41), (1 << 29) - 16);
    }
    s
}

/// The `proc NAME` lines of the script.
fn proc_names(script: &[u8], out: &mut [[u8; PROC_NAME_LEN]; MAX_PROCS]) -> usize {
    let mut n = 0;
    for line in script.split(|&b| b == b'\n') {
        let line = line.strip_prefix(b"proc ").unwrap_or(&[]);
        if line.is_empty() || n == MAX_PROCS {
            continue;
        }
        let len = line.iter().position(|b| !b.is_ascii_graphic()).unwrap_or(line.len()).min(PROC_NAME_LEN);
        out[n][..len].copy_from_slice(&line[..len]);
        n += 1;
    }
    n
}

fn load_idt() {
    let handler = hostile_fault as *const () as u64;
    // SAFETY: ring 0 with interrupts off; the table is a static that lives forever.
    unsafe {
        let idt = &mut *addr_of_mut!(HOSTILE_IDT);
        for v in 0..32 {
            idt[2 * v] = (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
            idt[2 * v + 1] = handler >> 32;
        }
        let desc: [u16; 5] = [
            (32 * 16 - 1) as u16,
            idt.as_ptr() as u64 as u16,
            (idt.as_ptr() as u64 >> 16) as u16,
            (idt.as_ptr() as u64 >> 32) as u16,
            (idt.as_ptr() as u64 >> 48) as u16,
        ];
        asm!("lidt [{}]", in(reg) desc.as_ptr(), options(nostack, preserves_flags));
    }
}

extern "C" fn hostile_main(boot_phys: u64) -> ! {
    // SAFETY: the VMM wrote a BootInfo at `boot_phys` (rdi) before starting the vCPU.
    let info: BootInfo = unsafe { (virt(boot_phys) as *const BootInfo).read_volatile() };
    // SAFETY: the VMM placed the script there and wrote its length; it stays untouched.
    let script = unsafe { core::slice::from_raw_parts(virt(info.script_phys) as *const u8, info.script_len as usize) };
    let mut names = [[0u8; PROC_NAME_LEN]; MAX_PROCS];
    let nprocs = proc_names(script, &mut names);
    load_idt();

    let mut frames = Frames { next: info.free_phys, end: info.mem_size };
    let zero = frames.take();
    let shape = match &names[0][..] {
        n if n.starts_with(b"pastram\0") => past_ram(&mut frames, info.mem_size),
        n if n.starts_with(b"fanout\0") => fan_out(&mut frames),
        n if n.starts_with(b"giant\0") => giant(&mut frames),
        n if n.starts_with(b"ramfull\0") => ram_full(&mut frames),
        n if n.starts_with(b"manymaps\0") => many_maps(&mut frames),
        _ => exit(EXIT_KERNEL_PANIC + 4),
    };

    // SAFETY: ring 0, one vCPU, nothing else touches the table; the VMM reads it only
    // while the guest is stopped.
    unsafe {
        let t = &mut *addr_of_mut!(PROCESS_TABLE);
        t.version = PROCESS_TABLE_VERSION;
        t.max_procs = MAX_PROCS as u32;
        t.max_mappings = MAX_MAPPINGS as u32;
        t.slot_size = core::mem::size_of::<ProcSlot>() as u32;
        t.nprocs = nprocs as u32;
        t.zero_frame = zero;
        for (i, name) in names.iter().enumerate().take(nprocs) {
            let s = &mut t.procs[i];
            s.pid = i as u32 + 1;
            s.state = state::RUNNABLE;
            s.name = *name;
            s.cr3 = shape.cr3;
            s.nmappings = shape.nmappings as u32;
            s.mappings = shape.mappings;
        }
        t.magic = PROCESS_TABLE_MAGIC;
    }

    outl(SYNC_PORT, phys_of(addr_of!(SYNC)) as u32);

    // Resumed: every 2 MiB of RAM above the boot data must still be writable (a VMM
    // that left its mapping of guest RAM read-only fails KVM_RUN here).
    let mut block = info.free_phys.next_multiple_of(MIB2);
    while block < info.mem_size {
        set(block, 0x5a5a_5a5a);
        block += MIB2;
    }
    // And the process table itself (what `clear-refs 5` writes).
    // SAFETY: as above.
    unsafe { (*addr_of_mut!(PROCESS_TABLE)).procs[0].peak_rss_pages = 1 };
    exit(0)
}
