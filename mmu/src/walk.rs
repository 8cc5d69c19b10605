//! Walking 4- and 5-level x86-64 page tables in untrusted guest memory.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::memory::{MemoryError, PhysMemory};
use crate::pte::{PageTableEntry, PteFlags};
use alloc::boxed::Box;
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::fmt;

/// 4-level (48-bit) or 5-level (57-bit, LA57) paging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingMode {
    Level4,
    Level5,
}

impl PagingMode {
    pub fn levels(self) -> u32 {
        match self {
            PagingMode::Level4 => 4,
            PagingMode::Level5 => 5,
        }
    }

    /// Width of a linear address.
    pub fn va_bits(self) -> u32 {
        12 + 9 * self.levels()
    }

    /// First address above the user (lower canonical) half.
    pub fn user_top(self) -> u64 {
        1 << (self.va_bits() - 1)
    }

    fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.va_bits();
        (((va << shift) as i64) >> shift) as u64 == va
    }

    fn sign_extend(self, lin: u64) -> u64 {
        let shift = 64 - self.va_bits();
        (((lin << shift) as i64) >> shift) as u64
    }
}

/// Size of a leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 4 << 10,
            PageSize::Size2M => 2 << 20,
            PageSize::Size1G => 1 << 30,
        }
    }

    fn at_level(level: u32) -> Self {
        match level {
            1 => PageSize::Size4K,
            2 => PageSize::Size2M,
            _ => PageSize::Size1G,
        }
    }
}

/// A present leaf: a page (4 KiB) or large page (2 MiB, 1 GiB) mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First virtual address the leaf maps.
    pub va: GuestVirtAddr,
    pub size: PageSize,
    pub entry: PageTableEntry,
    /// Where the entry lives, to edit it.
    pub entry_addr: GuestPhysAddr,
    /// Level of the entry (1 = PTE, 2 = PDE, 3 = PDPTE).
    pub level: u32,
    /// WRITABLE and USER as granted by every upper level (the leaf's own bits aside).
    pub upper: PteFlags,
}

impl Leaf {
    /// The frame the leaf maps (base of the large page for large leaves).
    pub fn frame(&self) -> GuestPhysAddr {
        GuestPhysAddr(self.entry.addr().0 & !(self.size.bytes() - 1))
    }

    /// Writable from ring 3: every level grants WRITABLE and USER.
    pub fn user_writable(&self) -> bool {
        let need = PteFlags::WRITABLE | PteFlags::USER;
        self.upper.contains(need) && self.entry.contains(need)
    }
}

/// Why a present entry cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadEntry {
    /// Address bits above the physical-address width are set.
    ReservedBits,
    /// A large-page entry whose frame is not aligned to its size.
    MisalignedLargePage,
    /// PS set where the architecture reserves it (PML4E, PML5E).
    LargePageAtTopLevel,
    /// The next table lies outside guest memory.
    TableOutsideMemory,
}

impl fmt::Display for BadEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadEntry::ReservedBits => "reserved address bits set",
            BadEntry::MisalignedLargePage => "large page frame not aligned to its size",
            BadEntry::LargePageAtTopLevel => "large-page bit set in a top-level entry",
            BadEntry::TableOutsideMemory => "next-level table outside guest memory",
        })
    }
}

/// Result of translating one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    Mapped { frame: GuestPhysAddr, offset: u64, leaf: Leaf },
    /// The entry at `level` is not present.
    NotMapped { level: u32 },
}

/// Why a walk failed as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The address is not canonical, or the range crosses the non-canonical hole.
    NonCanonical(GuestVirtAddr),
    /// The root table is outside guest memory.
    Memory(MemoryError),
    /// A present entry on the path is malformed.
    Bad { level: u32, entry_addr: GuestPhysAddr, reason: BadEntry },
    /// The walk would read more page-table pages than its [`TableBudget`] allows.
    TooManyTables { limit: u64 },
}

