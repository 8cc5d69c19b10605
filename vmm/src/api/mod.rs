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

use crate::vcpu::control::{Control, Phase};
use crate::vcpu::runner::VcpuContext;
use crate::machine::memory::GuestMem;
use crate::storage::progress::Progress;
use crate::tracking::softdirty::{ClearRefs, PageInfo, Tracker};
use kvm_ioctls::VcpuFd;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
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
    /// `format`: `"array"` (default: one line with a `pages` array), `"lines"` (a header
    /// line, then one line per page) or `"raw"` (a header line, then Linux's 8 bytes per
    /// page). Every format is streamed from a compact answer (docs/security.md).
    Pagemap { pid: u32, start: Option<u64>, pages: Option<u64>, summary: Option<bool>, format: Option<PagemapFormat> },
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

/// How a pagemap answer is sent.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PagemapFormat {
    Array,
    Lines,
    Raw,
}

/// A pagemap answer as the vCPU thread hands it to the connection: 9 bytes a page (the
/// entry and two flags), whatever the format the client asked for.
pub struct PagemapAnswer {
    pid: u32,
    /// (first address, pages) of each requested range, in order.
    ranges: Vec<(u64, u64)>,
    entries: Vec<u64>,
    /// Bit 0 huge, bit 1 accessed.
    flags: Vec<u8>,
    elapsed_ns: u64,
}

impl PagemapAnswer {
    fn new(pid: u32, pages: &[PageInfo], elapsed_ns: u64) -> PagemapAnswer {
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match ranges.last_mut() {
                Some((start, n)) if *start + *n * 4096 == p.addr => *n += 1,
                _ => ranges.push((p.addr, 1)),
            }
        }
        PagemapAnswer {
            pid,
            ranges,
            entries: pages.iter().map(|p| p.entry.0).collect(),
            flags: pages.iter().map(|p| u8::from(p.huge) | (u8::from(p.accessed) << 1)).collect(),
            elapsed_ns,
        }
    }

    fn addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.ranges.iter().flat_map(|&(start, n)| (0..n).map(move |i| start + i * 4096))
    }

    /// Writes one page's JSON object (docs/api.md) without building a value.
    fn write_page(w: &mut impl Write, addr: u64, entry: u64, flags: u8) -> std::io::Result<()> {
        let e = mmu::PagemapEntry(entry);
        let pfn = e.pfn().map_or("null".to_string(), |p| p.to_string());
        write!(
            w,
            r#"{{"addr":{addr},"entry":{entry},"present":{},"pfn":{pfn},"soft_dirty":{},"exclusive":{},"huge":{},"accessed":{}}}"#,
            e.is_present(), e.soft_dirty(), e.exclusive(), flags & 1 != 0, flags & 2 != 0
        )
    }

    /// Streams the answer to `w` in `format`.
    fn write(&self, w: &mut impl Write, format: PagemapFormat) -> std::io::Result<()> {
        let (pid, count, elapsed) = (self.pid, self.entries.len(), self.elapsed_ns);
        let pages = self.addrs().zip(self.entries.iter().zip(&self.flags));
        match format {
            PagemapFormat::Array => {
                write!(w, r#"{{"ok":true,"pid":{pid},"elapsed_ns":{elapsed},"pages":["#)?;
                for (i, (addr, (&entry, &flags))) in pages.enumerate() {
                    if i > 0 {
                        w.write_all(b",")?;
                    }
                    Self::write_page(w, addr, entry, flags)?;
                }
                w.write_all(b"]}\n")?;
            }
            PagemapFormat::Lines => {
                writeln!(w, r#"{{"ok":true,"pid":{pid},"elapsed_ns":{elapsed},"format":"lines","count":{count}}}"#)?;
                for (addr, (&entry, &flags)) in pages {
                    Self::write_page(w, addr, entry, flags)?;
                    w.write_all(b"\n")?;
                }
            }
            PagemapFormat::Raw => {
                let bytes = count * 8;
                writeln!(w, r#"{{"ok":true,"pid":{pid},"elapsed_ns":{elapsed},"format":"raw","count":{count},"bytes":{bytes}}}"#)?;
                for chunk in self.entries.chunks(4096) {
                    let raw: Vec<u8> = chunk.iter().flat_map(|e| e.to_le_bytes()).collect();
                    w.write_all(&raw)?;
                }
            }
        }
        w.flush()
    }
}

/// What a request is answered with.
pub enum Reply {
    /// One JSON line.
    Json(Value),
    /// A pagemap, streamed in the format asked for.
    Pagemap(PagemapAnswer, PagemapFormat),
}

impl From<Value> for Reply {
    fn from(v: Value) -> Reply {
        Reply::Json(v)
    }
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
        // Bind and listen inside a fresh private directory (mode 0700, unpredictable
        // name, beside `path`), restrict the socket, then rename it into place: nobody
        // else can reach it before it is 0600, and the path appears only once it accepts
        // connections. (Binding the final path directly leaves a window between bind()
        // and listen() in which clients that see the file get ECONNREFUSED — seen under
        // load — and one in which its mode is the umask's.)
        let private = PrivateDir::beside(path).map_err(io)?;
        let tmp = private.0.join("api.sock");
        let listener = UnixListener::bind(&tmp).map_err(io)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(io)?;
        Ok(Server { path: path.to_path_buf(), listener })
    }

    /// Accepts connections on a background thread for as long as the process lives.
    /// The returned guard removes the socket file when dropped (at the end of the run).
    pub fn spawn(self, control: Arc<Control<VcpuContext>>) -> Result<SocketFile, Error> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        let listener = self.listener.try_clone().map_err(io)?;
        std::thread::Builder::new().name("api".into()).spawn(move || accept_loop(&listener, &control)).map_err(io)?;
        Ok(SocketFile(self.path.clone()))
    }
}

