//! A process's anonymous memory: its mapping records (like Linux VMAs) and the page
//! tables under them. Pages are populated on first touch, as in Linux: a read maps the
//! shared zero frame read-only, a write maps a fresh frame.

use crate::frames::{self, HUGE, PAGE};
use crate::paging::{self, ADDR_MASK, HV_BITS, NX, P, PS, U, W};
use guest_abi::mapping_flags::{EXEC as F_EXEC, FILE as F_FILE, HUGE as F_HUGE, READ_ONLY as F_RO, SHARED as F_SHARED};
use guest_abi::{MappingRecord, ProcSlot, MAX_MAPPINGS};
use workload::{MIN_ADDR, USER_TOP};

pub const EINVAL: i64 = 22;
pub const ENOMEM: i64 = 12;
pub const EFAULT: i64 = 14;

/// Page counts above which a range change flushes the whole TLB instead of per page.
const INVLPG_LIMIT: u64 = 64;

/// What became of a page fault.
pub enum Fault {
    /// Fixed: retry the instruction.
    Resolved,
    /// The process must die; the reason for the console.
    Kill(&'static str),
}

fn end_of(m: &MappingRecord) -> u64 {
    m.start + m.pages * PAGE
}

fn records(slot: &ProcSlot) -> &[MappingRecord] {
    &slot.mappings[..slot.nmappings as usize]
}

fn find(slot: &ProcSlot, addr: u64) -> Option<usize> {
    records(slot).iter().position(|m| m.start <= addr && addr < end_of(m))
}

/// Checks a range from a system call: page-aligned, non-empty, inside the user half.
pub fn check_range(addr: u64, pages: u64, huge: bool) -> Result<u64, i64> {
    let len = pages.checked_mul(PAGE).ok_or(EINVAL)?;
    let end = addr.checked_add(len).ok_or(EINVAL)?;
    if pages == 0 || !addr.is_multiple_of(PAGE) || addr < MIN_ADDR || end > USER_TOP {
        return Err(EINVAL);
    }
    if huge && (!addr.is_multiple_of(HUGE) || !len.is_multiple_of(HUGE)) {
        return Err(EINVAL);
    }
    Ok(end)
}

/// Can the record containing `addr` be split there? (Huge mappings split at 2 MiB only.)
fn split_ok(slot: &ProcSlot, addr: u64) -> Result<bool, i64> {
    match find(slot, addr) {
        Some(i) if slot.mappings[i].start != addr => {
            if slot.mappings[i].flags & F_HUGE != 0 && !addr.is_multiple_of(HUGE) {
                return Err(EINVAL);
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Ensures no record straddles `addr` or `end`, failing before any change.
fn split_bounds(slot: &mut ProcSlot, addr: u64, end: u64) -> Result<(), i64> {
    let needed = usize::from(split_ok(slot, addr)?) + usize::from(split_ok(slot, end)?);
    if slot.nmappings as usize + needed > MAX_MAPPINGS {
        return Err(ENOMEM);
    }
    for at in [addr, end] {
        if let Some(i) = find(slot, at) {
            let m = slot.mappings[i];
            if m.start != at {
                let left_pages = (at - m.start) / PAGE;
                slot.mappings[i].pages = left_pages;
                insert(slot, MappingRecord { start: at, pages: m.pages - left_pages, ..m });
            }
        }
    }
    Ok(())
}

fn insert(slot: &mut ProcSlot, rec: MappingRecord) -> usize {
    let n = slot.nmappings as usize;
    let pos = records(slot).iter().position(|m| m.start > rec.start).unwrap_or(n);
    let mut i = n;
    while i > pos {
        slot.mappings[i] = slot.mappings[i - 1];
        i -= 1;
    }
    slot.mappings[pos] = rec;
    slot.nmappings += 1;
    pos
}

/// Like Linux merging VMAs: joins the record at `pos` with an adjacent record of the same
/// flags. `same_serial`: only pieces of one mapping (mprotect re-merging what it split;
/// the serial stays, as mprotect neither sets nor clears soft-dirty); otherwise (a new
/// mapping next to old ones) the merged record takes the new record's serial: Linux
/// marks the whole merged VMA soft-dirty. Shared-window mappings are not merged; pieces
/// of one file mapping are (their file offsets follow from the mapping's start).
fn merge_around(slot: &mut ProcSlot, mut pos: usize, same_serial: bool) {
    let mergeable = |a: &MappingRecord, b: &MappingRecord| {
        let kind_ok = if a.flags & F_FILE != 0 { same_serial } else { a.flags & F_SHARED == 0 };
        end_of(a) == b.start && a.flags == b.flags && kind_ok && (!same_serial || a.serial == b.serial)
    };
    if pos > 0 && mergeable(&slot.mappings[pos - 1], &slot.mappings[pos]) {
        let cur = slot.mappings[pos];
        slot.mappings[pos - 1].pages += cur.pages;
        slot.mappings[pos - 1].serial = cur.serial;
        remove(slot, pos);
        pos -= 1;
    }
    if pos + 1 < slot.nmappings as usize && mergeable(&slot.mappings[pos], &slot.mappings[pos + 1]) {
        let next = slot.mappings[pos + 1];
        slot.mappings[pos].pages += next.pages;
        remove(slot, pos + 1);
    }
}

fn remove(slot: &mut ProcSlot, pos: usize) {
    let n = slot.nmappings as usize;
    for i in pos..n - 1 {
        slot.mappings[i] = slot.mappings[i + 1];
    }
    slot.mappings[n - 1] = MappingRecord::default();
    slot.nmappings -= 1;
}

fn sub_rss(slot: &mut ProcSlot, pages: u64) {
    slot.rss_pages = slot.rss_pages.saturating_sub(pages);
}

fn add_rss(slot: &mut ProcSlot, pages: u64) {
    slot.rss_pages += pages;
    if slot.rss_pages > slot.peak_rss_pages {
        slot.peak_rss_pages = slot.rss_pages;
    }
}

/// Calls `f` on every present leaf entry in `[addr, end)`, skipping absent tables.
fn for_each_leaf(pml4: u64, addr: u64, end: u64, huge: bool, mut f: impl FnMut(*mut u64, u64)) {
    let mut va = addr;
    while va < end {
        let chunk_end = ((va / HUGE) + 1) * HUGE;
        if huge {
            if let Ok(pde) = paging::walk(pml4, va, 2, false) {
                // SAFETY: `pde` points into a live page directory.
                if unsafe { pde.read_volatile() } & (P | PS) == P | PS {
                    f(pde, va);
                }
            }
            va = chunk_end;
            continue;
        }
        let stop = if chunk_end < end { chunk_end } else { end };
        if let Ok(first) = paging::walk(pml4, va, 1, false) {
            let mut pte = first;
            while va < stop {
                // SAFETY: consecutive PTEs of one page table, all inside [va, stop).
                if unsafe { pte.read_volatile() } & P != 0 {
                    f(pte, va);
                }
                // SAFETY: stays inside the same 512-entry table (stop <= chunk end).
                pte = unsafe { pte.add(1) };
                va += PAGE;
            }
        }
        va = stop;
    }
}

fn flush_range(addr: u64, pages: u64) {
    if pages > INVLPG_LIMIT {
        // SAFETY: reloading the current CR3 only flushes the TLB.
        unsafe { crate::arch::write_cr3(crate::arch::read_cr3()) };
    } else {
        for i in 0..pages {
            crate::arch::invlpg(addr + i * PAGE);
        }
    }
}

/// Drops the pages of `[addr, end)` from the page tables (records untouched). Frames of
/// a shared mapping stay with the shared window.
fn release_pages(slot: &mut ProcSlot, addr: u64, end: u64, huge: bool, shared: bool, zero_frame: u64) {
    let mut released = 0;
    for_each_leaf(slot.cr3, addr, end, huge, |e, _| {
        // SAFETY: `e` is a present leaf entry handed out by `for_each_leaf`.
        let value = unsafe { e.read_volatile() };
        let frame = value & ADDR_MASK;
        if huge {
            if Some(frame & !(HUGE - 1)) != crate::process::huge_zero_frame() {
                frames::free(frame & !(HUGE - 1), HUGE / PAGE);
                released += HUGE / PAGE;
            }
        } else if shared {
            released += 1;
        } else if frame != zero_frame {
            frames::free(frame, 1);
            released += 1;
        }
        // SAFETY: as above.
        unsafe { e.write_volatile(0) };
    });
    sub_rss(slot, released);
    flush_range(addr, (end - addr) / PAGE);
    frames::flush();
}

/// `munmap`: unmapping a hole is not an error, as in Linux.
pub fn unmap(slot: &mut ProcSlot, addr: u64, pages: u64, zero_frame: u64) -> Result<(), i64> {
    let end = check_range(addr, pages, false)?;
    split_bounds(slot, addr, end)?;
    let mut i = 0;
    while i < slot.nmappings as usize {
        let m = slot.mappings[i];
        if m.start >= addr && end_of(&m) <= end {
            release_pages(slot, m.start, end_of(&m), m.flags & F_HUGE != 0, m.flags & F_SHARED != 0, zero_frame);
            remove(slot, i);
        } else {
            i += 1;
        }
    }
    Ok(())
}

/// `mmap(MAP_FIXED|MAP_ANONYMOUS)`: replaces whatever was mapped there.
pub fn map(slot: &mut ProcSlot, addr: u64, pages: u64, flags: u32, serial: u64, zero_frame: u64) -> Result<(), i64> {
    check_range(addr, pages, flags & F_HUGE != 0)?;
    if flags & (F_SHARED | F_FILE) == F_SHARED && (frames::shared_frame(addr).is_none() || frames::shared_frame(addr + (pages - 1) * PAGE).is_none()) {
        return Err(EINVAL);
    }
    unmap(slot, addr, pages, zero_frame)?;
    if slot.nmappings as usize >= MAX_MAPPINGS {
        return Err(ENOMEM);
    }
    let pos = insert(slot, MappingRecord { start: addr, pages, flags: flags & (F_HUGE | F_RO | F_SHARED | F_EXEC | F_FILE), _pad: 0, serial });
    merge_around(slot, pos, false);
    Ok(())
}

/// `mprotect`: the whole range must be mapped (else ENOMEM, as in Linux).
pub fn protect(slot: &mut ProcSlot, addr: u64, pages: u64, read_only: bool, zero_frame: u64) -> Result<(), i64> {
    let end = check_range(addr, pages, false)?;
    let mut covered = addr;
    while covered < end {
        match find(slot, covered) {
            Some(i) => covered = end_of(&slot.mappings[i]),
            None => return Err(ENOMEM),
        }
    }
    split_bounds(slot, addr, end)?;
    let pml4 = slot.cr3;
    for i in 0..slot.nmappings as usize {
        let m = slot.mappings[i];
        if m.start < addr || end_of(&m) > end {
            continue;
        }
        let huge = m.flags & F_HUGE != 0;
        slot.mappings[i].flags = if read_only { m.flags | F_RO } else { m.flags & !F_RO };
        for_each_leaf(pml4, m.start, end_of(&m), huge, |e, _| {
            // SAFETY: `e` is a present leaf entry; only the W bit changes.
            let value = unsafe { e.read_volatile() };
            let new = if read_only {
                value & !W
            } else if (!huge && value & ADDR_MASK == zero_frame)
                || (huge && Some(value & ADDR_MASK) == crate::process::huge_zero_frame())
            {
                value // zero pages stay read-only: a write will fault and replace them
            } else {
                value | W
            };
            // SAFETY: as above.
            unsafe { e.write_volatile(new) };
        });
    }
    flush_range(addr, pages);
    // Pieces of one mapping with the same rights again become one record.
    let mut i = 0;
    while i < slot.nmappings as usize {
        let before = slot.nmappings;
        merge_around(slot, i, true);
        if slot.nmappings == before {
            i += 1;
        }
    }
    Ok(())
}

/// `madvise(MADV_DONTNEED)` (and `MADV_FREE`, `private_anon_only`: which Linux refuses
/// on shared and file mappings): the pages of `[addr, end)` go, the mappings stay, and
/// the next touch finds zeros (anonymous memory) or the file's bytes again. A huge
/// mapping drops only the 2 MiB blocks the range covers whole (Linux would split a
/// partly covered one). The whole range must be mapped (else `ENOMEM`, as Linux).
pub fn discard(slot: &mut ProcSlot, addr: u64, end: u64, private_anon_only: bool, zero_frame: u64) -> Result<(), i64> {
    let mut covered = addr;
    while covered < end {
        match find(slot, covered) {
            Some(i) => covered = end_of(&slot.mappings[i]),
            None => return Err(ENOMEM),
        }
    }
    let in_range = |m: &MappingRecord| m.start < end && addr < end_of(m);
    if private_anon_only && records(slot).iter().any(|m| in_range(m) && m.flags & (F_SHARED | F_FILE) != 0) {
        return Err(EINVAL);
    }
    for i in 0..slot.nmappings as usize {
        let m = slot.mappings[i];
        if !in_range(&m) {
            continue;
        }
        let huge = m.flags & F_HUGE != 0;
        let (mut from, mut to) = (m.start.max(addr), end_of(&m).min(end));
        if huge {
            from = from.next_multiple_of(HUGE);
            to &= !(HUGE - 1);
        }
        if from < to {
            release_pages(slot, from, to, huge, m.flags & F_SHARED != 0, zero_frame);
        }
    }
    Ok(())
}

/// Releases everything a process has mapped (at exit).
pub fn release_all(slot: &mut ProcSlot, zero_frame: u64) {
    while slot.nmappings > 0 {
        let m = slot.mappings[0];
        release_pages(slot, m.start, end_of(&m), m.flags & F_HUGE != 0, m.flags & F_SHARED != 0, zero_frame);
        remove(slot, 0);
    }
}

/// Handles a page fault raised by ring 3 at `addr`.
pub fn fault(slot: &mut ProcSlot, addr: u64, write: bool, zero_frame: u64) -> Fault {
    if addr >= USER_TOP {
        return Fault::Kill("fault outside the user half");
    }
    let Some(i) = find(slot, addr) else {
        return Fault::Kill("segmentation fault: no mapping at");
    };
    let m = slot.mappings[i];
    let writable = m.flags & F_RO == 0;
    if write && !writable {
        return Fault::Kill("write to read-only mapping at");
    }
    let rw = if writable { W } else { 0 };
    // A Linux program's text is executable; everything else is not.
    let nx = if m.flags & F_EXEC != 0 { 0 } else { NX };
    let huge = m.flags & F_HUGE != 0;
    let page_va = addr & !(if huge { HUGE - 1 } else { PAGE - 1 });
    let Ok(e) = paging::walk(slot.cr3, addr, if huge { 2 } else { 1 }, true) else {
        return Fault::Kill("out of memory for page tables at");
    };
    // SAFETY: `e` is the leaf slot for `addr` in this process's live tables.
    let mut old = unsafe { e.read_volatile() };
    if huge && old & (P | PS) == P {
        // An empty page table left by an earlier 4 KiB mapping here: drop it.
        frames::free(old & ADDR_MASK, 1);
        frames::flush();
        old = 0;
    }
    let keep = old & HV_BITS;
    let new = if old & P == 0 {
        if huge && !write {
            // A read maps the shared 2 MiB zero block read-only, like Linux's huge zero
            // page; a write will replace it.
            let Some(zero) = crate::process::huge_zero_frame() else { return Fault::Kill("out of memory at") };
            zero | P | U | PS | nx | keep
        } else if huge {
            let Some(frame) = frames::alloc_huge() else { return Fault::Kill("out of memory at") };
            add_rss(slot, HUGE / PAGE);
            frame | P | U | PS | nx | rw | keep
        } else if m.flags & F_FILE != 0 {
            // The file's own frame (shared) or a copy of it (private); read-only until
            // written, so that a read does not make the page writable.
            let frame = match crate::linux::file_fault_frame(m.serial, page_va, m.flags & F_SHARED != 0) {
                Ok(frame) => frame,
                Err(why) => return Fault::Kill(why),
            };
            add_rss(slot, 1);
            frame | P | U | nx | if write { rw } else { 0 } | keep
        } else if m.flags & F_SHARED != 0 {
            // The window's frame, read or write: others see the same memory.
            let Some(frame) = frames::shared_frame(page_va) else { return Fault::Kill("shared page outside the window at") };
            add_rss(slot, 1);
            frame | P | U | nx | if write { rw } else { 0 } | keep
        } else if write {
            let Some(frame) = frames::alloc() else { return Fault::Kill("out of memory at") };
            add_rss(slot, 1);
            frame | P | U | nx | W | keep
        } else {
            zero_frame | P | U | nx | keep
        }
    } else if write && old & W == 0 {
        if huge && Some(old & ADDR_MASK) == crate::process::huge_zero_frame() {
            let Some(frame) = frames::alloc_huge() else { return Fault::Kill("out of memory at") };
            add_rss(slot, HUGE / PAGE);
            (old & !ADDR_MASK) | frame | W
        } else if !huge && old & ADDR_MASK == zero_frame {
            let Some(frame) = frames::alloc() else { return Fault::Kill("out of memory at") };
            add_rss(slot, 1);
            (old & !ADDR_MASK) | frame | W
        } else {
            // A write-protect fault on a writable mapping (the hypervisor's, or stale):
            // make the entry writable again and retry, as every kernel does.
            old | W
        }
    } else {
        old // stale TLB entry: retry after the invlpg below
    };
    // SAFETY: as above.
    unsafe { e.write_volatile(new) };
    crate::arch::invlpg(page_va);
    Fault::Resolved
}

/// Whether any mapping intersects `[addr, end)`.
pub fn overlaps(slot: &ProcSlot, addr: u64, end: u64) -> bool {
    records(slot).iter().any(|m| m.start < end && addr < end_of(m))
}

/// The highest free range of `pages` below `below` (and above [`MIN_ADDR`]): where
/// Linux's top-down `mmap` puts a mapping without an address.
pub fn find_free(slot: &ProcSlot, pages: u64, below: u64) -> Option<u64> {
    let len = pages.checked_mul(PAGE)?;
    let mut top = below;
    for m in records(slot).iter().rev() {
        if m.start >= top {
            continue;
        }
        if end_of(m) <= top && top - end_of(m) >= len {
            return Some(top - len);
        }
        top = m.start;
    }
    (top >= MIN_ADDR + len).then(|| top - len)
}

/// Makes `frames` consecutive frames from `phys` (filled by the VMM: a program's bytes)
/// the present pages from `va` of the 4 KiB mapping that covers them, with its rights.
pub fn map_filled(slot: &mut ProcSlot, va: u64, pages: u64, phys: u64) -> Result<(), &'static str> {
    let Some(i) = find(slot, va) else { return Err("no mapping for filled pages") };
    let m = slot.mappings[i];
    if m.flags & (F_HUGE | F_SHARED | F_FILE) != 0 || va + pages * PAGE > end_of(&m) {
        return Err("filled pages outside a private 4 KiB mapping");
    }
    let rights = P | U | if m.flags & F_RO == 0 { W } else { 0 } | if m.flags & F_EXEC == 0 { NX } else { 0 };
    for k in 0..pages {
        let Ok(e) = paging::walk(slot.cr3, va + k * PAGE, 1, true) else { return Err("out of memory for page tables") };
        // SAFETY: `e` is the PTE slot for the page in this process's live tables; the
        // frame is the process's from now on (freed with its mapping).
        unsafe { e.write_volatile((phys + k * PAGE) | rights) };
    }
    add_rss(slot, pages);
    Ok(())
}

/// Makes the page at `addr` present (and writable, if `write`) the way the process's
/// own access would, so that ring 0 can then touch it without faulting: `EFAULT` where
/// the process itself would have been killed. A present page whose writable bit the
/// hypervisor cleared stays so: a write then faults to the hypervisor, which notes it.
pub fn populate(slot: &mut ProcSlot, addr: u64, write: bool, zero_frame: u64) -> Result<(), i64> {
    let Some(i) = find(slot, addr) else { return Err(EFAULT) };
    let m = slot.mappings[i];
    if write && m.flags & F_RO != 0 {
        return Err(EFAULT);
    }
    let huge = m.flags & F_HUGE != 0;
    if let Ok(e) = paging::walk(slot.cr3, addr, if huge { 2 } else { 1 }, false) {
        // SAFETY: `e` is the leaf slot for `addr` in this process's live tables.
        let v = unsafe { e.read_volatile() };
        let zero = if huge { crate::process::huge_zero_frame() == Some(v & ADDR_MASK) } else { v & ADDR_MASK == zero_frame };
        if v & P != 0 && (!huge || v & PS != 0) && (!write || v & W != 0 || !zero) {
            return Ok(());
        }
    }
    match fault(slot, addr, write, zero_frame) {
        Fault::Resolved => Ok(()),
        Fault::Kill(_) => Err(EFAULT),
    }
}

/// `madvise(MADV_HUGEPAGE)` of the 2 MiB at `addr` (aligned): if they lie inside one
/// private 4 KiB mapping and none of their pages is present yet, they become a huge
/// mapping of their own (Linux splits the VMA and backs it with a 2 MiB page on the
/// first touch). Returns whether they did; never an error (Linux's madvise succeeds
/// whether or not a huge page follows).
pub fn make_huge(slot: &mut ProcSlot, addr: u64) -> bool {
    let end = addr + HUGE;
    let Some(i) = find(slot, addr) else { return false };
    let m = slot.mappings[i];
    if m.flags & (F_HUGE | F_SHARED | F_FILE) != 0 || end > end_of(&m) {
        return false;
    }
    let mut present = false;
    for_each_leaf(slot.cr3, addr, end, false, |_, _| present = true);
    if present || split_bounds(slot, addr, end).is_err() {
        return false;
    }
    match find(slot, addr) {
        Some(j) => {
            slot.mappings[j].flags |= F_HUGE;
            true
        }
        None => false,
    }
}
