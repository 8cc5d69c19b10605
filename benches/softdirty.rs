//! Soft-dirty from outside vs the host kernel's own mechanism (issue: pte engine).
//!
//! For 1, 16 and 256 MiB resident in one guest process, measures the pte engine's
//! clear-refs and pagemap (time inside the VMM, per page) and the cost of the first
//! write to each page after a clear (guest running time of a fill after a clear minus
//! the same fill without one). The same three on a host process of equal size with the
//! host kernel's mechanism (userfaultfd async write-protect + PAGEMAP_SCAN; the host
//! kernel has no soft-dirty). Compares by ratio within one run; writes
//! docs/benchmarks/softdirty.md and .json.
//!
//! Run: `cargo bench -p vmm --bench softdirty` (needs /dev/kvm).

mod common;
use common::Guest;
use serde_json::json;
use std::path::Path;
use std::time::Instant;
use vmm::tracking::source::uffd::AsyncWp;

const ROUNDS: usize = 3;
const BASE: u64 = 0x1000_0000;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}


#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Figures {
    clear_ns_per_page: f64,
    collect_ns_per_page: f64,
    /// Host only: reading /proc/self/pagemap (8 bytes per page, Linux's pagemap).
    pagemap_read_ns_per_page: f64,
    first_write_ns_per_page: f64,
    plain_write_ns_per_page: f64,
}

fn guest(pages: u64) -> Figures {
    let script = format!(
        "proc bench\nmap {BASE:#x} {pages}\nfill {BASE:#x} {pages} 1\nsync ready\nloop {ROUNDS}\n  fill {BASE:#x} {pages} 2\n  sync base\n  fill {BASE:#x} {pages} 3\n  sync tracked\nend\ncheck {BASE:#x} {pages} 3\n"
    );
    let mem = (pages * 4096 / (1 << 20) * 2 + 64).next_multiple_of(2);
    let g = Guest::start(&script, mem, "pte", false);
    let mut prev = g.wait("ready");
    let (mut clear, mut collect, mut first, mut plain) = (vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        g.resume();
        let base = g.wait("base");
        let untracked = base - prev;
        let c = g.call(json!({"cmd": "clear-refs", "pid": 1, "value": 4}));
        clear.push(c["elapsed_ns"].as_u64().unwrap() as f64 / pages as f64);
        g.resume();
        let tracked_at = g.wait("tracked");
        let tracked = tracked_at - base;
        let p = g.call(json!({"cmd": "pagemap", "pid": 1, "start": BASE, "pages": pages, "summary": true}));
        assert_eq!(p["soft_dirty"].as_u64(), Some(pages), "every page written after the clear reads soft-dirty");
        collect.push(p["elapsed_ns"].as_u64().unwrap() as f64 / pages as f64);
        first.push((tracked as f64 - untracked as f64) / pages as f64);
        plain.push(untracked as f64 / pages as f64);
        prev = tracked_at;
    }
    let info = g.call(json!({"cmd": "info"}));
    assert!(info["tracker"]["faults_caught"].as_u64().unwrap() >= pages * ROUNDS as u64);
    g.resume();
    let mut child = g.child;
    let status = child.wait().unwrap();
    assert!(status.success(), "guest checks passed");
    Figures {
        clear_ns_per_page: median(clear),
        collect_ns_per_page: median(collect),
        pagemap_read_ns_per_page: 0.0,
        first_write_ns_per_page: median(first),
        plain_write_ns_per_page: median(plain),
    }
}

/// Reads the host's own /proc/self/pagemap entries for the range (Linux's answer to
/// the same question our pagemap answers, one 8-byte entry per page).
fn read_host_pagemap(base: u64, pages: u64) -> f64 {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut buf = vec![0u8; (pages * 8) as usize];
    let t = Instant::now();
    f.read_exact_at(&mut buf, base / 4096 * 8).unwrap();
    let ns = t.elapsed().as_nanos() as f64 / pages as f64;
    let present = buf.chunks_exact(8).filter(|c| u64::from_le_bytes((*c).try_into().unwrap()) >> 63 == 1).count();
    assert_eq!(present as u64, pages);
    ns
}

