//! Console output on the 8250 UART, and a tiny formatter that avoids `core::fmt`
//! (whose precompiled code uses SSE, which the emulated ring 0 cannot run).

use core::sync::atomic::{AtomicBool, Ordering};
use guest_abi::{LOG_PORT, SERIAL_PORT};

/// While a Linux program owns the console, the kernel's lines go to the log port.
static LOG_APART: AtomicBool = AtomicBool::new(false);

pub fn log_apart() {
    LOG_APART.store(true, Ordering::Relaxed);
}

/// A line being built on the stack; shared by ring 0 and the ring-3 runtime.
pub struct Line {
    buf: [u8; 200],
    len: usize,
}

impl Line {
    pub const fn new() -> Self {
        Line { buf: [0; 200], len: 0 }
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut n = 0;
        loop {
            digits[19 - n] = b'0' + (v % 10) as u8;
            n += 1;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&digits[20 - n..])
    }

    pub fn hex(&mut self, v: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        let mut n = 0;
        let mut v = v;
        loop {
            let d = (v & 0xf) as u8;
            digits[15 - n] = if d < 10 { b'0' + d } else { b'a' + d - 10 };
            n += 1;
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.str("0x").bytes(&digits[16 - n..])
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Writes bytes to the console from ring 0.
pub fn write(bytes: &[u8]) {
    crate::arch::outsb(SERIAL_PORT, bytes);
}

/// Writes a finished line plus newline from ring 0: the kernel's own messages.
pub fn emit(line: &mut Line) {
    line.str("\n");
    if LOG_APART.load(Ordering::Relaxed) {
        crate::arch::outsb(LOG_PORT, line.as_bytes());
    } else {
        write(line.as_bytes());
    }
}
