//! What each request does: the jobs run on the vCPU thread, and their results (or
//! refusals) as the typed answers of [`protocol`](super::protocol).

use super::pagemap::PagemapAnswer;
use super::protocol::{
    Answer, DirtyRate, DumpCreated, ErrorKind, Failure, Heatmap, HeatmapProcess, HeatmapRow, Info, MigrationCancelled, MigrationDone, RoundLine, PagemapFormat, Paused, PhaseReply,
    PagemapScanned, ProcessInfo, ProcessRate, Processes, Progress as ProgressBody, ProgressLine, RefsCleared, Request, Resumed,
    SnapshotCreated, Status, LiveSnapshotStats,
};
use crate::machine::memory::GuestMem;
use crate::migration::transport;
use crate::storage::progress::Progress;
use crate::storage::{chain, dump, snapshot};
use crate::tracking::softdirty::heatmap;
use crate::tracking::softdirty::scan::{ScanRequest, MAX_SCAN_REGIONS};
use crate::tracking::softdirty::{self, ClearRefs, Tracker};
use crate::vcpu::control::{Control, Phase};
use crate::vcpu::runner::VcpuContext;
use kvm_ioctls::VcpuFd;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// What a request is answered with.
pub enum Reply {
    /// One JSON line (without its newline).
    Line(String),
    /// A pagemap, streamed in the format asked for.
    Pagemap(PagemapAnswer, PagemapFormat),
}

impl Reply {
    /// `{"ok":true, ...}` with the fields of `body`, or the failure.
    fn answer<T: Serialize>(result: Result<T, Failure>) -> Reply {
        match result {
            Ok(body) => Reply::Line(line(&Answer::new(body))),
            Err(f) => Reply::Line(line(&f)),
        }
    }

    pub fn failure(kind: ErrorKind, error: impl Into<String>) -> Reply {
        Reply::Line(line(&Failure::new(kind, error)))
    }
}

/// One answer line. It goes through a `serde_json::Value` so that its keys come out
/// sorted, byte for byte as they always have (the streamed pagemap lines keep their own
/// order).
pub fn line(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(v) => v.to_string(),
        // Our answers have string keys and plain values; this does not happen.
        Err(e) => line(&Failure::new(ErrorKind::Internal, format!("cannot encode the answer: {e}"))),
    }
}

/// Control's jobs fail only when the run is over.
fn finished(msg: String) -> Failure {
    Failure::new(ErrorKind::Finished, msg)
}

/// What a refusal of the tracker means to a client.
fn tracker_failure(e: softdirty::Error) -> Failure {
    let kind = match e {
        softdirty::Error::UnknownPid(_) => ErrorKind::UnknownPid,
        softdirty::Error::NotLive { .. } => ErrorKind::NotLive,
        softdirty::Error::BadValue(_) | softdirty::Error::BadRange(_) => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    };
    Failure::new(kind, e.to_string())
}

fn snapshot_failure(e: snapshot::Error) -> Failure {
    let kind = match e {
        snapshot::Error::Chain(chain::Error::Io { .. }) | snapshot::Error::Durable(_) => ErrorKind::Io,
        snapshot::Error::NoBase | snapshot::Error::Chain(chain::Error::Invalid { .. }) => ErrorKind::BadRequest,
        snapshot::Error::LiveCommitting => ErrorKind::Busy,
        _ => ErrorKind::Internal,
    };
    Failure::new(kind, e.to_string())
}

fn dump_failure(e: dump::Error) -> Failure {
    match e {
        dump::Error::SoftDirty(e) => tracker_failure(e),
        dump::Error::Chain(chain::Error::Io { .. }) | dump::Error::Durable(_) => Failure::new(ErrorKind::Io, e.to_string()),
        dump::Error::BadPrev { .. } | dump::Error::Chain(chain::Error::Invalid { .. }) => {
            Failure::new(ErrorKind::BadRequest, e.to_string())
        }
        _ => Failure::new(ErrorKind::Internal, e.to_string()),
    }
}

