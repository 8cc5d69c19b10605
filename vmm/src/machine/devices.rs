//! Port I/O devices: the 8250 console (vm-superio) and the guest kernel's ports (exit,
//! sync, zero-frames). Requests read from guest memory are untrusted and validated here.

use crate::machine::memory::{self, GuestMem};
use guest_abi::{EXIT_PORT, LOG_PORT, PROC_PORT, SERIAL_PORT, SYNC_LABEL_MAX, SYNC_PORT, ZERO_PORT, ZERO_REQUEST_MAX};
use std::io::Write;
use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the serial IRQ through an irqfd.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("guest sent a malformed {what} request at {addr:#x}: {why}")]
    BadRequest { what: &'static str, addr: u64, why: String },
}

/// A `sync` reported by the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPoint {
    pub pid: u32,
    pub label: String,
}

/// What a port write asks of the run loop.
#[derive(Debug, PartialEq, Eq)]
pub enum PortEvent {
    Nothing,
    Exit(u32),
    Sync(SyncPoint),
    /// Frames zeroed on the guest's request: (first pfn, pages) each.
    Zeroed(Vec<(u64, u64)>),
    /// A Linux program's /proc pagemap or clear_refs request, at this guest-physical
    /// address (answered by the run loop, which has the tracker).
    Proc(u64),
}

pub struct Devices {
    serial: Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

fn u32_of(data: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(..4)?.try_into().ok()?))
}

impl Devices {
    pub fn new(serial_irq: EventFd, console: Box<dyn Write + Send>) -> Self {
        Devices { serial: Serial::new(EventFdTrigger(serial_irq), console) }
    }

    /// The devices' state, for a snapshot: the 8250's registers and its receive FIFO
    /// (`[9 register bytes][FIFO bytes]`). The exit, sync and zero ports hold none.
    pub fn save(&self) -> Vec<u8> {
        let s = self.serial.state();
        let mut out = vec![
            s.baud_divisor_low, s.baud_divisor_high, s.interrupt_enable, s.interrupt_identification,
            s.line_control, s.line_status, s.modem_control, s.modem_status, s.scratch,
        ];
        out.extend(&s.in_buffer);
        out
    }

    /// Devices in the state [`Devices::save`] wrote.
    pub fn restore(serial_irq: EventFd, console: Box<dyn Write + Send>, saved: &[u8]) -> Result<Self, String> {
        let [bdl, bdh, ie, ii, lc, ls, mc, ms, scratch, fifo @ ..] = saved else {
            return Err(format!("serial state is {} bytes, fewer than its 9 registers", saved.len()));
        };
        let state = SerialState {
            baud_divisor_low: *bdl,
            baud_divisor_high: *bdh,
            interrupt_enable: *ie,
            interrupt_identification: *ii,
            line_control: *lc,
            line_status: *ls,
            modem_control: *mc,
            modem_status: *ms,
            scratch: *scratch,
            in_buffer: fifo.to_vec(),
        };
        let serial = Serial::from_state(&state, EventFdTrigger(serial_irq), vm_superio::serial::NoEvents, console)
            .map_err(|e| format!("serial state refused: {e:?}"))?;
        Ok(Devices { serial })
    }

    pub fn io_in(&mut self, port: u16, data: &mut [u8]) {
        match port {
            SERIAL_PORT..=0x3ff if data.len() == 1 => data[0] = self.serial.read((port - SERIAL_PORT) as u8),
            _ => data.fill(0xff),
        }
    }

    pub fn io_out(&mut self, mem: &GuestMem, port: u16, data: &[u8]) -> Result<PortEvent, Error> {
        match port {
            SERIAL_PORT..=0x3ff => {
                // `rep outsb` arrives as one exit carrying every byte.
                for &b in data {
                    // A console write error (closed stdout) must not stop the guest.
                    let _ = self.serial.write((port - SERIAL_PORT) as u8, b);
                }
                let _ = self.serial.writer_mut().flush();
                Ok(PortEvent::Nothing)
            }
            LOG_PORT => {
                // The kernel's own lines while a Linux program owns the console.
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(data).and_then(|()| err.flush());
                Ok(PortEvent::Nothing)
            }
            EXIT_PORT => Ok(u32_of(data).map_or(PortEvent::Nothing, PortEvent::Exit)),
            PROC_PORT => Ok(u32_of(data).map_or(PortEvent::Nothing, |a| PortEvent::Proc(u64::from(a)))),
            SYNC_PORT => match u32_of(data) {
                Some(addr) => read_sync(mem, u64::from(addr)).map(PortEvent::Sync),
                None => Ok(PortEvent::Nothing),
            },
            ZERO_PORT => match u32_of(data) {
                Some(addr) => zero_frames(mem, u64::from(addr)).map(PortEvent::Zeroed),
                None => Ok(PortEvent::Nothing),
            },
            _ => Ok(PortEvent::Nothing),
        }
    }
}

