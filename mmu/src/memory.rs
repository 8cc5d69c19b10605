//! The one thing the walker needs from guest memory.

use crate::addr::GuestPhysAddr;
use alloc::vec::Vec;
use core::fmt;

/// A guest-physical access that fell outside guest memory or was misaligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryError {
    pub addr: GuestPhysAddr,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest-physical address {} is outside guest memory or not 8-byte aligned", self.addr)
    }
}

/// Reads and writes 8-byte little-endian words of guest-physical memory.
/// Implementations must bounds-check every access.
pub trait PhysMemory {
    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError>;
    fn write_u64(&mut self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError>;

    /// Reads the 512 entries of the page-aligned table at `addr`: `Ok` only when all
    /// 512 are in `out` (walks reuse `out` from table to table, so a partial read would
    /// leave another table's entries). Implementations backed by real memory should
    /// override this with one bulk copy: walks read whole tables, and per-entry accesses
    /// dominate their cost otherwise.
    fn read_table(&self, addr: GuestPhysAddr, out: &mut [u64; 512]) -> Result<(), MemoryError> {
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.read_u64(GuestPhysAddr(addr.0 + i as u64 * 8))?;
        }
        Ok(())
    }
}

/// Guest memory as a plain byte buffer starting at physical 0 (tests, fuzzing).
#[derive(Debug, Clone)]
pub struct SliceMemory {
    bytes: Vec<u8>,
}

impl SliceMemory {
    pub fn new(bytes: Vec<u8>) -> Self {
        SliceMemory { bytes }
    }

    /// Writes `value` at `addr`; panics if out of range (test setup only).
    pub fn set(&mut self, addr: u64, value: u64) {
        self.write_u64(GuestPhysAddr(addr), value).expect("SliceMemory::set out of range");
    }

    pub fn get(&self, addr: u64) -> u64 {
        self.read_u64(GuestPhysAddr(addr)).expect("SliceMemory::get out of range")
    }

    fn range(&self, addr: GuestPhysAddr) -> Result<core::ops::Range<usize>, MemoryError> {
        let start = usize::try_from(addr.0).map_err(|_| MemoryError { addr })?;
        let end = start.checked_add(8).ok_or(MemoryError { addr })?;
        if !addr.0.is_multiple_of(8) || end > self.bytes.len() {
            return Err(MemoryError { addr });
        }
        Ok(start..end)
    }
}

impl PhysMemory for SliceMemory {
    fn read_u64(&self, addr: GuestPhysAddr) -> Result<u64, MemoryError> {
        let r = self.range(addr)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes[r]);
        Ok(u64::from_le_bytes(b))
    }

    fn write_u64(&mut self, addr: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        let r = self.range(addr)?;
        self.bytes[r].copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}
