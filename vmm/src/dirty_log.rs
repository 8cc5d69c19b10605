//! KVM's guest-physical dirty log in manual-protect mode, accumulated in the VMM.
//!
//! Two jobs: (1) after the VMM edits guest PTEs, `KVM_CLEAR_DIRTY_LOG` on the mapped
//! frames makes KVM drop its cached writable translations, so the next write faults and
//! KVM re-reads the edited guest PTE (DESIGN §3); (2) it is the backstop that catches
//! writes through PTEs the guest itself made writable again.
//!
//! The slot is created with `KVM_DIRTY_LOG_INITIALLY_SET`: every frame starts dirty
//! and unprotected (no cost until something is cleared). `accumulated` keeps, per frame,
//! "written since this frame was last cleared": harvests OR into it and only an explicit
//! clear resets a bit, so reading the log never loses information. The VMM's own writes
//! into guest memory (zeroing frames) are marked here too, since KVM does not log them.

use crate::memory::GuestMem;
use kvm_bindings::{kvm_clear_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::ioctl_iowr_nr;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

pub const SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM does not support manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): {0}")]
    Unsupported(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    Get(kvm_ioctls::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed: {0}")]
    Clear(std::io::Error),
    #[error("zapping KVM's translations of frames at {pfn:#x} failed: {source}")]
    Zap { pfn: u64, source: std::io::Error },
}

/// Enables manual protection; must precede the creation of logged memory slots.
pub fn enable(vm: &VmFd) -> Result<(), Error> {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    vm.enable_cap(&cap).map_err(Error::Unsupported)
}

/// Per-frame "written since last cleared", over one memory slot at guest-physical 0.
pub struct DirtyLog {
    pages: u64,
    accumulated: Vec<u64>,
    /// Number of KVM ioctls issued (for `vmm info`).
    pub ioctls: u64,
}

impl DirtyLog {
    pub fn new(mem_size: u64) -> DirtyLog {
        let pages = mem_size / 4096;
        DirtyLog { pages, accumulated: vec![u64::MAX; pages.div_ceil(64) as usize], ioctls: 0 }
    }

    /// Pulls KVM's bitmap into the accumulated one.
    pub fn harvest(&mut self, vm: &VmFd) -> Result<(), Error> {
        let bitmap = vm.get_dirty_log(SLOT, (self.pages * 4096) as usize).map_err(Error::Get)?;
        self.ioctls += 1;
        for (acc, new) in self.accumulated.iter_mut().zip(bitmap) {
            *acc |= new;
        }
        Ok(())
    }

    /// Frames covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn is_dirty(&self, pfn: u64) -> bool {
        pfn < self.pages && self.accumulated[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    pub fn any_dirty(&self, pfn: u64, count: u64) -> bool {
        (pfn..pfn.saturating_add(count)).any(|p| self.is_dirty(p))
    }

    /// Records frames the VMM itself wrote.
    pub fn mark(&mut self, pfn: u64, count: u64) {
        for p in pfn..pfn.saturating_add(count).min(self.pages) {
            self.accumulated[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    /// Clears the frames' dirty bits and has KVM write-protect them, in one ioctl: the
    /// next guest write to any of them faults into KVM, which re-reads the guest's PTE.
    pub fn clear_and_protect(&mut self, vm: &VmFd, frames: &[(u64, u64)]) -> Result<(), Error> {
        if frames.is_empty() {
            return Ok(());
        }
        let mut bitmap = vec![0u64; self.accumulated.len()];
        for &(pfn, count) in frames {
            for p in pfn..pfn.saturating_add(count).min(self.pages) {
                bitmap[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        for (acc, clear) in self.accumulated.iter_mut().zip(&bitmap) {
            *acc &= !clear;
        }
        let mut arg = kvm_clear_dirty_log { slot: SLOT, num_pages: self.pages as u32, first_page: 0, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` names our slot and a bitmap of `pages` bits that lives until the
        // call returns; KVM only reads it.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        self.ioctls += 1;
        if ret < 0 {
            return Err(Error::Clear(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Makes KVM forget every translation of the frames (an mprotect round trip on their
/// host mapping fires the MMU notifier), so the next access of any kind faults and KVM
/// re-reads the guest PTE. Needed after clearing accessed bits: read access is not
/// removed by the dirty log.
pub fn zap(mem: &GuestMem, frames: &[(u64, u64)]) -> Result<(), Error> {
    for &(pfn, count) in frames {
        let host = mem.get_host_address(GuestAddress(pfn * 4096)).map_err(|_| Error::Zap {
            pfn,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let len = (count * 4096) as usize;
        for prot in [libc::PROT_READ, libc::PROT_READ | libc::PROT_WRITE] {
            // SAFETY: `host..host+len` lies inside guest RAM's own anonymous mapping (the
            // frames were checked against guest memory by the caller's walk); the second
            // call restores exactly the original protection.
            if unsafe { libc::mprotect(host.cast(), len, prot) } != 0 {
                return Err(Error::Zap { pfn, source: std::io::Error::last_os_error() });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulated_bits_start_set_and_clear_per_frame() {
        let mut d = DirtyLog::new(1 << 20);
        assert!(d.is_dirty(0) && d.is_dirty(255) && !d.is_dirty(256));
        for w in d.accumulated.iter_mut() {
            *w = 0;
        }
        d.mark(3, 2);
        assert!(d.is_dirty(3) && d.is_dirty(4) && !d.is_dirty(5));
        assert!(d.any_dirty(0, 4) && !d.any_dirty(5, 100));
    }
}
