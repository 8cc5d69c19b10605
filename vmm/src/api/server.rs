//! The control socket's server: binding the socket, accepting and bounding connections,
//! reading request lines and writing the answers that [`handlers`](super::handlers)
//! produce.
//!
//! Each connection gets its own thread; a client that sends garbage, sends too much or
//! hangs up mid-request only ends its own connection. Limits: [`MAX_REQUEST`],
//! [`MAX_CONNECTIONS`] and the timeouts below (docs/security.md says why).

use super::handlers::{self, Reply};
use super::protocol::{ErrorKind, Request};
use crate::vcpu::control::Control;
use crate::vcpu::runner::VcpuContext;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 64 * 1024;
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

/// Binding or serving the control socket failed.
pub use crate::unix_socket::Error;

/// Serves requests for one VM: [`Server::bind`], then [`Server::spawn`].
pub struct Server {
    path: PathBuf,
    listener: UnixListener,
}

impl Server {
    /// Binds `path` (mode 0600). A leftover socket nobody listens on is replaced; any
    /// other existing file is an error.
    pub fn bind(path: &Path) -> Result<Server, Error> {
        let listener = crate::unix_socket::bind_private(path)?;
        Ok(Server { path: path.to_path_buf(), listener })
    }

    /// Accepts connections on a background thread for as long as the process lives.
    /// The returned guard removes the socket file when dropped (at the end of the run);
    /// call [`SocketFile::drain`] before that to let answers being written go out.
    pub fn spawn(self, control: Arc<Control<VcpuContext>>) -> Result<SocketFile, Error> {
        let io = |source| Error::Io { path: self.path.clone(), source };
        let listener = self.listener.try_clone().map_err(io)?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let shared = Shared { control, connections: Connections::default(), in_flight: in_flight.clone() };
        std::thread::Builder::new()
            .name("api".into())
            .spawn(move || accept_loop(&listener, Arc::new(shared)))
            .map_err(io)?;
        Ok(SocketFile { path: self.path.clone(), in_flight })
    }
}

/// The socket's file, removed when dropped; and a view of the requests still being
/// answered.
pub struct SocketFile {
    path: PathBuf,
    /// Requests being answered right now.
    in_flight: Arc<AtomicUsize>,
}

