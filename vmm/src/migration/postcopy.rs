//! Post-copy: the destination runs the guest before all of its memory arrived, and
//! fetches each missing frame when something touches it (userfaultfd missing mode on
//! guest RAM, `UFFDIO_COPY`), while the source pushes the rest in the background.
//!
//! After round 0 the source stops its guest and sends the state and the set of frames
//! dirtied since round 0 copied them (`MISSING` records) instead of their contents. The
//! destination drops those frames from its memory, registers guest RAM with a
//! userfaultfd and serves its faults from a thread of its own ([`Demand`]): a frame the
//! stream never carried is a zero frame (`UFFDIO_ZEROPAGE`); a missing one is asked for
//! (`'R' | u64 pfn`) and placed when it arrives. The source answers requests first and
//! pushes the other missing frames in order, then sends `END`; the destination answers
//! with its figures (`'S' | u64 demand faults | u64 ns blocked`).
//!
//! On each side one thread owns the connection and both its directions, so that it
//! works the same over a Unix socket, plain TCP and TLS (one TLS session cannot be
//! split between threads): the destination's fault thread reads frames, writes requests
//! and, handed over through a [`Mailbox`], the commit; the source's vCPU thread looks
//! for requests ([`Inbox`], never blocking) between the batches it pushes.
//!
//! Once the destination committed, the guest exists only there and its memory is split
//! between the two machines: **a failure of either side loses the guest.** The
//! destination then ends at once with [`ExitCode::PostcopyFailed`] and a line saying so,
//! rather than leaving a vCPU blocked forever on a frame that will never come.

use super::stream::{self, Kind, Reader};
use super::transport::Conn;
use crate::exit_code::ExitCode;
use crate::machine::memory::GuestMem;
use crate::tracking::frame_set::FrameSet;
use crate::tracking::source::uffd::{self, UffdioRange, UFFDIO_REGISTER_MODE_MISSING};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

const PAGE: u64 = 4096;
/// The destination's messages to the source after DONE (COMMIT and ABORT are others).
pub const REQUEST: u8 = b'R';
pub const STATS: u8 = b'S';
/// Frames sent around a requested one, if they are missing too (guests touch
/// neighbours).
pub const AROUND: u64 = 16;
/// A fault that waits this long with nothing arriving from the source ends the guest:
/// a source that is alive but sends nothing would otherwise hold a vCPU forever.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
ioctl_ior_nr!(UFFDIO_UNREGISTER, 0xaa, 0x01, UffdioRange);
ioctl_ior_nr!(UFFDIO_WAKE, 0xaa, 0x02, UffdioRange);
ioctl_iowr_nr!(UFFDIO_COPY, 0xaa, 0x03, UffdioCopy);
ioctl_iowr_nr!(UFFDIO_ZEROPAGE, 0xaa, 0x04, UffdioZeropage);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("post-copy needs userfaultfd on guest RAM: {what} failed: {source}")]
    Uffd { what: &'static str, source: std::io::Error },
    #[error("post-copy needs userfaultfd's missing mode on guest RAM: {0}")]
    Register(#[from] uffd::Error),
}

fn os(what: &'static str) -> Error {
    Error::Uffd { what, source: std::io::Error::last_os_error() }
}

/// The set of missing frames as MISSING payloads: `(u64 first, u64 count)` runs, each
/// payload within [`stream::MAX_RECORD`].
pub fn encode_missing(set: &FrameSet) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::new()];
    for (first, count) in set.runs() {
        if out.last().expect("one").len() + 16 > stream::MAX_RECORD as usize {
            out.push(Vec::new());
        }
        let last = out.last_mut().expect("one");
        last.extend(first.to_le_bytes());
        last.extend(count.to_le_bytes());
    }
    out
}

