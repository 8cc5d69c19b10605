//! A `vmm run` child process with a control socket, driven from outside: what
//! `vmm scenario`, the integration tests and the benchmarks use to boot a guest and talk
//! to it through [`crate::api`].
//!
//! ```no_run
//! use std::path::Path;
//! use vmm::api::{Paused, Request, Resumed};
//! use vmm::run::child::{Options, ScratchDir, VmmChild};
//! let dir = ScratchDir::new("example").unwrap();
//! std::fs::write(dir.path().join("w.wl"), "proc p\nsync here\n").unwrap();
//! let wl = dir.path().join("w.wl");
//! let mut vmm = VmmChild::spawn_in(Path::new("vmm"), dir.path(), [
//!     "--workload".as_ref(), wl.as_os_str()], &Options::default()).unwrap();
//! let pause: Paused = vmm::api::call(vmm.sock(), &Request::Wait { label: None, timeout_ms: None }).unwrap();
//! assert_eq!(pause.label, "here");
//! let _: Resumed = vmm::api::call(vmm.sock(), &Request::Resume {}).unwrap();
//! assert!(vmm.wait().unwrap().success());
//! ```
//!
//! Limits: the child's stdin is always closed; piped output is not read while the child
//! starts (except the stderr of a destination on TCP, read by a thread here to learn its
//! port), so a child that prints more than a pipe holds (64 KiB) before its socket is
//! up stalls until the start timeout. Dropping a [`VmmChild`] kills and reaps the child
//! if it still runs, so a caller that fails half-way never leaves a VM paused at a
//! `sync`.

use std::ffi::OsStr;
use std::io::BufRead;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often a waiting caller looks at the child and its socket.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create a scratch directory in {dir}: {source}")]
    Scratch { dir: PathBuf, source: std::io::Error },
    #[error("cannot start {vmm}: {source}")]
    Spawn { vmm: PathBuf, source: std::io::Error },
    /// It exited before serving; its output, where piped.
    #[error("vmm exited ({status}): {}", stderr.trim())]
    Exited { status: ExitStatus, stdout: String, stderr: String },
    #[error("no control socket after {} s", after.as_secs())]
    NoSocket { after: Duration },
    #[error("cannot wait for vmm (pid {pid}): {source}")]
    Wait { pid: u32, source: std::io::Error },
}

/// Where a child's stdout or stderr goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// To a pipe the caller reads ([`VmmChild::wait_with_output`], [`Error::Exited`]).
    Piped,
    /// Discarded.
    Null,
}

impl Stream {
    fn stdio(self) -> Stdio {
        match self {
            Stream::Piped => Stdio::piped(),
            Stream::Null => Stdio::null(),
        }
    }
}

/// How to start the child.
#[derive(Debug, Clone)]
pub struct Options {
    /// The guest console.
    pub stdout: Stream,
    /// The VMM's diagnostics.
    pub stderr: Stream,
    /// How long the child may take to answer on its socket; then it is killed.
    pub start_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options { stdout: Stream::Piped, stderr: Stream::Piped, start_timeout: Duration::from_secs(30) }
    }
}

/// A running `vmm run ... --api-sock DIR/api.sock`, killed and reaped when dropped.
#[derive(Debug)]
pub struct VmmChild {
    /// `None` only after [`VmmChild::wait_with_output`] took it (by value).
    child: Option<Child>,
    sock: PathBuf,
    /// `--incoming`'s address, for a child started with [`VmmChild::spawn_incoming`] or
    /// [`VmmChild::spawn_incoming_on`] (for TCP, with the port it bound).
    incoming: Option<String>,
    /// The thread that reads the stderr of a destination on TCP.
    stderr: Option<StderrReader>,
}

/// Reads a child's stderr to its end, keeping all of it, and picks out the address the
/// destination announces ([`super::WAITING_FOR_MIGRATION`]).
#[derive(Debug)]
struct StderrReader {
    announced: Arc<Mutex<Option<String>>>,
    thread: JoinHandle<Vec<u8>>,
}

impl StderrReader {
    fn start(stderr: std::process::ChildStderr) -> StderrReader {
        let announced = Arc::new(Mutex::new(None));
        let seen = announced.clone();
        let thread = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut r = std::io::BufReader::new(stderr);
            let mut line = Vec::new();
            loop {
                line.clear();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return all,
                    Ok(_) => {}
                }
                if let Some(addr) = line.strip_prefix(super::WAITING_FOR_MIGRATION.as_bytes()) {
                    let addr = String::from_utf8_lossy(addr).trim().to_string();
                    *seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                }
                all.extend_from_slice(&line);
            }
        });
        StderrReader { announced, thread }
    }

    fn announced(&self) -> Option<String> {
        self.announced.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// All it read (the child has exited, so the pipe ends).
    fn finish(self) -> Vec<u8> {
        self.thread.join().unwrap_or_default()
    }
}

