//! Typed guest addresses.

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPhysAddr(pub u64);

/// A guest-virtual (linear) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestVirtAddr(pub u64);

impl GuestPhysAddr {
    pub fn checked_add(self, n: u64) -> Option<Self> {
        self.0.checked_add(n).map(Self)
    }

    /// Page frame number.
    pub fn pfn(self) -> u64 {
        self.0 / PAGE_SIZE
    }
}

impl GuestVirtAddr {
    pub fn checked_add(self, n: u64) -> Option<Self> {
        self.0.checked_add(n).map(Self)
    }

    pub fn align_down(self, align: u64) -> Self {
        Self(self.0 & !(align - 1))
    }

    pub fn page_number(self) -> u64 {
        self.0 / PAGE_SIZE
    }
}

impl fmt::Debug for GuestPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestPhysAddr({:#x})", self.0)
    }
}

impl fmt::Debug for GuestVirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestVirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for GuestPhysAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for GuestVirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
