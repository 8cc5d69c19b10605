//! Randomized differential test of every engine against a model of Linux soft-dirty.
//!
//! A seeded generator writes a random workload (map/unmap/protect/fill/touch over small
//! and huge mappings, syncs with or without a clear) and, step by step, a model of what
//! Linux would report: a page is soft-dirty if it was written since the last clear, or
//! its mapping is new since then (or nothing was ever cleared). At every sync the host
//! reads the raw pagemap of the whole region. The pte engine must equal the model
//! exactly; guest-physical engines must contain every page the model reports.

mod common;
use common::*;
use std::collections::{BTreeMap, HashMap};

const BASE: u64 = 0x4000_0000;
const SLOTS: u64 = 6;
const SLOT_PAGES: u64 = 32;
const SLOT_STRIDE: u64 = 0x20_0000;
const HUGE_BASE: u64 = BASE + 0x100_0000;
const HUGE_PAGES: u64 = 1024; // two 2 MiB pages
const REGION_PAGES: u64 = (HUGE_BASE - BASE) / 4096 + HUGE_PAGES;


#[derive(Clone, Copy)]
struct Page {
    serial: u64,
    ro: bool,
    huge: bool,
    written: bool,
}

#[derive(Default)]
struct Model {
    pages: BTreeMap<u64, Page>,
    at_clear: HashMap<u64, u64>,
    ever_cleared: bool,
    serial: u64,
}

impl Model {
    fn all_mapped(&self, addr: u64, n: u64, writable: bool) -> bool {
        (0..n).all(|i| self.pages.get(&(addr + i * 4096)).is_some_and(|p| !writable || !p.ro))
    }
    fn map(&mut self, addr: u64, n: u64, ro: bool, huge: bool) {
        self.serial += 1;
        let s = self.serial;
        for i in 0..n {
            self.pages.insert(addr + i * 4096, Page { serial: s, ro, huge, written: false });
        }
        // Like Linux merging VMAs (and the guest kernel): an adjacent mapping with the same
        // rights joins the new one, and the whole merged mapping counts as new.
        for (mut va, step) in [(addr.wrapping_sub(4096), -4096i64), (addr + n * 4096, 4096)] {
            let Some(first) = self.pages.get(&va).copied() else { continue };
            if first.ro != ro || first.huge != huge {
                continue;
            }
            while let Some(p) = self.pages.get_mut(&va) {
                if p.serial != first.serial || p.ro != ro || p.huge != huge {
                    break;
                }
                p.serial = s;
                va = va.wrapping_add(step as u64);
            }
        }
    }
    fn unmap(&mut self, addr: u64, n: u64) {
        for i in 0..n {
            self.pages.remove(&(addr + i * 4096));
        }
    }
    fn protect(&mut self, addr: u64, n: u64, ro: bool) {
        for i in 0..n {
            self.pages.get_mut(&(addr + i * 4096)).unwrap().ro = ro;
        }
    }
    fn fill(&mut self, addr: u64, n: u64) {
        for i in 0..n {
            let va = addr + i * 4096;
            if self.pages[&va].huge {
                // One write dirties the whole 2 MiB page.
                let chunk = va & !0x1f_ffff;
                for j in 0..512 {
                    self.pages.get_mut(&(chunk + j * 4096)).unwrap().written = true;
                }
            } else {
                self.pages.get_mut(&va).unwrap().written = true;
            }
        }
    }
    fn clear(&mut self) {
        self.at_clear = self.pages.iter().map(|(va, p)| (*va, p.serial)).collect();
        self.pages.values_mut().for_each(|p| p.written = false);
        self.ever_cleared = true;
    }
    fn expected(&self) -> Vec<bool> {
        (0..REGION_PAGES)
            .map(|i| {
                let va = BASE + i * 4096;
                self.pages.get(&va).is_some_and(|p| {
                    p.written || !self.ever_cleared || self.at_clear.get(&va) != Some(&p.serial)
                })
            })
            .collect()
    }
}

struct Scenario {
    script: String,
    /// Per sync: expected soft-dirty bits, then whether the host clears.
    checks: Vec<(Vec<bool>, bool)>,
}

