//! Helpers for integration tests that run the real `vmm` binary against a real guest.
#![allow(dead_code)]

pub mod linux;
pub mod pki;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use vmm::run::child::{self, Options, VmmChild};

/// Every engine, by its `--engine` name.
pub const ENGINES: [&str; 5] = ["pte", "hybrid", "kvm-bitmap", "kvm-ring", "uffd"];

/// The engine answers per guest PTE, exactly as Linux (not a superset by frame).
pub fn is_exact(engine: &str) -> bool {
    matches!(engine, "pte" | "hybrid")
}

pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm")
}

/// These tests need KVM. Missing KVM is a loud failure, never a silent skip.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        panic!("/dev/kvm is not usable ({e}): these tests boot a real guest under KVM and cannot run without it");
    }
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}\n--- stdout\n{}--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Runs `vmm ARGS...` to completion.
pub fn vmm(args: &[&str]) -> Run {
    let out = Command::new(vmm_bin()).args(args).stdin(Stdio::null()).output().expect("spawn vmm");
    Run::from(out)
}

/// A temporary directory for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn write_script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write script");
    p
}

/// Boots `script` in a fresh VMM (default memory) and waits for it.
pub fn run_script(text: &str, extra: &[&str]) -> Run {
    require_kvm();
    let dir = tempdir();
    let path = write_script(dir.path(), "w.wl", text);
    let mut args = vec!["run", "--workload", path.to_str().unwrap()];
    if !extra.contains(&"--timeout") {
        args.extend_from_slice(&["--timeout", "60"]);
    }
    args.extend_from_slice(extra);
    vmm(&args)
}

/// A VMM running in the background with a control socket (the library's
/// [`VmmChild`]: killed and reaped when dropped, so a test that fails half-way never
/// leaves a VMM paused at a sync forever).
pub struct Live {
    pub child: VmmChild,
    pub sock: PathBuf,
    /// Holds the workload and the socket; dropped after `child`.
    pub dir: tempfile::TempDir,
}

impl Live {
    pub fn start(script: &str, extra: &[&str]) -> Live {
        Live::try_start(script, extra).unwrap_or_else(|r| panic!("the VMM exited before serving: {r:?}"))
    }

