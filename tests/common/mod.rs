//! Helpers for integration tests that run the real `vmm` binary against a real guest.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// A VMM running in the background with a control socket.
pub struct Live {
    pub child: Child,
    pub sock: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Live {
    pub fn start(script: &str, extra: &[&str]) -> Live {
        require_kvm();
        let dir = tempdir();
        let path = write_script(dir.path(), "w.wl", script);
        let sock = dir.path().join("api.sock");
        let mut args = vec!["run", "--workload", path.to_str().unwrap(), "--api-sock", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let child = Command::new(vmm_bin())
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "the VMM did not create its control socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Live { child, sock, dir }
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
        let out = self.child.wait_with_output().expect("wait for vmm");
        Run::from(out)
    }
}