impl SocketFile {
    /// Waits up to `limit` for the requests being answered to be answered, so that a
    /// client blocked in `wait` learns the VM finished instead of losing the line. Call
    /// it once the run is over (the VM finished, so every request ends soon).
    pub fn drain(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while self.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What the acceptor and every connection thread share.
struct Shared {
    control: Arc<Control<VcpuContext>>,
    connections: Connections,
    in_flight: Arc<AtomicUsize>,
}

/// Counts one request as in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicUsize) -> InFlight<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        InFlight(count)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One open connection, as the acceptor sees it.
struct ConnState {
    /// The connection: served by its thread, shut down by the acceptor to evict it.
    stream: UnixStream,
    /// Reading or answering a request (never evicted then).
    busy: AtomicBool,
    /// When it last finished a request (or opened).
    idle_since: Mutex<Instant>,
}

impl ConnState {
    fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::SeqCst);
        if !busy {
            *self.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// The open connections, so that the acceptor can bound them.
#[derive(Default)]
struct Connections(Mutex<Vec<Arc<ConnState>>>);

impl Connections {
    /// Registers `stream`, evicting the longest-idle connection if all places are taken.
    /// `Err`: every connection is busy with a request; the stream is handed back.
    fn admit(&self, stream: UnixStream) -> Result<Arc<ConnState>, UnixStream> {
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if all.len() >= MAX_CONNECTIONS {
            let victim = all
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.busy.load(Ordering::SeqCst))
                .min_by_key(|(_, c)| *c.idle_since.lock().unwrap_or_else(|e| e.into_inner()))
                .map(|(i, _)| i);
            let Some(victim) = victim else { return Err(stream) };
            let gone = all.swap_remove(victim);
            let _ = gone.stream.shutdown(std::net::Shutdown::Both);
        }
        let state = Arc::new(ConnState { stream, busy: false.into(), idle_since: Mutex::new(Instant::now()) });
        all.push(state.clone());
        Ok(state)
    }

    fn remove(&self, state: &Arc<ConnState>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).retain(|c| !Arc::ptr_eq(c, state));
    }
}

fn accept_loop(listener: &UnixListener, shared: Arc<Shared>) {
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
        let state = match shared.connections.admit(stream) {
            Ok(state) => state,
            Err(stream) => {
                let _ = stream.set_nonblocking(true);
                let busy = Reply::failure(ErrorKind::Busy, format!(
                    "too many connections: all {MAX_CONNECTIONS} the VMM serves at once are in the middle of a request"));
                let _ = send(&mut &stream, busy);
                continue;
            }
        };
        let theirs = shared.clone();
        let unregister = state.clone();
        let spawned = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
            serve(&theirs, &state);
            theirs.connections.remove(&state);
        });
        if spawned.is_err() {
            shared.connections.remove(&unregister);
        }
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
    let mut deadline: Option<Instant> = None;
    loop {
        let wait = match deadline {
            None => IDLE_TIMEOUT,
            Some(d) => match d.checked_duration_since(Instant::now()) {
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
            deadline = Some(Instant::now() + REQUEST_TIMEOUT);
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

fn serve(shared: &Shared, state: &ConnState) {
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
                let _ = send(&mut writer, Reply::failure(ErrorKind::BadRequest, format!("request longer than {MAX_REQUEST} bytes")));
                return;
            }
            Line::Closed => return,
        };
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            state.set_busy(false);
            continue;
        }
        let in_flight = InFlight::enter(&shared.in_flight);
        let reply = match serde_json::from_slice::<Request>(&line) {
            Ok(req) => handlers::handle(req, &shared.control, &mut |line| {
                let _ = send(&mut writer, Reply::Line(line));
            }),
            Err(e) => Reply::failure(ErrorKind::BadRequest, format!("bad request: {e}")),
        };
        let sent = send(&mut writer, reply);
        drop(in_flight);
        if sent.is_err() {
            return;
        }
        state.set_busy(false);
    }
}

/// Writes `reply` (a line and its newline, or a streamed pagemap) and flushes.
fn send(w: &mut impl Write, reply: Reply) -> std::io::Result<()> {
    match reply {
        Reply::Line(line) => {
            w.write_all(line.as_bytes())?;
            w.write_all(b"\n")?;
            w.flush()
        }
        Reply::Pagemap(answer, format) => answer.write(w, format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

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

    /// A request answered over a real socket, through the client, with its error kind.
    #[test]
    fn clients_get_typed_answers_and_kinds() {
        use crate::api::{call, ClientError, Request, Resumed, Status};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let control = Arc::new(Control::default());
        let guard = Server::bind(&path).unwrap().spawn(control.clone()).unwrap();
        let status: Status = call(&path, &Request::Status {}).unwrap();
        assert_eq!((status.phase, status.syncs), (crate::api::PhaseReply::Running, 0));
        let refused = call::<Resumed>(&path, &Request::Resume {}).unwrap_err();
        assert!(matches!(refused, ClientError::Refused { kind: ErrorKind::NotPaused, .. }), "{refused}");
        assert_eq!(refused.to_string(), "the VMM refused: the VM is running, not paused at a sync");
        let bad = call::<serde_json::Value>(&path, &serde_json::json!({"cmd": "frob"})).unwrap_err();
        assert!(matches!(bad, ClientError::Refused { kind: ErrorKind::BadRequest, .. }), "{bad}");
        control.finish("the guest exited".into());
        let done = call::<Resumed>(&path, &Request::Resume {}).unwrap_err();
        assert_eq!(done.kind(), Some(ErrorKind::Finished), "{done}");
        guard.drain(Duration::from_millis(100));
    }
}
