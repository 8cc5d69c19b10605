//! The tracking engines a VM can run with (`vmm run --engine NAME`), and how each is
//! set up: the only place that tells engines apart besides the command line.

use super::ram::Ram;
use super::source::kvm_bitmap::{self, KvmBitmap};
use super::source::kvm_ring::{self, DirtyRing};
use super::source::uffd::UffdSource;
use super::source::DirtySource;
use crate::machine::memory::GuestMem;
use crate::machine::vm::{self, DirtyLogSetup, Machine};
use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

/// How writes are learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// Per process: write-protect guest PTEs, catch the write faults (precise per
    /// mapping); KVM's bitmap as the backstop.
    Pte,
    /// Per process, exact as pte, without a guest fault: the clear takes the guest
    /// PTE's Dirty bit off (W stays) and KVM's write-protect fault on the frame sets it
    /// again on the first write (docs/engines.md).
    Hybrid,
    /// Whole VM, guest-physical: KVM dirty bitmap with manual protection.
    KvmBitmap,
    /// Whole VM, guest-physical: KVM's per-vCPU dirty ring.
    KvmRing,
    /// Whole VM, guest-physical: userfaultfd async write-protect on guest RAM, read and
    /// re-armed with PAGEMAP_SCAN.
    Uffd,
}

impl EngineKind {
    pub const ALL: [EngineKind; 5] = [EngineKind::Pte, EngineKind::Hybrid, EngineKind::KvmBitmap, EngineKind::KvmRing, EngineKind::Uffd];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Pte => "pte",
            EngineKind::Hybrid => "hybrid",
            EngineKind::KvmBitmap => "kvm-bitmap",
            EngineKind::KvmRing => "kvm-ring",
            EngineKind::Uffd => "uffd",
        }
    }

    /// Tracks guest-physical frames (not guest PTEs).
    pub fn is_guest_physical(self) -> bool {
        !self.reads_ptes()
    }

    /// Answers from each guest PTE's own bits (exact per mapping, as Linux).
    pub fn reads_ptes(self) -> bool {
        matches!(self, EngineKind::Pte | EngineKind::Hybrid)
    }
}

/// What an engine needs from the machine, and the dirty source it then runs on.
///
/// The pte engine is "a tracker with a PTE trap" on the KVM bitmap: its bitmap starts
/// "initially all dirty" (free until something is cleared: it needs the bitmap only to
/// make KVM re-read edited PTEs, and as its backstop). The bitmap engine starts
/// protected, so its history is exact from boot.
pub struct EngineSetup(pub EngineKind);

impl EngineKind {
    pub fn setup(self) -> EngineSetup {
        EngineSetup(self)
    }

    /// Catches write faults on guest PTEs it write-protected (precise per mapping).
    pub fn traps_ptes(self) -> bool {
        self == EngineKind::Pte
    }

    /// The history before the first clear is unknown: every frame counts as written.
    pub fn initially_dirty(self) -> bool {
        self.reads_ptes()
    }
}

impl DirtyLogSetup for EngineSetup {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn before_slots(&self, vm: &VmFd) -> Result<(), String> {
        match self.0 {
            EngineKind::Pte | EngineKind::Hybrid => kvm_bitmap::enable(vm, true).map_err(|e| e.to_string()),
            EngineKind::KvmBitmap => kvm_bitmap::enable(vm, false).map_err(|e| e.to_string()),
            EngineKind::KvmRing => kvm_ring::enable(vm).map_err(|e| e.to_string()),
            EngineKind::Uffd => Ok(()),
        }
    }

    fn slot_flags(&self) -> u32 {
        match self.0 {
            EngineKind::Uffd => 0,
            _ => KVM_MEM_LOG_DIRTY_PAGES,
        }
    }
}

impl EngineSetup {
    /// The engine's dirty source, once the VM, its vCPU and guest memory exist.
    pub fn attach(&self, machine: &Machine, mem: &GuestMem) -> Result<Box<dyn DirtySource>, vm::Error> {
        let unavailable = |detail: String| vm::Error::EngineUnavailable { engine: self.0.name(), detail };
        let pages = mem.size() / 4096;
        Ok(match self.0 {
            EngineKind::Pte | EngineKind::Hybrid | EngineKind::KvmBitmap => {
                Box::new(KvmBitmap::new(&machine.vm, pages).map_err(|e| unavailable(e.to_string()))?)
            }
            EngineKind::KvmRing => {
                Box::new(DirtyRing::map(&machine.vm, &machine.vcpu, pages).map_err(|e| unavailable(e.to_string()))?)
            }
            EngineKind::Uffd => {
                let host_base = mem.get_host_address(vm_memory::GuestAddress(0)).expect("RAM starts at 0") as u64;
                Box::new(UffdSource::new(host_base, pages).map_err(|e| unavailable(e.to_string()))?)
            }
        })
    }
}
