//! The Linux program's in-memory file system: a writable root and `/tmp`, holding the
//! files the VMM put into guest RAM (`--file`, `--initrd`) and those the program
//! creates. A file is a node: a name (none once unlinked), a size, and its bytes in
//! guest frames, found through a two-level index (a directory frame of 512 index
//! frames of 512 frame addresses each: at most 1 GiB per file, bounded by guest RAM
//! long before). A node lives while it has a name, an open descriptor or a mapping.
//!
//! Ring 0 only allocates frames and keeps the index: every byte a `read` or `write`
//! moves is copied by the VMM, in one [`proc_op::GATHER`] or [`proc_op::SCATTER`] per
//! system call (ring 0 copying bytes is emulated here, ~1 µs an instruction).
//!
//! Mappings of a file are recorded here by (process, serial): a page fault in a
//! `FILE` mapping asks [`fault_frame`] for the frame of the file's page, so
//! `MAP_SHARED` maps the file's own frames (a store through the mapping is a store
//! into the file) and `MAP_PRIVATE` maps a copy of each page the process touches.

use super::uaccess;
use crate::frames::{self, PAGE};
use crate::global::Global;
use crate::{arch, process};
use guest_abi::exec::{File, MAX_FILES, MAX_FILE_NAME};
use guest_abi::names::{self, MapNames};
use guest_abi::{proc_op, Piece, ProcRequest, MAX_PROCS, PROC_PIECES_MAX, PROC_PORT};

pub const ENOENT: i64 = 2;
pub const EINVAL: i64 = 22;
pub const EFBIG: i64 = 27;
pub const ENOSPC: i64 = 28;
pub const EROFS: i64 = 30;
pub const ENAMETOOLONG: i64 = 36;

/// Files the file system holds at once (the VMM's files included).
pub const MAX_NODES: usize = MAX_FILES + 32;
/// File mappings all processes hold at once.
const MAX_MAPS: usize = names::MAX_FILE_MAPS;
/// Longest path a node's name may have.
const NAME_MAX: usize = MAX_FILE_NAME;
const ENTRIES: u64 = PAGE / 8;
/// Largest file: what the two-level index reaches.
const MAX_PAGES: u64 = ENTRIES * ENTRIES;
/// Most bytes one `read` or `write` moves (callers loop, as Linux's do on short counts).
pub const MAX_IO: u64 = (PROC_PIECES_MAX - 1) * PAGE;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backing {
    /// Frames of the node's own, through the index (`dir`: its directory frame, 0 while
    /// the file has none).
    Frames { dir: u64 },
    /// A `--file`'s bytes, contiguous in guest RAM from `phys`; never written (opening
    /// the file for writing first copies them into frames of the node's own).
    Blob { phys: u64 },
}

#[derive(Clone, Copy)]
struct Node {
    used: bool,
    /// The path it was made under (kept once unlinked, for maps's " (deleted)");
    /// length 0: anonymous shared memory.
    name: [u8; NAME_MAX],
    name_len: usize,
    /// The name is in the file system (not unlinked).
    linked: bool,
    /// Open descriptors.
    opens: u32,
    size: u64,
    backing: Backing,
}

const FREE: Node = Node { used: false, name: [0; NAME_MAX], name_len: 0, linked: false, opens: 0, size: 0, backing: Backing::Frames { dir: 0 } };

#[derive(Clone, Copy)]
struct FileMap {
    used: bool,
    proc_index: usize,
    serial: u64,
    /// Where the mapping began, and the file page mapped there.
    va: u64,
    pgoff: u64,
    node: usize,
    /// `MAP_SHARED` through a descriptor open for writing: mprotect may add PROT_WRITE.
    may_write: bool,
}

const NO_MAP: FileMap = FileMap { used: false, proc_index: 0, serial: 0, va: 0, pgoff: 0, node: 0, may_write: false };

