//! What travels over the control socket: one JSON object per line each way (docs/api.md).
//!
//! Both sides use these types: the server serializes them, clients deserialize them. A
//! success is [`Answer`] around a command's own struct (`{"ok":true, ...}`); a failure is
//! a [`Failure`] (`{"ok":false,"error":"...","kind":"..."}`), whose [`ErrorKind`] is what
//! programs match on — the `error` sentence is for people and may change.
//!
//! Response structs never deny unknown fields: fields may be added to the wire format,
//! never removed or renamed, so an older client keeps reading a newer server.

use crate::storage::{dump, snapshot};
use serde::{Deserialize, Serialize};

/// A request, as sent by clients.
///
/// Optional fields may be left out or sent as `null` (clients built on this type leave
/// them out); unknown fields are refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    // Empty braces, not unit variants: serde checks unknown fields only on struct variants.
    /// Answered with [`Status`].
    Status {},
    /// Answered with [`Resumed`].
    Resume {},
    /// Block until the VM pauses at a sync (with this label, if given); answered with
    /// [`Paused`].
    Wait {
        #[serde(skip_serializing_if = "Option::is_none")]
        label: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Guest processes, read from the guest kernel's process table; answered with
    /// [`Processes`].
    Ps {},
    /// Linux's `/proc/PID/clear_refs` (value 4 by default); answered with [`RefsCleared`].
    ClearRefs {
        pid: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        value: Option<u64>,
    },
    /// Linux's `/proc/PID/pagemap` over `pages` pages from `start` (default: every
    /// mapping). With `summary`, only counts ([`PagemapSummary`]).
    /// `format`: `"array"` (default: one [`PagemapPages`] line), `"lines"` (a
    /// [`PagemapHeader`] line, then one [`Page`] line per page) or `"raw"` (a header line,
    /// then Linux's 8 bytes per page). Every format is streamed from a compact answer
    /// (docs/security.md).
    Pagemap {
        pid: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        start: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pages: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        summary: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        format: Option<PagemapFormat>,
    },
    /// Linux's `PAGEMAP_SCAN` over `[start, end)` (default: the whole user half): pages
    /// of the process's mappings folded into regions of equal flags; `written`: only
    /// written (soft-dirty) pages; `clear`: clear what was scanned in the same stop of
    /// the guest. At most `max_regions` regions (default and limit 65536) and 2^20
    /// pages per request; answered with [`PagemapScanned`], whose `walk_end` says where
    /// the next request goes on.
    PagemapScan {
        pid: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        start: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        end: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        written: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        clear: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        max_regions: Option<u64>,
    },
    /// Where each process writes: `seconds` (default 5, at most 600) sampled every
    /// `interval_ms` (default 100, 10 to 60000; at most 1000 intervals), for every live
    /// process or only `pid`; answered with [`Heatmap`].
    Heatmap {
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        interval_ms: Option<u64>,
    },
    /// Engine, memory size and counters; answered with [`Info`].
    Info {},
    /// Pages written per second over `seconds`, for the VM and per process; answered
    /// with [`DirtyRate`].
    DirtyRate {
        #[serde(skip_serializing_if = "Option::is_none")]
        seconds: Option<f64>,
    },
    /// Snapshot the VM into directory `out` (a diff against the previous snapshot with
    /// `diff`), then let it go on. With `progress`, [`ProgressLine`]s precede the
    /// [`SnapshotCreated`] answer.
    SnapshotCreate {
        out: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        diff: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<bool>,
        /// A full snapshot pre-copied while the guest runs, the guest paused only for
        /// the last dirty set; `{"round":{...}}` lines report its rounds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        live: Option<bool>,
        /// With `live`: the pause to aim at (default 20 ms) and the bound on the whole
        /// snapshot (default 300 s).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Dump process `pid` into directory `out`: every present page, or with `prev` (its
    /// latest dump) only the pages soft-dirty since; then clear its soft-dirty bits.
    /// Answered with [`DumpCreated`], after [`ProgressLine`]s with `progress`.
    Dump {
        pid: u32,
        out: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        prev: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        progress: Option<bool>,
    },
    /// Live-migrate the VM to `to` (`unix:PATH` or `tcp:HOST:PORT`; docs/migration.md).
    /// `{"round":{...}}` lines report each pre-copy round; the answer is a
    /// [`MigrationDone`]. The source's run then ends (exit status 80); on any failure the
    /// VM goes on here. TCP needs `tls_cert`, `tls_key` and `tls_ca` (absolute paths of
    /// PEM files the VMM reads) or `insecure_plaintext`.
    Migrate {
        to: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        downtime_ms: Option<u64>,
        /// Cap on the send rate, MiB/s.
        #[serde(skip_serializing_if = "Option::is_none")]
        bandwidth: Option<u64>,
        /// Bound on the whole migration (default 300 s).
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        postcopy: Option<bool>,
        /// Pre-copy; if it has not converged at `timeout_ms`, post-copy instead of a cancel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        postcopy_fallback: Option<bool>,
        /// `false`: never throttle the guest (default: throttle when it does not converge).
        #[serde(skip_serializing_if = "Option::is_none")]
        throttle: Option<bool>,
        /// This side's certificate chain (PEM), for TCP with TLS.
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_cert: Option<String>,
        /// Its private key (PEM).
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_key: Option<String>,
        /// The CA bundle (PEM) the destination's certificate must chain to.
        #[serde(skip_serializing_if = "Option::is_none")]
        tls_ca: Option<String>,
        /// TCP without TLS: the VM's memory travels unencrypted and unauthenticated.
        #[serde(skip_serializing_if = "Option::is_none")]
        insecure_plaintext: Option<bool>,
    },
    /// Cancels the running migration (the VM goes on here); answered with
    /// [`MigrationCancelled`].
    MigrateCancel {},
}

/// How a pagemap answer is sent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PagemapFormat {
    Array,
    Lines,
    Raw,
}

