//! Pre-copy, whatever the frames go to: round 0 copies every frame while the guest
//! runs, each later round the frames dirtied since the previous round's harvest, until
//! the rest is expected to fit in the downtime; then, with the guest stopped, the sink
//! takes the last dirty set and the machine's state. A migration stream
//! ([`super::source`]) and a live snapshot's image ([`super::live_snapshot`]) are the two
//! sinks.
//!
//! The rounds keep their own view of dirtiness in the dirty log
//! ([`GpaLog::migration_begin`](crate::tracking::dirty_log::GpaLog::migration_begin)):
//! clear-refs, dirty rates and the snapshot chain's view are never consumed by them, so
//! a pre-copy that fails or is cancelled leaves the VM exactly as it was. Frames are
//! re-armed before they are copied, so a write during the copy shows in the next round.
//! A guest that dirties faster than the sink takes is throttled
//! ([`crate::vcpu::throttle`]).

use super::Error;
use crate::machine::memory::GuestMem;
use crate::tracking::frame_set::FrameSet;
use crate::vcpu::control::Control;
use crate::vcpu::runner::VcpuContext;
use crate::vcpu::throttle;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = 4096;
/// Frames read from guest memory and handed to the sink at once (1 MiB).
pub const BATCH_PAGES: u64 = 256;

/// One pre-copy round, as progress reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Round {
    pub round: u32,
    /// Pages sent with their contents this round (zero frames go as markers).
    pub pages_sent: u64,
    /// Pages written since the previous round's harvest (what the next round sends).
    pub pages_dirtied: u64,
    pub bandwidth_mib_s: f64,
    pub expected_downtime_ms: f64,
    /// Share of the time the vCPU is held out of the guest from this round on, in %.
    #[serde(default)]
    pub throttle_pct: f64,
}

/// Where the frames go.
pub trait Sink: Send + 'static {
    /// Takes `bytes`, the frames from `pfn` on as read just now. In round 0
    /// (`first_round`) a frame that is all zeros need not be copied (the other side
    /// starts from zeros).
    fn frames(&mut self, pfn: u64, bytes: &[u8], first_round: bool) -> Result<(), Error>;
    /// Round `round` is complete.
    fn end_round(&mut self, round: u32) -> Result<(), Error>;
    /// Bytes taken so far (the rate of a round is measured with it).
    fn bytes(&self) -> u64;
    /// Frames copied with their contents, and frames skipped as zero.
    fn counts(&self) -> (u64, u64);
    /// Between batches: an error ends the pre-copy (a cancel, a deadline).
    fn check_stop(&self) -> Result<(), Error>;
    /// Pre-copy did not converge in time: go on in post-copy from the switch-over, if
    /// this sink can (the default: it cannot).
    fn begin_postcopy(&mut self) -> bool {
        false
    }
    /// vCPU thread, guest stopped: the last dirty set (`frames`), the state, and
    /// whatever makes the copy final. The rounds' view ends after it either way.
    fn switch_over(&mut self, ctx: &mut VcpuContext, last: &FrameSet) -> Result<(), Error>;
}

/// What ends a pre-copy early, checked by its sink between batches: a cancel, or the
/// deadline (lifted once the guest is stopped: finishing is then quicker than stopping).
pub struct Limits {
    cancel: Arc<AtomicBool>,
    deadline: Option<(Instant, Duration)>,
}

impl Limits {
    /// `timeout` from `start`, if any.
    pub fn new(cancel: Arc<AtomicBool>, start: Instant, timeout: Option<Duration>) -> Limits {
        Limits { cancel, deadline: timeout.map(|t| (start + t, t)) }
    }

    pub fn check(&self) -> Result<(), Error> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        match self.deadline {
            Some((deadline, timeout)) if Instant::now() > deadline => Err(Error::Timeout(timeout)),
            _ => Ok(()),
        }
    }

    pub fn lift_deadline(&mut self) {
        self.deadline = None;
    }
}

/// What the rounds aim at.
#[derive(Debug, Clone)]
pub struct Rounds {
    /// Stop the guest once the rest is expected to take at most this long.
    pub downtime: Duration,
    /// Throttle a guest that dirties faster than the sink takes.
    pub throttle: bool,
    /// A cancel: the pre-copy ends with [`Error::Cancelled`].
    pub cancel: Arc<AtomicBool>,
    /// Switch over right after round 0, whatever is left (post-copy).
    pub postcopy: bool,
    /// Not converged after this long: switch over in post-copy, if the sink can
    /// ([`Sink::begin_postcopy`]); looked at between rounds.
    pub postcopy_after: Option<Duration>,
}

/// A finished pre-copy.
pub struct Done<S> {
    pub sink: S,
    pub total: Duration,
    /// How long the guest was stopped for the switch-over.
    pub downtime: Duration,
    /// Rounds, the stopped one included.
    pub rounds: u32,
    pub max_throttle: f64,
    pub throttled: Duration,
}

