//! Guest-physical dirty tracking: which guest frames were written, by any of KVM's
//! bitmap (manual protect), KVM's dirty ring, or userfaultfd async write-protect on the
//! guest RAM mapping — plus the VMM's own writes, which KVM does not log (vm-memory's
//! dirty bitmap records them).
//!
//! Whatever the mechanism, [`GpaLog`] keeps `accumulated`: per frame, "written since
//! this frame was last cleared". Harvests OR into it and only an explicit clear resets a
//! bit, so reading the log never loses information. `window` is the same since the last
//! [`GpaLog::window_start`] (for dirty rates).
//!
//! For the pte engine, the KVM bitmap is also the way to make KVM re-read guest PTEs the
//! VMM edited: `KVM_CLEAR_DIRTY_LOG` on their frames drops KVM's cached writable
//! translations (docs/softdirty.md, `clear-refs 4`).

use crate::tracking::dirty_ring::{self, DirtyRing};
use crate::tracking::frame_set::FrameSet;
use crate::machine::memory::{self, GuestMem};
use crate::tracking::uffd::{self, AsyncWp};
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
    #[error("giving guest RAM at frame {pfn:#x} its write access back failed: {source}")]
    Restore { pfn: u64, source: std::io::Error },
    #[error(transparent)]
    Ring(#[from] dirty_ring::Error),
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
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

/// Where guest writes are learned from.
pub enum Mechanism {
    /// `KVM_GET_DIRTY_LOG` / `KVM_CLEAR_DIRTY_LOG` with manual protection.
    KvmBitmap,
    /// The vCPU's dirty ring.
    KvmRing(DirtyRing),
    /// userfaultfd async write-protect on the guest RAM mapping at `host_base`.
    Uffd { wp: AsyncWp, host_base: u64 },
}

impl Mechanism {
    pub fn name(&self) -> &'static str {
        match self {
            Mechanism::KvmBitmap => "kvm-bitmap",
            Mechanism::KvmRing(_) => "kvm-ring",
            Mechanism::Uffd { .. } => "uffd",
        }
    }
}

/// Counters for `vmm info`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LogStats {
    pub harvests: u64,
    /// Frame bits reported by the mechanism (a frame may count again after a clear).
    pub frames_harvested: u64,
    pub vmm_writes_harvested: u64,
    pub ioctls: u64,
    pub harvest_ns: u64,
    /// Dirty-ring harvests that found the ring completely full (everything then counts
    /// as written).
    pub ring_overflows: u64,
}

pub struct GpaLog {
    pages: u64,
    accumulated: Vec<u64>,
    window: Vec<u64>,
    /// Written since the last snapshot of the VM (all set until the first).
    snap: Vec<u64>,
    mech: Mechanism,
    /// Set by a ring-full exit for the next harvest.
    ring_full: Option<()>,
    pub stats: LogStats,
}

fn set_bits(acc: &mut [u64], window: &mut [u64], snap: &mut [u64], pages: u64, pfn: u64, count: u64) -> u64 {
    let mut n = 0;
    for p in pfn..pfn.saturating_add(count).min(pages) {
        let (w, b) = ((p / 64) as usize, 1u64 << (p % 64));
        acc[w] |= b;
        window[w] |= b;
        snap[w] |= b;
        n += 1;
    }
    n
}

impl GpaLog {
    /// `initially_dirty`: the history before the first clear is unknown (KVM bitmap with
    /// INITIALLY_SET), so every frame counts as written until cleared.
    pub fn new(mem_size: u64, mech: Mechanism, initially_dirty: bool) -> GpaLog {
        let pages = mem_size / 4096;
        let words = pages.div_ceil(64) as usize;
        let fill = if initially_dirty { u64::MAX } else { 0 };
        GpaLog {
            pages,
            accumulated: vec![fill; words],
            window: vec![0; words],
            snap: vec![u64::MAX; words],
            mech,
            ring_full: None,
            stats: LogStats::default(),
        }
    }

    pub fn mechanism(&self) -> &Mechanism {
        &self.mech
    }

    /// Frames covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Harvests after a ring-full exit.
    pub fn harvest_ring_full(&mut self, vm: &VmFd, mem: &GuestMem) -> Result<(), Error> {
        self.ring_full = Some(());
        self.harvest(vm, mem)
    }

