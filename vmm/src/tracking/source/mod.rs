//! Guest-physical dirty sources: the mechanisms that report which guest frames the
//! guest wrote, behind one trait. The KVM dirty bitmap, KVM's dirty ring and
//! userfaultfd async write-protect are three implementations; [`super::dirty_log`]
//! keeps what they report, whichever runs.
//!
//! A source is set up in two steps, because KVM wants some of it before the memory slots
//! and vCPUs exist: [`super::engine::EngineSetup`] tells the machine what to enable and
//! which slot flags to use, then [`super::engine::EngineSetup::attach`] makes the source
//! once the VM, its vCPU and guest memory are there.

pub mod kvm_bitmap;
pub mod kvm_ring;
pub mod uffd;

use super::frame_set::FrameSet;
use kvm_ioctls::VmFd;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};

/// A descriptor of the VM of the source's own (a `dup`), so that a source needs no
/// borrow of the VM for its ioctls.
fn own_vm_fd(vm: &VmFd) -> std::io::Result<File> {
    // SAFETY: `vm` is a live VM descriptor for the whole borrow; the borrowed fd is only
    // duplicated, never closed.
    let fd = unsafe { BorrowedFd::borrow_raw(vm.as_raw_fd()) };
    Ok(File::from(fd.try_clone_to_owned()?))
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bitmap(#[from] kvm_bitmap::Error),
    #[error(transparent)]
    Ring(#[from] kvm_ring::Error),
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
}

/// Why a harvest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// Someone wants the log up to date (a clear, a pagemap, a snapshot, a rate).
    Read,
    /// The vCPU exited because the dirty ring is full.
    RingFull,
}

/// What one harvest cost and found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Harvested {
    /// System calls issued.
    pub ioctls: u64,
    /// Entries may have been lost: every frame must count as written.
    pub overflowed: bool,
}

/// A mechanism that reports the guest frames written since its previous harvest.
///
/// Contract: a write the guest makes to a frame is reported by the next harvest that
/// starts after it, or, if the source re-protected that frame at an earlier harvest, by
/// a later one — never by none. A source that may have lost entries says `overflowed`,
/// and the log then counts every frame as written.
pub trait DirtySource: Send {
    /// The mechanism's name, as `vmm info` shows it (`kvm-bitmap`, `kvm-ring`, `uffd`).
    fn name(&self) -> &'static str;

    /// Adds the frames written since the last harvest to `into`. A frame outside guest
    /// RAM is an error naming it, never an index out of bounds.
    fn harvest(&mut self, cause: Cause, into: &mut FrameSet) -> Result<Harvested, Error>;

    /// The log forgot `frames` (a soft-dirty clear): their next writes must be reported
    /// again. Sources that re-protect everything they report at each harvest (the ring,
    /// userfaultfd) have nothing to do. Returns the system calls issued.
    fn rearm(&mut self, _frames: &FrameSet) -> Result<u64, Error> {
        Ok(0)
    }

    /// [`Self::rearm`] for every frame of guest RAM (a new snapshot or rate window).
    fn rearm_all(&mut self) -> Result<u64, Error> {
        Ok(0)
    }
}
