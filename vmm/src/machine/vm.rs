//! KVM objects: the VM with its memory slot and in-kernel irqchip, and one vCPU in
//! 64-bit mode at the kernel's entry.

use crate::machine::boot;
use crate::machine::memory::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open /dev/kvm ({0}): is KVM available and are you allowed to use it?")]
    Open(kvm_ioctls::Error),
    #[error("KVM {op} failed: {source}")]
    Ioctl { op: &'static str, source: kvm_ioctls::Error },
    #[error("engine {engine} is unavailable on this host: {detail}")]
    EngineUnavailable { engine: &'static str, detail: String },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
}

fn ioctl<T>(op: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, Error> {
    r.map_err(|source| Error::Ioctl { op, source })
}

/// The VM, its vCPU and the serial interrupt line.
pub struct Machine {
    pub kvm: Kvm,
    pub vm: VmFd,
    pub vcpu: VcpuFd,
    pub serial_irq: EventFd,
    /// KVM copies regs and sregs into `kvm_run` on every exit and takes changes from
    /// there on entry (KVM_CAP_SYNC_REGS): the fault trap then needs no register ioctls.
    pub sync_regs: bool,
}

/// What dirty logging needs from KVM before the memory slots and vCPUs exist. The
/// tracking layer provides it; the machine does not know which engine runs.
pub trait DirtyLogSetup {
    /// The engine's name, for errors.
    fn name(&self) -> &'static str;
    /// VM capabilities to enable before any slot or vCPU exists.
    fn before_slots(&self, vm: &VmFd) -> Result<(), String>;
    /// Flags of the memory slots (e.g. `KVM_MEM_LOG_DIRTY_PAGES`).
    fn slot_flags(&self) -> u32;
}

const SERIAL_GSI: u32 = 4;

impl Machine {
    /// Creates the VM over `mem` and a vCPU ready to run at `entry`, with dirty logging
    /// set up as `log` says.
    pub fn new(mem: &GuestMem, entry: u64, log: &dyn DirtyLogSetup) -> Result<Machine, Error> {
        let unavailable = |detail: String| Error::EngineUnavailable { engine: log.name(), detail };
        let kvm = Kvm::new().map_err(Error::Open)?;
        let vm = ioctl("CREATE_VM", kvm.create_vm())?;
        ioctl("SET_TSS_ADDR", vm.set_tss_address(0xfffb_d000))?;
        ioctl("CREATE_IRQCHIP", vm.create_irq_chip())?;
        // Dirty logging must be configured before the slot and vCPU exist.
        log.before_slots(&vm).map_err(unavailable)?;
        let slot_flags = log.slot_flags();
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).expect("region start is inside the region");
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: slot_flags,
            };
            // SAFETY: the mapping behind `host` belongs to `mem`, which the caller keeps
            // alive for as long as the VM runs (the run owns both).
            ioctl("SET_USER_MEMORY_REGION", unsafe { vm.set_user_memory_region(region) })?;
        }
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        ioctl("IRQFD", vm.register_irqfd(&serial_irq, SERIAL_GSI))?;

        let mut vcpu = ioctl("CREATE_VCPU", vm.create_vcpu(0))?;
        let sync_regs = kvm.check_extension(Cap::SyncRegs);
        if sync_regs {
            vcpu.set_sync_valid_reg(SyncReg::Register);
            vcpu.set_sync_valid_reg(SyncReg::SystemRegister);
        }
        let cpuid = ioctl("GET_SUPPORTED_CPUID", kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES))?;
        ioctl("SET_CPUID2", vcpu.set_cpuid2(&cpuid))?;
        let sregs = ioctl("GET_SREGS", vcpu.get_sregs())?;
        ioctl("SET_SREGS", vcpu.set_sregs(&boot::long_mode_sregs(sregs)))?;
        ioctl("SET_REGS", vcpu.set_regs(&boot::entry_regs(entry)))?;
        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        ioctl("SET_FPU", vcpu.set_fpu(&fpu))?;
        Ok(Machine { kvm, vm, vcpu, serial_irq, sync_regs })
    }
}
