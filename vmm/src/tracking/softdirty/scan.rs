//! Linux's `PAGEMAP_SCAN` (6.7) for a guest process, from outside: the pages of a range
//! folded into regions of equal flags, and with `clear` the scanned pages cleared in the
//! same stop of the guest (Linux's `PM_SCAN_WP_MATCHING`), so no write between the read
//! and the clear can be lost (docs/softdirty.md, "pagemap-scan").
//!
//! Each page's flags are its pagemap entry's, computed by the same code: `written` is
//! soft-dirty, `file_shared` Linux's PM_FILE, `huge` a 2 MiB leaf. Like Linux, pages
//! outside every mapping are not reported. One request examines at most
//! [`MAX_PAGEMAP_PAGES`] mapped pages and returns at most `max_regions` regions; where it
//! stopped is `walk_end`, from where the next request goes on.

use super::coverage::Coverage;
use super::{Error, PageCtx, PteRule, Tracker, MAX_PAGEMAP_PAGES, USER_TOP};
use crate::guest_os::Mapping;
use crate::tracking::ram::{AsPhys, Ram};
use mmu::{Chunk, GuestVirtAddr, PageTableEntry, PteBlock, PteFlags, TableBudget};
use serde::{Deserialize, Serialize};

/// Most regions one request returns.
pub const MAX_SCAN_REGIONS: u64 = 1 << 16;

/// A run of pages with the same flags, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// Soft-dirty: written since the last clear (or new since).
    pub written: bool,
    pub present: bool,
    /// Part of a shared or file mapping (Linux's PM_FILE).
    pub file_shared: bool,
    /// In a 2 MiB page.
    pub huge: bool,
}

/// One page's flags, as its pagemap entry has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flags {
    written: bool,
    present: bool,
    file_shared: bool,
    huge: bool,
}

impl Flags {
    /// A page of a mapping with no leaf: soft-dirty when its mapping is new (Linux: a
    /// hole in a soft-dirty VMA).
    fn hole(vma_new: bool) -> Flags {
        Flags { written: vma_new, present: false, file_shared: false, huge: false }
    }
}

impl Region {
    fn new(start: u64, end: u64, f: Flags) -> Region {
        Region { start, end, written: f.written, present: f.present, file_shared: f.file_shared, huge: f.huge }
    }

    fn flags(&self) -> Flags {
        Flags { written: self.written, present: self.present, file_shared: self.file_shared, huge: self.huge }
    }

    pub fn pages(&self) -> u64 {
        (self.end - self.start) / 4096
    }
}

/// What to scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    pub start: u64,
    pub end: u64,
    /// Report only written pages (Linux: `category_mask = PAGE_IS_WRITTEN`).
    pub written_only: bool,
    /// Clear the scanned pages in the same stop.
    pub clear: bool,
    pub max_regions: u64,
}

impl ScanRequest {
    fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::BadRange(m));
        if !self.start.is_multiple_of(4096) || !self.end.is_multiple_of(4096) {
            return bad(format!("start {:#x} and end {:#x} must be page-aligned", self.start, self.end));
        }
        if self.start >= self.end {
            return bad(format!("start {:#x} is not below end {:#x}", self.start, self.end));
        }
        if self.end > USER_TOP {
            return bad(format!("end {:#x} is outside the user half (at most {USER_TOP:#x})", self.end));
        }
        if self.max_regions == 0 || self.max_regions > MAX_SCAN_REGIONS {
            return bad(format!("max_regions {} is not in 1..={MAX_SCAN_REGIONS}", self.max_regions));
        }
        Ok(())
    }
}

/// A scan's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub regions: Vec<Region>,
    /// The first page not examined: `end` if the walk got there, else where the next
    /// request starts.
    pub walk_end: u64,
    /// Mapped pages examined.
    pub pages_scanned: u64,
    /// Leaf entries the clear changed (0 without `clear`).
    pub entries_changed: u64,
}

/// Folds runs of pages, in address order, into regions.
struct Fold {
    written_only: bool,
    max: usize,
    regions: Vec<Region>,
}

impl Fold {
    /// Takes the pages `[start, end)` of flags `f`, or declines them (false) when they
    /// need a new region and there are `max` already.
    #[inline]
    fn push(&mut self, start: u64, end: u64, f: Flags) -> bool {
        if self.written_only && !f.written {
            return true;
        }
        if let Some(last) = self.regions.last_mut() {
            if last.end == start && last.flags() == f {
                last.end = end;
                return true;
            }
        }
        if self.regions.len() >= self.max {
            return false;
        }
        self.regions.push(Region::new(start, end, f));
        true
    }
}

/// The scan of one mapping's segment: what its chunks of page table become, page runs
/// handed to the fold in address order.
struct SegmentScan<'a> {
    /// A copy (it is small), so that the scan's loop keeps it in registers.
    page: PageCtx<'a>,
    fold: &'a mut Fold,
    coverage: Coverage,
    shared: bool,
    /// The first page not handed over yet.
    next: u64,
    end: u64,
    /// Where the fold declined a page: the scan ends there.
    stopped: Option<u64>,
}

