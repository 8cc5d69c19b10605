//! Catching guest page faults before the guest sees them: a hardware execute
//! breakpoint (DR0, via `KVM_SET_GUEST_DEBUG`) on the first instruction of the guest's
//! #PF handler (IDT vector 14) exits to the VMM with the exception frame already pushed.
//! The VMM then either fixes the fault and emulates the handler's `iretq` (the guest
//! never runs its handler), or lets the guest handle its own fault.

use crate::machine::memory::{GuestMem, Phys};
use kvm_bindings::{kvm_guest_debug, kvm_regs, kvm_sregs, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP};
use kvm_ioctls::{SyncReg, VcpuFd};
use mmu::{Cr3, GuestPhysAddr, GuestVirtAddr, PhysMemory, Translation, Walker};

/// RFLAGS.RF: would suppress the breakpoint for one instruction, but the instruction
/// emulator that runs guest ring 0 here ignores it; see [`step_over_handler_entry`].
const RF: u64 = 1 << 16;
/// End of the user half of a 4-level address space.
const USER_HALF_END: u64 = 0x0000_8000_0000_0000;
/// DR7: L0 (DR0 enabled, execute, 1 byte) plus the always-one bit 10.
const DR7_EXEC_DR0: u64 = (1 << 10) | 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read guest {what} at virtual {va:#x}: not mapped or outside guest memory")]
    Unmapped { what: &'static str, va: u64 },
    #[error("the guest's IDT has no present handler for page faults (vector 14)")]
    NoHandler,
    #[error("KVM {op} failed: {source}")]
    Kvm { op: &'static str, source: kvm_ioctls::Error },
}

fn kvm<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Kvm { op, source })
}

/// Reads a u64 at a guest-virtual address through the tables at `cr3`.
pub fn read_virt(mem: &GuestMem, walker: &Walker, cr3: u64, va: u64, what: &'static str) -> Result<u64, Error> {
    let phys = Phys(mem);
    let err = || Error::Unmapped { what, va };
    match walker.translate(&phys, Cr3(cr3).table(), GuestVirtAddr(va)).map_err(|_| err())? {
        Translation::Mapped { frame, offset, .. } if offset % 8 == 0 => {
            phys.read_u64(GuestPhysAddr(frame.0 + offset)).map_err(|_| err())
        }
        _ => Err(err()),
    }
}

/// Reads `out.len()` consecutive u64s at guest-virtual `va`: one translation for the
/// words inside one page (an exception frame nearly always is), one per word otherwise.
pub fn read_virt_words(mem: &GuestMem, walker: &Walker, cr3: u64, va: u64, out: &mut [u64], what: &'static str)
    -> Result<(), Error> {
    let phys = Phys(mem);
    let len = 8 * out.len() as u64;
    if let Ok(Translation::Mapped { frame, offset, leaf }) = walker.translate(&phys, Cr3(cr3).table(), GuestVirtAddr(va)) {
        if offset % 8 == 0 && offset + len <= leaf.size.bytes() {
            for (i, w) in out.iter_mut().enumerate() {
                let a = GuestPhysAddr(frame.0 + offset + 8 * i as u64);
                *w = phys.read_u64(a).map_err(|_| Error::Unmapped { what, va: va + 8 * i as u64 })?;
            }
            return Ok(());
        }
    }
    for (i, w) in out.iter_mut().enumerate() {
        *w = read_virt(mem, walker, cr3, va + 8 * i as u64, what)?;
    }
    Ok(())
}

/// The address of the guest's #PF handler, from its IDT.
pub fn find_handler(mem: &GuestMem, walker: &Walker, sregs: &kvm_sregs) -> Result<u64, Error> {
    if u64::from(sregs.idt.limit) < 14 * 16 + 15 {
        return Err(Error::NoHandler);
    }
    let entry = sregs.idt.base + 14 * 16;
    let lo = read_virt(mem, walker, sregs.cr3, entry, "IDT")?;
    let hi = read_virt(mem, walker, sregs.cr3, entry + 8, "IDT")?;
    if lo & (1 << 47) == 0 {
        return Err(Error::NoHandler);
    }
    Ok((lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32))
}

/// Puts the breakpoint on `handler`.
pub fn arm(vcpu: &VcpuFd, handler: u64) -> Result<(), Error> {
    let mut dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, ..Default::default() };
    dbg.arch.debugreg[0] = handler;
    dbg.arch.debugreg[7] = DR7_EXEC_DR0;
    kvm("SET_GUEST_DEBUG", vcpu.set_guest_debug(&dbg))
}

