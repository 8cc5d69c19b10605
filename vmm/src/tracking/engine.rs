//! The tracking engines a VM can run with (`vmm run --engine NAME`).

/// How writes are learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// Per process: write-protect guest PTEs, catch the write faults (precise per
    /// mapping); KVM's bitmap as the backstop.
    Pte,
    /// Whole VM, guest-physical: KVM dirty bitmap with manual protection.
    KvmBitmap,
    /// Whole VM, guest-physical: KVM's per-vCPU dirty ring.
    KvmRing,
    /// Whole VM, guest-physical: userfaultfd async write-protect on guest RAM, read and
    /// re-armed with PAGEMAP_SCAN.
    Uffd,
}

impl EngineKind {
    pub const ALL: [EngineKind; 4] = [EngineKind::Pte, EngineKind::KvmBitmap, EngineKind::KvmRing, EngineKind::Uffd];

    pub fn name(self) -> &'static str {
        match self {
            EngineKind::Pte => "pte",
            EngineKind::KvmBitmap => "kvm-bitmap",
            EngineKind::KvmRing => "kvm-ring",
            EngineKind::Uffd => "uffd",
        }
    }

    /// Tracks guest-physical frames (not guest PTEs).
    pub fn is_guest_physical(self) -> bool {
        self != EngineKind::Pte
    }
}
