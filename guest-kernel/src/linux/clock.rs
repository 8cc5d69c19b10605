//! Linux programs' clocks: the guest TSC, at the rate and from the wall-clock time
//! the VMM wrote into the boot info. No timer interrupts are counted (ring 0 is
//! emulated here: ticks would cost). A guest restored from a snapshot or migrated keeps
//! the boot time of the VMM that booted it.

use crate::global::Global;

struct Clock {
    tsc_khz: u64,
    boot_unix_ns: u64,
    boot_tsc: u64,
}

static CLOCK: Global<Clock> = Global::new(Clock { tsc_khz: 0, boot_unix_ns: 0, boot_tsc: 0 });

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading the time-stamp counter has no side effects.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// At boot: the rate (kHz; 0 if the VMM did not know it) and the wall-clock time then.
pub fn init(tsc_khz: u64, boot_unix_ns: u64) {
    // SAFETY: ring 0 at boot, no other reference.
    unsafe { *CLOCK.get() = Clock { tsc_khz, boot_unix_ns, boot_tsc: rdtsc() } };
}

/// Nanoseconds since boot (0 forever if the rate is unknown).
pub fn since_boot_ns() -> u64 {
    // SAFETY: ring 0; read only.
    let c = unsafe { CLOCK.get() };
    if c.tsc_khz == 0 {
        return 0;
    }
    let cycles = rdtsc().wrapping_sub(c.boot_tsc);
    (cycles / c.tsc_khz) * 1_000_000 + (cycles % c.tsc_khz) * 1_000_000 / c.tsc_khz
}

/// Nanoseconds since the Unix epoch.
pub fn realtime_ns() -> u64 {
    // SAFETY: ring 0; read only.
    let boot = unsafe { CLOCK.get() }.boot_unix_ns;
    boot + since_boot_ns()
}
