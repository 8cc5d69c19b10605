//! The vCPU loop: enter the guest, handle each exit, run jobs from the control socket
//! while the guest is stopped, until the guest reports its exit status or fails.

use crate::vcpu::control::Control;
use crate::machine::devices::{self, Devices, PortEvent, SyncPoint};
use crate::machine::image::Symbols;
use crate::machine::memory::GuestMem;
use guest_abi::EXIT_KERNEL_PANIC;
use crate::storage::progress::Progress;
use crate::storage::{dump, snapshot, History};
use crate::tracking::softdirty::{self, Tracker};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use std::path::Path;
use std::sync::Arc;

/// How a run ended, from the guest's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest kernel reported this status through the exit port.
    Exited(u8),
    /// The guest kernel panicked (it printed why on the console).
    KernelPanic,
    /// The guest cannot go on: triple fault, emulation failure, unexpected halt.
    Crashed(String),
    /// `--timeout` passed with the guest still running.
    TimedOut { rip: String },
    /// The VM migrated to this destination, which runs it now.
    MigratedAway(String),
}

impl Outcome {
    pub fn describe(&self) -> String {
        match self {
            Outcome::Exited(c) => format!("guest exited with status {c}"),
            Outcome::KernelPanic => "guest kernel panicked".into(),
            Outcome::Crashed(why) => format!("guest crashed: {why}"),
            Outcome::TimedOut { rip } => format!("guest timed out at rip {rip}"),
            Outcome::MigratedAway(to) => format!("migrated to {to}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_RUN failed: {0}")]
    Run(kvm_ioctls::Error),
    #[error(transparent)]
    Device(#[from] devices::Error),
    #[error("soft-dirty trap: {0}")]
    Trap(#[from] softdirty::Error),
}

/// What jobs and sync hooks get: the stopped guest.
pub struct VcpuContext {
    pub mem: GuestMem,
    pub vm: VmFd,
    pub vcpu: VcpuFd,
    pub symbols: Symbols,
    /// Dirty tracking (soft-dirty needs an image with a process table).
    pub tracker: Tracker,
    /// KVM_RUN calls and exits by kind, for `vmm info`.
    pub exits: ExitCounts,
    /// The guest image's SHA-256, the last snapshot, each pid's latest dump: what the
    /// next snapshot or dump builds on.
    pub history: History,
    /// The devices' state as of the guest's stop (snapshots save it).
    pub device_state: Vec<u8>,
    /// The guest image the VM booted (a migration sends it).
    pub image: Arc<Vec<u8>>,
    /// The sync the VM is paused at, while it is.
    pub paused_at: Option<SyncPoint>,
    /// Set by a migration's last job once the destination committed: the run ends.
    pub migrated_to: Option<String>,
}

impl VcpuContext {
    /// The stopped machine's state as the sections a snapshot or a migration carries:
    /// vCPU and VM ([`snapshot::capture`]), the tracker's (`tracker`) and the devices'
    /// (`serial`, as saved at the stop).
    pub fn machine_state(&mut self) -> Result<snapshot::Sections, snapshot::Error> {
        let mut sections = snapshot::capture(&self.vm, &mut self.vcpu)?;
        sections.insert("tracker".into(), self.tracker.export_state());
        sections.insert("serial".into(), self.device_state.clone());
        Ok(sections)
    }

    /// Writes a snapshot of the stopped guest to `out` (see [`snapshot::create`]): a
    /// diff since the last snapshot with `diff`, else a full one. It becomes the base
    /// of the next diff.
    pub fn snapshot(&mut self, out: &Path, diff: bool, progress: &Progress) -> Result<snapshot::Report, snapshot::Error> {
        let base = self.history.snapshot_base(diff)?.cloned();
        let source = snapshot::Source {
            mem: &self.mem,
            vm: &self.vm,
            vcpu: &mut self.vcpu,
            engine: self.tracker.engine(),
            tracker_state: self.tracker.export_state(),
            device_state: &self.device_state,
            image_sha256: &self.history.image_sha256,
            log: &mut self.tracker.log,
        };
        let (report, last) = snapshot::create(source, base.as_ref(), out, progress)?;
        self.history.last_snapshot = Some(last);
        Ok(report)
    }

    /// Dumps process `pid` to `out` (see [`dump::create`]): only what changed since
    /// `prev`, which must be its latest dump, when given. It becomes the only valid
    /// `prev` of the pid's next dump.
    pub fn dump(&mut self, pid: u32, out: &Path, prev: Option<&Path>, progress: &Progress) -> Result<dump::Report, dump::Error> {
        let source = dump::Source { mem: &self.mem, vcpu: &self.vcpu, tracker: &mut self.tracker };
        let (report, last) = dump::create(source, pid, out, prev, self.history.dumps.get(&pid), progress)?;
        self.history.dumps.insert(pid, last);
        Ok(report)
    }
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ExitCounts {
    pub total: u64,
    pub io: u64,
    pub debug: u64,
    pub interrupted: u64,
    pub ring_full: u64,
}

/// What to do at each `sync`.
pub trait SyncHook {
    /// Called on the vCPU thread with the guest stopped at `point`.
    fn at_sync(&mut self, ctx: &mut VcpuContext, point: &SyncPoint);
}

/// Pause at every sync (with a control socket) or just log it.
pub struct Runner<H> {
    pub ctx: VcpuContext,
    pub devices: Devices,
    pub control: Arc<Control<VcpuContext>>,
    pub pause_at_sync: bool,
    pub hook: H,
    /// Start paused at this sync (a VM that migrated in while paused there).
    pub start_paused: Option<SyncPoint>,
}

impl<H: SyncHook> Runner<H> {
    fn describe_rip(&self) -> String {
        match self.ctx.vcpu.get_regs() {
            Ok(regs) => self.ctx.symbols.describe(regs.rip),
            Err(e) => format!("unknown ({e})"),
        }
    }

    fn crashed(&mut self, what: &str) -> Outcome {
        let mut detail = format!("{what} at rip {}", self.describe_rip());
        if let Ok(sregs) = self.ctx.vcpu.get_sregs() {
            detail += &format!(" (cr2 {:#x}, cs {:#x})", sregs.cr2, sregs.cs.selector);
        }
        Outcome::Crashed(detail)
    }

    fn internal_error(&mut self) -> Outcome {
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the
        // active member of the union.
        let internal = unsafe { self.ctx.vcpu.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "KVM could not emulate an instruction".to_string(),
            s => format!("KVM internal error (suberror {s})"),
        };
        self.crashed(&what)
    }

    /// Is the guest at a point where its kernel is not changing page tables or the
    /// process table? Ring 3 is; a `sync` stop is handled separately (`pause_at`).
    fn at_safe_point(&self) -> bool {
        self.ctx.vcpu.get_sregs().is_ok_and(|s| s.cs.selector & 3 == 3)
    }

    /// Pauses at `point` until resumed (running jobs meanwhile). `Some` if a job ended
    /// the run meanwhile (the VM migrated away).
    fn pause(&mut self, point: SyncPoint) -> Option<Outcome> {
        self.ctx.device_state = self.devices.save();
        self.ctx.paused_at = Some(point.clone());
        self.control.pause_at(point, &mut self.ctx);
        self.ctx.paused_at = None;
        self.ctx.migrated_to.take().map(Outcome::MigratedAway)
    }

    /// Runs the guest to its end.
    pub fn run(&mut self) -> Result<Outcome, Error> {
        self.control.vcpu_started(crate::machine::kick::Kicker::current());
        if let Some(point) = self.start_paused.take() {
            eprintln!("vmm: paused at sync {} (pid {}), as the VM was when it migrated", point.label, point.pid);
            if let Some(done) = self.pause(point) {
                return Ok(done);
            }
        }
        loop {
            self.control.throttle.hold_if_due();
            if self.control.timed_out() {
                return Ok(Outcome::TimedOut { rip: self.describe_rip() });
            }
            if self.control.has_jobs() && self.at_safe_point() {
                self.ctx.device_state = self.devices.save();
                self.control.run_jobs(&mut self.ctx);
                if let Some(to) = self.ctx.migrated_to.take() {
                    return Ok(Outcome::MigratedAway(to));
                }
            }
            self.ctx.exits.total += 1;
            let event = match self.ctx.vcpu.run() {
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.ctx.exits.io += 1;
                    self.devices.io_out(&self.ctx.mem, port, data)?
                }
                Ok(VcpuExit::Debug(arch)) => {
                    self.ctx.exits.debug += 1;
                    let pc = arch.pc;
                    let ctx = &mut self.ctx;
                    let outcome = ctx.tracker.on_debug_exit(&ctx.mem, &mut ctx.vcpu, pc)?;
                    if let softdirty::TrapOutcome::NotOurs = outcome {
                        return Ok(self.crashed(&format!("unexpected debug exit at {pc:#x}")));
                    }
                    PortEvent::Nothing
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.devices.io_in(port, data);
                    PortEvent::Nothing
                }
                Ok(VcpuExit::MmioRead(_, data)) => {
                    data.fill(0xff);
                    PortEvent::Nothing
                }
                Ok(VcpuExit::MmioWrite(..)) => PortEvent::Nothing,
                Ok(VcpuExit::Unsupported(crate::tracking::source::kvm_ring::KVM_EXIT_DIRTY_RING_FULL)) => {
                    self.ctx.exits.ring_full += 1;
                    let ctx = &mut self.ctx;
                    ctx.tracker.log.harvest_ring_full(&ctx.mem).map_err(softdirty::Error::from)?;
                    PortEvent::Nothing
                }
                Ok(VcpuExit::Hlt) => return Ok(self.crashed("guest halted without reporting an exit status")),
                Ok(VcpuExit::Shutdown) => return Ok(self.crashed("triple fault (shutdown)")),
                Ok(VcpuExit::InternalError) => return Ok(self.internal_error()),
                Ok(VcpuExit::FailEntry(reason, _)) => {
                    return Ok(Outcome::Crashed(format!("VM entry failed (hardware reason {reason:#x})")))
                }
                Ok(other) => {
                    let what = format!("unexpected exit {other:?}");
                    return Ok(self.crashed(&what));
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.ctx.exits.interrupted += 1;
                    PortEvent::Nothing
                }
                Err(e) => return Err(Error::Run(e)),
            };
            match event {
                PortEvent::Nothing => {}
                // The zeroing went through vm-memory, whose dirty bitmap recorded it.
                PortEvent::Zeroed(_) => {}
                PortEvent::Exit(status) if status >= EXIT_KERNEL_PANIC => return Ok(Outcome::KernelPanic),
                PortEvent::Exit(status) => return Ok(Outcome::Exited((status & 0xff) as u8)),
                PortEvent::Proc(addr) => super::linux_proc::answer(&mut self.ctx, addr).map_err(|e| {
                    devices::Error::BadRequest { what: "proc", addr, why: e.to_string() }
                })?,
                PortEvent::Sync(point) => {
                    eprintln!("vmm: sync {} (pid {})", point.label, point.pid);
                    self.hook.at_sync(&mut self.ctx, &point);
                    if self.pause_at_sync {
                        if let Some(done) = self.pause(point) {
                            return Ok(done);
                        }
                    } else {
                        self.control.passed_sync();
                    }
                }
            }
        }
    }
}