/// Reads `runs` of frames from guest memory in batches and hands them to the sink.
/// Returns the frames covered.
pub fn copy_frames<S: Sink>(sink: &mut S, mem: &GuestMem, runs: impl Iterator<Item = (u64, u64)>, first_round: bool) -> Result<u64, Error> {
    let mut covered = 0;
    let mut buf = vec![0u8; (BATCH_PAGES * PAGE) as usize];
    for (first, count) in runs {
        let mut pfn = first;
        let end = first + count;
        while pfn < end {
            let n = (end - pfn).min(BATCH_PAGES);
            let bytes = &mut buf[..(n * PAGE) as usize];
            mem.read_slice(bytes, GuestAddress(pfn * PAGE)).map_err(|_| Error::Memory { pfn })?;
            sink.frames(pfn, bytes, first_round)?;
            covered += n;
            pfn += n;
            sink.check_stop()?;
        }
    }
    Ok(covered)
}

/// Pre-copies the VM behind `control` into `sink`. On success the guest went on after
/// the switch-over (or, for a migration, the sink's switch-over ended its run here);
/// on any error it goes on as before and nothing of its dirty state was consumed.
pub fn run<S: Sink>(control: &Control<VcpuContext>, sink: S, opts: &Rounds, progress: &mut dyn FnMut(&Round)) -> Result<Done<S>, Error> {
    let mem = control
        .call(|ctx: &mut VcpuContext| -> Result<GuestMem, Error> {
            ctx.tracker.log.migration_begin(&ctx.mem)?;
            Ok(ctx.mem.clone())
        })
        .map_err(Error::Finished)??;
    let held_before = control.throttle.held();
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        // While a throttle is set, kick the vCPU out of the guest at the end of each
        // slice so that it holds even when the guest does not exit by itself.
        scope.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                match control.throttle.until_kick(Instant::now()) {
                    Some(Duration::ZERO) => {
                        control.kick();
                        // A kick that found the vCPU outside the guest is lost: again
                        // soon, unless the hold moved the slice on.
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    Some(wait) => std::thread::sleep(wait.min(throttle::PERIOD)),
                    None => std::thread::sleep(throttle::PERIOD),
                }
            }
        });
        let r = rounds(control, sink, opts, progress, &mem);
        done.store(true, Ordering::SeqCst);
        control.throttle.set(0.0);
        r
    });
    let result = match result {
        Ok(mut d) => {
            d.throttled = control.throttle.held() - held_before;
            Ok(d)
        }
        // Whatever a cancelled write or round ended with, it ended because of the cancel.
        Err(_) if opts.cancel.load(Ordering::SeqCst) => Err(Error::Cancelled),
        Err(e) => Err(e),
    };
    if result.is_err() {
        // The view goes away; what it held is still in every other view.
        let _ = control.call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_end());
    }
    result
}

fn rounds<S: Sink>(control: &Control<VcpuContext>, mut sink: S, opts: &Rounds, progress: &mut dyn FnMut(&Round), mem: &GuestMem)
    -> Result<Done<S>, Error> {
    let t0 = Instant::now();
    let pages = (mem.last_addr().0 + 1) / PAGE;
    let mut round = 0u32;
    let mut r0 = Instant::now();
    let mut b0 = sink.bytes();
    copy_frames(&mut sink, mem, std::iter::once((0, pages)), true)?;
    let mut sent = sink.counts().0;
    let mut max_share = 0f64;
    loop {
        sink.end_round(round)?;
        let secs = r0.elapsed().as_secs_f64().max(1e-6);
        let bandwidth = (sink.bytes() - b0) as f64 / secs;
        let dirty = control
            .call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_pending(&ctx.mem))
            .map_err(Error::Finished)??;
        let expected = Duration::from_secs_f64(dirty as f64 * PAGE as f64 / bandwidth.max(1.0));
        if expected > opts.downtime && opts.throttle {
            control.throttle.set(throttle::next_share(control.throttle.share(), sent, dirty));
            max_share = max_share.max(control.throttle.share());
        }
        progress(&Round {
            round,
            pages_sent: sent,
            pages_dirtied: dirty,
            bandwidth_mib_s: bandwidth / (1 << 20) as f64,
            expected_downtime_ms: expected.as_secs_f64() * 1e3,
            throttle_pct: control.throttle.share() * 100.0,
        });
        if expected <= opts.downtime || opts.postcopy {
            break;
        }
        if opts.postcopy_after.is_some_and(|t| t0.elapsed() >= t) && sink.begin_postcopy() {
            break;
        }
        sink.check_stop()?;
        round += 1;
        r0 = Instant::now();
        b0 = sink.bytes();
        let frames = control
            .call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_take(&ctx.mem))
            .map_err(Error::Finished)??;
        sent = copy_frames(&mut sink, mem, frames.runs(), false)?;
    }
    sink.check_stop()?;
    // Switch-over, on the vCPU thread with the guest stopped.
    let (sink, stopped) = control
        .call(move |ctx: &mut VcpuContext| {
            let mut sink = sink;
            let t = Instant::now();
            let r = ctx
                .tracker
                .log
                .migration_take(&ctx.mem)
                .map_err(Error::from)
                .and_then(|last| sink.switch_over(ctx, &last))
                .map(|()| t.elapsed());
            if r.is_ok() {
                ctx.tracker.log.migration_end();
            }
            (sink, r)
        })
        .map_err(Error::Finished)?;
    let downtime = stopped?;
    Ok(Done { sink, total: t0.elapsed(), downtime, rounds: round + 2, max_throttle: max_share, throttled: Duration::ZERO })
}
