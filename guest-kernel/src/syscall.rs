//! System calls from the ring-3 runtime (numbers and calling convention in
//! [`guest_abi::syscall`]).

use crate::console;
use crate::entry::TrapFrame;
use crate::global::Global;
use crate::{arch, frames, mm, process};
use guest_abi::mapping_flags::{HUGE, READ_ONLY, SHARED};
use guest_abi::syscall::{EXIT, MAP, PROTECT, SYNC, UNMAP, WRITE, YIELD};
use guest_abi::{SyncRecord, SCRIPT_VIRT, SYNC_LABEL_MAX, SYNC_PORT};

const ENOSYS: i64 = 38;
const EFAULT: i64 = 14;
const MAX_WRITE: u64 = 512;

static SYNC_RECORD: Global<SyncRecord> = Global::new(SyncRecord { pid: 0, label_len: 0, label: [0; SYNC_LABEL_MAX] });

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Bytes the runtime may hand to the kernel: its own image (stacks, string constants)
/// or the script. The runtime is our code, but a bad pointer must not crash ring 0.
fn user_bytes(ptr: u64, len: u64, max: u64) -> Result<&'static [u8], i64> {
    let (start, end) = (&raw const __image_start as u64, &raw const __image_end as u64);
    let in_image = ptr >= start && len <= max && ptr.checked_add(len).is_some_and(|e| e <= end);
    let in_script = ptr >= SCRIPT_VIRT && len <= max && ptr.checked_add(len).is_some_and(|e| e <= SCRIPT_VIRT + (1 << 20));
    if !(in_image || in_script) {
        return Err(EFAULT);
    }
    // SAFETY: the range lies inside the kernel image or the script mapping, both mapped
    // in every address space.
    Ok(unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) })
}

/// Reports a `sync` of the current process with `label` (at most [`SYNC_LABEL_MAX`]
/// bytes) to the VMM, which may pause the VM there.
pub fn sync(label: &[u8]) {
    // SAFETY: ring 0, no other reference to the record.
    let rec = unsafe { SYNC_RECORD.get() };
    rec.pid = process::current_pid();
    rec.label_len = label.len() as u32;
    rec.label[..label.len()].copy_from_slice(label);
    arch::outl(SYNC_PORT, frames::kernel_phys(rec as *const SyncRecord) as u32);
}

pub fn handle(frame: &mut TrapFrame) {
    let (a, b, c) = (frame.rdi, frame.rsi, frame.rdx);
    let result: Result<(), i64> = match frame.rax {
        EXIT => return process::exit_current(frame, (a & 0xff) as u32, false),
        YIELD => {
            frame.rax = 0;
            return process::switch_next(frame);
        }
        WRITE => user_bytes(a, b, MAX_WRITE).map(console::write),
        MAP => {
            let flags = (c as u32) & (HUGE | READ_ONLY | SHARED);
            let serial = process::next_serial();
            process::update(|slot, zero| mm::map(slot, a, b, flags, serial, zero))
        }
        UNMAP => process::update(|slot, zero| mm::unmap(slot, a, b, zero)),
        PROTECT => process::update(|slot, zero| mm::protect(slot, a, b, c != 0, zero)),
        SYNC => user_bytes(a, b, SYNC_LABEL_MAX as u64).map(sync),
        _ => Err(ENOSYS),
    };
    frame.rax = match result {
        Ok(()) => 0,
        Err(errno) => (-errno) as u64,
    };
}
