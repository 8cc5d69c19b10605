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

// ---------------------------------------------------------------------------------
// The tracker on plain memory: a hand-built guest (page tables and process table in a
// byte vector) and a dirty source the test drives. Each test plays the guest's part
// (the CPU's accessed/dirty bits, the kernel's table updates, the trap's faults) and
// checks what pagemap says, as Linux would.

use crate::tracking::ram::testing::{Manual, TestRam, Xorshift};
use guest_abi::{mapping_flags, state, MappingRecord};
use mmu::{Cr3, PageTableEntry};

const RAM: u64 = 8 << 20;
const TABLE: u64 = 0x10000;
const ZERO: u64 = 0x5000;
const HUGE_ZERO: u64 = 0x40_0000;
const PWU: PteFlags = PteFlags::PRESENT.union(PteFlags::WRITABLE).union(PteFlags::USER);

struct Proc {
    pid: u32,
    cr3: u64,
    maps: Vec<MappingRecord>,
}

/// The guest: its RAM, its processes, and a bump allocator for page-table pages.
struct Guest {
    ram: TestRam,
    procs: Vec<Proc>,
    next_table: u64,
    seq: u64,
    source: Manual,
}

impl Guest {
    fn new() -> Guest {
        let g = Guest { ram: TestRam::new(RAM), procs: Vec::new(), next_table: 0x20000, seq: 0, source: Manual::default() };
        g.ram.take_vmm_writes(&mut FrameSet::new(RAM / 4096));
        g
    }

    fn table_page(&mut self) -> u64 {
        let p = self.next_table;
        self.next_table += 4096;
        assert!(p < 0x10_0000, "test page tables overflow");
        p
    }

    fn spawn(&mut self, pid: u32) -> usize {
        let cr3 = self.table_page();
        self.procs.push(Proc { pid, cr3, maps: Vec::new() });
        self.publish();
        self.procs.len() - 1
    }

    /// The entry for `va` at `level` (4 = PML4 ... 1 = PT), making tables on the way.
    fn entry_addr(&mut self, cr3: u64, va: u64, leaf_level: u32) -> u64 {
        let mut table = cr3;
        for level in (leaf_level + 1..=4).rev() {
            let idx = (va >> (12 + 9 * (level - 1))) & 511;
            let e = self.ram.get(table + idx * 8);
            table = if e & 1 == 0 {
                let t = self.table_page();
                self.ram.guest_write_u64(table + idx * 8, t | PWU.bits());
                t
            } else {
                e & 0x000f_ffff_ffff_f000
            };
        }
        table + ((va >> (12 + 9 * (leaf_level - 1))) & 511) * 8
    }

    fn set_pte(&mut self, p: usize, va: u64, frame: u64, flags: PteFlags) {
        let a = self.entry_addr(self.procs[p].cr3, va, 1);
        self.ram.guest_write_u64(a, frame | flags.bits());
    }

    fn set_huge_pte(&mut self, p: usize, va: u64, frame: u64, flags: PteFlags) {
        let a = self.entry_addr(self.procs[p].cr3, va, 2);
        self.ram.guest_write_u64(a, frame | (flags | PteFlags::HUGE).bits());
    }

    fn pte(&mut self, p: usize, va: u64) -> PageTableEntry {
        let a = self.entry_addr(self.procs[p].cr3, va, 1);
        PageTableEntry(self.ram.get(a))
    }

    /// The guest's mprotect of one page: W off, every other bit (ours too) kept.
    fn make_read_only(&mut self, p: usize, va: u64) {
        let a = self.entry_addr(self.procs[p].cr3, va, 1);
        self.ram.guest_write_u64(a, self.ram.get(a) & !PteFlags::WRITABLE.bits());
    }

    fn map(&mut self, p: usize, start: u64, pages: u64, flags: u32, serial: u64) {
        self.procs[p].maps.push(MappingRecord { start, pages, flags, _pad: 0, serial });
        self.procs[p].maps.sort_by_key(|m| m.start);
        self.publish();
    }

