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

use super::{Error, PageCtx, PageInfo, PteRule, Tracker, MAX_PAGEMAP_PAGES, USER_TOP};
use crate::tracking::ram::Ram;
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

impl Region {
    fn page(p: &PageInfo) -> Region {
        Region {
            start: p.addr,
            end: p.addr + 4096,
            written: p.entry.soft_dirty(),
            present: p.entry.is_present(),
            file_shared: p.entry.file_or_shared(),
            huge: p.huge,
        }
    }

    fn same_flags(&self, o: &Region) -> bool {
        (self.written, self.present, self.file_shared, self.huge) == (o.written, o.present, o.file_shared, o.huge)
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

/// Folds pages, in address order, into regions.
struct Fold {
    written_only: bool,
    max: usize,
    regions: Vec<Region>,
}

impl Fold {
    /// Takes `p`, or declines it (false) when it needs a new region and there are
    /// `max` already.
    fn push(&mut self, p: &PageInfo) -> bool {
        let r = Region::page(p);
        if self.written_only && !r.written {
            return true;
        }
        if let Some(last) = self.regions.last_mut() {
            if last.end == r.start && last.same_flags(&r) {
                last.end = r.end;
                return true;
            }
        }
        if self.regions.len() >= self.max {
            return false;
        }
        self.regions.push(r);
        true
    }
}

impl Tracker {
    /// `PAGEMAP_SCAN` of `pid` over `req` (with `req.clear`, the pages examined are
    /// cleared before the guest runs again). Reads `ram` only between guest runs.
    pub fn pagemap_scan(&mut self, ram: &impl Ram, pid: u32, req: &ScanRequest) -> Result<Scan, Error> {
        req.check()?;
        let snap = self.snapshot(ram)?;
        let p = Self::live(&snap, pid)?;
        self.log.harvest(ram)?;
        let page = PageCtx {
            log: &self.log,
            rule: PteRule::of(self.engine),
            zero_frame: snap.zero_frame,
            huge_zero_frame: snap.huge_zero_frame,
            counts: None,
        };
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
            let mut leaves = Vec::new();
            self.walk(ram, p, va, (seg_end - va) / 4096, &mut budget, |leaf| leaves.push(*leaf))?;
            let mut li = 0;
            let stopped = self.segment_pages(&page, pid, Some(m), &leaves, &mut li, va, seg_end, |info| fold.push(&info));
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu::PagemapEntry;

    fn page(addr: u64, written: bool, present: bool) -> PageInfo {
        let entry = if present { PagemapEntry::present(addr >> 12) } else { PagemapEntry::none() };
        PageInfo { addr, entry: entry.with_soft_dirty(written), huge: false, accessed: false }
    }

    #[test]
    fn pages_of_equal_flags_fold_into_one_region_and_gaps_split_them() {
        let mut f = Fold { written_only: false, max: 10, regions: Vec::new() };
        for p in [page(0x1000, true, true), page(0x2000, true, true), page(0x3000, false, true), page(0x5000, false, true)] {
            assert!(f.push(&p));
        }
        let spans: Vec<(u64, u64, bool)> = f.regions.iter().map(|r| (r.start, r.end, r.written)).collect();
        assert_eq!(spans, vec![(0x1000, 0x3000, true), (0x3000, 0x4000, false), (0x5000, 0x6000, false)]);
    }

    #[test]
    fn written_only_skips_clean_pages_and_a_full_fold_declines_a_new_region() {
        let mut f = Fold { written_only: true, max: 1, regions: Vec::new() };
        assert!(f.push(&page(0x1000, true, true)));
        assert!(!f.push(&page(0x2000, true, false)), "other flags need a second region");
        // A clean page is skipped whatever the room; a written one needing a region is declined.
        let mut g = Fold { written_only: true, max: 1, regions: Vec::new() };
        assert!(g.push(&page(0x1000, true, true)));
        assert!(g.push(&page(0x2000, false, true)));
        assert!(!g.push(&page(0x3000, true, true)));
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