/// A successful answer: `{"ok":true}` followed by the fields of `T`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer<T> {
    /// Always `true` here; a [`Failure`] has `false`.
    pub ok: bool,
    #[serde(flatten)]
    pub body: T,
}

impl<T> Answer<T> {
    pub fn new(body: T) -> Answer<T> {
        Answer { ok: true, body }
    }
}

/// A refused request: `{"ok":false,"error":SENTENCE,"kind":KIND}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// Always `false`.
    pub ok: bool,
    /// What went wrong, in a sentence that names the culprit.
    pub error: String,
    /// What went wrong, for programs. Missing from VMMs older than the field.
    #[serde(default)]
    pub kind: ErrorKind,
}

impl Failure {
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> Failure {
        Failure { ok: false, error: error.into(), kind }
    }
}

/// Why a request was refused. Clients choose what to do (and the CLI its exit code) by
/// this, never by the error sentence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The run is over: the guest exited, crashed or timed out. Nothing more to ask.
    Finished,
    /// Malformed JSON, an unknown command or field, a line too long, or an argument out
    /// of range (a pagemap range, a clear_refs value, a dirty-rate window, a `prev` dump
    /// that does not fit, a diff without a base), or a migration's address, TLS flags or
    /// TLS files.
    BadRequest,
    /// No guest process has this pid.
    UnknownPid,
    /// The process has exited: it has no memory any more.
    NotLive,
    /// `resume` while the VM runs rather than waits at a sync.
    NotPaused,
    /// Every connection the VMM serves at once is in the middle of a request.
    Busy,
    /// `wait` saw no matching sync within its timeout.
    Timeout,
    /// Reading or writing files (a snapshot or dump directory) failed.
    Io,
    /// A failure inside the VMM or KVM.
    Internal,
    /// The migration was cancelled (`migrate-cancel`) or did not finish in its time.
    Cancelled,
    /// The migration failed on the way (connection, TLS handshake, destination); the VM
    /// goes on here.
    Migration,
    /// A kind this client does not know (from a newer VMM), or none (an older one).
    #[default]
    #[serde(other)]
    Unknown,
}