/// Adds one MISSING payload's runs to `set` (of `pages` frames), refusing runs outside
/// guest RAM.
pub fn decode_missing(payload: &[u8], set: &mut FrameSet, pages: u64) -> Result<(), String> {
    if !payload.len().is_multiple_of(16) {
        return Err(format!("MISSING record of {} bytes, not whole runs", payload.len()));
    }
    for run in payload.chunks_exact(16) {
        let first = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
        let count = u64::from_le_bytes(run[8..].try_into().expect("8 bytes"));
        stream::frames_in_ram(Kind::Missing, first, count, pages)?;
        set.insert_range(first, count);
    }
    Ok(())
}

/// What the destination's fault handler counted.
#[derive(Debug, Default)]
pub struct Figures {
    /// Faults on frames that had not arrived: each one waited for the source.
    pub demand_faults: AtomicU64,
    /// Time faulting threads (vCPU or VMM) waited for those frames, in total.
    pub blocked_ns: AtomicU64,
    /// Faults on frames the stream never carried (zero frames), served at once.
    pub zero_faults: AtomicU64,
    /// Missing frames that came by push, not by request.
    pub pushed: AtomicU64,
}

/// The destination's half: guest RAM registered for missing faults, served by a thread.
pub struct Demand {
    pub figures: Arc<Figures>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Demand {
    /// Drops the `missing` frames from `mem` (their contents there are stale), registers
    /// all of guest RAM with a userfaultfd, and starts serving faults: from here on
    /// anything touching a missing frame waits until it arrived on `conn`, which from
    /// here on belongs to the fault thread. Whatever else must go to the source (the
    /// commit) goes through the returned [`Mailbox`].
    pub fn start(mem: &GuestMem, missing: FrameSet, conn: Conn) -> Result<(Demand, Mailbox), Error> {
        let region = mem.find_region(GuestAddress(0)).expect("RAM starts at 0");
        let base = mem.get_host_address(GuestAddress(0)).expect("RAM starts at 0") as u64;
        let len = region.len();
        for (first, count) in missing.runs() {
            // SAFETY: the range is guest RAM (the runs lie inside it), mapped anonymous
            // and private for as long as `mem` lives; dropping frames there makes them
            // read as missing again, which is what post-copy needs. No vCPU runs yet.
            let r = unsafe { libc::madvise((base + first * PAGE) as *mut libc::c_void, (count * PAGE) as usize, libc::MADV_DONTNEED) };
            if r != 0 {
                return Err(os("madvise(MADV_DONTNEED) of the missing frames"));
            }
        }
        // The range is guest RAM's mapping, which outlives the descriptor (the thread
        // that holds it ends first).
        let uffd = uffd::open_registered(base, len, 0, UFFDIO_REGISTER_MODE_MISSING)?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| Error::Uffd { what: "an eventfd for the fault thread", source })?;
        let (tx, letters) = mpsc::channel();
        let mailbox = Mailbox { tx, wake: wake.try_clone().map_err(|source| Error::Uffd { what: "an eventfd for the fault thread", source })? };
        let figures = Arc::new(Figures::default());
        let mut server = Server { uffd, base, len, pages: len / PAGE, missing, waiting: Vec::new(), figures: figures.clone(), wake, letters };
        let thread = std::thread::Builder::new()
            .name("postcopy".into())
            .spawn(move || server.serve(conn))
            .map_err(|source| Error::Uffd { what: "starting the fault thread", source })?;
        Ok((Demand { figures, thread: Some(thread) }, mailbox))
    }

