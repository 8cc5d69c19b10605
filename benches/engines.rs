//! The engine comparison (issue: guest-physical engines).
//!
//! For guests of 64, 256 and 1024 MiB with 1%, 10% and 100% of pages written between
//! clears, for each engine: time to clear (clear-refs of the process, inside the VMM),
//! guest-side cost per first write (a guest `fill ... timed` loop reading the TSC,
//! minus the same fill untracked; the best of [`ROUNDS`] rounds of clear and fill, and of
//! as many untracked fills), and time to collect the dirty set (pagemap of the
//! process, inside the VMM). The same for the host kernel's own mechanism on a host
//! mapping of equal size (userfaultfd async WP + PAGEMAP_SCAN). One run; writes
//! docs/benchmarks/engines.{md,json,svg}.
//!
//! Run: `cargo bench -p vmm --bench engines` (needs /dev/kvm; ~10 minutes: populating a
//! 1 GiB guest takes the guest's emulated ring 0 ~50 s per VM).

use plotters::prelude::*;
mod common;
use common::Guest;
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;
use vmm::tracking::source::uffd::AsyncWp;

const BASE: u64 = 0x1000_0000;
const FRACTIONS: [u64; 3] = [1, 10, 100];
const SIZES: [u64; 3] = [64, 256, 1024];
/// Scans per point for the pagemap-scan row (the best counts, ours and the host's): a
/// scan of 64 MiB takes ~20 µs, and on this shared host the best of 5 varied 2x between
/// runs.
const SCANS: usize = 50;
/// Clear-and-write rounds per point for the first-write row, and untracked fills for its
/// baseline (the best counts, ours and the host's): one round of 1% of 64 MiB is 164
/// writes, and the engines' VMs run minutes apart on a shared host.
const ROUNDS: usize = 3;
const ENGINES: [&str; 5] = ["pte", "hybrid", "kvm-bitmap", "kvm-ring", "uffd"];

/// Cycles of each `fill ... timed` line, in order.
fn timed_fills(console: &str) -> Vec<f64> {
    console
        .lines()
        .filter_map(|l| l.split(" took ").nth(1)?.split(' ').next()?.parse().ok())
        .collect()
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Point {
    clear_ns_per_page: f64,
    write_ns_per_page: f64,
    /// The process's pagemap (per page, like /proc/PID/pagemap).
    collect_ns_per_page: f64,
    /// Of that, pulling the VM's dirty set out of the mechanism (guest-physical).
    harvest_ns_per_page: f64,
    /// `pagemap-scan --written` of the process's range (regions; per page of the range).
    scan_ns_per_page: f64,
}

/// One VM: populate once, then per fraction clear, write, collect. Returns the points
/// (write = tracked ns per page written, not yet minus the untracked cost) and the
/// untracked write cost per page measured in this VM.
fn guest(engine: &str, mib: u64) -> (Vec<Point>, f64) {
    let pages = mib * 256;
    let mut script = format!("proc bench\nmap {BASE:#x} {pages}\nfill {BASE:#x} {pages} 1\n");
    script += &format!("fill {BASE:#x} {pages} 2 timed\n").repeat(ROUNDS);
    for f in FRACTIONS {
        let w = pages * f / 100;
        for r in 0..ROUNDS {
            script += &format!("sync clear{f}.{r}\nfill {BASE:#x} {w} 3 timed\n");
        }
        script += &format!("sync collect{f}\n");
    }
    let g = Guest::start(&script, mib + 64 + mib / 8, engine, true);
    let tsc_khz = g.call(json!({"cmd": "info"}))["tsc_khz"].as_f64().expect("KVM_GET_TSC_KHZ");
    let mut clear = Vec::new();
    let mut collect = Vec::new();
    let mut harvest = Vec::new();
    let mut scan = Vec::new();
    for f in FRACTIONS {
        let w = pages * f / 100;
        for r in 0..ROUNDS {
            g.wait(&format!("clear{f}.{r}"));
            let c = g.call(json!({"cmd": "clear-refs", "pid": 1, "value": 4}));
            if r == 0 {
                // The clear after the previous fraction's writes (later rounds clear fewer).
                clear.push(c["elapsed_ns"].as_f64().unwrap() / pages as f64);
            }
            g.resume();
        }
        g.wait(&format!("collect{f}"));
        let before = g.call(json!({"cmd": "info"}))["log"]["harvest_ns"].as_f64().unwrap();
        let p = g.call(json!({"cmd": "pagemap", "pid": 1, "start": BASE, "pages": pages, "summary": true}));
        let after = g.call(json!({"cmd": "info"}))["log"]["harvest_ns"].as_f64().unwrap();
        harvest.push((after - before) / pages as f64);
        assert!(p["soft_dirty"].as_u64().unwrap() >= w, "{engine}: every written page reads soft-dirty");
        collect.push(p["elapsed_ns"].as_f64().unwrap() / pages as f64);
        // The best of a few scans (the guest is stopped: each scans the same pages), as for the host.
        let best = (0..SCANS)
            .map(|_| {
                let s = g.call(json!({"cmd": "pagemap-scan", "pid": 1, "start": BASE, "end": BASE + pages * 4096, "written": true}));
                let scanned: u64 = s["regions"].as_array().unwrap().iter()
                    .map(|r| (r["end"].as_u64().unwrap() - r["start"].as_u64().unwrap()) / 4096).sum();
                assert!(scanned >= w && s["walk_end"] == BASE + pages * 4096, "{engine}: the scan reports every written page");
                s["elapsed_ns"].as_f64().unwrap()
            })
            .fold(f64::MAX, f64::min);
        scan.push(best / pages as f64);
        g.resume();
    }
    let out = g.child.wait_with_output().unwrap();
    assert!(out.status.success(), "{engine} {mib} MiB guest failed");
    let cycles = timed_fills(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(cycles.len(), ROUNDS * (1 + FRACTIONS.len()));
    let ns = |c: f64| c / tsc_khz * 1e6;
    let best = |i: usize| cycles[i * ROUNDS..(i + 1) * ROUNDS].iter().copied().fold(f64::MAX, f64::min);
    let base_per_page = ns(best(0)) / pages as f64;
    let points = FRACTIONS
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let w = (pages * f / 100) as f64;
            Point {
                clear_ns_per_page: clear[i],
                write_ns_per_page: ns(best(1 + i)) / w,
                collect_ns_per_page: collect[i],
                harvest_ns_per_page: harvest[i],
                scan_ns_per_page: scan[i],
            }
        })
        .collect();
    (points, base_per_page)
}

