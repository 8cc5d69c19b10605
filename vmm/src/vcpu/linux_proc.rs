//! A Linux program's `/proc/PID/pagemap` reads and `/proc/PID/clear_refs` writes,
//! answered from outside: the guest kernel forwards each system call as one
//! [`ProcRequest`] (`PROC_PORT`), and the VMM runs exactly the code behind `vmm pagemap`
//! and `vmm clear-refs` under the VM's engine. The guest kernel keeps no soft-dirty
//! state.
//!
//! The request is read from guest memory and checked like any guest request; what the
//! program asked for is answered with `-errno` in the request (its system call fails as
//! Linux's would), never by ending the run. The answer is stored into the program's own
//! buffer through its page tables, which the kernel made present and writable (and
//! written: the store is a write of the program's pages, as Linux's copy_to_user is).

use crate::guest_os::le::{u32_at, u64_at};
use super::runner::VcpuContext;
use crate::guest_os::linux::map_names::{self, MapNames};
use crate::guest_os::linux::proc_text;
use std::collections::HashMap;
use crate::machine::memory::{self, Phys};
use crate::tracking::softdirty::{ClearRefs, Tracker};
use guest_abi::{proc_op, Piece, ProcRequest, PROC_PAGEMAP_MAX, PROC_PIECES_MAX};
use mmu::{Cr3, GuestVirtAddr, PageSize, PagingMode, PteFlags, TableBudget, Translation, Walker};
use std::mem::offset_of;

const EFAULT: i64 = 14;
const EINVAL: i64 = 22;
const ESRCH: i64 = 3;
const USER_TOP: u64 = 0x0000_8000_0000_0000;
const PAGE: u64 = 4096;
/// Most bytes one COPY moves (one `read` of a file).
const COPY_MAX: u64 = 1 << 20;