    /// Writes the process table as the guest kernel does, bumping its sequence number.
    fn publish(&mut self) {
        let mut t = ProcessTable::with_header();
        t.nprocs = self.procs.len() as u32;
        t.zero_frame = ZERO;
        t.huge_zero_frame = HUGE_ZERO;
        self.seq += 2;
        t.seq = self.seq;
        for (slot, p) in self.procs.iter().enumerate() {
            let s = &mut t.procs[slot];
            s.pid = p.pid;
            s.state = state::RUNNABLE;
            s.name[..1].copy_from_slice(b"p");
            s.cr3 = p.cr3;
            s.nmappings = p.maps.len() as u32;
            s.mappings[..p.maps.len()].copy_from_slice(&p.maps);
        }
        self.ram.guest_write_bytes(TABLE, t.as_bytes());
    }

    /// A guest write to `va` of process `p`, as the CPU and the trap see it: through a
    /// PTE the VMM write-protected it faults first (the trap decides); through a writable
    /// one the CPU sets accessed and dirty, and the frame shows in the dirty source.
    /// Returns whether the write went through without the guest's fault handler.
    fn write(&mut self, tracker: &mut Tracker, p: usize, va: u64) -> bool {
        let mut e = self.pte(p, va);
        if !e.contains(PteFlags::WRITABLE) {
            let cr3 = self.procs[p].cr3;
            if !tracker.on_fault(&self.ram, Cr3(cr3), va, true).unwrap() {
                return false;
            }
            e = self.pte(p, va);
        }
        let frame = e.0 & 0x000f_ffff_ffff_f000;
        let a = self.entry_addr(self.procs[p].cr3, va, 1);
        self.ram.guest_write_u64(a, e.0 | (PteFlags::ACCESSED | PteFlags::DIRTY).bits());
        self.source.write(frame / 4096, 1);
        true
    }

    fn tracker(&self, engine: EngineKind) -> Tracker {
        let log = GpaLog::new(RAM, Box::new(self.source.clone()), engine.initially_dirty());
        Tracker::new(Some(TableLocation { phys: TABLE }), engine, log, false)
    }
}

/// Soft-dirty bits of `pages` pages from `start`, as a string of 0/1.
fn sd(t: &mut Tracker, g: &Guest, pid: u32, start: u64, pages: u64) -> String {
    t.pagemap(&g.ram, pid, Some((start, pages))).unwrap().iter().map(|p| if p.entry.soft_dirty() { '1' } else { '0' }).collect()
}

fn clear(t: &mut Tracker, g: &Guest, pid: u32) {
    t.clear_refs_in(&g.ram, pid, ClearRefs::SoftDirty).unwrap();
}

const A: u64 = 0x40_0000;
const F: u64 = 0x20_0000; // data frames from 2 MiB

/// One process with 4 present writable pages at A (frames F..) and a 5th page unpopulated.
fn one_process() -> (Guest, usize) {
    let mut g = Guest::new();
    let p = g.spawn(1);
    g.map(p, A, 5, 0, 1);
    for i in 0..4 {
        g.set_pte(p, A + i * 4096, F + i * 4096, PWU);
    }
    (g, p)
}

/// [`one_process`] with a tracker for `engine`, just after a soft-dirty clear of pid 1.
fn cleared_process(engine: EngineKind) -> (Guest, usize, Tracker) {
    let (g, p) = one_process();
    let mut t = g.tracker(engine);
    clear(&mut t, &g, 1);
    (g, p, t)
}

#[test]
fn after_a_clear_exactly_the_written_pages_read_soft_dirty_and_writes_never_reach_the_guest_handler() {
    for engine in EngineKind::ALL {
        let (mut g, p) = one_process();
        let mut t = g.tracker(engine);
        if engine.initially_dirty() {
            assert_eq!(sd(&mut t, &g, 1, A, 5), "11111", "{engine:?}: never cleared: all new, holes too");
        }
        clear(&mut t, &g, 1);
        assert_eq!(sd(&mut t, &g, 1, A, 5), "00000", "{engine:?}");
        if engine.traps_ptes() {
            assert!(softdirty::is_hypervisor_protected(g.pte(p, A)), "the clear write-protected the PTE");
        }
        assert!(g.write(&mut t, p, A + 4096));
        assert!(g.write(&mut t, p, A + 3 * 4096));
        assert_eq!(sd(&mut t, &g, 1, A, 5), "01010", "{engine:?}");
        // A second clear forgets them.
        clear(&mut t, &g, 1);
        assert_eq!(sd(&mut t, &g, 1, A, 5), "00000", "{engine:?}");
    }
}

