//! A guest driven through the real `vmm` binary and its control socket, for benchmarks.
#![allow(dead_code)]

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Guest {
    pub child: Child,
    pub sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Guest {
    /// Boots `script` with `engine` in `mem_mib` MiB; `console`: keep the guest console
    /// (stdout) for the caller, else discard it.
    pub fn start(script: &str, mem_mib: u64, engine: &str, console: bool) -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let wl = dir.path().join("bench.wl");
        std::fs::write(&wl, script).unwrap();
        let sock = dir.path().join("api.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
            .args(["run", "--workload", wl.to_str().unwrap(), "--api-sock", sock.to_str().unwrap(), "--mem",
                &mem_mib.to_string(), "--timeout", "3000", "--engine", engine])
            .stdout(if console { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "vmm did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Guest { child, sock, _dir: dir }
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
