//! A migration's connection: a Unix socket, or TCP — with mutual TLS unless the user
//! asked for plaintext by a flag that says it is insecure.
//!
//! [`Security::new`] checks the flags against the address and loads the TLS files
//! (bounded reads: they are untrusted input); [`connect`] (the source) and
//! [`listen`] + [`Listener::accept_within`] (the destination) return a [`Conn`] whose
//! handshake is done, bounded by [`HANDSHAKE_TIMEOUT`].
//!
//! What TLS checks: the destination (server) accepts only a source (client) whose
//! certificate chains to `--tls-ca`; the source accepts only a destination whose
//! certificate chains to its `--tls-ca` *and* names the address's HOST (a DNS name, or
//! an IP address as an IP SAN). TLS 1.3 only, ring's ciphers, no session resumption.
//!
//! Over TLS the destination sends one byte, [`READY`], once it has verified the
//! source's certificate: under TLS 1.3 the client finishes its handshake before the
//! server has looked at the client's certificate, so without it a refused source would
//! learn of the refusal only as a broken pipe in the middle of round 0.

use super::addr::Addr;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A handshake (TLS, and the destination's [`READY`]) that takes longer fails: a peer
/// that connects and says nothing must not hold a destination forever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source tries to reach each address of a TCP destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest certificate, key or CA file read.
pub const MAX_PEM_BYTES: u64 = 1 << 20;
/// Reads of the socket are buffered this much (one TLS read is at most 4 KiB otherwise),
/// and so is TLS's outgoing ciphertext.
const BUFFER: usize = 256 << 10;
/// The destination's byte after a TLS handshake: it verified the source's certificate.
pub const READY: u8 = 0x52;

/// The flags as given, on `vmm run --incoming` and `vmm migrate` alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Flags {
    /// `--tls-cert`: this side's certificate chain (PEM, leaf first).
    pub tls_cert: Option<PathBuf>,
    /// `--tls-key`: its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key: Option<PathBuf>,
    /// `--tls-ca`: the CA bundle (PEM) the peer's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// `--insecure-plaintext`: TCP without TLS.
    pub insecure_plaintext: bool,
}

impl Flags {
    /// The TLS flags given, by name.
    fn tls_given(&self) -> Vec<&'static str> {
        let all = [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key), ("--tls-ca", &self.tls_ca)];
        all.iter().filter(|(_, p)| p.is_some()).map(|(f, _)| *f).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{addr}: a TCP migration is encrypted and mutually authenticated with TLS: give --tls-cert, --tls-key and --tls-ca (missing: {missing}), or --insecure-plaintext to move the VM's memory and state unencrypted and unauthenticated")]
    NoTls { addr: String, missing: String },
    #[error("{flags}: only for tcp: addresses; {addr} is a Unix socket that only this user can reach")]
    FlagsOnUnix { addr: String, flags: String },
    #[error("--insecure-plaintext with {flags}: a TCP migration is either TLS or plaintext, not both")]
    PlaintextAndTls { flags: String },
    #[error("{flag} {}: cannot read it: {source}", path.display())]
    ReadFile { flag: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{flag} {}: {why}", path.display())]
    Pem { flag: &'static str, path: PathBuf, why: String },
    #[error("--tls-cert {} with --tls-key {}: {why}", cert.display(), key.display())]
    CertKey { cert: PathBuf, key: PathBuf, why: String },
    #[error("{addr}: {host:?} is neither a DNS name nor an IP address, so no certificate can name it")]
    ServerName { addr: String, host: String },
    #[error("cannot connect to the migration destination {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("TLS handshake with {peer} failed: {why}")]
    Handshake { peer: String, why: String },
    #[error(transparent)]
    Socket(#[from] crate::unix_socket::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("no migration arrived on {addr} within {}s", .wait.as_secs_f64())]
    NoSource { addr: String, wait: Duration },
    #[error("accepting the migration on {addr} failed: {source}")]
    Accept { addr: String, source: std::io::Error },
    #[error("{addr}: this connection's security does not fit the address (a bug)")]
    Mismatch { addr: String },
}

impl Error {
    /// The user's flags or files are wrong (as opposed to the network or the peer).
    pub fn is_config(&self) -> bool {
        matches!(self, Error::NoTls { .. } | Error::FlagsOnUnix { .. } | Error::PlaintextAndTls { .. }
            | Error::ReadFile { .. } | Error::Pem { .. } | Error::CertKey { .. } | Error::ServerName { .. })
    }
}

/// How a connection is protected, checked against its address, TLS files loaded.
#[derive(Clone)]
pub enum Security {
    /// A Unix socket: its 0600 mode (and the private directory it is made in) is the
    /// protection.
    Local,
    /// TCP without TLS: `--insecure-plaintext`.
    Plaintext,
    Tls(Arc<TlsConfig>),
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Security::Local => "Local",
            Security::Plaintext => "Plaintext",
            Security::Tls(_) => "Tls",
        })
    }
}

