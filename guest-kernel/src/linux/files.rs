//! A Linux program's file descriptors: the console (0-2); `/proc/self/pagemap` and
//! `/proc/self/clear_refs` (also as `/proc/PID/...` with its own pid), which the VMM
//! answers from outside through one [`ProcRequest`] per system call, with the code
//! behind `vmm pagemap` and `vmm clear-refs`; and the read-only files the VMM put into
//! guest RAM (`--file`), whose bytes the VMM copies into the program's buffer.

use super::uaccess;
use crate::frames::{self, PAGE};
use crate::global::Global;
use crate::{arch, process};
use guest_abi::exec::{Files, MAX_FILES};
use guest_abi::{proc_op, ProcRequest, PROC_PAGEMAP_MAX, PROC_PORT};
use workload::USER_TOP;

pub const ENOENT: i64 = 2;
pub const EBADF: i64 = 9;
pub const EACCES: i64 = 13;
pub const EINVAL: i64 = 22;
pub const EMFILE: i64 = 24;
pub const ENOTTY: i64 = 25;
pub const ESPIPE: i64 = 29;
pub const EROFS: i64 = 30;
pub const EISDIR: i64 = 21;

/// Descriptors a process may hold.
pub const MAX_FDS: usize = 16;
/// Longest path looked at (ours are short; Linux's limit is 4096).
const MAX_PATH: u64 = 255;

const O_ACCMODE: u64 = 3;
const O_RDONLY: u64 = 0;
const O_WRONLY: u64 = 1;
const SEEK_SET: u64 = 0;
const SEEK_CUR: u64 = 1;
const SEEK_END: u64 = 2;
const O_CREAT: u64 = 0o100;
/// Most bytes one `read` of a file moves.
const MAX_READ: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    Closed,
    Console,
    /// Read position, in bytes (8 per page).
    Pagemap { pos: u64 },
    ClearRefs,
    /// `/proc/self/smaps` (`maps` false) or `maps`, rendered by the VMM; read position.
    ProcText { maps: bool, pos: u64 },
    /// A fixed text of the kernel's (sysfs), read position.
    Text { which: usize, pos: u64 },
    /// A directory (only for `access` and `stat`).
    Dir,
    /// File `index` of the table, read position.
    File { index: usize, pos: u64 },
}

pub const INITIAL: [Fd; MAX_FDS] = {
    let mut t = [Fd::Closed; MAX_FDS];
    t[0] = Fd::Console;
    t[1] = Fd::Console;
    t[2] = Fd::Console;
    t
};

static REQUEST: Global<ProcRequest> = Global::new(ProcRequest { op: 0, pid: 0, arg: 0, count: 0, buf: 0, result: 0 });
/// The files the VMM put into guest RAM (checked at boot), none if null.
static FILES: Global<*const Files> = Global::new(core::ptr::null());

/// Takes the file table at `phys` (from the program's image): every file must lie in
/// `[low, high)` of guest RAM, the VMM's blob.
pub fn init(phys: u64, low: u64, high: u64) {
    if phys == 0 {
        return;
    }
    if phys < low || phys.checked_add(core::mem::size_of::<Files>() as u64).is_none_or(|e| e > high) {
        crate::panic_msg("the file table is outside the program's image");
    }
    // SAFETY: the range is inside guest RAM, direct-mapped, written by the VMM (plain
    // integers and bytes) and never written again.
    let files = unsafe { &*(frames::phys_to_virt(phys) as *const Files) };
    if files.count as usize > MAX_FILES
        || files.files[..files.count as usize].iter().any(|f| f.phys < low || f.phys.checked_add(f.size).is_none_or(|e| e > high))
    {
        crate::panic_msg("bad file table");
    }
    // SAFETY: ring 0 at boot, no other reference.
    unsafe { *FILES.get() = files };
}

fn files() -> &'static [guest_abi::exec::File] {
    // SAFETY: ring 0; set once at boot, to a table that lives as long as guest RAM.
    let t = unsafe { *FILES.get() };
    if t.is_null() {
        return &[];
    }
    // SAFETY: checked by `init`.
    let t = unsafe { &*t };
    &t.files[..t.count as usize]
}

