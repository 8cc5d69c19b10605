//! The pagemap rules: what one page's `/proc/PID/pagemap` entry says, given its leaf (or
//! none), the dirty log, the frames every live process maps, and whether its mapping is
//! new since the pid's last clear. Linux's behaviour, including the cases the Linux
//! oracle found: a hole in a soft-dirty VMA reads soft-dirty; `mprotect` after a write
//! keeps soft-dirty; the (huge) zero page is never written and never exclusive.

use super::dirty_log::DirtyBits;
use super::frame_set::LeafFrames;
use mmu::{softdirty, Leaf, PageSize, PageTableEntry, PagemapEntry, PteFlags};

/// Largest pagemap request, in pages (4 GiB of address space).
pub const MAX_PAGEMAP_PAGES: u64 = 1 << 20;
const USER_TOP: u64 = workload::USER_TOP;

/// One page of a pagemap answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    pub addr: u64,
    pub entry: PagemapEntry,
    pub huge: bool,
    pub accessed: bool,
}

/// Frames of a leaf as the guest claims them (first pfn, count): they may lie past the
/// end of RAM. Host-side uses go through a [`super::frame_set::FrameSet`], which keeps
/// only RAM frames.
pub fn frames(leaf: &Leaf) -> LeafFrames {
    LeafFrames { pfn: leaf.frame().pfn(), count: leaf.size.bytes() / 4096 }
}

/// Where "written since the clear" comes from, by engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PteRule {
    /// Guest-physical engines: the frame's bit in the dirty log alone.
    Frames,
    /// pte: the PTE's soft-dirty bit, with the log as backstop for a PTE the guest
    /// made writable itself.
    SoftDirtyBit,
    /// hybrid: the PTE's Dirty bit, which the clear took off.
    DirtyBit,
}

impl PteRule {
    pub fn of(engine: super::engine::EngineKind) -> PteRule {
        use super::engine::EngineKind as E;
        match engine {
            E::Pte => PteRule::SoftDirtyBit,
            E::Hybrid => PteRule::DirtyBit,
            E::KvmBitmap | E::KvmRing | E::Uffd => PteRule::Frames,
        }
    }

    /// What a soft-dirty clear does to each present leaf, if anything: pte takes W off
    /// (the trap catches the write), hybrid takes Dirty off (KVM's write-protect fault
    /// on the frame sets it again).
    pub fn clear_edit(self) -> Option<fn(PageTableEntry) -> PageTableEntry> {
        match self {
            PteRule::Frames => None,
            PteRule::SoftDirtyBit => Some(softdirty::clear),
            PteRule::DirtyBit => Some(softdirty::clear_dirty),
        }
    }

    /// Answers read the dirty log (all but hybrid's).
    pub fn reads_log(self) -> bool {
        self != PteRule::DirtyBit
    }
}

/// What one page's pagemap entry needs besides its leaf.
#[derive(Clone, Copy)]
pub struct PageCtx<'a> {
    /// The dirty log's bits (harvested by the caller).
    pub dirty: DirtyBits<'a>,
    pub rule: PteRule,
    pub zero_frame: u64,
    pub huge_zero_frame: u64,
    /// Frames mapped once and more (for "exclusive"); `None`: no page reads exclusive.
    pub counts: Option<&'a FrameCounts>,
}