fn host(pages: u64) -> Figures {
    let len = (pages * 4096) as usize;
    // SAFETY: a private anonymous mapping owned by this function, unmapped at its end.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(base, libc::MAP_FAILED);
    let fill = |v: u8| {
        let t = Instant::now();
        // SAFETY: writes inside the mapping.
        unsafe { std::ptr::write_bytes(base as *mut u8, v, len) };
        t.elapsed().as_nanos() as f64
    };
    fill(1);
    // No THP: the guest engine tracks 4 KiB pages here too.
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
    let mut wp = AsyncWp::register(base as u64, len as u64).expect("userfaultfd async write-protect");
    let (mut clear, mut collect, mut first, mut plain, mut pmread) = (vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        pmread.push(read_host_pagemap(base as u64, pages));
        let untracked = fill(2);
        let t = Instant::now();
        wp.protect().unwrap();
        clear.push(t.elapsed().as_nanos() as f64 / pages as f64);
        let tracked = fill(3);
        let t = Instant::now();
        let n = wp.scan(false, |_, _| {}).unwrap();
        collect.push(t.elapsed().as_nanos() as f64 / pages as f64);
        assert_eq!(n, pages);
        first.push((tracked - untracked) / pages as f64);
        plain.push(untracked / pages as f64);
        // Make the next round's untracked fill really untracked.
        drop(wp);
        wp = AsyncWp::register(base as u64, len as u64).unwrap();
    }
    drop(wp);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base, len) };
    Figures {
        clear_ns_per_page: median(clear),
        collect_ns_per_page: median(collect),
        pagemap_read_ns_per_page: median(pmread),
        first_write_ns_per_page: median(first),
        plain_write_ns_per_page: median(plain),
    }
}

fn main() {
    if !common::bench_start("softdirty") {
        return;
    }
    let mut rows = Vec::new();
    for mib in [1u64, 16, 256] {
        let pages = mib * 256;
        let g = guest(pages);
        let h = host(pages);
        eprintln!("{mib:>4} MiB  guest {g:?}\n           host  {h:?}");
        rows.push(json!({"mib": mib, "pages": pages, "guest": g, "host": h}));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&out).unwrap();
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap().trim().to_string()))
        .unwrap_or_default();
    let report = json!({"benchmark": "softdirty", "rounds": ROUNDS, "cpu": machine, "rows": rows});
    std::fs::write(out.join("softdirty.json"), serde_json::to_string_pretty(&report).unwrap()).unwrap();
    let mut md = String::from("<!-- generated by `cargo bench -p vmm --bench softdirty`; do not edit -->\n");
    md += &format!("Median of {ROUNDS} rounds, one run, CPU: {machine}. Times in ns per 4 KiB page.\n\n");
    md += "| resident | clear: pte engine | clear: host uffd-WP | ratio | pagemap: pte engine | host /proc/self/pagemap read | ratio | host PAGEMAP_SCAN (regions) | ratio | first write after clear: guest | first write: host | ratio |\n";
    md += "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &rows {
        let f = |side: &str, k: &str| r[side][k].as_f64().unwrap();
        let ratio = |k: &str| f("guest", k) / f("host", k);
        let pm = f("guest", "collect_ns_per_page");
        md += &format!(
            "| {} MiB | {:.0} | {:.0} | {:.2}x | {:.0} | {:.0} | {:.2}x | {:.0} | {:.2}x | {:.0} | {:.0} | {:.1}x |\n",
            r["mib"], f("guest", "clear_ns_per_page"), f("host", "clear_ns_per_page"), ratio("clear_ns_per_page"),
            pm, f("host", "pagemap_read_ns_per_page"), pm / f("host", "pagemap_read_ns_per_page"),
            f("host", "collect_ns_per_page"), pm / f("host", "collect_ns_per_page"),
            f("guest", "first_write_ns_per_page"), f("host", "first_write_ns_per_page"), ratio("first_write_ns_per_page"),
        );
    }
    md += "\nPlain (untracked) write per page, for scale: ";
    md += &rows
        .iter()
        .map(|r| format!("{} MiB guest {:.0} / host {:.0}", r["mib"], r["guest"]["plain_write_ns_per_page"].as_f64().unwrap(),
            r["host"]["plain_write_ns_per_page"].as_f64().unwrap()))
        .collect::<Vec<_>>()
        .join(", ");
    md += ".\n";
    std::fs::write(out.join("softdirty.md"), md).unwrap();
    println!("softdirty: wrote {}", out.join("softdirty.md").display());
}