    /// Pulls new writes from the mechanism and from the VMM's own writes.
    pub fn harvest(&mut self, vm: &VmFd, mem: &GuestMem) -> Result<(), Error> {
        let t0 = std::time::Instant::now();
        let pages = self.pages;
        let (acc, win, snap) = (&mut self.accumulated, &mut self.window, &mut self.snap);
        let mut fold = |bits: Vec<u64>| {
            let mut n = 0;
            for (((a, w), s), b) in acc.iter_mut().zip(win.iter_mut()).zip(snap.iter_mut()).zip(bits) {
                *a |= b;
                *w |= b;
                *s |= b;
                n += u64::from(b.count_ones());
            }
            n
        };
        match &mut self.mech {
            Mechanism::KvmBitmap => {
                let bitmap = vm.get_dirty_log(SLOT, (pages * 4096) as usize).map_err(Error::Get)?;
                self.stats.ioctls += 1;
                self.stats.frames_harvested += fold(bitmap);
            }
            Mechanism::KvmRing(ring) => {
                let (frames, overflow) = match ring.harvest(self.ring_full.take().is_some())? {
                    dirty_ring::Harvest::Frames(f) => (f, false),
                    dirty_ring::Harvest::MaybeOverflowed(f) => (f, true),
                };
                let mut n = 0;
                for offset in frames {
                    if offset >= pages {
                        return Err(dirty_ring::Error::BadEntry { slot: SLOT, offset }.into());
                    }
                    n += set_bits(acc, win, snap, pages, offset, 1);
                }
                if overflow {
                    // Entries may have been lost: never miss a write.
                    acc.iter_mut().chain(win.iter_mut()).chain(snap.iter_mut()).for_each(|w| *w = u64::MAX);
                    self.stats.ring_overflows += 1;
                }
                self.stats.ioctls += u64::from(n > 0);
                self.stats.frames_harvested += n;
            }
            Mechanism::Uffd { wp, host_base } => {
                let before = wp.ioctls;
                let mut n = 0;
                let base = *host_base;
                // Read and re-protect in one walk: no write slips between them.
                wp.scan(true, |addr, count| n += set_bits(acc, win, snap, pages, (addr - base) / 4096, count))?;
                self.stats.ioctls += wp.ioctls - before;
                self.stats.frames_harvested += n;
            }
        }
        let vmm = memory::take_vmm_writes(mem);
        let (acc, win, snap) = (&mut self.accumulated, &mut self.window, &mut self.snap);
        for (((a, w), s), b) in acc.iter_mut().zip(win.iter_mut()).zip(snap.iter_mut()).zip(&vmm) {
            *a |= b;
            *w |= b;
            *s |= b;
            self.stats.vmm_writes_harvested += u64::from(b.count_ones());
        }
        self.stats.harvests += 1;
        self.stats.harvest_ns += t0.elapsed().as_nanos() as u64;
        Ok(())
    }