/// A directory only we can enter, removed (with whatever is left in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn beside(path: &Path) -> std::io::Result<PrivateDir> {
        use std::os::unix::ffi::OsStrExt;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut template = parent.join(".vmm-sock-XXXXXX").as_os_str().as_bytes().to_vec();
        template.push(0);
        // SAFETY: `template` is a NUL-terminated buffer ending in XXXXXX that mkdtemp
        // rewrites in place; it outlives the call.
        let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if made.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        template.pop();
        Ok(PrivateDir(PathBuf::from(std::ffi::OsStr::from_bytes(&template))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Most connections open at once. A new one beyond it takes the place of the connection
/// idle the longest; when every connection is in the middle of a request, it is told so
/// and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that starts no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A request line must be complete this long after its first byte.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A client that reads none of its answer for this long is dropped (with its answer).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// One open connection, as the acceptor sees it.
struct ConnState {
    /// The connection: served by its thread, shut down by the acceptor to evict it.
    stream: UnixStream,
    /// Reading or answering a request (never evicted then).
    busy: std::sync::atomic::AtomicBool,
    /// When it last finished a request (or opened).
    idle_since: std::sync::Mutex<std::time::Instant>,
}

impl ConnState {
    fn set_busy(&self, busy: bool) {
        self.busy.store(busy, std::sync::atomic::Ordering::SeqCst);
        if !busy {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = std::time::Instant::now();
        }
    }
}

/// The open connections, so that the acceptor can bound them.
#[derive(Default)]
struct Connections(std::sync::Mutex<Vec<Arc<ConnState>>>);

impl Connections {
    /// Registers `stream`, evicting the longest-idle connection if all places are taken.
    /// `None`: every connection is busy with a request.
    fn admit(&self, stream: UnixStream) -> Result<Arc<ConnState>, UnixStream> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() >= MAX_CONNECTIONS {
            let victim = all
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.busy.load(std::sync::atomic::Ordering::SeqCst))
                .min_by_key(|(_, c)| *c.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
                .map(|(i, _)| i);
            let Some(victim) = victim else { return Err(stream) };
            let gone = all.swap_remove(victim);
            let _ = gone.stream.shutdown(std::net::Shutdown::Both);
        }
        let state = Arc::new(ConnState {
            stream,
            busy: false.into(),
            idle_since: std::sync::Mutex::new(std::time::Instant::now()),
        });
        all.push(state.clone());
        Ok(state)
    }

    fn remove(&self, state: &Arc<ConnState>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| !Arc::ptr_eq(c, state));
    }
}

fn accept_loop(listener: &UnixListener, control: &Arc<Control<VcpuContext>>) {
    let connections = Arc::new(Connections::default());
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                // Out of file descriptors (or another transient failure): the pending
                // connection stays queued; retrying at once would spin at 100% CPU.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let state = match connections.admit(stream) {
            Ok(state) => state,
            Err(stream) => {
                let _ = stream.set_nonblocking(true);
                let _ = reply(&mut &stream, &error(format!(
                    "too many connections: all {MAX_CONNECTIONS} the VMM serves at once are in the middle of a request")));
                continue;
            }
        };
        let (control, all) = (control.clone(), connections.clone());
        let unregister = state.clone();
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            serve(&control, &state);
            all.remove(&state);
        });
        if spawned.is_err() {
            connections.remove(&unregister);
        }
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

