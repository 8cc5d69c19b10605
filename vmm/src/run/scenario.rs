//! The VMM executor for scenario files (`vmm scenario`): boots the scenario's workload
//! in a real `vmm run` child with a control socket and carries out the plan through the
//! API at each `sync`, printing the same normalized lines as the Linux executor
//! (`sd-linux`), so that the two can be compared line by line.

use crate::api;
use crate::tracking::engine::EngineKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use workload::scenario::{self, Action};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{source}")]
    Parse { path: PathBuf, source: scenario::Error },
    #[error("cannot start the VMM for {path}: {detail}")]
    Start { path: PathBuf, detail: String },
    #[error("{path}: talking to the VMM failed: {detail}")]
    Api { path: PathBuf, detail: String },
}

/// Runs one scenario file; returns its normalized output lines.
pub fn run(vmm: &Path, path: &Path, engine: EngineKind) -> Result<Vec<String>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let sc = scenario::parse(&text).map_err(|source| Error::Parse { path: path.into(), source })?;
    let dir = std::env::temp_dir().join(format!("sdvmm-scenario-{}-{:x}", std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())));
    let start_err = |detail: String| Error::Start { path: path.into(), detail };
    std::fs::create_dir_all(&dir).map_err(|e| start_err(e.to_string()))?;
    let result = run_in(vmm, path, &sc, &dir, engine);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(vmm: &Path, path: &Path, sc: &scenario::Scenario, dir: &Path, engine: EngineKind) -> Result<Vec<String>, Error> {
    let start_err = |detail: String| Error::Start { path: path.into(), detail };
    let api_err = |detail: String| Error::Api { path: path.into(), detail };
    let wl = dir.join("workload.wl");
    std::fs::write(&wl, &sc.workload).map_err(|e| start_err(e.to_string()))?;
    let sock = dir.join("api.sock");
    let mut child = Command::new(vmm)
        .args(["run", "--workload"]).arg(&wl).arg("--api-sock").arg(&sock)
        .args(["--engine", engine.name(), "--timeout", "120"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| start_err(e.to_string()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            return Err(start_err(format!("vmm exited ({status}): {}", err.trim())));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(start_err("no control socket after 30 s".into()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut out = Vec::new();
    let mut arrivals = std::collections::HashMap::<String, u32>::new();
    loop {
        let (pid, label) = match api::call::<api::Paused>(&sock, &api::Request::Wait { label: None, timeout_ms: Some(120_000) }) {
            Ok(p) => (p.pid, p.label),
            Err(e) if e.kind() == Some(api::ErrorKind::Finished) => break,
            // Gone already (socket removed, connection reset): finished too, if it exited.
            Err(e) => match child.try_wait() {
                Ok(Some(_)) => break,
                _ => {
                    std::thread::sleep(Duration::from_millis(20));
                    if matches!(child.try_wait(), Ok(Some(_))) {
                        break;
                    }
                    let _ = child.kill();
                    return Err(api_err(format!("wait: {e}")));
                }
            },
        };
        let n = arrivals.entry(label.clone()).or_insert(0);
        *n += 1;
        for step in sc.steps_at(&label) {
            match step.action {
                Action::Clear { pid: p, value } => {
                    if api::call::<api::RefsCleared>(&sock, &api::Request::ClearRefs { pid: p, value: Some(value) }).is_err() {
                        out.push(format!("{label}#{n} pid {p} clear {value} refused (EINVAL)"));
                    }
                }
                Action::Read { pid: p, addr, pages } => {
                    let req = api::Request::Pagemap { pid: p, start: Some(addr), pages: Some(pages), summary: None, format: None };
                    let v: api::PagemapPages = api::call(&sock, &req)
                        .map_err(|e| api_err(format!("pagemap at {label} (pid {pid}): {e}")))?;
                    for pg in v.pages {
                        out.push(scenario::read_line(&label, *n, p, pg.addr, pg.present, pg.soft_dirty, pg.exclusive));
                    }
                }
            }
        }
        if let Err(e) = api::call::<api::Resumed>(&sock, &api::Request::Resume {}) {
            return Err(api_err(format!("resume at {label}: {e}")));
        }
    }
    let status = child.wait().map_err(|e| api_err(e.to_string()))?;
    out.extend(scenario::unreached(sc, &arrivals));
    out.push(format!("status {}", if status.success() { "ok" } else { "failed" }));
    Ok(out)
}
