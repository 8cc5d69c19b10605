//! Linux system calls (x86-64 numbers and calling convention: number in rax,
//! arguments in rdi, rsi, rdx, r10, r8, r9, result or -errno in rax, rcx and r11
//! clobbered). Ring 0 is emulated on our hosts (~1 µs an instruction): every call here
//! is a few hundred instructions, no loop over bytes.
//!
//! Implemented: what a static glibc or musl program needs to start, allocate, write to
//! its console and exit. Anything else returns `-ENOSYS` and is counted
//! (docs/linux-programs.md lists both).

use super::files::{self, Fd};
use super::fs;
use super::{current, set_fs_base, uaccess, unimplemented};
use crate::arch::{USER_CS, USER_DS};
use crate::entry::TrapFrame;
use crate::frames::PAGE;
use crate::{console, mm, process};
use guest_abi::mapping_flags::{EXEC, FILE, READ_ONLY, SHARED};
use workload::{MIN_ADDR, USER_TOP};

const EPERM: i64 = 1;
const EBADF: i64 = 9;
const EACCES: i64 = 13;
const ENODEV: i64 = 19;
const ENOMEM: i64 = 12;
const EEXIST: i64 = 17;
const EINVAL: i64 = 22;
const ENOSYS: i64 = 38;

mod nr {
    pub const READ: u64 = 0;
    pub const WRITE: u64 = 1;
    pub const OPEN: u64 = 2;
    pub const CLOSE: u64 = 3;
    pub const STAT: u64 = 4;
    pub const FSTAT: u64 = 5;
    pub const LSTAT: u64 = 6;
    pub const LSEEK: u64 = 8;
    pub const MMAP: u64 = 9;
    pub const MPROTECT: u64 = 10;
    pub const MUNMAP: u64 = 11;
    pub const BRK: u64 = 12;
    pub const IOCTL: u64 = 16;
    pub const PREAD64: u64 = 17;
    pub const PWRITE64: u64 = 18;
    pub const FSYNC: u64 = 74;
    pub const FDATASYNC: u64 = 75;
    pub const TRUNCATE: u64 = 76;
    pub const FTRUNCATE: u64 = 77;
    pub const GETCWD: u64 = 79;
    pub const UNLINK: u64 = 87;
    pub const UNLINKAT: u64 = 263;
    pub const WRITEV: u64 = 20;
    pub const MADVISE: u64 = 28;
    pub const ACCESS: u64 = 21;
    pub const SCHED_YIELD: u64 = 24;
    pub const DUP: u64 = 32;
    pub const DUP2: u64 = 33;
    pub const GETPID: u64 = 39;
    pub const GETTIMEOFDAY: u64 = 96;
    pub const TIME: u64 = 201;
    pub const CLOCK_GETTIME: u64 = 228;
    pub const CLOCK_GETRES: u64 = 229;
    pub const EXIT: u64 = 60;
    pub const UNAME: u64 = 63;
    pub const GETUID: u64 = 102;
    pub const GETGID: u64 = 104;
    pub const GETEUID: u64 = 107;
    pub const GETEGID: u64 = 108;
    pub const GETPPID: u64 = 110;
    pub const ARCH_PRCTL: u64 = 158;
    pub const GETTID: u64 = 186;
    pub const SET_TID_ADDRESS: u64 = 218;
    pub const EXIT_GROUP: u64 = 231;
    pub const OPENAT: u64 = 257;
    pub const NEWFSTATAT: u64 = 262;
    pub const FACCESSAT: u64 = 269;
    pub const DUP3: u64 = 292;
    pub const PRLIMIT64: u64 = 302;
    pub const SYNC: u64 = guest_abi::syscall::LINUX_SYNC;
}