struct Fs {
    nodes: [Node; MAX_NODES],
    maps: [FileMap; MAX_MAPS],
    /// File mappings each process holds (most hold none: their mmap and munmap skip
    /// the scan of `maps`, which costs ~1 µs an instruction in ring 0 here).
    held: [u32; MAX_PROCS],
    pieces: [Piece; PROC_PIECES_MAX as usize],
    req: ProcRequest,
    names: MapNames,
}

static FS: Global<Fs> = Global::new(Fs {
    nodes: [FREE; MAX_NODES],
    maps: [NO_MAP; MAX_MAPS],
    held: [0; MAX_PROCS],
    pieces: [Piece { phys: 0, len: 0 }; PROC_PIECES_MAX as usize],
    req: ProcRequest { op: 0, pid: 0, arg: 0, count: 0, buf: 0, result: 0, target: 0, _pad: 0, aux: 0 },
    names: MapNames { brk_start: 0, brk: 0, start_stack: 0, count: 0, maps: [names::FileMap { serial: 0, va: 0, pgoff: 0, ino: 0, name_phys: 0, name_len: 0, flags: 0 }; names::MAX_FILE_MAPS] },
});

fn fs() -> &'static mut Fs {
    // SAFETY: ring 0 on one vCPU; every function here takes this reference once and
    // calls nothing that takes it again while it is live.
    unsafe { FS.get() }
}

/// The VMM's `--file`s become read-only nodes under their names.
pub fn add_blobs(files: &[File]) {
    let fs = fs();
    for (i, f) in files.iter().enumerate().take(MAX_FILES) {
        let len = f.name.iter().position(|&b| b == 0).unwrap_or(f.name.len()).min(NAME_MAX);
        let mut name = [0; NAME_MAX];
        name[..len].copy_from_slice(&f.name[..len]);
        fs.nodes[i] = Node { used: true, name, name_len: len, linked: true, opens: 0, size: f.size, backing: Backing::Blob { phys: f.phys } };
    }
}

/// A path as the file system names it: absolute (the working directory is `/`), with
/// leading `./` and repeated slashes dropped.
fn normalize(path: &[u8], out: &mut [u8; NAME_MAX]) -> Result<usize, i64> {
    let mut len = 0;
    let mut rest = path;
    loop {
        if let Some(r) = rest.strip_prefix(b"./") {
            rest = r;
        } else if let Some(r) = rest.strip_prefix(b"/") {
            rest = r;
        } else {
            break;
        }
    }
    out[0] = b'/';
    len += 1;
    let mut prev_slash = true;
    for &b in rest {
        if b == b'/' && prev_slash {
            continue;
        }
        if len == NAME_MAX {
            return Err(ENAMETOOLONG);
        }
        out[len] = b;
        len += 1;
        prev_slash = b == b'/';
    }
    if len > 1 && out[len - 1] == b'/' {
        len -= 1;
    }
    Ok(len)
}

/// The node `path` names.
pub fn lookup(path: &[u8]) -> Option<usize> {
    let mut name = [0; NAME_MAX];
    let len = normalize(path, &mut name).ok()?;
    fs().nodes.iter().position(|n| n.used && n.linked && n.name_len == len && n.name[..len] == name[..len])
}

/// Is `path` a directory: `/`, `/tmp`, or a directory of a file's path (directories
/// are not nodes: they exist while a file is in them, as the VMM's files name them)?
pub fn is_dir(path: &[u8]) -> bool {
    let mut name = [0; NAME_MAX];
    let Ok(len) = normalize(path, &mut name) else { return false };
    is_dir_name(&name[..len])
}

fn is_dir_name(dir: &[u8]) -> bool {
    dir == b"/"
        || dir == b"/tmp"
        || fs().nodes.iter().any(|n| {
            let name = &n.name[..n.name_len];
            n.used && n.linked && name.len() > dir.len() && name.starts_with(dir) && name[dir.len()] == b'/'
        })
}

/// May a file named `name` be made: its directory exists, and its last part is a name.
fn creatable(name: &[u8]) -> bool {
    let cut = name.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let (parent, leaf) = (&name[..cut], &name[cut + 1..]);
    (parent.is_empty() || is_dir_name(parent)) && !leaf.is_empty() && leaf != b"." && leaf != b".." && !is_dir_name(name)
}