impl PageCtx<'_> {
    /// The guest's shared zero page or huge zero page: never written, never exclusive.
    pub fn is_zero(&self, leaf: &Leaf) -> bool {
        self.is_zero_frame(leaf.frame().0)
    }

    /// `frame` (a guest-physical page address) is the zero page or the huge zero page.
    #[inline]
    pub fn is_zero_frame(&self, frame: u64) -> bool {
        frame == self.zero_frame || (self.huge_zero_frame != 0 && frame == self.huge_zero_frame)
    }

    /// Written since the last clear: the PTE says so, or it is writable (the guest gave
    /// W back itself, or the page appeared since) and the dirty log saw its frames written.
    pub fn written(&self, leaf: &Leaf) -> bool {
        let LeafFrames { pfn, count } = frames(leaf);
        self.written_entry(self.rule, leaf.entry, leaf.frame().0, pfn, count)
    }

    /// True whenever [`Self::written_entry`] of the present 4 KiB leaf entry `e` under
    /// `rule` is true; may also be true when it is false. Cheaper, and without
    /// unpredictable branches, so that a scan for written pages passes over runs of
    /// entries it rejects eight at a time.
    #[inline(always)]
    pub fn may_be_written(&self, rule: PteRule, e: u64) -> bool {
        let entry = PageTableEntry(e);
        match rule {
            PteRule::Frames => self.dirty.may_be_dirty(entry.addr().0 >> 12),
            PteRule::SoftDirtyBit => {
                softdirty::is_soft_dirty(entry)
                    | (entry.contains(PteFlags::DIRTY) & !softdirty::is_hypervisor_protected(entry))
            }
            PteRule::DirtyBit => softdirty::written_since_clear_dirty(entry),
        }
    }

    /// [`Self::written`] of a leaf entry mapping `count` frames from `pfn` (the frame at
    /// guest-physical `frame`), under `rule` (`self.rule`, or the same rule matched once
    /// by a caller that wants the test inlined in its loop), without a [`Leaf`]: a scan
    /// tests entries in place.
    #[inline(always)]
    pub fn written_entry(&self, rule: PteRule, entry: PageTableEntry, frame: u64, pfn: u64, count: u64) -> bool {
        match rule {
            // Guest-physical: the frame was written since the clear. The zero frame is
            // never written (the guest maps it read-only everywhere).
            PteRule::Frames => return !self.is_zero_frame(frame) && self.dirty.any_dirty(pfn, count),
            // The clear took Dirty off this entry; only a write through it sets it
            // again. Not the log: another process's clear of a shared frame clears the
            // frame's bit, not this entry's write.
            PteRule::DirtyBit => return softdirty::written_since_clear_dirty(entry),
            PteRule::SoftDirtyBit => {}
        }
        // The backstop (the guest made the PTE writable itself, or the page appeared
        // since the clear): the frame was written since the clear, through this entry
        // (the CPU sets DIRTY on the first write; an entry never written through has it
        // clear). Not conditioned on WRITABLE: the guest may have made the page
        // read-only since, and mprotect must not lose soft-dirty (the Linux oracle
        // caught exactly that). Not for an entry still write-protected by the clear:
        // every write through it since has faulted and been recorded; its Dirty bit
        // is from before, and the log bit may be another mapping's of the frame.
        softdirty::is_soft_dirty(entry)
            || (!softdirty::is_hypervisor_protected(entry)
                && entry.contains(PteFlags::DIRTY)
                && self.dirty.any_dirty(pfn, count))
    }

    /// The entry of page `va`; `shared`: its mapping is shared (a file's or shared
    /// memory: a present page of it is not anonymous, Linux's PM_FILE).
    pub fn info(&self, va: u64, leaf: Option<&Leaf>, written: bool, vma_new: bool, shared: bool) -> PageInfo {
        let Some(leaf) = leaf else {
            // Linux: a hole in a VMA reads soft-dirty when the VMA is.
            return PageInfo { addr: va, entry: PagemapEntry::none().with_soft_dirty(vma_new), huge: false, accessed: false };
        };
        let pfn0 = leaf.frame().pfn();
        let pfn = pfn0 + (va - leaf.va.0) / 4096;
        let exclusive = !self.is_zero(leaf) && self.counts.is_some_and(|c| c.once(pfn0));
        PageInfo {
            addr: va,
            entry: PagemapEntry::present(pfn)
                .with_soft_dirty(written || vma_new)
                .with_exclusive(exclusive)
                .with_file_or_shared(shared && !self.is_zero(leaf)),
            huge: leaf.size != PageSize::Size4K,
            accessed: leaf.entry.contains(PteFlags::ACCESSED),
        }
    }
}