/// The page fault as the CPU delivered it.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    pub error: u64,
    pub addr: u64,
    pub cr3: Cr3,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Fault {
    pub const PRESENT: u64 = 1;
    pub const WRITE: u64 = 2;
    pub const USER: u64 = 4;

    /// A write to a present page of the user half, by ring 3 or by ring 0 on the
    /// process's behalf (a system call storing its result in the program's memory): the
    /// only kinds the soft-dirty engine causes. (Ring 0 writing a user page is a write
    /// to it, as Linux's copy_to_user is: it sets soft-dirty.)
    pub fn is_user_write_protection(&self) -> bool {
        let by_user = self.error & 0xf == Self::PRESENT | Self::WRITE | Self::USER && self.cs & 3 == 3;
        let for_user = self.error & 0xf == Self::PRESENT | Self::WRITE && self.cs & 3 == 0 && self.addr < USER_HALF_END;
        by_user || for_user
    }
}

/// The registers at the trap, and the fault they describe.
pub struct Stopped {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fault: Fault,
}

/// Reads the exception frame the CPU pushed (error code, rip, cs, rflags, rsp, ss).
/// With `sync_regs`, the registers come from `kvm_run` (no ioctl).
pub fn stopped(vcpu: &VcpuFd, mem: &GuestMem, walker: &Walker, sync_regs: bool) -> Result<Stopped, Error> {
    let (regs, sregs) = if sync_regs {
        let s = vcpu.sync_regs();
        (s.regs, s.sregs)
    } else {
        (kvm("GET_REGS", vcpu.get_regs())?, kvm("GET_SREGS", vcpu.get_sregs())?)
    };
    let mut w = [0u64; 6];
    read_virt_words(mem, walker, sregs.cr3, regs.rsp, &mut w, "exception frame")?;
    let fault = Fault { error: w[0], addr: sregs.cr2, cr3: Cr3(sregs.cr3), rip: w[1], cs: w[2], rflags: w[3], rsp: w[4], ss: w[5] };
    Ok(Stopped { regs, sregs, fault })
}