/// Answers one request. Long requests may `emit` progress lines before the answer.
pub fn handle(req: Request, control: &Control<VcpuContext>, emit: &mut dyn FnMut(String)) -> Reply {
    match req {
        Request::Status {} => Reply::answer(Ok::<_, Failure>(status(control))),
        Request::Resume {} => Reply::answer(resume(control)),
        Request::Wait { label, timeout_ms } => Reply::answer(wait(control, label, timeout_ms)),
        Request::Ps {} => Reply::answer(ps(control)),
        Request::ClearRefs { pid, value } => Reply::answer(clear_refs(control, pid, value)),
        Request::Pagemap { pid, start, pages, summary, format } => match pagemap(control, pid, start, pages) {
            Ok(answer) if summary == Some(true) => Reply::answer(Ok::<_, Failure>(answer.summary())),
            Ok(answer) => Reply::Pagemap(answer, format.unwrap_or(PagemapFormat::Array)),
            Err(f) => Reply::answer(Err::<(), _>(f)),
        },
        Request::PagemapScan { pid, start, end, written, clear, max_regions } => {
            let req = ScanRequest {
                start: start.unwrap_or(0),
                end: end.unwrap_or(workload::USER_TOP),
                written_only: written == Some(true),
                clear: clear == Some(true),
                max_regions: max_regions.unwrap_or(MAX_SCAN_REGIONS),
            };
            Reply::answer(pagemap_scan(control, pid, req))
        }
        Request::Heatmap { pid, seconds, interval_ms } => Reply::answer(heatmap(control, pid, seconds, interval_ms)),
        Request::Info {} => Reply::answer(info(control)),
        Request::DirtyRate { seconds } => Reply::answer(dirty_rate(control, seconds)),
        Request::SnapshotCreate { out, diff, live: Some(true), downtime_ms, timeout_ms, .. } => {
            Reply::answer(live_snapshot(control, &out, diff, downtime_ms, timeout_ms, emit))
        }
        Request::SnapshotCreate { out, diff, progress, .. } => Reply::answer(
            call_reporting(control, progress == Some(true), emit, move |ctx, p| {
                ctx.snapshot(Path::new(&out), diff.unwrap_or(false), p).map(SnapshotCreated::from).map_err(snapshot_failure)
            })
            .and_then(|r| r),
        ),
        Request::Dump { pid, out, prev, progress } => Reply::answer(
            call_reporting(control, progress == Some(true), emit, move |ctx, p| {
                ctx.dump(pid, Path::new(&out), prev.as_deref().map(Path::new), p)
                    .map(DumpCreated::from)
                    .map_err(dump_failure)
            })
            .and_then(|r| r),
        ),
        Request::Migrate { to, downtime_ms, bandwidth, timeout_ms, postcopy, postcopy_fallback, throttle, tls_cert, tls_key, tls_ca, insecure_plaintext } => {
            let tls = TlsFields { tls_cert, tls_key, tls_ca, insecure_plaintext };
            let mode = PostcopyMode { now: postcopy == Some(true), fallback: postcopy_fallback == Some(true) };
            Reply::answer(migrate(control, &to, downtime_ms, bandwidth, timeout_ms, mode, throttle, tls, emit))
        }
        Request::MigrateCancel {} => Reply::answer(Ok::<_, Failure>(MigrationCancelled { cancelled: control.cancel_migration() })),
    }
}

/// Default bound on a whole migration.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);
/// Default switch-over target, as QEMU's and Cloud Hypervisor's.
const MIGRATE_DOWNTIME: Duration = Duration::from_millis(300);

/// A migrate request's TLS fields, as sent.
struct TlsFields {
    tls_cert: Option<String>,
    tls_key: Option<String>,
    tls_ca: Option<String>,
    insecure_plaintext: Option<bool>,
}