    /// Like `start`, but a VMM that exits before creating its socket is returned as `Err`.
    pub fn try_start(script: &str, extra: &[&str]) -> Result<Live, Run> {
        let dir = tempdir();
        let path = write_script(dir.path(), "w.wl", script);
        let mut args = vec!["--workload".to_string(), path.to_str().unwrap().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Live::spawn(dir, &args)
    }

    /// A VMM restoring snapshot `snapshot`, with a control socket.
    pub fn restore(snapshot: &Path) -> Live {
        Live::spawn(tempdir(), &["--restore".to_string(), snapshot.to_str().unwrap().to_string()])
            .unwrap_or_else(|r| panic!("the restored VMM exited before serving: {r:?}"))
    }

    /// `vmm run --api-sock DIR/api.sock ARGS...` (any run flags).
    pub fn with_args(run_args: &[&str]) -> Live {
        let args: Vec<String> = run_args.iter().map(|s| s.to_string()).collect();
        Live::spawn(tempdir(), &args).unwrap_or_else(|r| panic!("the VMM exited before serving: {r:?}"))
    }

    /// `vmm run --api-sock DIR/api.sock ARGS...`
    fn spawn(dir: tempfile::TempDir, run_args: &[String]) -> Result<Live, Run> {
        require_kvm();
        let opts = Options { start_timeout: Duration::from_secs(20), ..Options::default() };
        match VmmChild::spawn_in(Path::new(vmm_bin()), dir.path(), run_args, &opts) {
            Ok(child) => Ok(Live { sock: child.sock().to_path_buf(), child, dir }),
            Err(child::Error::Exited { status, stdout, stderr }) => Err(Run { code: status.code().unwrap_or(-1), stdout, stderr }),
            Err(child::Error::NoSocket { .. }) => panic!("the VMM did not create its control socket"),
            Err(e) => panic!("spawn vmm: {e}"),
        }
    }

    pub fn sock(&self) -> &str {
        self.sock.to_str().unwrap()
    }

    /// Runs a client subcommand against this VMM.
    pub fn client(&self, cmd: &str, args: &[&str]) -> Run {
        let mut all = vec![cmd, "--api-sock", self.sock()];
        all.extend_from_slice(args);
        vmm(&all)
    }

    /// Waits for the pause at `label`, asserting it happens.
    pub fn wait(&self, label: &str) -> Run {
        let r = self.client("wait", &["--label", label, "--timeout", "30"]);
        assert_eq!(r.code, 0, "waiting for sync {label}: {r:?}");
        r
    }

    pub fn resume(&self) {
        let r = self.client("resume", &[]);
        assert_eq!(r.code, 0, "resume: {r:?}");
    }

    /// Waits for the VMM to end and returns what it printed.
    pub fn finish(self) -> Run {
        Run::from(self.child.wait_with_output().expect("wait for vmm"))
    }
}

/// One page of `vmm pagemap --json`: the API's own type.
pub use vmm::api::protocol::Page;

impl Live {
    /// Handles every `sync` until the run ends: `at(label, pid)` runs while the VM is
    /// paused there, then the VM is resumed. Returns the finished run.
    pub fn drive(mut self, mut at: impl FnMut(&Live, &str, u32)) -> Run {
        loop {
            let mut w = self.client("wait", &["--timeout", "60"]);
            // Under heavy load (QEMU and many VMs on two cores) a client call has been
            // seen to fail once without a message while the VMM was alive and serving;
            // retry a few times before judging.
            for _ in 0..5 {
                if w.code == 0 || w.stderr.contains("has finished") || !self.sock.exists()
                    || self.child.try_wait().ok().flatten().is_some()
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
                w = self.client("wait", &["--timeout", "60"]);
            }
            if w.code != 0 {
                // Finished: the VMM said so, or it is exiting (socket gone, connection reset).
                if !(w.stderr.contains("has finished") || self.exits_soon()) {
                    let pid = self.child.id();
                    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    let state = status.lines().find(|l| l.starts_with("State")).unwrap_or("?").to_string();
                    let wchan = std::fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
                    let retry = self.client("wait", &["--timeout", "1"]);
                    panic!("wait failed: {w:?}\nvmm {pid}: {state}, wchan {wchan}, socket exists: {}\nretry: {retry:?}",
                        self.sock.exists());
                }
                break;
            }
            let mut parts = w.stdout.split_whitespace();
            let pid: u32 = parts.next().unwrap().parse().unwrap();
            let label = parts.next().unwrap().to_string();
            at(&self, &label, pid);
            let r = self.client("resume", &[]);
            assert_eq!(r.code, 0, "resume failed: {r:?}");
        }
        self.finish()
    }

    /// Waits for the next pause at a `sync` and returns `(pid, label)`; the VM stays
    /// paused there until `resume`. For workloads that never end (a process that loops
    /// until the test has seen what it needs, then drops the VMM): the ordering tool
    /// when what the host checks depends on how far other processes have run.
    pub fn next_sync(&self) -> (u32, String) {
        let mut w = self.client("wait", &["--timeout", "60"]);
        // As in `drive`: retry a client call that failed without a word under load.
        for _ in 0..5 {
            if w.code == 0 || w.stderr.contains("has finished") || !self.sock.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
            w = self.client("wait", &["--timeout", "60"]);
        }
        assert_eq!(w.code, 0, "waiting for the next sync: {w:?}");
        let mut parts = w.stdout.split_whitespace();
        let pid: u32 = parts.next().unwrap().parse().unwrap();
        (pid, parts.next().unwrap().to_string())
    }

