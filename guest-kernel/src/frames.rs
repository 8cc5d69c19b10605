//! Physical frame allocation.
//!
//! Never-used frames are handed out first (guest RAM starts zeroed). Freed frames are
//! zeroed by the VMM (one `out` to the zero port per batch, since zeroing in the
//! emulated ring 0 costs ~0.3 s per MiB) before they go back on a free list.

use crate::global::Global;
use guest_abi::{ZeroRange, ZeroRequest, DIRECT_MAP_BASE, KERNEL_VIRT_BASE, ZERO_PORT, ZERO_REQUEST_MAX};

pub const PAGE: u64 = 4096;
pub const HUGE: u64 = 2 << 20;
const MAX_HUGE_FREE: usize = (guest_abi::MAX_MEM / HUGE) as usize;

struct Frames {
    /// First frame of the shared window's backing (zero at boot, never freed).
    shared: u64,
    next: u64,
    limit: u64,
    /// Stack of free, zeroed 4 KiB frame numbers, kept in frames of its own.
    free: *mut u32,
    free_len: usize,
    free_cap: usize,
    huge_free: [u32; MAX_HUGE_FREE],
    huge_free_len: usize,
}

static FRAMES: Global<Frames> = Global::new(Frames {
    shared: 0,
    next: 0,
    limit: 0,
    free: core::ptr::null_mut(),
    free_len: 0,
    free_cap: 0,
    huge_free: [0; MAX_HUGE_FREE],
    huge_free_len: 0,
});

static ZERO_REQ: Global<ZeroRequest> =
    Global::new(ZeroRequest { count: 0, ranges: [ZeroRange { pfn: 0, pages: 0 }; ZERO_REQUEST_MAX] });

pub fn phys_to_virt(phys: u64) -> u64 {
    DIRECT_MAP_BASE + phys
}

/// Physical address of a kernel static.
pub fn kernel_phys<T>(ptr: *const T) -> u64 {
    ptr as u64 - KERNEL_VIRT_BASE
}

/// Sets up the allocator over `[free_phys, mem_size)`.
pub fn init(free_phys: u64, mem_size: u64) {
    // SAFETY: ring 0, boot, no other reference.
    let f = unsafe { FRAMES.get() };
    f.next = free_phys;
    f.limit = mem_size;
    // The free stack needs 4 bytes per frame of RAM.
    let stack_bytes = (mem_size / PAGE) * 4;
    let stack_pages = stack_bytes.div_ceil(PAGE);
    f.free = phys_to_virt(f.next) as *mut u32;
    f.free_cap = (stack_pages * PAGE / 4) as usize;
    f.next += stack_pages * PAGE;
    f.shared = f.next;
    f.next += workload::SHARED_PAGES * PAGE;
}

/// The frame backing page `va` of the shared window.
pub fn shared_frame(va: u64) -> Option<u64> {
    // SAFETY: ring 0; no other reference is live.
    let f = unsafe { FRAMES.get() };
    let index = va.checked_sub(workload::SHARED_VA)? / PAGE;
    (index < workload::SHARED_PAGES).then_some(f.shared + index * PAGE)
}

fn push_free(f: &mut Frames, pfn: u32) {
    if f.free_len < f.free_cap {
        // SAFETY: free_len < free_cap, the stack's frames are direct-mapped.
        unsafe { f.free.add(f.free_len).write(pfn) };
        f.free_len += 1;
    }
}

/// A zeroed 4 KiB frame, or `None` when memory is exhausted.
pub fn alloc() -> Option<u64> {
    // SAFETY: ring 0; no other reference is live.
    let f = unsafe { FRAMES.get() };
    if f.free_len > 0 {
        f.free_len -= 1;
        // SAFETY: index below free_len.
        return Some(u64::from(unsafe { f.free.add(f.free_len).read() }) * PAGE);
    }
    if f.next + PAGE <= f.limit {
        let frame = f.next;
        f.next += PAGE;
        return Some(frame);
    }
    None
}

/// A zeroed, 2 MiB-aligned block of 512 frames.
pub fn alloc_huge() -> Option<u64> {
    // SAFETY: ring 0; no other reference is live.
    let f = unsafe { FRAMES.get() };
    if f.huge_free_len > 0 {
        f.huge_free_len -= 1;
        return Some(u64::from(f.huge_free[f.huge_free_len]) * PAGE);
    }
    let start = f.next.next_multiple_of(HUGE);
    if start + HUGE > f.limit {
        return None;
    }
    // Frames skipped for alignment were never used: they are zero already.
    let mut skipped = f.next;
    while skipped < start {
        push_free(f, (skipped / PAGE) as u32);
        skipped += PAGE;
    }
    f.next = start + HUGE;
    Some(start)
}

/// Queues `pages` frames at `phys` for zeroing and reuse; call [`flush`] after a batch.
pub fn free(phys: u64, pages: u64) {
    // SAFETY: ring 0; no other reference is live.
    let req = unsafe { ZERO_REQ.get() };
    if req.count as usize == ZERO_REQUEST_MAX {
        flush();
    }
    req.ranges[req.count as usize] = ZeroRange { pfn: phys / PAGE, pages };
    req.count += 1;
}

/// Has the VMM zero every queued frame, then puts them on the free lists.
pub fn flush() {
    // SAFETY: ring 0; the two globals are distinct.
    let (req, f) = unsafe { (ZERO_REQ.get(), FRAMES.get()) };
    if req.count == 0 {
        return;
    }
    crate::arch::outl(ZERO_PORT, kernel_phys(req as *const ZeroRequest) as u32);
    for range in &req.ranges[..req.count as usize] {
        if range.pages == HUGE / PAGE && f.huge_free_len < MAX_HUGE_FREE {
            f.huge_free[f.huge_free_len] = range.pfn as u32;
            f.huge_free_len += 1;
        } else {
            for i in 0..range.pages {
                push_free(f, (range.pfn + i) as u32);
            }
        }
    }
    req.count = 0;
}