fn read_sync(mem: &GuestMem, addr: u64) -> Result<SyncPoint, Error> {
    let bad = |why: String| Error::BadRequest { what: "sync", addr, why };
    let raw = memory::read(mem, addr, 8 + SYNC_LABEL_MAX).map_err(|e| bad(e.to_string()))?;
    let pid = u32::from_le_bytes(raw[0..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(raw[4..8].try_into().expect("4 bytes")) as usize;
    if len > SYNC_LABEL_MAX {
        return Err(bad(format!("label length {len} exceeds {SYNC_LABEL_MAX}")));
    }
    let label = &raw[8..8 + len];
    if !label.iter().all(|b| b.is_ascii_graphic()) {
        return Err(bad("label is not printable ASCII".into()));
    }
    Ok(SyncPoint { pid, label: String::from_utf8_lossy(label).into_owned() })
}

/// Zeroes the frames a guest [`guest_abi::ZeroRequest`] names. Every range is checked
/// against guest memory before anything is written.
fn zero_frames(mem: &GuestMem, addr: u64) -> Result<Vec<(u64, u64)>, Error> {
    let bad = |why: String| Error::BadRequest { what: "zero-frames", addr, why };
    let raw = memory::read(mem, addr, 8 + 16 * ZERO_REQUEST_MAX).map_err(|e| bad(e.to_string()))?;
    let word = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let count = word(0);
    if count > ZERO_REQUEST_MAX as u64 {
        return Err(bad(format!("{count} ranges exceed the limit of {ZERO_REQUEST_MAX}")));
    }
    let size = vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1;
    let mut ranges = Vec::with_capacity(count as usize);
    for i in 0..count as usize {
        let (pfn, pages) = (word(1 + 2 * i), word(2 + 2 * i));
        let end = pfn.checked_add(pages).and_then(|e| e.checked_mul(4096));
        if end.is_none_or(|e| e > size) {
            return Err(bad(format!("range {i} (pfn {pfn:#x}, {pages} pages) is outside guest memory")));
        }
        ranges.push((pfn, pages));
    }
    static ZEROS: [u8; 4096] = [0; 4096];
    for &(pfn, pages) in &ranges {
        for p in pfn..pfn + pages {
            memory::write(mem, p * 4096, &ZEROS).map_err(|e| bad(e.to_string()))?;
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMem {
        memory::create(1 << 20).unwrap()
    }

    #[test]
    fn serial_state_survives_save_and_restore() {
        let efd = || EventFd::new(0).unwrap();
        let mut d = Devices::new(efd(), Box::new(std::io::sink()));
        let m = mem();
        // DLAB on, divisor 3 (38400 baud), then 8N1 and the scratch register.
        for (port, v) in [(SERIAL_PORT + 3, 0x80u8), (SERIAL_PORT, 3), (SERIAL_PORT + 3, 0x03), (SERIAL_PORT + 7, 0x5a)] {
            d.io_out(&m, port, &[v]).unwrap();
        }
        let saved = d.save();
        let mut r = Devices::restore(efd(), Box::new(std::io::sink()), &saved).unwrap();
        assert_eq!(r.save(), saved);
        let mut scratch = [0u8];
        r.io_in(SERIAL_PORT + 7, &mut scratch);
        assert_eq!(scratch[0], 0x5a);
        let short = Devices::restore(efd(), Box::new(std::io::sink()), &saved[..5]);
        assert!(matches!(short, Err(e) if e.contains("fewer than its 9")));
        let mut huge = saved.clone();
        huge.extend([0u8; 1000]);
        assert!(Devices::restore(efd(), Box::new(std::io::sink()), &huge).is_err(), "a FIFO longer than the 8250's");
    }

    /// A zero request claiming `count` ranges, holding `ranges` (pfn, pages).
    fn zero_request(count: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut req = vec![0u8; 8 + 16 * ZERO_REQUEST_MAX];
        req[..8].copy_from_slice(&count.to_le_bytes());
        for (i, (pfn, pages)) in ranges.iter().enumerate() {
            req[8 + 16 * i..16 + 16 * i].copy_from_slice(&pfn.to_le_bytes());
            req[16 + 16 * i..24 + 16 * i].copy_from_slice(&pages.to_le_bytes());
        }
        req
    }

    #[test]
    fn zero_request_zeroes_only_named_frames() {
        let m = mem();
        memory::write(&m, 0x5000, &[0xaa; 8192]).unwrap();
        memory::write(&m, 0x1000, &zero_request(1, &[(5, 1)])).unwrap();
        assert_eq!(zero_frames(&m, 0x1000).unwrap(), vec![(5, 1)]);
        assert_eq!(memory::read(&m, 0x5000, 4096).unwrap(), vec![0; 4096]);
        assert_eq!(memory::read(&m, 0x6000, 4096).unwrap(), vec![0xaa; 4096]);
    }

    #[test]
    fn hostile_zero_requests_are_refused_before_writing() {
        let m = mem();
        memory::write(&m, 0x5000, &[0xaa; 4096]).unwrap();
        let mut req = zero_request(2, &[(5, 1), (u64::MAX, 2)]);
        memory::write(&m, 0x1000, &req).unwrap();
        assert!(zero_frames(&m, 0x1000).is_err());
        assert_eq!(memory::read(&m, 0x5000, 4096).unwrap(), vec![0xaa; 4096], "nothing zeroed");
        req[..8].copy_from_slice(&1000u64.to_le_bytes());
        memory::write(&m, 0x1000, &req).unwrap();
        assert!(zero_frames(&m, 0x1000).is_err());
        assert!(zero_frames(&m, 0xffff_f000).is_err(), "request outside memory");
    }

    #[test]
    fn sync_label_is_validated() {
        let m = mem();
        let mut rec = vec![0u8; 8 + SYNC_LABEL_MAX];
        rec[..4].copy_from_slice(&3u32.to_le_bytes());
        rec[4..8].copy_from_slice(&5u32.to_le_bytes());
        rec[8..13].copy_from_slice(b"hello");
        memory::write(&m, 0x2000, &rec).unwrap();
        assert_eq!(read_sync(&m, 0x2000).unwrap(), SyncPoint { pid: 3, label: "hello".into() });
        rec[4..8].copy_from_slice(&999u32.to_le_bytes());
        memory::write(&m, 0x2000, &rec).unwrap();
        assert!(read_sync(&m, 0x2000).is_err());
    }
}
