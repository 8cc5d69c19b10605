//! Which memory the guest wrote.
//!
//! - [`engine`]: the engines (`vmm run --engine`) and how each is set up — the only
//!   place besides the command line that tells them apart.
//! - [`source`]: the guest-physical dirty sources behind one trait (KVM bitmap, KVM
//!   dirty ring, userfaultfd).
//! - [`dirty_log`]: what the sources reported, per frame, plus the VMM's own writes.
//! - [`frame_set`]: sets of guest frames, clamped to RAM.
//! - [`ram`]: guest RAM as the tracker needs it (real, or plain memory in tests).
//! - [`softdirty`]: the tracker: `clear_refs` and `pagemap` per guest process, and the
//!   PTE trap's decisions; [`pagemap`]: the rules for one page's entry; [`pf_trap`]:
//!   catching guest page faults with a debug breakpoint.
pub mod dirty_log;
pub mod engine;
pub mod frame_set;
pub mod pagemap;
pub mod pf_trap;
pub mod ram;
pub mod softdirty;
pub mod source;

pub use engine::EngineKind;
