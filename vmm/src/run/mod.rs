//! `vmm run`: everything from options to a finished guest, in one place.

pub mod child;
pub mod scenario;
pub mod summary;

use crate::api;
use crate::vcpu::control::Control;
use crate::machine::devices::Devices;
use crate::exit_code::ExitCode;
use crate::machine::image::{self, Symbols};
use crate::machine::memory;
use crate::vcpu::runner::{self, Outcome, Runner, SyncHook, VcpuContext};
use crate::tracking::dirty_log::GpaLog;
use crate::tracking::engine::EngineKind;
use crate::guest_os::TableLocation;
use crate::guest_os::linux::{self, layout::Placement};
use crate::guest_os::script;
use crate::tracking::softdirty::Tracker;
use crate::machine::vm::{self, Machine};
use crate::machine::{boot, kick};
use guest_abi::{MAX_MEM, MEM_ALIGN};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a destination prints on stderr, followed by its address (with the port it
/// bound), once it listens: how a caller of `--incoming tcp:HOST:0` learns the port.
pub const WAITING_FOR_MIGRATION: &str = "vmm: waiting for a migration on ";

/// Smallest guest: kernel, tables and a little room for processes.
pub const MIN_MEM_MIB: u64 = memory::MIN_MEM_BYTES >> 20;
/// Room the guest needs beyond kernel and script (frame stack, page tables, data).
const MIN_FREE: u64 = 8 << 20;
pub use crate::machine::image::MAX_IMAGE_BYTES;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: Option<PathBuf>,
    pub workload: Option<PathBuf>,
    pub mem_mib: u64,
    pub api_sock: Option<PathBuf>,
    pub timeout: Duration,
    pub engine: EngineKind,
    /// Restore this snapshot (a full one or a diff, whose chain is followed) instead of
    /// booting; `workload`, `mem` and `engine` then come from the snapshot (the command
    /// line refuses them with `--restore`).
    pub restore: Option<PathBuf>,
    /// Wait (up to `timeout`) for one incoming migration on this address and run the VM
    /// it brings: image, memory, engine and state all come from the source.
    pub incoming: Option<crate::migration::Addr>,
    /// `--tls-cert`, `--tls-key`, `--tls-ca`, `--insecure-plaintext` for `incoming`.
    pub incoming_security: crate::migration::transport::Flags,
    /// Run this static Linux program as the guest's process instead of a workload.
    pub exec: Option<ExecOptions>,
    /// `--file HOST[:GUEST]` specs: read-only files in the guest, for a Linux program
    /// (`exec`, or a script's `proc NAME exec PATH`).
    pub files: Vec<String>,
    /// `--initrd FILE.cpio`: the archive's regular files go into the guest too.
    pub initrd: Option<PathBuf>,
}