    /// `vmm ps --json`: one object per process, by pid.
    pub fn ps(&self) -> Vec<serde_json::Value> {
        let r = self.client("ps", &["--json"]);
        assert_eq!(r.code, 0, "ps: {r:?}");
        r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn exits_soon(&mut self) -> bool {
        self.child.wait_for(Duration::from_secs(10)).expect("try_wait").is_some()
    }

    pub fn clear_refs(&self, pid: u32, value: u32) {
        let r = self.client("clear-refs", &["--pid", &pid.to_string(), &value.to_string()]);
        assert_eq!(r.code, 0, "clear-refs {value} of pid {pid}: {r:?}");
    }

    pub fn pagemap(&self, pid: u32, start: u64, pages: u64) -> Vec<Page> {
        let r = self.client("pagemap", &["--pid", &pid.to_string(), "--start", &format!("{start:#x}"),
            "--pages", &pages.to_string(), "--json"]);
        assert_eq!(r.code, 0, "pagemap of pid {pid}: {r:?}");
        r.stdout.lines().map(parse_page).collect()
    }

    /// Soft-dirty bits of `pages` pages from `start`.
    pub fn soft_dirty(&self, pid: u32, start: u64, pages: u64) -> Vec<bool> {
        self.pagemap(pid, start, pages).iter().map(|p| p.soft_dirty).collect()
    }

    pub fn info(&self) -> serde_json::Value {
        let r = self.client("info", &[]);
        assert_eq!(r.code, 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap()
    }
}

pub fn parse_page(line: &str) -> Page {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// `n` copies of `b`.
pub fn all(b: bool, n: usize) -> Vec<bool> {
    vec![b; n]
}

/// A small seeded xorshift generator for randomized tests (reproducible by seed).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl Live {
    /// The VMM's peak resident memory so far, in MiB (`VmHWM`).
    pub fn peak_rss_mib(&self) -> u64 {
        self.child.peak_rss_kib().expect("VmHWM in the VMM's /proc/PID/status") / 1024
    }
}

/// A `vmm run --incoming ADDR --api-sock DIR/api.sock` waiting for a migration (the
/// library's [`VmmChild::spawn_incoming_on`]): on `unix:DIR/in.sock`, or on
/// `tcp:127.0.0.1:0` with the port it bound. Its control socket exists only once a
/// migration arrived.
pub struct Dest {
    pub child: Option<VmmChild>,
    /// Where it waits (for TCP, with its port).
    addr: String,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Dest {
    /// On a Unix socket.
    pub fn start(extra: &[&str]) -> Dest {
        let dir = tempdir();
        let addr = format!("unix:{}", dir.path().join("in.sock").display());
        Dest::try_start_on(dir, &addr, extra).unwrap_or_else(|r| panic!("the destination did not listen: {r:?}"))
    }

    /// On `tcp:127.0.0.1:0`; `extra` has the TLS flags (or `--insecure-plaintext`).
    pub fn start_tcp(extra: &[&str]) -> Dest {
        Dest::try_start_tcp(extra).unwrap_or_else(|r| panic!("the destination did not listen: {r:?}"))
    }

    /// Like `start_tcp`, but a destination that exits before listening is returned as `Err`.
    pub fn try_start_tcp(extra: &[&str]) -> Result<Dest, Run> {
        Dest::try_start_on(tempdir(), "tcp:127.0.0.1:0", extra)
    }

    /// With TLS: `files`' certificate, key and CA.
    pub fn start_tls(files: &pki::TlsFiles) -> Dest {
        let args = files.args();
        Dest::start_tcp(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn try_start_on(dir: tempfile::TempDir, addr: &str, extra: &[&str]) -> Result<Dest, Run> {
        require_kvm();
        let mut args = vec!["--timeout", "120"];
        args.extend_from_slice(extra);
        match VmmChild::spawn_incoming_on(Path::new(vmm_bin()), dir.path(), addr, &args, &Options::default()) {
            Ok(child) => {
                let (addr, sock) = (child.incoming_addr().expect("an incoming child"), child.sock().to_path_buf());
                Ok(Dest { child: Some(child), addr, sock, dir })
            }
            Err(child::Error::Exited { status, stdout, stderr }) => Err(Run { code: status.code().unwrap_or(-1), stdout, stderr }),
            Err(e) => panic!("the destination did not listen: {e}"),
        }
    }

    pub fn addr(&self) -> String {
        self.addr.clone()
    }

    /// The Unix socket a destination from `start` waits on.
    pub fn incoming(&self) -> PathBuf {
        PathBuf::from(self.addr.strip_prefix("unix:").expect("a Unix destination"))
    }

    /// Runs a client subcommand against the destination's control socket.
    pub fn client(&self, cmd: &str, args: &[&str]) -> Run {
        let mut all = vec![cmd, "--api-sock", self.sock.to_str().unwrap()];
        all.extend_from_slice(args);
        vmm(&all)
    }

    pub fn finish(mut self) -> Run {
        Run::from(self.child.take().expect("not finished yet").wait_with_output().expect("wait for the destination"))
    }

    /// Kills the destination (a failure in the middle of a migration); dropping the
    /// library's child kills and reaps it.
    pub fn kill(&mut self) {
        self.child = None;
    }
}
