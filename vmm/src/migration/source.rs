//! The source side of a live migration: the stream as a pre-copy sink
//! ([`super::precopy`]), paced, cancellable, and committed by the destination.

use super::addr::Addr;
use super::postcopy;
use super::precopy::{self, Sink};
use super::stream::{self, Hello, Kind, Writer};
use super::transport::{self, Conn, Security};
use super::{encode_sections, Error};
use crate::tracking::frame_set::FrameSet;
use crate::vcpu::control::Control;
use crate::vcpu::runner::VcpuContext;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const PAGE: u64 = 4096;
/// How long the source waits for the destination's commit after the last record.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// A send that makes no progress for this long fails the migration.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How far the send may fall behind `--bandwidth` before the lag is forgiven.
const PACE_SLACK: Duration = Duration::from_millis(50);
/// Writes wait at most this long before looking at the cancel flag again.
const WRITE_SLICE: Duration = Duration::from_millis(50);
/// Records are gathered up to this size before they go to the connection: a record's
/// header, frame number and pages would otherwise be three writes, and under TLS three
/// records on the wire.
const BATCH: usize = 256 << 10;

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
    /// Switch over right after round 0; the destination fetches the rest on demand.
    pub postcopy: bool,
    /// Pre-copy, but if it has not converged when `timeout` passes, switch over in
    /// post-copy instead of cancelling.
    pub postcopy_fallback: bool,
    /// How the connection is protected (checked against the address, files loaded).
    pub security: Security,
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
    /// Post-copy: frames the destination waited for, and how long its faulting threads
    /// (vCPU and VMM) waited for them in all.
    #[serde(default)]
    pub demand_faults: u64,
    #[serde(default)]
    pub postcopy_blocked_ms: f64,
    /// Post-copy: frames sent after the switch-over (asked for, or pushed).
    #[serde(default)]
    pub postcopy_pages: u64,
}

/// The connection, written so that a cancel stops even a write the destination does not
/// read: each write waits at most [`WRITE_SLICE`], then looks at the flag; a write that
/// makes no progress for [`WRITE_TIMEOUT`] fails. Retrying a write that timed out is
/// sound because a [`Conn`] write that fails took nothing (under TLS, one that took its
/// bytes succeeds, and their ciphertext goes out with the next write or flush).
///
/// Small writes are gathered up to [`BATCH`]; nothing is sent when it is dropped (a
/// failed migration must not wait on a stalled destination once more).
struct Cancellable {
    conn: Conn,
    cancel: Arc<AtomicBool>,
    pending: Vec<u8>,
}

impl Cancellable {
    /// Runs `op` until it is not a timeout, looking at the cancel flag in between.
    fn retry<T>(&mut self, mut op: impl FnMut(&mut Conn) -> std::io::Result<T>) -> std::io::Result<T> {
        let since = Instant::now();
        loop {
            match op(&mut self.conn) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted) => {
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

    /// Sends what was gathered.
    fn drain(&mut self) -> std::io::Result<()> {
        let mut done = 0;
        let pending = std::mem::take(&mut self.pending);
        while done < pending.len() {
            match self.retry(|c| c.write(&pending[done..])) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) => return Err(e),
            }
        }
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }
}

impl std::io::Write for Cancellable {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.pending.len() + buf.len() > BATCH {
            self.drain()?;
        }
        if buf.len() >= BATCH {
            return self.retry(|c| c.write(buf));
        }
        self.pending.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.drain()?;
        self.retry(|c| c.flush())
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
    /// `migrate-cancel` and the migration's deadline, checked between batches so that a
    /// long round stops promptly; the deadline is lifted in the last round.
    limits: precopy::Limits,
    /// Pages sent as data / as zero runs.
    pages: u64,
    zeros: u64,
    postcopy: bool,
    /// When the switch-over stopped the guest, and (post-copy) how long until the
    /// destination committed: the downtime, the serving after it not included.
    stopped_at: Option<Instant>,
    committed_after: Option<Duration>,
    /// Post-copy: what the destination reported, or why it failed after the commit
    /// (the guest is then lost).
    postcopy_done: Option<Result<postcopy::SourceFigures, String>>,
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