/// `{"round":{...}}`: one pre-copy round of a migration. Has no `ok` field.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundLine {
    pub round: crate::migration::source::Round,
}

/// A finished migration: the destination runs the VM now.
pub type MigrationDone = crate::migration::source::Summary;

/// `migrate-cancel`'s answer: whether a migration was running to be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCancelled {
    pub cancelled: bool,
}

/// `{"progress":{"done":B,"total":B}}`: how far a long request (`"progress":true`) has
/// got. Has no `ok` field, which is how clients tell it from the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressLine {
    pub progress: Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done so far.
    pub done: u64,
    /// Bytes in all (may grow while the job learns more).
    pub total: u64,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub phase: PhaseReply,
    /// Syncs reached so far.
    pub syncs: u64,
    /// Guest running time so far, pauses excluded.
    pub running_ns: u64,
    /// A migration of this VM is under way (`migrate` until it ends); left out when not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrating: bool,
}

/// Where the VM is, as `status` tells it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "lowercase")]
pub enum PhaseReply {
    Running,
    /// Waiting at a sync of process `pid`.
    Paused { pid: u32, label: String },
    /// The run is over; `outcome` says how it ended.
    Finished { outcome: String },
}

/// Answer to `resume`: just `{"ok":true}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {}

/// Answer to `wait`: the sync the VM now waits at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paused {
    pub pid: u32,
    pub label: String,
    pub running_ns: u64,
}

/// Answer to `ps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Processes {
    pub processes: Vec<ProcessInfo>,
}

/// One guest process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub name: String,
    /// `runnable`, `exited`, ... as the guest kernel's table says.
    pub state: String,
    pub exit_code: u32,
    /// Physical address of its top page table.
    pub cr3: u64,
    pub rss_pages: u64,
    pub peak_rss_pages: u64,
    pub mappings: Vec<MappingInfo>,
}

/// One mapping of a guest process, as the process table has it.
pub use crate::guest_os::Mapping as MappingInfo;

/// Answer to `clear-refs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefsCleared {
    pub pid: u32,
    /// The clear_refs value applied (1-5).
    pub value: u64,
    pub entries_changed: u64,
    pub elapsed_ns: u64,
}

/// One region of a `pagemap-scan` answer.
pub use crate::tracking::softdirty::scan::Region as ScanRegion;

/// Answer to `pagemap-scan`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagemapScanned {
    pub pid: u32,
    pub regions: Vec<ScanRegion>,
    /// The first page not examined: the request's end if the walk got there.
    pub walk_end: u64,
    /// Pages of mappings examined.
    pub pages_scanned: u64,
    /// Leaf entries the clear changed (0 without `clear`).
    pub entries_changed: u64,
    pub elapsed_ns: u64,
}

/// Answer to `heatmap`: per process, per row (an address range of one of its mappings),
/// the pages written in each interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heatmap {
    pub engine: String,
    pub mem_bytes: u64,
    pub interval_ms: u64,
    /// Intervals sampled: the columns.
    pub intervals: u64,
    /// Wall time the samples span.
    pub seconds: f64,
    /// False when the VM finished before the last interval.
    pub complete: bool,
    pub processes: Vec<HeatmapProcess>,
}

/// One process of a [`Heatmap`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeatmapProcess {
    pub pid: u32,
    pub name: String,
    /// The first interval it was seen in (its counts before are 0).
    pub first_interval: u64,
    /// Pages written over all intervals.
    pub written: u64,
    pub rows: Vec<HeatmapRow>,
}

