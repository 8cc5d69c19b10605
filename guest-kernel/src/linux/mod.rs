//! Linux programs as processes: the first `proc` of the script runs the static program
//! the VMM laid out ([`guest_abi::exec::Image`]: segments, filled frames, initial
//! stack) instead of the ring-3 runtime, and its `syscall`s reach [`syscall::enter`].
//!
//! Per process: its program break, its FS base (TLS) and a count of the system calls it
//! made that are not implemented (reported when it ends).

mod clock;
mod files;
mod fs;
pub mod syscall;
mod uaccess;

pub use clock::init as init_clock;

use crate::arch::{self, USER_CS, USER_DS};
use crate::console::{self, Line};
use crate::entry::TrapFrame;
use crate::global::Global;
use crate::{frames, mm, process};
use guest_abi::exec::{Image, MAGIC, MAX_SEGMENTS};
use guest_abi::{ProcSlot, MAX_PROCS};

/// Distinct unimplemented system calls remembered per process (more are summed).
const MAX_UNIMPLEMENTED: usize = 8;

#[derive(Clone, Copy)]
struct LinuxProc {
    active: bool,
    brk_start: u64,
    brk: u64,
    /// The initial stack pointer (Linux's `start_stack`).
    start_stack: u64,
    fs_base: u64,
    /// (number, calls) of unimplemented system calls, and calls of others beyond those.
    unimplemented: [(u64, u64); MAX_UNIMPLEMENTED],
    more_unimplemented: u64,
    fds: [files::Fd; files::MAX_FDS],
}

const NONE: LinuxProc = LinuxProc {
    active: false,
    brk_start: 0,
    brk: 0,
    start_stack: 0,
    fs_base: 0,
    unimplemented: [(0, 0); MAX_UNIMPLEMENTED],
    more_unimplemented: 0,
    fds: files::INITIAL,
};

static PROCS: Global<[LinuxProc; MAX_PROCS]> = Global::new([NONE; MAX_PROCS]);
/// The FS base loaded in the CPU (switched only when it differs).
static LOADED_FS: Global<u64> = Global::new(0);

fn procs() -> &'static mut [LinuxProc; MAX_PROCS] {
    // SAFETY: ring 0 on one vCPU; callers never hold two of these at once.
    unsafe { PROCS.get() }
}

fn current() -> &'static mut LinuxProc {
    &mut procs()[process::current_index()]
}

/// The frame a page fault in a file mapping of the current process maps (see
/// [`fs::fault_frame`]).
pub fn file_fault_frame(serial: u64, page_va: u64, shared: bool) -> Result<u64, &'static str> {
    fs::fault_frame(serial, page_va, shared)
}

/// Process `index`'s program break (Linux's `start_brk` and `brk`) and initial stack
/// pointer (`start_stack`): zeros if it is not a Linux program.
pub fn break_and_stack(index: usize) -> ((u64, u64), u64) {
    let p = &procs()[index];
    if p.active { ((p.brk_start, p.brk), p.start_stack) } else { ((0, 0), 0) }
}

/// Is process `index` a Linux program?
pub fn is_linux(index: usize) -> bool {
    procs()[index].active
}

/// The image the VMM wrote at `phys`, checked: trusted less than our own code, so
/// nothing in it is used before it is checked against guest RAM.
pub fn read_image(phys: u64, mem_size: u64, free_phys: u64) -> &'static Image {
    if !phys.is_multiple_of(frames::PAGE) || phys.checked_add(core::mem::size_of::<Image>() as u64).is_none_or(|e| e > mem_size) {
        crate::panic_msg("the program image is outside guest RAM");
    }
    // SAFETY: the range lies inside guest RAM, direct-mapped; the VMM wrote an Image
    // there (plain u64 fields) and nothing else writes it.
    let image = unsafe { &*(frames::phys_to_virt(phys) as *const Image) };
    if image.magic != MAGIC || image.nsegments as usize > MAX_SEGMENTS {
        crate::panic_msg("bad program image (magic or segment count)");
    }
    files::init(image.files, phys, free_phys);
    for seg in &image.segments[..image.nsegments as usize] {
        let fill_end = seg.fill_phys.checked_add(seg.fill_pages * frames::PAGE);
        let inside = seg.fill_va >= seg.va && seg.fill_va + seg.fill_pages * frames::PAGE <= seg.va + seg.pages * frames::PAGE;
        if seg.fill_pages > 0 && (seg.fill_phys < phys || fill_end.is_none_or(|e| e > free_phys) || !inside) {
            crate::panic_msg("bad program image (filled frames)");
        }
    }
    image
}

/// Makes process `index` (its slot set up, its tables empty) run `image`; returns its
/// first frame.
pub fn create(index: usize, slot: &mut ProcSlot, image: &Image, zero_frame: u64) -> TrapFrame {
    for seg in &image.segments[..image.nsegments as usize] {
        let serial = process::next_serial();
        if mm::map(slot, seg.va, seg.pages, seg.flags as u32, serial, zero_frame).is_err() {
            crate::panic_msg("the program's segments do not fit its address space");
        }
        if seg.fill_pages > 0 {
            if let Err(why) = mm::map_filled(slot, seg.fill_va, seg.fill_pages, seg.fill_phys) {
                crate::panic_msg(why);
            }
        }
    }
    procs()[index] = LinuxProc { active: true, brk_start: image.brk, brk: image.brk, start_stack: image.rsp, ..NONE };
    // Linux enters a program with every general register zero (glibc's _start passes
    // rdx on as the exit hook: it must be 0).
    TrapFrame { rip: image.entry, cs: u64::from(USER_CS), rflags: 0x202, rsp: image.rsp, ss: u64::from(USER_DS), ..TrapFrame::default() }
}

/// Process `index` runs next: its TLS base goes into the CPU.
pub fn switched_to(index: usize) {
    let p = &procs()[index];
    // SAFETY: ring 0; no other reference to the global.
    let loaded = unsafe { LOADED_FS.get() };
    if p.active && p.fs_base != *loaded {
        arch::wrmsr(arch::MSR_FS_BASE, p.fs_base);
        *loaded = p.fs_base;
    }
}

fn set_fs_base(base: u64) {
    current().fs_base = base;
    arch::wrmsr(arch::MSR_FS_BASE, base);
    // SAFETY: ring 0; no other reference to the global.
    unsafe { *LOADED_FS.get() = base };
}

/// Counts a call of an unimplemented system call.
fn unimplemented(nr: u64) {
    let p = current();
    if let Some(e) = p.unimplemented.iter_mut().find(|e| e.1 > 0 && e.0 == nr) {
        e.1 += 1;
    } else if let Some(e) = p.unimplemented.iter_mut().find(|e| e.1 == 0) {
        *e = (nr, 1);
    } else {
        p.more_unimplemented += 1;
    }
}

/// Process `index` ended: says which unimplemented system calls it made, if any.
pub fn exited(index: usize) {
    if procs()[index].active {
        files::close_all();
        fs::prune_maps(index, |_| false);
    }
    let p = &procs()[index];
    if !p.active || p.unimplemented[0].1 == 0 {
        return;
    }
    let mut line = Line::new();
    line.str("kernel: pid ").dec(process::current_pid().into()).str(" (").bytes(process::current_name()).str("): unimplemented system calls:");
    for (i, &(nr, n)) in p.unimplemented.iter().filter(|e| e.1 > 0).enumerate() {
        line.str(if i == 0 { " " } else { ", " }).dec(nr).str(" x").dec(n);
    }
    if p.more_unimplemented > 0 {
        line.str(", others x").dec(p.more_unimplemented);
    }
    console::emit(&mut line);
}
