//! The memory intrinsics the compiler calls. The host target's `core` does not provide
//! them; these use `rep movsb`/`rep stosb`, which the emulator supports in ring 0 and
//! which are fast natively in ring 3. Written in asm so the compiler cannot turn them
//! back into calls to themselves.

use core::arch::asm;

/// # Safety
/// Standard `memcpy` contract: valid, non-overlapping regions of `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both regions are valid for `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dest => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memmove` contract: valid regions of `n` bytes, possibly overlapping.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest is below src or the regions are disjoint.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copy backwards (DF=1) for an overlapping dest above src; DF is restored.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, inout("rcx") n => _,
             options(nostack))
    };
    dest
}

/// # Safety
/// Standard `memset` contract: `dest` valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `dest` is valid for `n` bytes.
    unsafe {
        asm!("rep stosb", inout("rdi") dest => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags))
    };
    dest
}

/// # Safety
/// Standard `memcmp` contract: both regions valid for `n` bytes.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: i < n and both regions are valid for n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As `memcmp`.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