fn generate(seed: u64) -> Scenario {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut m = Model::default();
    let mut script = String::from("proc rnd\n");
    let mut checks = Vec::new();
    for _ in 0..40 {
        let slot = BASE + rng.below(SLOTS) * SLOT_STRIDE;
        let first = rng.below(SLOT_PAGES);
        let n = 1 + rng.below(SLOT_PAGES - first);
        let addr = slot + first * 4096;
        match rng.below(11) {
            0 | 1 => {
                let ro = rng.below(5) == 0;
                script += &format!("map {addr:#x} {n}{}\n", if ro { " ro" } else { "" });
                m.map(addr, n, ro, false);
            }
            2 => {
                script += &format!("unmap {addr:#x} {n}\n");
                m.unmap(addr, n);
            }
            3 if m.all_mapped(addr, n, false) => {
                let ro = rng.below(2) == 0;
                script += &format!("protect {addr:#x} {n} {}\n", if ro { "ro" } else { "rw" });
                m.protect(addr, n, ro);
            }
            4 | 5 if m.all_mapped(addr, n, true) => {
                script += &format!("fill {addr:#x} {n} {}\n", rng.below(256));
                m.fill(addr, n);
            }
            6 if m.all_mapped(addr, n, false) => script += &format!("touch {addr:#x} {n}\n"),
            7 => {
                // Huge pages: map both, unmap or protect one whole, or write a 4 KiB piece.
                let which = HUGE_BASE + rng.below(2) * 0x20_0000;
                match rng.below(4) {
                    0 => {
                        script += &format!("map {HUGE_BASE:#x} {HUGE_PAGES} huge\n");
                        m.map(HUGE_BASE, HUGE_PAGES, false, true);
                    }
                    1 => {
                        script += &format!("unmap {which:#x} 512\n");
                        m.unmap(which, 512);
                    }
                    2 if m.all_mapped(which, 512, false) => {
                        let ro = rng.below(2) == 0;
                        script += &format!("protect {which:#x} 512 {}\n", if ro { "ro" } else { "rw" });
                        m.protect(which, 512, ro);
                    }
                    _ => {
                        let page = which + rng.below(512) * 4096;
                        if m.all_mapped(page, 1, true) {
                            script += &format!("fill {page:#x} 1 7\n");
                            m.fill(page, 1);
                        } else if m.all_mapped(page, 1, false) {
                            script += &format!("touch {page:#x} 1\n");
                        }
                    }
                }
            }
            8..=10 => {
                let clear = rng.below(3) != 0;
                script += &format!("sync s{}\n", checks.len());
                checks.push((m.expected(), clear));
                if clear {
                    m.clear();
                }
            }
            _ => {}
        }
    }
    script += &format!("sync s{}\n", checks.len());
    checks.push((m.expected(), false));
    Scenario { script, checks }
}

fn raw_soft_dirty(live: &Live) -> Vec<(bool, bool)> {
    let out = std::process::Command::new(vmm_bin())
        .args(["pagemap", "--api-sock", live.sock(), "--pid", "1", "--start", &format!("{BASE:#x}"), "--pages",
            &REGION_PAGES.to_string(), "--raw"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out.stdout
        .chunks_exact(8)
        .map(|c| {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            ((e >> 55) & 1 == 1, e >> 63 == 1)
        })
        .collect()
}

fn run(engine: &str, seed: u64) {
    let sc = generate(seed);
    let Some(live) = Live::try_start(&sc.script, &["--engine", engine]).ok() else {
        panic!("engine {engine} did not start");
    };
    let mut seen = 0;
    let r = live.drive(|live, label, _| {
        let k: usize = label[1..].parse().unwrap();
        let (expected, clear) = &sc.checks[k];
        let got = raw_soft_dirty(live);
        let addr = |i: usize| BASE + i as u64 * 4096;
        let missed: Vec<u64> = (0..expected.len()).filter(|&i| expected[i] && !got[i].0).map(addr).collect();
        assert!(missed.is_empty(), "{engine} seed {seed} at {label}: written pages read clean: {:#x?}\n{}",
            &missed[..missed.len().min(8)], sc.script);
        if is_exact(engine) {
            let extra: Vec<u64> = (0..expected.len()).filter(|&i| !expected[i] && got[i].0).map(addr).collect();
            assert!(extra.is_empty(), "{engine} seed {seed} at {label}: clean pages read soft-dirty: {:#x?} (present: {:?})\n{}",
                &extra[..extra.len().min(8)], extra.iter().take(8).map(|a| got[((a - BASE) / 4096) as usize].1).collect::<Vec<_>>(),
                sc.script);
        }
        if *clear {
            live.clear_refs(1, 4);
        }
        seen += 1;
    });
    assert_eq!(r.code, 0, "seed {seed}: {r:?}\n{}", sc.script);
    assert_eq!(seen, sc.checks.len(), "seed {seed}: every sync was checked");
}

const SEEDS: u64 = 12;

/// [`run`] for every seed.
fn run_seeds(engine: &str) {
    for seed in 0..SEEDS {
        run(engine, seed);
    }
}

#[test]
fn pte_equals_the_model() {
    run_seeds("pte");
}

#[test]
fn hybrid_equals_the_model() {
    run_seeds("hybrid");
}

#[test]
fn kvm_bitmap_never_misses_a_write() {
    run_seeds("kvm-bitmap");
}

#[test]
fn kvm_ring_never_misses_a_write() {
    run_seeds("kvm-ring");
}

#[test]
fn uffd_never_misses_a_write() {
    run_seeds("uffd");
}

#[test]
fn generator_covers_every_operation() {
    let all: String = (0..SEEDS).map(|s| generate(s).script).collect();
    for op in ["map ", " ro\n", "unmap ", "protect ", "fill ", "touch ", " huge\n", "sync "] {
        assert!(all.contains(op), "no '{op}' in the generated scripts");
    }
}
