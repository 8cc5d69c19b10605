//! The ring-3 runtime: each process runs its block of the workload script here,
//! natively (ring 3 is not emulated on our hosts). It touches no kernel data: only its
//! stack, the script and its own user-half mappings, and talks to the kernel through
//! `ud2` system calls.

use crate::console::Line;
use guest_abi::syscall as nr;
use core::arch::asm;
use guest_abi::mapping_flags::{HUGE, READ_ONLY, SHARED};
use workload::{BlockCursor, Protection, Range, Statement, PAGE_SIZE};

fn syscall(num: u64, a: u64, b: u64, c: u64) -> i64 {
    let ret: u64;
    // SAFETY: `ud2` traps into the kernel's system-call gate, which returns with only
    // rax changed.
    unsafe { asm!("ud2", inlateout("rax") num => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack)) };
    ret as i64
}

fn exit(code: u8) -> ! {
    syscall(nr::EXIT, u64::from(code), 0, 0);
    // The kernel never returns from EXIT; spin rather than fall off the end.
    loop {
        core::hint::spin_loop();
    }
}

fn write_line(line: &mut Line) {
    line.str("\n");
    let bytes = line.as_bytes();
    syscall(nr::WRITE, bytes.as_ptr() as u64, bytes.len() as u64, 0);
}

struct Ctx<'a> {
    pid: u64,
    name: &'a str,
}

impl Ctx<'_> {
    fn prefix(&self, line_no: u32) -> Line {
        let mut l = Line::new();
        l.str("pid ").dec(self.pid).str(" (").str(self.name).str("): line ").dec(line_no.into()).str(": ");
        l
    }

    fn fail_errno(&self, line_no: u32, what: &str, ret: i64) -> ! {
        let why = match -ret {
            12 => "out of memory or mappings",
            22 => "invalid range (huge pages split only at 2 MiB)",
            _ => "error",
        };
        write_line(self.prefix(line_no).str(what).str(" failed: ").str(why));
        exit(1)
    }
}

/// Entry point of every process (`rdi` = proc index, `rsi`/`rdx` = the script).
pub extern "C" fn user_main(index: u64, script: *const u8, len: u64) -> ! {
    // SAFETY: the kernel maps the script read-only at `script` for `len` bytes in every
    // process, for the whole run.
    let script = unsafe { core::slice::from_raw_parts(script, len as usize) };
    let name = workload::proc_names(script).nth(index as usize).map_or("?", |(_, n)| n);
    let ctx = Ctx { pid: index + 1, name };
    let Some(mut cursor) = BlockCursor::for_proc(script, index as usize) else { exit(2) };
    while let Some(next) = cursor.next_action() {
        match next {
            Ok((line_no, stmt)) => run(&ctx, line_no, stmt),
            Err(e) => {
                write_line(ctx.prefix(e.line).str(e.error.kind.describe()));
                exit(2)
            }
        }
    }
    exit(0)
}

fn run(ctx: &Ctx, line_no: u32, stmt: Statement) {
    match stmt {
        Statement::Map { range, huge, read_only, shared } => {
            let flags = if huge { HUGE } else { 0 } | if read_only { READ_ONLY } else { 0 } | if shared { SHARED } else { 0 };
            let ret = syscall(nr::MAP, range.addr, range.pages, u64::from(flags));
            if ret < 0 {
                ctx.fail_errno(line_no, "map", ret);
            }
        }
        Statement::Unmap { range } => {
            let ret = syscall(nr::UNMAP, range.addr, range.pages, 0);
            if ret < 0 {
                ctx.fail_errno(line_no, "unmap", ret);
            }
        }
        Statement::Protect { range, prot } => {
            let ret = syscall(nr::PROTECT, range.addr, range.pages, u64::from(prot == Protection::ReadOnly));
            if ret < 0 {
                ctx.fail_errno(line_no, "protect", ret);
            }
        }
        Statement::Fill { range, byte, timed: false } => fill(range, byte),
        Statement::Fill { range, byte, timed: true } => {
            let t0 = rdtsc();
            fill(range, byte);
            let cycles = rdtsc() - t0;
            write_line(ctx.prefix(line_no).str("fill of ").dec(range.pages).str(" pages took ").dec(cycles)
                .str(" TSC cycles"));
        }
        Statement::Check { range, byte } => check(ctx, line_no, range, byte),
        Statement::Touch { range } => {
            for page in 0..range.pages {
                // SAFETY: a read of the user's own address; a bad one faults and the
                // kernel kills the process, which is the statement's meaning.
                unsafe { core::ptr::read_volatile((range.addr + page * PAGE_SIZE) as *const u8) };
            }
        }
        Statement::Sync { label } => {
            syscall(nr::SYNC, label.as_ptr() as u64, label.len() as u64, 0);
        }
        Statement::Yield => {
            syscall(nr::YIELD, 0, 0, 0);
        }
        Statement::Exit { code } => exit(code),
        Statement::Proc { .. } | Statement::Loop { .. } | Statement::End => {}
    }
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter (CR4.TSD is clear: allowed in ring 3).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn pattern(byte: u8) -> u64 {
    u64::from(byte) * 0x0101_0101_0101_0101
}

fn fill(range: Range, byte: u8) {
    // SAFETY: writes only the user-half range named by the script; faults there are
    // resolved or kill the process, never corrupt anything else.
    unsafe {
        asm!("rep stosq", inout("rdi") range.addr => _, inout("rcx") range.len() / 8 => _, in("rax") pattern(byte),
             options(nostack, preserves_flags))
    };
}

fn check(ctx: &Ctx, line_no: u32, range: Range, byte: u8) {
    let want = pattern(byte);
    let words = range.len() / 8;
    for i in 0..words {
        let at = range.addr + i * 8;
        // SAFETY: reads the user-half range named by the script (see `fill`).
        let got = unsafe { core::ptr::read_volatile(at as *const u64) };
        if got != want {
            let diff = got ^ want;
            let byte_index = diff.trailing_zeros() / 8;
            let found = (got >> (byte_index * 8)) as u8;
            write_line(ctx.prefix(line_no).str("check failed at ").hex(at + u64::from(byte_index))
                .str(": expected ").hex(byte.into()).str(", found ").hex(found.into()));
            exit(1);
        }
    }
}
