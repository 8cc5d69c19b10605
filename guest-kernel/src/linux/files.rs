//! A Linux program's file descriptors: the console (0-2), and `/proc/self/pagemap`
//! and `/proc/self/clear_refs` (also as `/proc/PID/...` with its own pid), which the
//! VMM answers from outside through one [`ProcRequest`] per system call, with the code
//! behind `vmm pagemap` and `vmm clear-refs`. There are no other files yet.

use super::uaccess;
use crate::frames::{self, PAGE};
use crate::global::Global;
use crate::{arch, process};
use guest_abi::{proc_op, ProcRequest, PROC_PAGEMAP_MAX, PROC_PORT};
use workload::USER_TOP;

pub const ENOENT: i64 = 2;
pub const EBADF: i64 = 9;
pub const EACCES: i64 = 13;
pub const EINVAL: i64 = 22;
pub const EMFILE: i64 = 24;
pub const ENOTTY: i64 = 25;
pub const ESPIPE: i64 = 29;

/// Descriptors a process may hold.
pub const MAX_FDS: usize = 16;
/// Longest path looked at (ours are short; Linux's limit is 4096).
const MAX_PATH: u64 = 255;

const O_ACCMODE: u64 = 3;
const O_RDONLY: u64 = 0;
const O_WRONLY: u64 = 1;
const SEEK_SET: u64 = 0;
const SEEK_CUR: u64 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    Closed,
    Console,
    /// Read position, in bytes (8 per page).
    Pagemap { pos: u64 },
    ClearRefs,
}

pub const INITIAL: [Fd; MAX_FDS] = {
    let mut t = [Fd::Closed; MAX_FDS];
    t[0] = Fd::Console;
    t[1] = Fd::Console;
    t[2] = Fd::Console;
    t
};

static REQUEST: Global<ProcRequest> = Global::new(ProcRequest { op: 0, pid: 0, arg: 0, count: 0, buf: 0, result: 0 });

fn table() -> &'static mut [Fd; MAX_FDS] {
    &mut super::current().fds
}

pub fn get(fd: u64) -> Result<Fd, i64> {
    table().get(fd as usize).copied().filter(|f| *f != Fd::Closed).ok_or(EBADF)
}

/// Asks the VMM; its answer is the call's result.
fn ask(op: u32, arg: u64, count: u64, buf: u64) -> i64 {
    let req = REQUEST.as_ptr();
    // SAFETY: ring 0, no other reference to the request; volatile, because the VMM
    // reads and writes it during the `out` (which the compiler sees as touching no
    // memory).
    unsafe {
        req.write_volatile(ProcRequest { op, pid: process::current_pid(), arg, count, buf, result: -EINVAL });
        arch::outl(PROC_PORT, frames::kernel_phys(req.cast_const()) as u32);
        (&raw const (*req).result).read_volatile()
    }
}

/// Which of our files `path` names.
fn lookup(path: &[u8]) -> Option<Fd> {
    let rest = path.strip_prefix(b"/proc/")?;
    let slash = rest.iter().position(|&b| b == b'/')?;
    let (who, name) = (&rest[..slash], &rest[slash + 1..]);
    let me = process::current_pid();
    let is_me = who == b"self" || (!who.is_empty() && who.iter().all(u8::is_ascii_digit) && parse(who) == Some(u64::from(me)));
    if !is_me {
        return None;
    }
    match name {
        b"pagemap" => Some(Fd::Pagemap { pos: 0 }),
        b"clear_refs" => Some(Fd::ClearRefs),
        _ => None,
    }
}

fn parse(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |v, &d| v.checked_mul(10)?.checked_add(u64::from(d.checked_sub(b'0').filter(|&d| d < 10)?)))
}

