//! Page-table editing through the direct map.
//!
//! Bits 52..=58 of every entry belong to the hypervisor ([`guest_abi::pte::HV_BITS`]):
//! the kernel never sets them and keeps them whenever it rewrites an entry.

use crate::frames::{self, phys_to_virt};

pub const P: u64 = 1;
pub const W: u64 = 1 << 1;
pub const U: u64 = 1 << 2;
pub const PWT: u64 = 1 << 3;
pub const PCD: u64 = 1 << 4;
pub const PS: u64 = 1 << 7;
pub const NX: u64 = 1 << 63;
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
pub use guest_abi::pte::HV_BITS;

/// Pointer to entry `index` of the table at physical `table`.
pub fn entry(table: u64, index: u64) -> *mut u64 {
    (phys_to_virt(table) + index * 8) as *mut u64
}

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

/// Why a walk could not reach the requested level.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// An intermediate table is missing and `create` was false.
    Missing,
    /// A large page sits above the requested level.
    LargePage,
    /// Out of frames for a new table.
    NoMemory,
}

/// The entry mapping `va` at `level` (1 = PTE, 2 = PDE), creating intermediate tables
/// (user-accessible, writable: the leaf decides) if `create`.
pub fn walk(pml4: u64, va: u64, level: u32, create: bool) -> Result<*mut u64, WalkError> {
    let mut table = pml4;
    let mut l = 4;
    while l > level {
        let e = entry(table, index(va, l));
        // SAFETY: `e` points into a page-table frame reached through the direct map.
        let value = unsafe { e.read_volatile() };
        if value & P == 0 {
            if !create {
                return Err(WalkError::Missing);
            }
            let frame = frames::alloc().ok_or(WalkError::NoMemory)?;
            // SAFETY: as above; the new table frame is zeroed.
            unsafe { e.write_volatile(frame | P | W | U) };
            table = frame;
        } else if value & PS != 0 {
            return Err(WalkError::LargePage);
        } else {
            table = value & ADDR_MASK;
        }
        l -= 1;
    }
    Ok(entry(table, index(va, level)))
}

/// Maps one 4 KiB page (used for the kernel's own mappings).
pub fn map_4k(pml4: u64, va: u64, pa: u64, flags: u64) -> Result<(), WalkError> {
    let e = walk(pml4, va, 1, true)?;
    // SAFETY: `e` is a PTE slot inside a live table.
    unsafe { e.write_volatile(pa | flags | P) };
    Ok(())
}

/// Maps one 2 MiB page.
pub fn map_2m(pml4: u64, va: u64, pa: u64, flags: u64) -> Result<(), WalkError> {
    let e = walk(pml4, va, 2, true)?;
    // SAFETY: `e` is a PDE slot inside a live table.
    unsafe { e.write_volatile(pa | flags | P | PS) };
    Ok(())
}
