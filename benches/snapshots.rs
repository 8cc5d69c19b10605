//! Snapshot costs (issue: incremental snapshots).
//!
//! For 256 MiB and 1 GiB guests with half their pages resident: a full snapshot, then
//! diffs after rewriting 1%, 10% and 50% of the guest's pages. For each: time (the VM's
//! pause), file size on disk, where the pause went (state, choosing frames, memory
//! read+hash+write, fsync, re-arming the log), and the write throughput against a
//! plain sequential write (1 MiB writes + fsync) of the same number of bytes to the
//! same file system, measured right after. The same for per-process dumps (`vmm dump`
//! full, then `--prev` after the same rewrites). One run; writes
//! docs/benchmarks/snapshots.{md,json}.
//!
//! Run: `cargo bench -p vmm --bench snapshots` (needs /dev/kvm; ~3 minutes, most of it
//! the guest populating its memory through its emulated ring 0).

mod common;
use common::Guest;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::time::Instant;

const BASE: u64 = 0x1000_0000;
const PERCENTS: [u64; 3] = [1, 10, 50];
const SIZES: [u64; 2] = [256, 1024];

/// Seconds to write `bytes` sequentially into a new file in `dir` and fsync it
/// (starting, like every measured write, from a clean page cache).
fn sequential_write(dir: &Path, bytes: u64) -> f64 {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let path = dir.join("sequential.bin");
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    secs
}

fn row(mib: u64, what: &str, percent: Option<u64>, r: &Value, seq_secs: f64, bytes_written: u64) -> Value {
    let pause = r["pause_ns"].as_f64().unwrap() / 1e9;
    let ph = &r["phases"];
    let io_ns = ph["memory_ns"].as_f64().unwrap_or(0.0) + ph["sync_ns"].as_f64().unwrap_or(0.0);
    json!({
        "mib": mib, "what": what, "percent": percent,
        "pages": r["pages"], "disk_bytes": r["disk_bytes"], "bytes_written": bytes_written,
        "pause_s": pause, "phases": ph,
        "memory_io_share": if ph.is_object() { io_ns / 1e9 / pause } else { f64::NAN },
        "throughput_mb_s": bytes_written as f64 / pause / 1e6,
        "sequential_mb_s": bytes_written as f64 / seq_secs / 1e6,
    })
}