/// `open`/`openat` (the directory does not matter: our paths are absolute).
pub fn open(path: u64, flags: u64) -> Result<u64, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    let fd = lookup(path).ok_or(ENOENT)?;
    let mode = flags & O_ACCMODE;
    let allowed = match fd {
        Fd::Pagemap { .. } => mode == O_RDONLY,
        Fd::ClearRefs => mode == O_WRONLY,
        _ => false,
    };
    if !allowed {
        return Err(EACCES);
    }
    let t = table();
    let slot = t.iter().position(|f| *f == Fd::Closed).ok_or(EMFILE)?;
    t[slot] = fd;
    Ok(slot as u64)
}

pub fn close(fd: u64) -> Result<u64, i64> {
    get(fd)?;
    table()[fd as usize] = Fd::Closed;
    Ok(0)
}

/// `read`: the console reads as end of file; pagemap from its position.
pub fn read(fd: u64, buf: u64, len: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Console => Ok(0),
        Fd::Pagemap { pos } => {
            let n = pagemap(buf, len, pos)?;
            table()[fd as usize] = Fd::Pagemap { pos: pos + n };
            Ok(n)
        }
        Fd::ClearRefs | Fd::Closed => Err(EBADF),
    }
}

pub fn pread(fd: u64, buf: u64, len: u64, off: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Pagemap { .. } => pagemap(buf, len, off),
        Fd::Console => Err(ESPIPE),
        Fd::ClearRefs | Fd::Closed => Err(EBADF),
    }
}

pub fn lseek(fd: u64, off: u64, whence: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Pagemap { pos } => {
            let new = match whence {
                SEEK_SET => off,
                SEEK_CUR => pos.wrapping_add(off),
                _ => return Err(EINVAL),
            };
            if (new as i64) < 0 {
                return Err(EINVAL);
            }
            table()[fd as usize] = Fd::Pagemap { pos: new };
            Ok(new)
        }
        Fd::Console => Err(ESPIPE),
        _ => Err(EINVAL),
    }
}

pub fn ioctl(fd: u64) -> Result<u64, i64> {
    // Terminal requests on the console, PAGEMAP_SCAN on pagemap: not supported (yet).
    get(fd).and(Err(ENOTTY))
}

/// Linux's pagemap read: 8 bytes per page from virtual page `off / 8`; both multiples
/// of 8. The VMM stores the entries straight into the program's buffer.
fn pagemap(buf: u64, len: u64, off: u64) -> Result<u64, i64> {
    if !off.is_multiple_of(8) || !len.is_multiple_of(8) {
        return Err(EINVAL);
    }
    let vpn = off / 8;
    let last = USER_TOP / PAGE;
    if vpn >= last || len == 0 {
        return Ok(0);
    }
    let count = (len / 8).min(PROC_PAGEMAP_MAX).min(last - vpn);
    // Each page of the buffer becomes present, writable and written (one byte stored
    // by ring 0: a write of the program's page, caught as such), so the VMM's store of
    // the entries is the program's write in every view.
    let mut at = buf;
    let end = buf.checked_add(count * 8).ok_or(crate::mm::EFAULT)?;
    while at < end {
        uaccess::write_bytes(at, &[0])?;
        at = (at & !(PAGE - 1)) + PAGE;
    }
    let r = ask(proc_op::PAGEMAP, vpn, count, buf);
    if r < 0 { Err(-r) } else { Ok(r as u64) }
}

/// Linux's clear_refs write: a number 1-5 (whitespace around it allowed) in at most 12
/// bytes; returns the whole count.
pub fn clear_refs(buf: u64, len: u64) -> Result<u64, i64> {
    let text = uaccess::bytes(buf, len.min(12))?;
    let text = trim(text);
    let value = parse(text).filter(|v| (1..=5).contains(v)).ok_or(EINVAL)?;
    let r = ask(proc_op::CLEAR_REFS, value, 0, 0);
    if r < 0 { Err(-r) } else { Ok(len) }
}

fn trim(mut b: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = b {
        if !first.is_ascii_whitespace() {
            break;
        }
        b = rest;
    }
    while let [rest @ .., last] = b {
        if !last.is_ascii_whitespace() {
            break;
        }
        b = rest;
    }
    b
}
