//! State shared between the vCPU thread and everyone else (API connections, the
//! watchdog): whether the VM runs, is paused at a `sync`, or has finished; jobs that
//! must run on the vCPU thread while the guest is stopped; and the running-time clock
//! that `--timeout` bounds (time paused at a `sync` does not count).

use crate::machine::devices::SyncPoint;
use crate::machine::kick::Kicker;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the VM is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stopped at a `sync` until a client resumes it.
    Paused(SyncPoint),
    /// The run is over; the string says how it ended.
    Finished(String),
}

/// Work for the vCPU thread, run while the guest is stopped.
pub type Job<C> = Box<dyn FnOnce(&mut C) + Send>;

struct State<C> {
    phase: Phase,
    jobs: VecDeque<Job<C>>,
    /// Number of syncs seen so far, so waiters can tell a new pause from an old one.
    syncs: u64,
    /// A job ended the run while the VM was paused (it migrated away): the pause ends
    /// without a resume.
    released: bool,
}

struct Clock {
    ran: Duration,
    since: Option<Instant>,
}

/// Shared between the vCPU thread (generic over its context `C`) and the others.
pub struct Control<C> {
    state: Mutex<State<C>>,
    changed: Condvar,
    clock: Mutex<Clock>,
    timed_out: AtomicBool,
    vcpu: Mutex<Option<Kicker>>,
    /// The running migration's cancel flag, if one runs.
    migration: Mutex<Option<Arc<AtomicBool>>>,
    /// Holds the vCPU out of the guest for a share of the time (a migration that does
    /// not converge sets it).
    pub throttle: super::throttle::Throttle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these states half-changed (each update is a
    // single assignment), so poisoning is ignored.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C> Default for Control<C> {
    fn default() -> Self {
        Control {
            state: Mutex::new(State { phase: Phase::Running, jobs: VecDeque::new(), syncs: 0, released: false }),
            changed: Condvar::new(),
            clock: Mutex::new(Clock { ran: Duration::ZERO, since: None }),
            timed_out: AtomicBool::new(false),
            vcpu: Mutex::new(None),
            migration: Mutex::new(None),
            throttle: Default::default(),
        }
    }
}

impl<C> Control<C> {
    /// Called by the vCPU thread before it first enters the guest.
    pub fn vcpu_started(&self, kicker: Kicker) {
        *lock(&self.vcpu) = Some(kicker);
        lock(&self.clock).since = Some(Instant::now());
    }

    pub fn phase(&self) -> Phase {
        lock(&self.state).phase.clone()
    }

    pub fn syncs(&self) -> u64 {
        lock(&self.state).syncs
    }

