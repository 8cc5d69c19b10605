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

use crate::tracking::dirty_log::{self, GpaLog};
use crate::tracking::engine::EngineKind;
use crate::tracking::frame_set::{FrameSet, LeafFrames};
use crate::guest_os::{self, Mapping, Process, Snapshot, TableLocation};
use crate::machine::memory::{GuestMem, Phys};
use crate::tracking::pf_trap;
use kvm_ioctls::{VcpuFd, VmFd};
use mmu::{softdirty, Cr3, GuestPhysAddr, GuestVirtAddr, Leaf, PageSize, PagemapEntry, PagingMode, PhysMemory, PteFlags,
    TableBudget, Translation, Walker};
use std::collections::HashMap;


/// Largest pagemap request, in pages (4 GiB of address space).
pub const MAX_PAGEMAP_PAGES: u64 = 1 << 20;
const USER_TOP: u64 = workload::USER_TOP;

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

/// One page of a pagemap answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageInfo {
    pub addr: u64,
    pub entry: PagemapEntry,
    pub huge: bool,
    pub accessed: bool,
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
}

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
    trap: Option<u64>,
    /// Registers travel through `kvm_run` (KVM_CAP_SYNC_REGS).
    sync_regs: bool,
    /// Single-stepping over the #PF handler's first instruction (a passed fault).
    stepping: bool,
    pub log: GpaLog,
    pub stats: Stats,
}

/// Frames of a leaf as the guest claims them (first pfn, count): they may lie past the
/// end of RAM. Host-side uses go through a [`FrameSet`], which keeps only RAM frames.
fn frames(leaf: &Leaf) -> LeafFrames {
    LeafFrames { pfn: leaf.frame().pfn(), count: leaf.size.bytes() / 4096 }
}

