//! The local APIC timer in one-shot mode, re-armed on every tick (on this host the
//! periodic mode bit does not stick).

use guest_abi::LAPIC_VIRT;

const TPR: u64 = 0x80;
const EOI: u64 = 0xb0;
const SVR: u64 = 0xf0;
const LVT_TIMER: u64 = 0x320;
const INITIAL_COUNT: u64 = 0x380;
const DIVIDE: u64 = 0x3e0;

pub const TIMER_VECTOR: u32 = 32;
pub const SPURIOUS_VECTOR: u32 = 255;
/// KVM's APIC timer counts at 1 GHz: 10 ms slices keep the (emulated, ~1 us per
/// instruction) scheduler's cost around 1% of run time.
const TICK_COUNT: u32 = 10_000_000;

fn write(reg: u64, value: u32) {
    // SAFETY: LAPIC_VIRT maps the local APIC's register page (uncached) in the kernel half.
    unsafe { ((LAPIC_VIRT + reg) as *mut u32).write_volatile(value) }
}

pub fn init() {
    write(TPR, 0);
    write(SVR, 0x100 | SPURIOUS_VECTOR);
    write(DIVIDE, 0xb); // divide by 1
    write(LVT_TIMER, TIMER_VECTOR); // one-shot
    arm();
}

pub fn arm() {
    write(INITIAL_COUNT, TICK_COUNT);
}

pub fn eoi() {
    write(EOI, 0);
}