#[test]
fn mprotect_after_a_write_keeps_soft_dirty() {
    for engine in EngineKind::ALL {
        let (mut g, p, mut t) = cleared_process(engine);
        assert!(g.write(&mut t, p, A));
        // The guest makes the whole mapping read-only (one record, the same serial).
        g.procs[p].maps[0].flags = mapping_flags::READ_ONLY;
        g.publish();
        for i in 0..4 {
            g.make_read_only(p, A + i * 4096);
        }
        assert_eq!(sd(&mut t, &g, 1, A, 5), "10000", "{engine:?}: Linux keeps soft-dirty across mprotect");
    }
}

#[test]
fn a_page_populated_by_a_write_after_the_clear_is_soft_dirty_and_one_populated_by_a_read_is_not() {
    for engine in EngineKind::ALL {
        let (mut g, p, mut t) = cleared_process(engine);
        // The guest's fault handler populates page 4 on a write: a fresh writable PTE,
        // written through (the CPU sets dirty), then the guest mprotects it read-only.
        g.set_pte(p, A + 4 * 4096, F + 4 * 4096, PWU);
        assert!(g.write(&mut t, p, A + 4 * 4096));
        g.make_read_only(p, A + 4 * 4096);
        assert_eq!(sd(&mut t, &g, 1, A + 4 * 4096, 1), "1", "{engine:?}");
        // A read fault maps the shared zero page: never written.
        let (mut g2, _, mut t2) = cleared_process(engine);
        g2.set_pte(0, A + 4 * 4096, ZERO, PteFlags::PRESENT | PteFlags::USER | PteFlags::ACCESSED);
        g2.source.write(ZERO / 4096, 1); // even if the frame shows in the log
        let pm = t2.pagemap(&g2.ram, 1, Some((A + 4 * 4096, 1))).unwrap();
        assert!(!pm[0].entry.soft_dirty() && !pm[0].entry.exclusive(), "{engine:?}: zero page {:?}", pm[0]);
    }
}

#[test]
fn new_and_grown_mappings_read_soft_dirty_but_split_ones_do_not() {
    for engine in EngineKind::ALL {
        let (mut g, p, mut t) = cleared_process(engine);
        // Split (as mprotect of a part does): two records with the same serial.
        g.procs[p].maps[0].pages = 2;
        g.map(p, A + 2 * 4096, 3, mapping_flags::READ_ONLY, 1);
        // A new mapping after the clear, unpopulated, and one grown from the old end.
        g.map(p, A + 16 * 4096, 2, 0, 2);
        assert_eq!(sd(&mut t, &g, 1, A, 5), "00000", "{engine:?}: splitting is not writing");
        assert_eq!(sd(&mut t, &g, 1, A + 16 * 4096, 2), "11", "{engine:?}: a new VMA is soft-dirty, holes too");
        g.procs[p].maps[1].pages = 4; // grows over A+5 pages
        g.publish();
        assert_eq!(sd(&mut t, &g, 1, A + 4 * 4096, 2), "01", "{engine:?}: only the grown part");
        // A hole between mappings is not a page of any mapping: never soft-dirty.
        assert_eq!(sd(&mut t, &g, 1, A + 10 * 4096, 1), "0", "{engine:?}");
    }
}

