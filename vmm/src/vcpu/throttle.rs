//! Holding the vCPU out of the guest for a share of each period, so that a guest that
//! dirties memory faster than a migration can send it slows down until the migration
//! converges (QEMU's auto-converge does the same with its CPU throttle).
//!
//! The share is set by whoever needs it (the migration) and read by the vCPU thread
//! before each entry into the guest: once the guest has had its `(1 - share) * PERIOD`
//! slice, the vCPU thread sleeps `share * PERIOD`. A guest that does not exit on its own
//! is kicked out of `KVM_RUN` at the end of its slice by a ticker thread
//! ([`Throttle::until_kick`] says when), so the share holds to within a kick's latency.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One run-then-hold cycle.
pub const PERIOD: Duration = Duration::from_millis(20);
/// The largest share: the guest always gets 1% of the time (as QEMU's maximum).
pub const MAX_SHARE: f64 = 0.99;

/// The share of time the vCPU is held out of the guest.
#[derive(Debug)]
pub struct Throttle {
    /// In parts per million.
    ppm: AtomicU32,
    /// When the guest's current slice ends, in nanoseconds since `base`; 0: no slice
    /// is running (unthrottled).
    slice_end_ns: AtomicU64,
    base: Instant,
    /// Time spent held, in total, in nanoseconds.
    held_ns: AtomicU64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle { ppm: AtomicU32::new(0), slice_end_ns: AtomicU64::new(0), base: Instant::now(), held_ns: AtomicU64::new(0) }
    }
}

impl Throttle {
    /// Sets the share held out of the guest (clamped to `0..=MAX_SHARE`); 0 ends the
    /// throttle.
    pub fn set(&self, share: f64) {
        let share = if share.is_finite() { share.clamp(0.0, MAX_SHARE) } else { 0.0 };
        self.ppm.store((share * 1e6).round() as u32, Ordering::SeqCst);
    }

    pub fn share(&self) -> f64 {
        f64::from(self.ppm.load(Ordering::SeqCst)) / 1e6
    }

    /// Total time the vCPU was held so far.
    pub fn held(&self) -> Duration {
        Duration::from_nanos(self.held_ns.load(Ordering::SeqCst))
    }

    fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.base).as_nanos().max(1) as u64
    }

    /// The vCPU thread's bookkeeping at `now`, before it enters the guest: the hold due
    /// now, if the guest's slice is over (the next slice then starts after the hold).
    pub fn step(&self, now: Instant) -> Option<Duration> {
        let share = self.share();
        if share == 0.0 {
            self.slice_end_ns.store(0, Ordering::SeqCst);
            return None;
        }
        let slice = PERIOD.mul_f64(1.0 - share);
        let end = self.slice_end_ns.load(Ordering::SeqCst);
        if end == 0 {
            // A throttle just began: the guest's first slice starts now.
            self.slice_end_ns.store(self.at(now + slice), Ordering::SeqCst);
            return None;
        }
        if self.at(now) < end {
            return None;
        }
        let hold = PERIOD.mul_f64(share);
        self.slice_end_ns.store(self.at(now + hold + slice), Ordering::SeqCst);
        Some(hold)
    }

    /// vCPU thread, before entering the guest: sleeps for the hold due, if any.
    pub fn hold_if_due(&self) {
        if let Some(hold) = self.step(Instant::now()) {
            std::thread::sleep(hold);
            self.held_ns.fetch_add(hold.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    /// The ticker's question at `now`: how long until the guest's slice ends (zero: kick
    /// it now), or `None` if no throttle is running.
    pub fn until_kick(&self, now: Instant) -> Option<Duration> {
        let end = self.slice_end_ns.load(Ordering::SeqCst);
        (self.share() > 0.0).then(|| Duration::from_nanos(end.saturating_sub(self.at(now))))
    }
}

/// The next share for a migration whose last round sent `sent` pages while the guest
/// dirtied `dirtied`: none while each round at least halves what is left; otherwise at
/// least 10 points more, and as much as brings the dirtying rate to a quarter of the
/// sending rate if the guest's speed scales with the time it is given. (A guest that
/// rewrote all of its hot set within the round dirtied faster than `dirtied` says, so
/// the aim is low.)
pub fn next_share(current: f64, sent: u64, dirtied: u64) -> f64 {
    if sent == 0 || dirtied * 2 <= sent {
        return current;
    }
    let wanted = 1.0 - (1.0 - current) * sent as f64 / (4.0 * dirtied as f64);
    wanted.max(current + 0.1).min(MAX_SHARE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_grows_only_while_rounds_do_not_shrink() {
        assert_eq!(next_share(0.0, 1000, 400), 0.0, "halving each round converges by itself");
        assert_eq!(next_share(0.3, 1000, 500), 0.3);
        // Dirtied as much as sent: a quarter of the rate is wanted, a share of 75%.
        assert!((next_share(0.0, 1000, 1000) - 0.75).abs() < 1e-9);
        // Barely over half, near the top: at least 10 points more.
        assert!((next_share(0.85, 1000, 501) - 0.95).abs() < 1e-9);
        // Ten times too fast: close to the cap, never over it.
        assert!((next_share(0.0, 100, 1000) - 0.975).abs() < 1e-9);
        assert_eq!(next_share(0.95, 100, 1000), MAX_SHARE);
        assert_eq!(next_share(0.5, 0, 1000), 0.5, "nothing sent: nothing to measure");
    }

    #[test]
    fn the_guest_runs_its_slice_then_is_held_for_the_rest_of_the_period() {
        let t = Throttle::default();
        let start = Instant::now();
        assert_eq!(t.step(start), None, "no throttle, no hold");
        assert_eq!(t.until_kick(start), None, "and no kicks");
        t.set(0.75);
        let slice = PERIOD.mul_f64(0.25);
        assert_eq!(t.step(start), None, "the first slice starts now");
        assert_eq!(t.until_kick(start), Some(slice));
        assert_eq!(t.step(start + slice / 2), None, "the guest has not had its slice yet");
        let end = start + slice + Duration::from_micros(100);
        assert_eq!(t.until_kick(end), Some(Duration::ZERO), "kick it out");
        let hold = PERIOD.mul_f64(0.75);
        assert_eq!(t.step(end), Some(hold));
        assert_eq!(t.until_kick(end), Some(hold + slice), "the next kick ends the next slice");
        t.set(0.0);
        assert_eq!(t.step(end + PERIOD), None);
        t.set(7.0);
        assert_eq!(t.share(), MAX_SHARE);
        t.set(f64::NAN);
        assert_eq!(t.share(), 0.0);
    }
}
