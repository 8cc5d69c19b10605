//! CPU plumbing: ports, control registers, GDT/TSS/IDT.
//!
//! Everything here runs in ring 0, which this host executes in KVM's instruction
//! emulator: keep it to plain general-purpose instructions.

use core::arch::asm;

pub const KERNEL_CS: u16 = 0x08;
pub const KERNEL_DS: u16 = 0x10;
pub const USER_DS: u16 = 0x18 | 3;
pub const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;

pub const IST_STACK_SIZE: usize = 16 * 1024;


const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
pub const MSR_FS_BASE: u32 = 0xc000_0100;

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: ring 0; callers write only the MSRs named above, with valid values.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags))
    }
}

/// A 32-bit port write. Not `nomem`: the request ports (sync, zero, proc) hand the VMM
/// the address of a record it reads (and answers in) during the exit, so the compiler
/// must finish the stores before and reload after.
pub fn outl(port: u16, value: u32) {
    // SAFETY: port I/O to the VMM's devices has no effect on this program's memory
    // other than the records whose addresses it passes, which their owners expect.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags)) }
}

/// Writes `bytes` to `port` with one `rep outsb` (one VM exit for the whole buffer).
pub fn outsb(port: u16, bytes: &[u8]) {
    // SAFETY: reads `bytes.len()` bytes from a valid slice; no other memory is touched.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _, inout("rcx") bytes.len() => _,
             options(nostack, preserves_flags, readonly))
    }
}

pub fn read_cr2() -> u64 {
    let v;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

pub fn read_cr3() -> u64 {
    let v;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// # Safety
/// `pml4` must be the physical address of a PML4 that maps the kernel half.
pub unsafe fn write_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the new tables map the running kernel.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack, preserves_flags)) }
}

pub fn invlpg(va: u64) {
    // SAFETY: invalidating a TLB entry is always safe.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack, preserves_flags)) }
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: interrupts are off in ring 0; hlt just stops the vCPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp: [u64; 3],
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IdtEntry {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    _zero: u32,
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

static mut GDT: [u64; 7] = [
    0,
    0x00af_9a00_0000_ffff, // kernel code, 64-bit
    0x00cf_9200_0000_ffff, // kernel data
    0x00cf_f200_0000_ffff, // user data, DPL 3
    0x00af_fa00_0000_ffff, // user code, 64-bit, DPL 3
    0,                     // TSS low (filled at boot)
    0,                     // TSS high
];

static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp: [0; 3],
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
};

static mut IDT: [IdtEntry; 256] =
    [IdtEntry { offset_low: 0, selector: 0, ist: 0, type_attr: 0, offset_mid: 0, offset_high: 0, _zero: 0 }; 256];

static mut IST1_STACK: crate::entry::Stack<IST_STACK_SIZE> = crate::entry::Stack([0; IST_STACK_SIZE]);
static mut IST2_STACK: crate::entry::Stack<IST_STACK_SIZE> = crate::entry::Stack([0; IST_STACK_SIZE]);

/// Loads our GDT, TSS and IDT. Every vector runs on IST1 (the double fault on IST2), so
/// traps from ring 3 always start on the same, empty kernel stack.
pub fn init_cpu_tables() {
    // SAFETY: runs once at boot on the only vCPU, before any trap can happen; the
    // tables are statics that live forever, as the CPU requires.
    unsafe {
        let ist1_top = (&raw const IST1_STACK) as u64 + IST_STACK_SIZE as u64;
        let ist2_top = (&raw const IST2_STACK) as u64 + IST_STACK_SIZE as u64;
        let tss = &raw mut TSS;
        (*tss).rsp[0] = ist1_top;
        (*tss).ist[0] = ist1_top;
        (*tss).ist[1] = ist2_top;

        let tss_base = tss as u64;
        let limit = (core::mem::size_of::<Tss>() - 1) as u64;
        let gdt = &raw mut GDT;
        (*gdt)[5] = (limit & 0xffff)
            | ((tss_base & 0xff_ffff) << 16)
            | (0x89 << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (((tss_base >> 24) & 0xff) << 56);
        (*gdt)[6] = tss_base >> 32;

        let gdtr = DescriptorPointer { limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16, base: gdt as u64 };
        asm!(
            "lgdt [{gdtr}]",
            "push {kcs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ds, {kds:x}",
            "mov es, {kds:x}",
            "mov ss, {kds:x}",
            "mov fs, {zero:x}",
            "mov gs, {zero:x}",
            "ltr {tss:x}",
            gdtr = in(reg) &gdtr,
            kcs = const KERNEL_CS as u64,
            kds = in(reg) KERNEL_DS as u64,
            zero = in(reg) 0u64,
            tss = in(reg) TSS_SEL as u64,
            tmp = out(reg) _,
        );

        let idt = &raw mut IDT;
        let table = &raw const crate::entry::ISR_TABLE;
        for (i, &handler) in (*table).iter().enumerate() {
            let vector = if i == 33 { 255 } else { i };
            // #PF on the current stack: ring 0 may fault on a user page (a system call
            // touching it), which must not restart IST1 under the frame in use. From
            // ring 3 it starts at rsp0, the same IST1 top as every other vector.
            let ist = match vector {
                8 => 2,
                14 => 0,
                _ => 1,
            };
            (*idt)[vector] = IdtEntry {
                offset_low: handler as u16,
                selector: KERNEL_CS,
                ist,
                type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate (clears IF)
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                _zero: 0,
            };
        }
        let idtr = DescriptorPointer { limit: (core::mem::size_of::<[IdtEntry; 256]>() - 1) as u16, base: idt as u64 };
        asm!("lidt [{}]", in(reg) &idtr, options(nostack));
    }
    // Linux programs' `syscall`: on our hosts it jumps to LSTAR still in ring 3, where
    // the gate's `ud2` traps (the VMM enabled EFER.SCE). STAR as Linux sets it, should
    // a CPU honour it; SFMASK 0 leaves the flags alone for the one instruction.
    wrmsr(MSR_STAR, (u64::from(USER_DS - 8) << 48) | (u64::from(KERNEL_CS) << 32));
    wrmsr(MSR_LSTAR, crate::entry::linux_gate());
    wrmsr(MSR_SFMASK, 0);
}
