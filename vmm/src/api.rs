//! The control socket: one JSON object per line each way (docs/api.md).
//!
//! ```text
//! -> {"cmd":"status"}
//! <- {"ok":true,"phase":"paused","pid":2,"label":"start","syncs":1}
//! -> {"cmd":"resume"}
//! <- {"ok":true}
//! -> {"cmd":"frob"}
//! <- {"ok":false,"error":"bad request: unknown variant `frob`, ..."}
//! ```
//!
//! Each connection gets its own thread; a client that sends garbage, sends too much or
//! hangs up mid-request only ends its own connection.

use crate::control::{Control, Phase};
use crate::runner::VcpuContext;
use crate::memory::GuestMem;
use crate::progress::Progress;
use crate::softdirty::{ClearRefs, PageInfo, Tracker};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another process is listening on {path}")]
    InUse { path: PathBuf },
    #[error("cannot use control socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// A request, as sent by clients.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // Empty braces, not unit variants: serde checks unknown fields only on struct variants.
    Status {},
    Resume {},
    /// Block until the VM pauses at a sync (with this label, if given).
    Wait { label: Option<String>, timeout_ms: Option<u64> },
    /// Guest processes, read from the guest kernel's process table.
    Ps {},
    /// Linux's `/proc/PID/clear_refs` (value 4 by default).
    ClearRefs { pid: u32, value: Option<u64> },
    /// Linux's `/proc/PID/pagemap` over `pages` pages from `start` (default: every
    /// mapping). With `summary`, only counts (pages, present, soft-dirty).
    Pagemap { pid: u32, start: Option<u64>, pages: Option<u64>, summary: Option<bool> },
    /// Engine, memory size and counters.
    Info {},
    /// Pages written per second over `seconds`, for the VM and per process.
    DirtyRate { seconds: Option<f64> },
    /// Snapshot the VM into directory `out` (a diff against the previous snapshot with
    /// `diff`), then let it go on. With `progress`, `{"progress":{"done":B,"total":B}}`
    /// lines precede the answer.
    SnapshotCreate { out: String, diff: Option<bool>, progress: Option<bool> },
    /// Dump process `pid` into directory `out`: every present page, or with `prev` (its
    /// latest dump) only the pages soft-dirty since; then clear its soft-dirty bits.
    Dump { pid: u32, out: String, prev: Option<String>, progress: Option<bool> },
}

fn ok(mut v: Value) -> Value {
    v["ok"] = json!(true);
    v
}

pub fn error(msg: impl Into<String>) -> Value {
    json!({"ok": false, "error": msg.into()})
}

fn phase_json(phase: &Phase) -> Value {
    match phase {
        Phase::Running => json!({"phase": "running"}),
        Phase::Paused(p) => json!({"phase": "paused", "pid": p.pid, "label": p.label}),
        Phase::Finished(how) => json!({"phase": "finished", "outcome": how}),
    }
}

/// Serves requests for one VM.
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
}

impl Server {
    /// Binds `path` (mode 0600). A leftover socket nobody listens on is replaced; any
    /// other existing file is an error.
    pub fn bind(path: &Path) -> Result<Server, Error> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::NotASocket { path: path.to_path_buf() });
            }
            match UnixStream::connect(path) {
                Ok(_) => return Err(Error::InUse { path: path.to_path_buf() }),
                Err(_) => std::fs::remove_file(path).map_err(io)?,
            }
        }
        // Bind and listen under a temporary name, restrict it, then rename it into place:
        // the path appears only once it accepts connections and is private. (Binding
        // the final path directly leaves a window between bind() and listen() in which
        // clients that see the file get ECONNREFUSED — seen under load.)
        let tmp = path.with_file_name(format!(
            ".{}.tmp-{}",
            path.file_name().map_or("api.sock".into(), |n| n.to_string_lossy()),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(io)?;
        let ready = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = ready {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(Server { path: path.to_path_buf(), listener })
    }

    /// Accepts connections on a background thread for as long as the process lives.
    /// The returned guard removes the socket file when dropped (at the end of the run).
    pub fn spawn(self, control: Arc<Control<VcpuContext>>) -> Result<SocketFile, Error> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        let listener = self.listener.try_clone().map_err(io)?;
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let control = control.clone();
                    let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || serve(stream, &control));
                }
            })
            .map_err(io)?;
        Ok(SocketFile(self.path.clone()))
    }
}

