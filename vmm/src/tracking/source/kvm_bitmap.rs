//! KVM's dirty bitmap with manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`):
//! `KVM_GET_DIRTY_LOG` reads the bits, `KVM_CLEAR_DIRTY_LOG` write-protects the frames
//! again. The clear is also how the pte engine makes KVM re-read guest PTEs the VMM
//! edited: it drops KVM's cached writable translations of those frames (measured on this
//! host; docs/softdirty.md, `clear-refs 4`).

use super::{Cause, DirtySource, Harvested};
use crate::tracking::frame_set::FrameSet;
use kvm_bindings::{kvm_clear_dirty_log, kvm_dirty_log, kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE};
use kvm_ioctls::VmFd;
use std::fs::File;
use vmm_sys_util::{ioctl_iow_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// The one memory slot: all of guest RAM from guest-physical 0.
pub const SLOT: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM does not support manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): {0}")]
    Unsupported(kvm_ioctls::Error),
    #[error("KVM_GET_DIRTY_LOG failed: {0}")]
    Get(std::io::Error),
    #[error("KVM_CLEAR_DIRTY_LOG failed: {0}")]
    Clear(std::io::Error),
    #[error("cannot duplicate the VM descriptor for the dirty log: {0}")]
    Dup(std::io::Error),
}

/// Enables manual protection; must precede the creation of logged memory slots.
/// `initially_set`: every frame starts dirty and unprotected (free until cleared, but the
/// history before the first clear is unknown).
pub fn enable(vm: &VmFd, initially_set: bool) -> Result<(), Error> {
    let mut cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, ..Default::default() };
    let mut flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    if initially_set {
        flags |= KVM_DIRTY_LOG_INITIALLY_SET;
    }
    cap.args[0] = u64::from(flags);
    vm.enable_cap(&cap).map_err(Error::Unsupported)
}

/// The bitmap of slot 0, read and re-armed through the VM's descriptor (a duplicate the
/// source owns, so that it needs no borrow of the VM).
pub struct KvmBitmap {
    vm: File,
    pages: u64,
}

impl KvmBitmap {
    pub fn new(vm: &VmFd, ram_pages: u64) -> Result<KvmBitmap, Error> {
        Ok(KvmBitmap { vm: super::own_vm_fd(vm).map_err(Error::Dup)?, pages: ram_pages })
    }

    fn clear(&self, mut bitmap: Vec<u64>) -> Result<u64, Error> {
        let mut arg = kvm_clear_dirty_log { slot: SLOT, num_pages: self.pages as u32, first_page: 0, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` names our slot and a bitmap of `pages` bits that lives until the
        // call returns; KVM only reads it.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(Error::Clear(std::io::Error::last_os_error()));
        }
        Ok(1)
    }
}

impl DirtySource for KvmBitmap {
    fn name(&self) -> &'static str {
        "kvm-bitmap"
    }

    fn harvest(&mut self, _cause: Cause, into: &mut FrameSet) -> Result<Harvested, super::Error> {
        let mut bitmap = vec![0u64; self.pages.div_ceil(64) as usize];
        let mut arg = kvm_dirty_log { slot: SLOT, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` names our slot and a bitmap with a bit for each of its `pages`
        // frames, alive until the call returns; KVM writes only inside it.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.vm, KVM_GET_DIRTY_LOG(), &arg) };
        if ret < 0 {
            return Err(Error::Get(std::io::Error::last_os_error()).into());
        }
        into.insert_words(&bitmap);
        Ok(Harvested { ioctls: 1, overflowed: false })
    }

    fn rearm(&mut self, frames: &FrameSet) -> Result<u64, super::Error> {
        if frames.is_empty() {
            return Ok(0);
        }
        Ok(self.clear(frames.words().to_vec())?)
    }

    fn rearm_all(&mut self) -> Result<u64, super::Error> {
        Ok(self.clear(vec![u64::MAX; self.pages.div_ceil(64) as usize])?)
    }
}
