//! Guest RAM as the tracker needs it: page-table reads and edits, plain bytes (the
//! process table), the frames the VMM itself wrote, and dropping KVM's translations of
//! frames. [`GuestMem`] is the real one; [`testing::TestRam`] is plain memory, so that
//! the tracker and the pagemap rules run in unit tests without KVM.

use super::frame_set::FrameSet;
use crate::machine::memory::{self, GuestMem, Phys};
use mmu::{GuestPhysAddr, MemoryError, PhysMemory};
use vm_memory::{GuestAddress, GuestMemoryBackend};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("zapping KVM's translations of frames at {pfn:#x} failed: {source}")]
    Zap { pfn: u64, source: std::io::Error },
    #[error("giving guest RAM at frame {pfn:#x} its write access back failed: {source}")]
    Restore { pfn: u64, source: std::io::Error },
}

/// What the tracker reads and writes of guest RAM. Every address is untrusted (it comes
/// from guest page tables): implementations check it and return an error, never panic.
pub trait Ram {
    /// Bytes of RAM, from guest-physical 0.
    fn size(&self) -> u64;
    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError>;
    fn write_u64(&self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError>;
    /// Reads the 512 entries of the page-aligned table at `addr`: `Ok` only when all 512
    /// are in `out` ([`PhysMemory::read_table`]).
    fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError>;
    fn read_bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>>;
    /// Adds the frames the VMM wrote since the last call to `into`, and forgets them.
    fn take_vmm_writes(&self, into: &mut FrameSet);
    /// Makes the hypervisor forget every translation of `frames`, so that the guest's
    /// next access of any kind re-reads its PTE (needed after clearing accessed bits).
    fn zap(&self, frames: &FrameSet) -> Result<(), Error>;
}

/// A [`Ram`] as the page-table library's memory.
pub struct AsPhys<'a, R: ?Sized>(pub &'a R);

impl<R: Ram + ?Sized> PhysMemory for AsPhys<'_, R> {
    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError> {
        self.0.read_u64(addr)
    }

    fn write_u64(&mut self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        self.0.write_u64(addr, value)
    }

    fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError> {
        self.0.read_table(addr, out)
    }
}

impl Ram for GuestMem {
    fn size(&self) -> u64 {
        self.last_addr().0 + 1
    }

    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError> {
        Phys(self).read_u64(addr)
    }

    fn write_u64(&self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        Phys(self).write_u64(addr, value)
    }

    fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError> {
        Phys(self).read_table(addr, out)
    }

    fn read_bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        memory::read(self, addr, len).ok()
    }

    fn take_vmm_writes(&self, into: &mut FrameSet) {
        into.insert_words(&memory::take_vmm_writes(self));
    }

    fn zap(&self, frames: &FrameSet) -> Result<(), Error> {
        zap(self, frames)
    }
}

/// More runs than this and [`zap`] makes one round trip over all of guest RAM instead:
/// the cost stays two system calls, whatever the guest's tables look like.
const ZAP_MAX_RUNS: usize = 64;

/// Makes KVM forget every translation of the frames (an mprotect round trip on their
/// host mapping fires the MMU notifier), so the next access of any kind faults and KVM
/// re-reads the guest PTE. Read access is not removed by the dirty log.
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

/// Plain memory and a hand-driven dirty source, for unit tests of everything above the
/// machine.
#[cfg(test)]
pub mod testing {
    use super::*;
    use crate::tracking::source::{self, Cause, DirtySource, Harvested};
    use std::cell::RefCell;
    use std::sync::{Arc, Mutex};

    /// A small deterministic generator (xorshift64) for the randomized unit tests: the
    /// same seed gives the same guest, so a failure replays.
    pub struct Xorshift(pub u64);

