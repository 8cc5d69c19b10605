//! A Linux program's file descriptors: the console (0-2); `/proc/self/pagemap` and
//! `/proc/self/clear_refs` (also as `/proc/PID/...` with its own pid), which the VMM
//! answers from outside through one [`ProcRequest`] per system call, with the code
//! behind `vmm pagemap` and `vmm clear-refs`; the kernel's fixed sysfs texts; and the
//! files of the in-memory file system ([`super::fs`]: the program's own, and the
//! read-only files the VMM put into guest RAM with `--file`).

use super::{fs, uaccess};
use crate::frames::{self, PAGE};
use crate::process;
use guest_abi::exec::{Files, MAX_FILES};
use guest_abi::{proc_op, PROC_PAGEMAP_MAX};
use workload::USER_TOP;

pub const ENOENT: i64 = 2;
pub const EBADF: i64 = 9;
pub const EACCES: i64 = 13;
pub const EINVAL: i64 = 22;
pub const EMFILE: i64 = 24;
pub const ENOTTY: i64 = 25;
pub const ESPIPE: i64 = 29;
pub const EISDIR: i64 = 21;
pub const ENOTDIR: i64 = 20;
pub const EBUSY: i64 = 16;
pub const ENOMEM: i64 = 12;
pub const EEXIST: i64 = 17;

/// Descriptors a process may hold.
pub const MAX_FDS: usize = 16;
/// Longest path looked at (ours are short; Linux's limit is 4096).
const MAX_PATH: u64 = 255;

const O_ACCMODE: u64 = 3;
const O_RDONLY: u64 = 0;
const O_WRONLY: u64 = 1;
const O_RDWR: u64 = 2;
const O_EXCL: u64 = 0o200;
const O_TRUNC: u64 = 0o1000;
const O_APPEND: u64 = 0o2000;
const O_DIRECTORY: u64 = 0o200000;
const SEEK_SET: u64 = 0;
const SEEK_CUR: u64 = 1;
const SEEK_END: u64 = 2;
const O_CREAT: u64 = 0o100;
/// Most bytes one `read` of a /proc text moves.
const MAX_READ: u64 = 1 << 20;

/// What a descriptor of a file was opened for.
pub mod mode {
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const APPEND: u8 = 4;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fd {
    Closed,
    Console,
    /// `/proc/PID/pagemap`: read position, in bytes (8 per page).
    Pagemap { pos: u64, pid: u32 },
    ClearRefs { pid: u32 },
    /// `/proc/PID/smaps`, `maps` or `status` ([`proc_text`] kind), rendered by the
    /// VMM; read position.
    ProcText { kind: u8, pos: u64, pid: u32 },
    /// A fixed text of the kernel's (sysfs), read position.
    Text { which: usize, pos: u64 },
    /// A directory (only for `access` and `stat`).
    Dir,
    /// A file of the file system (node `node`), its position, and [`mode`] bits.
    Node { node: usize, pos: u64, mode: u8 },
}

pub const INITIAL: [Fd; MAX_FDS] = {
    let mut t = [Fd::Closed; MAX_FDS];
    t[0] = Fd::Console;
    t[1] = Fd::Console;
    t[2] = Fd::Console;
    t
};


/// Takes the file table at `phys` (from the program's image): every file must lie in
/// `[low, high)` of guest RAM, the VMM's blob. Its files become read-only nodes.
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
    fs::add_blobs(&files.files[..files.count as usize]);
}

fn table() -> &'static mut [Fd; MAX_FDS] {
    &mut super::current().fds
}

pub fn get(fd: u64) -> Result<Fd, i64> {
    table().get(fd as usize).copied().filter(|f| *f != Fd::Closed).ok_or(EBADF)
}

/// Asks the VMM about process `target`, for the calling process's buffer.
fn ask(op: u32, target: u32, arg: u64, count: u64, buf: u64) -> Result<u64, i64> {
    fs::ask_about(op, process::current_pid(), target, arg, count, buf)
}