impl fmt::Display for WalkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalkError::NonCanonical(va) => write!(f, "virtual address {va} is not canonical (or the range crosses the hole)"),
            WalkError::Memory(e) => write!(f, "{e}"),
            WalkError::Bad { level, entry_addr, reason } => {
                write!(f, "level-{level} entry at {entry_addr}: {reason}")
            }
            WalkError::TooManyTables { limit } => write!(
                f,
                "the page tables need more than {limit} table pages for this request (guest RAM holds no more \
                 distinct tables: they are shared or aliased); refused to bound the work"
            ),
        }
    }
}

/// What a range walk saw, for callers that report or bound cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WalkStats {
    pub tables_visited: u64,
    pub leaves: u64,
    pub bad_entries: u64,
    /// Table pages reached a second time (aliasing or loops): not walked again.
    pub aliased_tables_skipped: u64,
}

/// How many page-table pages walks may still read: one budget shared by every walk of a
/// request bounds the request's work by what guest RAM can hold, whatever the tables
/// claim (each table page is at most 4 KiB of RAM, read once per walk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableBudget {
    left: u64,
    limit: u64,
}

impl TableBudget {
    pub fn new(limit: u64) -> Self {
        TableBudget { left: limit, limit }
    }

    /// No bound beyond "each table once per walk" (trusted or tiny memories).
    pub fn unlimited() -> Self {
        TableBudget::new(u64::MAX)
    }

    /// Table pages read so far.
    pub fn used(&self) -> u64 {
        self.limit - self.left
    }

    fn take(&mut self) -> bool {
        if self.left == 0 {
            return false;
        }
        self.left -= 1;
        true
    }
}

/// Walks page tables of one paging mode.
#[derive(Debug, Clone, Copy)]
pub struct Walker {
    mode: PagingMode,
    max_phys_bits: u32,
}

/// An item a range walk reports.
pub type WalkItem = Result<Leaf, (GuestVirtAddr, u32, BadEntry)>;

/// The entries of one last-level table that a range walk covers, as the table holds
/// them (present or not, unchecked): for callers that test bits entry by entry
/// without building a [`Leaf`] for each (a scan of many pages). [`PteBlock::leaf`] gives
/// the checked leaf of one entry, exactly as [`Walker::walk_range`] reports it.
#[derive(Debug, Clone, Copy)]
pub struct PteBlock<'a> {
    /// Virtual address of `entries[0]`'s page; entry `i` maps `va + i * 4096`.
    pub va: GuestVirtAddr,
    pub entries: &'a [u64],
    /// Where `entries[0]` lives (entry `i` at `entry_addr + 8 * i`).
    pub entry_addr: GuestPhysAddr,
    /// WRITABLE and USER as granted by every upper level.
    pub upper: PteFlags,
    /// Address bits that make a present entry malformed (above MAXPHYADDR).
    reserved: u64,
}

impl PteBlock<'_> {
    /// Entry `e` (one of `entries`) is present and well-formed: a leaf.
    #[inline]
    pub fn is_leaf(&self, e: u64) -> bool {
        e & PteFlags::PRESENT.bits() != 0 && e & self.reserved == 0
    }

    /// Entry `i` as a leaf, if it is present; `Err` if it is present but malformed.
    pub fn leaf(&self, i: usize) -> Option<Result<Leaf, BadEntry>> {
        let entry = PageTableEntry(self.entries[i]);
        if !entry.is_present() {
            return None;
        }
        if entry.0 & self.reserved != 0 {
            return Some(Err(BadEntry::ReservedBits));
        }
        let va = GuestVirtAddr(self.va.0.wrapping_add(i as u64 * PAGE_SIZE));
        let entry_addr = GuestPhysAddr(self.entry_addr.0 + i as u64 * 8);
        Some(Ok(Leaf { va, size: PageSize::Size4K, entry, entry_addr, level: 1, upper: self.upper }))
    }
}