    impl Xorshift {
        pub fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// Below `n` (not exactly uniform; enough for tests).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next_u64() % n
        }
    }

    /// RAM as a byte vector. Like guest RAM behind vm-memory, every write through it is
    /// also a "VMM write".
    pub struct TestRam {
        bytes: RefCell<Vec<u8>>,
        vmm_writes: RefCell<Vec<u64>>,
        pub zapped: RefCell<u64>,
    }

    impl TestRam {
        pub fn new(size: u64) -> TestRam {
            TestRam { bytes: RefCell::new(vec![0; size as usize]), vmm_writes: RefCell::new(Vec::new()), zapped: RefCell::new(0) }
        }

        /// A guest write (not logged as the VMM's).
        pub fn guest_write_u64(&self, addr: u64, value: u64) {
            self.bytes.borrow_mut()[addr as usize..addr as usize + 8].copy_from_slice(&value.to_le_bytes());
        }

        pub fn guest_write_bytes(&self, addr: u64, data: &[u8]) {
            self.bytes.borrow_mut()[addr as usize..addr as usize + data.len()].copy_from_slice(data);
        }

        pub fn vmm_wrote(&self, pfn: u64) {
            self.vmm_writes.borrow_mut().push(pfn);
        }

        pub fn get(&self, addr: u64) -> u64 {
            self.read_u64(GuestPhysAddr(addr)).expect("inside test RAM")
        }
    }

    impl Ram for TestRam {
        fn size(&self) -> u64 {
            self.bytes.borrow().len() as u64
        }

        fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError> {
            let b = self.bytes.borrow();
            let i = addr.0 as usize;
            if !addr.0.is_multiple_of(8) || i.checked_add(8).is_none_or(|e| e > b.len()) {
                return Err(MemoryError { addr });
            }
            Ok(u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes")))
        }

        fn write_u64(&self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
            self.read_u64(addr)?;
            self.guest_write_u64(addr.0, value);
            self.vmm_wrote(addr.0 / 4096);
            Ok(())
        }

        fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError> {
            for (i, slot) in out.iter_mut().enumerate() {
                *slot = self.read_u64(GuestPhysAddr(addr.0 + i as u64 * 8))?;
            }
            Ok(())
        }

        fn read_bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
            let b = self.bytes.borrow();
            let (s, e) = (addr as usize, (addr as usize).checked_add(len)?);
            b.get(s..e).map(<[u8]>::to_vec)
        }

        fn take_vmm_writes(&self, into: &mut FrameSet) {
            for pfn in self.vmm_writes.borrow_mut().drain(..) {
                into.insert_range(pfn, 1);
            }
        }

        fn zap(&self, frames: &FrameSet) -> Result<(), Error> {
            *self.zapped.borrow_mut() += frames.len();
            Ok(())
        }
    }

    #[derive(Default)]
    struct ManualState {
        pending: Vec<(u64, u64)>,
        overflow: bool,
        rearmed: u64,
        rearmed_all: u64,
    }

    /// A dirty source whose writes the test announces. Clones share their state.
    #[derive(Clone, Default)]
    pub struct Manual(Arc<Mutex<ManualState>>);

    impl Manual {
        /// The guest wrote `count` frames from `pfn`.
        pub fn write(&self, pfn: u64, count: u64) {
            self.0.lock().unwrap().pending.push((pfn, count));
        }

        pub fn overflow(&self) {
            self.0.lock().unwrap().overflow = true;
        }

        /// Frames re-armed so far.
        pub fn rearmed(&self) -> u64 {
            self.0.lock().unwrap().rearmed
        }

        /// Times all of RAM was re-armed.
        pub fn rearmed_all(&self) -> u64 {
            self.0.lock().unwrap().rearmed_all
        }
    }

    impl DirtySource for Manual {
        fn name(&self) -> &'static str {
            "manual"
        }

        fn harvest(&mut self, _cause: Cause, into: &mut FrameSet) -> Result<Harvested, source::Error> {
            let mut s = self.0.lock().unwrap();
            for (pfn, count) in s.pending.drain(..) {
                into.insert_range(pfn, count);
            }
            Ok(Harvested { ioctls: 0, overflowed: std::mem::take(&mut s.overflow) })
        }

        fn rearm(&mut self, frames: &FrameSet) -> Result<u64, source::Error> {
            self.0.lock().unwrap().rearmed += frames.len();
            Ok(0)
        }

        fn rearm_all(&mut self) -> Result<u64, source::Error> {
            self.0.lock().unwrap().rearmed_all += 1;
            Ok(0)
        }
    }
}
