//! The pte engine: Linux's `clear_refs` and `pagemap` for a guest process, computed and
//! enforced from outside (docs/softdirty.md).
//!
//! - `clear_refs 4` clears W and the soft-dirty bit in every present leaf of the
//!   process (marking the ones it write-protected), re-protects their frames in KVM's
//!   dirty log so KVM re-reads the edited PTEs, remembers the process's mappings, and
//!   arms the #PF trap.
//! - A caught write fault on a page the VMM protected sets soft-dirty and gives W back,
//!   then re-runs the write; the guest's handler never runs. Only when the guest's own
//!   mapping is still writable: the VMM never grants a write the guest took away.
//! - `pagemap` reports a page soft-dirty if its PTE says so, or its mapping is new or
//!   grown since the last clear, or it is writable and its frame shows in the dirty log
//!   (the guest made the PTE writable again, so writes no longer fault).

use super::dirty_log::{self, GpaLog};
use super::frame_set::FrameSet;
use super::pagemap::{frames, FrameCounts, PageCtx, PteRule};
use super::pf_trap;
use super::ram::{self, AsPhys, Ram};
use crate::guest_os::{self, Mapping, Process, Snapshot, TableLocation};
use crate::machine::memory::GuestMem;
use crate::tracking::engine::EngineKind;
use guest_abi::ProcessTable;
use kvm_ioctls::VcpuFd;
use mmu::{softdirty, Cr3, GuestPhysAddr, GuestVirtAddr, Leaf, PagingMode, PteFlags, TableBudget, Translation, Walker};
use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::sync::Arc;
use coverage::Coverage;