/// What a chunked range walk reports: a large leaf or a block of last-level entries.
#[derive(Debug, Clone, Copy)]
pub enum Chunk<'a> {
    Large(Leaf),
    Ptes(PteBlock<'a>),
}

/// An item a chunked range walk reports (malformed entries above the last level as in
/// [`WalkItem`]).
pub type ChunkItem<'a> = Result<Chunk<'a>, (GuestVirtAddr, u32, BadEntry)>;

impl Walker {
    pub fn new(mode: PagingMode) -> Self {
        Walker { mode, max_phys_bits: 52 }
    }

    /// Treat physical-address bits at or above `bits` as reserved (CPUID MAXPHYADDR).
    pub fn with_max_phys_bits(mut self, bits: u32) -> Self {
        self.max_phys_bits = bits.clamp(12, 52);
        self
    }

    pub fn mode(&self) -> PagingMode {
        self.mode
    }

    fn check(&self, entry: PageTableEntry, level: u32) -> Result<(), BadEntry> {
        if entry.reserved_addr_bits(self.max_phys_bits) != 0 {
            return Err(BadEntry::ReservedBits);
        }
        if entry.contains(PteFlags::HUGE) {
            if level >= 4 {
                return Err(BadEntry::LargePageAtTopLevel);
            }
            if level > 1 {
                // Bit 12 is PAT in a large-page entry; the bits between it and the
                // size's alignment must be clear.
                let size = PageSize::at_level(level).bytes();
                if entry.addr().0 & (size - 1) & !(1 << 12) != 0 {
                    return Err(BadEntry::MisalignedLargePage);
                }
            }
        }
        Ok(())
    }

    fn is_leaf(entry: PageTableEntry, level: u32) -> bool {
        level == 1 || ((level == 2 || level == 3) && entry.contains(PteFlags::HUGE))
    }

    /// Translates one virtual address through the tables at `root`.
    pub fn translate<M: PhysMemory + ?Sized>(&self, mem: &M, root: GuestPhysAddr, va: GuestVirtAddr)
        -> Result<Translation, WalkError> {
        if !self.mode.is_canonical(va.0) {
            return Err(WalkError::NonCanonical(va));
        }
        let mut table = GuestPhysAddr(root.0 & !(PAGE_SIZE - 1));
        let mut upper = PteFlags::WRITABLE | PteFlags::USER;
        for level in (1..=self.mode.levels()).rev() {
            let index = (va.0 >> (12 + 9 * (level - 1))) & 511;
            let entry_addr = GuestPhysAddr(table.0 + index * 8);
            let entry = PageTableEntry(mem.read_u64(entry_addr).map_err(|e| {
                if level == self.mode.levels() {
                    WalkError::Memory(e)
                } else {
                    WalkError::Bad { level: level + 1, entry_addr, reason: BadEntry::TableOutsideMemory }
                }
            })?);
            if !entry.is_present() {
                return Ok(Translation::NotMapped { level });
            }
            self.check(entry, level).map_err(|reason| WalkError::Bad { level, entry_addr, reason })?;
            if Self::is_leaf(entry, level) {
                let size = PageSize::at_level(level);
                let leaf = Leaf { va: va.align_down(size.bytes()), size, entry, entry_addr, level, upper };
                return Ok(Translation::Mapped { frame: leaf.frame(), offset: va.0 & (size.bytes() - 1), leaf });
            }
            upper &= entry.flags();
            table = entry.addr();
        }
        unreachable!("level 1 entries are always leaves")
    }

    /// Reports every present leaf overlapping `[start, start + pages * 4096)`, in address
    /// order, and every malformed entry met on the way (walk continues past it).
    ///
    /// Each table page is read at most once per call: a table reached again through
    /// another entry (aliasing, loops) is skipped and counted, so a hostile guest cannot
    /// make the cost exceed one visit per table page.
    pub fn walk_range<M: PhysMemory + ?Sized>(&self, mem: &M, root: GuestPhysAddr, start: GuestVirtAddr, pages: u64,
        visit: &mut dyn FnMut(WalkItem)) -> Result<WalkStats, WalkError> {
        self.walk_range_within(mem, root, start, pages, &mut TableBudget::unlimited(), visit)
    }