/// One row of a [`HeatmapProcess`]: pages `[start, end)` of the mapping at
/// `mapping_start` (or, `other`, the mappings past the row limit), and the pages of it
/// written in each interval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeatmapRow {
    pub mapping_start: u64,
    pub start: u64,
    pub end: u64,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub other: bool,
    pub counts: Vec<u32>,
}

/// Answer to `pagemap` with `"summary":true`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagemapSummary {
    pub pid: u32,
    /// Pages in the range.
    pub count: u64,
    pub present: u64,
    pub soft_dirty: u64,
    pub elapsed_ns: u64,
}

/// Answer to `pagemap` in the `array` format: every page on one line. `P` is what holds
/// the pages — a `Vec<Page>` for clients; the server streams them from a compact form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagemapPages<P = Vec<Page>> {
    pub pid: u32,
    pub elapsed_ns: u64,
    pub pages: P,
}

/// The first line of a streamed `pagemap` answer (`lines` or `raw`); the body follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagemapHeader {
    pub pid: u32,
    pub elapsed_ns: u64,
    /// `lines` or `raw`.
    pub format: PagemapFormat,
    /// Pages in the body: lines of [`Page`], or 8-byte entries.
    pub count: u64,
    /// Bytes in a `raw` body (`count * 8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// One page of a pagemap answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    pub addr: u64,
    /// Linux's 64-bit pagemap entry (bit 63 present, 55 soft-dirty, 56 exclusive, 0-54 PFN).
    pub entry: u64,
    pub present: bool,
    /// `null` when not present.
    pub pfn: Option<u64>,
    pub soft_dirty: bool,
    pub exclusive: bool,
    pub huge: bool,
    pub accessed: bool,
}

impl Page {
    /// The page at `addr` with pagemap entry `entry`, `huge` and `accessed` from the walk.
    pub fn new(addr: u64, entry: u64, huge: bool, accessed: bool) -> Page {
        let e = mmu::PagemapEntry(entry);
        Page {
            addr,
            entry,
            present: e.is_present(),
            pfn: e.pfn(),
            soft_dirty: e.soft_dirty(),
            exclusive: e.exclusive(),
            huge,
            accessed,
        }
    }
}

/// Answer to `info`. The counter groups are the tracker's own structs, passed through
/// as JSON objects (their fields are documented where they are counted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Info {
    /// Tracking engine (`pte`, `kvm-bitmap`, ...).
    pub engine: String,
    /// `null` if KVM does not tell.
    pub tsc_khz: Option<u32>,
    /// Guest-physical dirty mechanism behind the engine.
    pub mechanism: String,
    pub mem_bytes: u64,
    /// KVM_RUN calls and exits by kind.
    pub exits: serde_json::Value,
    /// Clears, faults caught and passed, per-stage trap time.
    pub tracker: serde_json::Value,
    /// Harvests, frames harvested, VMM writes merged, ioctls, harvest time.
    pub log: serde_json::Value,
}

/// Answer to `dirty-rate`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirtyRate {
    /// Wall-clock length of the window.
    pub seconds: f64,
    /// Guest running time within it.
    pub running_seconds: f64,
    pub vm_pages: u64,
    pub vm_pages_per_second: f64,
    pub processes: Vec<ProcessRate>,
}

/// One process's part of a [`DirtyRate`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRate {
    pub pid: u32,
    pub name: String,
    pub pages: u64,
    pub pages_per_second: f64,
}

/// Answer to `snapshot-create` (docs/snapshots.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCreated {
    pub id: String,
    pub kind: snapshot::Kind,
    pub pages: u64,
    pub bytes: u64,
    /// Space the snapshot takes on disk (a full image is sparse).
    pub disk_bytes: u64,
    pub pause_ns: u64,
    pub phases: SnapshotPhases,
    /// A live snapshot's pre-copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveSnapshotStats>,
}

/// How a live snapshot's pre-copy went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveSnapshotStats {
    /// Rounds, the paused one included.
    pub rounds: u32,
    /// From the request to the commit.
    pub total_ns: u64,
    pub throttled: bool,
}

