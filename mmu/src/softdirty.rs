//! Soft-dirty tracking on guest PTEs, done by the hypervisor.
//!
//! The hypervisor owns PTE bits 52..=58 ([`guest_abi::pte::HV_BITS`]: the guest kernel
//! never sets them and keeps them when it rewrites an entry). It uses two:
//!
//! - [`PteFlags::HV_SOFT_DIRTY`]: written since the last clear (Linux's soft-dirty bit).
//! - [`PteFlags::HV_WRITE_PROTECTED`]: the hypervisor, not the guest, cleared WRITABLE.
//!
//! The protocol, as Linux's `clear_refs` value 4:
//!
//! ```
//! use mmu::{softdirty, PageTableEntry, PteFlags};
//! let pte = PageTableEntry(0x5000 | (PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER).bits());
//! let cleared = softdirty::clear(pte);
//! assert!(!cleared.contains(PteFlags::WRITABLE) && !softdirty::is_soft_dirty(cleared));
//! // The next write faults; the hypervisor checks the fault is its own and restores W.
//! assert!(softdirty::is_hypervisor_protected(cleared));
//! let written = softdirty::restore_after_write(cleared);
//! assert!(written.contains(PteFlags::WRITABLE) && softdirty::is_soft_dirty(written));
//! ```

use crate::pte::{PageTableEntry, PteFlags};

/// Clears soft-dirty and write-protects a present leaf. An entry the guest keeps
/// read-only stays read-only and is not marked as protected by the hypervisor.
pub fn clear(entry: PageTableEntry) -> PageTableEntry {
    let e = entry.without(PteFlags::HV_SOFT_DIRTY);
    if e.contains(PteFlags::WRITABLE) {
        e.without(PteFlags::WRITABLE).with(PteFlags::HV_WRITE_PROTECTED)
    } else {
        e
    }
}

/// The hybrid engine's clear: soft-dirty and the hardware Dirty bit off, W kept. The
/// next write through the entry sets Dirty again (the CPU's page walk, or KVM's for a
/// shadow-paged guest), so Dirty alone says "written since the clear", per entry. Only
/// for a guest kernel that never reads Dirty itself.
pub fn clear_dirty(entry: PageTableEntry) -> PageTableEntry {
    entry.without(PteFlags::HV_SOFT_DIRTY | PteFlags::DIRTY)
}

/// Written since a [`clear_dirty`]: Dirty set again, or soft-dirty set by the hypervisor.
pub fn written_since_clear_dirty(entry: PageTableEntry) -> bool {
    entry.contains(PteFlags::DIRTY) || is_soft_dirty(entry)
}

/// Did the hypervisor take W away from this entry (and has nobody given it back)?
pub fn is_hypervisor_protected(entry: PageTableEntry) -> bool {
    entry.contains(PteFlags::HV_WRITE_PROTECTED) && !entry.contains(PteFlags::WRITABLE)
}

/// Gives W back after a caught write fault and records the write.
pub fn restore_after_write(entry: PageTableEntry) -> PageTableEntry {
    entry.with(PteFlags::WRITABLE | PteFlags::HV_SOFT_DIRTY).without(PteFlags::HV_WRITE_PROTECTED)
}

/// Records a write without touching W (a fault the guest will handle itself).
pub fn mark_written(entry: PageTableEntry) -> PageTableEntry {
    entry.with(PteFlags::HV_SOFT_DIRTY)
}

pub fn is_soft_dirty(entry: PageTableEntry) -> bool {
    entry.contains(PteFlags::HV_SOFT_DIRTY)
}

/// The guest made the entry writable again behind the hypervisor's back (e.g.
/// `mprotect` read-write): writes through it no longer fault, so another source (the
/// guest-physical dirty log) must say whether the page was written.
pub fn writable_behind_our_back(entry: PageTableEntry) -> bool {
    entry.contains(PteFlags::HV_WRITE_PROTECTED) && entry.contains(PteFlags::WRITABLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pte(flags: PteFlags) -> PageTableEntry {
        PageTableEntry(0x1234_5000 | flags.bits())
    }

    const PWU: PteFlags = PteFlags::PRESENT.union(PteFlags::WRITABLE).union(PteFlags::USER);

    #[test]
    fn clear_keeps_frame_and_other_bits() {
        let e = pte(PWU | PteFlags::ACCESSED | PteFlags::DIRTY | PteFlags::NO_EXECUTE | PteFlags::HV_SOFT_DIRTY);
        let c = clear(e);
        assert_eq!(c.addr(), e.addr());
        assert!(c.contains(PteFlags::ACCESSED | PteFlags::DIRTY | PteFlags::NO_EXECUTE | PteFlags::USER));
        assert!(!c.contains(PteFlags::WRITABLE) && !is_soft_dirty(c) && is_hypervisor_protected(c));
        assert_eq!(clear(c), c, "clearing twice changes nothing");
    }

    #[test]
    fn read_only_entries_are_not_claimed() {
        let e = pte(PteFlags::PRESENT | PteFlags::USER | PteFlags::HV_SOFT_DIRTY);
        let c = clear(e);
        assert!(!is_hypervisor_protected(c) && !is_soft_dirty(c));
    }

    #[test]
    fn clear_dirty_keeps_write_access_and_reads_the_next_write() {
        let e = pte(PWU | PteFlags::ACCESSED | PteFlags::DIRTY | PteFlags::HV_SOFT_DIRTY);
        let c = clear_dirty(e);
        assert_eq!(c.addr(), e.addr());
        assert!(c.contains(PWU | PteFlags::ACCESSED) && !written_since_clear_dirty(c));
        assert!(written_since_clear_dirty(c.with(PteFlags::DIRTY)), "the write's page walk sets Dirty");
        let ro = clear_dirty(pte(PteFlags::PRESENT | PteFlags::USER | PteFlags::DIRTY));
        assert!(!ro.contains(PteFlags::WRITABLE) && !written_since_clear_dirty(ro), "read-only stays read-only");
    }

    #[test]
    fn guest_rewrites_are_recognized() {
        let c = clear(pte(PWU));
        // The guest's mprotect(rw) sets W and keeps our bits.
        let guest_rw = c.with(PteFlags::WRITABLE);
        assert!(!is_hypervisor_protected(guest_rw) && writable_behind_our_back(guest_rw));
        let written = restore_after_write(c);
        assert!(!writable_behind_our_back(written));
        assert!(is_soft_dirty(mark_written(c)) && !mark_written(c).contains(PteFlags::WRITABLE));
    }
}