const PROT_WRITE: u64 = 2;
const PROT_EXEC: u64 = 4;
const MAP_SHARED: u64 = 0x01;
const MAP_PRIVATE: u64 = 0x02;
const MAP_TYPE: u64 = 0x0f;
const MAP_FIXED: u64 = 0x10;
const MAP_ANONYMOUS: u64 = 0x20;
const MAP_FIXED_NOREPLACE: u64 = 0x10_0000;
const ARCH_SET_FS: u64 = 0x1002;
const ARCH_GET_FS: u64 = 0x1003;
const AT_EMPTY_PATH: u64 = 0x1000;
const AT_REMOVEDIR: u64 = 0x200;
const RLIMIT_STACK: u64 = 3;
const RLIMIT_NOFILE: u64 = 7;
const RLIM_NLIMITS: u64 = 16;
const RLIM_INFINITY: u64 = u64::MAX;
/// Where top-down `mmap` starts: Linux's base below an 8 MiB stack, unrandomized.
const MMAP_BASE: u64 = 0x7fff_f7ff_f000;
/// Most bytes one `write` takes (it returns how many: callers loop, as for a pipe).
const MAX_WRITE: u64 = 64 << 10;
/// Linux's UIO_MAXIOV.
const MAX_IOV: u64 = 1024;

/// The system call whose `syscall` trapped at the gate: runs it and returns to the
/// instruction after `syscall` (rcx), with the flags it saved (r11).
pub fn enter(frame: &mut TrapFrame) {
    if !super::is_linux(process::current_index()) {
        return crate::trap::kill(frame, "syscall instruction (not a Linux program) at", frame.rcx);
    }
    let (a0, a1, a2, a3, a4) = (frame.rdi, frame.rsi, frame.rdx, frame.r10, frame.r8);
    let a5 = frame.r9;
    let n = frame.rax;
    // Back to user mode first: a call that switches processes saves this frame.
    frame.rip = frame.rcx;
    frame.rflags = (frame.r11 & 0x3c_7fd7) | 0x202;
    frame.cs = u64::from(USER_CS);
    frame.ss = u64::from(USER_DS);
    let result = match n {
        nr::EXIT | nr::EXIT_GROUP => return process::exit_current(frame, (a0 & 0xff) as u32, false),
        nr::SCHED_YIELD => {
            frame.rax = 0;
            return process::switch_next(frame);
        }
        nr::WRITE => write(a0, a1, a2),
        nr::WRITEV => writev(a0, a1, a2),
        nr::READ => files::read(a0, a1, a2),
        nr::PREAD64 => files::pread(a0, a1, a2, a3),
        nr::PWRITE64 => files::pwrite(a0, a1, a2, a3),
        nr::FTRUNCATE => files::ftruncate(a0, a1),
        nr::TRUNCATE => files::truncate(a0, a1),
        nr::UNLINK => files::unlink(a0, false),
        nr::UNLINKAT => files::unlink(a1, a2 & AT_REMOVEDIR != 0),
        nr::FSYNC | nr::FDATASYNC => files::get(a0).map(|_| 0),
        nr::GETCWD => getcwd(a0, a1),
        nr::LSEEK => files::lseek(a0, a1, a2),
        nr::OPEN => files::open(a0, a1),
        nr::OPENAT => files::open(a1, a2),
        nr::CLOSE => files::close(a0),
        nr::DUP => files::dup(a0, None, false),
        nr::DUP2 => files::dup(a0, Some(a1), false),
        nr::DUP3 => files::dup(a0, Some(a1), true),
        nr::IOCTL => files::ioctl(a0),
        nr::BRK => Ok(brk(a0)),
        nr::MMAP => mmap(a0, a1, a2, a3, a4, a5),
        nr::MUNMAP => munmap(a0, a1),
        nr::MPROTECT => mprotect(a0, a1, a2),
        nr::MADVISE => madvise(a0, a1, a2),
        nr::ARCH_PRCTL => arch_prctl(a0, a1),
        nr::FSTAT => fstat(a0, a1),
        nr::NEWFSTATAT => newfstatat(a0, a1, a2, a3),
        nr::STAT | nr::LSTAT => files::lookup_path(a0).and_then(|fd| stat(fd, a1)),
        nr::ACCESS => access(a0, a1),
        nr::FACCESSAT => access(a1, a2),
        nr::UNAME => uname(a0),
        nr::CLOCK_GETTIME => clock_gettime(a0, a1),
        nr::CLOCK_GETRES => clock_getres(a0, a1),
        nr::GETTIMEOFDAY => gettimeofday(a0, a1),
        nr::TIME => time(a0),
        nr::PRLIMIT64 => prlimit64(a0, a1, a2, a3),
        nr::SYNC => sync(a0, a1),
        nr::GETPID | nr::GETTID | nr::SET_TID_ADDRESS => Ok(u64::from(process::current_pid())),
        nr::GETPPID | nr::GETUID | nr::GETGID | nr::GETEUID | nr::GETEGID => Ok(0),
        other => {
            unimplemented(other);
            Err(ENOSYS)
        }
    };
    frame.rax = match result {
        Ok(v) => v,
        Err(errno) => (-errno) as u64,
    };
}