#[test]
fn a_huge_zero_page_is_never_written_and_a_written_huge_page_is_dirty_in_all_its_pages() {
    for engine in EngineKind::ALL {
        let mut g = Guest::new();
        let p = g.spawn(1);
        let h = 0x4000_0000;
        g.map(p, h, 1024, mapping_flags::HUGE, 1);
        g.set_huge_pte(p, h, HUGE_ZERO, PteFlags::PRESENT | PteFlags::USER);
        g.set_huge_pte(p, h + (2 << 20), 0x60_0000, PWU);
        let mut t = g.tracker(engine);
        clear(&mut t, &g, 1);
        g.source.write(HUGE_ZERO / 4096, 512);
        // A 4 KiB write into the second huge page dirties all of its 512 entries.
        let a = g.entry_addr(g.procs[p].cr3, h + (2 << 20), 2);
        let e = PageTableEntry(g.ram.get(a));
        if engine.traps_ptes() {
            assert!(t.on_fault(&g.ram, Cr3(g.procs[p].cr3), h + (2 << 20) + 0x3000, true).unwrap());
        }
        g.ram.guest_write_u64(a, g.ram.get(a) | (PteFlags::DIRTY | PteFlags::WRITABLE).bits());
        g.source.write(0x60_0000 / 4096 + 3, 1);
        let pm = t.pagemap(&g.ram, 1, Some((h, 1024))).unwrap();
        assert!(pm[..512].iter().all(|p| !p.entry.soft_dirty() && !p.entry.exclusive() && p.huge), "{engine:?}");
        assert!(pm[512..].iter().all(|p| p.entry.soft_dirty() && p.entry.exclusive() && p.huge), "{engine:?} {e:?}");
        assert_eq!(pm[512 + 7].entry.pfn(), Some(0x60_0000 / 4096 + 7));
    }
}

#[test]
fn frames_two_processes_map_are_not_exclusive_and_guest_physical_engines_over_report_them() {
    for engine in EngineKind::ALL {
        let mut g = Guest::new();
        let (a, b) = (g.spawn(1), g.spawn(2));
        g.map(a, A, 2, mapping_flags::SHARED, 1);
        g.map(b, A, 2, mapping_flags::SHARED, 2);
        for p in [a, b] {
            g.set_pte(p, A, F, PWU);
            g.set_pte(p, A + 4096, F + 4096 * (1 + p as u64), PWU);
        }
        let mut t = g.tracker(engine);
        clear(&mut t, &g, 1);
        clear(&mut t, &g, 2);
        assert!(g.write(&mut t, a, A));
        let pa = t.pagemap(&g.ram, 1, Some((A, 2))).unwrap();
        let pb = t.pagemap(&g.ram, 2, Some((A, 2))).unwrap();
        assert!(!pa[0].entry.exclusive() && pa[1].entry.exclusive(), "{engine:?}");
        assert!(pa[0].entry.soft_dirty(), "{engine:?}");
        // The write went through a's PTE: pte and hybrid know b's page was not written; a
        // guest-physical engine only knows the frame was.
        assert_eq!(pb[0].entry.soft_dirty(), !engine.reads_ptes(), "{engine:?}");
    }
}

/// Pids 1 and 2, each with one shared page at A on frame F.
fn two_sharing_a_frame() -> (Guest, usize, usize) {
    let mut g = Guest::new();
    let (a, b) = (g.spawn(1), g.spawn(2));
    g.map(a, A, 1, mapping_flags::SHARED, 1);
    g.map(b, A, 1, mapping_flags::SHARED, 2);
    for p in [a, b] {
        g.set_pte(p, A, F, PWU);
    }
    (g, a, b)
}

#[test]
fn another_processes_clear_of_a_shared_frame_does_not_lose_this_ones_write() {
    for engine in EngineKind::ALL {
        let (mut g, a, _) = two_sharing_a_frame();
        let mut t = g.tracker(engine);
        clear(&mut t, &g, 1);
        assert!(g.write(&mut t, a, A));
        // b's clear re-protects the frame a wrote, and takes its bit out of the log.
        clear(&mut t, &g, 2);
        let pa = t.pagemap(&g.ram, 1, Some((A, 1))).unwrap();
        let pb = t.pagemap(&g.ram, 2, Some((A, 1))).unwrap();
        assert!(pa[0].entry.soft_dirty(), "{engine:?}: a wrote its page after its own clear");
        // b cleared after the write: clean per PTE; a guest-physical engine keeps the
        // frame's bit for a, so b over-reports it (more than Linux, never less).
        assert_eq!(pb[0].entry.soft_dirty(), !engine.reads_ptes(), "{engine:?}: b cleared after the write");
    }
}

