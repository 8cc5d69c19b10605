//! The source side of a live migration: pre-copy rounds while the guest runs, then a
//! short stop for the last dirty set and the machine's state.
//!
//! The migration keeps its own view of dirtiness in the dirty log
//! ([`GpaLog::migration_begin`](crate::tracking::dirty_log::GpaLog::migration_begin)):
//! clear-refs, dirty rates and the snapshot chain's view are never consumed by it, so a
//! migration that fails or is cancelled leaves the source exactly as it was. Frames are
//! re-armed before they are sent, so a write during the send shows in the next round.

use super::addr::Addr;
use super::stream::{self, Hello, Kind, Writer, MAX_PAGES_PER_RECORD};
use super::transport::{self, Conn, Security};
use super::{encode_sections, Error};
use crate::machine::memory::GuestMem;
use crate::storage::snapshot;
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
    /// How the connection is protected (checked against the address, files loaded).
    pub security: Security,
}

/// One pre-copy round, as progress reports it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Round {
    pub round: u32,
    /// Pages sent with their contents this round (zero frames go as markers).
    pub pages_sent: u64,
    /// Pages written since the previous round's harvest (what the next round sends).
    pub pages_dirtied: u64,
    pub bandwidth_mib_s: f64,
    pub expected_downtime_ms: f64,
}

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
    started: Instant,
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
    fn pace(&self) {
        if let Some(cap) = self.cap.filter(|&c| c > 0) {
            let due = Duration::from_secs_f64(self.w.bytes as f64 / cap as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    /// Sends `frames` (read now from `mem`); in round 0 (`skip_zero`), all-zero frames go
    /// as zero runs. Returns the frames covered.
    fn send_frames(&mut self, mem: &GuestMem, frames: impl Iterator<Item = (u64, u64)>, skip_zero: bool) -> Result<u64, Error> {
        let mut sent = 0;
        let mut buf = vec![0u8; (MAX_PAGES_PER_RECORD * PAGE) as usize];
        for (first, count) in frames {
            let mut pfn = first;
            let end = first + count;
            while pfn < end {
                let n = (end - pfn).min(MAX_PAGES_PER_RECORD);
                let bytes = &mut buf[..(n * PAGE) as usize];
                mem.read_slice(bytes, GuestAddress(pfn * PAGE)).map_err(|_| Error::Memory { pfn })?;
                if skip_zero {
                    self.send_skipping_zeros(pfn, bytes)?;
                } else {
                    self.w.record(Kind::Pages, &[&pfn.to_le_bytes(), bytes])?;
                    self.pages += n;
                }
                sent += n;
                pfn += n;
                self.pace();
                self.check_stop()?;
            }
        }
        Ok(sent)
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

/// Migrates the VM behind `control` to `to`. Returns once the destination committed
/// (the source's run then ends with [`crate::vcpu::Outcome::MigratedAway`]); on any
/// error the VM goes on as before.
pub fn migrate(control: &Control<VcpuContext>, to: &Addr, opts: &Options, progress: &mut dyn FnMut(&Round)) -> Result<Summary, Error> {
    let conn = transport::connect(to, &opts.security)?;
    conn.set_write_timeout(Some(WRITE_SLICE)).map_err(stream::Error::from)?;
    let (mem, hello, image) = control
        .call(|ctx: &mut VcpuContext| -> Result<_, Error> {
            ctx.tracker.log.migration_begin(&ctx.mem)?;
            let hello = Hello {
                mem_bytes: ctx.mem.last_addr().0 + 1,
                engine: ctx.tracker.engine(),
                image_sha256: ctx.history.image_sha256.clone(),
                image_len: ctx.image.len() as u64,
            };
            Ok((ctx.mem.clone(), hello, ctx.image.clone()))
        })
        .map_err(Error::Finished)??;
    let result = match precopy(control, to, opts, progress, conn, &mem, &hello, &image) {
        // Whatever a cancelled write or round ended with, it ended because of the cancel.
        Err(_) if opts.cancel.load(Ordering::SeqCst) => Err(Error::Cancelled),
        r => r,
    };
    if result.is_err() {
        // The view goes away; what it held is still in every other view.
        let _ = control.call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_end());
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn precopy(control: &Control<VcpuContext>, to: &Addr, opts: &Options, progress: &mut dyn FnMut(&Round), conn: Conn,
    mem: &GuestMem, hello: &Hello, image: &[u8]) -> Result<Summary, Error> {
    let t0 = Instant::now();
    let mut link = Link {
        w: Writer::start(Cancellable { conn, cancel: opts.cancel.clone(), pending: Vec::with_capacity(BATCH) })?,
        started: Instant::now(),
        cap: opts.bandwidth,
        cancel: opts.cancel.clone(),
        deadline: Some((t0 + opts.timeout, opts.timeout)),
        pages: 0,
        zeros: 0,
    };
    let hello_json = serde_json::to_vec(hello).expect("hello serializes");
    link.w.record(Kind::Hello, &[&hello_json])?;
    for piece in image.chunks(stream::MAX_RECORD as usize) {
        link.w.record(Kind::Image, &[piece])?;
    }
    let pages = hello.mem_bytes / PAGE;
    // Round 0: everything, while the guest runs.
    let mut round = 0u32;
    let mut r0 = Instant::now();
    let mut b0 = link.w.bytes;
    link.send_frames(mem, std::iter::once((0, pages)), true)?;
    let mut sent = link.pages;
    loop {
        link.w.record(Kind::Round, &[&round.to_le_bytes()])?;
        let secs = r0.elapsed().as_secs_f64().max(1e-6);
        let bandwidth = (link.w.bytes - b0) as f64 / secs;
        let dirty = control
            .call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_pending(&ctx.mem))
            .map_err(Error::Finished)??;
        let expected = Duration::from_secs_f64(dirty as f64 * PAGE as f64 / bandwidth.max(1.0));
        progress(&Round {
            round,
            pages_sent: sent,
            pages_dirtied: dirty,
            bandwidth_mib_s: bandwidth / (1 << 20) as f64,
            expected_downtime_ms: expected.as_secs_f64() * 1e3,
        });
        if expected <= opts.downtime {
            break;
        }
        link.check_stop()?;
        round += 1;
        r0 = Instant::now();
        b0 = link.w.bytes;
        let frames = control
            .call(|ctx: &mut VcpuContext| ctx.tracker.log.migration_take(&ctx.mem))
            .map_err(Error::Finished)??;
        sent = link.send_frames(mem, frames.runs(), false)?;
    }
    link.check_stop()?;
    // Switch-over, on the vCPU thread with the guest stopped: the last dirty set, the
    // state, the destination's commit. Nothing on the source changes unless it commits.
    let dest = to.to_string();
    let (link, stopped) = control
        .call(move |ctx: &mut VcpuContext| {
            let t = Instant::now();
            let r = switch_over(ctx, &mut link).map(|()| t.elapsed());
            if r.is_ok() {
                ctx.migrated_to = Some(dest);
            }
            (link, r)
        })
        .map_err(Error::Finished)?;
    let downtime = stopped?;
    control.release_pause();
    Ok(Summary {
        to: to.to_string(),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
        downtime_ms: downtime.as_secs_f64() * 1e3,
        rounds: round + 2,
        bytes_sent: link.w.bytes,
        pages_sent: link.pages,
        zero_pages: link.zeros,
        postcopy: false,
        throttled: false,
    })
}

fn switch_over(ctx: &mut VcpuContext, link: &mut Link) -> Result<(), Error> {
    let frames: FrameSet = ctx.tracker.log.migration_take(&ctx.mem)?;
    link.cap = None;
    link.deadline = None;
    link.send_frames(&ctx.mem, frames.runs(), false)?;
    let mut sections = snapshot::capture(&ctx.vm, &mut ctx.vcpu).map_err(|e| Error::State(e.to_string()))?;
    sections.insert("tracker".into(), ctx.tracker.export_state());
    sections.insert("serial".into(), ctx.device_state.clone());
    if let Some(p) = &ctx.paused_at {
        sections.insert("pause".into(), super::encode_pause(p));
    }
    link.w.record(Kind::State, &[&encode_sections(&sections)])?;
    link.w.record(Kind::Done, &[])?;
    link.w.flush()?;
    // From DONE on the destination may commit at any moment: a cancel can no longer
    // stop the migration (the guest would run on both sides), so only the commit or a
    // failure ends this wait.
    let conn = &mut link.w.inner().conn;
    conn.set_read_timeout(Some(COMMIT_TIMEOUT)).map_err(stream::Error::from)?;
    let mut answer = [0u8; 1];
    conn.read_exact(&mut answer).map_err(|e| Error::NoCommit(e.to_string()))?;
    if answer[0] != stream::COMMIT {
        let mut why = String::new();
        let _ = conn.take(4096).read_to_string(&mut why);
        return Err(Error::Refused(why));
    }
    ctx.tracker.log.migration_end();
    Ok(())
}