/// Both roles' TLS configurations, from one certificate, key and CA.
pub struct TlsConfig {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Security {
    /// Checks `flags` against `addr` and, for TLS, reads and checks the files.
    pub fn new(addr: &Addr, flags: &Flags) -> Result<Security, Error> {
        let given = flags.tls_given();
        match addr {
            Addr::Unix(_) => {
                let mut named = given;
                if flags.insecure_plaintext {
                    named.push("--insecure-plaintext");
                }
                if named.is_empty() {
                    Ok(Security::Local)
                } else {
                    Err(Error::FlagsOnUnix { addr: addr.to_string(), flags: named.join(", ") })
                }
            }
            Addr::Tcp { .. } if flags.insecure_plaintext => {
                if given.is_empty() {
                    Ok(Security::Plaintext)
                } else {
                    Err(Error::PlaintextAndTls { flags: given.join(", ") })
                }
            }
            Addr::Tcp { .. } => match (&flags.tls_cert, &flags.tls_key, &flags.tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Ok(Security::Tls(Arc::new(TlsConfig::load(cert, key, ca)?))),
                _ => {
                    let missing = ["--tls-cert", "--tls-key", "--tls-ca"].into_iter().filter(|f| !given.contains(f));
                    Err(Error::NoTls { addr: addr.to_string(), missing: missing.collect::<Vec<_>>().join(", ") })
                }
            },
        }
    }
}

fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    crate::input::read_limited(path, MAX_PEM_BYTES).map_err(|source| Error::ReadFile { flag, path: path.to_path_buf(), source })
}

/// Every certificate of a PEM file; none is an error.
fn read_certs(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = read_pem(flag, path)?;
    let pem_error = |why: String| Error::Pem { flag, path: path.to_path_buf(), why };
    let certs = CertificateDer::pem_slice_iter(&bytes).collect::<Result<Vec<_>, _>>().map_err(|e| pem_error(pem_why(e)))?;
    if certs.is_empty() {
        return Err(pem_error("no certificate in the file (PEM, -----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = read_pem("--tls-key", path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| Error::Pem {
        flag: "--tls-key",
        path: path.to_path_buf(),
        why: match e {
            pem::Error::NoItemsFound => "no private key in the file (PEM: PKCS#8, PKCS#1 or SEC1)".into(),
            e => pem_why(e),
        },
    })
}

fn pem_why(e: pem::Error) -> String {
    match e {
        pem::Error::MissingSectionEnd { end_marker } => {
            format!("not valid PEM: a {} section has no END line", String::from_utf8_lossy(&end_marker))
        }
        pem::Error::IllegalSectionStart { line } => format!("not valid PEM: a bad BEGIN line {:?}", String::from_utf8_lossy(&line)),
        e => format!("not valid PEM: {e}"),
    }
}

impl TlsConfig {
    fn load(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, Error> {
        let chain = read_certs("--tls-cert", cert)?;
        let private = read_key(key)?;
        let mut roots = rustls::RootCertStore::empty();
        for (i, c) in read_certs("--tls-ca", ca)?.into_iter().enumerate() {
            roots.add(c).map_err(|e| Error::Pem { flag: "--tls-ca", path: ca.to_path_buf(), why: format!("certificate {}: {e}", i + 1) })?;
        }
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert_key = |e: rustls::Error| Error::CertKey {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            why: match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => "the key is not the certificate's".into(),
                e => e.to_string(),
            },
        };
        let ca_error = |why: String| Error::Pem { flag: "--tls-ca", path: ca.to_path_buf(), why };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ca_error(e.to_string()))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(cert_key)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), private.clone_key())
            .map_err(cert_key)?;
        // One connection per destination: nothing to resume.
        server.send_tls13_tickets = 0;
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(cert_key)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, private)
            .map_err(cert_key)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfig { client: Arc::new(client), server: Arc::new(server) })
    }
}

/// One migration connection. Reads are buffered; a write that fails took nothing of its
/// buffer (so a caller may retry it after a timeout), and [`Write::flush`] sends what
/// TLS still holds.
pub struct Conn {
    /// The peer, for messages: the address dialled, or the one that connected.
    peer: String,
    io: Io,
}

enum Io {
    Unix(BufReader<UnixStream>),
    Tcp(BufReader<TcpStream>),
    Tls(Box<Tls>),
}

struct Tls {
    tls: rustls::Connection,
    tcp: BufReader<TcpStream>,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
}