impl TlsFields {
    /// The transport's flags. Paths must be absolute: this VMM's working directory is
    /// not the client's (`vmm migrate` makes them absolute).
    fn flags(self) -> Result<transport::Flags, String> {
        let path = |flag: &str, p: Option<String>| match p {
            Some(p) if !Path::new(&p).is_absolute() => Err(format!("{flag} {p}: the path must be absolute")),
            p => Ok(p.map(PathBuf::from)),
        };
        Ok(transport::Flags {
            tls_cert: path("tls_cert", self.tls_cert)?,
            tls_key: path("tls_key", self.tls_key)?,
            tls_ca: path("tls_ca", self.tls_ca)?,
            insecure_plaintext: self.insecure_plaintext == Some(true),
        })
    }
}

/// Whether a migration goes post-copy: after round 0, or when the timeout passes.
struct PostcopyMode {
    now: bool,
    fallback: bool,
}

#[allow(clippy::too_many_arguments)]
fn migrate(control: &Control<VcpuContext>, to: &str, downtime_ms: Option<u64>, bandwidth: Option<u64>, timeout_ms: Option<u64>,
    mode: PostcopyMode, throttle: Option<bool>, tls: TlsFields, emit: &mut dyn FnMut(String)) -> Result<MigrationDone, Failure> {
    use crate::migration::{self, source};
    let bad = |m: String| Failure::new(ErrorKind::BadRequest, m);
    let addr: migration::Addr = to.parse().map_err(|e: migration::addr::Error| bad(e.to_string()))?;
    // The flags must fit the address and the files must be good before anything starts.
    let security = transport::Security::new(&addr, &tls.flags().map_err(bad)?).map_err(|e| bad(e.to_string()))?;
    let postcopy = mode.now;
    if mode.now || mode.fallback {
        let engine = control.call(|ctx: &mut VcpuContext| ctx.tracker.engine()).map_err(finished)?;
        if engine == crate::tracking::EngineKind::Uffd {
            return Err(bad("post-copy needs userfaultfd's missing mode on the destination's guest RAM, which the uffd engine holds already; migrate this VM with pre-copy (docs/migration.md)".into()));
        }
    }
    if bandwidth == Some(0) {
        return Err(bad("bandwidth 0 MiB/s would never finish".into()));
    }
    let cancel = control.begin_migration().ok_or_else(|| Failure::new(ErrorKind::Busy, "a migration is already running".to_string()))?;
    let opts = source::Options {
        downtime: downtime_ms.map_or(MIGRATE_DOWNTIME, Duration::from_millis),
        bandwidth: bandwidth.map(|m| m.saturating_mul(1 << 20)),
        timeout: timeout_ms.map_or(MIGRATE_TIMEOUT, Duration::from_millis),
        cancel,
        throttle: throttle != Some(false),
        postcopy,
        postcopy_fallback: mode.fallback,
        security,
    };
    let result = source::migrate(control, &addr, &opts, &mut |round| emit(line(&RoundLine { round: *round })));
    control.end_migration();
    result.map_err(migration_failure)
}

fn migration_failure(e: crate::migration::Error) -> Failure {
    use crate::migration::Error as M;
    let kind = match e {
        // A live snapshot's own failures are told as any snapshot's.
        M::Snapshot(s) => return snapshot_failure(s),
        M::Addr(_) | M::Unsupported(_) => ErrorKind::BadRequest,
        M::Cancelled | M::Timeout(_) => ErrorKind::Cancelled,
        M::Finished(_) => ErrorKind::Finished,
        M::Log(_) | M::Memory { .. } | M::State(_) => ErrorKind::Internal,
        M::Transport(ref t) if t.is_config() => ErrorKind::BadRequest,
        M::Transport(_) | M::Stream(_) | M::NoCommit(_) | M::Refused(_) | M::PostcopyLost(_) => ErrorKind::Migration,
    };
    Failure::new(kind, e.to_string())
}

/// Default switch-over target of a live snapshot: the disk takes a small dirty set in a
/// few milliseconds, so a short pause is cheap to wait for.
const LIVE_SNAPSHOT_DOWNTIME: Duration = Duration::from_millis(20);

