//! Assembly edges: the boot entry, the exception/interrupt stubs and the return to ring 3.
//!
//! Every vector enters through a stub that pushes a uniform [`TrapFrame`] on the IST1
//! stack and calls [`crate::trap::dispatch`]; dispatch may overwrite the frame with another
//! process's saved frame, which is how a context switch happens (one kernel stack, since
//! ring 0 never blocks and runs with interrupts off).

use core::arch::global_asm;

/// Registers saved on every trap, lowest address first (the order the stubs push them).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

pub const BOOT_STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
pub struct Stack<const N: usize>(pub [u8; N]);

#[no_mangle]
static mut BOOT_STACK: Stack<BOOT_STACK_SIZE> = Stack([0; BOOT_STACK_SIZE]);

global_asm!(
    r#"
.section .text.entry, "ax"
.global _start
_start:
    cli
    lea rsp, [rip + BOOT_STACK + {boot_stack_size}]
    xor rbp, rbp
    call {kmain}
2:  hlt
    jmp 2b

.macro ISR_NOERR vec
.global isr\vec
isr\vec:
    push 0
    push \vec
    jmp trap_common
.endm

.macro ISR_ERR vec
.global isr\vec
isr\vec:
    push \vec
    jmp trap_common
.endm

ISR_NOERR 0
ISR_NOERR 1
ISR_NOERR 2
ISR_NOERR 3
ISR_NOERR 4
ISR_NOERR 5
ISR_NOERR 6
ISR_NOERR 7
ISR_ERR 8
ISR_NOERR 9
ISR_ERR 10
ISR_ERR 11
ISR_ERR 12
ISR_ERR 13
ISR_ERR 14
ISR_NOERR 15
ISR_NOERR 16
ISR_ERR 17
ISR_NOERR 18
ISR_NOERR 19
ISR_NOERR 20
ISR_ERR 21
ISR_NOERR 22
ISR_NOERR 23
ISR_NOERR 24
ISR_NOERR 25
ISR_NOERR 26
ISR_NOERR 27
ISR_NOERR 28
ISR_ERR 29
ISR_ERR 30
ISR_NOERR 31
ISR_NOERR 32
ISR_NOERR 255

trap_common:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    cld
    mov rdi, rsp
    call {dispatch}
trap_return:
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    iretq

.global enter_user
enter_user:
    mov rsp, rdi
    jmp trap_return

// Where `syscall` lands (LSTAR), in user-executable text: the #UD it raises is a Linux
// program's system call (crate::linux::syscall).
.balign 16
.global linux_syscall_gate
linux_syscall_gate:
    ud2

.section .rodata
.global ISR_TABLE
.balign 8
ISR_TABLE:
    .quad isr0, isr1, isr2, isr3, isr4, isr5, isr6, isr7
    .quad isr8, isr9, isr10, isr11, isr12, isr13, isr14, isr15
    .quad isr16, isr17, isr18, isr19, isr20, isr21, isr22, isr23
    .quad isr24, isr25, isr26, isr27, isr28, isr29, isr30, isr31
    .quad isr32, isr255
"#,
    boot_stack_size = const BOOT_STACK_SIZE,
    kmain = sym crate::kmain,
    dispatch = sym crate::trap::dispatch,
);

extern "C" {
    /// Stub addresses for vectors 0..=32, then 255.
    pub static ISR_TABLE: [u64; 34];
    /// Loads `frame` into the registers and `iretq`s into it.
    fn enter_user(frame: *const TrapFrame) -> !;
    static linux_syscall_gate: u8;
}

/// The address `syscall` jumps to (LSTAR).
pub fn linux_gate() -> u64 {
    (&raw const linux_syscall_gate) as u64
}

/// Starts running `frame` (a ring-3 frame). Never returns.
pub fn start(frame: &TrapFrame) -> ! {
    // SAFETY: `frame` is a complete, valid ring-3 frame built by the process module;
    // `enter_user` only reads it and never returns to this stack.
    unsafe { enter_user(frame) }
}