/// The file `path` names (relative paths start at `/`, the only working directory).
fn find_file(path: &[u8]) -> Option<usize> {
    let rel = path.strip_prefix(b"./").unwrap_or(path);
    files().iter().position(|f| {
        let len = f.name.iter().position(|&b| b == 0).unwrap_or(f.name.len());
        let name = &f.name[..len];
        if rel.first() == Some(&b'/') { name == rel } else { name.len() == rel.len() + 1 && name[1..] == *rel }
    })
}

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

/// sysfs files with fixed text: transparent huge pages on `madvise`, as Linux's
/// default (the self-test's THP check reads both).
const TEXTS: [(&[u8], &[u8]); 2] = [
    (b"/sys/kernel/mm/transparent_hugepage/enabled", b"always [madvise] never\n"),
    (b"/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", b"2097152\n"),
];
const DIRS: [&[u8]; 5] = [b"/", b"/proc", b"/sys", b"/sys/kernel/mm", b"/sys/kernel/mm/transparent_hugepage"];

/// Which of our files `path` names.
fn lookup(path: &[u8]) -> Option<Fd> {
    let trimmed = if path.len() > 1 { path.strip_suffix(b"/").unwrap_or(path) } else { path };
    if let Some(which) = TEXTS.iter().position(|(name, _)| *name == trimmed) {
        return Some(Fd::Text { which, pos: 0 });
    }
    if DIRS.contains(&trimmed) {
        return Some(Fd::Dir);
    }
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
        b"smaps" => Some(Fd::ProcText { maps: false, pos: 0 }),
        b"maps" => Some(Fd::ProcText { maps: true, pos: 0 }),
        _ => None,
    }
}

fn parse(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |v, &d| v.checked_mul(10)?.checked_add(u64::from(d.checked_sub(b'0').filter(|&d| d < 10)?)))
}

/// `open`/`openat` (the directory does not matter: our paths are absolute).
pub fn open(path: u64, flags: u64) -> Result<u64, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    let mode = flags & O_ACCMODE;
    let fd = match (lookup(path), find_file(path)) {
        (Some(fd), _) => fd,
        (None, Some(index)) if mode == O_RDONLY => Fd::File { index, pos: 0 },
        // The files are read-only, and there is nowhere to create one.
        (None, Some(_)) => return Err(EROFS),
        (None, None) if flags & O_CREAT != 0 => return Err(EROFS),
        (None, None) => return Err(ENOENT),
    };
    let allowed = match fd {
        Fd::Pagemap { .. } | Fd::ProcText { .. } | Fd::Text { .. } | Fd::Dir => mode == O_RDONLY,
        Fd::ClearRefs => mode == O_WRONLY,
        Fd::File { .. } => true,
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

/// `dup` (`new` None: the lowest free descriptor), `dup2`, `dup3` (`exact`: old and new
/// must differ). The copy has its own read position (Linux's shares one: a program
/// reading through both would see the difference).
pub fn dup(old: u64, new: Option<u64>, exact: bool) -> Result<u64, i64> {
    let f = get(old)?;
    let t = table();
    let new = match new {
        Some(n) if n as usize >= MAX_FDS => return Err(EBADF),
        Some(n) if n == old => return if exact { Err(EINVAL) } else { Ok(n) },
        Some(n) => n as usize,
        None => t.iter().position(|f| *f == Fd::Closed).ok_or(EMFILE)?,
    };
    t[new] = f;
    Ok(new as u64)
}

pub fn close(fd: u64) -> Result<u64, i64> {
    get(fd)?;
    table()[fd as usize] = Fd::Closed;
    Ok(0)
}

/// `read`: the console reads as end of file; the others are `pread` at their position,
/// which then moves on.
pub fn read(fd: u64, buf: u64, len: u64) -> Result<u64, i64> {
    let f = get(fd)?;
    if f == Fd::Console {
        return Ok(0);
    }
    let pos = position(f).ok_or(if f == Fd::Dir { EISDIR } else { EBADF })?;
    let n = pread(fd, buf, len, pos)?;
    table()[fd as usize] = with_position(f, pos + n);
    Ok(n)
}

/// The read position of a descriptor that has one.
fn position(f: Fd) -> Option<u64> {
    match f {
        Fd::Pagemap { pos } | Fd::ProcText { pos, .. } | Fd::Text { pos, .. } | Fd::File { pos, .. } => Some(pos),
        Fd::Console | Fd::ClearRefs | Fd::Dir | Fd::Closed => None,
    }
}

/// `f` at read position `pos` (descriptors without one are returned as they are).
fn with_position(f: Fd, pos: u64) -> Fd {
    match f {
        Fd::Pagemap { .. } => Fd::Pagemap { pos },
        Fd::ProcText { maps, .. } => Fd::ProcText { maps, pos },
        Fd::Text { which, .. } => Fd::Text { which, pos },
        Fd::File { index, .. } => Fd::File { index, pos },
        other => other,
    }
}

/// Bytes of a fixed text from `off`.
fn text_read(which: usize, buf: u64, len: u64, off: u64) -> Result<u64, i64> {
    let text = TEXTS[which].1;
    let from = (off as usize).min(text.len());
    let n = (len as usize).min(text.len() - from);
    uaccess::write_bytes(buf, &text[from..from + n])?;
    Ok(n as u64)
}

fn proc_text(maps: bool, buf: u64, len: u64, pos: u64) -> Result<u64, i64> {
    let n = len.min(MAX_READ);
    if n == 0 {
        return Ok(0);
    }
    probe(buf, n)?;
    let r = ask(if maps { proc_op::MAPS } else { proc_op::SMAPS }, pos, n, buf);
    if r < 0 { Err(-r) } else { Ok(r as u64) }
}

/// The size of file `index`, for `fstat`.
pub fn file_size(index: usize) -> u64 {
    files()[index].size
}

/// Stat of a path: `Some(fd kind)` for our files and /proc entries.
pub fn lookup_path(path: u64) -> Result<Fd, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    match (lookup(path), find_file(path)) {
        (Some(fd), _) => Ok(fd),
        (None, Some(index)) => Ok(Fd::File { index, pos: 0 }),
        (None, None) => Err(ENOENT),
    }
}