/// `snapshot-create` with `live`: pre-copy into the snapshot, a pause only for the last
/// dirty set. Progress comes as round lines, as a migration's.
fn live_snapshot(control: &Control<VcpuContext>, out: &str, diff: Option<bool>, downtime_ms: Option<u64>, timeout_ms: Option<u64>,
    emit: &mut dyn FnMut(String)) -> Result<SnapshotCreated, Failure> {
    use crate::migration::live_snapshot;
    if diff == Some(true) {
        return Err(Failure::new(ErrorKind::BadRequest, "a live snapshot is a full one: --live and --diff do not go together".to_string()));
    }
    let cancel = control
        .begin_migration()
        .ok_or_else(|| Failure::new(ErrorKind::Busy, "a migration or live snapshot is already running".to_string()))?;
    let opts = live_snapshot::Options {
        downtime: downtime_ms.map_or(LIVE_SNAPSHOT_DOWNTIME, Duration::from_millis),
        timeout: timeout_ms.map_or(MIGRATE_TIMEOUT, Duration::from_millis),
        throttle: true,
        cancel,
    };
    let result = live_snapshot::create(control, Path::new(out), &opts, &mut |round| emit(line(&RoundLine { round: *round })));
    control.end_migration();
    let c = result.map_err(migration_failure)?;
    let mut answer = SnapshotCreated::from(c.report);
    answer.live = Some(LiveSnapshotStats {
        rounds: c.rounds,
        total_ns: c.total.as_nanos() as u64,
        throttled: c.max_throttle > 0.0,
    });
    Ok(answer)
}

fn status(control: &Control<VcpuContext>) -> Status {
    let phase = match control.phase() {
        Phase::Running => PhaseReply::Running,
        Phase::Paused(p) => PhaseReply::Paused { pid: p.pid, label: p.label },
        Phase::Finished(outcome) => PhaseReply::Finished { outcome },
    };
    Status { phase, syncs: control.syncs(), running_ns: control.running_time().as_nanos() as u64, migrating: control.migrating() }
}

fn resume(control: &Control<VcpuContext>) -> Result<Resumed, Failure> {
    control.resume().map(|()| Resumed {}).map_err(|msg| {
        // Finished is final: if the VM is finished now, that is why resuming failed.
        let kind = if matches!(control.phase(), Phase::Finished(_)) { ErrorKind::Finished } else { ErrorKind::NotPaused };
        Failure::new(kind, msg)
    })
}

fn wait(control: &Control<VcpuContext>, label: Option<String>, timeout_ms: Option<u64>) -> Result<Paused, Failure> {
    let timeout = Duration::from_millis(timeout_ms.unwrap_or(60_000).min(24 * 3600 * 1000));
    match control.wait_for_pause(label.as_deref(), timeout) {
        Ok(p) => Ok(Paused { pid: p.pid, label: p.label, running_ns: control.running_time().as_nanos() as u64 }),
        Err(msg) => {
            let kind = if matches!(control.phase(), Phase::Finished(_)) { ErrorKind::Finished } else { ErrorKind::Timeout };
            Err(Failure::new(kind, msg))
        }
    }
}

/// Runs `job` on the vCPU thread with the tracker and the stopped guest.
fn with_tracker<R: Send + 'static>(
    control: &Control<VcpuContext>,
    job: impl FnOnce(&mut Tracker, &GuestMem, &VcpuFd) -> Result<R, Failure> + Send + 'static,
) -> Result<R, Failure> {
    control
        .call(move |ctx: &mut VcpuContext| {
            let VcpuContext { tracker, mem, vcpu, .. } = ctx;
            job(tracker, mem, vcpu)
        })
        .map_err(finished)?
}

fn ps(control: &Control<VcpuContext>) -> Result<Processes, Failure> {
    with_tracker(control, |t, mem, _| {
        let snap = t.snapshot(mem).map_err(tracker_failure)?;
        let processes = snap
            .processes
            .iter()
            .map(|p| ProcessInfo {
                pid: p.pid,
                name: p.name.clone(),
                state: p.state.name().to_string(),
                exit_code: p.exit_code,
                cr3: p.cr3.0,
                rss_pages: p.rss_pages,
                peak_rss_pages: p.peak_rss_pages,
                mappings: p.mappings.clone(),
            })
            .collect();
        Ok(Processes { processes })
    })
}