#[test]
fn the_trap_never_grants_a_write_the_guest_forbids_and_rereads_the_table_only_when_it_changed() {
    let (mut g, p, mut t) = cleared_process(EngineKind::Pte);
    assert!(g.write(&mut t, p, A));
    assert!(g.write(&mut t, p, A + 4096));
    assert_eq!(t.stats.trap_table_reads, 1, "one parse for two faults");
    // The guest makes the mapping read-only in its table (not yet in the PTEs): the
    // trap must see it, since the sequence number moved.
    g.procs[p].maps[0].flags = mapping_flags::READ_ONLY;
    g.publish();
    assert!(!g.write(&mut t, p, A + 2 * 4096), "the guest's handler gets the fault");
    assert_eq!(t.stats.trap_table_reads, 2);
    let e = g.pte(p, A + 2 * 4096);
    assert!(!e.contains(PteFlags::WRITABLE) && softdirty::is_soft_dirty(e), "recorded as written, W not given back");
    // Faults that are not the VMM's: kernel addresses, non-protection faults.
    assert!(!t.on_fault(&g.ram, Cr3(g.procs[p].cr3), 0xffff_8000_0000_0000, true).unwrap());
    assert!(!t.on_fault(&g.ram, Cr3(g.procs[p].cr3), A + 3 * 4096, false).unwrap());
}

#[test]
fn clearing_accessed_bits_zaps_the_frames_and_peak_rss_is_reset() {
    let (mut g, p) = one_process();
    let mut t = g.tracker(EngineKind::Pte);
    for i in 0..2 {
        let e = g.pte(p, A + i * 4096);
        g.set_pte(p, A + i * 4096, F + i * 4096, PteFlags::from_bits_retain(e.0 & 0xfff) | PteFlags::ACCESSED);
    }
    assert_eq!(t.clear_refs_in(&g.ram, 1, ClearRefs::Accessed).unwrap(), 2);
    assert!(!g.pte(p, A).contains(PteFlags::ACCESSED));
    assert_eq!(*g.ram.zapped.borrow(), 2, "KVM must re-read both entries");
    assert_eq!(t.clear_refs_in(&g.ram, 1, ClearRefs::PeakRss).unwrap(), 0);
    assert!(matches!(t.clear_refs_in(&g.ram, 9, ClearRefs::SoftDirty), Err(Error::UnknownPid(9))));
}

#[test]
fn the_vmm_own_writes_count_for_guest_physical_engines() {
    let (g, _, mut t) = cleared_process(EngineKind::KvmBitmap);
    g.ram.vmm_wrote(F / 4096 + 2); // e.g. the zeroing port
    assert_eq!(sd(&mut t, &g, 1, A, 4), "0010");
}

#[test]
fn the_saved_state_restores_what_pagemap_says() {
    let (mut g, p, mut t) = cleared_process(EngineKind::Pte);
    assert!(g.write(&mut t, p, A));
    g.source.write(F / 4096 + 1, 1);
    let before = t.pagemap(&g.ram, 1, Some((A, 5))).unwrap();
    let raw = t.export_state();
    let json: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert!(json["cleared"]["1"].is_array(), "pids are JSON object keys, as before: {json}");
    let mut fresh = g.tracker(EngineKind::Pte);
    fresh.restore_state(serde_json::from_slice(&raw).unwrap()).unwrap();
    assert_eq!(fresh.pagemap(&g.ram, 1, Some((A, 5))).unwrap(), before);
    assert!(fresh.restore_state(TrackerState { accumulated: vec![0; 3], ..t.save_state() }).is_err(), "wrong RAM size");
}