/// A new empty file at `path` (which names no node).
pub fn create(path: &[u8]) -> Result<usize, i64> {
    let mut name = [0; NAME_MAX];
    let len = normalize(path, &mut name)?;
    if !creatable(&name[..len]) {
        return Err(ENOENT);
    }
    let fs = fs();
    let i = fs.nodes.iter().position(|n| !n.used).ok_or(ENOSPC)?;
    fs.nodes[i] = Node { used: true, name, name_len: len, linked: true, ..FREE };
    Ok(i)
}

/// An unnamed node of `size` bytes (shared anonymous memory), freed with its last mapping.
pub fn create_anonymous(size: u64) -> Result<usize, i64> {
    if size.div_ceil(PAGE) > MAX_PAGES {
        return Err(super::files::ENOMEM);
    }
    let fs = fs();
    let i = fs.nodes.iter().position(|n| !n.used).ok_or(super::files::ENOMEM)?;
    fs.nodes[i] = Node { used: true, size, ..FREE };
    Ok(i)
}

pub fn size(node: usize) -> u64 {
    fs().nodes[node].size
}

/// Has the node frames of its own (it can be written and truncated)?
pub fn is_writable(node: usize) -> bool {
    matches!(fs().nodes[node].backing, Backing::Frames { .. })
}

/// Gives a file the VMM put into guest RAM frames of its own, holding a copy of its
/// bytes (one VMM copy per page) unless `empty` (it is being truncated): from then on
/// it is written like any file.
pub fn make_own(node: usize, empty: bool) -> Result<(), i64> {
    let n = fs().nodes[node];
    let Backing::Blob { phys } = n.backing else { return Ok(()) };
    fs().nodes[node].backing = Backing::Frames { dir: 0 };
    if empty {
        fs().nodes[node].size = 0;
        return Ok(());
    }
    let mut off = 0;
    while off < n.size {
        let copied = frame_of(node, off / PAGE, true).and_then(|f| {
            let frame = f.ok_or(ENOSPC)?;
            ask(proc_op::PHYS_COPY, 0, phys + off, PAGE.min(n.size - off), frame)
        });
        if let Err(e) = copied {
            // Out of guest RAM: the file stays as it was.
            if let Backing::Frames { dir } = fs().nodes[node].backing {
                free_pages(dir, 0);
            }
            fs().nodes[node].backing = n.backing;
            return Err(e);
        }
        off += PAGE;
    }
    Ok(())
}

pub fn is_linked(node: usize) -> bool {
    fs().nodes[node].linked
}

/// The node's inode number (`st_ino`, and the inode column of maps).
pub fn ino(node: usize) -> u64 {
    node as u64 + 100
}

pub fn opened(node: usize) {
    fs().nodes[node].opens += 1;
}

pub fn closed(node: usize) {
    let n = &mut fs().nodes[node];
    n.opens = n.opens.saturating_sub(1);
    release_if_unused(node);
}

/// `unlink`: the name goes; the bytes stay while a descriptor or mapping holds them.
pub fn unlink(path: &[u8]) -> Result<(), i64> {
    let node = lookup(path).ok_or(ENOENT)?;
    fs().nodes[node].linked = false;
    release_if_unused(node);
    Ok(())
}

fn mapped(fs: &Fs, node: usize) -> bool {
    fs.maps.iter().any(|m| m.used && m.node == node)
}

/// Frees a node nothing refers to any more, with its frames.
pub fn release_if_unused(node: usize) {
    let fs = fs();
    let n = fs.nodes[node];
    if !n.used || n.linked || n.opens > 0 || mapped(fs, node) {
        return;
    }
    if let Backing::Frames { dir } = n.backing {
        free_pages(dir, 0);
    }
    fs.nodes[node] = FREE;
}