    /// [`Walker::walk_range`], reading at most as many table pages as `budget` has left
    /// (and taking them from it). When the budget runs out the walk stops and fails with
    /// [`WalkError::TooManyTables`]; what was visited until then has been reported.
    pub fn walk_range_within<M: PhysMemory + ?Sized>(&self, mem: &M, root: GuestPhysAddr, start: GuestVirtAddr,
        pages: u64, budget: &mut TableBudget, visit: &mut dyn FnMut(WalkItem)) -> Result<WalkStats, WalkError> {
        let (mut leaves, mut bad) = (0, 0);
        let mut stats = self.walk_chunks_within(mem, root, start, pages, budget, &mut |item| match item {
            Ok(Chunk::Large(leaf)) => visit(Ok(leaf)),
            Ok(Chunk::Ptes(block)) => {
                for i in 0..block.entries.len() {
                    match block.leaf(i) {
                        None => {}
                        Some(Ok(leaf)) => {
                            leaves += 1;
                            visit(Ok(leaf));
                        }
                        Some(Err(reason)) => {
                            bad += 1;
                            let va = GuestVirtAddr(block.va.0.wrapping_add(i as u64 * PAGE_SIZE));
                            visit(Err((va, 1, reason)));
                        }
                    }
                }
            }
            Err(e) => visit(Err(e)),
        })?;
        stats.leaves += leaves;
        stats.bad_entries += bad;
        Ok(stats)
    }

    /// [`Walker::walk_range_within`] that hands over each last-level table's entries in
    /// the range as one [`PteBlock`] instead of a leaf per entry (large leaves and
    /// malformed upper entries one by one, as there). Same bounds: each table page once
    /// per call, no more than `budget`. Its stats count the large leaves and the
    /// malformed upper entries only (the blocks' entries are the caller's to count).
    pub fn walk_chunks_within<M: PhysMemory + ?Sized>(&self, mem: &M, root: GuestPhysAddr, start: GuestVirtAddr,
        pages: u64, budget: &mut TableBudget, visit: &mut dyn FnMut(ChunkItem)) -> Result<WalkStats, WalkError> {
        let bits = self.mode.va_bits();
        if !self.mode.is_canonical(start.0) {
            return Err(WalkError::NonCanonical(start));
        }
        let lin_start = start.0 & ((1u64 << bits) - 1);
        let half = 1u64 << (bits - 1);
        let lin_end = pages
            .checked_mul(PAGE_SIZE)
            .and_then(|len| lin_start.checked_add(len))
            .filter(|&end| end <= 1u64 << bits && (lin_start >= half || end <= half))
            .ok_or(WalkError::NonCanonical(start))?;
        let mut stats = WalkStats::default();
        if lin_end == lin_start {
            return Ok(stats);
        }
        // The root must be readable; everything below is reported, not fatal.
        mem.read_u64(GuestPhysAddr(root.0 & !(PAGE_SIZE - 1))).map_err(WalkError::Memory)?;
        let mut visited = BTreeSet::new();
        let reserved = PageTableEntry(u64::MAX).reserved_addr_bits(self.max_phys_bits);
        let mut ctx = RangeWalk { walker: self, mem, visit, visited: &mut visited, stats: &mut stats, lin_start, lin_end,
            budget, exhausted: false, reserved, spare: Vec::new() };
        ctx.table(GuestPhysAddr(root.0 & !(PAGE_SIZE - 1)), self.mode.levels(), 0, PteFlags::WRITABLE | PteFlags::USER);
        if ctx.exhausted {
            return Err(WalkError::TooManyTables { limit: budget.limit });
        }
        Ok(stats)
    }
}

