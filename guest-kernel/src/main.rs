//! softdirty-vmm's guest kernel: runs each `proc` of a workload script as a ring-3
//! process with its own page tables, and publishes a process table the VMM reads from
//! outside. See docs/guest-kernel.md.
//!
//! On our hosts ring 0 runs in KVM's instruction emulator (~1 us per instruction, no
//! SSE): ring 0 only edits page tables and switches tasks; ring 3 does the work.
#![no_std]
#![no_main]

mod arch;
mod console;
mod entry;
mod frames;
mod global;
mod lapic;
mod linux;
mod mem;
mod mm;
mod paging;
mod process;
mod syscall;
mod trap;
mod user;

use console::Line;
use guest_abi::{BootInfo, BOOT_INFO_MAGIC, KERNEL_VIRT_BASE, LAPIC_PHYS, LAPIC_VIRT, SCRIPT_VIRT};
use paging::{NX, PCD, PWT, U, W};

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __ustack_start: u8;
    static __ustack_end: u8;
    static __image_end: u8;
}

/// Prints `msg` and ends the run with the kernel-panic status.
pub fn panic_msg(msg: &str) -> ! {
    console::emit(Line::new().str("guest kernel panic: ").str(msg));
    arch::outl(guest_abi::EXIT_PORT, guest_abi::EXIT_KERNEL_PANIC);
    arch::halt_forever()
}

fn in_user_mode() -> bool {
    let cs: u64;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new();
    line.str("panic: ").str(info.message().as_str().unwrap_or("(formatted message)"));
    if let Some(loc) = info.location() {
        line.str(" at ").str(loc.file()).str(":").dec(loc.line().into());
    }
    if in_user_mode() {
        // A bug in the ring-3 runtime: end this process, not the kernel.
        line.str("\n");
        let b = line.as_bytes();
        // SAFETY: the system-call gate; WRITE then EXIT, which does not return.
        unsafe {
            core::arch::asm!("ud2", inlateout("rax") guest_abi::syscall::WRITE => _, in("rdi") b.as_ptr(), in("rsi") b.len(), in("rdx") 0);
            core::arch::asm!("ud2", in("rax") guest_abi::syscall::EXIT, in("rdi") 101u64, in("rsi") 0, in("rdx") 0);
        }
        loop {
            core::hint::spin_loop();
        }
    }
    panic_msg(core::str::from_utf8(line.as_bytes()).unwrap_or("panic"))
}

fn sym(s: &u8) -> u64 {
    s as *const u8 as u64
}

fn map_image_range(pml4: u64, start: u64, end: u64, flags: u64) {
    let mut va = start;
    while va < end {
        if paging::map_4k(pml4, va, va - KERNEL_VIRT_BASE, flags).is_err() {
            panic_msg("out of memory for kernel page tables");
        }
        va += frames::PAGE;
    }
}

/// Builds the kernel half: the image with per-section rights, the direct map, the
/// script (user-readable) and the local APIC.
fn build_kernel_tables(boot: &BootInfo) -> u64 {
    let Some(pml4) = frames::alloc() else { panic_msg("out of memory") };
    // SAFETY: only the addresses of the linker symbols are used.
    let (image, text_end, rodata_end, us_start, us_end, image_end) = unsafe {
        (sym(&__image_start), sym(&__text_end), sym(&__rodata_end), sym(&__ustack_start), sym(&__ustack_end),
         sym(&__image_end))
    };
    map_image_range(pml4, image, text_end, U); // code: ring 0 and the runtime
    map_image_range(pml4, text_end, rodata_end, U | NX);
    map_image_range(pml4, rodata_end, us_start, W | NX);
    map_image_range(pml4, us_start, us_end, U | W | NX);
    map_image_range(pml4, us_end, image_end, W | NX);
    let mut pa = 0;
    while pa < boot.mem_size {
        if paging::map_2m(pml4, guest_abi::DIRECT_MAP_BASE + pa, pa, W | NX).is_err() {
            panic_msg("out of memory for the direct map");
        }
        pa += frames::HUGE;
    }
    let mut off = 0;
    while off < boot.script_len {
        if paging::map_4k(pml4, SCRIPT_VIRT + off, boot.script_phys + off, U | NX).is_err() {
            panic_msg("out of memory mapping the script");
        }
        off += frames::PAGE;
    }
    if paging::map_4k(pml4, LAPIC_VIRT, LAPIC_PHYS, W | PCD | PWT | NX).is_err() {
        panic_msg("out of memory mapping the local APIC");
    }
    pml4
}

extern "C" fn kmain(boot_info_phys: u64) -> ! {
    // SAFETY: the VMM wrote a BootInfo there; its boot tables direct-map all RAM.
    let boot = unsafe { (frames::phys_to_virt(boot_info_phys) as *const BootInfo).read() };
    if boot.magic != BOOT_INFO_MAGIC {
        panic_msg("bad boot info magic");
    }
    let exec = (boot.exec_phys != 0).then(|| linux::read_image(boot.exec_phys, boot.mem_size, boot.free_phys));
    if exec.is_some_and(|image| image.flags & guest_abi::exec::LOG_APART != 0) {
        // A Linux program's output is the console: the kernel's lines go to the log port.
        console::log_apart();
    }
    console::emit(Line::new().str("guest kernel: ").dec(boot.mem_size >> 20).str(" MiB, script ")
        .dec(boot.script_len).str(" bytes"));
    linux::init_clock(boot.tsc_khz, boot.boot_unix_ns);
    frames::init(boot.free_phys, boot.mem_size);
    let Some(zero_frame) = frames::alloc() else { panic_msg("out of memory") };
    let pml4 = build_kernel_tables(&boot);
    // SAFETY: the new tables map the whole kernel half, including this code and stack.
    unsafe { arch::write_cr3(pml4) };
    arch::init_cpu_tables();
    // SAFETY: the script is mapped at SCRIPT_VIRT for script_len bytes from here on.
    let script = unsafe { core::slice::from_raw_parts(SCRIPT_VIRT as *const u8, boot.script_len as usize) };
    process::create_all(pml4, script, SCRIPT_VIRT, zero_frame, exec);
    lapic::init();
    process::start()
}