/// Frees the file pages from page `from` on (and index frames left empty), flushing.
fn free_pages(dir: u64, from: u64) {
    if dir == 0 {
        return;
    }
    let d = table(dir);
    for (i, slot) in d.iter_mut().enumerate() {
        let index = *slot;
        let base = i as u64 * ENTRIES;
        if index == 0 || base + ENTRIES <= from {
            continue;
        }
        let t = table(index);
        for (j, e) in t.iter_mut().enumerate() {
            if *e != 0 && base + j as u64 >= from {
                frames::free(*e, 1);
                *e = 0;
            }
        }
        if base >= from {
            frames::free(index, 1);
            *slot = 0;
        }
    }
    if from == 0 {
        frames::free(dir, 1);
    }
    frames::flush();
}

/// The 512 entries of the index frame at `phys`.
fn table(phys: u64) -> &'static mut [u64; ENTRIES as usize] {
    // SAFETY: `phys` is an index frame this module allocated (zeroed, direct-mapped,
    // owned by one node until freed); ring 0 holds no other reference to it.
    unsafe { &mut *(frames::phys_to_virt(phys) as *mut [u64; ENTRIES as usize]) }
}

/// The frame of page `page` of a node with its own frames, allocated (zeroed) if
/// `alloc`; `None` for a hole. `ENOSPC` when guest RAM is exhausted.
fn frame_of(node: usize, page: u64, alloc: bool) -> Result<Option<u64>, i64> {
    if page >= MAX_PAGES {
        return Err(EFBIG);
    }
    let n = &mut fs().nodes[node];
    let Backing::Frames { dir } = &mut n.backing else {
        return Err(EROFS);
    };
    if *dir == 0 {
        if !alloc {
            return Ok(None);
        }
        *dir = frames::alloc().ok_or(ENOSPC)?;
    }
    let d = table(*dir);
    let slot = &mut d[(page / ENTRIES) as usize];
    if *slot == 0 {
        if !alloc {
            return Ok(None);
        }
        *slot = frames::alloc().ok_or(ENOSPC)?;
    }
    let e = &mut table(*slot)[(page % ENTRIES) as usize];
    if *e == 0 {
        if !alloc {
            return Ok(None);
        }
        *e = frames::alloc().ok_or(ENOSPC)?;
    }
    Ok(Some(*e))
}

/// Guest RAM holding byte `off` of the node (the zero frame for a hole), and how many
/// bytes of it belong to the same page.
fn piece_at(node: usize, off: u64, alloc: bool) -> Result<Piece, i64> {
    let in_page = off % PAGE;
    let phys = match fs().nodes[node].backing {
        Backing::Blob { phys } => return Ok(Piece { phys: phys + off, len: PAGE - in_page }),
        Backing::Frames { .. } => match frame_of(node, off / PAGE, alloc)? {
            Some(frame) => frame + in_page,
            None => process::zero_frame() + in_page,
        },
    };
    Ok(Piece { phys, len: PAGE - in_page })
}

/// Asks the VMM for caller `pid` (whose address space `buf` is in; 0 where no buffer
/// is) about process `target` (0: the caller); its answer is the call's result.
pub fn ask_about(op: u32, pid: u32, target: u32, arg: u64, count: u64, buf: u64) -> Result<u64, i64> {
    ask_with(op, pid, target, (arg, count, buf), 0)
}

/// [`ask_about`] with what the request carries besides at guest-physical `aux`.
pub fn ask_with(op: u32, pid: u32, target: u32, (arg, count, buf): (u64, u64, u64), aux: u64) -> Result<u64, i64> {
    let req = &raw mut fs().req;
    // SAFETY: ring 0, no other reference to the request; volatile, because the VMM
    // reads and writes it during the `out` (which the compiler sees as touching no
    // memory).
    let r = unsafe {
        req.write_volatile(ProcRequest { op, pid, arg, count, buf, result: -EINVAL, target, _pad: 0, aux });
        arch::outl(PROC_PORT, frames::kernel_phys(req.cast_const()) as u32);
        (&raw const (*req).result).read_volatile()
    };
    if r < 0 { Err(-r) } else { Ok(r as u64) }
}

fn ask(op: u32, pid: u32, arg: u64, count: u64, buf: u64) -> Result<u64, i64> {
    ask_about(op, pid, 0, arg, count, buf)
}