impl Tls {
    /// Sends TLS's pending ciphertext until it is all out or the socket would block.
    fn send_pending(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            if self.tls.write_tls(self.tcp.get_mut())? == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Reads one batch of records from the socket and decrypts them. Returns false at
    /// the end of the stream. A TLS error is sent to the peer as an alert, best effort.
    fn receive(&mut self) -> std::io::Result<bool> {
        let n = self.tls.read_tls(&mut self.tcp)?;
        if let Err(e) = self.tls.process_new_packets() {
            let _ = self.send_pending();
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
        Ok(n > 0)
    }

    /// Drives the handshake to its end, bounded by the socket's timeouts.
    fn handshake(&mut self) -> std::io::Result<()> {
        let closed = || std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the peer closed the connection");
        while self.tls.is_handshaking() {
            self.send_pending()?;
            if !self.tls.is_handshaking() {
                break;
            }
            // Nothing to send and nothing more to read (a close_notify mid-handshake):
            // waiting would spin.
            if !self.tls.wants_read() || !self.receive()? {
                return Err(closed());
            }
        }
        // The client's last flight (its certificate and Finished).
        self.send_pending()
    }
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match &self.io {
            Io::Tcp(s) => s.get_ref(),
            Io::Tls(t) => t.tcp.get_ref(),
            Io::Unix(_) => unreachable!("only called for TCP"),
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.io {
            Io::Unix(s) => s.get_ref().set_read_timeout(t),
            _ => self.tcp().set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match &self.io {
            Io::Unix(s) => s.get_ref().set_write_timeout(t),
            _ => self.tcp().set_write_timeout(t),
        }
    }

    /// The peer, for messages.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Ends the connection cleanly (TLS's close_notify, then the socket's write side),
    /// best effort: the peer reads an end of stream rather than a reset.
    pub fn close(&mut self) {
        match &mut self.io {
            Io::Unix(s) => {
                let _ = s.get_ref().shutdown(Shutdown::Write);
            }
            Io::Tcp(s) => {
                let _ = s.get_ref().shutdown(Shutdown::Write);
            }
            Io::Tls(t) => {
                t.tls.send_close_notify();
                let _ = t.send_pending();
                let _ = t.tcp.get_ref().shutdown(Shutdown::Write);
            }
        }
    }
}

impl AsRawFd for Conn {
    /// The socket, to wait on with `poll` (see [`Conn::has_buffered_input`]).
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match &self.io {
            Io::Unix(s) => s.get_ref().as_raw_fd(),
            Io::Tcp(s) => s.get_ref().as_raw_fd(),
            Io::Tls(t) => t.tcp.get_ref().as_raw_fd(),
        }
    }
}

impl Conn {
    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Tls(_))
    }

    /// Whether input waits that a `poll` of the socket would not show: bytes read ahead
    /// into the buffer, or TLS plaintext decrypted already (or a TLS error, which the
    /// next read reports).
    pub fn has_buffered_input(&mut self) -> bool {
        match &mut self.io {
            Io::Unix(s) => !s.buffer().is_empty(),
            Io::Tcp(s) => !s.buffer().is_empty(),
            Io::Tls(t) => !t.tcp.buffer().is_empty() || t.tls.process_new_packets().map_or(true, |io| io.plaintext_bytes_to_read() > 0),
        }
    }