fn clear_refs(control: &Control<VcpuContext>, pid: u32, value: Option<u64>) -> Result<RefsCleared, Failure> {
    let value = ClearRefs::try_from(value.unwrap_or(4)).map_err(tracker_failure)?;
    with_tracker(control, move |t, mem, vcpu| {
        let t0 = std::time::Instant::now();
        let changed = t.clear_refs(mem, vcpu, pid, value).map_err(tracker_failure)?;
        let elapsed = t0.elapsed().as_nanos() as u64;
        Ok(RefsCleared { pid, value: value as u64, entries_changed: changed, elapsed_ns: elapsed })
    })
}

/// The pagemap range a request names (`None`: every mapping).
fn pagemap_range(start: Option<u64>, pages: Option<u64>) -> Result<Option<(u64, u64)>, Failure> {
    let range = match (start, pages) {
        (None, None) => None,
        (Some(s), Some(n)) => Some((s, n)),
        (Some(s), None) => Some((s, 1)),
        (None, Some(_)) => return Err(Failure::new(ErrorKind::BadRequest, "pages given without start")),
    };
    if let Some((s, n)) = range {
        softdirty::check_range(s, n).map_err(tracker_failure)?;
    }
    Ok(range)
}

fn pagemap(control: &Control<VcpuContext>, pid: u32, start: Option<u64>, pages: Option<u64>) -> Result<PagemapAnswer, Failure> {
    let range = pagemap_range(start, pages)?;
    with_tracker(control, move |t, mem, _| {
        let t0 = std::time::Instant::now();
        let pages = t.pagemap(mem, pid, range).map_err(tracker_failure)?;
        // Compact before leaving the vCPU thread: the connection may hold it a while.
        Ok(PagemapAnswer::new(pid, &pages, t0.elapsed().as_nanos() as u64))
    })
}

fn pagemap_scan(control: &Control<VcpuContext>, pid: u32, req: ScanRequest) -> Result<PagemapScanned, Failure> {
    with_tracker(control, move |t, mem, vcpu| {
        let t0 = std::time::Instant::now();
        let scan = t.pagemap_scan(mem, pid, &req).map_err(tracker_failure)?;
        // The clear may want the PTE trap on before the guest runs again.
        t.arm_if_wanted(mem, vcpu).map_err(tracker_failure)?;
        let elapsed_ns = t0.elapsed().as_nanos() as u64;
        Ok(PagemapScanned { pid, regions: scan.regions, walk_end: scan.walk_end, pages_scanned: scan.pages_scanned,
            entries_changed: scan.entries_changed, elapsed_ns })
    })
}

/// Most seconds and intervals one heatmap samples.
const HEATMAP_MAX_SECONDS: f64 = 600.0;
const HEATMAP_MAX_INTERVALS: u64 = 1000;