/// Emulates the handler's `iretq`: the faulting instruction runs again, in the ring it
/// faulted in. From ring 3 the user segments come back (flat 64-bit, the guest
/// profile's GDT); from ring 0 (a system call writing a user page) the handler's entry
/// is already in the faulting ring's segments, so only rip, rsp and the flags change.
/// With `sync_regs`, the new registers go through `kvm_run` and KVM applies them on the
/// next entry.
pub fn return_to_user(vcpu: &mut VcpuFd, mut s: Stopped, sync_regs: bool) -> Result<(), Error> {
    let from_user = s.fault.cs & 3 == 3;
    s.regs.rip = s.fault.rip;
    s.regs.rsp = s.fault.rsp;
    s.regs.rflags = s.fault.rflags & !RF;
    if from_user {
        s.sregs.cs = crate::machine::boot::flat_segment(s.fault.cs as u16, true, 3);
        s.sregs.ss = crate::machine::boot::flat_segment(s.fault.ss as u16, false, 3);
    }
    if sync_regs {
        let run = vcpu.sync_regs_mut();
        run.regs = s.regs;
        if from_user {
            run.sregs = s.sregs;
            vcpu.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        vcpu.set_sync_dirty_reg(SyncReg::Register);
        return Ok(());
    }
    if from_user {
        kvm("SET_SREGS", vcpu.set_sregs(&s.sregs))?;
    }
    kvm("SET_REGS", vcpu.set_regs(&s.regs))
}

/// Lets the guest's handler run: the breakpoint is replaced by a single step over the
/// handler's first instruction (the caller re-arms on the step's debug exit). Resuming
/// with RFLAGS.RF would be cheaper, but KVM's instruction emulator, which runs guest
/// ring 0 on our hosts, ignores RF and the breakpoint fires again forever.
pub fn step_over_handler_entry(vcpu: &VcpuFd) -> Result<(), Error> {
    let dbg = kvm_guest_debug { control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, ..Default::default() };
    kvm("SET_GUEST_DEBUG", vcpu.set_guest_debug(&dbg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(error: u64, cs: u64, addr: u64) -> Fault {
        Fault { error, addr, cr3: Cr3(0x1000), rip: 0, cs, rflags: 2, rsp: 0, ss: 0 }
    }

    /// A stack whose two pages map frames far apart: a frame read inside one page and
    /// one across the boundary both read what the guest sees.
    #[test]
    fn exception_frames_read_the_same_inside_a_page_and_across_two() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::machine::memory::create(1 << 20).unwrap();
        let pwu = 0b111u64;
        // PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; va 0x0 -> 0x9000, va 0x1000 -> 0x6000.
        for (at, v) in [(0x1000, 0x2000 | pwu), (0x2000, 0x3000 | pwu), (0x3000, 0x4000 | pwu), (0x4000, 0x9000 | pwu),
            (0x4008, 0x6000 | pwu)] {
            mem.write_obj::<u64>(v, GuestAddress(at)).unwrap();
        }
        for i in 0..512u64 {
            mem.write_obj::<u64>(0x9000_0000 + i, GuestAddress(0x9000 + 8 * i)).unwrap();
            mem.write_obj::<u64>(0x6000_0000 + i, GuestAddress(0x6000 + 8 * i)).unwrap();
        }
        let w = Walker::new(mmu::PagingMode::Level4);
        let mut inside = [0u64; 6];
        read_virt_words(&mem, &w, 0x1000, 0x100, &mut inside, "exception frame").unwrap();
        assert_eq!(inside, [0x9000_0020, 0x9000_0021, 0x9000_0022, 0x9000_0023, 0x9000_0024, 0x9000_0025]);
        let mut across = [0u64; 6];
        read_virt_words(&mem, &w, 0x1000, 0x1000 - 16, &mut across, "exception frame").unwrap();
        assert_eq!(across, [0x9000_01fe, 0x9000_01ff, 0x6000_0000, 0x6000_0001, 0x6000_0002, 0x6000_0003]);
        let e = read_virt_words(&mem, &w, 0x1000, 0x2000 - 16, &mut across, "exception frame").unwrap_err();
        assert!(e.to_string().contains("exception frame at virtual 0x2000"), "{e}");
    }

    #[test]
    fn the_engine_takes_writes_to_present_user_pages_by_ring_3_or_by_ring_0_for_it() {
        let (p, w, u) = (Fault::PRESENT, Fault::WRITE, Fault::USER);
        assert!(fault(p | w | u, 0x23, 0x40_0000).is_user_write_protection());
        assert!(fault(p | w, 0x08, 0x40_0000).is_user_write_protection(), "a system call storing into the program");
        assert!(!fault(p | w, 0x08, 0xffff_8880_0000_0000).is_user_write_protection(), "the kernel's own data");
        assert!(!fault(p | u, 0x23, 0x40_0000).is_user_write_protection(), "a read");
        assert!(!fault(w | u, 0x23, 0x40_0000).is_user_write_protection(), "a page not present");
        assert!(!fault(p | w | u, 0x08, 0x40_0000).is_user_write_protection(), "USER with ring 0 is not a fault the CPU makes");
    }
}