impl SegmentScan<'_> {
    /// Pages `[start, end)` whose flags, besides the VMA rule, are `f` (a hole, or one
    /// large page), split where the rule changes.
    fn span(&mut self, mut start: u64, end: u64, f: Flags) {
        while start < end && self.stopped.is_none() {
            let (vma_new, until) = self.coverage.at(start);
            let stop = until.min(end);
            let flags = Flags { written: f.written || vma_new, ..f };
            if !self.fold.push(start, stop, flags) {
                self.stopped = Some(start);
            }
            start = stop;
        }
        self.next = self.next.max(end);
    }

    fn hole_to(&mut self, to: u64) {
        if self.next < to {
            self.span(self.next, to, Flags::hole(false));
        }
    }

    fn chunk(&mut self, chunk: Chunk) {
        if self.stopped.is_some() {
            return;
        }
        match chunk {
            Chunk::Large(leaf) => {
                let (s, e) = (leaf.va.0.max(self.next), (leaf.va.0 + leaf.size.bytes()).min(self.end));
                if s >= e {
                    return;
                }
                self.hole_to(s);
                let written = self.page.written(&leaf);
                let file_shared = self.shared && !self.page.is_zero(&leaf);
                self.span(s, e, Flags { written, present: true, file_shared, huge: true });
            }
            Chunk::Ptes(block) => {
                self.hole_to(block.va.0);
                // One loop per rule, the rule a constant in each.
                match self.page.rule {
                    PteRule::Frames => self.ptes(&block, PteRule::Frames),
                    PteRule::DirtyBit => self.ptes(&block, PteRule::DirtyBit),
                    PteRule::SoftDirtyBit => self.ptes(&block, PteRule::SoftDirtyBit),
                }
            }
        }
    }

    /// The pages of one block of last-level entries, each entry tested in place (a scan
    /// is this loop), `rule` (a constant in each caller) being `self.page.rule`. In a
    /// `written_only` scan, runs of entries that cannot be written
    /// ([`PageCtx::may_be_written`]) are passed over eight at a time.
    #[inline(always)]
    fn ptes(&mut self, block: &PteBlock, rule: PteRule) {
        let (first, n) = (block.va.0, block.entries.len());
        let (page, shared, written_only) = (self.page, self.shared, self.fold.written_only);
        let (mut vma_new, mut until) = self.coverage.at(first);
        // The previous entry was written: the next one likely is too (runs of written
        // pages), so it is tested at once rather than after a look eight entries ahead.
        let mut in_run = false;
        let mut i = 0;
        while i < n {
            if first + i as u64 * 4096 >= until {
                (vma_new, until) = self.coverage.at(first + i as u64 * 4096);
            }
            if written_only && !vma_new && !in_run {
                // Up to `until`, a page is reported only if the rule says it may be written.
                let stop = (until - first).div_ceil(4096).min(n as u64) as usize;
                i = next_candidate(block.entries, i, stop, |e| page.may_be_written(rule, e));
                if i == stop {
                    continue;
                }
            }
            let (e, va) = (block.entries[i], first + i as u64 * 4096);
            i += 1;
            let leaf = block.is_leaf(e);
            let frame = PageTableEntry(e).addr().0;
            let w = vma_new || (leaf && page.written_entry(rule, PageTableEntry(e), frame, frame >> 12, 1));
            in_run = w;
            if written_only && !w {
                continue;
            }
            let flags = if leaf {
                Flags { written: w, present: true, file_shared: shared && !page.is_zero_frame(frame), huge: false }
            } else {
                Flags::hole(vma_new)
            };
            if !self.fold.push(va, va + 4096, flags) {
                self.stopped = Some(va);
                return;
            }
        }
        self.next = first + n as u64 * 4096;
    }
}

/// The first index in `[i, to)` of `entries` whose entry is present and `may` be
/// written, or `to`. Eight entries at a time, without a branch per entry: most entries
/// of a scan for written pages are clean.
#[inline(always)]
fn next_candidate(entries: &[u64], mut i: usize, to: usize, may: impl Fn(u64) -> bool) -> usize {
    let hit = |e: u64| (e & PteFlags::PRESENT.bits() != 0) & may(e);
    while i + 8 <= to {
        if entries[i..i + 8].iter().fold(false, |any, &e| any | hit(e)) {
            break;
        }
        i += 8;
    }
    while i < to && !hit(entries[i]) {
        i += 1;
    }
    i
}