    /// Splits a batch into runs of zero frames (markers) and data frames.
    fn send_skipping_zeros(&mut self, first: u64, bytes: &[u8]) -> Result<(), Error> {
        for (i, count, zero) in crate::machine::memory::zero_runs(bytes) {
            let pfn = first + i as u64;
            let n = count as u64;
            if zero {
                self.w.record(Kind::Zeros, &[&pfn.to_le_bytes(), &n.to_le_bytes()])?;
                self.zeros += n;
            } else {
                self.w.record(Kind::Pages, &[&pfn.to_le_bytes(), &bytes[i * PAGE as usize..(i + count) * PAGE as usize]])?;
                self.pages += n;
            }
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
        self.limits.check()
    }

    fn begin_postcopy(&mut self) -> bool {
        self.postcopy = true;
        true
    }

    /// The last dirty set, the state, DONE, and the destination's commit. Nothing on
    /// the source changes unless it commits.
    fn switch_over(&mut self, ctx: &mut VcpuContext, last: &FrameSet) -> Result<(), Error> {
        self.stopped_at = Some(Instant::now());
        // With the guest stopped, finishing is quicker than stopping: no deadline, and
        // no cap (but in post-copy, where the guest runs there, the cap holds).
        self.limits.lift_deadline();
        if !self.postcopy {
            self.cap = None;
            precopy::copy_frames(self, &ctx.mem, last.runs(), false)?;
        }
        let mut sections = ctx.machine_state().map_err(|e| Error::State(e.to_string()))?;
        if let Some(p) = &ctx.paused_at {
            sections.insert("pause".into(), super::encode_pause(p));
        }
        self.w.record(Kind::State, &[&encode_sections(&sections)])?;
        if self.postcopy {
            for payload in postcopy::encode_missing(last) {
                self.w.record(Kind::Missing, &[&payload])?;
            }
            self.w.record(Kind::Done, &[])?;
            self.w.flush()?;
            return self.serve_postcopy(ctx, last);
        }
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

impl Link {
    /// Post-copy, after DONE, on the vCPU thread (the guest here is stopped for good
    /// once the destination commits): answers the destination's requests, and after its
    /// commit pushes every missing frame, then END, and takes its figures. A failure
    /// before the commit leaves the guest here; after it, the guest is lost, which
    /// `postcopy_done` records (the source's run still ends: the guest ran there).
    fn serve_postcopy(&mut self, ctx: &mut VcpuContext, missing: &FrameSet) -> Result<(), Error> {
        use postcopy::Message;
        // This thread owns the connection both ways: it looks for requests between the
        // frames it pushes, never blocking on them (the push goes on meanwhile).
        let mut inbox = postcopy::Inbox::default();
        // Reads wait for readiness first; this bounds one that waits for the rest of a
        // TLS record.
        self.w.inner().conn.set_read_timeout(Some(Duration::from_secs(1))).map_err(stream::Error::from)?;
        let mut sent = FrameSet::new(missing.ram_pages());
        let mut figures = postcopy::SourceFigures::default();
        let wait = |link: &mut Link, inbox: &mut postcopy::Inbox, wait: Duration| -> Result<Option<Message>, String> {
            link.w.flush().map_err(|e| e.to_string())?;
            inbox.next(&mut link.w.inner().conn, wait).map_err(|e| e.to_string())
        };
        let silent = || format!("nothing from the destination for {} s", COMMIT_TIMEOUT.as_secs());
        loop {
            match wait(self, &mut inbox, COMMIT_TIMEOUT).map_err(Error::NoCommit)?.ok_or_else(|| Error::NoCommit(silent()))? {
                Message::Commit => break,
                Message::Request(pfn) => figures.requested += self.send_around(ctx, missing, &mut sent, pfn)?,
                Message::Abort(why) => return Err(Error::Refused(why)),
                Message::Stats { .. } => return Err(Error::NoCommit("figures before the commit".into())),
            }
        }
        // Committed: the guest is the destination's now.
        self.committed_after = self.stopped_at.map(|t| t.elapsed());
        let result = (|| -> Result<postcopy::SourceFigures, String> {
            let runs: Vec<(u64, u64)> = missing.runs().collect();
            for (first, count) in runs {
                let mut pfn = first;
                while pfn < first + count {
                    while let Some(m) = inbox.next(&mut self.w.inner().conn, Duration::ZERO).map_err(|e| e.to_string())? {
                        match m {
                            Message::Request(p) => figures.requested += self.send_around(ctx, missing, &mut sent, p).map_err(|e| e.to_string())?,
                            _ => return Err("an unexpected message during post-copy".into()),
                        }
                    }
                    let n = (first + count - pfn).min(precopy::BATCH_PAGES);
                    figures.pushed += self.send_unsent(ctx, &mut sent, pfn, n).map_err(|e| e.to_string())?;
                    self.pace();
                    pfn += n;
                }
            }
            self.w.record(Kind::End, &[]).map_err(|e| e.to_string())?;
            self.w.flush().map_err(|e| e.to_string())?;
            loop {
                match wait(self, &mut inbox, COMMIT_TIMEOUT)?.ok_or_else(silent)? {
                    Message::Stats { demand_faults, blocked_ns } => {
                        figures.demand_faults = demand_faults;
                        figures.blocked = Duration::from_nanos(blocked_ns);
                        return Ok(figures);
                    }
                    Message::Request(p) => {
                        self.send_around(ctx, missing, &mut sent, p).map_err(|e| e.to_string())?;
                    }
                    _ => return Err("an unexpected message during post-copy".into()),
                }
            }
        })();
        self.postcopy_done = Some(result);
        ctx.migrated_to = Some(self.to.clone());
        Ok(())
    }

    /// Sends the missing frames not sent yet among `[pfn, pfn + n)`; returns how many.
    fn send_unsent(&mut self, ctx: &VcpuContext, sent: &mut FrameSet, pfn: u64, n: u64) -> Result<u64, Error> {
        let mut count = 0;
        let mut p = pfn;
        while p < pfn + n {
            if sent.contains(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pfn + n && !sent.contains(p) {
                sent.insert_range(p, 1);
                p += 1;
            }
            let mut buf = vec![0u8; ((p - start) * PAGE) as usize];
            ctx.mem.read_slice(&mut buf, GuestAddress(start * PAGE)).map_err(|_| Error::Memory { pfn: start })?;
            self.w.record(Kind::Pages, &[&start.to_le_bytes(), &buf])?;
            self.pages += p - start;
            count += p - start;
        }
        Ok(count)
    }

    /// Answers a request for `pfn`: it and up to [`postcopy::AROUND`] missing frames
    /// after it, unless they went already.
    fn send_around(&mut self, ctx: &VcpuContext, missing: &FrameSet, sent: &mut FrameSet, pfn: u64) -> Result<u64, Error> {
        if !missing.contains(pfn) || sent.contains(pfn) {
            return Ok(0);
        }
        let mut n = 1;
        while n < postcopy::AROUND && missing.contains(pfn + n) && !sent.contains(pfn + n) {
            n += 1;
        }
        let n = self.send_unsent(ctx, sent, pfn, n)?;
        // The faulting thread waits: no batching.
        self.w.flush()?;
        Ok(n)
    }
}

/// Migrates the VM behind `control` to `to`. Returns once the destination committed
/// (the source's run then ends with [`crate::vcpu::Outcome::MigratedAway`]); on any
/// error the VM goes on as before.
pub fn migrate(control: &Control<VcpuContext>, to: &Addr, opts: &Options, progress: &mut dyn FnMut(&Round)) -> Result<Summary, Error> {
    let conn = transport::connect(to, &opts.security)?;
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
        w: Writer::start(Cancellable { conn, cancel: opts.cancel.clone(), pending: Vec::with_capacity(BATCH) })?,
        to: to.to_string(),
        paced_from: (Instant::now(), 0),
        cap: opts.bandwidth,
        // With the fallback, the timeout switches to post-copy between rounds instead.
        limits: precopy::Limits::new(opts.cancel.clone(), t0, (!opts.postcopy_fallback).then_some(opts.timeout)),
        pages: 0,
        zeros: 0,
        postcopy: opts.postcopy,
        stopped_at: None,
        committed_after: None,
        postcopy_done: None,
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
    let rounds = precopy::Rounds {
        downtime: opts.downtime,
        throttle: opts.throttle && !opts.postcopy,
        cancel: opts.cancel.clone(),
        postcopy: opts.postcopy,
        postcopy_after: opts.postcopy_fallback.then_some(opts.timeout),
    };
    let done = precopy::run(control, link, &rounds, progress)?;
    control.release_pause();
    let link = done.sink;
    let pc = match link.postcopy_done.clone() {
        Some(Err(why)) => return Err(Error::PostcopyLost(why)),
        Some(Ok(f)) => f,
        None => postcopy::SourceFigures::default(),
    };
    Ok(Summary {
        to: to.to_string(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        downtime_ms: link.committed_after.unwrap_or(done.downtime).as_secs_f64() * 1e3,
        rounds: done.rounds,
        bytes_sent: link.w.bytes,
        pages_sent: link.pages,
        zero_pages: link.zeros,
        postcopy: link.postcopy,
        throttled: done.max_throttle > 0.0,
        max_throttle_pct: done.max_throttle * 100.0,
        throttled_ms: done.throttled.as_secs_f64() * 1e3,
        demand_faults: pc.demand_faults,
        postcopy_blocked_ms: pc.blocked.as_secs_f64() * 1e3,
        postcopy_pages: pc.requested + pc.pushed,
    })
}