fn console_fd(fd: u64) -> Result<(), i64> {
    match files::get(fd)? {
        Fd::Console => Ok(()),
        _ => Err(EBADF),
    }
}

/// The console (stdout and stderr are the VMM's stdout), clear_refs, or a file.
fn write(fd: u64, buf: u64, len: u64) -> Result<u64, i64> {
    match files::get(fd)? {
        Fd::Console => {
            let len = len.min(MAX_WRITE);
            console::write(uaccess::bytes(buf, len)?);
            Ok(len)
        }
        Fd::ClearRefs { pid } => files::clear_refs(pid, buf, len),
        Fd::Node { .. } => files::write_at_position(fd, buf, len),
        _ => Err(EBADF),
    }
}

/// `writev` to the console, or to a file (one write per buffer, stopping at a short one).
fn writev(fd: u64, iov: u64, count: u64) -> Result<u64, i64> {
    if let Fd::Node { .. } = files::get(fd)? {
        if count > MAX_IOV {
            return Err(EINVAL);
        }
        let mut total = 0;
        for i in 0..count {
            let base = uaccess::read_u64(iov + 16 * i)?;
            let len = uaccess::read_u64(iov + 16 * i + 8)?;
            match files::write_at_position(fd, base, len) {
                Ok(n) => {
                    total += n;
                    if n < len {
                        break;
                    }
                }
                Err(e) if total == 0 => return Err(e),
                Err(_) => break,
            }
        }
        return Ok(total);
    }
    console_fd(fd)?;
    if count > MAX_IOV {
        return Err(EINVAL);
    }
    let mut total = 0u64;
    for i in 0..count {
        let base = uaccess::read_u64(iov + 16 * i)?;
        let len = uaccess::read_u64(iov + 16 * i + 8)?;
        let take = len.min(MAX_WRITE - total);
        match uaccess::bytes(base, take) {
            Ok(b) => console::write(b),
            // What went out before a bad buffer counts, as in Linux.
            Err(e) if total == 0 => return Err(e),
            Err(_) => break,
        }
        total += take;
        if total == MAX_WRITE {
            break;
        }
    }
    Ok(total)
}

fn page_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE - 1).map(|v| v & !(PAGE - 1))
}

/// `brk`: the new break, or the old one if it cannot move there (never an error).
fn brk(addr: u64) -> u64 {
    let p = current();
    let (start, old) = (p.brk_start, p.brk);
    if addr < start {
        return old;
    }
    let (Some(new_end), Some(old_end)) = (page_up(addr), page_up(old)) else { return old };
    let moved = if new_end > old_end {
        let pages = (new_end - old_end) / PAGE;
        let serial = process::next_serial();
        process::update(|slot, zero| {
            if new_end > MMAP_BASE || mm::overlaps(slot, old_end, new_end) {
                return Err(ENOMEM);
            }
            mm::map(slot, old_end, pages, 0, serial, zero)
        })
    } else if new_end < old_end {
        process::update(|slot, zero| mm::unmap(slot, new_end, (old_end - new_end) / PAGE, zero))
    } else {
        Ok(())
    };
    match moved {
        Ok(()) => {
            current().brk = addr;
            addr
        }
        Err(_) => old,
    }
}