/// Two bitmaps over guest frames: mapped at least once, mapped more than once.
pub struct FrameCounts {
    once: Vec<u64>,
    more: Vec<u64>,
}

impl FrameCounts {
    pub fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        FrameCounts { once: vec![0; words], more: vec![0; words] }
    }

    pub fn add(&mut self, pfn: u64) {
        let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        if w < self.once.len() {
            if self.once[w] & b != 0 {
                self.more[w] |= b;
            }
            self.once[w] |= b;
        }
    }

    pub fn once(&self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        w < self.once.len() && self.once[w] & b != 0 && self.more[w] & b == 0
    }
}

/// A pagemap range: page-aligned, non-empty, bounded, inside the user half.
pub fn check_range(start: u64, pages: u64) -> Result<(), String> {
    if !start.is_multiple_of(4096) {
        return Err(format!("start {start:#x} is not page-aligned"));
    }
    if pages == 0 {
        return Err("page count is 0".into());
    }
    if pages > MAX_PAGEMAP_PAGES {
        return Err(format!("{pages} pages exceed the limit of {MAX_PAGEMAP_PAGES} per request"));
    }
    let end = pages.checked_mul(4096).and_then(|l| l.checked_add(start));
    if end.is_none_or(|e| e > USER_TOP) {
        return Err(format!("{start:#x} + {pages} pages reaches outside the user half (below {USER_TOP:#x})"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(0x400000, 1).is_ok());
        assert!(check_range(0x400001, 1).is_err());
        assert!(check_range(0x400000, 0).is_err());
        assert!(check_range(0x7fff_ffff_f000, 2).is_err());
        assert!(check_range(0xffff_8000_0000_0000, 1).is_err());
        assert!(check_range(0, MAX_PAGEMAP_PAGES + 1).is_err());
        assert!(check_range(0x1000, u64::MAX).is_err());
    }

    #[test]
    fn an_entry_the_quick_test_rejects_is_never_written() {
        use crate::tracking::dirty_log::GpaLog;
        use crate::tracking::ram::testing::{Manual, Xorshift};
        let mut rng = Xorshift(0x9e37_79b9_7f4a_7c15);
        let mut rnd = move || rng.next_u64();
        // 100 frames: the last word of the log has spare bits; entries map frames up to
        // 160, some past the end of RAM.
        let mut log = GpaLog::new(100 * 4096, Box::new(Manual::default()), false);
        assert!(log.set_accumulated(vec![rnd(), rnd() | (u64::MAX << 36)]));
        let bits = [PteFlags::PRESENT, PteFlags::WRITABLE, PteFlags::USER, PteFlags::ACCESSED, PteFlags::DIRTY,
            PteFlags::HV_SOFT_DIRTY, PteFlags::HV_WRITE_PROTECTED];
        for rule in [PteRule::Frames, PteRule::SoftDirtyBit, PteRule::DirtyBit] {
            let page = PageCtx { dirty: log.dirty_bits(), rule, zero_frame: 7 << 12, huge_zero_frame: 0, counts: None };
            let mut written = 0;
            for _ in 0..20_000 {
                let r = rnd();
                let flags = bits.iter().enumerate().filter(|(i, _)| r >> i & 1 == 1).fold(PteFlags::PRESENT, |f, (_, b)| f | *b);
                let frame = (r >> 32) % 160 * 4096;
                let e = frame | flags.bits();
                if page.written_entry(rule, PageTableEntry(e), frame, frame >> 12, 1) {
                    written += 1;
                    assert!(page.may_be_written(rule, e), "{rule:?}: entry {e:#x} is written but the quick test rejects it");
                }
            }
            assert!(written > 1000, "{rule:?}: the random entries reach the written case ({written})");
        }
    }

    #[test]
    fn frames_mapped_twice_are_not_exclusive() {
        let mut c = FrameCounts::new(128);
        c.add(5);
        c.add(9);
        c.add(9);
        c.add(1 << 40);
        assert!(c.once(5) && !c.once(9) && !c.once(6) && !c.once(1 << 40));
    }
}
