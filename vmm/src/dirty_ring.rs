//! KVM's per-vCPU dirty ring: KVM appends the guest frames the vCPU writes to a ring
//! shared with the VMM (mmap of the vCPU fd at page offset 64); the VMM harvests entries
//! and `KVM_RESET_DIRTY_RINGS` write-protects the harvested frames again. A full ring
//! makes the vCPU exit (`KVM_EXIT_DIRTY_RING_FULL`); the run loop then harvests.
//!
//! The ring must be enabled on the VM before any vCPU exists; with it, KVM_GET_DIRTY_LOG
//! is unavailable, so the pte engine (which needs KVM_CLEAR_DIRTY_LOG) cannot use it.

use kvm_bindings::{kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, 0xAE, 0xc7);

/// Exit reason of a full ring.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
const DIRTY: u32 = 1;
const RESET: u32 = 2;
/// Entries in the ring (16 bytes each).
pub const ENTRIES: u32 = 16384;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM does not support the dirty ring (KVM_CAP_DIRTY_LOG_RING): {0}")]
    Unsupported(kvm_ioctls::Error),
    #[error("mapping the vCPU's dirty ring failed: {0}")]
    Map(std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(std::io::Error),
    #[error("the dirty ring holds an entry for slot {slot}, offset {offset:#x}, outside guest memory")]
    BadEntry { slot: u32, offset: u64 },
}

/// Enables the ring on the VM (before vCPUs are created). Prefers the acquire/release
/// variant, which lets a harvester run while the vCPU does.
pub fn enable(vm: &VmFd) -> Result<(), Error> {
    let mut last = None;
    for cap in [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING] {
        let mut c = kvm_enable_cap { cap, ..Default::default() };
        c.args[0] = u64::from(ENTRIES) * 16;
        match vm.enable_cap(&c) {
            Ok(()) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(Error::Unsupported(last.expect("tried at least once")))
}

#[repr(C)]
struct DirtyGfn {
    flags: AtomicU32,
    slot: u32,
    offset: u64,
}

/// One vCPU's ring, mapped.
pub struct DirtyRing {
    entries: *mut DirtyGfn,
    len: usize,
    next: u32,
}

// SAFETY: the mapping is only touched through &mut self (one harvester at a time) and
// the flags with atomics, as KVM's acquire/release protocol requires.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    pub fn map(vcpu: &VcpuFd) -> Result<DirtyRing, Error> {
        let len = ENTRIES as usize * std::mem::size_of::<DirtyGfn>();
        // SAFETY: maps the vCPU fd's dirty-ring pages, which KVM provides at this offset
        // once the capability is enabled; the mapping is unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED,
                vcpu.as_raw_fd(), i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * 4096)
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map(std::io::Error::last_os_error()));
        }
        Ok(DirtyRing { entries: ptr.cast(), len, next: 0 })
    }

    /// Calls `f(slot, page offset)` for every new entry, marks them for reset, and has KVM
    /// re-protect them. Returns the number of entries harvested.
    pub fn harvest(&mut self, vm: &VmFd, mut f: impl FnMut(u32, u64) -> Result<(), Error>) -> Result<u64, Error> {
        let mut n = 0u64;
        loop {
            // SAFETY: the index is reduced modulo the ring size; entries live as long as
            // the mapping.
            let e = unsafe { &*self.entries.add((self.next % ENTRIES) as usize) };
            if e.flags.load(Ordering::Acquire) & DIRTY == 0 {
                break;
            }
            f(e.slot, e.offset)?;
            e.flags.store(RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            n += 1;
        }
        if n > 0 {
            // SAFETY: a VM ioctl without arguments.
            if unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) } < 0 {
                return Err(Error::Reset(std::io::Error::last_os_error()));
            }
        }
        Ok(n)
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`.
        unsafe { libc::munmap(self.entries.cast(), self.len) };
    }
}