/// Kinds of [`Fd::ProcText`].
pub mod proc_text {
    pub const SMAPS: u8 = 0;
    pub const MAPS: u8 = 1;
    pub const STATUS: u8 = 2;
}

/// sysfs files with fixed text: transparent huge pages on `madvise`, as Linux's
/// default (the self-test's THP check reads both).
const TEXTS: [(&[u8], &[u8]); 2] = [
    (b"/sys/kernel/mm/transparent_hugepage/enabled", b"always [madvise] never\n"),
    (b"/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", b"2097152\n"),
];
const DIRS: [&[u8]; 6] = [b"/", b"/tmp", b"/proc", b"/sys", b"/sys/kernel/mm", b"/sys/kernel/mm/transparent_hugepage"];

/// Which of our files `path` names.
fn lookup(path: &[u8]) -> Option<Fd> {
    let trimmed = if path.len() > 1 { path.strip_suffix(b"/").unwrap_or(path) } else { path };
    if let Some(which) = TEXTS.iter().position(|(name, _)| *name == trimmed) {
        return Some(Fd::Text { which, pos: 0 });
    }
    if DIRS.contains(&trimmed) || (!path.starts_with(b"/proc") && !path.starts_with(b"/sys") && fs::is_dir(path)) {
        return Some(Fd::Dir);
    }
    let rest = path.strip_prefix(b"/proc/")?;
    let slash = rest.iter().position(|&b| b == b'/')?;
    let (who, name) = (&rest[..slash], &rest[slash + 1..]);
    let pid = if who == b"self" {
        process::current_pid()
    } else {
        let pid = parse(who).filter(|_| !who.is_empty() && who.len() <= 10)?;
        u32::try_from(pid).ok().filter(|&p| process::pid_exists(p))?
    };
    match name {
        b"pagemap" => Some(Fd::Pagemap { pos: 0, pid }),
        b"clear_refs" => Some(Fd::ClearRefs { pid }),
        b"smaps" => Some(Fd::ProcText { kind: proc_text::SMAPS, pos: 0, pid }),
        b"maps" => Some(Fd::ProcText { kind: proc_text::MAPS, pos: 0, pid }),
        b"status" => Some(Fd::ProcText { kind: proc_text::STATUS, pos: 0, pid }),
        _ => None,
    }
}

fn parse(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |v, &d| v.checked_mul(10)?.checked_add(u64::from(d.checked_sub(b'0').filter(|&d| d < 10)?)))
}

/// `open`/`openat` (the directory does not matter: the working directory is `/`).
pub fn open(path: u64, flags: u64) -> Result<u64, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    let access = flags & O_ACCMODE;
    if access == 3 {
        return Err(EINVAL);
    }
    let t = table();
    let slot = t.iter().position(|f| *f == Fd::Closed).ok_or(EMFILE)?;
    let fd = match lookup(path) {
        Some(_) if flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL => return Err(EEXIST),
        Some(fd) => {
            let allowed = match fd {
                Fd::Pagemap { .. } | Fd::ProcText { .. } | Fd::Text { .. } | Fd::Dir => access == O_RDONLY,
                Fd::ClearRefs { .. } => access == O_WRONLY,
                _ => false,
            };
            if !allowed {
                return Err(if fd == Fd::Dir { EISDIR } else { EACCES });
            }
            if flags & O_DIRECTORY != 0 && fd != Fd::Dir {
                return Err(ENOTDIR);
            }
            fd
        }
        None => open_node(path, flags)?,
    };
    if let Fd::Node { node, .. } = fd {
        fs::opened(node);
    }
    table()[slot] = fd;
    Ok(slot as u64)
}

