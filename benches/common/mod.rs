//! A guest driven through the real `vmm` binary and its control socket, for benchmarks.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use vmm::run::child::{Options, Stream, VmmChild};

/// A benchmark guest; the VMM is killed and reaped if the benchmark fails half-way.
pub struct Guest {
    pub child: VmmChild,
    pub sock: PathBuf,
    /// Holds the workload and the socket; dropped after `child`.
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots `script` with `engine` in `mem_mib` MiB; `console`: keep the guest console
    /// (stdout) for the caller, else discard it.
    pub fn start(script: &str, mem_mib: u64, engine: &str, console: bool) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let wl = dir.path().join("bench.wl");
        std::fs::write(&wl, script).unwrap();
        let opts = Options {
            stdout: if console { Stream::Piped } else { Stream::Null },
            stderr: Stream::Null,
            start_timeout: Duration::from_secs(30),
        };
        let args = ["--workload", wl.to_str().unwrap(), "--mem", &mem_mib.to_string(), "--timeout", "3000", "--engine", engine];
        let child = VmmChild::spawn_in(Path::new(env!("CARGO_BIN_EXE_vmm")), dir.path(), args, &opts)
            .unwrap_or_else(|e| panic!("vmm did not start: {e}"));
        Guest { sock: child.sock().to_path_buf(), child, _dir: dir }
    }

    pub fn call(&self, req: Value) -> Value {
        vmm::api::call(&self.sock, &req).unwrap_or_else(|e| panic!("{req}: {e}"))
    }

    /// Waits for the pause at `label`; returns the guest's running time so far (ns).
    pub fn wait(&self, label: &str) -> u64 {
        let v = self.call(json!({"cmd": "wait", "label": label, "timeout_ms": 3_000_000}));
        v["running_ns"].as_u64().unwrap()
    }

    pub fn resume(&self) {
        self.call(json!({"cmd": "resume"}));
    }
}

/// What every benchmark's `main` does first: answers `--list` (cargo bench's probe) with
/// `NAME: bench` and returns false, or checks that KVM is there (a loud failure, never a
/// silent skip) and returns true.
pub fn bench_start(name: &str) -> bool {
    if std::env::args().any(|a| a == "--list") {
        println!("{name}: bench");
        return false;
    }
    if std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm").is_err() {
        panic!("/dev/kvm is needed for this benchmark");
    }
    // The charts' text.
    vmm::plot::sans_serif().unwrap_or_else(|e| panic!("{e}"));
    true
}
