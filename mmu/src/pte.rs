//! Page-table entries.

use crate::addr::GuestPhysAddr;
use bitflags::bitflags;
use core::fmt;

bitflags! {
    /// x86-64 page-table entry flags, plus the bits the guest kernel leaves to the
    /// hypervisor ([`guest_abi::pte`]: 52..=58 are ignored by the CPU; the guest kernel
    /// never sets them).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct PteFlags: u64 {
        const PRESENT = 1;
        const WRITABLE = 1 << 1;
        const USER = 1 << 2;
        const WRITE_THROUGH = 1 << 3;
        const NO_CACHE = 1 << 4;
        const ACCESSED = 1 << 5;
        const DIRTY = 1 << 6;
        /// PS: a large page in a PDPT or PD entry (PAT in a PTE).
        const HUGE = 1 << 7;
        const GLOBAL = 1 << 8;
        /// Hypervisor: the page was written since the last soft-dirty clear.
        const HV_SOFT_DIRTY = guest_abi::pte::HV_SOFT_DIRTY;
        /// Hypervisor: the hypervisor (not the guest) cleared WRITABLE here.
        const HV_WRITE_PROTECTED = guest_abi::pte::HV_WRITE_PROTECTED;
        const NO_EXECUTE = 1 << 63;
    }
}

/// Bits 12..=51: the physical address of the next table or the frame.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// One 64-bit entry of any level.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct PageTableEntry(pub u64);

impl PageTableEntry {
    pub fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }

    pub fn is_present(self) -> bool {
        self.0 & PteFlags::PRESENT.bits() != 0
    }

    pub fn contains(self, f: PteFlags) -> bool {
        self.flags().contains(f)
    }

    /// Physical address bits 12..=51 (for a large page, the caller masks the low bits).
    pub fn addr(self) -> GuestPhysAddr {
        GuestPhysAddr(self.0 & ADDR_MASK)
    }

    pub fn with(self, f: PteFlags) -> Self {
        Self(self.0 | f.bits())
    }

    pub fn without(self, f: PteFlags) -> Self {
        Self(self.0 & !f.bits())
    }

    /// Address bits at or above `max_phys_bits` that a valid entry must leave clear.
    pub fn reserved_addr_bits(self, max_phys_bits: u32) -> u64 {
        if max_phys_bits >= 52 {
            return 0;
        }
        self.0 & ADDR_MASK & !((1u64 << max_phys_bits) - 1)
    }
}

impl fmt::Debug for PageTableEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageTableEntry({:#x}, {:?})", self.0, self.flags())
    }
}
