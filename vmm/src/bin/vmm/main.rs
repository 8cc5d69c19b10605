//! The `vmm` command line.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;
use vmm::api::{self, ClientError, ErrorKind, PagemapFormat, Request};
use vmm::EngineKind;
use vmm::ExitCode;
use vmm::run::{self, RunOptions};
use vmm::Outcome;
use vmm::run::summary::{Hook, SummaryHook};

mod heatmap;
mod migrate;
mod scan;
mod store;

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
        /// At every sync, print each process's mapped and soft-dirty page counts, then
        /// clear (always on for the built-in demo).
        #[arg(long)]
        summary: bool,
        /// How writes are tracked: pte (per process, precise), or guest-physical
        /// kvm-bitmap, kvm-ring, uffd.
        #[arg(long, value_enum, default_value_t = EngineKind::Hybrid)]
        engine: EngineKind,
        /// Restore this snapshot (full, or a diff whose chain is followed) and go on
        /// running it; the workload, memory size and engine come from the snapshot
        /// (given explicitly, even at their defaults, they are refused).
        #[arg(long, conflicts_with_all = ["workload", "summary", "mem", "engine"])]
        restore: Option<PathBuf>,
        /// Wait (up to --timeout) for one incoming live migration on ADDR (unix:PATH, or
        /// tcp:HOST:PORT with TLS) and run the VM it brings; image, memory, engine and
        /// state come from the source.
        #[arg(long, value_name = "ADDR", conflicts_with_all = ["image", "workload", "mem", "engine", "restore"])]
        incoming: Option<vmm::migration::Addr>,
        #[command(flatten)]
        tls: TlsArgs,
        /// Run this static x86-64 Linux program (ET_EXEC or static-PIE) as the guest's
        /// process, with the ARGS after `--`: its output is the console (stdout), the
        /// kernel's own lines go to stderr, and `vmm run` exits with its status.
        #[arg(long, value_name = "PROGRAM", conflicts_with_all = ["image", "workload", "restore", "incoming", "summary"])]
        exec: Option<PathBuf>,
        /// Put HOST into the guest's file system at GUEST (an absolute path; default:
        /// `/` and HOST's file name), for the --exec program or a script's
        /// `proc NAME exec PATH`. Repeatable.
        #[arg(long = "file", value_name = "HOST[:GUEST]")]
        files: Vec<String>,
        /// Put the regular files of this cpio archive ("newc", as `cpio -H newc` and
        /// initramfs tools make it) into the guest's file system, at their paths.
        #[arg(long, value_name = "FILE.cpio")]
        initrd: Option<PathBuf>,
        /// The --exec program's arguments.
        #[arg(last = true, value_name = "ARGS", requires = "exec")]
        args: Vec<String>,
    },
    /// Live-migrate a running (or sync-paused) VM to a `vmm run --incoming ADDR`: one
    /// progress line per pre-copy round, then a summary. The source's run then ends with
    /// status 80; if the migration fails, the VM goes on here.
    Migrate {
        #[arg(long)]
        api_sock: PathBuf,
        /// Destination: unix:PATH, or tcp:HOST:PORT (TLS: --tls-cert, --tls-key, --tls-ca).
        #[arg(long, value_name = "ADDR")]
        to: String,
        #[command(flatten)]
        tls: TlsArgs,
        /// Switch over once the last dirty set is expected to take at most this long.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Cap on the send rate (MiB/s).
        #[arg(long, value_name = "MIB_S")]
        bandwidth: Option<u64>,
        /// Bound on the whole migration; past it the migration is cancelled cleanly.
        #[arg(long, default_value_t = 300.0)]
        timeout: f64,
        /// Post-copy: switch over after round 0; the destination runs at once and fetches
        /// the frames dirtied since on demand while the rest is pushed. A failure of
        /// either side after the switch-over loses the guest (docs/migration.md).
        #[arg(long)]
        postcopy: bool,
        /// Pre-copy; if it has not converged when --timeout passes, switch to post-copy
        /// instead of cancelling (at the end of the round that runs then).
        #[arg(long, conflicts_with = "postcopy")]
        postcopy_fallback: bool,
        /// Never throttle the guest, even when it dirties memory faster than the link
        /// carries (the migration then ends only by converging, the timeout or a cancel).
        #[arg(long)]
        no_throttle: bool,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Cancel the running migration of a VM; the VM goes on where it is.
    MigrateCancel {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Snapshots of a running VM.
    #[command(subcommand)]
    Snapshot(store::SnapshotCommand),
    /// Dump one guest process's memory from outside (CRIU-style), incrementally with
    /// --prev; or `dump verify DIR`.
    Dump(store::DumpArgs),
    /// Pages written per second, for the whole VM and per guest process.
    DirtyRate {
        #[arg(long)]
        api_sock: PathBuf,
        /// Measurement window.
        #[arg(long, default_value_t = 1.0)]
        seconds: f64,
        #[arg(long)]
        json: bool,
    },
    /// The dirty rates, refreshed live in the terminal (Ctrl-C to stop).
    Top {
        #[arg(long)]
        api_sock: PathBuf,
        /// Seconds per refresh.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Stop after this many refreshes (0: until the VM finishes).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
    /// List guest processes, found from outside through the guest kernel's process table.
    Ps {
        #[arg(long)]
        api_sock: PathBuf,
        /// One JSON object per process.
        #[arg(long)]
        json: bool,
    },
    /// Like `echo VALUE > /proc/PID/clear_refs` for a guest process (VALUE 1-5, default 4).
    ClearRefs {
        #[arg(long)]
        api_sock: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(default_value_t = 4)]
        value: u64,
    },
    /// Like reading /proc/PID/pagemap of a guest process (default: every mapped page).
    Pagemap {
        #[arg(long)]
        api_sock: PathBuf,
        #[arg(long)]
        pid: u32,
        /// First address (hex, page-aligned).
        #[arg(long, value_parser = parse_hex)]
        start: Option<u64>,
        /// Number of pages (default 1 with --start).
        #[arg(long)]
        pages: Option<u64>,
        /// One JSON object per page.
        #[arg(long, conflicts_with = "raw")]
        json: bool,
        /// Exactly Linux's format: 8 bytes per page, little endian.
        #[arg(long)]
        raw: bool,
    },
    /// Like Linux's PAGEMAP_SCAN ioctl on a guest process: the pages of its mappings as
    /// regions of equal flags (written, present, file-shared, huge). With --clear, what
    /// was scanned is cleared in the same stop of the guest: no write between the read
    /// and the clear is lost.
    PagemapScan {
        #[arg(long)]
        api_sock: PathBuf,
        #[arg(long)]
        pid: u32,
        /// First address (hex, page-aligned; default 0).
        #[arg(long, value_parser = parse_hex)]
        start: Option<u64>,
        /// End of the range, exclusive (hex, page-aligned; default: the top of the user half).
        #[arg(long, value_parser = parse_hex)]
        end: Option<u64>,
        /// Only pages written (soft-dirty) since the last clear.
        #[arg(long)]
        written: bool,
        /// Clear the scanned pages (like PM_SCAN_WP_MATCHING), in the same stop of the guest.
        #[arg(long)]
        clear: bool,
        /// Stop after this many regions (the walk's end goes to stderr, or into the JSON).
        #[arg(long)]
        max_regions: Option<u64>,
        /// One JSON object: {"pid", "regions": [...], "walk_end", "pages_scanned", "entries_changed"}.
        #[arg(long)]
        json: bool,
    },
    /// Where each guest process writes, drawn: one panel per process, time along x, its
    /// mappings along y (large ones binned), each cell coloured by the share of its pages
    /// written in that interval. The guest keeps running while it is sampled.
    Heatmap {
        #[arg(long)]
        api_sock: PathBuf,
        /// Only this process (default: every live one).
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to sample (at most 600).
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Milliseconds per interval (10 to 60000; at most 1000 intervals).
        #[arg(long, default_value_t = 100)]
        interval: u64,
        /// The picture: FILE.svg or FILE.png.
        #[arg(long)]
        out: PathBuf,
        /// Also print the matrix (per process, rows of address ranges with a count per interval) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Tracking engine, guest memory size and counters (JSON).
    Info {
        #[arg(long)]
        api_sock: PathBuf,
    },
    /// Run scenario files (workload + host plan) through this VMM and print the
    /// normalized results (the same format as the Linux oracle's `sd-linux`).
    Scenario {
        files: Vec<PathBuf>,
        #[arg(long, value_enum, default_value_t = EngineKind::Hybrid)]
        engine: EngineKind,
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

/// How a tcp: migration is protected (docs/migration.md): mutual TLS, or plaintext by
/// explicit choice.
#[derive(clap::Args)]
struct TlsArgs {
    /// This side's certificate chain (PEM, leaf first), for a tcp: address.
    #[arg(long, value_name = "PATH")]
    tls_cert: Option<PathBuf>,
    /// This side's private key (PEM).
    #[arg(long, value_name = "PATH")]
    tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that the other side's certificate must chain to.
    #[arg(long, value_name = "PATH")]
    tls_ca: Option<PathBuf>,
    /// TCP without TLS: the VM's memory and state travel unencrypted, to and from anyone
    /// who can reach the port. Only for a network you trust entirely.
    #[arg(long)]
    insecure_plaintext: bool,
}

impl TlsArgs {
    fn flags(self) -> vmm::migration::transport::Flags {
        vmm::migration::transport::Flags {
            tls_cert: self.tls_cert,
            tls_key: self.tls_key,
            tls_ca: self.tls_ca,
            insecure_plaintext: self.insecure_plaintext,
        }
    }
}

fn parse_hex(s: &str) -> Result<u64, String> {
    let digits = s.strip_prefix("0x").unwrap_or(s);
    u64::from_str_radix(digits, 16).map_err(|_| format!("'{s}' is not a hex address"))
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// `v` as one JSON line, keys sorted (as `--json` output has always been).
fn json_line(v: &impl serde::Serialize) -> String {
    serde_json::to_value(v).map(|v| v.to_string()).unwrap_or_default()
}

fn print_ps(v: &api::Processes, as_json: bool) {
    if as_json {
        for p in &v.processes {
            println!("{}", json_line(p));
        }
        return;
    }
    println!("{:>4}  {:<15}  {:<8}  {:>12}  {:>9}  {:>9}", "PID", "NAME", "STATE", "PAGE-TABLE", "RSS", "PEAK-RSS");
    for p in &v.processes {
        println!(
            "{:>4}  {:<15}  {:<8}  {:>#12x}  {:>9}  {:>9}",
            p.pid, p.name, p.state, p.cr3, p.rss_pages, p.peak_rss_pages
        );
    }
}

/// Where printing a streamed pagemap failed.
enum PagemapOutput {
    Stdout(std::io::Error),
    Vmm(String),
}

/// Prints a streamed pagemap answer page by page (memory bounded, whatever its size).
fn print_pagemap(header: &api::PagemapHeader, mut body: impl std::io::BufRead, json: bool, raw: bool)
    -> Result<(), PagemapOutput> {
    use std::io::{Read, Write};
    let vmm_err = |e: std::io::Error| PagemapOutput::Vmm(e.to_string());
    let count = header.count;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if raw {
        let bytes = count.checked_mul(8).ok_or_else(|| PagemapOutput::Vmm(format!("{count} pages is not a size")))?;
        let copied = std::io::copy(&mut (&mut body).take(bytes), &mut out).map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => PagemapOutput::Stdout(e),
            _ => vmm_err(e),
        })?;
        if copied != bytes {
            return Err(PagemapOutput::Vmm(format!("the answer ended after {copied} of {bytes} bytes")));
        }
        return out.flush().map_err(PagemapOutput::Stdout);
    }
    if !json {
        writeln!(out, "{:<18}  {:<7}  {:>10}  {:<10}  {:<9}  {:<4}  {:<8}", "ADDRESS", "PRESENT", "PFN", "SOFT-DIRTY",
                 "EXCLUSIVE", "HUGE", "ACCESSED").map_err(PagemapOutput::Stdout)?;
    }
    let mut line = String::new();
    for i in 0..count {
        line.clear();
        if body.read_line(&mut line).map_err(vmm_err)? == 0 {
            return Err(PagemapOutput::Vmm(format!("the answer ended after {i} of {count} pages")));
        }
        if json {
            out.write_all(line.as_bytes()).map_err(PagemapOutput::Stdout)?;
            continue;
        }
        let p: api::Page = serde_json::from_str(&line).map_err(|e| PagemapOutput::Vmm(format!("page {i}: {e}")))?;
        let pfn = p.pfn.map_or("-".to_string(), |n| format!("{n:#x}"));
        writeln!(out, "{:<#18x}  {:<7}  {:>10}  {:<10}  {:<9}  {:<4}  {:<8}", p.addr, yes(p.present), pfn,
                 yes(p.soft_dirty), yes(p.exclusive), yes(p.huge), yes(p.accessed)).map_err(PagemapOutput::Stdout)?;
    }
    out.flush().map_err(PagemapOutput::Stdout)
}

fn print_rates(v: &api::DirtyRate) {
    println!(
        "window {:.2} s (guest ran {:.2} s): VM {:.0} pages/s ({} pages)",
        v.seconds, v.running_seconds, v.vm_pages_per_second, v.vm_pages
    );
    println!("{:>4}  {:<15}  {:>12}  {:>9}", "PID", "NAME", "PAGES/S", "PAGES");
    for p in &v.processes {
        println!("{:>4}  {:<15}  {:>12.0}  {:>9}", p.pid, p.name, p.pages_per_second, p.pages);
    }
}

pub(crate) fn fail(code: ExitCode, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("vmm: error: {msg}");
    code
}

/// The exit code for a failed client command (docs/cli.md).
pub(crate) fn client_code(e: &ClientError) -> ExitCode {
    match e {
        ClientError::Connect { .. } | ClientError::Io { .. } | ClientError::TimedOut { .. } => ExitCode::Unavailable,
        ClientError::BadResponse { .. } => ExitCode::Internal,
        // Every refusal exits 65, whatever its kind, as it always has; the kinds are
        // spelled out so that a new one is a decision here, not a default.
        ClientError::Refused { kind, .. } => match kind {
            ErrorKind::Finished
            | ErrorKind::BadRequest
            | ErrorKind::UnknownPid
            | ErrorKind::NotLive
            | ErrorKind::NotPaused
            | ErrorKind::Busy
            | ErrorKind::Timeout
            | ErrorKind::Io
            | ErrorKind::Internal
            | ErrorKind::Cancelled
            | ErrorKind::Migration
            | ErrorKind::Unknown => ExitCode::Refused,
        },
    }
}

fn seconds_arg(flag: &str, s: f64) -> Result<Duration, ExitCode> {
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
        Command::Run { image, workload, mem, api_sock, timeout, summary, engine, restore, incoming, tls, exec, files, initrd, args } => {
            let timeout = match seconds_arg("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let incoming_security = tls.flags();
            if incoming.is_none() && incoming_security != Default::default() {
                return fail(ExitCode::BadInput, "--tls-cert, --tls-key, --tls-ca and --insecure-plaintext go with --incoming");
            }
            let hook =
                if summary || (workload.is_none() && restore.is_none() && incoming.is_none() && exec.is_none()) { Hook::Summary(SummaryHook) } else { Hook::None };
            let exec = exec.map(|program| vmm::run::ExecOptions { program, args });
            let opts = RunOptions { image, workload, mem_mib: mem, api_sock, timeout, engine, restore, incoming, incoming_security, exec, files, initrd };
            match run::run(&opts, hook) {
                Ok(Outcome::Exited(0)) => ExitCode::Success,
                Ok(Outcome::Exited(c)) => {
                    eprintln!("vmm: guest exited with status {c}");
                    ExitCode::Guest(c)
                }
                Ok(Outcome::MigratedAway(to)) => {
                    eprintln!("vmm: the VM migrated to {to}; it runs there now");
                    ExitCode::MigratedAway
                }
                Ok(o @ Outcome::TimedOut { .. }) => fail(ExitCode::Timeout, format!("{} (--timeout {}s)", o.describe(), opts.timeout.as_secs_f64())),
                Ok(o) => fail(ExitCode::GuestCrashed, o.describe()),
                Err(e) => fail(e.exit_code(), e),
            }
        }
        Command::Ps { api_sock, json } => match api::call(&api_sock, &Request::Ps {}) {
            Ok(v) => {
                print_ps(&v, json);
                ExitCode::Success
            }
            Err(e) => fail(client_code(&e), e),
        },
        Command::ClearRefs { api_sock, pid, value } => {
            match api::call::<api::RefsCleared>(&api_sock, &Request::ClearRefs { pid, value: Some(value) }) {
                Ok(_) => ExitCode::Success,
                Err(e) => fail(client_code(&e), e),
            }
        }
        Command::Pagemap { api_sock, pid, start, pages, json, raw } => {
            let format = if raw { PagemapFormat::Raw } else { PagemapFormat::Lines };
            let req = Request::Pagemap { pid, start, pages, summary: None, format: Some(format) };
            match api::call_streaming(&api_sock, &req) {
                Ok((header, body)) => match print_pagemap(&header, body, json, raw) {
                    Ok(()) => ExitCode::Success,
                    Err(PagemapOutput::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::Success,
                    Err(PagemapOutput::Stdout(e)) => fail(ExitCode::Internal, format!("writing the pagemap failed: {e}")),
                    Err(PagemapOutput::Vmm(e)) => fail(ExitCode::Unavailable, format!("reading the pagemap from {} failed: {e}", api_sock.display())),
                },
                Err(e) => fail(client_code(&e), e),
            }
        }
        Command::PagemapScan { api_sock, pid, start, end, written, clear, max_regions, json } => {
            scan::run(&api_sock, scan::Args { pid, start, end, written, clear, max_regions, json })
        }
        Command::Heatmap { api_sock, pid, seconds, interval, out, json } => {
            heatmap::run(&api_sock, heatmap::Args { pid, seconds, interval, out, json })
        }
        Command::Info { api_sock } => match api::call::<api::Info>(&api_sock, &Request::Info {}) {
            Ok(info) => {
                let v = serde_json::to_value(&info).unwrap_or_default();
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                ExitCode::Success
            }
            Err(e) => fail(client_code(&e), e),
        },
        Command::Snapshot(c) => store::snapshot(c),
        Command::Dump(d) => store::dump(d),
        Command::DirtyRate { api_sock, seconds, json } => {
            let secs = match seconds_arg("--seconds", seconds) {
                Ok(t) => t.as_secs_f64(),
                Err(code) => return code,
            };
            match api::call(&api_sock, &Request::DirtyRate { seconds: Some(secs) }) {
                Ok(v) => {
                    if json {
                        println!("{}", json_line(&v));
                    } else {
                        print_rates(&v);
                    }
                    ExitCode::Success
                }
                Err(e) => fail(client_code(&e), e),
            }
        }
        Command::Top { api_sock, interval, count } => {
            let secs = match seconds_arg("--interval", interval) {
                Ok(t) => t.as_secs_f64(),
                Err(code) => return code,
            };
            let mut n = 0;
            loop {
                match api::call(&api_sock, &Request::DirtyRate { seconds: Some(secs) }) {
                    Ok(v) => {
                        // Clear the screen and home the cursor, like top.
                        print!("\x1b[2J\x1b[H");
                        print_rates(&v);
                    }
                    Err(ClientError::Refused { kind: ErrorKind::Finished, .. }) => return ExitCode::Success,
                    Err(e) if n > 0 && matches!(e, ClientError::Connect { .. }) => return ExitCode::Success,
                    Err(e) => return fail(client_code(&e), e),
                }
                n += 1;
                if count != 0 && n >= count {
                    return ExitCode::Success;
                }
            }
        }
        Command::Scenario { files, engine } => {
            let Ok(me) = std::env::current_exe() else { return fail(ExitCode::Internal, "cannot find the vmm binary") };
            let mut code = ExitCode::Success;
            for f in files {
                println!("== {}", f.display());
                match vmm::run::scenario::run(&me, &f, engine) {
                    Ok(lines) => {
                        lines.iter().for_each(|l| println!("{l}"));
                        if let Some(e) = lines.iter().find(|l| l.starts_with("error:")) {
                            code = fail(ExitCode::BadInput, format!("{}: {}", f.display(), &e[7..]));
                        }
                    }
                    Err(e) => {
                        println!("error: {e}");
                        code = fail(ExitCode::BadInput, e);
                    }
                }
            }
            code
        }
        Command::Migrate { api_sock, to, tls, downtime_ms, bandwidth, timeout, postcopy, postcopy_fallback, no_throttle, json } => {
            let timeout = match seconds_arg("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let switch = migrate::Switch { postcopy, postcopy_fallback, throttle: !no_throttle };
            migrate::run(&api_sock, to, tls.flags(), downtime_ms, bandwidth, timeout, switch, json)
        }
        Command::MigrateCancel { api_sock } => match api::call::<api::MigrationCancelled>(&api_sock, &Request::MigrateCancel {}) {
            Ok(c) if c.cancelled => ExitCode::Success,
            Ok(_) => fail(ExitCode::Refused, "no migration is running"),
            Err(e) => fail(client_code(&e), e),
        },
        Command::Resume { api_sock } => match api::call::<api::Resumed>(&api_sock, &Request::Resume {}) {
            Ok(_) => ExitCode::Success,
            Err(e) => fail(client_code(&e), e),
        },
        Command::Wait { api_sock, label, timeout } => {
            let timeout = match seconds_arg("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let req = Request::Wait { label, timeout_ms: Some(timeout.as_millis() as u64) };
            match api::call::<api::Paused>(&api_sock, &req) {
                Ok(p) => {
                    println!("{} {}", p.pid, p.label);
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