#[test]
fn a_store_the_vmm_makes_for_the_guest_reads_written_under_every_engine() {
    for engine in EngineKind::ALL {
        let (g, p, mut t) = cleared_process(engine);
        // A `read` into the program's buffer: the VMM writes the frame, no CPU sets a bit.
        g.ram.vmm_wrote(F / 4096 + 2);
        t.note_store(&g.ram, Cr3(g.procs[p].cr3), A + 2 * 4096 + 100, 200).unwrap();
        assert_eq!(sd(&mut t, &g, 1, A, 5), "00100", "{engine:?}");
    }
}

fn scan_clear(t: &mut Tracker, g: &Guest, pid: u32, start: u64, end: u64) -> scan::Scan {
    let req = scan::ScanRequest { start, end, written_only: false, clear: true, max_regions: scan::MAX_SCAN_REGIONS };
    t.pagemap_scan(&g.ram, pid, &req).unwrap()
}

#[test]
fn a_clear_of_a_range_clears_it_alone_and_keeps_what_frames_mapped_outside_it_read() {
    const C: u64 = A + 0x10_0000;
    for engine in EngineKind::ALL {
        let (mut g, p, mut t) = cleared_process(engine);
        // The frame of page A mapped a second time, outside the range to clear.
        g.map(p, C, 1, mapping_flags::SHARED, 2);
        g.set_pte(p, C, F, PWU);
        clear(&mut t, &g, 1);
        assert!(g.write(&mut t, p, A));
        assert!(g.write(&mut t, p, A + 3 * 4096));
        let before = sd(&mut t, &g, 1, C, 1);
        assert_eq!(before, if engine.reads_ptes() { "0" } else { "1" }, "{engine:?}: C's PTE was not written, its frame was");
        let s = scan_clear(&mut t, &g, 1, A, A + 2 * 4096);
        assert_eq!((s.walk_end, s.pages_scanned), (A + 2 * 4096, 2), "{engine:?}");
        // Only the range is cleared; a guest-physical engine keeps A's frame written for
        // C, and so for A too (more than Linux, never less).
        let want = if engine.reads_ptes() { "00010" } else { "10010" };
        assert_eq!(sd(&mut t, &g, 1, A, 5), want, "{engine:?}: only the range is cleared");
        assert_eq!(sd(&mut t, &g, 1, C, 1), before, "{engine:?}: a frame mapped outside the range keeps its bit");
        assert_eq!(t.clears_of(1), 3, "a range clear counts as a clear (dump chains)");
    }
}

#[test]
fn a_clear_of_part_of_a_new_mapping_makes_only_that_part_old() {
    const B: u64 = 0x80_0000;
    for engine in EngineKind::ALL {
        let (mut g, p, mut t) = cleared_process(engine);
        g.map(p, B, 8, 0, 2);
        assert_eq!(sd(&mut t, &g, 1, B, 8), "11111111", "{engine:?}: new since the clear");
        scan_clear(&mut t, &g, 1, B + 2 * 4096, B + 5 * 4096);
        assert_eq!(sd(&mut t, &g, 1, B, 8), "11000111", "{engine:?}");
        scan_clear(&mut t, &g, 1, B + 4 * 4096, B + 8 * 4096);
        assert_eq!(sd(&mut t, &g, 1, B, 8), "11000000", "{engine:?}: pieces merge");
        // A whole clear replaces the pieces.
        clear(&mut t, &g, 1);
        assert_eq!(sd(&mut t, &g, 1, B, 8), "00000000", "{engine:?}");
    }
}

#[test]
fn a_clear_after_a_write_to_a_shared_frame_leaves_the_page_clean_per_pte() {
    for engine in EngineKind::ALL {
        let (mut g, a, _) = two_sharing_a_frame();
        let mut t = g.tracker(engine);
        clear(&mut t, &g, 1);
        clear(&mut t, &g, 2);
        assert!(g.write(&mut t, a, A));
        // a clears again: the frame's log bit stays for b, but a's PTE is protected
        // and not written since (pte: its old Dirty bit is no evidence).
        clear(&mut t, &g, 1);
        assert_eq!(sd(&mut t, &g, 1, A, 1), if engine.reads_ptes() { "0" } else { "1" }, "{engine:?}");
        assert_eq!(sd(&mut t, &g, 2, A, 1), if engine.reads_ptes() { "0" } else { "1" },
            "{engine:?}: b's PTE was never written; its frame was");
    }
}