fn file_read(index: usize, buf: u64, len: u64, pos: u64) -> Result<u64, i64> {
    let f = files()[index];
    let n = len.min(MAX_READ).min(f.size.saturating_sub(pos));
    if n == 0 {
        return Ok(0);
    }
    probe(buf, n)?;
    let r = ask(proc_op::COPY, f.phys + pos, n, buf);
    if r < 0 { Err(-r) } else { Ok(r as u64) }
}

/// Makes each page of the buffer present, writable and written (one byte stored by
/// ring 0: a write of the program's page, caught as such), so that the VMM's store
/// into it is the program's write in every view.
fn probe(buf: u64, len: u64) -> Result<(), i64> {
    let end = buf.checked_add(len).ok_or(crate::mm::EFAULT)?;
    let mut at = buf;
    while at < end {
        uaccess::write_bytes(at, &[0])?;
        at = (at & !(PAGE - 1)) + PAGE;
    }
    Ok(())
}

pub fn pread(fd: u64, buf: u64, len: u64, off: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Pagemap { .. } => pagemap(buf, len, off),
        Fd::File { index, .. } => file_read(index, buf, len, off),
        Fd::ProcText { maps, .. } => proc_text(maps, buf, len, off),
        Fd::Text { which, .. } => text_read(which, buf, len, off),
        Fd::Dir => Err(EISDIR),
        Fd::Console => Err(ESPIPE),
        Fd::ClearRefs | Fd::Closed => Err(EBADF),
    }
}

pub fn lseek(fd: u64, off: u64, whence: u64) -> Result<u64, i64> {
    let f = get(fd)?;
    // Seekable: pagemap (no end: Linux refuses SEEK_END there) and our files.
    let (pos, end) = match f {
        Fd::Pagemap { pos } => (pos, None),
        Fd::File { index, pos } => (pos, Some(file_size(index))),
        Fd::Console => return Err(ESPIPE),
        _ => return Err(EINVAL),
    };
    let new = match (whence, end) {
        (SEEK_SET, _) => off,
        (SEEK_CUR, _) => pos.wrapping_add(off),
        (SEEK_END, Some(end)) => end.wrapping_add(off),
        _ => return Err(EINVAL),
    };
    if (new as i64) < 0 {
        return Err(EINVAL);
    }
    table()[fd as usize] = with_position(f, new);
    Ok(new)
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
    probe(buf, count * 8)?;
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