/// A file of the file system, created if `O_CREAT` asks and truncated if `O_TRUNC`.
fn open_node(path: &[u8], flags: u64) -> Result<Fd, i64> {
    let access = flags & O_ACCMODE;
    let node = match fs::lookup(path) {
        Some(_) if flags & (O_CREAT | O_EXCL) == O_CREAT | O_EXCL => return Err(EEXIST),
        Some(node) => node,
        None if flags & O_CREAT != 0 => fs::create(path)?,
        None => return Err(ENOENT),
    };
    if flags & O_DIRECTORY != 0 {
        return Err(ENOTDIR);
    }
    let truncating = flags & O_TRUNC != 0 && access != O_RDONLY;
    if access != O_RDONLY {
        fs::make_own(node, truncating)?;
    }
    if truncating {
        fs::truncate(node, 0)?;
    }
    let mut m = 0;
    if access == O_RDONLY || access == O_RDWR {
        m |= mode::READ;
    }
    if access == O_WRONLY || access == O_RDWR {
        m |= mode::WRITE;
    }
    if flags & O_APPEND != 0 {
        m |= mode::APPEND;
    }
    Ok(Fd::Node { node, pos: 0, mode: m })
}

/// `unlink`/`unlinkat`: files of the file system only.
pub fn unlink(path: u64, remove_dir: bool) -> Result<u64, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    match lookup(path) {
        Some(Fd::Dir) if remove_dir => return Err(EBUSY),
        Some(Fd::Dir) => return Err(EISDIR),
        Some(_) => return Err(EACCES),
        None if remove_dir => return Err(if fs::lookup(path).is_some() { ENOTDIR } else { ENOENT }),
        None => {}
    }
    fs::unlink(path).map(|()| 0)
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
    close(new as u64).ok();
    if let Fd::Node { node, .. } = f {
        fs::opened(node);
    }
    table()[new] = f;
    Ok(new as u64)
}

pub fn close(fd: u64) -> Result<u64, i64> {
    let f = get(fd)?;
    table()[fd as usize] = Fd::Closed;
    if let Fd::Node { node, .. } = f {
        fs::closed(node);
    }
    Ok(0)
}

/// Closes every descriptor of the current process (it exits).
pub fn close_all() {
    for fd in 0..MAX_FDS as u64 {
        close(fd).ok();
    }
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
        Fd::Pagemap { pos, .. } | Fd::ProcText { pos, .. } | Fd::Text { pos, .. } | Fd::Node { pos, .. } => Some(pos),
        Fd::Console | Fd::ClearRefs { .. } | Fd::Dir | Fd::Closed => None,
    }
}

