//! Processes: the published process table, creation, and round-robin scheduling.

use crate::arch::{USER_CS, USER_DS};
use crate::console::{self, Line};
use crate::entry::{Stack, TrapFrame};
use crate::global::Global;
use crate::{arch, frames, mm, paging};
use guest_abi::{state, ProcSlot, ProcessTable, MAX_MAPPINGS, MAX_PROCS, PROCESS_TABLE_MAGIC, PROCESS_TABLE_VERSION};

/// The table the VMM reads from outside (located through this ELF symbol).
#[no_mangle]
pub static PROCESS_TABLE: Global<ProcessTable> = Global::new(ProcessTable::EMPTY);

pub const USER_STACK_SIZE: usize = 16 * 1024;

#[link_section = ".bss.user_stacks"]
static USER_STACKS: Global<[Stack<USER_STACK_SIZE>; MAX_PROCS]> =
    Global::new([const { Stack([0; USER_STACK_SIZE]) }; MAX_PROCS]);

/// Exit code of a process killed by a fault (as a shell reports SIGSEGV).
pub const KILLED_CODE: u32 = 139;

struct Sched {
    frames: [TrapFrame; MAX_PROCS],
    current: usize,
    nprocs: usize,
    first_failure: Option<usize>,
    next_serial: u64,
    zero_frame: u64,
}

static SCHED: Global<Sched> = Global::new(Sched {
    frames: [TrapFrame {
        r15: 0, r14: 0, r13: 0, r12: 0, r11: 0, r10: 0, r9: 0, r8: 0, rbp: 0, rdi: 0, rsi: 0, rdx: 0,
        rcx: 0, rbx: 0, rax: 0, vector: 0, error: 0, rip: 0, cs: 0, rflags: 0, rsp: 0, ss: 0,
    }; MAX_PROCS],
    current: 0,
    nprocs: 0,
    first_failure: None,
    next_serial: 1,
    zero_frame: 0,
});

fn sched() -> &'static mut Sched {
    // SAFETY: ring 0 on one vCPU; callers never hold two of these at once.
    unsafe { SCHED.get() }
}

fn table() -> &'static mut ProcessTable {
    // SAFETY: as for `sched`.
    unsafe { PROCESS_TABLE.get() }
}

/// The 2 MiB zero block for read faults on huge mappings (allocated on first use,
/// never freed, published in the table).
pub fn huge_zero_frame() -> Option<u64> {
    // Called from inside `update`, which holds a reference to one slot: touch only this
    // field, through a raw pointer.
    // SAFETY: ring 0, single vCPU; the field is not borrowed by anyone else.
    unsafe {
        let field = &raw mut (*PROCESS_TABLE.as_ptr()).huge_zero_frame;
        if field.read() == 0 {
            field.write(frames::alloc_huge()?);
        }
        Some(field.read())
    }
}

/// Marks the table as being changed (odd sequence number) for the duration of `f`,
/// so a reader from outside knows not to trust a half-made change.
pub fn update<R>(f: impl FnOnce(&mut ProcSlot, u64) -> R) -> R {
    let t = table();
    let seq = &raw mut t.seq;
    // SAFETY: `seq` points into the live table; volatile so the write is not merged.
    unsafe { seq.write_volatile(seq.read_volatile() + 1) };
    let s = sched();
    let r = f(&mut t.procs[s.current], s.zero_frame);
    // SAFETY: as above.
    unsafe { seq.write_volatile(seq.read_volatile() + 1) };
    r
}

/// Is there a process `pid` (running, or ended and not yet gone)?
pub fn pid_exists(pid: u32) -> bool {
    table().procs.iter().any(|p| p.pid == pid && p.state != state::FREE)
}

/// The slot of the live process `pid`.
pub fn index_of(pid: u32) -> Option<usize> {
    table().procs.iter().position(|p| p.pid == pid && p.state != state::FREE)
}

/// The shared zero frame (read faults of anonymous memory map it).
pub fn zero_frame() -> u64 {
    sched().zero_frame
}

/// The running process's slot index.
pub fn current_index() -> usize {
    sched().current
}

pub fn current_pid() -> u32 {
    table().procs[sched().current].pid
}

pub fn current_name() -> &'static [u8] {
    let slot = &table().procs[sched().current];
    let len = slot.name.iter().position(|&b| b == 0).unwrap_or(slot.name.len());
    &slot.name[..len]
}

pub fn next_serial() -> u64 {
    let s = sched();
    s.next_serial += 1;
    s.next_serial - 1
}

