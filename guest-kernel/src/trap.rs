//! Trap dispatch: page faults, the `ud2` system-call gate, the timer, and everything
//! that kills a process or the kernel.

use crate::console::{self, Line};
use crate::entry::TrapFrame;
use crate::mm::{self, Fault};
use crate::{arch, lapic, process, syscall};

const UD: u64 = 6;
const PF: u64 = 14;

fn from_user(frame: &TrapFrame) -> bool {
    frame.cs & 3 == 3
}

/// Called by every trap stub with the saved registers; may replace them (task switch).
pub extern "C" fn dispatch(frame: &mut TrapFrame) {
    match frame.vector {
        // Whatever CS `syscall` left (it stays in ring 3 on our hosts), the gate's
        // address says it is a Linux program's system call.
        UD if frame.rip == crate::entry::linux_gate() => crate::linux::syscall::enter(frame),
        PF if from_user(frame) => page_fault(frame),
        UD if from_user(frame) => invalid_opcode(frame),
        PF if arch::read_cr2() < workload::USER_TOP => kernel_touch_of_user_page(frame),
        v if v == u64::from(lapic::TIMER_VECTOR) => {
            lapic::eoi();
            lapic::arm();
            process::switch_next(frame);
        }
        v if v == u64::from(lapic::SPURIOUS_VECTOR) => {}
        _ if from_user(frame) => kill(frame, "unexpected exception", frame.vector),
        _ => kernel_fault(frame),
    }
}

fn page_fault(frame: &mut TrapFrame) {
    let addr = arch::read_cr2();
    let write = frame.error & 2 != 0;
    if frame.error & 8 != 0 {
        return kill(frame, "reserved bit set in page table at", addr);
    }
    match process::update(|slot, zero| mm::fault(slot, addr, write, zero)) {
        Fault::Resolved => {}
        Fault::Kill(why) => kill(frame, why, addr),
    }
}

/// Ring 0 touching a Linux program's page, which it made present first
/// (`linux::uaccess`): only a stale entry gets here; fixed, ring 0 retries.
fn kernel_touch_of_user_page(frame: &mut TrapFrame) {
    let write = frame.error & 2 != 0;
    match process::update(|slot, zero| mm::fault(slot, arch::read_cr2(), write, zero)) {
        Fault::Resolved => {}
        Fault::Kill(_) => kernel_fault(frame),
    }
}

fn invalid_opcode(frame: &mut TrapFrame) {
    if crate::linux::is_linux(process::current_index()) {
        // A Linux program has no other gate; its `ud2` is SIGILL (a shell reports 132).
        console::emit(Line::new().str("kernel: pid ").dec(process::current_pid().into()).str(" (")
            .bytes(process::current_name()).str("): illegal instruction at ").hex(frame.rip).str(", killed"));
        return process::exit_current(frame, 132, true);
    }
    // The runtime's code is in the kernel image, which ring 0 can read.
    let at = frame.rip as *const [u8; 2];
    let is_gate = frame.rip >= guest_abi::KERNEL_VIRT_BASE
        // SAFETY: ring-3 code executes only from the kernel image (user-executable text),
        // which is mapped in every address space; two bytes from `rip` are inside it.
        && unsafe { at.read_unaligned() } == [0x0f, 0x0b];
    if !is_gate {
        return kill(frame, "illegal instruction at", frame.rip);
    }
    frame.rip += 2;
    syscall::handle(frame);
}

/// Kills the current process with a console message naming it.
pub fn kill(frame: &mut TrapFrame, why: &str, value: u64) {
    console::emit(Line::new().str("kernel: pid ").dec(process::current_pid().into()).str(" (")
        .bytes(process::current_name()).str("): ").str(why).str(" ").hex(value).str(", killed"));
    process::exit_current(frame, process::KILLED_CODE, true);
}

fn kernel_fault(frame: &TrapFrame) -> ! {
    console::emit(Line::new().str("guest kernel panic: exception ").dec(frame.vector).str(" at rip ")
        .hex(frame.rip).str(" error ").hex(frame.error).str(" cr2 ").hex(arch::read_cr2()));
    arch::outl(guest_abi::EXIT_PORT, guest_abi::EXIT_KERNEL_PANIC);
    arch::halt_forever()
}