/// Issue #14's fall-back cases for a join of frames and page tables: a frame written,
/// unmapped, zeroed by the VMM and mapped by another process before the read. Every
/// engine says what the new mapping did (written: soft-dirty, never clean); the
/// per-PTE engines do not take the frame's history for the new page's.
#[test]
fn a_frame_written_freed_zeroed_and_mapped_by_another_process_reads_as_the_new_mapping_did() {
    for engine in EngineKind::ALL {
        let mut g = Guest::new();
        let (a, b) = (g.spawn(1), g.spawn(2));
        g.map(a, A, 1, 0, 1);
        g.set_pte(a, A, F, PWU);
        g.map(b, A, 2, 0, 2); // not populated yet
        let mut t = g.tracker(engine);
        clear(&mut t, &g, 1);
        clear(&mut t, &g, 2);
        assert!(g.write(&mut t, a, A));
        // a unmaps: its PTE and mapping go, the kernel frees F and the VMM zeroes it.
        g.set_pte(a, A, 0, PteFlags::empty());
        g.procs[a].maps.clear();
        g.publish();
        g.ram.vmm_wrote(F / 4096);
        // b's write fault gets F (a fresh PTE), and the write goes through it.
        g.set_pte(b, A, F, PWU);
        assert!(g.write(&mut t, b, A));
        // A second recycled, VMM-zeroed frame mapped into b without a write.
        g.ram.vmm_wrote(F / 4096 + 1);
        g.set_pte(b, A + 4096, F + 4096, PWU);
        assert_eq!(sd(&mut t, &g, 2, A, 2), if engine.reads_ptes() { "10" } else { "11" }, "{engine:?}");
        let gone = t.pagemap(&g.ram, 1, Some((A, 1))).unwrap()[0];
        assert!(!gone.entry.is_present() && !gone.entry.soft_dirty(), "{engine:?}: a's unmapped page: {gone:?}");
    }
}

/// Regions folded from pagemap's pages inside `maps`, the reference for pagemap-scan
/// (which, like Linux's, reports no page outside every mapping).
fn regions_of(pages: &[PageInfo], maps: &[MappingRecord], written_only: bool) -> Vec<scan::Region> {
    let mapped = |va: u64| maps.iter().any(|m| m.start <= va && va < m.start + m.pages * 4096);
    join(pages.iter().filter(|p| mapped(p.addr) && (!written_only || p.entry.soft_dirty())).map(|p| scan::Region {
        start: p.addr,
        end: p.addr + 4096,
        written: p.entry.soft_dirty(),
        present: p.entry.is_present(),
        file_shared: p.entry.file_or_shared(),
        huge: p.huge,
    }))
}

/// Regions in address order, joined where one ends at the next's start with equal flags.
fn join(rs: impl IntoIterator<Item = scan::Region>) -> Vec<scan::Region> {
    let mut out: Vec<scan::Region> = Vec::new();
    for r in rs {
        match out.last_mut() {
            Some(l) if l.end == r.start && (l.written, l.present, l.file_shared, l.huge) == (r.written, r.present, r.file_shared, r.huge) => {
                l.end = r.end
            }
            _ => out.push(r),
        }
    }
    out
}

