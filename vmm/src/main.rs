//! The `vmm` command line.

use clap::{Parser, Subcommand};
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration;
use vmm::api::{self, ClientError};
use vmm::exit_code::ExitCode;
use vmm::run::{self, RunOptions};
use vmm::runner::{NoHook, Outcome};

#[derive(Parser)]
#[command(name = "vmm", version, about = "Per-process soft-dirty tracking of a KVM guest, from outside")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest (the embedded guest kernel unless IMAGE is given) and run a workload.
    Run {
        /// A guest kernel ELF built to the project's guest ABI.
        image: Option<PathBuf>,
        /// Workload script (default: the built-in demo).
        #[arg(long)]
        workload: Option<PathBuf>,
        /// Guest memory in MiB (multiple of 2).
        #[arg(long, default_value_t = 256)]
        mem: u64,
        /// Control socket; with it, the VM pauses at every `sync` until resumed.
        #[arg(long)]
        api_sock: Option<PathBuf>,
        /// Give up after this many seconds of guest running time (pauses excluded).
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
    /// Continue a VM paused at a `sync`.
    Resume {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Block until the VM is paused at a `sync` (optionally one with LABEL); print pid and label.
    Wait {
        #[arg(long)]
        api_sock: PathBuf,
        #[arg(long)]
        label: Option<String>,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

fn fail(code: ExitCode, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    code
}

fn client_code(e: &ClientError) -> ExitCode {
    match e {
        ClientError::Connect { .. } | ClientError::Io { .. } => ExitCode::Unavailable,
        ClientError::BadResponse { .. } => ExitCode::Internal,
        ClientError::Refused(_) => ExitCode::Refused,
    }
}

fn seconds(flag: &str, s: f64) -> Result<Duration, ExitCode> {
    if s.is_finite() && s > 0.0 && s < 1e9 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(fail(ExitCode::BadInput, format!("{flag} {s}: must be a positive number of seconds")))
    }
}

fn main_code() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::Success,
                _ => ExitCode::BadInput,
            };
        }
    };
    match cli.command {
        Command::Run { image, workload, mem, api_sock, timeout } => {
            let timeout = match seconds("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let opts = RunOptions { image, workload, mem_mib: mem, api_sock, timeout };
            match run::run(&opts, NoHook) {
                Ok(Outcome::Exited(0)) => ExitCode::Success,
                Ok(Outcome::Exited(c)) => {
                    eprintln!("vmm: guest exited with status {c}");
                    ExitCode::Guest(c)
                }
                Ok(o @ Outcome::TimedOut { .. }) => fail(ExitCode::Timeout, format!("{} (--timeout {}s)", o.describe(), opts.timeout.as_secs_f64())),
                Ok(o) => fail(ExitCode::GuestCrashed, o.describe()),
                Err(e) => fail(e.exit_code(), e),
            }
        }
        Command::Resume { api_sock } => match api::call(&api_sock, &json!({"cmd": "resume"})) {
            Ok(_) => ExitCode::Success,
            Err(e) => fail(client_code(&e), e),
        },
        Command::Wait { api_sock, label, timeout } => {
            let timeout = match seconds("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let req = json!({"cmd": "wait", "label": label, "timeout_ms": timeout.as_millis() as u64});
            match api::call(&api_sock, &req) {
                Ok(v) => {
                    println!("{} {}", v["pid"], v["label"].as_str().unwrap_or(""));
                    ExitCode::Success
                }
                Err(e) => fail(client_code(&e), e),
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(main_code().code())
}