fn host(mib: u64) -> Vec<Point> {
    let pages = mib * 256;
    let len = (pages * 4096) as usize;
    // SAFETY: a private anonymous mapping owned by this function, unmapped at its end.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    assert_ne!(base, libc::MAP_FAILED);
    // SAFETY: advice on our own mapping; the guest tracks 4 KiB pages too.
    unsafe { libc::madvise(base, len, libc::MADV_NOHUGEPAGE) };
    let fill = |v: u8, n: u64| {
        let t = Instant::now();
        // SAFETY: writes inside the mapping.
        unsafe { std::ptr::write_bytes(base as *mut u8, v, (n * 4096) as usize) };
        t.elapsed().as_nanos() as f64
    };
    fill(1, pages);
    let base_per_page = (0..ROUNDS).map(|_| fill(2, pages)).fold(f64::MAX, f64::min) / pages as f64;
    let mut wp = AsyncWp::register(base as u64, len as u64).expect("userfaultfd async write-protect");
    let mut points = Vec::new();
    for f in FRACTIONS {
        let w = pages * f / 100;
        let mut protect = || {
            let t = Instant::now();
            wp.protect().unwrap();
            t.elapsed().as_nanos() as f64 / pages as f64
        };
        let clear = protect();
        let mut write = fill(3, w);
        for _ in 1..ROUNDS {
            protect();
            write = write.min(fill(3, w));
        }
        let write = write / w as f64 - base_per_page;
        let mut scan_once = || {
            let t = Instant::now();
            let n = wp.scan(false, |_, _| {}).unwrap();
            assert_eq!(n, w);
            t.elapsed().as_nanos() as f64 / pages as f64
        };
        let collect = scan_once();
        let best = (1..SCANS).map(|_| scan_once()).fold(collect, f64::min);
        points.push(Point { clear_ns_per_page: clear, write_ns_per_page: write, collect_ns_per_page: collect,
            harvest_ns_per_page: collect, scan_ns_per_page: best });
    }
    drop(wp);
    // SAFETY: our own mapping.
    unsafe { libc::munmap(base, len) };
    points
}