/// Builds the piece list for `[pos, pos + len)` of the node; returns how many pieces.
fn pieces(node: usize, pos: u64, len: u64, alloc: bool) -> Result<u64, i64> {
    let mut count = 0;
    let mut at = pos;
    while at < pos + len {
        let mut p = piece_at(node, at, alloc)?;
        p.len = p.len.min(pos + len - at);
        fs().pieces[count] = p;
        count += 1;
        at += p.len;
    }
    Ok(count as u64)
}

fn pieces_phys() -> u64 {
    frames::kernel_phys(fs().pieces.as_ptr())
}

/// `pread`: at most [`MAX_IO`] bytes from `pos`, into the program's `buf` (which the
/// caller made present and written).
pub fn read(node: usize, buf: u64, len: u64, pos: u64) -> Result<u64, i64> {
    let n = len.min(MAX_IO).min(size(node).saturating_sub(pos));
    if n == 0 {
        return Ok(0);
    }
    super::files::probe(buf, n)?;
    let count = pieces(node, pos, n, false)?;
    ask(proc_op::GATHER, process::current_pid(), pieces_phys(), count, buf)
}

/// `pwrite`: at most [`MAX_IO`] bytes of the program's `buf` at `pos`, the file growing
/// as needed. Guest RAM running out midway gives a short write (or `ENOSPC`).
pub fn write(node: usize, buf: u64, len: u64, pos: u64) -> Result<u64, i64> {
    if !is_writable(node) {
        return Err(EROFS);
    }
    let mut n = len.min(MAX_IO);
    if n == 0 {
        return Ok(0);
    }
    let end = pos.checked_add(n).ok_or(EFBIG)?;
    if end.div_ceil(PAGE) > MAX_PAGES {
        return Err(EFBIG);
    }
    uaccess::ensure(buf, n, false)?;
    // Frames first: what could be allocated is what is written.
    let mut at = pos;
    while at < end {
        if let Err(e) = frame_of(node, at / PAGE, true) {
            if at == pos {
                return Err(e);
            }
            n = at - pos;
            break;
        }
        at = (at / PAGE + 1) * PAGE;
    }
    let count = pieces(node, pos, n, false)?;
    ask(proc_op::SCATTER, process::current_pid(), pieces_phys(), count, buf)?;
    let node = &mut fs().nodes[node];
    node.size = node.size.max(pos + n);
    Ok(n)
}

/// `ftruncate`: the file's size becomes `new`; pages past it are freed unless mapped
/// (a process mapping them keeps them until it unmaps), and the rest of the last page
/// is zeroed, so that growing the file again reads zeros.
pub fn truncate(node: usize, new: u64) -> Result<(), i64> {
    if !is_writable(node) {
        return Err(EROFS);
    }
    if new.div_ceil(PAGE) > MAX_PAGES {
        return Err(EFBIG);
    }
    let old = size(node);
    if new < old {
        if !new.is_multiple_of(PAGE) {
            if let Some(frame) = frame_of(node, new / PAGE, false)? {
                let off = new % PAGE;
                ask(proc_op::PHYS_COPY, 0, process::zero_frame(), PAGE - off, frame + off)?;
            }
        }
        let (backing, is_mapped) = {
            let fs = fs();
            (fs.nodes[node].backing, mapped(fs, node))
        };
        let first = new.div_ceil(PAGE);
        match backing {
            Backing::Frames { dir } if !is_mapped => free_pages(dir, first),
            // A mapping keeps the frames: zero them instead (one copy each; rare).
            _ => {
                for page in first..old.div_ceil(PAGE) {
                    if let Some(frame) = frame_of(node, page, false)? {
                        ask(proc_op::PHYS_COPY, 0, process::zero_frame(), PAGE, frame)?;
                    }
                }
            }
        }
    }
    fs().nodes[node].size = new;
    Ok(())
}