fn heatmap(control: &Control<VcpuContext>, pid: Option<u32>, seconds: Option<f64>, interval_ms: Option<u64>) -> Result<Heatmap, Failure> {
    let seconds = seconds.unwrap_or(5.0);
    let interval_ms = interval_ms.unwrap_or(100);
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= HEATMAP_MAX_SECONDS) {
        return Err(Failure::new(ErrorKind::BadRequest, format!("seconds {seconds}: must be more than 0 and at most {HEATMAP_MAX_SECONDS}")));
    }
    if !(10..=60_000).contains(&interval_ms) {
        return Err(Failure::new(ErrorKind::BadRequest, format!("interval_ms {interval_ms}: must be 10 to 60000")));
    }
    let n = (seconds * 1000.0 / interval_ms as f64).ceil() as u64;
    if n > HEATMAP_MAX_INTERVALS {
        return Err(Failure::new(ErrorKind::BadRequest,
            format!("{seconds} s in {interval_ms} ms intervals is {n} intervals, more than {HEATMAP_MAX_INTERVALS}: use a longer interval")));
    }
    let (engine, mem_bytes) = with_tracker(control, move |t, mem, _| {
        if let Some(pid) = pid {
            let snap = t.snapshot(mem).map_err(tracker_failure)?;
            Tracker::live(&snap, pid).map_err(tracker_failure)?;
        }
        t.window_start(mem).map_err(tracker_failure)?;
        Ok((t.engine().name().to_string(), vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1))
    })?;
    let interval = Duration::from_millis(interval_ms);
    let t0 = std::time::Instant::now();
    let (mut layouts, mut columns, mut complete) = (Vec::<heatmap::Layout>::new(), Vec::<heatmap::Sample>::new(), true);
    let mut last = t0;
    for _ in 0..n {
        // Each interval at least `interval` long: a sample that came late (a job waits
        // for the guest to be in user mode) is not caught up with a short interval.
        std::thread::sleep((last + interval).saturating_duration_since(std::time::Instant::now()));
        let mut ls = layouts.clone();
        match control.call(move |ctx: &mut VcpuContext| {
            let sample = ctx.tracker.heatmap_sample(&ctx.mem, &mut ls, pid);
            (ls, sample)
        }) {
            Ok((ls, Ok(sample))) => {
                last = std::time::Instant::now();
                layouts = ls;
                columns.push(sample);
            }
            Ok((_, Err(e))) => return Err(tracker_failure(e)),
            // The run ended: what was sampled until then.
            Err(_) => {
                complete = false;
                break;
            }
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let processes = layouts
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let count = |c: &heatmap::Sample, r: usize| c.get(i).and_then(|v| v.get(r)).copied().unwrap_or(0);
            let rows: Vec<HeatmapRow> = l
                .rows
                .iter()
                .enumerate()
                .map(|(r, row)| HeatmapRow { mapping_start: row.mapping_start, start: row.start, end: row.end, other: row.other,
                    counts: columns.iter().map(|c| count(c, r)).collect() })
                .collect();
            HeatmapProcess {
                pid: l.pid,
                name: l.name.clone(),
                first_interval: columns.iter().position(|c| c.len() > i).unwrap_or(0) as u64,
                written: rows.iter().flat_map(|r| &r.counts).map(|&c| u64::from(c)).sum(),
                rows,
            }
        })
        .collect();
    Ok(Heatmap { engine, mem_bytes, interval_ms, intervals: columns.len() as u64, seconds, complete, processes })
}

fn info(control: &Control<VcpuContext>) -> Result<Info, Failure> {
    control
        .call(move |ctx: &mut VcpuContext| Info {
            engine: ctx.tracker.engine().name().to_string(),
            tsc_khz: ctx.vcpu.get_tsc_khz().ok(),
            mechanism: ctx.tracker.log.mechanism().to_string(),
            mem_bytes: vm_memory::GuestMemoryBackend::last_addr(&ctx.mem).0 + 1,
            exits: counters(&ctx.exits),
            tracker: counters(&ctx.tracker.stats),
            log: counters(&ctx.tracker.log.stats),
        })
        .map_err(finished)
}

/// A group of counters as the JSON object it serializes to.
fn counters(c: &impl Serialize) -> serde_json::Value {
    serde_json::to_value(c).unwrap_or(serde_json::Value::Null)
}

fn dirty_rate(control: &Control<VcpuContext>, seconds: Option<f64>) -> Result<DirtyRate, Failure> {
    let seconds = seconds.unwrap_or(1.0);
    if !(seconds.is_finite() && seconds > 0.0 && seconds <= 3600.0) {
        return Err(Failure::new(ErrorKind::BadRequest, format!("seconds {seconds}: must be between 0 and 3600")));
    }
    let run0 = control.running_time();
    with_tracker(control, |t, mem, _| t.window_start(mem).map_err(tracker_failure))?;
    let t0 = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (total, per) = with_tracker(control, |t, mem, _| t.window_report(mem).map_err(tracker_failure))?;
    let wall = t0.elapsed().as_secs_f64();
    let ran = (control.running_time() - run0).as_secs_f64();
    Ok(DirtyRate {
        seconds: wall,
        running_seconds: ran,
        vm_pages: total,
        vm_pages_per_second: total as f64 / wall,
        processes: per
            .into_iter()
            .map(|(pid, name, n)| ProcessRate { pid, name, pages: n, pages_per_second: n as f64 / wall })
            .collect(),
    })
}