impl VmmChild {
    /// Starts `vmm run --api-sock DIR/api.sock RUN_ARGS...` and returns once the socket
    /// accepts a connection. A child that exits first is reported with what it printed
    /// ([`Error::Exited`], output of piped streams only); one that neither serves nor
    /// exits within [`Options::start_timeout`] is killed ([`Error::NoSocket`]).
    pub fn spawn_in<I, S>(vmm: &Path, dir: &Path, run_args: I, opts: &Options) -> Result<VmmChild, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut this = VmmChild::spawn(vmm, dir, &[], run_args, opts)?;
        let sock = this.sock.clone();
        this.await_ready(opts.start_timeout, || UnixStream::connect(&sock).is_ok())?;
        Ok(this)
    }

    /// `vmm run --incoming unix:DIR/in.sock --api-sock DIR/api.sock ARGS...`, returned
    /// once it listens for the migration (its control socket appears only after one
    /// arrived). Readiness is the socket file, not a probe connection: the destination
    /// takes the first connection as the migration.
    pub fn spawn_incoming<I, S>(vmm: &Path, dir: &Path, run_args: I, opts: &Options) -> Result<VmmChild, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let addr = format!("unix:{}", dir.join("in.sock").display());
        VmmChild::spawn_incoming_on(vmm, dir, &addr, run_args, opts)
    }

    /// `vmm run --incoming ADDR --api-sock DIR/api.sock ARGS...` (ARGS carry the TLS or
    /// plaintext flags of a `tcp:` ADDR), returned once it listens. A `tcp:HOST:0`
    /// destination binds a port of its own choosing: [`VmmChild::incoming_addr`] has it,
    /// as the child announced it on stderr. For TCP its stderr is therefore always
    /// piped and read by a thread here, whatever [`Options::stderr`] says; it is in
    /// [`VmmChild::wait_with_output`]'s output (and not in [`VmmChild::take_stderr`]).
    pub fn spawn_incoming_on<I, S>(vmm: &Path, dir: &Path, addr: &str, run_args: I, opts: &Options) -> Result<VmmChild, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: [&OsStr; 2] = ["--incoming".as_ref(), addr.as_ref()];
        if let Some(path) = addr.strip_prefix("unix:") {
            let mut this = VmmChild::spawn(vmm, dir, &args, run_args, opts)?;
            this.incoming = Some(addr.to_string());
            let path = PathBuf::from(path);
            this.await_ready(opts.start_timeout, || path.exists())?;
            return Ok(this);
        }
        let mut this = VmmChild::spawn(vmm, dir, &args, run_args, &Options { stderr: Stream::Piped, ..opts.clone() })?;
        let reader = StderrReader::start(this.proc().stderr.take().expect("stderr is piped"));
        let announced = reader.announced.clone();
        this.stderr = Some(reader);
        this.await_ready(opts.start_timeout, || announced.lock().is_ok_and(|a| a.is_some()))?;
        this.incoming = this.stderr.as_ref().and_then(StderrReader::announced);
        Ok(this)
    }

    fn spawn<I, S>(vmm: &Path, dir: &Path, first: &[&OsStr], run_args: I, opts: &Options) -> Result<VmmChild, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let sock = dir.join("api.sock");
        let child = Command::new(vmm)
            .arg("run")
            .args(first)
            .arg("--api-sock")
            .arg(&sock)
            .args(run_args)
            .stdin(Stdio::null())
            .stdout(opts.stdout.stdio())
            .stderr(opts.stderr.stdio())
            .spawn()
            .map_err(|source| Error::Spawn { vmm: vmm.to_path_buf(), source })?;
        Ok(VmmChild { child: Some(child), sock, incoming: None, stderr: None })
    }

    /// Waits until `ready`, or the child exits (its output is then the error), or
    /// `limit` passes (the child is killed). Sockets are renamed into place only once
    /// they listen, so a path that exists accepts.
    fn await_ready(&mut self, limit: Duration, ready: impl Fn() -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + limit;
        while !ready() {
            let pid = self.id();
            if let Some(status) = self.try_wait().map_err(|source| Error::Wait { pid, source })? {
                let out = self.output().map_err(|source| Error::Wait { pid, source })?;
                return Err(Error::Exited {
                    status,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
            if Instant::now() >= deadline {
                self.kill_and_reap();
                return Err(Error::NoSocket { after: limit });
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Waits for the child and collects its piped output, stderr from the thread that
    /// reads it where there is one.
    fn output(&mut self) -> std::io::Result<Output> {
        let mut out = self.take().wait_with_output()?;
        if let Some(reader) = self.stderr.take() {
            out.stderr = reader.finish();
        }
        Ok(out)
    }

    fn proc(&mut self) -> &mut Child {
        self.child.as_mut().expect("the child is taken only by wait_with_output, which consumes self")
    }

    fn take(&mut self) -> Child {
        self.child.take().expect("the child is taken only once")
    }

    /// The control socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// The address a child from [`VmmChild::spawn_incoming`] or
    /// [`VmmChild::spawn_incoming_on`] waits on (for TCP, with the port it bound).
    pub fn incoming_addr(&self) -> Option<String> {
        self.incoming.clone()
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its exit status, if it has exited (reaping it).
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.proc().try_wait()
    }

    /// Waits for it to exit, however long that takes.
    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.proc().wait()
    }

    /// Waits at most `limit` for it to exit; `None` if it still runs.
    pub fn wait_for(&mut self, limit: Duration) -> std::io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Sends SIGKILL (without reaping; [`VmmChild::wait`] or drop reaps).
    pub fn kill(&mut self) -> std::io::Result<()> {
        self.proc().kill()
    }

    /// Waits for it to exit and collects its piped output (read concurrently, so a
    /// chatty child cannot stall on a full pipe).
    pub fn wait_with_output(mut self) -> std::io::Result<Output> {
        self.output()
    }

    /// Takes its stdout pipe (`None` if not piped or already taken).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.proc().stdout.take()
    }

    /// Takes its stderr pipe (`None` if not piped or already taken).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.proc().stderr.take()
    }

    /// Its peak resident memory so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> std::io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no VmHWM line in /proc/PID/status"))
    }

    fn kill_and_reap(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if child.try_wait().ok().flatten().is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for VmmChild {
    fn drop(&mut self) {
        self.kill_and_reap();
    }
}

/// A fresh directory under the system's temp dir, removed with its contents when
/// dropped. The name holds the caller's prefix, our pid and a counter, so concurrent
/// users in one process or across processes do not collide.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(prefix: &str) -> Result<ScratchDir, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sdvmm-{prefix}-{}-{nanos:x}-{n}", std::process::id()));
        std::fs::create_dir(&path).map_err(|source| Error::Scratch { dir: std::env::temp_dir(), source })?;
        Ok(ScratchDir(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in for the `vmm` binary: a shell script that ignores its arguments.
    fn fake_vmm(dir: &Path, body: &str) -> PathBuf {
        let path = dir.join("fake-vmm");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn a_child_that_exits_before_serving_is_reported_with_its_output() {
        let dir = ScratchDir::new("child-test").unwrap();
        let vmm = fake_vmm(dir.path(), "echo out; echo oops >&2; exit 3");
        match VmmChild::spawn_in(&vmm, dir.path(), ["--workload", "x"], &Options::default()) {
            Err(e @ Error::Exited { .. }) => {
                assert_eq!(e.to_string(), "vmm exited (exit status: 3): oops");
                let Error::Exited { status, stdout, stderr } = e else { unreachable!() };
                assert_eq!((status.code(), stdout.as_str(), stderr.as_str()), (Some(3), "out\n", "oops\n"));
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn a_child_that_never_serves_is_killed_at_the_start_timeout() {
        let dir = ScratchDir::new("child-test").unwrap();
        let vmm = fake_vmm(dir.path(), "exec sleep 60");
        let opts = Options { start_timeout: Duration::from_millis(200), ..Options::default() };
        let err = VmmChild::spawn_in(&vmm, dir.path(), [""; 0], &opts).unwrap_err();
        assert!(matches!(err, Error::NoSocket { .. }), "{err:?}");
    }

    #[test]
    fn a_tcp_destination_is_ready_once_it_announces_its_port() {
        let dir = ScratchDir::new("child-test").unwrap();
        let vmm = fake_vmm(dir.path(), "echo 'vmm: waiting for a migration on tcp:127.0.0.1:4444' >&2; sleep 0.2; echo later >&2");
        let opts = Options { stderr: Stream::Null, ..Options::default() };
        let child = VmmChild::spawn_incoming_on(&vmm, dir.path(), "tcp:127.0.0.1:0", [""; 0], &opts).unwrap();
        assert_eq!(child.incoming_addr().as_deref(), Some("tcp:127.0.0.1:4444"), "the port it bound, not the one asked for");
        let out = child.wait_with_output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stderr), "vmm: waiting for a migration on tcp:127.0.0.1:4444\nlater\n", "all of stderr");

        let vmm = fake_vmm(dir.path(), "echo 'vmm: error: missing: --tls-cert' >&2; exit 64");
        match VmmChild::spawn_incoming_on(&vmm, dir.path(), "tcp:127.0.0.1:0", [""; 0], &opts) {
            Err(Error::Exited { status, stderr, .. }) => assert_eq!((status.code(), stderr.as_str()), (Some(64), "vmm: error: missing: --tls-cert\n")),
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    #[test]
    fn scratch_dirs_are_distinct_and_removed() {
        let (a, b) = (ScratchDir::new("t").unwrap(), ScratchDir::new("t").unwrap());
        assert_ne!(a.path(), b.path());
        let p = a.path().to_path_buf();
        std::fs::write(p.join("f"), b"x").unwrap();
        drop(a);
        assert!(!p.exists());
    }
}
