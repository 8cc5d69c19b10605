//! `vmm snapshot create --live`: a full snapshot pre-copied into its directory while the
//! guest runs ([`super::precopy`] with the snapshot's image as the sink), the guest
//! stopped only for the last dirty set and its state. The result is an ordinary full
//! snapshot of the moment of that stop ([`crate::storage::snapshot::live`]).
//!
//! The snapshot chain moves on at the stop: writes after it go to the next diff. Until
//! the snapshot is committed (hashed, synced, renamed, with the guest running again),
//! other snapshots are refused as busy; if the commit fails, the chain's view gets back
//! what the stop took from it, so a later diff still has every page.

use super::precopy::{self, Round, Sink};
use super::Error;
use crate::storage::snapshot::live::{LiveFull, Stop};
use crate::storage::snapshot::{Kind, Phases, Report};
use crate::tracking::frame_set::FrameSet;
use crate::vcpu::control::Control;
use crate::vcpu::runner::VcpuContext;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryBackend;

const PAGE: u64 = 4096;

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop the guest once the last dirty set is expected to take at most this long.
    pub downtime: Duration,
    /// Past it, the snapshot is abandoned (nothing is left behind).
    pub timeout: Duration,
    pub throttle: bool,
    pub cancel: Arc<AtomicBool>,
}

/// A live snapshot written: the report of any snapshot (its `pause_ns` is the stop),
/// and how the pre-copy went.
#[derive(Debug, Clone)]
pub struct Created {
    pub report: Report,
    pub rounds: u32,
    pub total: Duration,
    pub max_throttle: f64,
}

/// The image as a pre-copy sink.
struct ImageSink {
    image: LiveFull,
    limits: precopy::Limits,
    pages: u64,
    zeros: u64,
    bytes: u64,
    /// Filled by the switch-over: the state, and the chain's view as the stop took it.
    stop: Option<Stop>,
    chain_view: Option<FrameSet>,
    phases: Phases,
}

impl Sink for ImageSink {
    fn frames(&mut self, pfn: u64, bytes: &[u8], first_round: bool) -> Result<(), Error> {
        if !first_round {
            self.image.write(pfn, bytes)?;
            self.pages += bytes.len() as u64 / PAGE;
            self.bytes += bytes.len() as u64;
            return Ok(());
        }
        // Round 0: zero frames stay holes; the rest go in runs.
        let page = PAGE as usize;
        for (i, count, zero) in crate::machine::memory::zero_runs(bytes) {
            if zero {
                self.zeros += count as u64;
            } else {
                self.image.write(pfn + i as u64, &bytes[i * page..(i + count) * page])?;
                self.pages += count as u64;
                self.bytes += (count * page) as u64;
            }
        }
        Ok(())
    }

    fn end_round(&mut self, _round: u32) -> Result<(), Error> {
        Ok(())
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn counts(&self) -> (u64, u64) {
        (self.pages, self.zeros)
    }

    fn check_stop(&self) -> Result<(), Error> {
        self.limits.check()
    }

    fn switch_over(&mut self, ctx: &mut VcpuContext, last: &FrameSet) -> Result<(), Error> {
        let mut lap = Instant::now();
        let mut mark = |slot: &mut u64| {
            *slot += lap.elapsed().as_nanos() as u64;
            lap = Instant::now();
        };
        // The guest is stopped: the deadline no longer applies.
        self.limits.lift_deadline();
        precopy::copy_frames(self, &ctx.mem, last.runs(), false)?;
        mark(&mut self.phases.memory_ns);
        let sections = ctx.machine_state().map_err(|e| Error::State(e.to_string()))?;
        self.stop = Some(Stop { sections, engine: ctx.tracker.engine(), image_sha256: ctx.history.image_sha256.clone() });
        mark(&mut self.phases.state_ns);
        // The next diff counts from here.
        self.chain_view = Some(ctx.tracker.log.snapshot_restart()?);
        ctx.history.live_snapshot_committing = true;
        mark(&mut self.phases.rearm_ns);
        Ok(())
    }
}

/// Writes a full snapshot of the VM behind `control` to `out` (which must not exist)
/// while the guest runs. On any error nothing is left at `out` and the VM's dirty
/// state is as it was.
pub fn create(control: &Control<VcpuContext>, out: &Path, opts: &Options, progress: &mut dyn FnMut(&Round)) -> Result<Created, Error> {
    let mem_bytes = control.call(|ctx: &mut VcpuContext| ctx.mem.last_addr().0 + 1).map_err(Error::Finished)?;
    let t0 = Instant::now();
    let sink = ImageSink {
        image: LiveFull::start(out, mem_bytes)?,
        limits: precopy::Limits::new(opts.cancel.clone(), t0, Some(opts.timeout)),
        pages: 0,
        zeros: 0,
        bytes: 0,
        stop: None,
        chain_view: None,
        phases: Phases::default(),
    };
    let rounds = precopy::Rounds { downtime: opts.downtime, throttle: opts.throttle, cancel: opts.cancel.clone(), postcopy: false, postcopy_after: None };
    let done = precopy::run(control, sink, &rounds, progress)?;
    // The guest runs again; the snapshot is finished behind it.
    let ImageSink { image, stop, chain_view, mut phases, .. } = done.sink;
    let stop = stop.expect("the switch-over filled the state");
    let t = Instant::now();
    let finished = image.finish(stop);
    phases.sync_ns = t.elapsed().as_nanos() as u64;
    let (pages, last) = match finished {
        Ok(r) => r,
        Err(e) => {
            let view = chain_view.expect("the switch-over took the chain's view");
            let _ = control.call(move |ctx: &mut VcpuContext| {
                ctx.tracker.log.snapshot_undo_restart(&view);
                ctx.history.live_snapshot_committing = false;
            });
            return Err(e.into());
        }
    };
    let id = last.id.clone();
    // (A VM that finished meanwhile has no next diff to base on it.)
    let _ = control.call(move |ctx: &mut VcpuContext| {
        ctx.history.last_snapshot = Some(last);
        ctx.history.live_snapshot_committing = false;
    });
    let bytes = std::fs::metadata(out.join("memory.bin")).map(|m| m.len()).unwrap_or(0);
    let report = Report {
        id,
        kind: Kind::Full,
        pages,
        bytes,
        disk_bytes: crate::storage::durable::disk_usage(out),
        pause_ns: done.downtime.as_nanos() as u64,
        phases,
    };
    Ok(Created { report, rounds: done.rounds, total: t0.elapsed(), max_throttle: done.max_throttle })
}