/// Runs a long job on the vCPU thread; with `report`, emits its progress as
/// [`ProgressLine`]s every 200 ms meanwhile.
fn call_reporting<R: Send + 'static>(
    control: &Control<VcpuContext>,
    report: bool,
    emit: &mut dyn FnMut(String),
    job: impl FnOnce(&mut VcpuContext, &Progress) -> R + Send + 'static,
) -> Result<R, Failure> {
    let progress = Arc::new(Progress::default());
    let theirs = progress.clone();
    // The first report goes out at once, so that even a short job shows its bar.
    let mut last: Option<std::time::Instant> = None;
    control
        .call_ticking(move |ctx| job(ctx, &theirs), || {
            if report && last.is_none_or(|t| t.elapsed() >= Duration::from_millis(200)) {
                last = Some(std::time::Instant::now());
                let (done, total) = progress.get();
                emit(line(&ProgressLine { progress: ProgressBody { done, total } }));
            }
        })
        .map_err(finished)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(reply: Reply) -> Failure {
        match reply {
            Reply::Line(l) => serde_json::from_str(&l).unwrap(),
            Reply::Pagemap(..) => panic!("a pagemap"),
        }
    }

    #[test]
    fn refusals_say_why_in_a_kind() {
        let control = Control::<VcpuContext>::default();
        let f = failure(handle(Request::Resume {}, &control, &mut |_| {}));
        assert_eq!((f.kind, f.error.as_str()), (ErrorKind::NotPaused, "the VM is running, not paused at a sync"));
        let f = failure(handle(Request::DirtyRate { seconds: Some(-1.0) }, &control, &mut |_| {}));
        assert_eq!(f.kind, ErrorKind::BadRequest);
        let req = Request::Pagemap { pid: 1, start: None, pages: Some(1), summary: None, format: None };
        assert_eq!(failure(handle(req, &control, &mut |_| {})).kind, ErrorKind::BadRequest);
        let f = failure(handle(Request::Wait { label: None, timeout_ms: Some(1) }, &control, &mut |_| {}));
        assert_eq!(f.kind, ErrorKind::Timeout);
        // A migration's TLS fields are checked before anything starts.
        let migrate = |cert: Option<&str>| Request::Migrate { to: "tcp:127.0.0.1:1".into(), downtime_ms: None, bandwidth: None, throttle: None, postcopy_fallback: None,
            timeout_ms: None, postcopy: None, tls_cert: cert.map(Into::into), tls_key: None, tls_ca: None, insecure_plaintext: None };
        let f = failure(handle(migrate(Some("c.pem")), &control, &mut |_| {}));
        assert_eq!((f.kind, f.error.as_str()), (ErrorKind::BadRequest, "tls_cert c.pem: the path must be absolute"));
        let f = failure(handle(migrate(Some("/c.pem")), &control, &mut |_| {}));
        assert!(f.kind == ErrorKind::BadRequest && f.error.contains("(missing: --tls-key, --tls-ca)"), "{}", f.error);
        control.finish("the guest exited".into());
        for req in [Request::Resume {}, Request::Ps {}, Request::Wait { label: None, timeout_ms: Some(1) }] {
            let f = failure(handle(req, &control, &mut |_| {}));
            assert_eq!(f.kind, ErrorKind::Finished, "{}", f.error);
            assert!(f.error.contains("has finished"), "{}", f.error);
        }
    }

    #[test]
    fn status_lines_keep_sorted_keys() {
        let control = Control::<VcpuContext>::default();
        let Reply::Line(l) = handle(Request::Status {}, &control, &mut |_| {}) else { panic!("a pagemap") };
        assert!(l.starts_with(r#"{"ok":true,"phase":"running","running_ns":"#), "{l}");
        assert!(l.ends_with(r#","syncs":0}"#), "{l}");
    }
}
