//! Guest RAM: one anonymous mapping at guest-physical 0, through `vm-memory`.

use mmu::{GuestPhysAddr, MemoryError, PhysMemory};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Guest RAM with vm-memory's dirty bitmap: every write the VMM makes through it
/// (loading, boot tables, zeroing frames, editing PTEs) is recorded, since KVM does not
/// log them.
pub type GuestMem = GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest: kernel, tables and a little room for processes.
pub const MIN_MEM_BYTES: u64 = 16 << 20;

/// Takes the bitmap of pages the VMM wrote since the last call (one bit per 4 KiB page
/// from guest-physical 0), resetting it.
pub fn take_vmm_writes(mem: &GuestMem) -> Vec<u64> {
    let mut out = Vec::new();
    for region in mem.iter() {
        // One region at guest-physical 0 (see `create`): its bits are the frames'.
        out.extend(std::ops::Deref::deref(region).bitmap().get_and_reset());
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The size is checked by the caller; this is the mmap failing.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate { mib: u64, source: vm_memory::mmap::FromRangesError },
    #[error("guest memory access at {addr:#x} (+{len}) is outside guest memory")]
    OutOfRange { addr: u64, len: usize },
}

pub fn create(bytes: u64) -> Result<GuestMem, Error> {
    GuestMem::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|source| Error::Allocate { mib: bytes >> 20, source })
}

/// Reads `len` bytes at `addr` (untrusted address: checked).
pub fn read(mem: &GuestMem, addr: u64, len: usize) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0; len];
    mem.read_slice(&mut buf, GuestAddress(addr)).map_err(|_| Error::OutOfRange { addr, len })?;
    Ok(buf)
}

/// Runs `f` on guest memory `[addr, addr + len)` in place, without a copy (for bulk
/// reads such as snapshots). Only while the guest is stopped: call it on the vCPU
/// thread between `KVM_RUN`s.
pub fn with_stopped_guest_bytes<R>(mem: &GuestMem, addr: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R, Error> {
    let slice = mem.get_slice(GuestAddress(addr), len).map_err(|_| Error::OutOfRange { addr, len })?;
    let guard = slice.ptr_guard();
    // SAFETY: get_slice checked that the range lies inside one mapping, which lives as
    // long as `mem`. The guest's only vCPU is stopped (the caller runs on its thread
    // between KVM_RUNs) and no VMM thread writes guest memory meanwhile, so the bytes
    // do not change while `f` borrows them.
    let bytes = unsafe { std::slice::from_raw_parts(guard.as_ptr(), len) };
    Ok(f(bytes))
}

/// Bytes of guest RAM (one region from guest-physical 0).
pub fn size(mem: &GuestMem) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

pub fn write(mem: &GuestMem, addr: u64, bytes: &[u8]) -> Result<(), Error> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|_| Error::OutOfRange { addr, len: bytes.len() })
}

/// Runs `f` on guest memory `[addr, addr + len)` in place, to write it without a copy
/// (filling fresh memory from a stream). Only while no vCPU runs and no other VMM
/// thread touches guest memory: before the guest first runs, or on the vCPU thread
/// between `KVM_RUN`s.
pub fn with_stopped_guest_bytes_mut<R>(mem: &GuestMem, addr: u64, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Result<R, Error> {
    let slice = mem.get_slice(GuestAddress(addr), len).map_err(|_| Error::OutOfRange { addr, len })?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: get_slice checked that the range lies inside one mapping, which lives as
    // long as `mem`. By this function's contract nothing else reads or writes guest
    // memory while `f` holds the only reference to these bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), len) };
    Ok(f(bytes))
}

/// Backs `[addr, addr + len)` of guest RAM with memory now, in one call
/// (`MADV_POPULATE_WRITE`), before it is written in bulk: first touches one page at a
/// time cost a user page fault each, which under nested virtualization here is a trip
/// through the host. Best effort: a kernel without it (or a range outside RAM) leaves
/// the pages to be faulted in by the write, as before.
pub fn populate(mem: &GuestMem, addr: u64, len: usize) {
    let Ok(slice) = mem.get_slice(GuestAddress(addr), len) else { return };
    let host = slice.ptr_guard_mut().as_ptr();
    // SAFETY: get_slice checked that the range lies inside one region of guest RAM, a
    // private anonymous mapping that lives as long as `mem`; populating it changes no
    // byte (new pages read as zero, present ones are left alone).
    unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
}

/// Splits `bytes` (whole 4 KiB pages) into runs of all-zero and of other pages:
/// `(first page index, page count, all zero)`, in order. Each page is looked at once, a
/// word at a time.
pub fn zero_runs(bytes: &[u8]) -> Vec<(usize, usize, bool)> {
    let zero: Vec<bool> = bytes
        .chunks_exact(4096)
        .map(|p| p.chunks_exact(8).all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0))
        .collect();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < zero.len() {
        let mut j = i + 1;
        while j < zero.len() && zero[j] == zero[i] {
            j += 1;
        }
        runs.push((i, j - i, zero[i]));
        i = j;
    }
    runs
}

/// Guest memory as the page-table library sees it.
pub struct Phys<'a>(pub &'a GuestMem);

impl PhysMemory for Phys<'_> {
    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError> {
        if !addr.0.is_multiple_of(8) {
            return Err(MemoryError { addr });
        }
        self.0.read_obj::<u64>(GuestAddress(addr.0)).map_err(|_| MemoryError { addr })
    }

    fn write_u64(&mut self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        if !addr.0.is_multiple_of(8) {
            return Err(MemoryError { addr });
        }
        self.0.write_obj(value, GuestAddress(addr.0)).map_err(|_| MemoryError { addr })
    }

    fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError> {
        if !addr.0.is_multiple_of(4096) {
            return Err(MemoryError { addr });
        }
        // One copy straight into `out` (walks read many tables; a bounce buffer doubled
        // the cost of a scan's reads). read_slice fails unless it filled all of `bytes`.
        {
            // SAFETY: `out` is 512 u64s, 4096 initialized bytes with no padding; `bytes`
            // is its only access until this block ends, and every byte pattern is a valid
            // u64.
            let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), 4096) };
            self.0.read_slice(bytes, GuestAddress(addr.0)).map_err(|_| MemoryError { addr })?;
        }
        // Guest entries are little-endian (a no-op on x86 hosts).
        for slot in out.iter_mut() {
            *slot = u64::from_le(*slot);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_runs_split_pages_in_order() {
        let mut b = vec![0u8; 5 * 4096];
        b[4096 + 4095] = 1;
        b[2 * 4096] = 7;
        assert_eq!(super::zero_runs(&b), vec![(0, 1, true), (1, 2, false), (3, 2, true)]);
        assert!(super::zero_runs(&[]).is_empty());
    }
}