/// Answers the request at guest-physical `addr`; `Err` only if the request itself is
/// not in guest RAM (the kernel's bug, which ends the run like any malformed request).
pub fn answer(ctx: &mut VcpuContext, addr: u64) -> Result<(), memory::Error> {
    let raw = memory::read(&ctx.mem, addr, std::mem::size_of::<ProcRequest>())?;
    let req = ProcRequest {
        op: u32_at(&raw, offset_of!(ProcRequest, op)),
        pid: u32_at(&raw, offset_of!(ProcRequest, pid)),
        arg: u64_at(&raw, offset_of!(ProcRequest, arg)),
        count: u64_at(&raw, offset_of!(ProcRequest, count)),
        buf: u64_at(&raw, offset_of!(ProcRequest, buf)),
        result: 0,
        target: u32_at(&raw, offset_of!(ProcRequest, target)),
        _pad: 0,
        aux: u64_at(&raw, offset_of!(ProcRequest, aux)),
    };
    let result = match req.op {
        proc_op::PAGEMAP => pagemap(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        proc_op::CLEAR_REFS => clear_refs(ctx, &req).map_or_else(|e| -e, |()| 0),
        proc_op::COPY => copy(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        proc_op::SMAPS | proc_op::MAPS | proc_op::STATUS => proc_text(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        proc_op::GATHER => gather(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        proc_op::SCATTER => scatter(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        proc_op::PHYS_COPY => phys_copy(ctx, &req).map_or_else(|e| -e, |n| n as i64),
        _ => -EINVAL,
    };
    memory::write(&ctx.mem, addr + offset_of!(ProcRequest, result) as u64, &result.to_le_bytes())
}

/// The address space of the calling process, where the request's buffer is.
fn caller_cr3(tracker: &mut crate::tracking::softdirty::Tracker, mem: &memory::GuestMem, pid: u32) -> Result<Cr3, i64> {
    let snap = tracker.snapshot(mem).map_err(|_| ESRCH)?;
    Ok(snap.by_pid(pid).ok_or(ESRCH)?.cr3)
}

/// The process whose /proc entry a request reads or writes: `target`, or the caller.
fn target(req: &ProcRequest) -> u32 {
    if req.target == 0 { req.pid } else { req.target }
}

fn pagemap(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    let start = req.arg.checked_mul(PAGE).ok_or(EINVAL)?;
    if req.count == 0 || req.count > PROC_PAGEMAP_MAX || start.checked_add(req.count * PAGE).is_none_or(|e| e > USER_TOP) {
        return Err(EINVAL);
    }
    let VcpuContext { tracker, mem, .. } = ctx;
    let pages = tracker.pagemap(mem, target(req), Some((start, req.count))).map_err(|_| ESRCH)?;
    let bytes: Vec<u8> = pages.iter().flat_map(|p| p.entry.0.to_le_bytes()).collect();
    let cr3 = caller_cr3(tracker, mem, req.pid)?;
    store(tracker, mem, cr3, req.buf, &bytes)?;
    Ok(bytes.len() as u64)
}

fn clear_refs(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<(), i64> {
    let value = ClearRefs::try_from(req.arg).map_err(|_| EINVAL)?;
    let VcpuContext { tracker, mem, vcpu, .. } = ctx;
    tracker.clear_refs(mem, vcpu, target(req), value).map(|_| ()).map_err(|_| ESRCH)
}

/// A file's bytes (guest RAM from `arg`) into the program's buffer.
fn copy(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    if req.count > COPY_MAX {
        return Err(EINVAL);
    }
    let bytes = memory::read(&ctx.mem, req.arg, req.count as usize).map_err(|_| EFAULT)?;
    let VcpuContext { tracker, mem, .. } = ctx;
    let cr3 = caller_cr3(tracker, mem, req.pid)?;
    store(tracker, mem, cr3, req.buf, &bytes)?;
    Ok(req.count)
}

/// The piece list at guest-physical `req.arg` (`req.count` entries), checked: at most
/// [`PROC_PIECES_MAX`] pieces of at most [`COPY_MAX`] bytes in all.
fn pieces(mem: &memory::GuestMem, req: &ProcRequest) -> Result<Vec<Piece>, i64> {
    if req.count == 0 || req.count > PROC_PIECES_MAX {
        return Err(EINVAL);
    }
    let size = std::mem::size_of::<Piece>();
    let raw = memory::read(mem, req.arg, req.count as usize * size).map_err(|_| EFAULT)?;
    let list: Vec<Piece> = raw
        .chunks_exact(size)
        .map(|c| Piece { phys: u64_at(c, offset_of!(Piece, phys)), len: u64_at(c, offset_of!(Piece, len)) })
        .collect();
    let total = list.iter().try_fold(0u64, |t, p| t.checked_add(p.len)).ok_or(EINVAL)?;
    if total > COPY_MAX {
        return Err(EINVAL);
    }
    Ok(list)
}

/// `read` of a file of the guest's file system: its pieces of guest RAM, one after the
/// other, into the program's buffer.
fn gather(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    let mut bytes = Vec::new();
    for p in pieces(&ctx.mem, req)? {
        bytes.extend(memory::read(&ctx.mem, p.phys, p.len as usize).map_err(|_| EFAULT)?);
    }
    let VcpuContext { tracker, mem, .. } = ctx;
    let cr3 = caller_cr3(tracker, mem, req.pid)?;
    store(tracker, mem, cr3, req.buf, &bytes)?;
    Ok(bytes.len() as u64)
}

/// `write` to such a file: the program's bytes into its pieces of guest RAM. Nothing
/// is written unless every piece lies in guest RAM and the whole buffer is mapped.
fn scatter(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    let list = pieces(&ctx.mem, req)?;
    let total: u64 = list.iter().map(|p| p.len).sum();
    if list.iter().any(|p| p.phys.checked_add(p.len).is_none_or(|e| e > memory::size(&ctx.mem))) {
        return Err(EFAULT);
    }
    let VcpuContext { tracker, mem, .. } = ctx;
    let cr3 = caller_cr3(tracker, mem, req.pid)?;
    let bytes = load(mem, cr3, req.buf, total)?;
    let mut from = 0;
    for p in list {
        memory::write(mem, p.phys, &bytes[from..from + p.len as usize]).map_err(|_| EFAULT)?;
        from += p.len as usize;
    }
    Ok(total)
}

/// Guest RAM to guest RAM (copy on write of a file page).
fn phys_copy(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    if req.count > COPY_MAX {
        return Err(EINVAL);
    }
    let bytes = memory::read(&ctx.mem, req.arg, req.count as usize).map_err(|_| EFAULT)?;
    memory::write(&ctx.mem, req.buf, &bytes).map_err(|_| EFAULT)?;
    Ok(req.count)
}

/// A piece of the process's smaps or maps text, rendered from its mappings and their
/// pagemap (the same answers `vmm pagemap` gives).
fn proc_text(ctx: &mut VcpuContext, req: &ProcRequest) -> Result<u64, i64> {
    if req.count > COPY_MAX {
        return Err(EINVAL);
    }
    let VcpuContext { tracker, mem, .. } = ctx;
    let snap = tracker.snapshot(mem).map_err(|_| ESRCH)?;
    let cr3 = snap.by_pid(req.pid).ok_or(ESRCH)?.cr3;
    let p = snap.by_pid(target(req)).ok_or(ESRCH)?;
    let names = if req.aux == 0 { MapNames::default() } else { map_names(mem, req.aux)? };
    let text = match req.op {
        proc_op::MAPS => proc_text::maps(&vmas(tracker, mem, &snap, p, &names, false)?),
        proc_op::STATUS => proc_text::status(&status(p)),
        _ => proc_text::smaps(&vmas(tracker, mem, &snap, p, &names, true)?),
    };
    let from = (req.arg as usize).min(text.len());
    let piece = &text.as_bytes()[from..(from + req.count as usize).min(text.len())];
    store(tracker, mem, cr3, req.buf, piece)?;
    Ok(piece.len() as u64)
}

/// The names of the mappings a maps or smaps request carries (at guest-physical `at`),
/// checked: `EINVAL` (the program's read fails) if they are not what the kernel sends.
/// Nothing is printed: a guest could repeat it without end.
fn map_names(mem: &memory::GuestMem, at: u64) -> Result<MapNames, i64> {
    let raw = memory::read(mem, at, guest_abi::names::MAP_NAMES_BYTES).map_err(|_| EFAULT)?;
    map_names::parse(&raw, |phys, len| memory::read(mem, phys, len).ok()).map_err(|_| EINVAL)
}

/// What `/proc/PID/status` says of `p`: its sizes from its mappings and page counts.
fn status(p: &crate::guest_os::Process) -> proc_text::Status {
    let kb = |pages: u64| pages * 4;
    let sum = |f: &dyn Fn(&crate::guest_os::process_table::Mapping) -> bool| kb(p.mappings.iter().filter(|m| f(m)).map(|m| m.pages).sum());
    proc_text::Status {
        name: p.name.clone(),
        pid: p.pid,
        running: p.is_live(),
        vm_size_kb: sum(&|_| true),
        hwm_kb: kb(p.peak_rss_pages),
        rss_kb: kb(p.rss_pages),
        rss_shmem_kb: 0,
        // Linux: VmData is private writable memory but the stack; VmStk the stack (the
        // mapping at the top of the user half); VmExe the executable text.
        data_kb: sum(&|m| !m.read_only && !m.shared && !m.exec && m.end() != crate::guest_os::linux::layout::STACK_TOP),
        stack_kb: sum(&|m| m.end() == crate::guest_os::linux::layout::STACK_TOP),
        exe_kb: sum(&|m| m.exec),
    }
}

/// The process's mappings with their resident, referenced and huge-page sizes (if
/// `counts`) and their VM_SOFTDIRTY. The sizes come from the present leaves of its page
/// tables, walked once per mapping within a budget of guest RAM's pages, so a large
/// untouched reservation costs nothing and no mapping is too large. As Linux's smaps,
/// the shared zero pages are not resident.
fn vmas(tracker: &mut crate::tracking::softdirty::Tracker, mem: &memory::GuestMem, snap: &crate::guest_os::Snapshot,
    p: &crate::guest_os::Process, names: &MapNames, counts: bool) -> Result<Vec<proc_text::Vma>, i64> {
    let walker = Walker::new(PagingMode::Level4);
    let mut budget = TableBudget::new(memory::size(mem) / PAGE);
    let zero = [snap.zero_frame, snap.huge_zero_frame];
    let shared = if counts && p.mappings.iter().any(|m| m.shared) { shared_frame_counts(mem, snap)? } else { HashMap::new() };
    let mut out = Vec::new();
    for m in &p.mappings {
        let mut v = proc_text::Vma {
            start: m.start,
            end: m.end(),
            read_only: m.read_only,
            exec: m.exec,
            shared: m.shared,
            huge: m.huge,
            soft_dirty: tracker.vma_soft_dirty(p.pid, m),
            identity: names.identify(m),
            ..Default::default()
        };
        let mut pss_bytes_fixed = 0u64;
        if counts {
            walker
                .walk_range_within(&Phys(mem), p.cr3.table(), GuestVirtAddr(m.start), m.pages, &mut budget, &mut |item| {
                    let Ok(leaf) = item else { return };
                    if zero.contains(&leaf.frame().0) {
                        return;
                    }
                    let (lo, hi) = (leaf.va.0.max(m.start), (leaf.va.0 + leaf.size.bytes()).min(m.end()));
                    let kb = hi.saturating_sub(lo) / 1024;
                    let mapped = if m.shared { shared.get(&leaf.frame().0).copied().unwrap_or(1).max(1) } else { 1 };
                    v.shared_kb += if mapped > 1 { kb } else { 0 };
                    pss_bytes_fixed += ((kb * 1024) << PSS_SHIFT) / u64::from(mapped);
                    v.rss_kb += kb;
                    v.referenced_kb += if leaf.entry.contains(PteFlags::ACCESSED) { kb } else { 0 };
                    v.anon_huge_kb += if leaf.size != PageSize::Size4K { kb } else { 0 };
                })
                .map_err(|_| EFAULT)?;
            v.pss_kb = pss_bytes_fixed >> PSS_SHIFT >> 10;
        }
        out.push(v);
    }
    Ok(out)
}

/// Linux's fixed point for the proportional set size (each page's bytes divided by how
/// many times it is mapped).
const PSS_SHIFT: u32 = 12;

/// How many times each frame of a shared mapping is mapped, by every live process's
/// shared mappings (Linux's mapcount, by which smaps counts a page as shared or
/// private). Only shared mappings can map a frame twice here: a private page is a
/// process's own. The walks share one budget of guest RAM's pages.
fn shared_frame_counts(mem: &memory::GuestMem, snap: &crate::guest_os::Snapshot) -> Result<HashMap<u64, u32>, i64> {
    let walker = Walker::new(PagingMode::Level4);
    let mut budget = TableBudget::new(memory::size(mem) / PAGE);
    let mut counts: HashMap<u64, u32> = HashMap::new();
    for q in snap.processes.iter().filter(|q| q.is_live()) {
        for m in q.mappings.iter().filter(|m| m.shared) {
            walker
                .walk_range_within(&Phys(mem), q.cr3.table(), GuestVirtAddr(m.start), m.pages, &mut budget, &mut |item| {
                    if let Ok(leaf) = item {
                        *counts.entry(leaf.frame().0).or_default() += 1;
                    }
                })
                .map_err(|_| EFAULT)?;
        }
    }
    Ok(counts)
}

/// The guest-physical runs behind `[va, va + len)` in the address space `cr3`, page by
/// page, as (guest-physical address, offset in the range, length): every page must be
/// mapped in guest RAM (the kernel made it so), else `EFAULT`.
fn runs(mem: &memory::GuestMem, cr3: Cr3, va: u64, len: u64) -> Result<Vec<(u64, usize, usize)>, i64> {
    let walker = Walker::new(PagingMode::Level4);
    let phys = Phys(mem);
    let end = va.checked_add(len).filter(|&e| e <= USER_TOP).ok_or(EFAULT)?;
    let mut out = Vec::new();
    let mut at = va;
    while at < end {
        let take = (PAGE - at % PAGE).min(end - at);
        match walker.translate(&phys, cr3.table(), GuestVirtAddr(at)) {
            Ok(Translation::Mapped { frame, offset, .. }) => out.push((frame.0 + offset, (at - va) as usize, take as usize)),
            _ => return Err(EFAULT),
        }
        at += take;
    }
    Ok(out)
}

/// The `len` bytes at `va` in the address space `cr3`.
fn load(mem: &memory::GuestMem, cr3: Cr3, va: u64, len: u64) -> Result<Vec<u8>, i64> {
    let mut out = Vec::with_capacity(len as usize);
    for (gpa, _, n) in runs(mem, cr3, va, len)? {
        out.extend(memory::read(mem, gpa, n).map_err(|_| EFAULT)?);
    }
    Ok(out)
}

/// Stores `bytes` at `va` in the address space `cr3`: nothing is stored unless every
/// page is mapped. A write of the program's pages, as Linux's copy_to_user is: the
/// engine hears of it (its PTE bits are not set by a store through guest-physical
/// addresses).
fn store(tracker: &mut Tracker, mem: &memory::GuestMem, cr3: Cr3, va: u64, bytes: &[u8]) -> Result<(), i64> {
    for (gpa, from, len) in runs(mem, cr3, va, bytes.len() as u64)? {
        memory::write(mem, gpa, &bytes[from..from + len]).map_err(|_| EFAULT)?;
    }
    tracker.note_store(mem, cr3, va, bytes.len() as u64).map_err(|_| EFAULT)
}