/// `f` at read position `pos` (descriptors without one are returned as they are).
fn with_position(f: Fd, pos: u64) -> Fd {
    match f {
        Fd::Pagemap { pid, .. } => Fd::Pagemap { pos, pid },
        Fd::ProcText { kind, pid, .. } => Fd::ProcText { kind, pos, pid },
        Fd::Text { which, .. } => Fd::Text { which, pos },
        Fd::Node { node, mode, .. } => Fd::Node { node, pos, mode },
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

fn read_proc_text(kind: u8, pid: u32, buf: u64, len: u64, pos: u64) -> Result<u64, i64> {
    let n = len.min(MAX_READ);
    if n == 0 {
        return Ok(0);
    }
    probe(buf, n)?;
    let op = match kind {
        proc_text::MAPS => proc_op::MAPS,
        proc_text::STATUS => proc_op::STATUS,
        _ => proc_op::SMAPS,
    };
    let aux = match (op, process::index_of(pid)) {
        (proc_op::MAPS | proc_op::SMAPS, Some(index)) => {
            let (brk, stack) = super::break_and_stack(index);
            fs::describe_maps(index, brk, stack)
        }
        _ => 0,
    };
    fs::ask_with(op, process::current_pid(), pid, (pos, n, buf), aux)
}

/// Stat of a path: `Some(fd kind)` for our files and /proc entries.
pub fn lookup_path(path: u64) -> Result<Fd, i64> {
    let path = uaccess::c_string(path, MAX_PATH)?;
    match (lookup(path), fs::lookup(path)) {
        (Some(fd), _) => Ok(fd),
        (None, Some(node)) => Ok(Fd::Node { node, pos: 0, mode: 0 }),
        (None, None) => Err(ENOENT),
    }
}

/// Makes each page of the buffer present, writable and written (one byte stored by
/// ring 0: a write of the program's page, caught as such), so that the VMM's store
/// into it is the program's write in every view.
pub fn probe(buf: u64, len: u64) -> Result<(), i64> {
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
        Fd::Pagemap { pid, .. } => pagemap(pid, buf, len, off),
        Fd::Node { mode, .. } if mode & mode::READ == 0 => Err(EBADF),
        Fd::Node { node, .. } => fs::read(node, buf, len, off),
        Fd::ProcText { kind, pid, .. } => read_proc_text(kind, pid, buf, len, off),
        Fd::Text { which, .. } => text_read(which, buf, len, off),
        Fd::Dir => Err(EISDIR),
        Fd::Console => Err(ESPIPE),
        Fd::ClearRefs { .. } | Fd::Closed => Err(EBADF),
    }
}

pub fn lseek(fd: u64, off: u64, whence: u64) -> Result<u64, i64> {
    let f = get(fd)?;
    // Seekable: pagemap (no end: Linux refuses SEEK_END there) and our files.
    let (pos, end) = match f {
        Fd::Pagemap { pos, .. } => (pos, None),
        Fd::Node { node, pos, .. } => (pos, Some(fs::size(node))),
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

/// `pwrite` to a file open for writing (`append`: at its end, whatever `off` says).
pub fn pwrite(fd: u64, buf: u64, len: u64, off: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Node { node, mode, .. } if mode & mode::WRITE != 0 => {
            let at = if mode & mode::APPEND != 0 { fs::size(node) } else { off };
            fs::write(node, buf, len, at)
        }
        Fd::Console => Err(ESPIPE),
        _ => Err(EBADF),
    }
}

/// `write` to a file: at its position, which moves on.
pub fn write_at_position(fd: u64, buf: u64, len: u64) -> Result<u64, i64> {
    let Fd::Node { node, pos, mode } = get(fd)? else { return Err(EBADF) };
    if mode & mode::WRITE == 0 {
        return Err(EBADF);
    }
    let at = if mode & mode::APPEND != 0 { fs::size(node) } else { pos };
    let n = fs::write(node, buf, len, at)?;
    table()[fd as usize] = Fd::Node { node, pos: at + n, mode };
    Ok(n)
}

/// `ftruncate` of a file open for writing.
pub fn ftruncate(fd: u64, size: u64) -> Result<u64, i64> {
    match get(fd)? {
        Fd::Node { node, mode, .. } if mode & mode::WRITE != 0 => fs::truncate(node, size).map(|()| 0),
        _ => Err(EINVAL),
    }
}

/// `truncate` of a path.
pub fn truncate(path: u64, size: u64) -> Result<u64, i64> {
    match lookup_path(path)? {
        Fd::Node { node, .. } => fs::make_own(node, size == 0).and_then(|()| fs::truncate(node, size)).map(|()| 0),
        Fd::Dir => Err(EISDIR),
        _ => Err(EACCES),
    }
}

pub fn ioctl(fd: u64) -> Result<u64, i64> {
    // Terminal requests on the console, PAGEMAP_SCAN on pagemap: not supported (yet).
    get(fd).and(Err(ENOTTY))
}

/// Linux's pagemap read: 8 bytes per page from virtual page `off / 8`; both multiples
/// of 8. The VMM stores the entries straight into the program's buffer.
fn pagemap(pid: u32, buf: u64, len: u64, off: u64) -> Result<u64, i64> {
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
    ask(proc_op::PAGEMAP, pid, vpn, count, buf)
}

/// Linux's clear_refs write: a number 1-5 (whitespace around it allowed) in at most 12
/// bytes; returns the whole count.
pub fn clear_refs(pid: u32, buf: u64, len: u64) -> Result<u64, i64> {
    let text = uaccess::bytes(buf, len.min(12))?;
    let text = trim(text);
    let value = parse(text).filter(|v| (1..=5).contains(v)).ok_or(EINVAL)?;
    ask(proc_op::CLEAR_REFS, pid, value, 0, 0).map(|_| len)
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