/// How reading one request line ended.
enum Line {
    Request(Vec<u8>),
    TooLong,
    /// End of file, an error, or a timeout: the connection is over.
    Closed,
}

/// Reads one request line: the first byte within [`IDLE_TIMEOUT`], the whole line within
/// [`REQUEST_TIMEOUT`] of it and [`MAX_REQUEST`] bytes.
fn read_line(reader: &mut BufReader<&UnixStream>, state: &ConnState) -> Line {
    let mut line = Vec::new();
    let mut deadline: Option<std::time::Instant> = None;
    loop {
        let wait = match deadline {
            None => IDLE_TIMEOUT,
            Some(d) => match d.checked_duration_since(std::time::Instant::now()) {
                Some(left) if !left.is_zero() => left,
                _ => return Line::Closed,
            },
        };
        if reader.get_ref().set_read_timeout(Some(wait)).is_err() {
            return Line::Closed;
        }
        let buf = match reader.fill_buf() {
            Ok([]) | Err(_) => return Line::Closed,
            Ok(buf) => buf,
        };
        if deadline.is_none() {
            state.set_busy(true);
            deadline = Some(std::time::Instant::now() + REQUEST_TIMEOUT);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        line.extend_from_slice(chunk);
        let used = chunk.len();
        reader.consume(used);
        if line.len() > MAX_REQUEST + 1 {
            return Line::TooLong;
        }
        if done {
            return Line::Request(line);
        }
    }
}

fn serve(control: &Control<VcpuContext>, state: &ConnState) {
    let stream = &state.stream;
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let mut writer = std::io::BufWriter::new(stream);
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader, state) {
            Line::Request(line) if line.len() <= MAX_REQUEST => line,
            Line::Request(_) | Line::TooLong => {
                let _ = reply(&mut writer, &error(format!("request longer than {MAX_REQUEST} bytes")));
                return;
            }
            Line::Closed => return,
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            state.set_busy(false);
            continue;
        }
        IN_FLIGHT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let response = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handle(req, control, &mut |v| {
                let _ = reply(&mut writer, v);
            }),
            Err(e) => error(format!("bad request: {e}")).into(),
        };
        let sent = match response {
            Reply::Json(v) => reply(&mut writer, &v),
            Reply::Pagemap(answer, format) => answer.write(&mut writer, format),
        };
        IN_FLIGHT.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if sent.is_err() {
            return;
        }
        state.set_busy(false);
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
    job: impl FnOnce(&mut Tracker, &GuestMem, &VcpuFd) -> Result<R, String> + Send + 'static,
) -> Result<R, String> {
    control.call(move |ctx: &mut VcpuContext| {
        let VcpuContext { tracker, mem, vcpu, .. } = ctx;
        job(tracker, mem, vcpu)
    })?
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
pub fn handle(req: Request, control: &Control<VcpuContext>, emit: &mut dyn FnMut(&Value)) -> Reply {
    if let Request::Pagemap { pid, start, pages, summary: None | Some(false), format } = req {
        return match pagemap(control, pid, start, pages) {
            Ok(answer) => Reply::Pagemap(answer, format.unwrap_or(PagemapFormat::Array)),
            Err(e) => error(e).into(),
        };
    }
    handle_json(req, control, emit).into()
}

/// The pagemap range a request names (`None`: every mapping).
fn pagemap_range(start: Option<u64>, pages: Option<u64>) -> Result<Option<(u64, u64)>, String> {
    let range = match (start, pages) {
        (None, None) => None,
        (Some(s), Some(n)) => Some((s, n)),
        (Some(s), None) => Some((s, 1)),
        (None, Some(_)) => return Err("pages given without start".to_string()),
    };
    if let Some((s, n)) = range {
        crate::tracking::softdirty::check_range(s, n).map_err(|e| e.to_string())?;
    }
    Ok(range)
}

fn pagemap(control: &Control<VcpuContext>, pid: u32, start: Option<u64>, pages: Option<u64>) -> Result<PagemapAnswer, String> {
    let range = pagemap_range(start, pages)?;
    with_tracker(control, move |t, mem, _| {
        let t0 = std::time::Instant::now();
        let pages = t.pagemap(mem, pid, range).map_err(|e| e.to_string())?;
        // Compact before leaving the vCPU thread: the connection may hold it a while.
        Ok(PagemapAnswer::new(pid, &pages, t0.elapsed().as_nanos() as u64))
    })
}

fn handle_json(req: Request, control: &Control<VcpuContext>, emit: &mut dyn FnMut(&Value)) -> Value {
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
        Request::Ps {} => answer(with_tracker(control, |t, mem, _| {
            let snap = t.snapshot(mem).map_err(|e| e.to_string())?;
            let procs: Vec<Value> = snap.processes.iter().map(|p| json!({
                "pid": p.pid, "name": p.name, "state": p.state.name(), "exit_code": p.exit_code,
                "cr3": p.cr3.0, "rss_pages": p.rss_pages, "peak_rss_pages": p.peak_rss_pages,
                "mappings": p.mappings.iter().map(|m| json!({
                    "start": m.start, "pages": m.pages, "read_only": m.read_only, "huge": m.huge, "shared": m.shared,
                    "serial": m.serial,
                })).collect::<Vec<_>>(),
            })).collect();
            Ok(json!({"processes": procs}))
        })),
        Request::ClearRefs { pid, value } => answer((|| {
            let value = ClearRefs::try_from(value.unwrap_or(4)).map_err(|e| e.to_string())?;
            with_tracker(control, move |t, mem, vcpu| {
                let t0 = std::time::Instant::now();
                let changed = t.clear_refs(mem, vcpu, pid, value).map_err(|e| e.to_string())?;
                let elapsed = t0.elapsed().as_nanos() as u64;
                Ok(json!({"pid": pid, "value": value as u64, "entries_changed": changed, "elapsed_ns": elapsed}))
            })
        })()),
        // Only summaries get here (`handle` streams the rest).
        Request::Pagemap { pid, start, pages, .. } => answer(pagemap(control, pid, start, pages).map(|a| {
            let present = a.entries.iter().filter(|&&e| mmu::PagemapEntry(e).is_present()).count();
            let dirty = a.entries.iter().filter(|&&e| mmu::PagemapEntry(e).soft_dirty()).count();
            json!({"pid": pid, "count": a.entries.len(), "present": present, "soft_dirty": dirty, "elapsed_ns": a.elapsed_ns})
        })),
        Request::Info {} => answer(control.call(|ctx: &mut VcpuContext| {
            let mem_size = vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1;
            json!({
                "engine": ctx.tracker.engine().name(),
                "tsc_khz": ctx.vcpu.get_tsc_khz().ok(),
                "mechanism": ctx.tracker.log.mechanism(),
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
            with_tracker(control, |t, mem, _| t.window_start(mem).map_err(|e| e.to_string()))?;
            let t0 = std::time::Instant::now();
            std::thread::sleep(Duration::from_secs_f64(seconds));
            let (total, per) =
                with_tracker(control, |t, mem, _| t.window_report(mem).map_err(|e| e.to_string()))?;
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
                ctx.snapshot(Path::new(&out), diff.unwrap_or(false), p).map(|r| json!(r)).map_err(|e| e.to_string())
            })
            .and_then(|r| r),
        ),
        Request::Dump { pid, out, prev, progress } => answer(
            call_reporting(control, progress == Some(true), emit, move |ctx, p| {
                ctx.dump(pid, Path::new(&out), prev.as_deref().map(Path::new), p)
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

/// How long a client waits for the VMM beyond what its request itself waits (a `wait`
/// timeout, a `dirty-rate` window): a VMM that answers nothing by then is given up on.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

/// [`CLIENT_TIMEOUT`], or `VMM_CLIENT_TIMEOUT` seconds from the environment.
fn client_timeout() -> Duration {
    std::env::var("VMM_CLIENT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s < 1e9)
        .map_or(CLIENT_TIMEOUT, Duration::from_secs_f64)
}

/// What `request` itself may take before its answer (beyond the VMM's own work).
fn own_duration(request: &Value) -> Duration {
    let ms = request["timeout_ms"].as_u64().unwrap_or(0).min(24 * 3600 * 1000);
    let secs = request["seconds"].as_f64().filter(|s| s.is_finite() && *s > 0.0).unwrap_or(0.0).min(3600.0);
    Duration::from_millis(ms) + Duration::from_secs_f64(secs)
}

/// Connects, sends `request` and returns the stream to read the answer from, with read
/// and write timeouts set.
fn send(path: &Path, request: &Value) -> Result<BufReader<UnixStream>, ClientError> {
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
    let io = |source| ClientError::Io { path: path.to_path_buf(), source };
    let timeout = client_timeout();
    stream.set_read_timeout(Some(timeout + own_duration(request))).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("a JSON value serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    Ok(BufReader::new(stream))
}

/// Reads one response line as JSON.
fn read_response(path: &Path, reader: &mut BufReader<UnixStream>) -> Result<Value, ClientError> {
    let mut response = String::new();
    let n = reader.read_line(&mut response).map_err(|source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::TimedOut { path: path.to_path_buf() },
        _ => ClientError::Io { path: path.to_path_buf(), source },
    })?;
    if n == 0 {
        return Err(ClientError::BadResponse { path: path.to_path_buf(), detail: "the VMM closed the connection without an answer".into() });
    }
    serde_json::from_str(&response).map_err(|e| ClientError::BadResponse { path: path.to_path_buf(), detail: e.to_string() })
}

fn check(v: Value) -> Result<Value, ClientError> {
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(ClientError::Refused(v["error"].as_str().unwrap_or("unknown error").to_string()))
    }
}

/// Client side: sends one request and returns the response object.
pub fn call(path: &Path, request: &Value) -> Result<Value, ClientError> {
    call_with_progress(path, request, |_, _| {})
}

/// [`call`] for long requests sent with `"progress": true`: `on_progress(done, total)`
/// gets each progress line before the answer.
pub fn call_with_progress(path: &Path, request: &Value, mut on_progress: impl FnMut(u64, u64)) -> Result<Value, ClientError> {
    let mut reader = send(path, request)?;
    let v = loop {
        let v = read_response(path, &mut reader)?;
        match v.get("progress") {
            Some(p) if v.get("ok").is_none() => on_progress(p["done"].as_u64().unwrap_or(0), p["total"].as_u64().unwrap_or(0)),
            _ => break v,
        }
    };
    check(v)
}

/// Client side of a streamed answer (a pagemap in `"lines"` or `"raw"` format): the
/// header line, and the stream positioned at the body.
pub fn call_streaming(path: &Path, request: &Value) -> Result<(Value, BufReader<UnixStream>), ClientError> {
    let mut reader = send(path, request)?;
    let header = check(read_response(path, &mut reader)?)?;
    Ok((header, reader))
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
    #[error("the VMM at {path} did not answer in time (VMM_CLIENT_TIMEOUT sets the limit in seconds)")]
    TimedOut { path: PathBuf },
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
    fn pagemap_answers_stream_in_every_format() {
        use mmu::PagemapEntry;
        let page = |addr, entry: PagemapEntry, huge| PageInfo { addr, entry, huge, accessed: !huge };
        let pages = [
            page(0x400000, PagemapEntry::present(0x1234).with_soft_dirty(true).with_exclusive(true), false),
            page(0x401000, PagemapEntry::none(), false),
            page(0x600000, PagemapEntry::present(7), true),
        ];
        let answer = PagemapAnswer::new(3, &pages, 99);
        assert_eq!(answer.ranges, vec![(0x400000, 2), (0x600000, 1)]);
        let mut array = Vec::new();
        answer.write(&mut array, PagemapFormat::Array).unwrap();
        let v: Value = serde_json::from_slice(&array).unwrap();
        assert_eq!((v["ok"].clone(), v["pid"].clone(), v["elapsed_ns"].clone()), (json!(true), json!(3), json!(99)));
        let got = v["pages"].as_array().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], json!({"addr": 0x400000, "entry": pages[0].entry.0, "present": true, "pfn": 0x1234,
            "soft_dirty": true, "exclusive": true, "huge": false, "accessed": true}));
        assert_eq!(got[1]["pfn"], Value::Null);
        assert_eq!((got[2]["addr"].clone(), got[2]["huge"].clone()), (json!(0x600000), json!(true)));
        let mut lines = Vec::new();
        answer.write(&mut lines, PagemapFormat::Lines).unwrap();
        let lines: Vec<Value> = lines.split(|&b| b == b'\n').filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap()).collect();
        assert_eq!(lines[0]["count"], json!(3));
        assert_eq!(&lines[1..], got.as_slice());
        let mut raw = Vec::new();
        answer.write(&mut raw, PagemapFormat::Raw).unwrap();
        let split = raw.iter().position(|&b| b == b'\n').unwrap() + 1;
        let header: Value = serde_json::from_slice(&raw[..split]).unwrap();
        assert_eq!(header["bytes"], json!(24));
        let body: Vec<u64> = raw[split..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(body, pages.iter().map(|p| p.entry.0).collect::<Vec<_>>());
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
        let parent: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(parent, vec![std::ffi::OsString::from("sock")], "the private bind directory is gone");
        drop(guard);
        assert!(!path.exists());
    }
}