fn plot(rows: &[Value], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("First write after a clear: cost per page (10% of pages written)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((40f64..1500f64).log_scale(), (100f64..1_000_000f64).log_scale())?;
    chart.configure_mesh().x_desc("guest / host process size (MiB)").y_desc("ns per first write").draw()?;
    let series: Vec<&str> = ENGINES.iter().copied().chain(["host"]).collect();
    for (i, name) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r["who"] == *name && r["percent"] == 10)
            .map(|r| (r["mib"].as_f64().unwrap(), r["write_ns_per_page"].as_f64().unwrap().max(101.0)))
            .collect();
        chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?.label(*name).legend(move |(x, y)| {
            PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
        });
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    if !common::bench_start("engines") {
        return;
    }
    let mut rows = Vec::new();
    for mib in SIZES {
        // The untracked cost of a guest write, from the pte VM (nothing is protected
        // there before its first clear). Not from each engine's own VM: the dirty ring's
        // harvester re-protects pages every millisecond, so its "untracked" fill faults.
        let mut untracked = None;
        for who in ENGINES.iter().copied().chain(["host"]) {
            let t = Instant::now();
            let points = if who == "host" {
                host(mib)
            } else {
                let (mut points, base) = guest(who, mib);
                let base = *untracked.get_or_insert(base);
                points.iter_mut().for_each(|p| p.write_ns_per_page -= base);
                points
            };
            eprintln!("{mib:>5} MiB {who:<10} {:>6.1} s  {points:?}", t.elapsed().as_secs_f64());
            for (f, p) in FRACTIONS.iter().zip(points) {
                rows.push(json!({"mib": mib, "percent": f, "who": who, "clear_ns_per_page": p.clear_ns_per_page,
                    "write_ns_per_page": p.write_ns_per_page, "collect_ns_per_page": p.collect_ns_per_page,
                    "harvest_ns_per_page": p.harvest_ns_per_page, "scan_ns_per_page": p.scan_ns_per_page}));
            }
        }
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("engines.json"), serde_json::to_string_pretty(&json!({"rows": rows})).unwrap()).unwrap();
    plot(&rows, &out.join("engines.svg")).expect("plot");
    let get = |mib: u64, pct: u64, who: &str, k: &str| {
        rows.iter()
            .find(|r| r["mib"] == mib && r["percent"] == pct && r["who"] == who)
            .and_then(|r| r[k].as_f64())
            .unwrap_or(f64::NAN)
    };
    let mut md = String::from("<!-- generated by `cargo bench -p vmm --bench engines`; do not edit -->\n");
    md += "One run. ns per 4 KiB page: clear and collect per page of the process, write per page written.\n";
    md += "collect: pagemap = the process's per-page pagemap (with its harvest); collect: harvest = only pulling the\n";
    md += &format!("VM's dirty set out of the mechanism; collect: pagemap-scan = `pagemap-scan --written` of the range (regions; best of {SCANS}, the host's PAGEMAP_SCAN too).\n");
    md += "Host: uffd-WP protect / write fault / PAGEMAP_SCAN (all three collect rows).\n";
    md += &format!("Write cost = timed guest fill after a clear (TSC, KVM_GET_TSC_KHZ; best of {ROUNDS} rounds of clear and fill)\n");
    md += &format!("minus the untracked cost of the same fill (best of {ROUNDS}), measured in the pte VM before its first clear.\n");
    md += "The host: best of the same rounds of uffd-WP protect and fill.\n\n";
    md += "| size | written | metric |";
    for w in ENGINES.iter().chain(&["host"]) {
        md += &format!(" {w} |");
    }
    md += " best engine | best / host | hybrid / kvm-bitmap | pte / kvm-bitmap |\n|---:|---:|---|";
    md += &"---:|".repeat(ENGINES.len() + 1);
    md += "---|---:|---:|---:|\n";
    for mib in SIZES {
        for pct in FRACTIONS {
            for (k, label) in [("clear_ns_per_page", "clear"), ("write_ns_per_page", "first write"),
                ("collect_ns_per_page", "collect: pagemap"), ("harvest_ns_per_page", "collect: harvest"),
                ("scan_ns_per_page", "collect: pagemap-scan")] {
                md += &format!("| {mib} MiB | {pct}% | {label} |");
                let mut best = ("", f64::INFINITY);
                for w in ENGINES {
                    let v = get(mib, pct, w, k);
                    if v < best.1 {
                        best = (w, v);
                    }
                    md += &format!(" {v:.0} |");
                }
                let h = get(mib, pct, "host", k);
                let kb = get(mib, pct, "kvm-bitmap", k);
                md += &format!(" {h:.0} | {} | {:.2}x | {:.2}x | {:.2}x |\n", best.0, best.1 / h,
                    get(mib, pct, "hybrid", k) / kb, get(mib, pct, "pte", k) / kb);
            }
        }
    }
    md += "\n![first-write cost per engine](engines.svg)\n";
    std::fs::write(out.join("engines.md"), md).unwrap();
    println!("engines: wrote {}", out.join("engines.md").display());
}
