//! The vCPU's and the VM's own state: KVM's structs, saved byte for byte as named
//! sections (`[u32 name length][name][u64 length][bytes]`...), and put back into a new VM.

use super::{invalid, kvm, Error};
use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use std::collections::BTreeMap;
use std::path::Path;

/// MSRs saved besides what the sregs carry: APIC base, TSC, kernel GS base, and the
/// `syscall` MSRs (STAR, LSTAR, SFMASK), which a Linux program's system calls go
/// through: a restored or migrated program would otherwise jump to 0 at its next one.
const MSRS: [u32; 6] = [0x1b, 0x10, 0xc000_0102, 0xc000_0081, 0xc000_0082, 0xc000_0084];

/// Bytes of a plain-data KVM struct.
fn pod<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is one of KVM's repr(C) integer structs; reading its bytes is defined.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }.to_vec()
}

/// A plain-data KVM struct back from bytes (size-checked; any bit pattern is valid).
fn from_pod<T: Copy + Default>(b: &[u8]) -> Option<T> {
    if b.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: sizes are equal and T consists of integers only.
    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), &mut v as *mut T as *mut u8, b.len()) };
    Some(v)
}

pub const TAGS: [&str; 12] =
    ["regs", "sregs", "fpu", "lapic", "events", "debugregs", "msrs", "pic0", "pic1", "ioapic", "clock", "serial"];

/// Saved sections by name.
pub type Sections = BTreeMap<String, Vec<u8>>;

pub fn encode(s: &Sections) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in s {
        out.extend((name.len() as u32).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        out.extend(data);
    }
    out
}

pub fn decode(b: &[u8]) -> Option<Sections> {
    let mut s = Sections::new();
    let mut i = 0usize;
    while i < b.len() {
        let n = u32::from_le_bytes(b.get(i..i.checked_add(4)?)?.try_into().ok()?) as usize;
        i += 4;
        let name = std::str::from_utf8(b.get(i..i.checked_add(n)?)?).ok()?.to_string();
        i += n;
        let len = usize::try_from(u64::from_le_bytes(b.get(i..i.checked_add(8)?)?.try_into().ok()?)).ok()?;
        i += 8;
        s.insert(name, b.get(i..i.checked_add(len)?)?.to_vec());
        i += len;
    }
    Some(s)
}

/// Captures vCPU and VM state. First completes any pending I/O exit (KVM finishes an
/// `out` only on the next KVM_RUN), as KVM requires before saving state.
pub fn capture(vm: &VmFd, vcpu: &mut VcpuFd) -> Result<Sections, Error> {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
    let mut s = Sections::new();
    s.insert("regs".into(), pod(&kvm("GET_REGS", vcpu.get_regs())?));
    s.insert("sregs".into(), pod(&kvm("GET_SREGS", vcpu.get_sregs())?));
    s.insert("fpu".into(), pod(&kvm("GET_FPU", vcpu.get_fpu())?));
    s.insert("lapic".into(), pod(&kvm("GET_LAPIC", vcpu.get_lapic())?));
    s.insert("events".into(), pod(&kvm("GET_VCPU_EVENTS", vcpu.get_vcpu_events())?));
    s.insert("debugregs".into(), pod(&kvm("GET_DEBUGREGS", vcpu.get_debug_regs())?));
    let entries: Vec<kvm_msr_entry> = MSRS.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).expect("6 entries fit");
    kvm("GET_MSRS", vcpu.get_msrs(&mut msrs))?;
    s.insert("msrs".into(), msrs.as_slice().iter().flat_map(|e| [e.index as u64, e.data]).flat_map(u64::to_le_bytes).collect());
    for (name, chip) in [("pic0", 0), ("pic1", 1), ("ioapic", 2)] {
        let mut c = kvm_irqchip { chip_id: chip, ..Default::default() };
        kvm("GET_IRQCHIP", vm.get_irqchip(&mut c))?;
        s.insert(name.into(), pod(&c));
    }
    s.insert("clock".into(), pod(&kvm("GET_CLOCK", vm.get_clock())?));
    Ok(s)
}

fn malformed(name: &str) -> Error {
    invalid(Path::new(""), format!("state section '{name}' is malformed"))
}

/// Section `name` as the KVM struct it holds.
fn section<T: Copy + Default>(s: &Sections, name: &str) -> Result<T, Error> {
    s.get(name).and_then(|raw| from_pod(raw)).ok_or_else(|| malformed(name))
}

/// Puts captured state into a fresh VM and vCPU.
pub fn apply(vm: &VmFd, vcpu: &VcpuFd, s: &Sections) -> Result<(), Error> {
    for (name, chip) in [("pic0", 0u32), ("pic1", 1), ("ioapic", 2)] {
        let c: kvm_irqchip = section(s, name)?;
        if c.chip_id != chip {
            return Err(malformed(name));
        }
        kvm("SET_IRQCHIP", vm.set_irqchip(&c))?;
    }
    let clock: kvm_clock_data = section(s, "clock")?;
    kvm("SET_CLOCK", vm.set_clock(&kvm_clock_data { clock: clock.clock, ..Default::default() }))?;
    kvm("SET_SREGS", vcpu.set_sregs(&section(s, "sregs")?))?;
    kvm("SET_REGS", vcpu.set_regs(&section(s, "regs")?))?;
    kvm("SET_FPU", vcpu.set_fpu(&section(s, "fpu")?))?;
    let raw = s.get("msrs").ok_or_else(|| malformed("msrs"))?;
    if raw.len() % 16 != 0 {
        return Err(malformed("msrs"));
    }
    let entries: Vec<kvm_msr_entry> = raw
        .chunks_exact(16)
        .map(|c| kvm_msr_entry {
            index: u64::from_le_bytes(c[..8].try_into().expect("8")) as u32,
            data: u64::from_le_bytes(c[8..].try_into().expect("8")),
            ..Default::default()
        })
        .collect();
    // Only the MSRs this VMM saves (a state file names no others), each once.
    if entries.iter().enumerate().any(|(i, e)| !MSRS.contains(&e.index) || entries[..i].iter().any(|f| f.index == e.index)) {
        return Err(malformed("msrs"));
    }
    let msrs = Msrs::from_entries(&entries).map_err(|_| malformed("msrs"))?;
    let set = kvm("SET_MSRS", vcpu.set_msrs(&msrs))?;
    if set != entries.len() {
        return Err(malformed("msrs"));
    }
    kvm("SET_LAPIC", vcpu.set_lapic(&section(s, "lapic")?))?;
    kvm("SET_VCPU_EVENTS", vcpu.set_vcpu_events(&section(s, "events")?))?;
    kvm("SET_DEBUGREGS", vcpu.set_debug_regs(&section(s, "debugregs")?))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[test]
    fn sections_round_trip_and_reject_garbage() {
        let mut s = Sections::new();
        s.insert("regs".into(), vec![1, 2, 3]);
        s.insert("x".into(), vec![]);
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        let mut bad = encode(&s);
        bad.truncate(bad.len() - 1);
        assert!(decode(&bad).is_none());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_none());
        assert!(from_pod::<kvm_regs>(&[0u8; 3]).is_none());
    }
}