impl Tracker {
    pub fn new(table: Option<TableLocation>, engine: EngineKind, log: GpaLog, sync_regs: bool) -> Tracker {
        Tracker {
            sync_regs,
            table,
            engine,
            walker: Walker::new(PagingMode::Level4),
            cleared: HashMap::new(),
            clear_counts: HashMap::new(),
            trap: None,
            stepping: false,
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

    pub fn snapshot(&self, mem: &GuestMem) -> Result<Snapshot, Error> {
        let table = self.table.ok_or(guest_os::Error::NoSymbol(guest_abi::PROCESS_TABLE_SYMBOL))?;
        Ok(table.read(mem)?)
    }

    fn live(snap: &Snapshot, pid: u32) -> Result<&Process, Error> {
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
    fn walk(&self, mem: &GuestMem, p: &Process, start: u64, pages: u64, budget: &mut TableBudget,
        mut visit: impl FnMut(&Leaf)) -> Result<(), Error> {
        self.walker
            .walk_range_within(&Phys(mem), p.cr3.table(), GuestVirtAddr(start), pages, budget, &mut |item| {
                if let Ok(leaf) = item {
                    visit(&leaf);
                }
            })
            .map(|_| ())
            .map_err(|e| Error::Walk { pid: p.pid, detail: e.to_string() })
    }

    fn write_entry(mem: &GuestMem, leaf: &Leaf, value: u64) -> Result<(), Error> {
        Phys(mem).write_u64(leaf.entry_addr, value).map_err(|_| Error::Write(leaf.entry_addr.0))
    }

    /// `echo VALUE > /proc/PID/clear_refs`. Returns the number of leaf entries changed.
    pub fn clear_refs(&mut self, mem: &GuestMem, vm: &VmFd, vcpu: &VcpuFd, pid: u32, value: ClearRefs) -> Result<u64, Error> {
        let snap = self.snapshot(mem)?;
        let p = Self::live(&snap, pid)?;
        match value {
            ClearRefs::AccessedFile => Ok(0), // our guest has no file-backed memory
            ClearRefs::PeakRss => {
                let table = self.table.ok_or(guest_os::Error::NoSymbol(guest_abi::PROCESS_TABLE_SYMBOL))?;
                let addr = table.peak_rss_addr(p.slot);
                Phys(mem).write_u64(GuestPhysAddr(addr), p.rss_pages).map_err(|_| Error::Write(addr))?;
                Ok(0)
            }
            ClearRefs::Accessed | ClearRefs::AccessedAnon => {
                let mut zap = FrameSet::new(self.log.pages());
                let (mut changed, mut failed) = (0, None);
                let walked = self.walk(mem, p, 0, USER_TOP / 4096, &mut self.budget(), |leaf| {
                    if leaf.entry.contains(PteFlags::ACCESSED) {
                        match Self::write_entry(mem, leaf, leaf.entry.without(PteFlags::ACCESSED).0) {
                            Ok(()) => changed += 1,
                            Err(e) => _ = failed.get_or_insert(e),
                        }
                        zap.insert_leaf(frames(leaf));
                    }
                });
                // Zap what was edited even if the walk stopped early: KVM must re-read those.
                dirty_log::zap(mem, &zap)?;
                walked?;
                failed.map_or(Ok(changed), Err)
            }
            ClearRefs::SoftDirty => {
                self.log.harvest(vm, mem)?;
                let pte_engine = self.engine == EngineKind::Pte;
                // Every present frame, also for the pte engine: so that KVM re-reads the
                // edited PTEs, and a later write through a PTE the guest makes writable
                // again still shows in the log.
                let mut protect = FrameSet::new(self.log.pages());
                let (mut changed, mut leaves, mut failed) = (0, 0, None);
                let walked = self.walk(mem, p, 0, USER_TOP / 4096, &mut self.budget(), |leaf| {
                    leaves += 1;
                    protect.insert_leaf(frames(leaf));
                    if pte_engine {
                        let new = softdirty::clear(leaf.entry);
                        if new != leaf.entry {
                            match Self::write_entry(mem, leaf, new.0) {
                                Ok(()) => changed += 1,
                                Err(e) => _ = failed.get_or_insert(e),
                            }
                        }
                    }
                });
                // Even after a failed walk, KVM must re-read the entries already edited.
                self.log.clear(vm, &protect)?;
                walked?;
                if let Some(e) = failed {
                    return Err(e);
                }
                self.cleared.insert(pid, p.mappings.clone());
                *self.clear_counts.entry(pid).or_default() += 1;
                self.stats.clears += 1;
                self.stats.pages_write_protected += changed;
                if pte_engine {
                    self.arm(mem, vcpu)?;
                }
                Ok(if pte_engine { changed } else { leaves })
            }
        }
    }

    fn arm(&mut self, mem: &GuestMem, vcpu: &VcpuFd) -> Result<(), Error> {
        if self.trap.is_none() {
            let sregs = vcpu.get_sregs().map_err(|source| pf_trap::Error::Kvm { op: "GET_SREGS", source })?;
            let handler = pf_trap::find_handler(mem, &self.walker, &sregs)?;
            pf_trap::arm(vcpu, handler)?;
            self.trap = Some(handler);
        }
        Ok(())
    }

    /// Which frames live processes map more than once (for "exclusive").
    fn frame_counts(&self, mem: &GuestMem, snap: &Snapshot, budget: &mut TableBudget) -> Result<FrameCounts, Error> {
        let mut counts = FrameCounts::new(self.log.pages());
        for p in snap.processes.iter().filter(|p| p.is_live()) {
            self.walk(mem, p, 0, USER_TOP / 4096, budget, |leaf| counts.add(leaf.frame().pfn()))?;
        }
        Ok(counts)
    }

    /// Reads `/proc/PID/pagemap` for `pages` pages from `start`; `None` = every page of
    /// every mapping of the process.
    pub fn pagemap(&mut self, mem: &GuestMem, vm: &VmFd, pid: u32, range: Option<(u64, u64)>) -> Result<Vec<PageInfo>, Error> {
        let snap = self.snapshot(mem)?;
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
        self.log.harvest(vm, mem)?;
        let counts = self.frame_counts(mem, &snap, &mut self.budget())?;
        let page = PageCtx { tracker: self, zero_frame: snap.zero_frame, huge_zero_frame: snap.huge_zero_frame, counts: &counts };
        let mut out = Vec::with_capacity(total as usize);
        // Only the leaves of the requested pages: at most one per page, whatever the
        // rest of the address space holds.
        let mut budget = self.budget();
        for (start, pages) in ranges {
            let mut leaves = Vec::new();
            self.walk(mem, p, start, pages, &mut budget, |leaf| leaves.push(*leaf))?;
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
                // The VMA rule, once per segment: pages of this mapping that its
                // namesake at the last clear did not cover read soft-dirty.
                let old = m.map(|m| self.old_coverage(pid, m));
                let mut written_cache: Option<(usize, bool)> = None;
                while va < seg_end {
                    while li < leaves.len() && leaves[li].va.0 + leaves[li].size.bytes() <= va {
                        li += 1;
                    }
                    let leaf = leaves.get(li).filter(|l| l.va.0 <= va);
                    let vma_new = match &old {
                        None => false,
                        Some(pieces) => !pieces.iter().any(|&(s, e)| s <= va && va < e),
                    };
                    // One answer per leaf: a 2 MiB leaf shares it across its 512 pages.
                    let written = leaf.map(|l| match written_cache {
                        Some((i, w)) if i == li => w,
                        _ => {
                            let w = page.written(l);
                            written_cache = Some((li, w));
                            w
                        }
                    });
                    out.push(page.info(va, leaf, written.unwrap_or(false), vma_new));
                    va += 4096;
                }
            }
        }
        Ok(out)
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
    pub fn export_state(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "cleared": self.cleared.iter().map(|(pid, m)| (pid.to_string(), m.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "accumulated": self.log.accumulated(),
            "trap": self.trap,
        }))
        .expect("tracker state serializes")
    }

    /// Restores [`Self::export_state`] into a fresh tracker and re-arms the trap.
    pub fn import_state(&mut self, raw: &[u8], mem: &GuestMem, vcpu: &VcpuFd) -> Result<(), String> {
        #[derive(serde::Deserialize)]
        struct State {
            cleared: std::collections::BTreeMap<u32, Vec<Mapping>>,
            accumulated: Vec<u64>,
            trap: Option<u64>,
        }
        let st: State = serde_json::from_slice(raw).map_err(|e| format!("tracker state: {e}"))?;
        if !self.log.set_accumulated(st.accumulated) {
            return Err("tracker state: log size does not match the guest".into());
        }
        self.cleared = st.cleared.into_iter().collect();
        if st.trap.is_some() {
            self.trap = None;
            self.arm(mem, vcpu).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Starts a dirty-rate window.
    pub fn window_start(&mut self, mem: &GuestMem, vm: &VmFd) -> Result<(), Error> {
        Ok(self.log.window_start(vm, mem)?)
    }

    /// Pages written in the window: the whole VM, and per live process (frames of its
    /// present pages written in the window; a 2 MiB page counts its written 4 KiB frames).
    pub fn window_report(&mut self, mem: &GuestMem, vm: &VmFd) -> Result<(u64, Vec<(u32, String, u64)>), Error> {
        self.log.harvest(vm, mem)?;
        let total = self.log.window_count();
        let mut per = Vec::new();
        if let Ok(snap) = self.snapshot(mem) {
            let mut budget = self.budget();
            for p in snap.processes.iter().filter(|p| p.is_live()) {
                let mut mapped = FrameSet::new(self.log.pages());
                self.walk(mem, p, 0, USER_TOP / 4096, &mut budget, |leaf| mapped.insert_leaf(frames(leaf)))?;
                per.push((p.pid, p.name.clone(), mapped.count_in(self.log.window_words())));
            }
        }
        Ok((total, per))
    }

    /// Handles a debug exit. Returns what it was.
    pub fn on_debug_exit(&mut self, mem: &GuestMem, vcpu: &mut VcpuFd, pc: u64) -> Result<TrapOutcome, Error> {
        let Some(handler) = self.trap else { return Ok(TrapOutcome::NotOurs) };
        if self.stepping {
            // The guest's handler is past its first instruction: breakpoint back on.
            self.stepping = false;
            pf_trap::arm(vcpu, handler)?;
            return Ok(TrapOutcome::Passed);
        }
        if pc != handler {
            return Ok(TrapOutcome::NotOurs);
        }
        let t0 = std::time::Instant::now();
        let stopped = pf_trap::stopped(vcpu, mem, &self.walker, self.sync_regs)?;
        let t1 = std::time::Instant::now();
        self.stats.trap_read_ns += (t1 - t0).as_nanos() as u64;
        let f = stopped.fault;
        if f.is_user_write_protection() && f.addr < USER_TOP {
            if let Some(leaf) = self.leaf_at(mem, f.cr3, f.addr) {
                if softdirty::is_hypervisor_protected(leaf.entry) {
                    if self.guest_allows_write(mem, f.cr3, f.addr, &leaf) {
                        Self::write_entry(mem, &leaf, softdirty::restore_after_write(leaf.entry).0)?;
                        let t2 = std::time::Instant::now();
                        self.stats.trap_decide_ns += (t2 - t1).as_nanos() as u64;
                        pf_trap::return_to_user(vcpu, stopped, self.sync_regs)?;
                        self.stats.trap_resume_ns += t2.elapsed().as_nanos() as u64;
                        self.stats.faults_caught += 1;
                        return Ok(TrapOutcome::Caught);
                    }
                    // The guest will decide (kill, copy-on-write, ...); the write may
                    // happen, so count it as one.
                    Self::write_entry(mem, &leaf, softdirty::mark_written(leaf.entry).0)?;
                }
            }
        }
        pf_trap::step_over_handler_entry(vcpu)?;
        self.stepping = true;
        self.stats.faults_passed += 1;
        Ok(TrapOutcome::Passed)
    }

    fn leaf_at(&self, mem: &GuestMem, cr3: Cr3, va: u64) -> Option<Leaf> {
        match self.walker.translate(&Phys(mem), cr3.table(), GuestVirtAddr(va)) {
            Ok(Translation::Mapped { leaf, .. }) => Some(leaf),
            _ => None,
        }
    }

    /// The guest's own view: the mapping is writable and the page is not the shared
    /// zero frame (a write there is the guest's copy-on-write to handle).
    fn guest_allows_write(&self, mem: &GuestMem, cr3: Cr3, va: u64, leaf: &Leaf) -> bool {
        let Ok(snap) = self.snapshot(mem) else { return false };
        let Some(p) = snap.by_cr3(cr3) else { return false };
        let writable = p.mapping_at(va).is_some_and(|m| !m.read_only);
        let zero = leaf.frame().0 == snap.zero_frame || (snap.huge_zero_frame != 0 && leaf.frame().0 == snap.huge_zero_frame);
        writable && !zero && leaf.upper.contains(PteFlags::WRITABLE | PteFlags::USER)
    }
}

/// What one page's pagemap entry needs besides its leaf.
struct PageCtx<'a> {
    tracker: &'a Tracker,
    zero_frame: u64,
    huge_zero_frame: u64,
    counts: &'a FrameCounts,
}

impl PageCtx<'_> {
    /// The guest's shared zero page or huge zero page: never written, never exclusive.
    fn is_zero(&self, leaf: &Leaf) -> bool {
        let f = leaf.frame().0;
        f == self.zero_frame || (self.huge_zero_frame != 0 && f == self.huge_zero_frame)
    }

    /// Written since the last clear: the PTE says so, or it is writable (the guest gave
    /// W back itself, or the page appeared since) and the dirty log saw its frames written.
    fn written(&self, leaf: &Leaf) -> bool {
        let LeafFrames { pfn: pfn0, count } = frames(leaf);
        if self.tracker.engine.is_guest_physical() {
            // Guest-physical: the frame was written since the clear. The zero frame is
            // never written (the guest maps it read-only everywhere).
            return !self.is_zero(leaf) && self.tracker.log.any_dirty(pfn0, count);
        }
        // The backstop (the guest made the PTE writable itself, or the page appeared
        // since the clear): the frame was written since the clear, through this entry
        // (the CPU sets DIRTY on the first write; an entry never written through has it
        // clear). Not conditioned on WRITABLE: the guest may have made the page
        // read-only since, and mprotect must not lose soft-dirty (the Linux oracle
        // caught exactly that).
        softdirty::is_soft_dirty(leaf.entry)
            || (leaf.entry.contains(PteFlags::DIRTY) && self.tracker.log.any_dirty(pfn0, count))
    }

    fn info(&self, va: u64, leaf: Option<&Leaf>, written: bool, vma_new: bool) -> PageInfo {
        let Some(leaf) = leaf else {
            // Linux: a hole in a VMA reads soft-dirty when the VMA is.
            return PageInfo { addr: va, entry: PagemapEntry::none().with_soft_dirty(vma_new), huge: false, accessed: false };
        };
        let pfn0 = leaf.frame().pfn();
        let pfn = pfn0 + (va - leaf.va.0) / 4096;
        let exclusive = !self.is_zero(leaf) && self.counts.once(pfn0);
        PageInfo {
            addr: va,
            entry: PagemapEntry::present(pfn).with_soft_dirty(written || vma_new).with_exclusive(exclusive),
            huge: leaf.size != PageSize::Size4K,
            accessed: leaf.entry.contains(PteFlags::ACCESSED),
        }
    }
}

/// Two bitmaps over guest frames: mapped at least once, mapped more than once.
struct FrameCounts {
    once: Vec<u64>,
    more: Vec<u64>,
}

impl FrameCounts {
    fn new(pages: u64) -> Self {
        let words = pages.div_ceil(64) as usize;
        FrameCounts { once: vec![0; words], more: vec![0; words] }
    }

    fn add(&mut self, pfn: u64) {
        let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        if w < self.once.len() {
            if self.once[w] & b != 0 {
                self.more[w] |= b;
            }
            self.once[w] |= b;
        }
    }

    fn once(&self, pfn: u64) -> bool {
        let (w, b) = ((pfn / 64) as usize, 1u64 << (pfn % 64));
        w < self.once.len() && self.once[w] & b != 0 && self.more[w] & b == 0
    }
}

/// A pagemap range: page-aligned, non-empty, bounded, inside the user half.
pub fn check_range(start: u64, pages: u64) -> Result<(), Error> {
    if !start.is_multiple_of(4096) {
        return Err(Error::BadRange(format!("start {start:#x} is not page-aligned")));
    }
    if pages == 0 {
        return Err(Error::BadRange("page count is 0".into()));
    }
    if pages > MAX_PAGEMAP_PAGES {
        return Err(Error::BadRange(format!("{pages} pages exceed the limit of {MAX_PAGEMAP_PAGES} per request")));
    }
    let end = pages.checked_mul(4096).and_then(|l| l.checked_add(start));
    if end.is_none_or(|e| e > USER_TOP) {
        return Err(Error::BadRange(format!("{start:#x} + {pages} pages reaches outside the user half (below {USER_TOP:#x})")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clear_refs_values_follow_linux() {
        for (v, c) in [(1, ClearRefs::Accessed), (2, ClearRefs::AccessedAnon), (3, ClearRefs::AccessedFile),
            (4, ClearRefs::SoftDirty), (5, ClearRefs::PeakRss)] {
            assert_eq!(ClearRefs::try_from(v).unwrap(), c);
        }
        for v in [0, 6, 42, u64::MAX] {
            assert!(matches!(ClearRefs::try_from(v), Err(Error::BadValue(_))));
        }
    }

    #[test]
    fn ranges_are_checked() {
        assert!(check_range(0x400000, 1).is_ok());
        assert!(check_range(0x400001, 1).is_err());
        assert!(check_range(0x400000, 0).is_err());
        assert!(check_range(0x7fff_ffff_f000, 2).is_err());
        assert!(check_range(0xffff_8000_0000_0000, 1).is_err());
        assert!(check_range(0, MAX_PAGEMAP_PAGES + 1).is_err());
        assert!(check_range(0x1000, u64::MAX).is_err());
    }
}
