//! Linux `/proc/PID/pagemap` entries (Linux's Documentation/admin-guide/mm/pagemap.rst).

use core::fmt;

/// One 64-bit pagemap entry, bit-compatible with Linux's.
///
/// ```
/// let e = mmu::PagemapEntry::present(0x1234).with_soft_dirty(true).with_exclusive(true);
/// assert_eq!(e.pfn(), Some(0x1234));
/// assert!(e.soft_dirty() && e.exclusive() && !e.swapped());
/// assert_eq!(e.0 >> 63, 1);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    pub const PFN_MASK: u64 = (1 << 55) - 1;
    pub const SOFT_DIRTY: u64 = 1 << 55;
    pub const EXCLUSIVE: u64 = 1 << 56;
    pub const UFFD_WP: u64 = 1 << 57;
    pub const GUARD: u64 = 1 << 58;
    pub const FILE_OR_SHARED: u64 = 1 << 61;
    pub const SWAPPED: u64 = 1 << 62;
    pub const PRESENT: u64 = 1 << 63;

    /// Not present, not swapped (soft-dirty may still be set from the mapping).
    pub const fn none() -> Self {
        PagemapEntry(0)
    }

    /// Present with frame number `pfn` (truncated to 55 bits).
    pub const fn present(pfn: u64) -> Self {
        PagemapEntry(Self::PRESENT | (pfn & Self::PFN_MASK))
    }

    /// Swapped out: swap type in bits 0..=4, offset in 5..=54.
    pub const fn swapped_entry(swap_type: u64, offset: u64) -> Self {
        PagemapEntry(Self::SWAPPED | (swap_type & 0x1f) | ((offset << 5) & Self::PFN_MASK))
    }

    fn with_bit(self, bit: u64, on: bool) -> Self {
        if on { PagemapEntry(self.0 | bit) } else { PagemapEntry(self.0 & !bit) }
    }

    pub fn with_soft_dirty(self, on: bool) -> Self {
        self.with_bit(Self::SOFT_DIRTY, on)
    }

    pub fn with_exclusive(self, on: bool) -> Self {
        self.with_bit(Self::EXCLUSIVE, on)
    }

    /// Linux's PM_FILE: a page of a file or of shared memory (not anonymous).
    pub fn with_file_or_shared(self, on: bool) -> Self {
        self.with_bit(Self::FILE_OR_SHARED, on)
    }

    pub fn file_or_shared(self) -> bool {
        self.0 & Self::FILE_OR_SHARED != 0
    }

    pub fn is_present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }

    pub fn swapped(self) -> bool {
        self.0 & Self::SWAPPED != 0
    }

    pub fn soft_dirty(self) -> bool {
        self.0 & Self::SOFT_DIRTY != 0
    }

    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }

    /// The frame number, if present.
    pub fn pfn(self) -> Option<u64> {
        self.is_present().then_some(self.0 & Self::PFN_MASK)
    }

    /// The 8 bytes Linux returns from a read of `/proc/PID/pagemap`.
    pub fn to_le_bytes(self) -> [u8; 8] {
        self.0.to_le_bytes()
    }
}

impl fmt::Debug for PagemapEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PagemapEntry({:#018x}: present={} sd={} excl={})", self.0, self.is_present(), self.soft_dirty(),
               self.exclusive())
    }
}