    /// Guest time so far, pauses excluded.
    pub fn running_time(&self) -> Duration {
        let c = lock(&self.clock);
        c.ran + c.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    fn stop_clock(&self) {
        let mut c = lock(&self.clock);
        if let Some(s) = c.since.take() {
            c.ran += s.elapsed();
        }
    }

    fn start_clock(&self) {
        lock(&self.clock).since.get_or_insert_with(Instant::now);
    }

    pub fn timed_out(&self) -> bool {
        self.timed_out.load(Ordering::SeqCst)
    }

    /// The watchdog's verdict: stop the guest.
    pub fn time_out(&self) {
        self.timed_out.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Makes the vCPU leave `KVM_RUN` once (it looks at jobs and the throttle).
    pub fn kick(&self) {
        if let Some(k) = *lock(&self.vcpu) {
            k.kick();
        }
    }

    /// vCPU thread: the guest reached a `sync`; block (running jobs) until resumed.
    pub fn pause_at(&self, point: SyncPoint, ctx: &mut C) {
        self.stop_clock();
        {
            let mut s = lock(&self.state);
            s.phase = Phase::Paused(point);
            s.syncs += 1;
        }
        self.changed.notify_all();
        loop {
            let mut s = lock(&self.state);
            while s.jobs.is_empty() && matches!(s.phase, Phase::Paused(_)) && !s.released && !self.timed_out() {
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if let Some(job) = s.jobs.pop_front() {
                drop(s);
                job(ctx);
                continue;
            }
            break;
        }
        self.start_clock();
    }

    /// Ends a pause without resuming the guest: the run is over here (the VM migrated
    /// away). The vCPU thread leaves the pause and its run ends.
    pub fn release_pause(&self) {
        lock(&self.state).released = true;
        self.changed.notify_all();
    }

    /// A migration starts: its cancel flag, or `None` if one is already running.
    pub fn begin_migration(&self) -> Option<Arc<AtomicBool>> {
        let mut m = lock(&self.migration);
        if m.is_some() {
            return None;
        }
        let flag = Arc::new(AtomicBool::new(false));
        *m = Some(flag.clone());
        Some(flag)
    }

    pub fn migrating(&self) -> bool {
        lock(&self.migration).is_some()
    }

    pub fn end_migration(&self) {
        self.throttle.set(0.0);
        *lock(&self.migration) = None;
    }

    /// Asks the running migration to stop; false if none runs.
    pub fn cancel_migration(&self) -> bool {
        lock(&self.migration).as_ref().map(|f| f.store(true, Ordering::SeqCst)).is_some()
    }

    /// vCPU thread: a `sync` that does not pause still counts.
    pub fn passed_sync(&self) {
        let mut s = lock(&self.state);
        s.syncs += 1;
        s.phase = Phase::Running;
        drop(s);
        self.changed.notify_all();
    }

    pub fn has_jobs(&self) -> bool {
        !lock(&self.state).jobs.is_empty()
    }

    /// vCPU thread: runs queued jobs (after an exit, before re-entering the guest).
    pub fn run_jobs(&self, ctx: &mut C) {
        loop {
            let job = lock(&self.state).jobs.pop_front();
            match job {
                Some(job) => job(ctx),
                None => break,
            }
        }
    }

    /// vCPU thread: the run is over; pending and future jobs are refused.
    pub fn finish(&self, how: String) {
        self.stop_clock();
        let mut s = lock(&self.state);
        s.phase = Phase::Finished(how);
        s.jobs.clear();
        drop(s);
        self.changed.notify_all();
    }

    /// Continues a VM paused at a `sync`.
    pub fn resume(&self) -> Result<(), String> {
        let mut s = lock(&self.state);
        match &s.phase {
            Phase::Paused(_) => {
                s.phase = Phase::Running;
                drop(s);
                self.changed.notify_all();
                Ok(())
            }
            Phase::Running => Err("the VM is running, not paused at a sync".into()),
            Phase::Finished(how) => Err(format!("the VM has finished ({how})")),
        }
    }

    /// Runs `job` on the vCPU thread with the guest stopped, and returns its result.
    pub fn call<R: Send + 'static>(&self, job: impl FnOnce(&mut C) -> R + Send + 'static) -> Result<R, String> {
        self.call_ticking(job, || {})
    }

    /// [`Control::call`], calling `tick` every few milliseconds while the job runs (to
    /// report its progress).
    pub fn call_ticking<R: Send + 'static>(
        &self,
        job: impl FnOnce(&mut C) -> R + Send + 'static,
        mut tick: impl FnMut(),
    ) -> Result<R, String> {
        let (tx, rx) = mpsc::channel();
        {
            let mut s = lock(&self.state);
            if let Phase::Finished(how) = &s.phase {
                return Err(format!("the VM has finished ({how})"));
            }
            s.jobs.push_back(Box::new(move |ctx: &mut C| {
                let _ = tx.send(job(ctx));
            }));
        }
        self.changed.notify_all();
        loop {
            self.kick();
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    tick();
                    if let Phase::Finished(how) = self.phase() {
                        // The job may have run and sent its answer just before the run
                        // ended (a migration's switch-over ends it): that answer counts.
                        // The send happens before the finish, so it is here if it was sent.
                        return rx.try_recv().map_err(|_| format!("the VM has finished ({how})"));
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(format!("the VM has finished ({})", match self.phase() {
                        Phase::Finished(how) => how,
                        _ => "its vCPU stopped".into(),
                    }));
                }
            }
        }
    }

    /// Blocks until the VM is paused at a sync whose label matches (any if `None`), or
    /// finishes, or `timeout` passes. Returns the pause point.
    pub fn wait_for_pause(&self, label: Option<&str>, timeout: Duration) -> Result<SyncPoint, String> {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            match &s.phase {
                Phase::Paused(p) if label.is_none_or(|l| l == p.label) => return Ok(p.clone()),
                Phase::Finished(how) => return Err(format!("the VM has finished ({how})")),
                _ => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(format!("no matching sync within {} s", timeout.as_secs_f64()));
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job whose run ends the VM (a migration's switch-over) answers its caller even
    /// when the caller looks at the phase only after the run has ended.
    #[test]
    fn a_job_that_ends_the_run_still_answers() {
        let control = Arc::new(Control::<()>::default());
        let (go, go_rx) = mpsc::channel::<()>();
        let (done, done_rx) = mpsc::channel::<()>();
        let vcpu = {
            let control = control.clone();
            std::thread::spawn(move || {
                go_rx.recv().unwrap();
                control.run_jobs(&mut ());
                control.finish("migrated to tcp:x".into());
                done.send(()).unwrap();
            })
        };
        let mut first = true;
        // The vCPU runs the job and finishes between the caller's timeout and its look
        // at the phase: the race that once made `vmm migrate` report a success as a failure.
        let r = control.call_ticking(
            |_: &mut ()| 42,
            || {
                if std::mem::take(&mut first) {
                    go.send(()).unwrap();
                    done_rx.recv().unwrap();
                }
            },
        );
        vcpu.join().unwrap();
        assert_eq!(r, Ok(42));
        // A job queued after the run ended is refused, naming how it ended.
        let late = control.call(|_: &mut ()| 1);
        assert_eq!(late, Err("the VM has finished (migrated to tcp:x)".into()));
    }

    /// A job the vCPU never ran before the run ended is refused, not waited on forever.
    #[test]
    fn a_job_never_run_is_refused_once_the_run_ends() {
        let control = Arc::new(Control::<()>::default());
        let ender = {
            let control = control.clone();
            std::thread::spawn(move || {
                while !control.has_jobs() {
                    std::thread::yield_now();
                }
                control.finish("exit 0".into());
            })
        };
        let r = control.call(|_: &mut ()| 1);
        ender.join().unwrap();
        assert_eq!(r, Err("the VM has finished (exit 0)".into()));
    }
}