pub use super::pagemap::{PageInfo, MAX_PAGEMAP_PAGES};
const USER_TOP: u64 = workload::USER_TOP;
/// Most pieces of mappings a pid's clears of ranges remember (the VMA rule).
const MAX_COVERAGE_PIECES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no process with pid {0}")]
    UnknownPid(u32),
    #[error("pid {pid} has {state} (exit code {code}): it has no memory any more")]
    NotLive { pid: u32, state: &'static str, code: u32 },
    #[error("invalid clear_refs value {0} (EINVAL): use 1 (accessed bits), 2 (anonymous), 3 (file-backed), 4 (soft-dirty) or 5 (peak RSS)")]
    BadValue(u64),
    #[error("invalid range: {0}")]
    BadRange(String),
    #[error(transparent)]
    GuestOs(#[from] guest_os::Error),
    #[error("walking the page tables of pid {pid} failed: {detail}")]
    Walk { pid: u32, detail: String },
    #[error(transparent)]
    DirtyLog(#[from] dirty_log::Error),
    #[error(transparent)]
    Trap(#[from] pf_trap::Error),
    #[error(transparent)]
    Ram(#[from] ram::Error),
    #[error("writing guest memory at {0:#x} failed")]
    Write(u64),
}

/// `clear_refs` values, as Linux defines them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearRefs {
    Accessed = 1,
    AccessedAnon = 2,
    AccessedFile = 3,
    SoftDirty = 4,
    PeakRss = 5,
}

impl TryFrom<u64> for ClearRefs {
    type Error = Error;
    fn try_from(v: u64) -> Result<Self, Error> {
        Ok(match v {
            1 => ClearRefs::Accessed,
            2 => ClearRefs::AccessedAnon,
            3 => ClearRefs::AccessedFile,
            4 => ClearRefs::SoftDirty,
            5 => ClearRefs::PeakRss,
            _ => return Err(Error::BadValue(v)),
        })
    }
}

/// Counters for `vmm info`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Stats {
    pub clears: u64,
    pub pages_write_protected: u64,
    pub faults_caught: u64,
    pub faults_passed: u64,
    /// Time spent in the trap's stages (reading state, deciding, resuming), in ns.
    pub trap_read_ns: u64,
    pub trap_decide_ns: u64,
    pub trap_resume_ns: u64,
    /// Times the trap or a scan parsed the process table (only when the guest changed it
    /// since the last parse).
    pub trap_table_reads: u64,
}

/// What a snapshot keeps of the tracker (its `tracker` section, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TrackerState {
    /// Each cleared pid's mappings at its last soft-dirty clear.
    pub cleared: std::collections::BTreeMap<u32, Vec<Mapping>>,
    /// The dirty log's accumulated bits, one per frame.
    pub accumulated: Vec<u64>,
    /// The #PF handler the trap was on, if it was.
    pub trap: Option<u64>,
}

/// Pages written in a dirty-rate window: the whole VM's, then (pid, name, pages) per
/// live process.
pub type WindowReport = (u64, Vec<(u32, String, u64)>);

/// What a debug exit was.
pub enum TrapOutcome {
    /// A write the engine caused: fixed, the guest never saw it.
    Caught,
    /// Not the engine's: the guest handles it.
    Passed,
    /// Not our breakpoint at all.
    NotOurs,
}

pub struct Tracker {
    /// Where the guest's process table is; `None` for an image without one.
    table: Option<TableLocation>,
    engine: EngineKind,
    walker: Walker,
    /// Each cleared pid's mappings at its last soft-dirty clear.
    cleared: HashMap<u32, Vec<Mapping>>,
    /// How many times each pid's soft-dirty bits were cleared (dumps check it).
    clear_counts: HashMap<u32, u64>,
    /// The PTE trap, for engines that write-protect guest PTEs; `None` for the
    /// guest-physical engines.
    trap: Option<PteTrap>,
    /// The process table as last parsed, with the sequence number it had: the fault
    /// path and the scan re-read it only when the guest changed it.
    procs: Option<(u64, Arc<Snapshot>)>,
    pub log: GpaLog,
    pub stats: Stats,
}

/// The PTE trap's state.
#[derive(Debug, Default)]
struct PteTrap {
    /// The guest's #PF handler, once the breakpoint is on it.
    handler: Option<u64>,
    /// A clear wants the breakpoint on before the guest runs again.
    wanted: bool,
    /// Registers travel through `kvm_run` (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// Single-stepping over the #PF handler's first instruction (a passed fault).
    stepping: bool,
}

impl Tracker {
    pub fn new(table: Option<TableLocation>, engine: EngineKind, log: GpaLog, sync_regs: bool) -> Tracker {
        Tracker {
            table,
            engine,
            walker: Walker::new(PagingMode::Level4),
            cleared: HashMap::new(),
            clear_counts: HashMap::new(),
            trap: engine.traps_ptes().then(|| PteTrap { sync_regs, ..PteTrap::default() }),
            procs: None,
            log,
            stats: Stats::default(),
        }
    }

    /// Soft-dirty clears of `pid` so far (`clear-refs 4`, and each dump's own).
    pub fn clears_of(&self, pid: u32) -> u64 {
        self.clear_counts.get(&pid).copied().unwrap_or(0)
    }

    pub fn engine(&self) -> EngineKind {
        self.engine
    }

    fn table(&self) -> Result<TableLocation, Error> {
        Ok(self.table.ok_or(guest_os::Error::NoSymbol(guest_abi::PROCESS_TABLE_SYMBOL))?)
    }

    /// Reads and checks the guest's process table.
    pub fn snapshot(&self, ram: &impl Ram) -> Result<Snapshot, Error> {
        let table = self.table()?;
        let raw = ram.read_bytes(table.phys, size_of::<ProcessTable>()).ok_or(guest_os::Error::Unreadable { addr: table.phys })?;
        Ok(guest_os::parse(&raw, ram.size())?)
    }

    /// The process table, parsed again only if its sequence number moved since the last
    /// parse (the kernel bumps it around every change; a clear also drops the parse). A
    /// guest that edits the table without bumping it only misleads the answers about its
    /// own processes (the trap's and pagemap-scan's): the trap still never grants a write
    /// that the guest's own PTE forbids, and a scan's walk is bounded as ever. Sequence
    /// number 0 is a table the kernel has not published through its lock yet: parsed, not
    /// kept.
    ///
    /// Shared (`Arc`), so that a caller holds it while it changes the tracker.
    fn cached_snapshot(&mut self, ram: &impl Ram) -> Result<Arc<Snapshot>, Error> {
        let table = self.table()?;
        let seq_addr = table.phys + offset_of!(ProcessTable, seq) as u64;
        let seq = ram.read_u64(GuestPhysAddr(seq_addr)).map_err(|_| guest_os::Error::Unreadable { addr: seq_addr })?;
        if let Some((s, snap)) = &self.procs {
            if *s == seq {
                return Ok(Arc::clone(snap));
            }
        }
        // parse() refuses an odd (changing) sequence number.
        let snap = Arc::new(self.snapshot(ram)?);
        self.stats.trap_table_reads += 1;
        self.procs = (seq != 0).then(|| (seq, Arc::clone(&snap)));
        Ok(snap)
    }

    /// Process `pid` of `snap`, if it is live (else the refusal naming why).
    pub fn live(snap: &Snapshot, pid: u32) -> Result<&Process, Error> {
        let p = snap.by_pid(pid).ok_or(Error::UnknownPid(pid))?;
        if !p.is_live() {
            return Err(Error::NotLive { pid, state: p.state.name(), code: p.exit_code });
        }
        Ok(p)
    }

    /// A fresh budget for one request's walks: as many table pages as guest RAM holds.
    /// Honest guests never come near it (their processes' tables are distinct pages of
    /// RAM); tables shared or aliased beyond it make the request fail instead of costing
    /// leaves x processes (docs/security.md).
    fn budget(&self) -> TableBudget {
        TableBudget::new(self.log.pages())
    }

    /// Calls `visit` on every present user leaf of `p` over `[start, start + pages*4096)`,
    /// in address order, reading no more tables than `budget` has left.
    fn walk(&self, ram: &impl Ram, p: &Process, start: u64, pages: u64, budget: &mut TableBudget,
        mut visit: impl FnMut(&Leaf)) -> Result<(), Error> {
        self.walker
            .walk_range_within(&AsPhys(ram), p.cr3.table(), GuestVirtAddr(start), pages, budget, &mut |item| {
                if let Ok(leaf) = item {
                    visit(&leaf);
                }
            })
            .map(|_| ())
            .map_err(|e| Error::Walk { pid: p.pid, detail: e.to_string() })
    }

    fn write_entry(ram: &impl Ram, leaf: &Leaf, value: u64) -> Result<(), Error> {
        ram.write_u64(leaf.entry_addr, value).map_err(|_| Error::Write(leaf.entry_addr.0))
    }

    /// `echo VALUE > /proc/PID/clear_refs`. Returns the number of leaf entries changed
    /// (for the guest-physical engines' soft-dirty clear: the leaves whose frames were
    /// re-protected). Puts the PTE trap on before returning when the clear needs it.
    pub fn clear_refs(&mut self, mem: &GuestMem, vcpu: &VcpuFd, pid: u32, value: ClearRefs) -> Result<u64, Error> {
        let changed = self.clear_refs_in(mem, pid, value)?;
        self.arm_if_wanted(mem, vcpu)?;
        Ok(changed)
    }

    /// [`Self::clear_refs`] on any RAM, without touching the vCPU: the trap, if the
    /// clear wants it, is put on by the next [`Self::arm_if_wanted`].
    pub fn clear_refs_in(&mut self, ram: &impl Ram, pid: u32, value: ClearRefs) -> Result<u64, Error> {
        let snap = self.snapshot(ram)?;
        let p = Self::live(&snap, pid)?;
        match value {
            ClearRefs::AccessedFile => Ok(0), // our guest has no file-backed memory
            ClearRefs::PeakRss => {
                let addr = self.table()?.peak_rss_addr(p.slot);
                ram.write_u64(GuestPhysAddr(addr), p.rss_pages).map_err(|_| Error::Write(addr))?;
                Ok(0)
            }
            ClearRefs::Accessed | ClearRefs::AccessedAnon => {
                let mut zap = FrameSet::new(self.log.pages());
                let (mut changed, mut failed) = (0, None);
                let walked = self.walk(ram, p, 0, USER_TOP / 4096, &mut self.budget(), |leaf| {
                    if leaf.entry.contains(PteFlags::ACCESSED) {
                        match Self::write_entry(ram, leaf, leaf.entry.without(PteFlags::ACCESSED).0) {
                            Ok(()) => changed += 1,
                            Err(e) => _ = failed.get_or_insert(e),
                        }
                        zap.insert_leaf(frames(leaf));
                    }
                });
                // Zap what was edited even if the walk stopped early: KVM must re-read those.
                ram.zap(&zap)?;
                walked?;
                failed.map_or(Ok(changed), Err)
            }
            ClearRefs::SoftDirty => self.clear_soft_dirty(ram, &snap, p, None),
        }
    }

    /// The soft-dirty clear of `p`: of every page, or (`range`, `[start, end)`) only of
    /// the leaves wholly inside the range. Returns the leaf entries changed (for the
    /// guest-physical engines: the leaves whose frames were re-protected).
    fn clear_soft_dirty(&mut self, ram: &impl Ram, snap: &Snapshot, p: &Process, range: Option<(u64, u64)>) -> Result<u64, Error> {
        self.log.harvest(ram)?;
        let rule = PteRule::of(self.engine);
        let edit = rule.clear_edit();
        let (start, end) = range.unwrap_or((0, USER_TOP));
        // Every present frame, also for the per-PTE engines: so that KVM re-reads
        // the edited PTEs (and, for pte, a later write through a PTE the guest
        // makes writable again still shows in the log).
        let mut protect = FrameSet::new(self.log.pages());
        let (mut changed, mut leaves, mut failed) = (0, 0, None);
        let walked = self.walk(ram, p, start, (end - start) / 4096, &mut self.budget(), |leaf| {
            // A 2 MiB page reaching outside the range keeps its state: clearing it
            // would forget its writes outside the range (Linux splits it; the guest's
            // page is not ours to split).
            if leaf.va.0 < start || leaf.va.0 + leaf.size.bytes() > end {
                return;
            }
            leaves += 1;
            protect.insert_leaf(frames(leaf));
            if let Some(edit) = edit {
                let new = edit(leaf.entry);
                if new != leaf.entry {
                    match Self::write_entry(ram, leaf, new.0) {
                        Ok(()) => changed += 1,
                        Err(e) => _ = failed.get_or_insert(e),
                    }
                }
            }
        });
        // Frames mapped anywhere else keep their bit: by other live processes, and by
        // this one outside the range. Their pagemap still reads it (the guest-physical
        // engines', and pte's backstop). Not hybrid: it never reads the log.
        let mut keep = FrameSet::new(self.log.pages());
        if rule.reads_log() {
            let mut budget = self.budget();
            let mut elsewhere: Vec<(&Process, u64, u64)> =
                snap.processes.iter().filter(|q| q.is_live() && q.pid != p.pid).map(|q| (q, 0, USER_TOP)).collect();
            if range.is_some() {
                elsewhere.extend([(p, 0, start), (p, end, USER_TOP)].into_iter().filter(|(_, s, e)| s < e));
            }
            for (q, s, e) in elsewhere {
                if self.walk(ram, q, s, (e - s) / 4096, &mut budget, |leaf| keep.insert_leaf(frames(leaf))).is_err() {
                    // Tables past the budget: forget nothing (a superset, never less).
                    keep.fill();
                    break;
                }
            }
        }
        // Even after a failed walk, KVM must re-read the entries already edited.
        self.log.clear(&protect, &keep)?;
        walked?;
        if let Some(e) = failed {
            return Err(e);
        }
        match range {
            None => _ = self.cleared.insert(p.pid, p.mappings.clone()),
            Some((start, end)) => self.cover(p, start, end),
        }
        *self.clear_counts.entry(p.pid).or_default() += 1;
        self.stats.clears += 1;
        self.stats.pages_write_protected += changed;
        self.procs = None;
        if let Some(trap) = &mut self.trap {
            trap.wanted = true;
        }
        Ok(if edit.is_some() { changed } else { leaves })
    }

    /// After a clear of `[start, end)` of `p`: its mappings' pages in the range are no
    /// longer new (the VMA rule). Pieces of mappings gone are dropped, pieces of one
    /// mapping merged; a pid fragmented past [`MAX_COVERAGE_PIECES`] forgets them all,
    /// so that every page reads new until its next whole clear (more, never less).
    fn cover(&mut self, p: &Process, start: u64, end: u64) {
        let live: std::collections::HashSet<u64> = p.mappings.iter().map(|m| m.serial).collect();
        let mut pieces: Vec<Mapping> = self.cleared.remove(&p.pid).unwrap_or_default();
        pieces.retain(|o| live.contains(&o.serial));
        for m in &p.mappings {
            let (s, e) = (m.start.max(start), m.end().min(end));
            if s < e {
                pieces.push(Mapping { start: s, pages: (e - s) / 4096, ..*m });
            }
        }
        pieces.sort_by_key(|m| (m.serial, m.start));
        let mut merged: Vec<Mapping> = Vec::with_capacity(pieces.len());
        for m in pieces {
            match merged.last_mut() {
                Some(l) if l.serial == m.serial && m.start <= l.end() => l.pages = (l.end().max(m.end()) - l.start) / 4096,
                _ => merged.push(m),
            }
        }
        if merged.len() <= MAX_COVERAGE_PIECES {
            self.cleared.insert(p.pid, merged);
        }
    }

    /// Puts the breakpoint on the guest's #PF handler if a clear wants it and it is not
    /// there yet.
    pub fn arm_if_wanted(&mut self, mem: &GuestMem, vcpu: &VcpuFd) -> Result<(), Error> {
        let Some(trap) = &mut self.trap else { return Ok(()) };
        if trap.wanted && trap.handler.is_none() {
            let sregs = vcpu.get_sregs().map_err(|source| pf_trap::Error::Kvm { op: "GET_SREGS", source })?;
            let handler = pf_trap::find_handler(mem, &self.walker, &sregs)?;
            pf_trap::arm(vcpu, handler)?;
            trap.handler = Some(handler);
        }
        Ok(())
    }

    /// Which frames live processes map more than once (for "exclusive").
    fn frame_counts(&self, ram: &impl Ram, snap: &Snapshot, budget: &mut TableBudget) -> Result<FrameCounts, Error> {
        let mut counts = FrameCounts::new(self.log.pages());
        for p in snap.processes.iter().filter(|p| p.is_live()) {
            self.walk(ram, p, 0, USER_TOP / 4096, budget, |leaf| counts.add(leaf.frame().pfn()))?;
        }
        Ok(counts)
    }

    /// What each page's pagemap entry needs besides its leaf, for this engine and `snap`
    /// (the log harvested by the caller).
    fn page_ctx<'a>(&'a self, snap: &Snapshot, counts: Option<&'a FrameCounts>) -> PageCtx<'a> {
        PageCtx {
            dirty: self.log.dirty_bits(),
            rule: PteRule::of(self.engine),
            zero_frame: snap.zero_frame,
            huge_zero_frame: snap.huge_zero_frame,
            counts,
        }
    }

    /// Reads `/proc/PID/pagemap` for `pages` pages from `start`; `None` = every page of
    /// every mapping of the process.
    pub fn pagemap(&mut self, ram: &impl Ram, pid: u32, range: Option<(u64, u64)>) -> Result<Vec<PageInfo>, Error> {
        let snap = self.snapshot(ram)?;
        let p = Self::live(&snap, pid)?;
        let ranges: Vec<(u64, u64)> = match range {
            Some((start, pages)) => {
                check_range(start, pages)?;
                vec![(start, pages)]
            }
            None => p.mappings.iter().map(|m| (m.start, m.pages)).collect(),
        };
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        if total > MAX_PAGEMAP_PAGES {
            return Err(Error::BadRange(format!("{total} pages exceed the limit of {MAX_PAGEMAP_PAGES} per request")));
        }
        self.log.harvest(ram)?;
        let counts = self.frame_counts(ram, &snap, &mut self.budget())?;
        let page = self.page_ctx(&snap, Some(&counts));
        let mut out = Vec::with_capacity(total as usize);
        // Only the leaves of the requested pages: at most one per page, whatever the
        // rest of the address space holds.
        let mut budget = self.budget();
        for (start, pages) in ranges {
            let mut leaves = Vec::new();
            self.walk(ram, p, start, pages, &mut budget, |leaf| leaves.push(*leaf))?;
            let end = start + pages * 4096;
            let mut li = leaves.partition_point(|l| l.va.0 + l.size.bytes() <= start);
            let mut va = start;
            while va < end {
                // The mapping segment holding `va`, or the hole up to the next mapping.
                let m = p.mapping_at(va);
                let seg_end = match m {
                    Some(m) => m.end().min(end),
                    None => p.mappings.iter().map(|m| m.start).filter(|&s| s > va).min().unwrap_or(end).min(end),
                };
                va = self.segment_pages(&page, pid, m, &leaves, &mut li, va, seg_end, |info| {
                    out.push(info);
                    true
                });
            }
        }
        Ok(out)
    }

    /// The pages `[va, seg_end)` of one segment of `pid` — inside mapping `m`, or a hole
    /// (`None`) — in order, to `visit` until it declines one (returns false); `leaves`:
    /// the walked leaves in address order, `li` a cursor into them. Returns the first
    /// page not taken (`seg_end` if all were).
    #[allow(clippy::too_many_arguments)]
    fn segment_pages(&self, page: &PageCtx, pid: u32, m: Option<&Mapping>, leaves: &[Leaf], li: &mut usize, mut va: u64,
        seg_end: u64, mut visit: impl FnMut(PageInfo) -> bool) -> u64 {
        // The VMA rule, once per segment: pages of this mapping that its namesake at
        // the last clear did not cover read soft-dirty.
        let mut old = m.map(|m| Coverage::new(self.old_coverage(pid, m)));
        let mut written_cache: Option<(usize, bool)> = None;
        while va < seg_end {
            while *li < leaves.len() && leaves[*li].va.0 + leaves[*li].size.bytes() <= va {
                *li += 1;
            }
            let leaf = leaves.get(*li).filter(|l| l.va.0 <= va);
            let vma_new = old.as_mut().is_some_and(|c| c.at(va).0);
            // One answer per leaf: a 2 MiB leaf shares it across its 512 pages.
            let written = leaf.map(|l| match written_cache {
                Some((i, w)) if i == *li => w,
                _ => {
                    let w = page.written(l);
                    written_cache = Some((*li, w));
                    w
                }
            });
            if !visit(page.info(va, leaf, written.unwrap_or(false), vma_new, m.is_some_and(|m| m.shared))) {
                return va;
            }
            va += 4096;
        }
        va
    }

    /// Linux's VM_SOFTDIRTY of mapping `m` of `pid` (`sd` in smaps' VmFlags): set on a
    /// mapping made since the pid's last clear (or ever, if never cleared), in whole or
    /// in part; a clear takes it off every mapping.
    pub fn vma_soft_dirty(&self, pid: u32, m: &Mapping) -> bool {
        let (new, until) = Coverage::new(self.old_coverage(pid, m)).at(m.start);
        new || until < m.end()
    }

    /// What mapping `m` covered at the pid's last clear: every piece with its serial
    /// (`protect` and partial `unmap` split one mapping into several records). Empty if
    /// it is new since then, or if the pid was never cleared (everything is new, as for
    /// a fresh Linux process).
    fn old_coverage(&self, pid: u32, m: &Mapping) -> Vec<(u64, u64)> {
        self.cleared.get(&pid).map_or_else(Vec::new, |old| {
            old.iter().filter(|o| o.serial == m.serial).map(|o| (o.start, o.end())).collect()
        })
    }

    /// The engine's own state, for a snapshot: per-pid clears, the accumulated log, the
    /// trap address.
    pub fn save_state(&self) -> TrackerState {
        TrackerState {
            cleared: self.cleared.iter().map(|(&pid, m)| (pid, m.clone())).collect(),
            accumulated: self.log.accumulated().to_vec(),
            trap: self.trap.as_ref().and_then(|t| t.handler),
        }
    }

    /// [`Self::save_state`] as the bytes of a snapshot's `tracker` section (JSON).
    pub fn export_state(&self) -> Vec<u8> {
        serde_json::to_vec(&self.save_state()).expect("tracker state serializes")
    }

    /// Restores [`Self::export_state`] into a fresh tracker and re-arms the trap.
    pub fn import_state(&mut self, raw: &[u8], mem: &GuestMem, vcpu: &VcpuFd) -> Result<(), String> {
        let st: TrackerState = serde_json::from_slice(raw).map_err(|e| format!("tracker state: {e}"))?;
        self.restore_state(st)?;
        self.arm_if_wanted(mem, vcpu).map_err(|e| e.to_string())
    }

    /// Takes a saved state; the trap, if it was on, goes on again at the next
    /// [`Self::arm_if_wanted`].
    pub fn restore_state(&mut self, st: TrackerState) -> Result<(), String> {
        if !self.log.set_accumulated(st.accumulated) {
            return Err("tracker state: log size does not match the guest".into());
        }
        self.cleared = st.cleared.into_iter().collect();
        if let (Some(_), Some(trap)) = (st.trap, &mut self.trap) {
            trap.handler = None;
            trap.wanted = true;
        }
        Ok(())
    }

    /// Starts a dirty-rate window.
    pub fn window_start(&mut self, ram: &impl Ram) -> Result<(), Error> {
        Ok(self.log.window_start(ram)?)
    }

    /// Pages written in the window: the whole VM, and per live process (frames of its
    /// present pages written in the window; a 2 MiB page counts its written 4 KiB frames).
    pub fn window_report(&mut self, ram: &impl Ram) -> Result<WindowReport, Error> {
        self.log.harvest(ram)?;
        let total = self.log.window_count();
        let mut per = Vec::new();
        if let Ok(snap) = self.snapshot(ram) {
            let mut budget = self.budget();
            for p in snap.processes.iter().filter(|p| p.is_live()) {
                let mut mapped = FrameSet::new(self.log.pages());
                self.walk(ram, p, 0, USER_TOP / 4096, &mut budget, |leaf| mapped.insert_leaf(frames(leaf)))?;
                per.push((p.pid, p.name.clone(), mapped.count_in(self.log.window_words())));
            }
        }
        Ok((total, per))
    }

    /// Handles a debug exit. Returns what it was.
    pub fn on_debug_exit(&mut self, mem: &GuestMem, vcpu: &mut VcpuFd, pc: u64) -> Result<TrapOutcome, Error> {
        let Some(trap) = &mut self.trap else { return Ok(TrapOutcome::NotOurs) };
        let Some(handler) = trap.handler else { return Ok(TrapOutcome::NotOurs) };
        let sync_regs = trap.sync_regs;
        if trap.stepping {
            // The guest's handler is past its first instruction: breakpoint back on.
            trap.stepping = false;
            pf_trap::arm(vcpu, handler)?;
            return Ok(TrapOutcome::Passed);
        }
        if pc != handler {
            return Ok(TrapOutcome::NotOurs);
        }
        let t0 = std::time::Instant::now();
        let stopped = pf_trap::stopped(vcpu, mem, &self.walker, sync_regs)?;
        let t1 = std::time::Instant::now();
        self.stats.trap_read_ns += (t1 - t0).as_nanos() as u64;
        let f = stopped.fault;
        if self.on_fault(mem, f.cr3, f.addr, f.is_user_write_protection())? {
            let t2 = std::time::Instant::now();
            self.stats.trap_decide_ns += (t2 - t1).as_nanos() as u64;
            pf_trap::return_to_user(vcpu, stopped, sync_regs)?;
            self.stats.trap_resume_ns += t2.elapsed().as_nanos() as u64;
            self.stats.faults_caught += 1;
            return Ok(TrapOutcome::Caught);
        }
        pf_trap::step_over_handler_entry(vcpu)?;
        if let Some(trap) = &mut self.trap {
            trap.stepping = true;
        }
        self.stats.faults_passed += 1;
        Ok(TrapOutcome::Passed)
    }

    /// The trap's decision for a page fault at `addr` in the address space `cr3`, on any
    /// RAM. A user write to a page the VMM write-protected, through a mapping the guest
    /// itself allows writing, gets W back and is recorded: returns true, and the guest
    /// must not see the fault. Otherwise the guest handles it (false); if it was a write
    /// to a page the VMM protected, it is recorded anyway, since the guest may let it
    /// happen (copy-on-write).
    pub fn on_fault(&mut self, ram: &impl Ram, cr3: Cr3, addr: u64, user_write_protection: bool) -> Result<bool, Error> {
        if !user_write_protection || addr >= USER_TOP {
            return Ok(false);
        }
        let Some(leaf) = self.leaf_at(ram, cr3, addr) else { return Ok(false) };
        if !softdirty::is_hypervisor_protected(leaf.entry) {
            return Ok(false);
        }
        if self.guest_allows_write(ram, cr3, addr, &leaf) {
            Self::write_entry(ram, &leaf, softdirty::restore_after_write(leaf.entry).0)?;
            return Ok(true);
        }
        Self::write_entry(ram, &leaf, softdirty::mark_written(leaf.entry).0)?;
        Ok(false)
    }

    /// A store the VMM made into `[va, va + len)` of the address space `cr3` on the guest
    /// kernel's behalf (a `read` into a Linux program's buffer): a write of those pages,
    /// as Linux's copy_to_user is. The guest-physical engines see it in vm-memory's
    /// dirty bitmap; the per-PTE engines read PTE bits that a store by guest-physical
    /// address does not set, so each leaf it touched is marked soft-dirty, as a caught
    /// fault marks it. The caller bounds `len` (its store's size).
    pub fn note_store(&mut self, ram: &impl Ram, cr3: Cr3, va: u64, len: u64) -> Result<(), Error> {
        if !self.engine.reads_ptes() || len == 0 {
            return Ok(());
        }
        let end = va.saturating_add(len).min(USER_TOP);
        let mut page = va & !0xfff;
        while page < end {
            let Some(leaf) = self.leaf_at(ram, cr3, page) else {
                page += 4096;
                continue;
            };
            let marked = softdirty::mark_written(leaf.entry);
            if marked != leaf.entry {
                Self::write_entry(ram, &leaf, marked.0)?;
            }
            page = leaf.va.0 + leaf.size.bytes();
        }
        Ok(())
    }

    fn leaf_at(&self, ram: &impl Ram, cr3: Cr3, va: u64) -> Option<Leaf> {
        match self.walker.translate(&AsPhys(ram), cr3.table(), GuestVirtAddr(va)) {
            Ok(Translation::Mapped { leaf, .. }) => Some(leaf),
            _ => None,
        }
    }

    /// The guest's own view: the mapping is writable and the page is not the shared
    /// zero frame (a write there is the guest's copy-on-write to handle).
    fn guest_allows_write(&mut self, ram: &impl Ram, cr3: Cr3, va: u64, leaf: &Leaf) -> bool {
        let Ok(snap) = self.cached_snapshot(ram) else { return false };
        let Some(p) = snap.by_cr3(cr3) else { return false };
        let writable = p.mapping_at(va).is_some_and(|m| !m.read_only);
        let zero = leaf.frame().0 == snap.zero_frame || (snap.huge_zero_frame != 0 && leaf.frame().0 == snap.huge_zero_frame);
        writable && !zero && leaf.upper.contains(PteFlags::WRITABLE | PteFlags::USER)
    }
}

/// A pagemap range: page-aligned, non-empty, bounded, inside the user half.
pub fn check_range(start: u64, pages: u64) -> Result<(), Error> {
    super::pagemap::check_range(start, pages).map_err(Error::BadRange)
}

mod coverage;
pub mod heatmap;
pub mod scan;

#[cfg(test)]
mod tests;