    /// Waits for the last frame (the run ends only after, so nothing is left behind).
    pub fn finish(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Bytes for the source, written by the fault thread (which owns the connection) in
/// order with its own requests; `send` returns once they went out.
pub struct Mailbox {
    tx: mpsc::Sender<Letter>,
    wake: EventFd,
}

/// Bytes to send, and where to say whether that worked.
type Letter = (Vec<u8>, mpsc::Sender<std::io::Result<()>>);

impl Mailbox {
    pub fn send(&self, bytes: Vec<u8>) -> std::io::Result<()> {
        let gone = || std::io::Error::other("the post-copy fault thread has ended");
        let (done, result) = mpsc::channel();
        self.tx.send((bytes, done)).map_err(|_| gone())?;
        self.wake.write(1)?;
        result.recv().map_err(|_| gone())?
    }
}

struct Server {
    uffd: OwnedFd,
    base: u64,
    len: u64,
    pages: u64,
    /// Frames not arrived yet.
    missing: FrameSet,
    /// Faults on missing frames: (pfn, since).
    waiting: Vec<(u64, Instant)>,
    figures: Arc<Figures>,
    /// Rings when a letter is in `letters`.
    wake: EventFd,
    letters: mpsc::Receiver<Letter>,
}

/// The guest cannot go on: say so and end the process (a vCPU blocked on a frame that
/// will never come would otherwise wait forever).
fn lost(why: &str) -> ! {
    eprintln!("vmm: error: the migration source failed during post-copy ({why}); the guest's memory was only partly here, so the guest is lost");
    std::process::exit(i32::from(ExitCode::PostcopyFailed.code()));
}

impl Server {
    fn serve(&mut self, conn: Conn) {
        let mut reader = Reader::resume(conn);
        let conn_fd = reader.get_ref().as_raw_fd();
        let mut ended = false;
        let mut heard = Instant::now();
        while !ended || !self.missing.is_empty() {
            let oldest = self.waiting.iter().map(|&(_, since)| since).min();
            if oldest.is_some_and(|t| t.elapsed() > STALL_LIMIT) && heard.elapsed() > STALL_LIMIT {
                lost(&format!("a frame was waited for {} s with nothing arriving", STALL_LIMIT.as_secs()));
            }
            // Read ahead already (a buffer, or TLS plaintext): poll would not show it.
            let buffered = reader.get_mut().has_buffered_input();
            let mut fds = [
                libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: conn_fd, events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: poll reads and writes the three pollfds we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, if buffered { 0 } else { 1000 }) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                lost("poll failed");
            }
            if fds[2].revents & libc::POLLIN != 0 {
                let _ = self.wake.read();
                while let Ok((bytes, done)) = self.letters.try_recv() {
                    let conn = reader.get_mut();
                    let _ = done.send(conn.write_all(&bytes).and_then(|()| conn.flush()));
                }
            }
            if fds[0].revents & libc::POLLIN != 0 {
                self.faults(reader.get_mut());
            }
            if buffered || fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                heard = Instant::now();
                match reader.next_record() {
                    Ok((Kind::Pages, payload)) => self.arrived(&payload),
                    Ok((Kind::End, _)) => ended = true,
                    Ok((kind, _)) => lost(&format!("a {kind:?} record during post-copy")),
                    Err(e) => lost(&e.to_string()),
                }
                if ended && !self.missing.is_empty() {
                    lost(&format!("it ended with {} frames never sent", self.missing.len()));
                }
            }
        }
        let range = UffdioRange { start: self.base, len: self.len };
        // SAFETY: UFFDIO_UNREGISTER reads a range we own: every frame is here now, so
        // guest RAM goes back to ordinary memory.
        unsafe { ioctl_with_ref(&self.uffd, UFFDIO_UNREGISTER(), &range) };
        let f = &self.figures;
        let mut msg = vec![STATS];
        msg.extend(f.demand_faults.load(Ordering::SeqCst).to_le_bytes());
        msg.extend(f.blocked_ns.load(Ordering::SeqCst).to_le_bytes());
        let mut conn = reader.into_inner();
        let _ = conn.write_all(&msg).and_then(|()| conn.flush());
        conn.close();
        eprintln!(
            "vmm: post-copy done: {} demand faults, faulting threads blocked {:.1} ms in all, {} frames pushed, {} zero frames filled",
            f.demand_faults.load(Ordering::SeqCst),
            f.blocked_ns.load(Ordering::SeqCst) as f64 / 1e6,
            f.pushed.load(Ordering::SeqCst),
            f.zero_faults.load(Ordering::SeqCst)
        );
    }

