//! The VMM executor for scenario files (`vmm scenario`): boots the scenario's workload
//! in a real `vmm run` child with a control socket and carries out the plan through the
//! API at each `sync`, printing the same normalized lines as the Linux executor
//! (`sd-linux`), so that the two can be compared line by line.

use super::child::{Options, ScratchDir, Stream, VmmChild};
use crate::api;
use crate::tracking::engine::EngineKind;
use std::path::{Path, PathBuf};
use std::time::Duration;
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
    let dir = ScratchDir::new("scenario").map_err(|e| Error::Start { path: path.into(), detail: e.to_string() })?;
    run_in(vmm, path, &sc, dir.path(), engine)
}

fn run_in(vmm: &Path, path: &Path, sc: &scenario::Scenario, dir: &Path, engine: EngineKind) -> Result<Vec<String>, Error> {
    let start_err = |detail: String| Error::Start { path: path.into(), detail };
    let api_err = |detail: String| Error::Api { path: path.into(), detail };
    let wl = dir.join("workload.wl");
    std::fs::write(&wl, &sc.workload).map_err(|e| start_err(e.to_string()))?;
    let opts = Options { stdout: Stream::Null, stderr: Stream::Piped, start_timeout: Duration::from_secs(30) };
    let run_args = ["--workload".as_ref(), wl.as_os_str(), "--engine".as_ref(), engine.name().as_ref(),
        "--timeout".as_ref(), "120".as_ref()];
    let mut child = VmmChild::spawn_in(vmm, dir, run_args, &opts).map_err(|e| start_err(e.to_string()))?;
    let sock = child.sock().to_path_buf();
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
                    scan_agrees(&sock, p, addr, &v.pages).map_err(|e| api_err(format!("at {label}#{n}: {e}")))?;
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

/// `pagemap-scan` over the pages just read agrees with their pagemap, page for page:
/// every page of a mapping is in exactly one region with its flags, every page outside
/// the mappings in none; the `written` scan covers exactly the soft-dirty pages. Neither
/// scan clears.
fn scan_agrees(sock: &Path, pid: u32, addr: u64, pages: &[api::Page]) -> Result<(), String> {
    let end = addr + pages.len() as u64 * 4096;
    let scan = |written: bool| -> Result<Vec<api::ScanRegion>, String> {
        let (mut regions, mut cur) = (Vec::new(), addr);
        while cur < end {
            let req = api::Request::PagemapScan { pid, start: Some(cur), end: Some(end), written: Some(written), clear: None, max_regions: None };
            let a: api::PagemapScanned = api::call(sock, &req).map_err(|e| format!("pagemap-scan of pid {pid}: {e}"))?;
            if a.walk_end <= cur {
                return Err(format!("pagemap-scan of pid {pid} made no progress at {cur:#x}"));
            }
            regions.extend(a.regions);
            cur = a.walk_end;
        }
        Ok(regions)
    };
    let procs: api::Processes = api::call(sock, &api::Request::Ps {}).map_err(|e| format!("ps: {e}"))?;
    let mappings = procs.processes.into_iter().find(|p| p.pid == pid).map(|p| p.mappings).unwrap_or_default();
    let mapped = |va: u64| mappings.iter().any(|m| m.contains(va));
    let flags = |pg: &api::Page| (pg.soft_dirty, pg.present, mmu::PagemapEntry(pg.entry).file_or_shared(), pg.huge);
    let find = |regions: &[api::ScanRegion], va: u64| regions.iter().filter(|r| r.start <= va && va < r.end).count();
    let all = scan(false)?;
    let written = scan(true)?;
    for pg in pages {
        let va = pg.addr;
        let holding: Vec<&api::ScanRegion> = all.iter().filter(|r| r.start <= va && va < r.end).collect();
        match (mapped(va), holding.as_slice()) {
            (true, [r]) if (r.written, r.present, r.file_shared, r.huge) == flags(pg) => {}
            (false, []) => {}
            (m, h) => return Err(format!("pagemap-scan of pid {pid} disagrees with pagemap at {va:#x} (mapped: {m}): \
                pagemap {:?}, regions {h:?}", flags(pg))),
        }
        let want = usize::from(pg.soft_dirty && mapped(va));
        if find(&written, va) != want {
            return Err(format!("pagemap-scan --written of pid {pid} {} {va:#x}, which pagemap reads {}soft-dirty",
                if want == 1 { "misses" } else { "reports" }, if want == 1 { "" } else { "not " }));
        }
    }
    if let Some(r) = all.iter().chain(&written).find(|r| r.start < addr || r.end > end || r.start >= r.end) {
        return Err(format!("pagemap-scan of pid {pid} returned {r:?}, outside {addr:#x}..{end:#x}"));
    }
    Ok(())
}
