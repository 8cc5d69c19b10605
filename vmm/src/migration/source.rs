//! The source side of a live migration: the stream as a pre-copy sink
//! ([`super::precopy`]), paced, cancellable, and committed by the destination.

use super::addr::Addr;
use super::precopy::{self, Sink};
use super::stream::{self, Hello, Kind, Writer};
use super::{encode_sections, Error};
use crate::storage::snapshot;
use crate::tracking::frame_set::FrameSet;
use crate::vcpu::control::Control;
use crate::vcpu::runner::VcpuContext;
use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::GuestMemoryBackend;

const PAGE: u64 = 4096;
/// How long the source waits for the destination's commit after the last record.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// A send that makes no progress for this long fails the migration.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How far the send may fall behind `--bandwidth` before the lag is forgiven.
const PACE_SLACK: Duration = Duration::from_millis(50);
/// Writes wait at most this long before looking at the cancel flag again.
const WRITE_SLICE: Duration = Duration::from_millis(50);

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// Switch over once the last dirty set is expected to take at most this long.
    pub downtime: Duration,
    /// Cap on the send rate, bytes per second.
    pub bandwidth: Option<u64>,
    /// The whole migration's bound; past it, the migration is cancelled cleanly.
    pub timeout: Duration,
    /// Set by `migrate-cancel`.
    pub cancel: Arc<AtomicBool>,
    /// Throttle a guest that dirties faster than the link carries (auto-converge).
    pub throttle: bool,
}

pub use super::precopy::Round;

/// The outcome of a finished migration.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub to: String,
    pub total_ms: f64,
    /// The guest was stopped this long (the last round, the state, the destination's
    /// commit).
    pub downtime_ms: f64,
    pub rounds: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub postcopy: bool,
    pub throttled: bool,
    /// The largest throttle share used, in %, and the time the vCPU was held in all.
    #[serde(default)]
    pub max_throttle_pct: f64,
    #[serde(default)]
    pub throttled_ms: f64,
}

/// The connection, written so that a cancel stops even a write the destination does not
/// read: each write waits at most [`WRITE_SLICE`], then looks at the flag; a write that
/// makes no progress for [`WRITE_TIMEOUT`] fails.
struct Cancellable {
    conn: UnixStream,
    cancel: Arc<AtomicBool>,
}

impl std::io::Write for Cancellable {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let since = Instant::now();
        loop {
            match self.conn.write(buf) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if self.cancel.load(Ordering::SeqCst) {
                        return Err(std::io::Error::other(CANCELLED));
                    }
                    if since.elapsed() > WRITE_TIMEOUT {
                        return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the destination read nothing for 30 s"));
                    }
                }
                r => return r,
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// The message of the I/O error a cancelled write ends with.
const CANCELLED: &str = "cancelled";

/// Rate limiter and byte counter over the connection.
struct Link {
    w: Writer<Cancellable>,
    /// The destination, as the source's run reports it once the VM moved.
    to: String,
    /// The pacing's reference point: the rate since it (`w.bytes` then) is held to `cap`.
    paced_from: (Instant, u64),
    cap: Option<u64>,
    /// `migrate-cancel`'s flag: checked between batches, so that a long round stops
    /// promptly, and while waiting for the destination's commit.
    cancel: Arc<AtomicBool>,
    /// The migration's deadline, checked between batches; `None` in the last round:
    /// with the guest stopped, finishing is quicker than stopping.
    deadline: Option<(Instant, Duration)>,
    /// Pages sent as data / as zero runs.
    pages: u64,
    zeros: u64,
}

impl Link {
    /// Holds the send rate to `cap`. Time the link spent below the cap (zero checks, a
    /// slow reader) is not made up for later with a burst over it: falling behind by
    /// more than [`PACE_SLACK`] moves the reference point.
    fn pace(&mut self) {
        let Some(cap) = self.cap.filter(|&c| c > 0) else { return };
        let (from, bytes) = self.paced_from;
        let due = from + Duration::from_secs_f64((self.w.bytes - bytes) as f64 / cap as f64);
        let now = Instant::now();
        if let Some(wait) = due.checked_duration_since(now) {
            std::thread::sleep(wait);
        } else if now - due > PACE_SLACK {
            self.paced_from = (now, self.w.bytes);
        }
    }

    /// A cancel, or the deadline passed (checked between batches and rounds).
    fn check_stop(&self) -> Result<(), Error> {
        if self.cancel.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        match self.deadline {
            Some((deadline, timeout)) if Instant::now() > deadline => Err(Error::Timeout(timeout)),
            _ => Ok(()),
        }
    }

    /// Splits a batch into runs of zero frames (markers) and data frames.
    fn send_skipping_zeros(&mut self, first: u64, bytes: &[u8]) -> Result<(), Error> {
        // Each page is looked at once, a word at a time.
        let zero: Vec<bool> = bytes
            .chunks_exact(PAGE as usize)
            .map(|p| p.chunks_exact(8).all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0))
            .collect();
        let mut i = 0;
        while i < zero.len() {
            let mut j = i + 1;
            while j < zero.len() && zero[j] == zero[i] {
                j += 1;
            }
            let pfn = first + i as u64;
            let count = (j - i) as u64;
            if zero[i] {
                self.w.record(Kind::Zeros, &[&pfn.to_le_bytes(), &count.to_le_bytes()])?;
                self.zeros += count;
            } else {
                self.w.record(Kind::Pages, &[&pfn.to_le_bytes(), &bytes[i * PAGE as usize..j * PAGE as usize]])?;
                self.pages += count;
            }
            i = j;
        }
        Ok(())
    }
}

