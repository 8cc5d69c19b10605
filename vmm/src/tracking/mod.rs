//! Which memory the guest wrote: the engines (`vmm run --engine`), the guest-physical
//! dirty sources behind one log, the frame sets they are read into, and the soft-dirty
//! tracker that answers `clear_refs` and `pagemap` per process (with its PTE trap).
pub mod dirty_log;
pub mod dirty_ring;
pub mod engine;
pub mod frame_set;
pub mod pf_trap;
pub mod softdirty;
pub mod uffd;

pub use engine::EngineKind;