    /// Reads every queued fault message and serves or requests each.
    fn faults(&mut self, conn: &mut Conn) {
        let mut msg = [0u8; 32];
        loop {
            // SAFETY: reads at most 32 bytes into our buffer from the non-blocking uffd.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if n != msg.len() as isize {
                return;
            }
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = u64::from_le_bytes(msg[16..24].try_into().expect("8 bytes"));
            let Some(pfn) = addr.checked_sub(self.base).map(|o| o / PAGE).filter(|&p| p < self.pages) else { continue };
            if !self.missing.contains(pfn) {
                self.zero_or_wake(pfn);
            } else if !self.waiting.iter().any(|&(p, _)| p == pfn) {
                self.figures.demand_faults.fetch_add(1, Ordering::SeqCst);
                self.waiting.push((pfn, Instant::now()));
                let mut req = vec![REQUEST];
                req.extend(pfn.to_le_bytes());
                if conn.write_all(&req).and_then(|()| conn.flush()).is_err() {
                    lost("the connection broke while asking for a frame");
                }
            }
        }
    }

    /// A fault on a frame that is here or never came by the stream (a zero frame).
    fn zero_or_wake(&self, pfn: u64) {
        let range = UffdioRange { start: self.base + pfn * PAGE, len: PAGE };
        let mut z = UffdioZeropage { range, mode: 0, zeropage: 0 };
        // SAFETY: UFFDIO_ZEROPAGE fills one page of the registered range and wakes its
        // waiters; it reads and writes a struct we own.
        if unsafe { ioctl_with_mut_ref(&self.uffd, UFFDIO_ZEROPAGE(), &mut z) } < 0 {
            // EEXIST: the frame arrived meanwhile; wake whoever waits on it.
            // SAFETY: UFFDIO_WAKE reads a range of the registered region.
            unsafe { ioctl_with_ref(&self.uffd, UFFDIO_WAKE(), &range) };
        } else {
            self.figures.zero_faults.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A PAGES record during post-copy: places each frame still missing.
    fn arrived(&mut self, payload: &[u8]) {
        let Ok((pfn, data)) = stream::split_pfn(Kind::Pages, payload) else { lost("a malformed PAGES record") };
        if let Err(why) = stream::pages_in_ram(pfn, data.len() as u64, self.pages) {
            lost(&why);
        }
        for (i, page) in data.chunks_exact(PAGE as usize).enumerate() {
            let p = pfn + i as u64;
            if !self.missing.contains(p) {
                continue;
            }
            let mut c = UffdioCopy { dst: self.base + p * PAGE, src: page.as_ptr() as u64, len: PAGE, mode: 0, copy: 0 };
            // SAFETY: UFFDIO_COPY copies one page from our buffer into the registered
            // range (atomically, waking its waiters); it reads and writes a struct we own.
            let r = unsafe { ioctl_with_mut_ref(&self.uffd, UFFDIO_COPY(), &mut c) };
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST) {
                lost(&format!("UFFDIO_COPY failed: {}", std::io::Error::last_os_error()));
            }
            self.missing.remove(p);
            match self.waiting.iter().position(|&(w, _)| w == p) {
                Some(i) => {
                    let (_, since) = self.waiting.swap_remove(i);
                    self.figures.blocked_ns.fetch_add(since.elapsed().as_nanos() as u64, Ordering::SeqCst);
                }
                None => {
                    self.figures.pushed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }
    }
}

/// What the source learns at the end.
#[derive(Debug, Clone, Copy, Default)]
pub struct SourceFigures {
    pub requested: u64,
    pub pushed: u64,
    pub demand_faults: u64,
    pub blocked: Duration,
}

/// A message from the destination after DONE.
pub enum Message {
    Commit,
    Abort(String),
    Request(u64),
    Stats { demand_faults: u64, blocked_ns: u64 },
}

/// The source's reader of the destination's messages, on the connection it also
/// pushes frames on: it waits no longer than asked, and keeps a message that arrived in
/// parts for the next call.
#[derive(Default)]
pub struct Inbox {
    buf: Vec<u8>,
}

impl Inbox {
    /// The next message, waiting up to `wait` for it (`None`: none came in time).
    pub fn next(&mut self, conn: &mut Conn, wait: Duration) -> std::io::Result<Option<Message>> {
        let deadline = Instant::now() + wait;
        loop {
            if self.buf.first() == Some(&stream::ABORT) {
                // The destination says why, then closes: read to the end (bounded).
                let mut why = String::from_utf8_lossy(&self.buf[1..]).into_owned();
                let _ = (&mut *conn).take(4096).read_to_string(&mut why);
                self.buf.clear();
                return Ok(Some(Message::Abort(why)));
            }
            if let Some((m, used)) = decode(&self.buf)? {
                self.buf.drain(..used);
                return Ok(Some(m));
            }
            if !conn.readable_within(deadline.saturating_duration_since(Instant::now()))? {
                return Ok(None);
            }
            let mut chunk = [0u8; 512];
            match conn.read(&mut chunk) {
                Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the destination closed the connection")),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                // Readable, but not a whole TLS record yet.
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// The first whole message in `buf` and its length; `None` if it is not all there.
/// ABORT (whose reason runs to the end of the stream) is the caller's.
fn decode(buf: &[u8]) -> std::io::Result<Option<(Message, usize)>> {
    let Some(&tag) = buf.first() else { return Ok(None) };
    let need = match tag {
        stream::COMMIT => 1,
        REQUEST => 9,
        STATS => 17,
        other => return Err(std::io::Error::other(format!("unknown message {other:#x} from the destination"))),
    };
    if buf.len() < need {
        return Ok(None);
    }
    let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    let m = match tag {
        stream::COMMIT => Message::Commit,
        REQUEST => Message::Request(u64_at(1)),
        _ => Message::Stats { demand_faults: u64_at(1), blocked_ns: u64_at(9) },
    };
    Ok(Some((m, need)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_sets_round_trip_and_runs_outside_ram_are_refused() {
        let mut set = FrameSet::new(1000);
        set.insert_range(3, 5);
        set.insert_range(900, 100);
        let payloads = encode_missing(&set);
        assert_eq!(payloads.len(), 1);
        let mut back = FrameSet::new(1000);
        decode_missing(&payloads[0], &mut back, 1000).unwrap();
        assert_eq!(back.words(), set.words());
        assert!(decode_missing(&payloads[0], &mut FrameSet::new(999), 999).unwrap_err().contains("outside"));
        assert!(decode_missing(&payloads[0][..15], &mut back, 1000).unwrap_err().contains("whole runs"));
        let mut zero = 5u64.to_le_bytes().to_vec();
        zero.extend(0u64.to_le_bytes());
        assert!(decode_missing(&zero, &mut back, 1000).is_err(), "an empty run");
        let mut wrap = u64::MAX.to_le_bytes().to_vec();
        wrap.extend(2u64.to_le_bytes());
        assert!(decode_missing(&wrap, &mut back, 1000).is_err(), "a run that wraps");
    }

    #[test]
    fn destination_messages_parse_and_unknown_ones_are_refused() {
        let mut b = vec![REQUEST];
        b.extend(7u64.to_le_bytes());
        b.push(stream::COMMIT);
        b.push(STATS);
        b.extend(3u64.to_le_bytes());
        b.extend(9u64.to_le_bytes());
        b.push(0x42);
        let mut at = 0;
        let mut next = || {
            decode(&b[at..]).map(|o| {
                o.map(|(m, used)| {
                    at += used;
                    m
                })
            })
        };
        assert!(matches!(next(), Ok(Some(Message::Request(7)))));
        assert!(matches!(next(), Ok(Some(Message::Commit))));
        assert!(matches!(next(), Ok(Some(Message::Stats { demand_faults: 3, blocked_ns: 9 }))));
        assert!(next().is_err(), "unknown");
        assert!(matches!(decode(&[REQUEST, 1]), Ok(None)), "a message in parts waits for the rest");
        assert!(matches!(decode(&[]), Ok(None)));
    }
}