/// `vmm run --exec PROGRAM -- ARGS...`.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub program: PathBuf,
    /// After `argv[0]` (the program as given).
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0}: guest memory must be a multiple of 2 MiB between {MIN_MEM_MIB} and {max} MiB", max = MAX_MEM >> 20)]
    BadMemSize(u64),
    #[error("cannot read image {path}: {source}")]
    ReadImage { path: PathBuf, source: std::io::Error },
    #[error("guest memory is too small for {what}: kernel and script end at {end:#x}, leaving less than 8 MiB of {mem_mib} MiB")]
    TooLittleMemory { what: String, end: u64, mem_mib: u64 },
    #[error(transparent)]
    Image(#[from] image::Error),
    #[error(transparent)]
    Script(#[from] script::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Api(#[from] api::Error),
    #[error(transparent)]
    Runner(#[from] runner::Error),
    #[error("cannot restore: {0}")]
    Snapshot(#[from] crate::storage::snapshot::Error),
    #[error("cannot restore {path}: it was taken with another guest image (sha256 {want}, this one is {have})")]
    ImageMismatch { path: PathBuf, want: String, have: String },
    #[error("cannot restore the tracking engine's state: {0}")]
    TrackerState(String),
    #[error("cannot restore the devices' state: {0}")]
    DeviceState(String),
    #[error(transparent)]
    Incoming(#[from] crate::migration::incoming::Error),
    #[error(transparent)]
    Program(#[from] crate::guest_os::linux::ReadError),
    #[error("cannot tell the migration source to stop: {0}")]
    Commit(std::io::Error),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::BadMemSize(_) | Error::ReadImage { .. } | Error::TooLittleMemory { .. } | Error::Image(_)
            | Error::Script(_) | Error::Api(_) | Error::Snapshot(_) | Error::ImageMismatch { .. }
            | Error::TrackerState(_) | Error::DeviceState(_) | Error::Incoming(_) | Error::Program(_) => ExitCode::BadInput,
            Error::Vm(vm::Error::Open(_)) | Error::Vm(vm::Error::EngineUnavailable { .. }) => ExitCode::Unavailable,
            Error::Runner(runner::Error::Device(_)) => ExitCode::GuestCrashed,
            _ => ExitCode::Internal,
        }
    }
}

/// Boots the guest and runs it to the end. Bad input is reported before any guest runs.
pub fn run(opts: &RunOptions, hook: impl SyncHook) -> Result<Outcome, Error> {
    // A migration's VM is built as soon as its memory exists, while the frames arrive.
    let (mut incoming, built) = match &opts.incoming {
        Some(addr) => {
            let listener = crate::migration::incoming::listen(addr, &opts.incoming_security)?;
            // With the port bound: `tcp:HOST:0` says here which port it got.
            eprintln!("{WAITING_FOR_MIGRATION}{}", listener.addr());
            let (inc, built) = crate::migration::incoming::receive(listener, opts.timeout, |hello, mem| {
                let setup = hello.engine.setup();
                // A migrated vCPU carries its own registers: no entry point.
                let machine = Machine::new(mem, 0, &setup)?;
                Ok::<_, Error>((setup, machine))
            })?;
            (Some(inc), Some(built))
        }
        None => (None, None),
    };
    // Post-copy: missing frames are fetched on touch from here on.
    let demand = match &mut incoming {
        Some(inc) => inc.start_postcopy()?,
        None => None,
    };
    let (image_bytes, what) = match (&mut incoming, &opts.image) {
        (Some(inc), _) => (std::mem::take(&mut inc.image), "the migrated guest's image".to_string()),
        (None, Some(path)) => (
            crate::input::read_limited(path, MAX_IMAGE_BYTES).map_err(|source| Error::ReadImage { path: path.clone(), source })?,
            path.display().to_string(),
        ),
        (None, None) => (image::EMBEDDED_KERNEL.to_vec(), "the embedded guest kernel".to_string()),
    };
    // A migrated image was checked against this digest as it arrived.
    let image_sha256 = match &incoming {
        Some(inc) => inc.hello.image_sha256.clone(),
        None => crate::storage::snapshot::sha256_hex(&image_bytes),
    };
    let paused = incoming.as_ref().and_then(|inc| inc.paused.clone());
    // The kernel's entry point when booting; a restored vCPU carries its own registers.
    // `restored`: the saved state sections, and the snapshot they came from (if any).
    let (mem, mem_size, engine, restored, entry) = match (&incoming, &opts.restore) {
        (Some(inc), _) => (inc.mem.clone(), inc.hello.mem_bytes, inc.hello.engine, Some((inc.state.clone(), None)), 0),
        (None, Some(dir)) => {
            // Every link, size and checksum is checked before a VM exists: the manifests
            // first, then every file as it is loaded into the (still unused) memory.
            let chain = crate::storage::snapshot::resolve_chain(dir)?;
            let top = &chain.last().expect("a chain is never empty").1;
            if top.image_sha256 != image_sha256 {
                return Err(Error::ImageMismatch { path: dir.clone(), want: top.image_sha256.clone(), have: image_sha256 });
            }
            let mem_size = top.mem_bytes;
            let mem = memory::create(mem_size)?;
            let loaded = crate::storage::snapshot::load(dir, Some(&mem))?;
            // What restoring wrote is not a guest write.
            memory::take_vmm_writes(&mem);
            let id = loaded.manifest.id.clone();
            (mem, mem_size, loaded.manifest.engine, Some((loaded.state, Some((dir.clone(), id)))), 0)
        }
        (None, None) => {
            let mem_size = opts.mem_mib.checked_mul(1 << 20).ok_or(Error::BadMemSize(opts.mem_mib))?;
            if opts.mem_mib < MIN_MEM_MIB || mem_size > MAX_MEM || mem_size % MEM_ALIGN != 0 {
                return Err(Error::BadMemSize(opts.mem_mib));
            }
            // A Linux program is read and checked before any VM exists; its process is
            // the script's one `proc`.
            let mut files = opts.files.iter().map(|f| linux::read_file(f)).collect::<Result<Vec<_>, _>>()?;
            if let Some(path) = &opts.initrd {
                let archive = linux::read_initrd(path)?;
                if !archive.skipped.is_empty() {
                    eprintln!(
                        "vmm: --initrd {}: {} entries are not regular files or directories and are not in the guest (first: {})",
                        path.display(),
                        archive.skipped.len(),
                        archive.skipped[0]
                    );
                }
                files.extend(archive.files);
            }
            let exec = opts.exec.as_ref().map(|e| linux::read(&e.program, &e.args)).transpose()?;
            let script = match (&exec, &opts.workload) {
                (Some(x), _) => format!("proc {}\n", x.name).into_bytes(),
                (None, Some(path)) => script::load(path)?,
                (None, None) => script::DEMO.as_bytes().to_vec(),
            };
            // The program, and which process runs it: --exec's own, or a script's
            // `proc NAME exec PATH` (one per run: vector registers are not switched
            // between Linux processes).
            let exec = match exec {
                Some(x) => Some((x, Placement { proc_index: 0, owns_console: true })),
                None => {
                    let mut execs = workload::execs(&script);
                    let first = execs.next();
                    if let Some((_, second)) = execs.next() {
                        let path = String::from_utf8_lossy(second.words().next().unwrap_or_default()).into_owned();
                        return Err(Error::Program(linux::ReadError::File { spec: path, why: "a second Linux program in one script: at most one runs per VM for now".into() }));
                    }
                    match first {
                        Some((index, e)) => Some((linux::from_script(&e, &files)?, Placement { proc_index: index as u64, owns_console: false })),
                        None => None,
                    }
                }
            };
            if exec.is_none() {
                const WHY: &str = "no Linux program to read it: --file and --initrd go with --exec or a script's `proc NAME exec PATH`";
                if let Some(spec) = opts.files.first() {
                    return Err(Error::Program(linux::ReadError::File { spec: spec.clone(), why: WHY.into() }));
                }
                if let Some(path) = &opts.initrd {
                    return Err(Error::Program(linux::ReadError::Initrd { path: path.clone(), why: WHY.into() }));
                }
            }
            let mem = memory::create(mem_size)?;
            let loaded = image::load(&mem, mem_size, &image_bytes, &what)?;
            // Bad input, not a failed write: check that the boot data fits before writing it.
            let placed = boot::place_script(loaded.end, script.len() as u64);
            let blob = match (&exec, placed) {
                (Some((x, at)), Some((_, after_script))) => x.lay_out(&files, after_script, *at)?,
                _ => Vec::new(),
            };
            let end = placed.and_then(|(_, free)| free.checked_add(blob.len() as u64));
            if end.and_then(|e| e.checked_add(MIN_FREE)).is_none_or(|need| need > mem_size) {
                let what = match &opts.exec {
                    Some(e) => format!("the program {}", e.program.display()),
                    None => what,
                };
                return Err(Error::TooLittleMemory { what, end: end.unwrap_or(u64::MAX), mem_mib: opts.mem_mib });
            }
            boot::write_gdt(&mem)?;
            boot::write_page_tables(&mem, mem_size)?;
            boot::write_boot_info(&mem, mem_size, loaded.end, &script, &blob)?;
            (mem, mem_size, opts.engine, None, loaded.entry)
        }
    };
    let (setup, machine) = match built {
        Some(built) => built,
        None => {
            let setup = engine.setup();
            let machine = Machine::new(&mem, entry, &setup)?;
            (setup, machine)
        }
    };
    if restored.is_none() {
        // A booting guest's clock: the TSC rate is the vCPU's (unknown: 0, and Linux
        // programs' clocks then stand still at the boot time).
        let khz = machine.vcpu.get_tsc_khz().map(u64::from).unwrap_or(0);
        boot::write_clock(&mem, khz)?;
    }
    let source = setup.attach(&machine, &mem)?;
    let Machine { kvm: _kvm, vm, vcpu, serial_irq, sync_regs } = machine;
    let devices = match restored.as_ref().and_then(|(state, _)| state.get("serial")) {
        Some(saved) => Devices::restore(serial_irq, Box::new(std::io::stdout()), saved).map_err(Error::DeviceState)?,
        None => Devices::new(serial_irq, Box::new(std::io::stdout())),
    };
    kick::install().map_err(Error::Signal)?;
    let control = Arc::new(Control::<VcpuContext>::default());
    let socket_file = match &opts.api_sock {
        Some(path) => Some(api::Server::bind(path)?.spawn(control.clone())?),
        None => None,
    };

    let done = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (control, done, timeout) = (control.clone(), done.clone(), opts.timeout);
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                // Kick again on every round: a kick that lands outside KVM_RUN is lost.
                if control.running_time() > timeout {
                    control.time_out();
                }
            }
        })
    };

    let symbols = Symbols::parse(&image_bytes);
    let table = TableLocation::from_symbol(symbols.address_of(guest_abi::PROCESS_TABLE_SYMBOL)).ok();
    let log = GpaLog::new(mem_size, source, engine.initially_dirty());
    let mut tracker = Tracker::new(table, engine, log, sync_regs);
    if let Some((state, _)) = &restored {
        crate::storage::snapshot::apply(&vm, &vcpu, state)?;
        if let Some(raw) = state.get("tracker") {
            tracker.import_state(raw, &mem, &vcpu).map_err(Error::TrackerState)?;
        }
        // Memory now equals the restored snapshot: the next diff is relative to it.
        tracker.log.snapshot_start().map_err(|e| Error::TrackerState(e.to_string()))?;
    }
    let mut history = crate::storage::History::new(image_sha256);
    // A migrated VM's first snapshot is a full one: its chain stayed with the source.
    history.last_snapshot = restored.as_ref().and_then(|(_, from)| from.as_ref()).map(|(dir, id)| crate::storage::snapshot::Last::at(dir, id));
    let ctx = VcpuContext { mem, vm, vcpu, symbols, tracker, exits: Default::default(), history, device_state: Vec::new(),
        image: Arc::new(image_bytes), paused_at: None, migrated_to: None };
    if let Some(inc) = incoming {
        // Everything is in place: from here on the guest runs on this side only.
        inc.commit().map_err(Error::Commit)?;
    }
    let mut runner = Runner { ctx, devices, control: control.clone(), pause_at_sync: opts.api_sock.is_some(), hook,
        start_paused: paused.filter(|_| opts.api_sock.is_some()) };
    let result = runner.run();
    if let Some(d) = demand {
        // The source pushes what is left; the run ends once it is all here.
        d.finish();
    }
    control.finish(match &result {
        Ok(outcome) => outcome.describe(),
        Err(e) => e.to_string(),
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    if let Some(socket_file) = &socket_file {
        socket_file.drain(Duration::from_millis(500));
    }
    Ok(result?)
}
