//! Where each process writes, interval by interval (`vmm heatmap`): each process's
//! mappings cut into rows (address ranges; large mappings binned), and per sample the
//! pages of each row written since the previous one. Through the same path as
//! `dirty-rate`: the dirty log's window (frames written), joined with each process's
//! page tables, under every engine.

use super::{frames, Error, Mapping, Tracker, USER_TOP};
use crate::tracking::ram::Ram;
use serde::{Deserialize, Serialize};

/// Rows a process's mappings share when it is first seen.
pub const ROWS_PER_PROCESS: usize = 64;
/// Most rows a process ever gets (mappings made later add rows up to this); the writes
/// of mappings past it are counted in the process's last row, `other`.
pub const MAX_ROWS_PER_PROCESS: usize = 128;
/// Most processes one heatmap follows (processes started later are left out).
pub const MAX_PROCESSES: usize = 32;

/// One row: pages `[start, end)` of the mapping at `mapping_start`, or (`other`) the
/// writes of mappings that got no row of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub mapping_start: u64,
    pub start: u64,
    pub end: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
}

impl Row {
    pub fn pages(&self) -> u64 {
        (self.end - self.start) / 4096
    }
}

/// One process's rows, in address order within each mapping; mappings in the order met.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub pid: u32,
    pub name: String,
    pub rows: Vec<Row>,
    /// Index of the `other` row, once there is one.
    other: Option<usize>,
}

impl Layout {
    /// Rows for `mappings`: [`ROWS_PER_PROCESS`] shared in proportion to their sizes,
    /// at least one each and at most one per page.
    pub fn new(pid: u32, name: &str, mappings: &[Mapping]) -> Layout {
        let mut l = Layout { pid, name: name.to_string(), rows: Vec::new(), other: None };
        let total: u64 = mappings.iter().map(|m| m.pages).sum::<u64>().max(1);
        for m in mappings {
            let share = (ROWS_PER_PROCESS as u64 * m.pages).div_ceil(total).max(1);
            l.add(m.start, m.start, m.end(), share);
        }
        l
    }

    /// Adds rows for what the rows do not cover yet: mappings made since, or grown
    /// (4 rows at most each).
    pub fn extend(&mut self, mappings: &[Mapping]) {
        for m in mappings {
            let covered = self.rows.iter().filter(|r| !r.other && r.mapping_start == m.start).map(|r| r.end).max().unwrap_or(m.start);
            if covered < m.end() {
                self.add(m.start, covered, m.end(), 4);
            }
        }
    }

    /// Rows (at most `rows`, at most one per page) for pages `[start, end)` of the mapping
    /// at `mapping_start`; past [`MAX_ROWS_PER_PROCESS`], the `other` row instead.
    fn add(&mut self, mapping_start: u64, start: u64, end: u64, rows: u64) {
        let pages = (end - start) / 4096;
        let rows = rows.min(pages).max(1);
        let room = MAX_ROWS_PER_PROCESS.saturating_sub(self.rows.len() + usize::from(self.other.is_none()));
        if (rows as usize) > room {
            if self.other.is_none() {
                self.other = Some(self.rows.len());
                self.rows.push(Row { mapping_start: 0, start: 0, end: 0, other: true });
            }
            return;
        }
        let per = pages.div_ceil(rows) * 4096;
        let mut at = start;
        while at < end {
            let to = (at + per).min(end);
            self.rows.push(Row { mapping_start, start: at, end: to, other: false });
            at = to;
        }
    }

    /// The row counting a write to page `va`: its own, else `other` if there is one.
    fn row_of(&self, va: u64) -> Option<usize> {
        self.rows.iter().position(|r| !r.other && r.start <= va && va < r.end).or(self.other)
    }
}

/// One sample: per layout (by index), per row, pages written in the interval.
pub type Sample = Vec<Vec<u32>>;

impl Tracker {
    /// Counts, per row of each live process (only `pid` if given), the pages written since
    /// the window started, then starts a new window. New processes get a layout, new
    /// mappings rows. Runs while the guest is stopped: nothing is written between the
    /// count and the new window.
    pub fn heatmap_sample(&mut self, ram: &impl Ram, layouts: &mut Vec<Layout>, pid: Option<u32>) -> Result<Sample, Error> {
        self.log.harvest(ram)?;
        let snap = self.snapshot(ram)?;
        let mut budget = self.budget();
        let mut counts: Sample = Vec::new();
        for p in snap.processes.iter().filter(|p| p.is_live() && pid.is_none_or(|want| p.pid == want)) {
            let i = match layouts.iter().position(|l| l.pid == p.pid) {
                Some(i) => {
                    layouts[i].extend(&p.mappings);
                    i
                }
                None if layouts.len() >= MAX_PROCESSES => continue,
                None => {
                    layouts.push(Layout::new(p.pid, &p.name, &p.mappings));
                    layouts.len() - 1
                }
            };
            let layout = &layouts[i];
            let mut row_counts = vec![0u32; layout.rows.len()];
            let log = &self.log;
            self.walk(ram, p, 0, USER_TOP / 4096, &mut budget, |leaf| {
                let f = frames(leaf);
                for k in 0..f.count {
                    if log.in_window(f.pfn + k) {
                        if let Some(r) = layout.row_of(leaf.va.0 + k * 4096) {
                            row_counts[r] += 1;
                        }
                    }
                }
            })?;
            counts.resize(counts.len().max(i + 1), Vec::new());
            counts[i] = row_counts;
        }
        self.log.window_start(ram)?;
        Ok(counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(start: u64, pages: u64) -> Mapping {
        Mapping { start, pages, read_only: false, huge: false, shared: false, exec: false, file: false, serial: start }
    }

    #[test]
    fn mappings_share_the_rows_by_size_and_small_ones_get_one_row_per_page() {
        let l = Layout::new(1, "p", &[m(0x10000, 2), m(0x100000, 1 << 18)]);
        let small: Vec<&Row> = l.rows.iter().filter(|r| r.mapping_start == 0x10000).collect();
        assert_eq!(small.len(), 1, "2 pages of 2^18+2 get their one row");
        let big: Vec<&Row> = l.rows.iter().filter(|r| r.mapping_start == 0x100000).collect();
        assert_eq!(big.len(), ROWS_PER_PROCESS);
        assert_eq!(big.iter().map(|r| r.pages()).sum::<u64>(), 1 << 18, "the rows cover the mapping exactly");
        assert_eq!(l.row_of(0x100000 + 4096 * 4096), Some(1 + 1), "page 4096 of the big one is in its second row");
        assert_eq!(l.row_of(0x5000), None);
        let tiny = Layout::new(2, "q", &[m(0x10000, 3)]);
        assert_eq!(tiny.rows.len(), 3, "never more rows than pages");
    }

    #[test]
    fn later_mappings_add_rows_until_the_cap_then_count_as_other() {
        let mut l = Layout::new(1, "p", &[m(0x10000, 64)]);
        l.extend(&[m(0x10000, 64)]);
        assert_eq!(l.rows.len(), ROWS_PER_PROCESS, "a known mapping adds nothing");
        let many: Vec<Mapping> = (0..100).map(|i| m(0x1000_0000 + i * 0x10_0000, 16)).collect();
        l.extend(&many);
        assert!(l.rows.len() <= MAX_ROWS_PER_PROCESS, "{}", l.rows.len());
        let other = l.rows.iter().position(|r| r.other).expect("an other row");
        assert_eq!(l.row_of(0x1000_0000 + 99 * 0x10_0000), Some(other));
    }
}