fn rights(prot: u64) -> u32 {
    let mut flags = 0;
    if prot & PROT_WRITE == 0 {
        flags |= READ_ONLY;
    }
    if prot & PROT_EXEC != 0 {
        flags |= EXEC;
    }
    flags
}

/// What a new mapping maps: anonymous memory, or a file from a page of it.
#[derive(Clone, Copy)]
struct Backing {
    /// The node (for file mappings and shared anonymous memory), its first page, and
    /// whether a `MAP_SHARED` mapping may be made writable.
    file: Option<(usize, u64, bool)>,
    flags: u32,
}

/// `mmap`'s backing: private anonymous; shared anonymous (an unnamed node of its own);
/// or a file open for reading, `MAP_SHARED` (its own frames; writable only through a
/// descriptor open for writing) or `MAP_PRIVATE` (a copy of each page touched). A
/// `--file` never changes, so sharing it is the same as a private copy.
fn backing(len: u64, prot: u64, flags: u64, fd: u64, off: u64) -> Result<Backing, i64> {
    let shared = match flags & MAP_TYPE {
        MAP_SHARED | 3 => true, // 3: MAP_SHARED_VALIDATE
        MAP_PRIVATE => false,
        _ => return Err(EINVAL),
    };
    let mut flags_out = rights(prot);
    if flags & MAP_ANONYMOUS != 0 {
        if !shared {
            return Ok(Backing { file: None, flags: flags_out });
        }
        return Ok(Backing { file: Some((fs::create_anonymous(len)?, 0, true)), flags: flags_out | FILE | SHARED });
    }
    if !off.is_multiple_of(PAGE) {
        return Err(EINVAL);
    }
    let (node, mode) = match files::get(fd)? {
        Fd::Node { node, mode, .. } => (node, mode),
        _ => return Err(ENODEV),
    };
    if mode & files::mode::READ == 0 {
        return Err(EACCES);
    }
    let shared = shared && fs::is_writable(node);
    let may_write = shared && mode & files::mode::WRITE != 0;
    if shared && prot & PROT_WRITE != 0 && !may_write {
        return Err(EACCES);
    }
    flags_out |= FILE | if shared { SHARED } else { 0 };
    Ok(Backing { file: Some((node, off / PAGE, may_write)), flags: flags_out })
}

/// `mmap`: at a fixed address, at a free hint, or top-down from [`MMAP_BASE`].
/// `PROT_NONE` is not built yet.
fn mmap(addr: u64, len: u64, prot: u64, flags: u64, fd: u64, off: u64) -> Result<u64, i64> {
    let pages = page_up(len).ok_or(ENOMEM)? / PAGE;
    if pages == 0 {
        return Err(EINVAL);
    }
    if prot & 7 == 0 {
        unimplemented(nr::MMAP);
        return Err(EINVAL);
    }
    let len = pages * PAGE;
    let fixed = flags & (MAP_FIXED | MAP_FIXED_NOREPLACE) != 0;
    if fixed && (!addr.is_multiple_of(PAGE) || addr < MIN_ADDR || addr.checked_add(len).is_none_or(|e| e > USER_TOP)) {
        return Err(if !addr.is_multiple_of(PAGE) { EINVAL } else { ENOMEM });
    }
    let backing = backing(len, prot, flags, fd, off)?;
    let serial = process::next_serial();
    let at = process::update(|slot, _| {
        if fixed {
            if flags & MAP_FIXED == 0 && mm::overlaps(slot, addr, addr + len) {
                return Err(EEXIST);
            }
            return Ok(addr);
        }
        let hint = addr & !(PAGE - 1);
        let fits = hint >= MIN_ADDR && hint.checked_add(len).is_some_and(|e| e <= MMAP_BASE && !mm::overlaps(slot, hint, e));
        if fits { Ok(hint) } else { mm::find_free(slot, pages, MMAP_BASE).ok_or(ENOMEM) }
    });
    let added = at.and_then(|at| match backing.file {
        Some((node, pgoff, may_write)) => fs::add_map(process::current_index(), serial, at, node, pgoff, may_write),
        None => Ok(()),
    });
    if let Err(e) = at.and(added) {
        // Shared anonymous memory made for this call goes again.
        if let Some((node, _, _)) = backing.file {
            fs::release_if_unused(node);
        }
        return Err(e);
    }
    let at = at?;
    let r = process::update(|slot, zero| mm::map(slot, at, pages, backing.flags, serial, zero));
    // What MAP_FIXED replaced, or the new mapping if it failed, maps no file any more.
    forget_unmapped();
    r.map(|()| at)
}