/// pagemap-scan tests page-table entries in place; pagemap builds each page's entry.
/// On random guests (4 KiB and 2 MiB pages, the zero frames, shared mappings, holes,
/// pages written, made read-only, VMM stores, whole and range clears) the two agree
/// region for region, under every engine, also when a scan is cut into many requests
/// by a small `max_regions`.
#[test]
fn pagemap_scan_agrees_with_pagemap_on_random_guests() {
    let mut rng = Xorshift(0x2545_f491_4f6c_dd1d);
    let mut rnd = move |n: u64| rng.below(n);
    const B: u64 = 0x80_0000; // a 2 MiB-aligned mapping
    // Not a multiple of 8: the scan passes over clean entries eight at a time, and the
    // mapping new since the clears starts right after this one.
    const N: u64 = 37;
    // Entries a hostile guest may write: bits of a written page on a non-present entry,
    // a present one with an address bit above MAXPHYADDR (40 bits here: malformed, a
    // hole), a frame past the end of RAM.
    let sd = PteFlags::DIRTY | PteFlags::HV_SOFT_DIRTY;
    let odd = [(F, sd), (1 << 45, PWU | sd), (1 << 30, PWU | PteFlags::DIRTY), (F, PteFlags::PRESENT | sd)];
    for round in 0..40 {
        for engine in EngineKind::ALL {
            let mut g = Guest::new();
            let p = g.spawn(1);
            let shared = if round % 3 == 0 { mapping_flags::SHARED } else { 0 };
            g.map(p, A, N, shared, 1);
            g.map(p, B, 1024, 0, 2);
            for i in 0..N {
                match rnd(8) {
                    0 => {}
                    1 => g.set_pte(p, A + i * 4096, ZERO, PteFlags::PRESENT | PteFlags::USER),
                    2 => {
                        let (frame, flags) = odd[rnd(odd.len() as u64) as usize];
                        g.set_pte(p, A + i * 4096, frame + i * 4096, flags);
                    }
                    _ => g.set_pte(p, A + i * 4096, F + i * 4096, PWU),
                }
            }
            g.set_huge_pte(p, B, 0x60_0000, PWU);
            if rnd(2) == 0 {
                g.set_huge_pte(p, B + 0x20_0000, HUGE_ZERO, PteFlags::PRESENT | PteFlags::USER);
            }
            let mut t = g.tracker(engine);
            t.walker = Walker::new(PagingMode::Level4).with_max_phys_bits(40);
            for step in 0..4 {
                match rnd(3) {
                    0 => clear(&mut t, &g, 1),
                    1 => {
                        let s = A + rnd(N) * 4096;
                        scan_clear(&mut t, &g, 1, s, s + (1 + rnd(8)) * 4096);
                    }
                    _ => {}
                }
                for _ in 0..rnd(12) {
                    let va = A + rnd(N) * 4096;
                    if g.pte(p, va).is_present() && g.pte(p, va).0 & 0x000f_ffff_ffff_f000 < RAM && g.pte(p, va).0 & !0xfff != ZERO {
                        match rnd(5) {
                            0 => g.make_read_only(p, va),
                            1 => {
                                let frame = g.pte(p, va).0 & 0x000f_ffff_ffff_f000;
                                g.ram.vmm_wrote(frame / 4096);
                            }
                            // The VMM's store on the guest's behalf: soft-dirty without Dirty.
                            2 => t.note_store(&g.ram, Cr3(g.procs[p].cr3), va + 8, 16).unwrap(),
                            _ => _ = g.write(&mut t, p, va),
                        }
                    }
                }
                if step == 2 {
                    g.map(p, A + N * 4096, 4, 0, 3); // a mapping new since the clears
                }
                let (start, end) = (A - 4096, B + 1024 * 4096);
                let pages = t.pagemap(&g.ram, 1, Some((start, (end - start) / 4096))).unwrap();
                for written_only in [false, true] {
                    let want = regions_of(&pages, &g.procs[p].maps, written_only);
                    let whole = scan::ScanRequest { start, end, written_only, clear: false, max_regions: scan::MAX_SCAN_REGIONS };
                    let s = t.pagemap_scan(&g.ram, 1, &whole).unwrap();
                    assert_eq!((s.regions.as_slice(), s.walk_end), (want.as_slice(), end), "{engine:?} round {round}");
                    // In requests of at most 2 regions, going on from walk_end.
                    let (mut got, mut at) = (Vec::new(), start);
                    while at < end {
                        let s = t.pagemap_scan(&g.ram, 1, &scan::ScanRequest { start: at, max_regions: 2, ..whole }).unwrap();
                        assert!(s.walk_end > at && s.regions.len() <= 2, "{engine:?}: a request makes progress");
                        got.extend(s.regions);
                        at = s.walk_end;
                    }
                    assert_eq!(join(got), want, "{engine:?} round {round}: cut into requests");
                }
            }
        }
    }
}

