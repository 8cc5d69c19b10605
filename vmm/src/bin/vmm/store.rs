//! `vmm snapshot ...` and `vmm dump ...`: whole-VM snapshots and per-process dumps.

use crate::{client_code, fail};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use vmm::api::{self, Request};
use vmm::ExitCode;
use vmm::storage::progress::{Bar, Progress};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Pause the VM, write a full snapshot (or, with --diff, the pages written since the
    /// previous one) to DIR, and let it go on.
    Create {
        #[arg(long)]
        api_sock: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        diff: bool,
        /// Write a full snapshot while the guest runs (pre-copy into DIR), pausing it
        /// only for the last dirty set; prints one line per round.
        #[arg(long, conflicts_with = "diff")]
        live: bool,
        /// With --live: the pause to aim at.
        #[arg(long, default_value_t = 20, requires = "live")]
        downtime_ms: u64,
        /// With --live: bound on the whole snapshot; past it, it is abandoned cleanly.
        #[arg(long, default_value_t = 300.0, requires = "live")]
        timeout: f64,
        /// With --live: each round and the result as one JSON object per line.
        #[arg(long, requires = "live")]
        json: bool,
    },
    /// Check a snapshot and its chain of bases: formats, sizes, bases, checksums.
    Verify { dir: PathBuf },
    /// Fold diff DIR into its base BASE: BASE is replaced, atomically, by a snapshot of
    /// DIR's point in time (DIR's id and state). Later diffs built on DIR still restore.
    Merge {
        dir: PathBuf,
        #[arg(long)]
        into: PathBuf,
    },
}

/// `vmm dump --api-sock PATH --pid N --out DIR [--prev DIR]`, or `vmm dump verify DIR`.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct DumpArgs {
    #[command(subcommand)]
    command: Option<DumpCommand>,
    /// The running VMM's control socket.
    #[arg(long, required = true)]
    api_sock: Option<PathBuf>,
    /// The guest process.
    #[arg(long, required = true)]
    pid: Option<u32>,
    /// New dump directory (must not exist).
    #[arg(long, required = true)]
    out: Option<PathBuf>,
    /// The previous (latest) dump of this pid: write only the pages soft-dirty since.
    #[arg(long)]
    prev: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum DumpCommand {
    /// Rebuild the process memory from DIR and its chain of previous dumps, checking
    /// every file; print what it holds and a digest of it.
    Verify { dir: PathBuf },
}

/// `p` against this process's working directory, for a VMM that has another.
pub(crate) fn absolute(p: PathBuf) -> PathBuf {
    if p.is_absolute() { p } else { std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p) }
}

