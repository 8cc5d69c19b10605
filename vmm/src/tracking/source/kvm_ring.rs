//! KVM's per-vCPU dirty ring: KVM appends the guest frames the vCPU writes to a ring
//! shared with the VMM (mmap of the vCPU fd at page offset 64); the VMM harvests entries
//! and `KVM_RESET_DIRTY_RINGS` write-protects the harvested frames again.
//!
//! A background thread harvests every millisecond while the guest runs (the
//! acquire/release protocol allows it), so the ring never fills in practice. On this
//! nested host KVM's "ring full" exit comes late — it kept pushing past the 64 reserved
//! entries and the ring overflowed when only exits harvested it. So a harvest that finds
//! the ring completely full counts as a possible overflow: every frame is then treated
//! as written (never a missed write), and a ring that no longer matches KVM's index is
//! an error, not a silent wrong answer.
//!
//! The ring must be enabled on the VM before any vCPU exists; with it, KVM_GET_DIRTY_LOG
//! is unavailable, so the pte engine (which needs KVM_CLEAR_DIRTY_LOG) cannot use it.

use super::{Cause, DirtySource, Harvested};
use crate::tracking::frame_set::FrameSet;
use kvm_bindings::{kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET};
use kvm_ioctls::{VcpuFd, VmFd};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, 0xAE, 0xc7);

/// Exit reason of a full ring.
pub const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;
const DIRTY: u32 = 1;
const RESET: u32 = 2;
/// Entries in the ring (16 bytes each): KVM's maximum.
pub const ENTRIES: u32 = 65536;
const HARVEST_PERIOD: Duration = Duration::from_millis(1);

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
    #[error("the dirty ring no longer matches KVM's (it overflowed): tracking cannot go on")]
    Desynchronized,
    #[error("cannot start the dirty-ring harvester: {0}")]
    Thread(std::io::Error),
}

/// Enables the ring on the VM (before vCPUs are created). Requires the
/// acquire/release variant when available, for the concurrent harvester.
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
struct Ring {
    entries: *mut DirtyGfn,
    len: usize,
    next: u32,
}

// SAFETY: the mapping is touched only under the harvester mutex, and the flags with
// atomics as KVM's acquire/release protocol requires.
unsafe impl Send for Ring {}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `DirtyRing::map`.
        unsafe { libc::munmap(self.entries.cast(), self.len) };
    }
}

/// What one harvest found.
pub enum Harvest {
    /// Frame offsets (slot 0) written since the last harvest.
    Frames(Vec<u64>),
    /// The ring was completely full: entries may have been lost. Treat every frame as
    /// written.
    MaybeOverflowed(Vec<u64>),
}

impl Ring {
    fn entry(&self, i: u32) -> &DirtyGfn {
        // SAFETY: the index is reduced modulo the ring size; entries live as long as the
        // mapping.
        unsafe { &*self.entries.add((i % ENTRIES) as usize) }
    }

    fn harvest(&mut self, vm: &File) -> Result<Harvest, Error> {
        let mut frames = Vec::new();
        loop {
            let e = self.entry(self.next);
            if e.flags.load(Ordering::Acquire) & DIRTY == 0 {
                break;
            }
            if e.slot != 0 {
                return Err(Error::BadEntry { slot: e.slot, offset: e.offset });
            }
            frames.push(e.offset);
            e.flags.store(RESET, Ordering::Release);
            self.next = self.next.wrapping_add(1);
            if frames.len() == ENTRIES as usize {
                break;
            }
        }
        if !frames.is_empty() {
            // SAFETY: a VM ioctl without arguments.
            if unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) } < 0 {
                return Err(Error::Reset(std::io::Error::last_os_error()));
            }
        }
        if frames.len() == ENTRIES as usize {
            return Ok(Harvest::MaybeOverflowed(frames));
        }
        Ok(Harvest::Frames(frames))
    }

    /// After a ring-full exit with nothing at our index, is there anything elsewhere?
    fn desynchronized(&self) -> bool {
        (0..ENTRIES).any(|i| self.entry(i).flags.load(Ordering::Acquire) & DIRTY != 0)
    }
}