/// Removes the control socket's file when dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Requests being answered right now; the run waits (briefly) for them before exiting
/// so that a client blocked in `wait` learns the VM finished instead of losing the line.
static IN_FLIGHT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Waits up to `limit` for in-flight requests to be answered.
pub fn drain(limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while IN_FLIGHT.load(std::sync::atomic::Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn serve(stream: UnixStream, control: &Control<VcpuContext>) {
    let Ok(write_half) = stream.try_clone() else { return };
    let mut writer = std::io::BufWriter::new(write_half);
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        match (&mut reader).take(MAX_REQUEST as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.len() > MAX_REQUEST {
            let _ = reply(&mut writer, &error(format!("request longer than {MAX_REQUEST} bytes")));
            return;
        }
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(req, control, &mut |v| {
                let _ = reply(&mut writer, v);
            }),
            Err(e) => error(format!("bad request: {e}")),
        };
        let sent = reply(&mut writer, &response);
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
    }
}

fn reply(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    serde_json::to_writer(&mut *w, v)?;
    w.write_all(b"\n")?;
    w.flush()
}

/// Runs `job` on the vCPU thread with the tracker and the stopped guest.
fn with_tracker<R: Send + 'static>(
    control: &Control<VcpuContext>,
    job: impl FnOnce(&mut Tracker, &GuestMem, &VmFd, &VcpuFd) -> Result<R, String> + Send + 'static,
) -> Result<R, String> {
    control.call(move |ctx: &mut VcpuContext| {
        let VcpuContext { tracker, mem, vm, vcpu, .. } = ctx;
        job(tracker, mem, vm, vcpu)
    })?
}

pub fn page_json(p: &PageInfo) -> Value {
    json!({
        "addr": p.addr,
        "entry": p.entry.0,
        "present": p.entry.is_present(),
        "pfn": p.entry.pfn(),
        "soft_dirty": p.entry.soft_dirty(),
        "exclusive": p.entry.exclusive(),
        "huge": p.huge,
        "accessed": p.accessed,
    })
}

fn answer(r: Result<Value, String>) -> Value {
    match r {
        Ok(v) => ok(v),
        Err(e) => error(e),
    }
}

/// Runs a long job on the vCPU thread; with `report`, emits its progress as lines of
/// `{"progress":{"done":B,"total":B}}` every 200 ms meanwhile.
fn call_reporting<R: Send + 'static>(
    control: &Control<VcpuContext>,
    report: bool,
    emit: &mut dyn FnMut(&Value),
    job: impl FnOnce(&mut VcpuContext, &Progress) -> R + Send + 'static,
) -> Result<R, String> {
    let progress = Arc::new(Progress::default());
    let theirs = progress.clone();
    // The first report goes out at once, so that even a short job shows its bar.
    let mut last: Option<std::time::Instant> = None;
    control.call_ticking(move |ctx| job(ctx, &theirs), || {
        if report && last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
            last = Some(std::time::Instant::now());
            let (done, total) = progress.get();
            emit(&json!({"progress": {"done": done, "total": total}}));
        }
    })
}