fn run(mib: u64, out: &Path) -> Vec<Value> {
    let pages = mib * 256;
    let resident = pages / 2;
    let mut script = format!("proc bench\nmap {BASE:#x} {resident}\nfill {BASE:#x} {resident} 1\nsync full\n");
    for (i, p) in PERCENTS.iter().enumerate() {
        script += &format!("fill {BASE:#x} {} {}\nsync d{p}\n", pages * p / 100, i + 2);
    }
    script += "exit 0\n";
    let g = Guest::start(&script, mib, "pte", false);
    let mut rows = Vec::new();
    let t = Instant::now();
    g.wait("full");
    eprintln!("{mib} MiB: populated {resident} pages in {:.1} s", t.elapsed().as_secs_f64());
    let dir = out.join(format!("{mib}"));
    std::fs::create_dir_all(&dir).unwrap();
    let snap = |name: &str, diff: bool| {
        g.call(json!({"cmd": "snapshot-create", "out": dir.join(name).display().to_string(), "diff": diff}))
    };
    let dump = |name: &str, prev: Option<&str>| {
        let mut req = json!({"cmd": "dump", "pid": 1, "out": dir.join(name).display().to_string()});
        if let Some(p) = prev {
            req["prev"] = json!(dir.join(p).display().to_string());
        }
        g.call(req)
    };
    // A large write here is slowed 2-3x by the writeback of whatever was written just
    // before it (seen as a gap between a snapshot and a dump of the same bytes, which
    // reversed with their order). Every measured write starts from a clean page cache.
    let settle = || {
        // SAFETY: sync(2) takes no arguments and cannot fail.
        unsafe { libc::sync() };
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    settle();
    let full = snap("full", false);
    let written = full["pages"].as_u64().unwrap() * 4096;
    rows.push(row(mib, "snapshot", None, &full, sequential_write(&dir, written), written));
    settle();
    let d0 = dump("dump-full", None);
    let written = d0["bytes"].as_u64().unwrap();
    rows.push(row(mib, "dump", None, &d0, sequential_write(&dir, written), written));
    let mut prev = "dump-full".to_string();
    for p in PERCENTS {
        g.resume();
        g.wait(&format!("d{p}"));
        settle();
        let r = snap(&format!("d{p}"), true);
        let written = r["pages"].as_u64().unwrap() * 4096;
        rows.push(row(mib, "snapshot", Some(p), &r, sequential_write(&dir, written), written));
        let name = format!("dump-{p}");
        settle();
        let r = dump(&name, Some(&prev));
        let written = r["bytes"].as_u64().unwrap();
        rows.push(row(mib, "dump", Some(p), &r, sequential_write(&dir, written), written));
        prev = name;
    }
    g.resume();
    // Restoring: rebuilding guest memory from a full snapshot and from the chain of
    // full + three diffs (every file read and checked), then folding d1 into full.
    let mut restore = Vec::new();
    for (what, top) in [("restore full", "full"), ("restore chain of 4", "d50")] {
        settle();
        let mem = vmm::machine::memory::create(mib << 20).unwrap();
        let t = Instant::now();
        vmm::storage::snapshot::load(&dir.join(top), Some(&mem)).unwrap();
        restore.push(json!({"mib": mib, "what": what, "seconds": t.elapsed().as_secs_f64()}));
    }
    settle();
    let t = Instant::now();
    vmm::storage::snapshot::merge(&dir.join("d1"), &dir.join("full"), &Default::default()).unwrap();
    restore.push(json!({"mib": mib, "what": "merge d1 into full", "seconds": t.elapsed().as_secs_f64()}));
    let _ = std::fs::remove_dir_all(&dir);
    for r in &restore {
        eprintln!("{r}");
    }
    rows.extend(restore);
    for r in &rows {
        eprintln!("{r}");
    }
    rows
}

fn main() {
    if !common::bench_start("snapshots") {
        return;
    }
    // On the same file system as the repository (target/), not a tmpfs.
    let scratch = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-snapshots");
    let _ = std::fs::remove_dir_all(&scratch);
    let rows: Vec<Value> = SIZES.iter().flat_map(|&mib| run(mib, &scratch)).collect();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("snapshots.json"), serde_json::to_string_pretty(&json!({"rows": rows})).unwrap()).unwrap();

    let mut md = String::from(
        "# Snapshot and dump costs\n\n\
         Written by `cargo bench -p vmm --bench snapshots` (release build, pte engine, one run on this\n\
         2-core nested-KVM host; compare within the table, not across machines). Each guest has half\n\
         its pages resident; diffs follow rewriting 1%, 10% and 50% of *all* its pages. `vs full` is\n\
         the diff's pause as a share of the full snapshot's. `memory I/O` is the share of the pause\n\
         spent reading, hashing, writing and fsyncing pages (the rest: vCPU/VM state, choosing\n\
         frames, re-arming the dirty log). `sequential` is a plain 1 MiB-write + fsync of the same\n\
         bytes to the same file system, right after.\n\n\
         | guest | what | written | pages | on disk | pause | vs full | memory I/O | throughput | sequential |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows.iter().filter(|r| r["seconds"].is_null()) {
        let full = rows
            .iter()
            .find(|f| f["mib"] == r["mib"] && f["what"] == r["what"] && f["percent"].is_null())
            .map(|f| f["pause_s"].as_f64().unwrap())
            .unwrap();
        let pause = r["pause_s"].as_f64().unwrap();
        md += &format!(
            "| {} MiB | {} | {} | {} | {:.1} MB | {:.1} ms | {} | {} | {:.0} MB/s | {:.0} MB/s |\n",
            r["mib"],
            if r["percent"].is_null() { format!("full {}", r["what"].as_str().unwrap()) } else { format!("{} diff", r["what"].as_str().unwrap()) },
            r["percent"].as_u64().map_or("-".to_string(), |p| format!("{p}%")),
            r["pages"],
            r["disk_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            pause * 1e3,
            if r["percent"].is_null() { "-".to_string() } else { format!("{:.1}%", pause / full * 100.0) },
            r["memory_io_share"].as_f64().map_or("-".to_string(), |s| format!("{:.0}%", s * 100.0)),
            r["throughput_mb_s"].as_f64().unwrap(),
            r["sequential_mb_s"].as_f64().unwrap(),
        );
    }
    md += "\nRestoring (guest memory rebuilt from the files, every checksum checked) and merging:\n\n\
           | guest | what | time |\n|---|---|---:|\n";
    for r in rows.iter().filter(|r| !r["seconds"].is_null()) {
        md += &format!("| {} MiB | {} | {:.0} ms |\n", r["mib"], r["what"].as_str().unwrap(), r["seconds"].as_f64().unwrap() * 1e3);
    }
    std::fs::write(docs.join("snapshots.md"), md).unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
}
