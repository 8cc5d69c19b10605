//! Ring 0 touching a Linux program's memory: each page is first made present as the
//! program's own access would make it (or the call fails with `EFAULT` where the
//! program would have been killed), so ring 0 never takes a fault it cannot handle.

use crate::frames::PAGE;
use crate::mm::{self, EFAULT};
use crate::process;
use workload::USER_TOP;

/// Checks that `[addr, addr + len)` is in the user half and makes its pages present
/// (writable if `write`).
pub fn ensure(addr: u64, len: u64, write: bool) -> Result<(), i64> {
    if len == 0 {
        return Ok(());
    }
    let end = addr.checked_add(len).filter(|&e| e <= USER_TOP).ok_or(EFAULT)?;
    let mut page = addr & !(PAGE - 1);
    while page < end {
        process::update(|slot, zero| mm::populate(slot, page, write, zero))?;
        page += PAGE;
    }
    Ok(())
}

/// The program's bytes `[addr, addr + len)`, made present.
pub fn bytes(addr: u64, len: u64) -> Result<&'static [u8], i64> {
    ensure(addr, len, false)?;
    // SAFETY: every page of the range is present in the current process's tables
    // (which stay loaded until ring 0 returns to it) and lies in the user half; ring 0
    // runs alone on the only vCPU, so nothing changes the bytes while they are read.
    Ok(unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) })
}

/// The program's NUL-terminated string at `addr`, without the NUL: at most `max`
/// bytes (`ENAMETOOLONG` beyond), read page by page so that a short string at the end
/// of a mapping is fine.
pub fn c_string(addr: u64, max: u64) -> Result<&'static [u8], i64> {
    const ENAMETOOLONG: i64 = 36;
    let mut len = 0u64;
    loop {
        let at = addr.checked_add(len).ok_or(EFAULT)?;
        let chunk = (PAGE - at % PAGE).min(max + 1 - len);
        if let Some(i) = bytes(at, chunk)?.iter().position(|&c| c == 0) {
            return bytes(addr, len + i as u64);
        }
        len += chunk;
        if len > max {
            return Err(ENAMETOOLONG);
        }
    }
}

/// The program's u64 at `addr` (8-byte aligned or not).
pub fn read_u64(addr: u64) -> Result<u64, i64> {
    let b = bytes(addr, 8)?;
    Ok(u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
}

/// Stores `data` into the program's memory at `addr`: a write by the program, as
/// Linux's copy_to_user is (its pages become written, soft-dirty; under the pte
/// engine the hypervisor catches ring 0's write like the program's own).
pub fn write_bytes(addr: u64, data: &[u8]) -> Result<(), i64> {
    ensure(addr, data.len() as u64, true)?;
    // SAFETY: every page of the range is present and writable in the current process
    // (its mapping allows writing: `ensure` checked), which stays loaded until ring 0
    // returns to it; a hypervisor write-protection fault is resolved before ring 0 goes on.
    unsafe {
        core::arch::asm!("rep movsb", inout("rdi") addr => _, inout("rsi") data.as_ptr() => _, inout("rcx") data.len() => _,
            options(nostack, preserves_flags));
    }
    Ok(())
}

pub fn write_u64(addr: u64, v: u64) -> Result<(), i64> {
    write_bytes(addr, &v.to_le_bytes())
}
