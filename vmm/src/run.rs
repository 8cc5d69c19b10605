//! `vmm run`: everything from options to a finished guest, in one place.

use crate::api;
use crate::control::Control;
use crate::devices::Devices;
use crate::exit_code::ExitCode;
use crate::image::{self, Symbols};
use crate::memory;
use crate::runner::{self, Outcome, Runner, SyncHook, VcpuContext};
use crate::dirty_log::GpaLog;
use crate::engine::EngineKind;
use crate::guest_os::TableLocation;
use crate::script;
use crate::softdirty::Tracker;
use crate::vm::{self, Machine};
use crate::{boot, kick};
use guest_abi::{MAX_MEM, MEM_ALIGN};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Smallest guest: kernel, tables and a little room for processes.
pub const MIN_MEM_MIB: u64 = 16;
/// Room the guest needs beyond kernel and script (frame stack, page tables, data).
const MIN_FREE: u64 = 8 << 20;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub image: Option<PathBuf>,
    pub workload: Option<PathBuf>,
    pub mem_mib: u64,
    pub api_sock: Option<PathBuf>,
    pub timeout: Duration,
    pub engine: EngineKind,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0}: guest memory must be a multiple of 2 MiB between {MIN_MEM_MIB} and {max} MiB", max = MAX_MEM >> 20)]
    BadMemSize(u64),
    #[error("cannot read image {path}: {source}")]
    ReadImage { path: PathBuf, source: std::io::Error },
    #[error("guest memory is too small: kernel and script end at {end:#x}, leaving less than 8 MiB of {mem_mib} MiB")]
    TooLittleMemory { end: u64, mem_mib: u64 },
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
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::BadMemSize(_) | Error::ReadImage { .. } | Error::TooLittleMemory { .. } | Error::Image(_)
            | Error::Script(_) | Error::Api(_) => ExitCode::BadInput,
            Error::Vm(vm::Error::Open(_)) | Error::Vm(vm::Error::EngineUnavailable { .. }) => ExitCode::Unavailable,
            Error::Runner(runner::Error::Device(_)) => ExitCode::GuestCrashed,
            _ => ExitCode::Internal,
        }
    }
}

/// Boots the guest and runs it to the end. Bad input is reported before any guest runs.
pub fn run(opts: &RunOptions, hook: impl SyncHook) -> Result<Outcome, Error> {
    let mem_size = opts.mem_mib.checked_mul(1 << 20).ok_or(Error::BadMemSize(opts.mem_mib))?;
    if opts.mem_mib < MIN_MEM_MIB || mem_size > MAX_MEM || mem_size % MEM_ALIGN != 0 {
        return Err(Error::BadMemSize(opts.mem_mib));
    }
    let script = match &opts.workload {
        Some(path) => script::load(path)?,
        None => script::DEMO.as_bytes().to_vec(),
    };
    let (image_bytes, what) = match &opts.image {
        Some(path) => (
            std::fs::read(path).map_err(|source| Error::ReadImage { path: path.clone(), source })?,
            path.display().to_string(),
        ),
        None => (image::EMBEDDED_KERNEL.to_vec(), "the embedded guest kernel".to_string()),
    };

    let mem = memory::create(mem_size)?;
    let loaded = image::load(&mem, mem_size, &image_bytes, &what)?;
    boot::write_gdt(&mem)?;
    boot::write_page_tables(&mem, mem_size)?;
    let info = boot::write_boot_info(&mem, mem_size, loaded.end, &script)?;
    if info.free_phys + MIN_FREE > mem_size {
        return Err(Error::TooLittleMemory { end: info.free_phys, mem_mib: opts.mem_mib });
    }

    let Machine { kvm: _kvm, vm, vcpu, serial_irq, sync_regs, mechanism } = Machine::new(&mem, loaded.entry, opts.engine)?;
    let devices = Devices::new(serial_irq, Box::new(std::io::stdout()));
    kick::install().map_err(Error::Signal)?;
    let control = Arc::new(Control::<VcpuContext>::default());
    let _socket_file = match &opts.api_sock {
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
    let log = GpaLog::new(mem_size, mechanism, opts.engine == EngineKind::Pte);
    let tracker = Tracker::new(table, opts.engine, log, sync_regs);
    let ctx = VcpuContext { mem, vm, vcpu, symbols, tracker, exits: Default::default() };
    let mut runner = Runner { ctx, devices, control: control.clone(), pause_at_sync: opts.api_sock.is_some(), hook };
    let result = runner.run();
    control.finish(match &result {
        Ok(outcome) => outcome.describe(),
        Err(e) => e.to_string(),
    });
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();
    api::drain(Duration::from_millis(500));
    Ok(result?)
}
