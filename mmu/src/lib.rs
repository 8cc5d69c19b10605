//! Guest page tables, read from outside the guest.
//!
//! Everything here works on a [`PhysMemory`] — "read/write 8 bytes of guest-physical
//! memory" — so it is tested and fuzzed on plain byte buffers, with no KVM. Guest memory
//! is adversarial: a walk never panics, never reads outside guest memory (the
//! `PhysMemory` implementation bounds-checks), and visits each page-table page at most
//! once per walk even when the guest makes tables alias each other or loop.
//!
//! ```
//! use mmu::{GuestPhysAddr, GuestVirtAddr, PagingMode, PteFlags, SliceMemory, Translation, Walker};
//! // A 4-level table mapping virtual 0x400000 to physical 0x5000.
//! let mut mem = SliceMemory::new(vec![0u8; 0x10000]);
//! let entry = |next: u64| next | (PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER).bits();
//! mem.set(0x1000, entry(0x2000));                 // PML4[0] -> PDPT
//! mem.set(0x2000, entry(0x3000));                 // PDPT[0] -> PD
//! mem.set(0x3000 + 2 * 8, entry(0x4000));         // PD[2]   -> PT (0x400000)
//! mem.set(0x4000, entry(0x5000));                 // PT[0]   -> frame
//! let walker = Walker::new(PagingMode::Level4);
//! let t = walker.translate(&mem, GuestPhysAddr(0x1000), GuestVirtAddr(0x400123)).unwrap();
//! assert!(matches!(t, Translation::Mapped { frame: GuestPhysAddr(0x5000), offset: 0x123, .. }));
//! ```
#![cfg_attr(not(test), no_std)]

extern crate alloc;

mod addr;
mod memory;
mod pagemap;
mod pte;
pub mod softdirty;
mod walk;

pub use addr::{Cr3, GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
pub use memory::{MemoryError, PhysMemory, SliceMemory};
pub use pagemap::PagemapEntry;
pub use pte::{PageTableEntry, PteFlags};
pub use walk::{BadEntry, Chunk, ChunkItem, Leaf, PteBlock, PageSize, PagingMode, TableBudget, Translation, WalkError, WalkStats, Walker};