    pub fn is_dirty(&self, pfn: u64) -> bool {
        pfn < self.pages && self.accumulated[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Any of `[pfn, pfn + count)` written; frames past the end of RAM never are.
    pub fn any_dirty(&self, pfn: u64, count: u64) -> bool {
        (pfn..pfn.saturating_add(count).min(self.pages)).any(|p| self.is_dirty(p))
    }

    /// The window's bits, one per frame from frame 0.
    pub fn window_words(&self) -> &[u64] {
        &self.window
    }

    pub fn in_window(&self, pfn: u64) -> bool {
        pfn < self.pages && self.window[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Written since the last snapshot (call [`Self::harvest`] first).
    pub fn in_snapshot(&self, pfn: u64) -> bool {
        pfn < self.pages && self.snap[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// A snapshot was written: the next diff starts from here. For the KVM bitmap,
    /// every frame is re-protected so that the next writes show.
    pub fn snapshot_start(&mut self, vm: &VmFd) -> Result<(), Error> {
        if let Mechanism::KvmBitmap = self.mech {
            let all = vec![u64::MAX; self.accumulated.len()];
            self.kvm_clear(vm, all)?;
        }
        self.snap.iter_mut().for_each(|w| *w = 0);
        Ok(())
    }

    /// The accumulated bits (for saving in a snapshot).
    pub fn accumulated(&self) -> &[u64] {
        &self.accumulated
    }

    /// Restores accumulated bits saved in a snapshot (lengths must match).
    pub fn set_accumulated(&mut self, bits: Vec<u64>) -> bool {
        if bits.len() != self.accumulated.len() {
            return false;
        }
        self.accumulated = bits;
        true
    }

    /// Frames written since the window started (all of guest memory).
    pub fn window_count(&self) -> u64 {
        self.window.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    fn kvm_clear(&mut self, vm: &VmFd, mut bitmap: Vec<u64>) -> Result<(), Error> {
        let mut arg = kvm_clear_dirty_log { slot: SLOT, num_pages: self.pages as u32, first_page: 0, ..Default::default() };
        arg.__bindgen_anon_1.dirty_bitmap = bitmap.as_mut_ptr().cast();
        // SAFETY: `arg` names our slot and a bitmap of `pages` bits that lives until the
        // call returns; KVM only reads it.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
        self.stats.ioctls += 1;
        if ret < 0 {
            return Err(Error::Clear(std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Clears the frames (call [`Self::harvest`] first so nothing pending is lost) and
    /// makes sure the mechanism reports their next write. With the KVM bitmap this is one
    /// `KVM_CLEAR_DIRTY_LOG`, which also makes KVM re-read the guest PTEs mapping them;
    /// the ring and userfaultfd re-protected everything they reported at the harvest.
    pub fn clear(&mut self, vm: &VmFd, frames: &FrameSet) -> Result<(), Error> {
        if frames.is_empty() {
            return Ok(());
        }
        debug_assert_eq!(frames.ram_pages(), self.pages, "a frame set over this guest's RAM");
        for (acc, clear) in self.accumulated.iter_mut().zip(frames.words()) {
            *acc &= !clear;
        }
        if let Mechanism::KvmBitmap = self.mech {
            self.kvm_clear(vm, frames.words().to_vec())?;
        }
        Ok(())
    }

    /// Starts a new dirty-rate window: everything written so far is harvested, then
    /// forgotten by the window (not by `accumulated`).
    pub fn window_start(&mut self, vm: &VmFd, mem: &GuestMem) -> Result<(), Error> {
        self.harvest(vm, mem)?;
        if let Mechanism::KvmBitmap = self.mech {
            // Re-protect every frame so that the next writes show again.
            let all = vec![u64::MAX; self.accumulated.len()];
            self.kvm_clear(vm, all)?;
        }
        self.window.iter_mut().for_each(|w| *w = 0);
        Ok(())
    }
}

/// More runs than this and [`zap`] makes one round trip over all of guest RAM instead:
/// the cost stays two system calls, whatever the guest's tables look like.
const ZAP_MAX_RUNS: usize = 64;

/// Makes KVM forget every translation of the frames (an mprotect round trip on their
/// host mapping fires the MMU notifier), so the next access of any kind faults and KVM
/// re-reads the guest PTE. Needed after clearing accessed bits: read access is not
/// removed by the dirty log.
///
/// The frames come from a [`FrameSet`], so they are inside guest RAM. Whatever happens,
/// every range is given back read-write access before this returns: a failed first
/// `mprotect` may have changed part of its range, and guest RAM left read-only would end
/// the guest's next write with `KVM_RUN: Bad address`.
pub fn zap(mem: &GuestMem, frames: &FrameSet) -> Result<(), Error> {
    let runs: Vec<(u64, u64)> = frames.runs().take(ZAP_MAX_RUNS + 1).collect();
    let runs = if runs.len() > ZAP_MAX_RUNS { vec![(0, frames.ram_pages())] } else { runs };
    let mut first_error = None;
    for (pfn, count) in runs {
        let len = (count * 4096) as usize;
        let slice = mem.get_slice(GuestAddress(pfn * 4096), len).map_err(|_| Error::Zap {
            pfn,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        let host = slice.ptr_guard_mut().as_ptr();
        // SAFETY: get_slice checked that `host..host+len` lies inside one region of guest
        // RAM, an anonymous private mapping the VMM owns for the VM's whole life; read-only
        // for a moment, it is never accessed by the VMM meanwhile (we are on the vCPU
        // thread with the guest stopped).
        if unsafe { libc::mprotect(host.cast(), len, libc::PROT_READ) } != 0 {
            first_error.get_or_insert(Error::Zap { pfn, source: std::io::Error::last_os_error() });
        }
        // SAFETY: as above; this restores the mapping's original protection, also after
        // a failed (possibly partial) first call.
        if unsafe { libc::mprotect(host.cast(), len, libc::PROT_READ | libc::PROT_WRITE) } != 0 {
            return Err(Error::Restore { pfn, source: std::io::Error::last_os_error() });
        }
    }
    first_error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulated_bits_start_as_told_and_clear_per_frame() {
        let d = GpaLog::new(1 << 20, Mechanism::KvmBitmap, true);
        assert!(d.is_dirty(0) && d.is_dirty(255) && !d.is_dirty(256));
        let mut d = GpaLog::new(1 << 20, Mechanism::KvmBitmap, false);
        assert!(!d.any_dirty(0, 256));
        let n = set_bits(&mut d.accumulated, &mut d.window, &mut d.snap, d.pages, 3, 2);
        assert_eq!(n, 2);
        assert!(d.is_dirty(3) && d.is_dirty(4) && !d.is_dirty(5));
        assert!(d.any_dirty(0, 4) && !d.any_dirty(5, 100));
        assert_eq!(d.window_count(), 2);
        assert_eq!(set_bits(&mut d.accumulated, &mut d.window, &mut d.snap, d.pages, 250, 100), 6, "clipped to memory");
    }
}