impl Tracker {
    /// `PAGEMAP_SCAN` of `pid` over `req` (with `req.clear`, the pages examined are
    /// cleared before the guest runs again). Reads `ram` only between guest runs.
    ///
    /// Tests each last-level table's entries in place ([`mmu::PteBlock`]), with the same
    /// rules as [`Tracker::pagemap`] (`PageCtx::written_entry`, the VMA rule, holes), so
    /// the two agree page for page (checked at every read of `vmm scenario`).
    pub fn pagemap_scan(&mut self, ram: &impl Ram, pid: u32, req: &ScanRequest) -> Result<Scan, Error> {
        req.check()?;
        // Parsed again only if the guest changed it (a 34 KiB read and parse, most of a
        // small scan's cost otherwise).
        let snap = self.cached_snapshot(ram)?;
        let p = Self::live(&snap, pid)?;
        if PteRule::of(self.engine).reads_log() {
            self.log.harvest(ram)?;
        }
        let page = self.page_ctx(&snap, None);
        let mut fold = Fold { written_only: req.written_only, max: req.max_regions as usize, regions: Vec::new() };
        let mut budget = self.budget();
        let (mut va, mut left) = (req.start, MAX_PAGEMAP_PAGES);
        let mut walk_end = req.end;
        while va < req.end {
            let Some(m) = p.mapping_at(va) else {
                // A hole: on to the next mapping (the table keeps them sorted).
                va = p.mappings.iter().map(|m| m.start).find(|&s| s > va).unwrap_or(req.end).min(req.end);
                continue;
            };
            if left == 0 {
                walk_end = va;
                break;
            }
            let seg_end = m.end().min(req.end).min(va + left * 4096);
            let stopped = self.scan_segment(ram, p, page, m, va, seg_end, &mut fold, &mut budget)?;
            left -= (stopped - va) / 4096;
            if stopped < seg_end {
                walk_end = stopped;
                break;
            }
            va = seg_end;
        }
        let entries_changed = if req.clear && walk_end > req.start {
            self.clear_soft_dirty(ram, &snap, p, Some((req.start, walk_end)))?
        } else {
            0
        };
        Ok(Scan { regions: fold.regions, walk_end, pages_scanned: MAX_PAGEMAP_PAGES - left, entries_changed })
    }

    /// Scans `[va, end)` of mapping `m` into `fold`; returns the first page not taken
    /// (`end` if all were).
    #[allow(clippy::too_many_arguments)]
    fn scan_segment(&self, ram: &impl Ram, p: &crate::guest_os::Process, page: PageCtx, m: &Mapping, va: u64, end: u64,
        fold: &mut Fold, budget: &mut TableBudget) -> Result<u64, Error> {
        let coverage = Coverage::new(self.old_coverage(p.pid, m));
        let mut seg = SegmentScan { page, fold, coverage, shared: m.shared, next: va, end, stopped: None };
        self.walker
            .walk_chunks_within(&AsPhys(ram), p.cr3.table(), GuestVirtAddr(va), (end - va) / 4096, budget, &mut |item| {
                // Malformed entries are holes, as in pagemap.
                if let Ok(chunk) = item {
                    seg.chunk(chunk);
                }
            })
            .map_err(|e| Error::Walk { pid: p.pid, detail: e.to_string() })?;
        seg.hole_to(end);
        Ok(seg.stopped.unwrap_or(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(f: &mut Fold, addr: u64, written: bool, present: bool) -> bool {
        f.push(addr, addr + 4096, Flags { written, present, file_shared: false, huge: false })
    }

    #[test]
    fn pages_of_equal_flags_fold_into_one_region_and_gaps_split_them() {
        let mut f = Fold { written_only: false, max: 10, regions: Vec::new() };
        for (a, w) in [(0x1000, true), (0x2000, true), (0x3000, false), (0x5000, false)] {
            assert!(page(&mut f, a, w, true));
        }
        let spans: Vec<(u64, u64, bool)> = f.regions.iter().map(|r| (r.start, r.end, r.written)).collect();
        assert_eq!(spans, vec![(0x1000, 0x3000, true), (0x3000, 0x4000, false), (0x5000, 0x6000, false)]);
    }

    #[test]
    fn written_only_skips_clean_pages_and_a_full_fold_declines_a_new_region() {
        let mut f = Fold { written_only: true, max: 1, regions: Vec::new() };
        assert!(page(&mut f, 0x1000, true, true));
        assert!(!page(&mut f, 0x2000, true, false), "other flags need a second region");
        // A clean page is skipped whatever the room; a written one needing a region is declined.
        let mut g = Fold { written_only: true, max: 1, regions: Vec::new() };
        assert!(page(&mut g, 0x1000, true, true));
        assert!(page(&mut g, 0x2000, false, true));
        assert!(!page(&mut g, 0x3000, true, true));
        assert_eq!(g.regions, vec![Region { start: 0x1000, end: 0x2000, written: true, present: true, file_shared: false, huge: false }]);
    }

    #[test]
    fn requests_are_checked() {
        let ok = ScanRequest { start: 0x1000, end: 0x2000, written_only: false, clear: false, max_regions: 1 };
        assert!(ok.check().is_ok());
        for bad in [
            ScanRequest { start: 0x1001, ..ok },
            ScanRequest { end: 0x1000, ..ok },
            ScanRequest { end: USER_TOP + 4096, ..ok },
            ScanRequest { max_regions: 0, ..ok },
            ScanRequest { max_regions: MAX_SCAN_REGIONS + 1, ..ok },
        ] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.starts_with("invalid range"), "{e}");
        }
    }
}