/// Runs `work` on a thread while a bar (on a terminal) shows its progress.
fn with_bar<R: Send + 'static>(label: &str, work: impl FnOnce(&Progress) -> R + Send + 'static) -> Option<R> {
    let progress = std::sync::Arc::new(Progress::default());
    let worker = {
        let progress = progress.clone();
        std::thread::spawn(move || work(&progress))
    };
    let mut bar = Bar::new(label);
    while !worker.is_finished() {
        let (done, total) = progress.get();
        bar.draw(done, total);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bar.finish();
    worker.join().ok()
}

/// A request whose answer may be preceded by progress lines, with a bar on a terminal.
/// `req` gets the bar's `progress` flag.
fn call_with_bar<R: serde::de::DeserializeOwned>(label: &str, api_sock: &Path, req: impl FnOnce(bool) -> Request)
    -> Result<R, api::ClientError> {
    let mut bar = Bar::new(label);
    let req = req(bar.enabled());
    let answer = api::call_with_progress(api_sock, &req, |done, total| bar.draw(done, total));
    bar.finish();
    answer
}

pub fn snapshot(c: SnapshotCommand) -> ExitCode {
    match c {
        SnapshotCommand::Create { api_sock, out, live: true, downtime_ms, timeout, json, .. } => {
            let out = absolute(out);
            let timeout = match crate::seconds_arg("--timeout", timeout) {
                Ok(t) => t,
                Err(code) => return code,
            };
            let req = Request::SnapshotCreate {
                out: out.display().to_string(),
                diff: None,
                progress: None,
                live: Some(true),
                downtime_ms: Some(downtime_ms),
                timeout_ms: Some(timeout.as_millis() as u64),
            };
            match api::call_with_updates::<api::SnapshotCreated>(&api_sock, &req, |line| crate::migrate::print_round(&line, json)) {
                Ok(v) if json => {
                    println!("{}", serde_json::to_value(&v).expect("an answer serializes"));
                    ExitCode::Success
                }
                Ok(v) => {
                    let live = v.live.as_ref().expect("a live snapshot's answer says how it went");
                    println!("full snapshot {} -> {}: {} pages, {} bytes, VM paused {:.1} ms (live: {} rounds in {:.1} ms{})", v.id,
                        out.display(), v.pages, v.bytes, v.pause_ns as f64 / 1e6, live.rounds, live.total_ns as f64 / 1e6,
                        if live.throttled { ", throttled" } else { "" });
                    ExitCode::Success
                }
                Err(e) => fail(client_code(&e), e),
            }
        }
        SnapshotCommand::Create { api_sock, out, diff, .. } => {
            let out = absolute(out);
            let req = |progress| Request::SnapshotCreate {
                out: out.display().to_string(),
                diff: Some(diff),
                progress: Some(progress),
                live: None,
                downtime_ms: None,
                timeout_ms: None,
            };
            match call_with_bar::<api::SnapshotCreated>("snapshot", &api_sock, req) {
                Ok(v) => {
                    let kind = if v.kind == vmm::storage::snapshot::Kind::Full { "full" } else { "diff" };
                    println!("{kind} snapshot {} -> {}: {} pages, {} bytes, VM paused {:.1} ms", v.id, out.display(), v.pages,
                        v.bytes, v.pause_ns as f64 / 1e6);
                    ExitCode::Success
                }
                Err(e) => fail(client_code(&e), e),
            }
        }
        SnapshotCommand::Merge { dir, into } => {
            let shown = into.clone();
            match with_bar("merge", move |p| vmm::storage::snapshot::merge(&dir, &into, p)) {
                Some(Ok(m)) => {
                    println!("merged into {}: now {} snapshot {}, {} pages, {} bytes", shown.display(),
                        if m.kind == vmm::storage::snapshot::Kind::Full { "full" } else { "diff" }, m.id, m.pages, m.bytes);
                    ExitCode::Success
                }
                Some(Err(e @ vmm::storage::snapshot::Error::Durable(_))) => fail(ExitCode::IoError, e),
                Some(Err(e)) => fail(ExitCode::BadInput, e),
                None => fail(ExitCode::Internal, "the merge panicked"),
            }
        }
        SnapshotCommand::Verify { dir } => match vmm::storage::snapshot::load(&dir, None) {
        Ok(l) => {
            for m in &l.chain {
                println!("{} {:?} {} pages, {} MiB guest, engine {}", m.id, m.kind, m.pages, m.mem_bytes >> 20, m.engine.name());
            }
            println!("ok: chain of {} snapshot(s) verified", l.chain.len());
            ExitCode::Success
        }
        Err(e) => fail(ExitCode::BadInput, e),
    },
    }
}

pub fn dump(d: DumpArgs) -> ExitCode {
    match d.command {
        Some(DumpCommand::Verify { dir }) => match vmm::storage::dump::reconstruct(&dir) {
            Ok(img) => {
                let zero = img.zero_pages();
                for m in &img.chain {
                    let prev = m.prev.as_ref().map_or("-".to_string(), |p| p.id.clone());
                    println!("{} pid {} prev {prev}: {} data, {} zero, {} unchanged pages", m.id, m.pid, m.counts.data, m.counts.zero, m.counts.parent);
                }
                println!("pid {} ({}): {} mappings, {} pages present ({zero} zero), digest {}", img.pid, img.name,
                    img.mappings.len(), img.pages.len() as u64 + zero, img.digest());
                println!("ok: chain of {} dump(s) verified", img.chain.len());
                ExitCode::Success
            }
            Err(e) => fail(ExitCode::BadInput, e),
        },
        None => {
            let (Some(api_sock), Some(pid), Some(out)) = (d.api_sock, d.pid, d.out) else {
                return fail(ExitCode::BadInput, "--api-sock, --pid and --out are required");
            };
            let out = absolute(out);
            let prev = d.prev.map(|p| absolute(p).display().to_string());
            let req = |progress| Request::Dump { pid, out: out.display().to_string(), prev, progress: Some(progress) };
            match call_with_bar::<api::DumpCreated>("dump", &api_sock, req) {
                Ok(v) => {
                    let c = &v.counts;
                    println!("dump {} of pid {pid} -> {}: {} data, {} zero, {} unchanged, {} absent pages; {} bytes, VM paused {:.1} ms",
                        v.id, out.display(), c.data, c.zero, c.parent, c.absent, v.bytes, v.pause_ns as f64 / 1e6);
                    ExitCode::Success
                }
                Err(e) => fail(client_code(&e), e),
            }
        }
    }
}