impl Sink for Link {
    fn frames(&mut self, pfn: u64, bytes: &[u8], first_round: bool) -> Result<(), Error> {
        if first_round {
            self.send_skipping_zeros(pfn, bytes)?;
        } else {
            self.w.record(Kind::Pages, &[&pfn.to_le_bytes(), bytes])?;
            self.pages += bytes.len() as u64 / PAGE;
        }
        self.pace();
        Ok(())
    }

    fn end_round(&mut self, round: u32) -> Result<(), Error> {
        Ok(self.w.record(Kind::Round, &[&round.to_le_bytes()])?)
    }

    fn bytes(&self) -> u64 {
        self.w.bytes
    }

    fn counts(&self) -> (u64, u64) {
        (self.pages, self.zeros)
    }

    fn check_stop(&self) -> Result<(), Error> {
        Link::check_stop(self)
    }

    /// The last dirty set, the state, DONE, and the destination's commit. Nothing on
    /// the source changes unless it commits.
    fn switch_over(&mut self, ctx: &mut VcpuContext, last: &FrameSet) -> Result<(), Error> {
        // With the guest stopped, finishing is quicker than stopping: no cap, no
        // deadline.
        self.cap = None;
        self.deadline = None;
        precopy::copy_frames(self, &ctx.mem, last.runs(), false)?;
        let mut sections = snapshot::capture(&ctx.vm, &mut ctx.vcpu).map_err(|e| Error::State(e.to_string()))?;
        sections.insert("tracker".into(), ctx.tracker.export_state());
        sections.insert("serial".into(), ctx.device_state.clone());
        if let Some(p) = &ctx.paused_at {
            sections.insert("pause".into(), super::encode_pause(p));
        }
        self.w.record(Kind::State, &[&encode_sections(&sections)])?;
        self.w.record(Kind::Done, &[])?;
        self.w.flush()?;
        // From DONE on the destination may commit at any moment: a cancel can no longer
        // stop the migration (the guest would run on both sides), so only the commit or
        // a failure ends this wait.
        let conn = &mut self.w.inner().conn;
        conn.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(stream::Error::from)?;
        let mut answer = [0u8; 1];
        conn.read_exact(&mut answer).map_err(|e| Error::NoCommit(e.to_string()))?;
        if answer[0] != stream::COMMIT {
            let mut why = String::new();
            let _ = conn.take(4096).read_to_string(&mut why);
            return Err(Error::Refused(why));
        }
        ctx.migrated_to = Some(self.to.clone());
        Ok(())
    }
}

/// Migrates the VM behind `control` to `to`. Returns once the destination committed
/// (the source's run then ends with [`crate::vcpu::Outcome::MigratedAway`]); on any
/// error the VM goes on as before.
pub fn migrate(control: &Control<VcpuContext>, to: &Addr, opts: &Options, progress: &mut dyn FnMut(&Round)) -> Result<Summary, Error> {
    let path = to.unix_path()?.to_path_buf();
    let conn = UnixStream::connect(&path).map_err(|source| Error::Connect { to: to.to_string(), source })?;
    conn.set_write_timeout(Some(WRITE_SLICE)).map_err(stream::Error::from)?;
    let (hello, image) = control
        .call(|ctx: &mut VcpuContext| {
            let hello = Hello {
                mem_bytes: ctx.mem.last_addr().0 + 1,
                engine: ctx.tracker.engine(),
                image_sha256: ctx.history.image_sha256.clone(),
                image_len: ctx.image.len() as u64,
            };
            (hello, ctx.image.clone())
        })
        .map_err(Error::Finished)?;
    let t0 = Instant::now();
    let mut link = Link {
        w: Writer::start(Cancellable { conn, cancel: opts.cancel.clone() })?,
        to: to.to_string(),
        paced_from: (Instant::now(), 0),
        cap: opts.bandwidth,
        cancel: opts.cancel.clone(),
        deadline: Some((t0 + opts.timeout, opts.timeout)),
        pages: 0,
        zeros: 0,
    };
    let start = (|| -> Result<(), Error> {
        let hello_json = serde_json::to_vec(&hello).expect("hello serializes");
        link.w.record(Kind::Hello, &[&hello_json])?;
        for piece in image.chunks(stream::MAX_RECORD as usize) {
            link.w.record(Kind::Image, &[piece])?;
        }
        Ok(())
    })();
    match start {
        Err(_) if opts.cancel.load(Ordering::SeqCst) => return Err(Error::Cancelled),
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    let rounds = precopy::Rounds { downtime: opts.downtime, throttle: opts.throttle, cancel: opts.cancel.clone() };
    let done = precopy::run(control, link, &rounds, progress)?;
    control.release_pause();
    let link = done.sink;
    Ok(Summary {
        to: to.to_string(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        downtime_ms: done.downtime.as_secs_f64() * 1e3,
        rounds: done.rounds,
        bytes_sent: link.w.bytes,
        pages_sent: link.pages,
        zero_pages: link.zeros,
        postcopy: false,
        throttled: done.max_throttle > 0.0,
        max_throttle_pct: done.max_throttle * 100.0,
        throttled_ms: done.throttled.as_secs_f64() * 1e3,
    })
}
