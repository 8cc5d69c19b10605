//! Progress of long writes: a counter the worker advances ([`Progress`]) and a bar
//! that draws it on a terminal ([`Bar`]) — and draws nothing when stderr is not one.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes done out of a total; shared between the worker and whoever reports.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn start(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    pub fn advance(&self, bytes: u64) {
        self.done.fetch_add(bytes, Ordering::Relaxed);
    }

    /// (done, total)
    pub fn get(&self) -> (u64, u64) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }
}

/// A one-line bar on stderr, redrawn at most every 100 ms; silent off a terminal.
pub struct Bar {
    label: String,
    on: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl Bar {
    pub fn new(label: &str) -> Bar {
        Bar { label: label.into(), on: std::io::stderr().is_terminal(), last: None, drawn: false }
    }

    /// Whether anything will be drawn (stderr is a terminal).
    pub fn enabled(&self) -> bool {
        self.on
    }

    pub fn draw(&mut self, done: u64, total: u64) {
        if !self.on || self.last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
            return;
        }
        self.last = Some(Instant::now());
        self.drawn = true;
        let _ = write!(std::io::stderr(), "\r\x1b[K{}", render(&self.label, done, total));
    }

    /// Removes the bar's line.
    pub fn finish(&mut self) {
        if self.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.drawn = false;
        }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `label [#######.............]  35%  12.0/34.3 MiB`
pub fn render(label: &str, done: u64, total: u64) -> String {
    const WIDTH: u64 = 30;
    let frac = (done.min(total) * 1000).checked_div(total).unwrap_or(0);
    let filled = (frac * WIDTH / 1000) as usize;
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    format!(
        "{label} [{}{}] {:>3}%  {:.1}/{:.1} MiB",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled),
        frac / 10,
        mib(done),
        mib(total)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_bounded_bars() {
        assert_eq!(render("x", 0, 0), format!("x [{}]   0%  0.0/0.0 MiB", ".".repeat(30)));
        assert!(render("x", 1 << 20, 2 << 20).contains(&format!("[{}{}]  50%", "#".repeat(15), ".".repeat(15))));
        assert!(render("x", 5, 1).contains("100%"), "overshoot is clamped");
    }
}