/// Creates one process per `proc` of the script, sharing the kernel half of `kernel_pml4`;
/// with `exec`, the first one runs that Linux program.
pub fn create_all(kernel_pml4: u64, script: &[u8], script_va: u64, zero_frame: u64, exec: Option<&guest_abi::exec::Image>) {
    let t = table();
    let s = sched();
    // The table is made under its sequence lock too (odd while it is), so a reader never
    // keeps a half-made table (0 means never published).
    let seq = &raw mut t.seq;
    // SAFETY: `seq` points into the live table; volatile so the write is not merged.
    unsafe { seq.write_volatile(1) };
    s.zero_frame = zero_frame;
    t.magic = PROCESS_TABLE_MAGIC;
    t.version = PROCESS_TABLE_VERSION;
    t.max_procs = MAX_PROCS as u32;
    t.max_mappings = MAX_MAPPINGS as u32;
    t.slot_size = core::mem::size_of::<ProcSlot>() as u32;
    t.zero_frame = zero_frame;
    for (index, (_, name)) in workload::proc_names(script).take(MAX_PROCS).enumerate() {
        let Some(pml4) = frames::alloc() else { crate::panic_msg("out of memory creating processes") };
        // SAFETY: both tables are live page-table frames reached through the direct map;
        // the upper 256 entries (the kernel half) are copied once, with `rep movsq`.
        unsafe {
            core::arch::asm!("rep movsq",
                inout("rdi") paging::entry(pml4, 256) => _, inout("rsi") paging::entry(kernel_pml4, 256) => _,
                inout("rcx") 256u64 => _, options(nostack, preserves_flags));
        }
        let slot = &mut t.procs[index];
        slot.pid = index as u32 + 1;
        slot.state = state::RUNNABLE;
        slot.cr3 = pml4;
        let n = name.len().min(slot.name.len() - 1);
        slot.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        s.nprocs = index + 1;
        if let Some(image) = exec.filter(|image| image.proc_index == index as u64) {
            s.frames[index] = crate::linux::create(index, slot, image, zero_frame);
            continue;
        }
        // SAFETY: only the address of the stack is taken.
        let stack_top = unsafe { (&raw const USER_STACKS.get()[index]) as u64 } + USER_STACK_SIZE as u64;
        s.frames[index] = TrapFrame {
            rip: crate::user::user_main as *const () as u64,
            cs: u64::from(USER_CS),
            rflags: 0x202, // IF: the timer preempts ring 3
            rsp: stack_top - 8,
            ss: u64::from(USER_DS),
            rdi: index as u64,
            rsi: script_va,
            rdx: script.len() as u64,
            ..TrapFrame::default()
        };
    }
    t.nprocs = s.nprocs as u32;
    // SAFETY: as above.
    unsafe { seq.write_volatile(2) };
}

/// Runs the first process. Never returns.
pub fn start() -> ! {
    let s = sched();
    if s.nprocs == 0 {
        crate::panic_msg("the script has no proc");
    }
    s.current = 0;
    // SAFETY: the process's PML4 maps the kernel half, including this code.
    unsafe { arch::write_cr3(table().procs[0].cr3) };
    crate::linux::switched_to(0);
    let frame = s.frames[0];
    crate::entry::start(&frame)
}

/// Saves the interrupted process (if it still runs) and loads the next runnable one
/// into `frame`; ends the run when none is left.
pub fn switch_next(frame: &mut TrapFrame) {
    let s = sched();
    let t = table();
    let cur = s.current;
    if t.procs[cur].state == state::RUNNABLE {
        s.frames[cur] = *frame;
    }
    for step in 1..=s.nprocs {
        let next = (cur + step) % s.nprocs;
        if t.procs[next].state == state::RUNNABLE {
            s.current = next;
            *frame = s.frames[next];
            if next != cur {
                // SAFETY: every process PML4 maps the kernel half.
                unsafe { arch::write_cr3(t.procs[next].cr3) };
                crate::linux::switched_to(next);
            }
            return;
        }
    }
    finish()
}

/// Ends the current process with `code` and switches away from it.
pub fn exit_current(frame: &mut TrapFrame, code: u32, killed: bool) {
    let s = sched();
    let cur = s.current;
    crate::linux::exited(cur);
    update(|slot, zero| {
        slot.state = if killed { state::KILLED } else { state::EXITED };
        slot.exit_code = code;
        mm::release_all(slot, zero);
    });
    if code != 0 && s.first_failure.is_none() {
        s.first_failure = Some(cur);
    }
    switch_next(frame);
}

/// Everything has exited: report and end the run through the exit port.
fn finish() -> ! {
    let s = sched();
    let t = table();
    let status = match s.first_failure {
        Some(i) => {
            let slot = &t.procs[i];
            let len = slot.name.iter().position(|&b| b == 0).unwrap_or(0);
            console::emit(Line::new().str("kernel: all processes ended; first failure: pid ").dec(slot.pid.into())
                .str(" (").bytes(&slot.name[..len]).str(") with status ").dec(slot.exit_code.into()));
            slot.exit_code
        }
        None => {
            console::emit(Line::new().str("kernel: all processes exited 0"));
            0
        }
    };
    arch::outl(guest_abi::EXIT_PORT, status);
    arch::halt_forever()
}
