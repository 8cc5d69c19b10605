//! Little-endian fields of guest structures read as bytes (the process table, a Linux
//! program's ELF, the requests and descriptions the guest kernel sends). The caller
//! has checked the slice's length: a field outside it is our bug, and panics.

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes in bounds"))
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes in bounds"))
}