/// Answers one request. Long requests may `emit` progress lines before the answer.
pub fn handle(req: Request, control: &Control<VcpuContext>, emit: &mut dyn FnMut(&Value)) -> Value {
    match req {
        Request::Status {} => {
            let mut v = phase_json(&control.phase());
            v["syncs"] = json!(control.syncs());
            v["running_ns"] = json!(control.running_time().as_nanos() as u64);
            ok(v)
        }
        Request::Resume {} => match control.resume() {
            Ok(()) => ok(json!({})),
            Err(e) => error(e),
        },
        Request::Ps {} => answer(with_tracker(control, |t, mem, _, _| {
            let snap = t.snapshot(mem).map_err(|e| e.to_string())?;
            let procs: Vec<Value> = snap.processes.iter().map(|p| json!({
                "pid": p.pid, "name": p.name, "state": p.state.name(), "exit_code": p.exit_code,
                "cr3": p.cr3, "rss_pages": p.rss_pages, "peak_rss_pages": p.peak_rss_pages,
                "mappings": p.mappings.iter().map(|m| json!({
                    "start": m.start, "pages": m.pages, "read_only": m.read_only, "huge": m.huge, "shared": m.shared,
                    "serial": m.serial,
                })).collect::<Vec<_>>(),
            })).collect();
            Ok(json!({"processes": procs}))
        })),
        Request::ClearRefs { pid, value } => answer((|| {
            let value = ClearRefs::try_from(value.unwrap_or(4)).map_err(|e| e.to_string())?;
            with_tracker(control, move |t, mem, vm, vcpu| {
                let t0 = std::time::Instant::now();
                let changed = t.clear_refs(mem, vm, vcpu, pid, value).map_err(|e| e.to_string())?;
                let elapsed = t0.elapsed().as_nanos() as u64;
                Ok(json!({"pid": pid, "value": value as u64, "entries_changed": changed, "elapsed_ns": elapsed}))
            })
        })()),
        Request::Pagemap { pid, start, pages, summary } => answer((|| {
            let range = match (start, pages) {
                (None, None) => None,
                (Some(s), Some(n)) => Some((s, n)),
                (Some(s), None) => Some((s, 1)),
                (None, Some(_)) => return Err("pages given without start".to_string()),
            };
            if let Some((s, n)) = range {
                crate::softdirty::check_range(s, n).map_err(|e| e.to_string())?;
            }
            with_tracker(control, move |t, mem, vm, _| {
                let t0 = std::time::Instant::now();
                let pages = t.pagemap(mem, vm, pid, range).map_err(|e| e.to_string())?;
                let elapsed = t0.elapsed().as_nanos() as u64;
                if summary == Some(true) {
                    let present = pages.iter().filter(|p| p.entry.is_present()).count();
                    let dirty = pages.iter().filter(|p| p.entry.soft_dirty()).count();
                    return Ok(json!({"pid": pid, "count": pages.len(), "present": present, "soft_dirty": dirty,
                        "elapsed_ns": elapsed}));
                }
                Ok(json!({"pid": pid, "pages": pages.iter().map(page_json).collect::<Vec<_>>(), "elapsed_ns": elapsed}))
            })
        })()),
        Request::Info {} => answer(control.call(|ctx: &mut VcpuContext| {
            let mem_size = vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1;
            json!({
                "engine": ctx.tracker.engine().name(),
                "tsc_khz": ctx.vcpu.get_tsc_khz().ok(),
                "mechanism": ctx.tracker.log.mechanism().name(),
                "mem_bytes": mem_size,
                "exits": ctx.exits,
                "tracker": ctx.tracker.stats,
                "log": ctx.tracker.log.stats,
            })
        })),
        Request::DirtyRate { seconds } => answer((|| {
            let seconds = seconds.unwrap_or(1.0);
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
                return Err(format!("seconds {seconds}: must be between 0 and 3600"));
            }
            let run0 = control.running_time();
            with_tracker(control, |t, mem, vm, _| t.window_start(mem, vm).map_err(|e| e.to_string()))?;
            let t0 = std::time::Instant::now();
            std::thread::sleep(Duration::from_secs_f64(seconds));
            let (total, per) =
                with_tracker(control, |t, mem, vm, _| t.window_report(mem, vm).map_err(|e| e.to_string()))?;
            let wall = t0.elapsed().as_secs_f64();
            let ran = (control.running_time() - run0).as_secs_f64();
            Ok(json!({
                "seconds": wall,
                "running_seconds": ran,
                "vm_pages": total,
                "vm_pages_per_second": total as f64 / wall,
                "processes": per.iter().map(|(pid, name, n)| json!({
                    "pid": pid, "name": name, "pages": n, "pages_per_second": *n as f64 / wall,
                })).collect::<Vec<_>>(),
            }))
        })()),
        Request::SnapshotCreate { out, diff, progress } => answer(
            call_reporting(control, progress == Some(true), emit, move |ctx, p| {
                crate::snapshot::create(ctx, Path::new(&out), diff.unwrap_or(false), p).map(|r| json!(r)).map_err(|e| e.to_string())
            })
            .and_then(|r| r),
        ),
        Request::Dump { pid, out, prev, progress } => answer(
            call_reporting(control, progress == Some(true), emit, move |ctx, p| {
                crate::dump::create(ctx, pid, Path::new(&out), prev.as_deref().map(Path::new), p)
                    .map(|r| json!(r))
                    .map_err(|e| e.to_string())
            })
            .and_then(|r| r),
        ),
        Request::Wait { label, timeout_ms } => {
            let timeout = Duration::from_millis(timeout_ms.unwrap_or(60_000).min(24 * 3600 * 1000));
            match control.wait_for_pause(label.as_deref(), timeout) {
                Ok(p) => ok(json!({"pid": p.pid, "label": p.label, "running_ns": control.running_time().as_nanos() as u64})),
                Err(e) => error(e),
            }
        }
    }
}

/// Client side: sends one request and returns the response object.
pub fn call(path: &Path, request: &Value) -> Result<Value, ClientError> {
    call_with_progress(path, request, |_, _| {})
}

/// [`call`] for long requests sent with `"progress": true`: `on_progress(done, total)`
/// gets each progress line before the answer.
pub fn call_with_progress(path: &Path, request: &Value, mut on_progress: impl FnMut(u64, u64)) -> Result<Value, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
    let io = |source| ClientError::Io { path: path.to_path_buf(), source };
    let mut line = serde_json::to_vec(request).expect("a JSON value serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let v = loop {
        let mut response = String::new();
        reader.read_line(&mut response).map_err(io)?;
        let v: Value = serde_json::from_str(&response).map_err(|e| ClientError::BadResponse {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        match v.get("progress") {
            Some(p) if v.get("ok").is_none() => on_progress(p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0)),
            _ => break v,
        }
    };
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(ClientError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("talking to the VMM at {path} failed: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the VMM at {path} sent a malformed response: {detail}")]
    BadResponse { path: PathBuf, detail: String },
    #[error("the VMM refused: {0}")]
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"resume"}"#).unwrap(), Request::Resume {});
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"wait","label":"x"}"#).unwrap(),
            Request::Wait { label: Some("x".into()), timeout_ms: None }
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"resume","extra":1}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"nope"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"[1,2]"#).is_err());
    }

    #[test]
    fn socket_refuses_to_replace_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        std::fs::write(&path, b"precious").unwrap();
        assert!(matches!(Server::bind(&path), Err(Error::NotASocket { .. })));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[test]
    fn stale_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        drop(UnixListener::bind(&path).unwrap()); // stale: file left, nobody listening
        let server = Server::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(Server::bind(&path), Err(Error::InUse { .. })));
        let guard = server.spawn(Arc::new(Control::default())).unwrap();
        drop(guard);
        assert!(!path.exists());
    }
}
