//! Typed guest addresses.

use core::fmt;

pub const PAGE_SIZE: u64 = 4096;

/// A guest-physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPhysAddr(pub u64);

/// A guest-virtual (linear) address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestVirtAddr(pub u64);

/// A CR3 value as the CPU holds it: the guest-physical address of the top-level page
/// table in bits 12..=51, and in bits 0..=11 either the PCID (with CR4.PCIDE) or the
/// PWT/PCD cache bits (without).
///
/// Compare address spaces by [`Cr3::table`], never by the raw value: the low bits
/// differ between two loads of the same tables.
///
/// ```
/// use mmu::{Cr3, GuestPhysAddr};
/// let cr3 = Cr3(0x12_3000 | 0x5);
/// assert_eq!(cr3.table(), GuestPhysAddr(0x12_3000));
/// assert_eq!(cr3.pcid(), 5);
/// assert!(cr3.same_tables(Cr3(0x12_3000)));
/// assert_eq!((format!("{cr3:?}"), cr3.to_string()), ("Cr3(0x123005)".to_string(), "0x123005".to_string()));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Cr3(pub u64);

impl Cr3 {
    /// Bits 12..=51: the top-level table (the architectural maximum physical width).
    const TABLE_MASK: u64 = 0x000f_ffff_ffff_f000;

    /// The guest-physical address of the top-level page table (PML4 or PML5).
    pub const fn table(self) -> GuestPhysAddr {
        GuestPhysAddr(self.0 & Self::TABLE_MASK)
    }

    /// Bits 0..=11: the PCID when CR4.PCIDE is set (else PWT/PCD and reserved bits).
    pub const fn pcid(self) -> u16 {
        (self.0 & 0xfff) as u16
    }

    /// Do both values point at the same top-level table (the same address space)?
    pub const fn same_tables(self, other: Cr3) -> bool {
        self.table().0 == other.table().0
    }
}

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

/// `Debug` as `Name(0x…)` and `Display` as `0x…`, for the address newtypes.
macro_rules! hex_fmt {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    )*};
}

hex_fmt!(GuestPhysAddr, GuestVirtAddr, Cr3);