    /// Waits up to `wait` for something to read (at once if some is buffered). One
    /// thread owns a connection and both its directions: it looks here before reading,
    /// so that it never blocks on a read while it has something else to do.
    pub fn readable_within(&mut self, wait: Duration) -> std::io::Result<bool> {
        if self.has_buffered_input() {
            return Ok(true);
        }
        let deadline = Instant::now() + wait;
        loop {
            let mut fd = libc::pollfd { fd: self.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // Rounded up: a wait of 0.5 ms is not a poll that returns at once.
            let left = deadline.saturating_duration_since(Instant::now());
            let ms = i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
            // SAFETY: poll reads and writes the one pollfd we own.
            let n = unsafe { libc::poll(&mut fd, 1, ms) };
            match n {
                // A signal (the vCPU thread is kicked with one) is not the end of the
                // wait: again, for what is left of it.
                n if n < 0 => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                    if Instant::now() >= deadline {
                        return Ok(false);
                    }
                }
                0 if Instant::now() >= deadline => return Ok(false),
                0 => {}
                _ => return Ok(true),
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match &mut self.io {
            Io::Unix(s) => s.read(buf),
            Io::Tcp(s) => s.read(buf),
            Io::Tls(t) => loop {
                match t.tls.reader().read(buf) {
                    // No plaintext yet: read more records. After the end of the stream the
                    // reader answers Ok(0) (close_notify seen) or UnexpectedEof (not).
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        t.receive()?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(std::io::Error::new(e.kind(), "the peer closed the connection without ending TLS (no close_notify)"));
                    }
                    r => return r,
                }
            },
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &mut self.io {
            Io::Unix(s) => s.get_mut().write(buf),
            Io::Tcp(s) => s.get_mut().write(buf),
            Io::Tls(t) => {
                // Earlier writes' ciphertext first: if this times out, nothing of `buf`
                // was taken, and the caller may retry the same call.
                t.send_pending()?;
                let n = t.tls.writer().write(buf)?;
                // `buf` is taken (encrypted and queued): from here a timeout is not an
                // error of this call; what is left goes out with the next write or flush.
                match t.send_pending() {
                    Err(e) if is_timeout(&e) || e.kind() == std::io::ErrorKind::Interrupted => Ok(n),
                    Err(e) => Err(e),
                    Ok(()) => Ok(n),
                }
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match &mut self.io {
            Io::Unix(s) => s.get_mut().flush(),
            Io::Tcp(s) => s.get_mut().flush(),
            Io::Tls(t) => t.send_pending(),
        }
    }
}

fn resolve(addr: &Addr, host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, Error> {
    let connect = |source| Error::Connect { to: addr.to_string(), source };
    let all: Vec<_> = (host, port).to_socket_addrs().map_err(connect)?.collect();
    if all.is_empty() {
        return Err(connect(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{host} has no address"))));
    }
    Ok(all)
}

/// Connects to a destination (the source's side), handshake done.
pub fn connect(addr: &Addr, security: &Security) -> Result<Conn, Error> {
    let peer = addr.to_string();
    let connect = |source| Error::Connect { to: peer.clone(), source };
    match (addr, security) {
        (Addr::Unix(path), Security::Local) => {
            let s = UnixStream::connect(path).map_err(connect)?;
            Ok(Conn { io: Io::Unix(BufReader::with_capacity(BUFFER, s)), peer })
        }
        (Addr::Tcp { host, port }, Security::Plaintext | Security::Tls(_)) => {
            // Checked before connecting: a name no certificate can hold is the user's error.
            let name = match security {
                Security::Tls(_) => Some(ServerName::try_from(host.clone())
                    .map_err(|_| Error::ServerName { addr: peer.clone(), host: host.clone() })?),
                _ => None,
            };
            let mut last = None;
            let mut tcp = None;
            for a in resolve(addr, host, *port)? {
                match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
                    Ok(s) => {
                        tcp = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            let tcp = tcp.ok_or_else(|| connect(last.expect("resolve returns at least one address")))?;
            // The source gathers its writes itself (and TLS makes whole records): Nagle
            // would only delay the last records of a round and the switch-over.
            tcp.set_nodelay(true).map_err(connect)?;
            let tcp = BufReader::with_capacity(BUFFER, tcp);
            match (security, name) {
                (Security::Tls(cfg), Some(name)) => {
                    let tls = rustls::ClientConnection::new(cfg.client.clone(), name)
                        .map_err(|e| Error::Handshake { peer: peer.clone(), why: e.to_string() })?;
                    secure(tcp, tls.into(), peer, Role::Source, HANDSHAKE_TIMEOUT)
                }
                _ => Ok(Conn { io: Io::Tcp(tcp), peer }),
            }
        }
        _ => Err(Error::Mismatch { addr: peer }),
    }
}

/// The TLS error inside `e`, if that is what it is.
fn tls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Source,
    Destination,
}

/// Runs the TLS handshake on `tcp` within `limit`; then the destination sends
/// [`READY`] and the source waits for it (within `limit` too). The socket's timeouts
/// are cleared afterwards: the caller sets its own.
fn secure(tcp: BufReader<TcpStream>, mut tls: rustls::Connection, peer: String, role: Role, limit: Duration) -> Result<Conn, Error> {
    tls.set_buffer_limit(Some(BUFFER));
    let failed = |why: String| Error::Handshake { peer: peer.clone(), why };
    let io_failed = |e: std::io::Error| {
        if is_timeout(&e) {
            failed(format!("the peer sent nothing for {} s", limit.as_secs_f64()))
        } else {
            failed(e.to_string())
        }
    };
    let mut conn = Conn { io: Io::Tls(Box::new(Tls { tls, tcp })), peer: peer.clone() };
    conn.set_read_timeout(Some(limit)).and_then(|()| conn.set_write_timeout(Some(limit))).map_err(io_failed)?;
    let Io::Tls(t) = &mut conn.io else { unreachable!("made just above") };
    t.handshake().map_err(|e| match (role, tls_error(&e)) {
        // The source looked at this side's certificate and said no.
        (Role::Destination, Some(rustls::Error::AlertReceived(a))) => failed(format!("the source refused it: received fatal alert: {a:?}")),
        (Role::Destination, Some(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType))) => {
            failed("the source does not speak TLS (is it using --insecure-plaintext?)".into())
        }
        _ => io_failed(e),
    })?;
    match role {
        Role::Source => {
            let mut ready = [0u8; 1];
            match conn.read_exact(&mut ready) {
                Ok(()) if ready[0] == READY => {}
                Ok(()) => return Err(failed(format!("the destination answered {:#04x}, not READY", ready[0]))),
                Err(e) if is_timeout(&e) => return Err(io_failed(e)),
                Err(e) => return Err(failed(format!("waiting for the destination to accept this side's certificate: {e}"))),
            }
        }
        Role::Destination => conn.write_all(&[READY]).and_then(|()| conn.flush()).map_err(io_failed)?,
    }
    conn.set_read_timeout(None).and_then(|()| conn.set_write_timeout(None)).map_err(io_failed)?;
    Ok(conn)
}

/// A destination waiting for its one migration.
pub struct Listener {
    socket: Socket,
    /// Where it listens: for TCP with the port bound (so `tcp:HOST:0` tells its port).
    addr: Addr,
    security: Security,
    handshake_timeout: Duration,
}

enum Socket {
    /// The file goes with the listener.
    Unix { listener: UnixListener, _file: SocketFile },
    Tcp(TcpListener),
}

/// Removes a Unix listening socket's file with the listener.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Listens on `addr`: a Unix socket made 0600 in a private directory, or a TCP port.
pub fn listen(addr: &Addr, security: &Security) -> Result<Listener, Error> {
    let socket = match (addr, security) {
        (Addr::Unix(path), Security::Local) => Socket::Unix { listener: crate::unix_socket::bind_private(path)?, _file: SocketFile(path.clone()) },
        (Addr::Tcp { host, port }, Security::Plaintext | Security::Tls(_)) => {
            Socket::Tcp(TcpListener::bind((host.as_str(), *port)).map_err(|source| Error::Bind { addr: addr.to_string(), source })?)
        }
        _ => return Err(Error::Mismatch { addr: addr.to_string() }),
    };
    let addr = match (&socket, addr) {
        (Socket::Tcp(l), Addr::Tcp { host, .. }) => {
            let port = l.local_addr().map_err(|source| Error::Bind { addr: addr.to_string(), source })?.port();
            Addr::Tcp { host: host.clone(), port }
        }
        _ => addr.clone(),
    };
    Ok(Listener { socket, addr, security: security.clone(), handshake_timeout: HANDSHAKE_TIMEOUT })
}

impl Listener {
    /// Bounds the handshake by `limit` instead of [`HANDSHAKE_TIMEOUT`] (for tests).
    pub fn with_handshake_timeout(mut self, limit: Duration) -> Listener {
        self.handshake_timeout = limit;
        self
    }

    /// Where it listens, with the port it bound.
    pub fn addr(&self) -> &Addr {
        &self.addr
    }

    /// Accepts the first connection that arrives within `wait` and, over TLS, runs the
    /// handshake (within [`HANDSHAKE_TIMEOUT`]): a source whose certificate does not
    /// chain to the CA is an [`Error::Handshake`] naming it. The listener is closed
    /// (its socket file removed) whatever happens: a destination takes one migration.
    pub fn accept_within(self, wait: Duration) -> Result<Conn, Error> {
        let addr = self.addr.to_string();
        let accept = |source| Error::Accept { addr: addr.clone(), source };
        match &self.socket {
            Socket::Unix { listener, .. } => listener.set_nonblocking(true),
            Socket::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(accept)?;
        let deadline = Instant::now() + wait;
        loop {
            let got = match &self.socket {
                Socket::Unix { listener, .. } => listener.accept().map(|(s, _)| (Io::Unix(BufReader::with_capacity(BUFFER, s)), addr.clone())),
                Socket::Tcp(l) => l.accept().map(|(s, from)| (Io::Tcp(BufReader::with_capacity(BUFFER, s)), format!("tcp:{from}"))),
            };
            match got {
                Ok((io, peer)) => return self.start(io, peer).map_err(|e| match e {
                    Error::Accept { source, .. } => accept(source),
                    e => e,
                }),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(Error::NoSource { addr, wait });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(accept(e)),
            }
        }
    }

    fn start(&self, io: Io, peer: String) -> Result<Conn, Error> {
        let accept = |source| Error::Accept { addr: self.addr.to_string(), source };
        match io {
            Io::Unix(s) => {
                s.get_ref().set_nonblocking(false).map_err(accept)?;
                Ok(Conn { io: Io::Unix(s), peer })
            }
            Io::Tcp(s) => {
                // Its writes are the handshake, READY and COMMIT: each must go at once.
                s.get_ref().set_nonblocking(false).and_then(|()| s.get_ref().set_nodelay(true)).map_err(accept)?;
                match &self.security {
                    Security::Tls(cfg) => {
                        let tls = rustls::ServerConnection::new(cfg.server.clone())
                            .map_err(|e| Error::Handshake { peer: peer.clone(), why: e.to_string() })?;
                        secure(s, tls.into(), peer, Role::Destination, self.handshake_timeout)
                    }
                    _ => Ok(Conn { io: Io::Tcp(s), peer }),
                }
            }
            Io::Tls(_) => unreachable!("accepted sockets are plain"),
        }
    }
}

#[cfg(test)]
#[path = "../../../tests/common/pki.rs"]
mod pki;

#[cfg(test)]
mod tests {
    use super::pki::{Ca, TlsFiles};
    use super::*;

    fn tcp(s: &str) -> Addr {
        s.parse().unwrap()
    }

    fn flags(f: &TlsFiles) -> Flags {
        Flags { tls_cert: Some(f.cert.clone()), tls_key: Some(f.key.clone()), tls_ca: Some(f.ca.clone()), insecure_plaintext: false }
    }

    fn tls(f: &TlsFiles) -> Security {
        Security::new(&tcp("tcp:127.0.0.1:1"), &flags(f)).unwrap()
    }

    fn err(addr: &str, f: &Flags) -> String {
        Security::new(&tcp(addr), f).unwrap_err().to_string()
    }

    /// A destination on `tcp:127.0.0.1:0` accepting one connection on a thread.
    fn destination(sec: &Security) -> (Addr, std::thread::JoinHandle<Result<Conn, Error>>) {
        let l = listen(&tcp("tcp:127.0.0.1:0"), sec).unwrap();
        let addr = l.addr().clone();
        (addr, std::thread::spawn(move || l.accept_within(Duration::from_secs(30))))
    }

    #[test]
    fn flags_must_fit_the_address() {
        let some = Some(PathBuf::from("/x.pem"));
        let unix = "unix:/tmp/m.sock";
        assert!(matches!(Security::new(&tcp(unix), &Flags::default()), Ok(Security::Local)));
        let e = err(unix, &Flags { tls_ca: some.clone(), insecure_plaintext: true, ..Flags::default() });
        assert!(e.starts_with("--tls-ca, --insecure-plaintext: only for tcp: addresses"), "{e}");
        let e = err("tcp:h:1", &Flags::default());
        assert!(e.contains("missing: --tls-cert, --tls-key, --tls-ca") && e.contains("--insecure-plaintext"), "{e}");
        let e = err("tcp:h:1", &Flags { tls_cert: some.clone(), ..Flags::default() });
        assert!(e.contains("missing: --tls-key, --tls-ca"), "{e}");
        let e = err("tcp:h:1", &Flags { tls_key: some, insecure_plaintext: true, ..Flags::default() });
        assert!(e.contains("--insecure-plaintext with --tls-key"), "{e}");
        let plain = Flags { insecure_plaintext: true, ..Flags::default() };
        assert!(matches!(Security::new(&tcp("tcp:h:1"), &plain), Ok(Security::Plaintext)));
        assert!(Security::new(&tcp("tcp:h:1"), &Flags::default()).unwrap_err().is_config());
    }

    #[test]
    fn unreadable_and_malformed_files_are_named() {
        let d = tempfile::tempdir().unwrap();
        let good = Ca::new("ca").issue(d.path(), "good", &["127.0.0.1"]);
        let other = Ca::new("other").issue(d.path(), "other", &["127.0.0.1"]);
        let write = |name: &str, text: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let garbage = write("garbage.pem", b"hello, this is no certificate\n");
        let truncated = write("truncated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n");
        let huge = write("huge.pem", &vec![b'A'; (MAX_PEM_BYTES + 1) as usize]);
        let missing = d.path().join("missing.pem");
        let with = |f: &dyn Fn(&mut Flags)| {
            let mut fl = flags(&good);
            f(&mut fl);
            err("tcp:127.0.0.1:1", &fl)
        };
        let cases: Vec<(String, String)> = vec![
            (with(&|f| f.tls_cert = Some(missing.clone())), format!("--tls-cert {}: cannot read it: No such file", missing.display())),
            (with(&|f| f.tls_ca = Some(d.path().to_path_buf())), format!("--tls-ca {}: cannot read it: is a directory", d.path().display())),
            (with(&|f| f.tls_cert = Some(huge.clone())), format!("--tls-cert {}: cannot read it: is {} bytes, more than the limit", huge.display(), MAX_PEM_BYTES + 1)),
            (with(&|f| f.tls_cert = Some(garbage.clone())), format!("--tls-cert {}: no certificate in the file", garbage.display())),
            (with(&|f| f.tls_ca = Some(truncated.clone())), format!("--tls-ca {}: not valid PEM: a CERTIFICATE section has no END line", truncated.display())),
            (with(&|f| f.tls_key = Some(good.cert.clone())), format!("--tls-key {}: no private key in the file", good.cert.display())),
            (with(&|f| f.tls_key = Some(other.key.clone())), format!("--tls-cert {} with --tls-key {}: the key is not the certificate's", good.cert.display(), other.key.display())),
        ];
        for (got, want) in cases {
            assert!(got.starts_with(&want), "{got:?} should start with {want:?}");
        }
        assert!(matches!(tls(&good), Security::Tls(_)));
    }

    #[test]
    fn mutual_tls_carries_the_stream_both_ways() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca");
        let (dest, src) = (ca.issue(d.path(), "dest", &["127.0.0.1"]), ca.issue(d.path(), "src", &["src.example"]));
        let (addr, accepted) = destination(&tls(&dest));
        assert!(matches!(addr, Addr::Tcp { port, .. } if port != 0), "the bound port: {addr}");
        let mut c = connect(&addr, &tls(&src)).unwrap();
        let mut s = accepted.join().unwrap().unwrap();
        assert!(s.peer().starts_with("tcp:127.0.0.1:"), "{}", s.peer());
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 + i / 4096) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 3 << 20];
            s.read_exact(&mut got).unwrap();
            s.write_all(b"ok").unwrap();
            s.flush().unwrap();
            s.close();
            got
        });
        c.write_all(&data).unwrap();
        c.flush().unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        assert_eq!(answer, b"ok", "and the end is a clean close");
        assert!(reader.join().unwrap() == data, "every byte arrived, in order");
    }

    #[test]
    fn a_destination_from_another_ca_is_refused_by_the_source() {
        let d = tempfile::tempdir().unwrap();
        let dest = Ca::new("elsewhere").issue(d.path(), "dest", &["127.0.0.1"]);
        let src = Ca::new("ours").issue(d.path(), "src", &["127.0.0.1"]);
        let (addr, accepted) = destination(&tls(&dest));
        let e = connect(&addr, &tls(&src)).err().expect("refused").to_string();
        assert_eq!(e, format!("TLS handshake with {addr} failed: invalid peer certificate: UnknownIssuer"));
        let e = accepted.join().unwrap().err().expect("the destination fails too").to_string();
        assert!(e.starts_with("TLS handshake with tcp:127.0.0.1:") && e.ends_with("failed: the source refused it: received fatal alert: UnknownCA"), "{e}");
    }

    #[test]
    fn a_source_from_another_ca_is_refused_by_the_destination() {
        let d = tempfile::tempdir().unwrap();
        let dest = Ca::new("ours").issue(d.path(), "dest", &["127.0.0.1"]);
        let mut src = Ca::new("elsewhere").issue(d.path(), "src", &["127.0.0.1"]);
        // The source trusts the destination, but its own certificate is from elsewhere.
        src.ca = dest.ca.clone();
        let (addr, accepted) = destination(&tls(&dest));
        let e = connect(&addr, &tls(&src)).err().expect("refused").to_string();
        assert!(e.starts_with(&format!("TLS handshake with {addr} failed: waiting for the destination to accept this side's certificate: ")), "{e}");
        let e = accepted.join().unwrap().err().expect("refused").to_string();
        assert!(e.starts_with("TLS handshake with tcp:127.0.0.1:") && e.ends_with("failed: invalid peer certificate: UnknownIssuer"), "{e}");
    }

    #[test]
    fn the_destination_must_be_named_in_its_certificate() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca");
        let (dest, src) = (ca.issue(d.path(), "dest", &["dest.example"]), ca.issue(d.path(), "src", &["src.example"]));
        let (addr, _accepted) = destination(&tls(&dest));
        let e = connect(&addr, &tls(&src)).err().expect("refused").to_string();
        assert!(e.contains("invalid peer certificate: certificate not valid for name \"127.0.0.1\""), "{e}");
        let e = connect(&tcp("tcp:no_such host:1"), &tls(&src)).err().expect("refused");
        assert!(e.is_config() && e.to_string().contains("neither a DNS name nor an IP address"), "{e}");
    }

    #[test]
    fn a_plaintext_source_is_told_apart_from_a_bad_certificate() {
        let d = tempfile::tempdir().unwrap();
        let dest = Ca::new("ca").issue(d.path(), "dest", &["127.0.0.1"]);
        let (addr, accepted) = destination(&tls(&dest));
        let mut c = connect(&addr, &Security::Plaintext).unwrap();
        c.write_all(b"SDVMMIG\0\x01\0\0\0").unwrap();
        let e = accepted.join().unwrap().err().expect("no TLS, no migration").to_string();
        assert!(e.ends_with("failed: the source does not speak TLS (is it using --insecure-plaintext?)"), "{e}");
    }

    #[test]
    fn a_peer_that_says_nothing_does_not_hold_the_destination() {
        let d = tempfile::tempdir().unwrap();
        let dest = Ca::new("ca").issue(d.path(), "dest", &["127.0.0.1"]);
        let l = listen(&tcp("tcp:127.0.0.1:0"), &tls(&dest)).unwrap().with_handshake_timeout(Duration::from_millis(200));
        let Addr::Tcp { port, .. } = *l.addr() else { unreachable!() };
        let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let e = l.accept_within(Duration::from_secs(30)).err().expect("no handshake").to_string();
        assert!(e.contains("failed: the peer sent nothing for 0.2 s"), "{e}");
    }

    /// The source's writer retries a write that timed out: under TLS that must neither
    /// lose nor repeat bytes, however the timeouts fall.
    #[test]
    fn retried_tls_writes_lose_and_repeat_nothing() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::new("ca");
        let (dest, src) = (ca.issue(d.path(), "dest", &["127.0.0.1"]), ca.issue(d.path(), "src", &["127.0.0.1"]));
        let (addr, accepted) = destination(&tls(&dest));
        let mut c = connect(&addr, &tls(&src)).unwrap();
        let mut s = accepted.join().unwrap().unwrap();
        const LEN: usize = 24 << 20;
        // Small socket buffers and a slow reader: the writer's 1 ms timeouts fire, in
        // the middle of TLS records.
        for (conn, opt) in [(&c, libc::SO_SNDBUF), (&s, libc::SO_RCVBUF)] {
            use std::os::fd::AsRawFd;
            let size: libc::c_int = 16 << 10;
            // SAFETY: a valid socket and a c_int option of the size given.
            let r = unsafe { libc::setsockopt(conn.tcp().as_raw_fd(), libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), 4) };
            assert_eq!(r, 0);
        }
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let mut got = Vec::with_capacity(LEN);
            let mut buf = vec![0u8; 64 << 10];
            while got.len() < LEN {
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "the stream ended after {} bytes", got.len());
                got.extend_from_slice(&buf[..n]);
                if got.len() % (1 << 20) < n {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            got
        });
        c.set_write_timeout(Some(Duration::from_millis(1))).unwrap();
        let data: Vec<u8> = (0..LEN as u32).map(|i| (i ^ (i >> 11)) as u8).collect();
        let retry = |c: &mut Conn, op: &mut dyn FnMut(&mut Conn) -> std::io::Result<usize>| loop {
            match op(c) {
                Err(e) if is_timeout(&e) => continue,
                r => return r.unwrap(),
            }
        };
        let mut done = 0;
        while done < LEN {
            let end = (done + 300_000).min(LEN);
            done += retry(&mut c, &mut |c| c.write(&data[done..end]));
        }
        retry(&mut c, &mut |c| c.flush().map(|()| 0));
        assert!(reader.join().unwrap() == data, "the destination read exactly what was written");
    }

    #[test]
    fn plaintext_tcp_and_unix_sockets_connect() {
        let (addr, accepted) = destination(&Security::Plaintext);
        let mut c = connect(&addr, &Security::Plaintext).unwrap();
        c.write_all(b"plain").unwrap();
        let mut s = accepted.join().unwrap().unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"plain");

        let d = tempfile::tempdir().unwrap();
        let unix = Addr::Unix(d.path().join("m.sock"));
        let l = listen(&unix, &Security::Local).unwrap();
        let mut c = connect(&unix, &Security::Local).unwrap();
        c.write_all(b"local").unwrap();
        let mut s = l.accept_within(Duration::from_secs(5)).unwrap();
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"local");
        assert!(!d.path().join("m.sock").exists(), "the socket file goes with the listener");
        assert!(matches!(connect(&unix, &Security::Plaintext), Err(Error::Mismatch { .. })));
    }

    #[test]
    fn a_signal_does_not_end_a_wait_for_input() {
        // The source's vCPU thread waits for the destination's messages, and is kicked
        // with a signal now and then: each one interrupts poll.
        crate::machine::kick::install().unwrap();
        let d = tempfile::tempdir().unwrap();
        let unix = Addr::Unix(d.path().join("m.sock"));
        let l = listen(&unix, &Security::Local).unwrap();
        let mut c = connect(&unix, &Security::Local).unwrap();
        let mut s = l.accept_within(Duration::from_secs(5)).unwrap();
        let waiter = crate::machine::kick::Kicker::current();
        let peer = std::thread::spawn(move || {
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(20));
                waiter.kick();
            }
            s.write_all(b"x").unwrap();
            s
        });
        assert!(c.readable_within(Duration::from_secs(60)).unwrap(), "the input came within the wait, after the signals");
        let mut got = [0u8; 1];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"x");
        let _open = peer.join().unwrap();
        assert!(!c.readable_within(Duration::ZERO).unwrap(), "nothing more");
    }
}