/// Drops the file mappings of the current process that are gone (unmapped or replaced).
fn forget_unmapped() {
    let me = process::current_index();
    if !fs::holds_maps(me) {
        return;
    }
    process::update(|slot, _| {
        let records = &slot.mappings[..slot.nmappings as usize];
        fs::prune_maps(me, |serial| records.iter().any(|m| m.serial == serial));
    });
}

fn munmap(addr: u64, len: u64) -> Result<u64, i64> {
    let pages = page_up(len).ok_or(EINVAL)? / PAGE;
    if !addr.is_multiple_of(PAGE) || pages == 0 {
        return Err(EINVAL);
    }
    let r = process::update(|slot, zero| mm::unmap(slot, addr, pages, zero));
    forget_unmapped();
    r.map(|()| 0)
}

fn mprotect(addr: u64, len: u64, prot: u64) -> Result<u64, i64> {
    if !addr.is_multiple_of(PAGE) {
        return Err(EINVAL);
    }
    let pages = page_up(len).ok_or(ENOMEM)? / PAGE;
    if pages == 0 {
        return Ok(0);
    }
    if prot & 7 == 0 {
        unimplemented(nr::MPROTECT);
        return Err(EINVAL);
    }
    if prot & PROT_WRITE != 0 {
        // A shared file mapping through a descriptor not open for writing stays read-only.
        let me = process::current_index();
        let end = addr.saturating_add(pages * PAGE);
        let refused = process::update(|slot, _| {
            slot.mappings[..slot.nmappings as usize].iter().any(|m| {
                m.start < end && addr < m.start + m.pages * PAGE && m.flags & (FILE | SHARED) == FILE | SHARED && !fs::may_write(me, m.serial)
            })
        });
        if refused {
            return Err(EACCES);
        }
    }
    process::update(|slot, zero| mm::protect(slot, addr, pages, prot & PROT_WRITE == 0, zero)).map(|()| 0)
}

fn arch_prctl(code: u64, addr: u64) -> Result<u64, i64> {
    match code {
        ARCH_SET_FS if addr >= USER_TOP => Err(EPERM),
        ARCH_SET_FS => {
            set_fs_base(addr);
            Ok(0)
        }
        ARCH_GET_FS => uaccess::write_u64(addr, current().fs_base).map(|()| 0),
        _ => Err(EINVAL),
    }
}

/// `struct utsname`: six fields of 65 bytes.
fn uname(buf: u64) -> Result<u64, i64> {
    const FIELD: usize = 65;
    let mut u = [0u8; 6 * FIELD];
    for (i, v) in [&b"Linux"[..], b"softdirty-vmm", b"6.12.0-softdirty-vmm", b"#1 SMP", b"x86_64", b"(none)"].iter().enumerate() {
        u[i * FIELD..i * FIELD + v.len()].copy_from_slice(v);
    }
    uaccess::write_bytes(buf, &u).map(|()| 0)
}

/// `struct stat` of the console (fds 0-2): a character device, as a serial line is.
fn fstat(fd: u64, buf: u64) -> Result<u64, i64> {
    stat(files::get(fd)?, buf)
}