/// Remembers that process `proc_index`'s mapping `serial` (from `va`) maps the node
/// from page `pgoff`.
pub fn add_map(proc_index: usize, serial: u64, va: u64, node: usize, pgoff: u64, may_write: bool) -> Result<(), i64> {
    let fs = fs();
    let slot = fs.maps.iter().position(|m| !m.used).ok_or(super::files::ENOMEM)?;
    fs.maps[slot] = FileMap { used: true, proc_index, serial, va, pgoff, node, may_write };
    fs.held[proc_index] += 1;
    Ok(())
}

/// What maps names process `proc_index`'s mappings by (its file mappings, the program
/// break's range, the initial stack pointer), for a MAPS or SMAPS request: its
/// guest-physical address.
pub fn describe_maps(proc_index: usize, (brk_start, brk): (u64, u64), start_stack: u64) -> u64 {
    let fs = fs();
    let mut count = 0;
    let maps = if fs.held[proc_index] == 0 { &fs.maps[..0] } else { &fs.maps[..] };
    for m in maps.iter().filter(|m| m.used && m.proc_index == proc_index) {
        let n = &fs.nodes[m.node];
        fs.names.maps[count] = names::FileMap {
            serial: m.serial,
            va: m.va,
            pgoff: m.pgoff,
            ino: ino(m.node),
            name_phys: frames::kernel_phys(n.name.as_ptr()),
            name_len: n.name_len as u32,
            flags: if n.linked { 0 } else { names::DELETED },
        };
        count += 1;
    }
    fs.names.brk_start = brk_start;
    fs.names.brk = brk;
    fs.names.start_stack = start_stack;
    fs.names.count = count as u64;
    frames::kernel_phys(&raw const fs.names)
}

/// May a `MAP_SHARED` mapping `serial` of the process become writable?
pub fn may_write(proc_index: usize, serial: u64) -> bool {
    fs().maps.iter().any(|m| m.used && m.proc_index == proc_index && m.serial == serial && m.may_write)
}

/// Does process `proc_index` hold a file mapping?
pub fn holds_maps(proc_index: usize) -> bool {
    fs().held[proc_index] > 0
}

/// Forgets the process's file mappings for which `live` says no (all of them at exit),
/// freeing nodes nothing refers to any more.
pub fn prune_maps(proc_index: usize, live: impl Fn(u64) -> bool) {
    for i in 0..MAX_MAPS {
        if fs().held[proc_index] == 0 {
            return;
        }
        let m = fs().maps[i];
        if m.used && m.proc_index == proc_index && !live(m.serial) {
            fs().maps[i] = NO_MAP;
            fs().held[proc_index] -= 1;
            release_if_unused(m.node);
        }
    }
}

/// The frame a fault at `page_va` of the current process's file mapping `serial`
/// maps: the file's own (allocated for a hole) if `shared`; else a fresh frame holding
/// a copy of the file's page. `Err`: the process must die (a page past the end of the
/// file, as Linux's SIGBUS; or guest RAM exhausted).
pub fn fault_frame(serial: u64, page_va: u64, shared: bool) -> Result<u64, &'static str> {
    let me = process::current_index();
    let (m, node_size) = {
        let fs = fs();
        let Some(m) = fs.maps.iter().find(|m| m.used && m.proc_index == me && m.serial == serial).copied() else {
            return Err("file mapping without a file at");
        };
        (m, fs.nodes[m.node].size)
    };
    let page = m.pgoff + (page_va - m.va) / PAGE;
    if page >= node_size.div_ceil(PAGE) {
        return Err("bus error: page past the end of the file at");
    }
    if shared {
        return match frame_of(m.node, page, true) {
            Ok(Some(frame)) => Ok(frame),
            _ => Err("out of memory at"),
        };
    }
    let own = frames::alloc().ok_or("out of memory at")?;
    let src = piece_at(m.node, page * PAGE, false).map_err(|_| "file mapping without a file at")?;
    if src.phys != process::zero_frame() {
        let len = PAGE.min(node_size - page * PAGE);
        // The process's pid is not needed: the copy is from guest RAM to guest RAM.
        ask(proc_op::PHYS_COPY, 0, src.phys, len, own).map_err(|_| "cannot copy a file page at")?;
    }
    Ok(own)
}