struct RangeWalk<'a, M: ?Sized> {
    walker: &'a Walker,
    mem: &'a M,
    visit: &'a mut dyn FnMut(ChunkItem),
    visited: &'a mut BTreeSet<u64>,
    stats: &'a mut WalkStats,
    lin_start: u64,
    lin_end: u64,
    budget: &'a mut TableBudget,
    /// The budget ran out: every pending level returns at once.
    exhausted: bool,
    /// [`PteBlock`]'s reserved address bits.
    reserved: u64,
    /// Table buffers not in use: one per level being walked, reused from table to table
    /// (a walk reads many, and zeroing a fresh 4 KiB buffer for each was a tenth of a
    /// scan's cost).
    spare: Vec<Box<[u64; 512]>>,
}

impl<M: PhysMemory + ?Sized> RangeWalk<'_, M> {
    /// Walks the table at `table` (level `level`) that covers linear addresses from `base`.
    fn table(&mut self, table: GuestPhysAddr, level: u32, base: u64, upper: PteFlags) {
        if self.exhausted {
            return;
        }
        if !self.visited.insert(table.0) {
            self.stats.aliased_tables_skipped += 1;
            return;
        }
        if !self.budget.take() {
            self.exhausted = true;
            return;
        }
        self.stats.tables_visited += 1;
        let mut entries = self.spare.pop().unwrap_or_else(|| Box::new([0; 512]));
        if self.mem.read_table(table, &mut entries).is_ok() {
            self.entries(table, level, base, upper, &entries);
        } else {
            // Checked readable by the parent; a table that runs off the end of memory
            // is reported, never trusted.
            self.stats.bad_entries += 1;
            let va = GuestVirtAddr(self.walker.mode.sign_extend(base));
            (self.visit)(Err((va, level, BadEntry::TableOutsideMemory)));
        }
        self.spare.push(entries);
    }

    /// The in-range `entries` of the table at `table` (level `level`, from `base`).
    fn entries(&mut self, table: GuestPhysAddr, level: u32, base: u64, upper: PteFlags, entries: &[u64; 512]) {
        let shift = 12 + 9 * (level - 1);
        let span = 1u64 << shift;
        let first = (self.lin_start.saturating_sub(base)) >> shift;
        let last = ((self.lin_end - 1).saturating_sub(base) >> shift).min(511);
        let mode = self.walker.mode;
        if level == 1 {
            let (first, last) = (first as usize, last as usize);
            let block = PteBlock {
                va: GuestVirtAddr(mode.sign_extend(base + first as u64 * span)),
                entries: &entries[first..=last],
                entry_addr: GuestPhysAddr(table.0 + first as u64 * 8),
                upper,
                reserved: self.reserved,
            };
            (self.visit)(Ok(Chunk::Ptes(block)));
            return;
        }
        for index in first..=last {
            let lin = base + index * span;
            let va = GuestVirtAddr(mode.sign_extend(lin));
            let entry_addr = GuestPhysAddr(table.0 + index * 8);
            let entry = PageTableEntry(entries[index as usize]);
            if !entry.is_present() {
                continue;
            }
            if let Err(reason) = self.walker.check(entry, level) {
                self.stats.bad_entries += 1;
                (self.visit)(Err((va, level, reason)));
                continue;
            }
            if Walker::is_leaf(entry, level) {
                self.stats.leaves += 1;
                let leaf = Leaf { va, size: PageSize::at_level(level), entry, entry_addr, level, upper };
                (self.visit)(Ok(Chunk::Large(leaf)));
                continue;
            }
            let child = entry.addr();
            if self.mem.read_u64(child).is_err() {
                self.stats.bad_entries += 1;
                (self.visit)(Err((va, level, BadEntry::TableOutsideMemory)));
                continue;
            }
            self.table(child, level - 1, lin, upper & entry.flags());
            if self.exhausted {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests;