fn stat(fd: Fd, buf: u64) -> Result<u64, i64> {
    let (mode, size) = match fd {
        Fd::Console => (0o020_620, 0),        // S_IFCHR | rw--w----
        Fd::Pagemap { .. } => (0o100_400, 0), // S_IFREG | r--------, size 0 as in /proc
        Fd::ProcText { .. } | Fd::Text { .. } => (0o100_444, 0),
        Fd::Dir => (0o040_555, 0),
        Fd::ClearRefs { .. } => (0o100_200, 0),      // S_IFREG | -w-------
        Fd::Node { node, .. } => (0o100_644, fs::size(node)),
        Fd::Closed => return Err(EBADF),
    };
    let mut st = [0u8; 144];
    let mut put = |at: usize, v: u64, bytes: usize| st[at..at + bytes].copy_from_slice(&v.to_le_bytes()[..bytes]);
    let linked = match fd {
        Fd::Node { node, .. } => fs::is_linked(node),
        _ => true,
    };
    if let Fd::Node { node, .. } = fd {
        put(0, u64::from(guest_abi::names::FILES_DEV), 8); // st_dev: 00:02
        put(8, fs::ino(node), 8); // st_ino
    }
    put(16, u64::from(linked), 8); // st_nlink
    put(24, mode, 4); // st_mode
    if mode == 0o020_620 {
        put(40, (4 << 8) | 64, 8); // st_rdev: ttyS0
    }
    put(48, size, 8); // st_size
    put(56, 1024, 8); // st_blksize
    put(64, size.div_ceil(512), 8); // st_blocks
    uaccess::write_bytes(buf, &st).map(|()| 0)
}

/// `AT_EMPTY_PATH` on a descriptor, or one of our paths.
fn newfstatat(dirfd: u64, path: u64, buf: u64, flags: u64) -> Result<u64, i64> {
    let first = uaccess::bytes(path, 1)?[0];
    if first == 0 && flags & AT_EMPTY_PATH != 0 {
        return fstat(dirfd, buf);
    }
    stat(files::lookup_path(path)?, buf)
}

/// `access` as root sees it: everything may be read and written; only directories
/// may be "executed" (no file has an execute bit).
fn access(path: u64, mode: u64) -> Result<u64, i64> {
    const X_OK: u64 = 1;
    match files::lookup_path(path)? {
        Fd::Dir => Ok(0),
        _ if mode & X_OK != 0 => Err(files::EACCES),
        _ => Ok(0),
    }
}

/// `getcwd`: the working directory is always `/`.
fn getcwd(buf: u64, size: u64) -> Result<u64, i64> {
    const ERANGE: i64 = 34;
    if size < 2 {
        return Err(ERANGE);
    }
    uaccess::write_bytes(buf, b"/\0").map(|()| 2)
}

/// Limits are not enforced; the stack's is the 8 MiB the program got.
fn prlimit64(pid: u64, resource: u64, new: u64, old: u64) -> Result<u64, i64> {
    if pid != 0 && pid != u64::from(process::current_pid()) {
        return Err(EPERM);
    }
    if resource >= RLIM_NLIMITS {
        return Err(EINVAL);
    }
    let (cur, max) = match resource {
        RLIMIT_STACK => (8 << 20, RLIM_INFINITY),
        RLIMIT_NOFILE => (1024, 4096),
        _ => (RLIM_INFINITY, RLIM_INFINITY),
    };
    if old != 0 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&u64::to_le_bytes(cur));
        b[8..].copy_from_slice(&u64::to_le_bytes(max));
        uaccess::write_bytes(old, &b)?;
    }
    if new != 0 {
        // Raising or lowering is accepted and not enforced.
        uaccess::bytes(new, 16)?;
    }
    Ok(0)
}

/// The softdirty-vmm extension: a `sync` with a label of 1 to 32 printable bytes.
fn sync(label: u64, len: u64) -> Result<u64, i64> {
    if len == 0 || len > guest_abi::SYNC_LABEL_MAX as u64 {
        return Err(EINVAL);
    }
    let bytes = uaccess::bytes(label, len)?;
    if !bytes.iter().all(|b| b.is_ascii_graphic()) {
        return Err(EINVAL);
    }
    crate::syscall::sync(bytes);
    Ok(0)
}