/// Where a snapshot's pause went (ns).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPhases {
    pub state_ns: u64,
    pub select_ns: u64,
    pub memory_ns: u64,
    pub sync_ns: u64,
    pub rearm_ns: u64,
}

impl From<snapshot::Report> for SnapshotCreated {
    fn from(r: snapshot::Report) -> SnapshotCreated {
        let p = r.phases;
        SnapshotCreated {
            id: r.id,
            kind: r.kind,
            pages: r.pages,
            bytes: r.bytes,
            disk_bytes: r.disk_bytes,
            pause_ns: r.pause_ns,
            phases: SnapshotPhases {
                state_ns: p.state_ns,
                select_ns: p.select_ns,
                memory_ns: p.memory_ns,
                sync_ns: p.sync_ns,
                rearm_ns: p.rearm_ns,
            },
            live: None,
        }
    }
}

/// Answer to `dump` (docs/snapshots.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpCreated {
    pub id: String,
    pub pid: u32,
    pub counts: dump::Counts,
    /// Data pages written (`counts.data`).
    pub pages: u64,
    /// Bytes of page data written.
    pub bytes: u64,
    pub disk_bytes: u64,
    pub pause_ns: u64,
}

impl From<dump::Report> for DumpCreated {
    fn from(r: dump::Report) -> DumpCreated {
        DumpCreated {
            id: r.id,
            pid: r.pid,
            counts: r.counts,
            pages: r.pages,
            bytes: r.bytes,
            disk_bytes: r.disk_bytes,
            pause_ns: r.pause_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn requests_leave_unset_options_out() {
        let wait = Request::Wait { label: None, timeout_ms: Some(5) };
        assert_eq!(serde_json::to_string(&wait).unwrap(), r#"{"cmd":"wait","timeout_ms":5}"#);
        let back: Request = serde_json::from_str(r#"{"cmd":"wait","label":null,"timeout_ms":5}"#).unwrap();
        assert_eq!(back, wait, "null still reads as unset");
    }

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
    fn requests_round_trip_as_clients_send_them() {
        let reqs = [
            Request::Wait { label: None, timeout_ms: Some(5) },
            Request::ClearRefs { pid: 3, value: Some(4) },
            Request::Pagemap { pid: 1, start: Some(0x400000), pages: None, summary: None, format: Some(PagemapFormat::Raw) },
            Request::DirtyRate { seconds: Some(0.5) },
            Request::PagemapScan { pid: 1, start: Some(0x1000), end: None, written: Some(true), clear: Some(true), max_regions: Some(2) },
            Request::Heatmap { pid: Some(1), seconds: Some(2.0), interval_ms: None },
            Request::Dump { pid: 2, out: "/d".into(), prev: None, progress: Some(false) },
            Request::Migrate { to: "tcp:h:1".into(), downtime_ms: None, bandwidth: None, throttle: None, postcopy_fallback: None, timeout_ms: None, postcopy: None,
                tls_cert: Some("/c.pem".into()), tls_key: Some("/k.pem".into()), tls_ca: Some("/ca.pem".into()), insecure_plaintext: None },
        ];
        for r in reqs {
            let line = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r, "{line}");
        }
        let v = serde_json::to_value(Request::ClearRefs { pid: 3, value: Some(4) }).unwrap();
        assert_eq!(v, json!({"cmd": "clear-refs", "pid": 3, "value": 4}));
        let v = serde_json::to_value(Request::PagemapScan { pid: 1, start: None, end: Some(0x2000), written: None, clear: Some(true), max_regions: None }).unwrap();
        assert_eq!(v, json!({"cmd": "pagemap-scan", "pid": 1, "end": 0x2000, "clear": true}));
        // A migration without TLS fields reads as an older client's did.
        let v = serde_json::to_value(Request::Migrate { to: "unix:/m".into(), downtime_ms: None, bandwidth: None, throttle: None, postcopy_fallback: None, timeout_ms: None,
            postcopy: None, tls_cert: None, tls_key: None, tls_ca: None, insecure_plaintext: None }).unwrap();
        assert_eq!(v, json!({"cmd": "migrate", "to": "unix:/m"}));
    }

    #[test]
    fn answers_carry_ok_and_their_fields() {
        let v = serde_json::to_value(Answer::new(Status {
            phase: PhaseReply::Paused { pid: 2, label: "start".into() },
            syncs: 1,
            running_ns: 9,
            migrating: false,
        }))
        .unwrap();
        assert_eq!(v, json!({"ok": true, "phase": "paused", "pid": 2, "label": "start", "syncs": 1, "running_ns": 9}));
        let back: Answer<Status> = serde_json::from_value(v).unwrap();
        assert_eq!(back.body.phase, PhaseReply::Paused { pid: 2, label: "start".into() });
        let running = serde_json::to_value(Answer::new(Status { phase: PhaseReply::Running, syncs: 0, running_ns: 0, migrating: true })).unwrap();
        assert_eq!(running, json!({"ok": true, "phase": "running", "syncs": 0, "running_ns": 0, "migrating": true}));
        assert_eq!(serde_json::to_value(Answer::new(Resumed {})).unwrap(), json!({"ok": true}));
    }

    #[test]
    fn failures_carry_a_kind_next_to_the_sentence() {
        let f = Failure::new(ErrorKind::UnknownPid, "no process with pid 9");
        assert_eq!(serde_json::to_value(&f).unwrap(),
            json!({"ok": false, "error": "no process with pid 9", "kind": "unknown-pid"}));
        // From a VMM older than the field, and from one that knows more kinds.
        let old: Failure = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(old.kind, ErrorKind::Unknown);
        let newer: Failure = serde_json::from_str(r#"{"ok":false,"error":"x","kind":"frobbed"}"#).unwrap();
        assert_eq!(newer.kind, ErrorKind::Unknown);
    }

    #[test]
    fn pagemap_header_has_bytes_only_for_raw() {
        let h = PagemapHeader { pid: 1, elapsed_ns: 2, format: PagemapFormat::Lines, count: 3, bytes: None };
        assert_eq!(serde_json::to_string(&Answer::new(h)).unwrap(),
            r#"{"ok":true,"pid":1,"elapsed_ns":2,"format":"lines","count":3}"#);
        let h = PagemapHeader { pid: 1, elapsed_ns: 2, format: PagemapFormat::Raw, count: 3, bytes: Some(24) };
        assert_eq!(serde_json::to_string(&Answer::new(h)).unwrap(),
            r#"{"ok":true,"pid":1,"elapsed_ns":2,"format":"raw","count":3,"bytes":24}"#);
    }

    /// The typed answers say exactly what the storage reports said when they were sent
    /// as they are (adding a field to a report fails to compile here until it is added
    /// to the answer too).
    #[test]
    fn storage_reports_convert_field_for_field() {
        let phases = snapshot::Phases { state_ns: 1, select_ns: 2, memory_ns: 3, sync_ns: 4, rearm_ns: 5 };
        let r = snapshot::Report { id: "s".into(), kind: snapshot::Kind::Diff, pages: 6, bytes: 7, disk_bytes: 8, pause_ns: 9, phases };
        let want: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::to_value(SnapshotCreated::from(r)).unwrap(), want);
        let counts = dump::Counts { data: 1, zero: 2, parent: 3, absent: 4 };
        let r = dump::Report { id: "d".into(), pid: 5, counts, pages: 1, bytes: 4096, disk_bytes: 8192, pause_ns: 7 };
        let want: Value = serde_json::to_value(&r).unwrap();
        assert_eq!(serde_json::to_value(DumpCreated::from(r)).unwrap(), want);
    }
}