struct Shared {
    ring: Mutex<Ring>,
    /// Harvested by the background thread, not yet taken by the log.
    pending: Mutex<(Vec<u64>, bool)>,
    stop: AtomicBool,
    vm: File,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The ring and its background harvester.
pub struct DirtyRing {
    shared: Arc<Shared>,
    /// Frames of guest RAM: an entry past them is a broken ring.
    pages: u64,
    thread: Option<JoinHandle<()>>,
}

impl DirtyRing {
    pub fn map(vm: &VmFd, vcpu: &VcpuFd, ram_pages: u64) -> Result<DirtyRing, Error> {
        let len = ENTRIES as usize * std::mem::size_of::<DirtyGfn>();
        // SAFETY: maps the vCPU fd's dirty-ring pages, which KVM provides at this offset
        // once the capability is enabled; unmapped when the Ring drops.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED,
                vcpu.as_raw_fd(), i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * 4096)
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Map(std::io::Error::last_os_error()));
        }
        let ring = Ring { entries: ptr.cast(), len, next: 0 };
        let vm = super::own_vm_fd(vm).map_err(Error::Map)?;
        let shared = Arc::new(Shared {
            ring: Mutex::new(ring),
            pending: Mutex::new((Vec::new(), false)),
            stop: AtomicBool::new(false),
            vm,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-ring".into())
            .spawn(move || {
                while !s.stop.load(Ordering::Relaxed) {
                    // The ring stays locked until what it gave is in `pending`: a harvest
                    // on the vCPU thread in between would find neither the entries (gone
                    // from the ring) nor them (not pending yet), and a pagemap read then
                    // would miss a write (Linux's soft-dirty self-test caught this, 1 in
                    // ~3000 of its write-then-read iterations).
                    let mut ring = lock(&s.ring);
                    match ring.harvest(&s.vm) {
                        Ok(h) => {
                            let mut p = lock(&s.pending);
                            match h {
                                Harvest::Frames(f) => p.0.extend(f),
                                Harvest::MaybeOverflowed(f) => {
                                    p.0.extend(f);
                                    p.1 = true;
                                }
                            }
                        }
                        // The vCPU thread's own harvest reports errors; stop quietly.
                        Err(_) => break,
                    }
                    drop(ring);
                    std::thread::sleep(HARVEST_PERIOD);
                }
            })
            .map_err(Error::Thread)?;
        Ok(DirtyRing { shared, pages: ram_pages, thread: Some(thread) })
    }

    /// Harvests now (from the vCPU thread) and takes what the background thread found.
    /// `ring_full`: called for a ring-full exit (an empty ring then means it is broken).
    pub fn harvest(&mut self, ring_full: bool) -> Result<Harvest, Error> {
        let mut ring = lock(&self.shared.ring);
        let now = ring.harvest(&self.shared.vm)?;
        let (mut frames, mut overflow) = std::mem::take(&mut *lock(&self.shared.pending));
        match now {
            Harvest::Frames(f) => frames.extend(f),
            Harvest::MaybeOverflowed(f) => {
                frames.extend(f);
                overflow = true;
            }
        }
        if ring_full && frames.is_empty() && ring.desynchronized() {
            return Err(Error::Desynchronized);
        }
        Ok(if overflow { Harvest::MaybeOverflowed(frames) } else { Harvest::Frames(frames) })
    }
}

impl DirtySource for DirtyRing {
    fn name(&self) -> &'static str {
        "kvm-ring"
    }

    fn harvest(&mut self, cause: Cause, into: &mut FrameSet) -> Result<Harvested, super::Error> {
        let (frames, overflowed) = match DirtyRing::harvest(self, cause == Cause::RingFull)? {
            Harvest::Frames(f) => (f, false),
            Harvest::MaybeOverflowed(f) => (f, true),
        };
        for &offset in &frames {
            if offset >= self.pages {
                return Err(Error::BadEntry { slot: 0, offset }.into());
            }
            into.insert_range(offset, 1);
        }
        // The ring itself is read without system calls; a reset follows a non-empty one.
        Ok(Harvested { ioctls: u64::from(!frames.is_empty()), overflowed })
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