/// Which clock: wall-clock time (`CLOCK_REALTIME` and its coarse and alarm forms, TAI),
/// or time since boot (monotonic, raw, boot time, and the CPU-time clocks: one
/// process runs at a time, so its CPU time is close to the elapsed time only when
/// nothing else runs; an approximation).
fn clock_ns(id: u64) -> Result<u64, i64> {
    match id {
        0 | 5 | 8 | 11 => Ok(super::clock::realtime_ns()),
        1..=4 | 6 | 7 | 9 => Ok(super::clock::since_boot_ns()),
        _ => Err(EINVAL),
    }
}

fn timespec(ns: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
    b[8..].copy_from_slice(&(ns % 1_000_000_000).to_le_bytes());
    b
}

fn clock_gettime(id: u64, tp: u64) -> Result<u64, i64> {
    let ns = clock_ns(id)?;
    uaccess::write_bytes(tp, &timespec(ns)).map(|()| 0)
}

fn clock_getres(id: u64, tp: u64) -> Result<u64, i64> {
    clock_ns(id)?;
    if tp == 0 {
        return Ok(0);
    }
    uaccess::write_bytes(tp, &timespec(1)).map(|()| 0)
}

fn gettimeofday(tv: u64, tz: u64) -> Result<u64, i64> {
    let ns = super::clock::realtime_ns();
    if tv != 0 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(ns / 1_000_000_000).to_le_bytes());
        b[8..].copy_from_slice(&((ns % 1_000_000_000) / 1000).to_le_bytes());
        uaccess::write_bytes(tv, &b)?;
    }
    if tz != 0 {
        uaccess::write_bytes(tz, &[0u8; 8])?;
    }
    Ok(0)
}

fn time(t: u64) -> Result<u64, i64> {
    let secs = super::clock::realtime_ns() / 1_000_000_000;
    if t != 0 {
        uaccess::write_u64(t, secs)?;
    }
    Ok(secs)
}

/// Advice that changes nothing here is taken (0); `MADV_HUGEPAGE` makes each 2 MiB of
/// the range that can be one a huge mapping; `MADV_DONTNEED` and `MADV_FREE` drop the
/// range's pages (`MADV_FREE` at once: Linux may keep them until memory runs short,
/// and a program cannot rely on either).
fn madvise(addr: u64, len: u64, advice: u64) -> Result<u64, i64> {
    const MADV_HUGEPAGE: u64 = 14;
    const MADV_DONTNEED: u64 = 4;
    const MADV_FREE: u64 = 8;
    if !addr.is_multiple_of(PAGE) {
        return Err(EINVAL);
    }
    let end = addr.checked_add(page_up(len).ok_or(EINVAL)?).ok_or(EINVAL)?;
    match advice {
        // NORMAL, RANDOM, SEQUENTIAL, WILLNEED, NOHUGEPAGE, DONTFORK, DOFORK, ...
        0..=3 | 10..=13 | 15..=19 => Ok(0),
        MADV_HUGEPAGE => {
            const HUGE: u64 = 2 << 20;
            let mut at = addr.next_multiple_of(HUGE);
            while at.checked_add(HUGE).is_some_and(|e| e <= end) {
                process::update(|slot, _| mm::make_huge(slot, at));
                at += HUGE;
            }
            Ok(0)
        }
        MADV_DONTNEED | MADV_FREE => {
            if addr < MIN_ADDR || end > USER_TOP {
                return Err(if addr < MIN_ADDR { EINVAL } else { ENOMEM });
            }
            if end == addr {
                return Ok(0);
            }
            process::update(|slot, zero| mm::discard(slot, addr, end, advice == MADV_FREE, zero)).map(|()| 0)
        }
        _ => {
            unimplemented(nr::MADVISE);
            Err(EINVAL)
        }
    }
}
