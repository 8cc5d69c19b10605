//! The control socket's client: one connection per request.
//!
//! ```no_run
//! use vmm::api::{self, Request, Status};
//! # fn main() -> Result<(), api::ClientError> {
//! let status: Status = api::call("/tmp/vm.sock".as_ref(), &Request::Status {})?;
//! println!("{} syncs so far", status.syncs);
//! # Ok(()) }
//! ```
//!
//! Requests are anything that serializes to a request object — a [`Request`](super::Request),
//! or a `serde_json::Value` for tests that send something odd. Answers are read into
//! the command's answer type (docs of [`Request`](super::Request)'s variants), or into a
//! `serde_json::Value`. A refusal is [`ClientError::Refused`], whose [`ErrorKind`] is
//! what to match on.

use super::protocol::{ErrorKind, Progress, ProgressLine};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a client waits for the VMM beyond what its request itself waits (a `wait`
/// timeout, a `dirty-rate` window): a VMM that answers nothing by then is given up on.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the VMM at {path}: {source}")]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("talking to the VMM at {path} failed: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the VMM at {path} sent a malformed response: {detail}")]
    BadResponse { path: PathBuf, detail: String },
    /// The VMM answered with a refusal: `kind` says why, `message` says it to people.
    #[error("the VMM refused: {message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("the VMM at {path} did not answer in time (VMM_CLIENT_TIMEOUT sets the limit in seconds)")]
    TimedOut { path: PathBuf },
}

impl ClientError {
    /// Why the VMM refused, if it did.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Refused { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

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
fn send(path: &Path, request: &impl Serialize) -> Result<BufReader<UnixStream>, ClientError> {
    let request = serde_json::to_value(request)
        .map_err(|e| ClientError::BadResponse { path: path.to_path_buf(), detail: format!("the request does not encode: {e}") })?;
    let mut stream = UnixStream::connect(path).map_err(|source| ClientError::Connect { path: path.to_path_buf(), source })?;
    let io = |source| ClientError::Io { path: path.to_path_buf(), source };
    let timeout = client_timeout();
    stream.set_read_timeout(Some(timeout + own_duration(&request))).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(&request).expect("a JSON value serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    Ok(BufReader::new(stream))
}

/// Reads one response line as JSON.
fn read_line(path: &Path, reader: &mut BufReader<UnixStream>) -> Result<Value, ClientError> {
    let mut response = String::new();
    let n = reader.read_line(&mut response).map_err(|source| match source.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ClientError::TimedOut { path: path.to_path_buf() },
        _ => ClientError::Io { path: path.to_path_buf(), source },
    })?;
    if n == 0 {
        return Err(ClientError::BadResponse { path: path.to_path_buf(), detail: "the VMM closed the connection without an answer".into() });
    }
    serde_json::from_str(&response).map_err(|e| bad(path, e))
}

fn bad(path: &Path, e: serde_json::Error) -> ClientError {
    ClientError::BadResponse { path: path.to_path_buf(), detail: e.to_string() }
}

/// An answer line as `R`, or its refusal.
fn answer<R: DeserializeOwned>(path: &Path, v: Value) -> Result<R, ClientError> {
    if v["ok"] == Value::Bool(true) {
        return serde_json::from_value(v).map_err(|e| bad(path, e));
    }
    // Field by field rather than as a whole `Failure`: a sentence is worth showing
    // even next to a kind this client cannot read.
    let message = v["error"].as_str().unwrap_or("unknown error").to_string();
    let kind = serde_json::from_value(v["kind"].clone()).unwrap_or_default();
    Err(ClientError::Refused { kind, message })
}

/// Sends one request and returns its answer.
pub fn call<R: DeserializeOwned>(path: &Path, request: &impl Serialize) -> Result<R, ClientError> {
    call_with_progress(path, request, |_, _| {})
}

/// [`call`] for long requests sent with `"progress": true`: `on_progress(done, total)`
/// gets each progress line before the answer.
pub fn call_with_progress<R: DeserializeOwned>(
    path: &Path,
    request: &impl Serialize,
    mut on_progress: impl FnMut(u64, u64),
) -> Result<R, ClientError> {
    let mut reader = send(path, request)?;
    loop {
        let v = read_line(path, &mut reader)?;
        if v.get("progress").is_some() && v.get("ok").is_none() {
            let Progress { done, total } = serde_json::from_value::<ProgressLine>(v).map_err(|e| bad(path, e))?.progress;
            on_progress(done, total);
            continue;
        }
        return answer(path, v);
    }
}

/// [`call`], handing every line that comes before the answer (one without an `ok`
/// field: progress, migration rounds) to `on_line`.
pub fn call_with_updates<R: DeserializeOwned>(path: &Path, request: &impl Serialize, mut on_line: impl FnMut(Value)) -> Result<R, ClientError> {
    let mut reader = send(path, request)?;
    loop {
        let v = read_line(path, &mut reader)?;
        if v.get("ok").is_none() {
            on_line(v);
            continue;
        }
        return answer(path, v);
    }
}

/// Client side of a streamed answer (a pagemap in `"lines"` or `"raw"` format): the
/// header line, and the stream positioned at the body.
pub fn call_streaming<R: DeserializeOwned>(path: &Path, request: &impl Serialize) -> Result<(R, BufReader<UnixStream>), ClientError> {
    let mut reader = send(path, request)?;
    let header = answer(path, read_line(path, &mut reader)?)?;
    Ok((header, reader))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_own_waits_extend_the_timeout() {
        use crate::api::Request;
        let wait = serde_json::to_value(Request::Wait { label: None, timeout_ms: Some(1500) }).unwrap();
        assert_eq!(own_duration(&wait), Duration::from_millis(1500));
        let rate = serde_json::to_value(Request::DirtyRate { seconds: Some(2.0) }).unwrap();
        assert_eq!(own_duration(&rate), Duration::from_secs(2));
        assert_eq!(own_duration(&serde_json::to_value(Request::Ps {}).unwrap()), Duration::ZERO);
    }

    #[test]
    fn refusals_keep_their_sentence_and_kind() {
        let path = Path::new("/x");
        let v = serde_json::json!({"ok": false, "error": "no process with pid 9", "kind": "unknown-pid"});
        let e = answer::<Value>(path, v).unwrap_err();
        assert!(matches!(&e, ClientError::Refused { kind: ErrorKind::UnknownPid, message } if message == "no process with pid 9"));
        let e = answer::<Value>(path, serde_json::json!({"ok": false})).unwrap_err();
        assert_eq!(e.to_string(), "the VMM refused: unknown error");
    }
}
