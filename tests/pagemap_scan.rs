//! `vmm pagemap-scan` (Linux's PAGEMAP_SCAN from outside) through the real binary, under
//! every engine: a client looping `--written --clear` while a guest process writes loses
//! no write; long walks continue from `walk_end`; a clear of part of a 2 MiB page keeps
//! it written; bad requests are refused with the culprit named. Agreement with pagemap
//! page for page is checked at every read of every oracle scenario (run/scenario.rs).

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;

const BASE: u64 = 0x1000_0000;
const PAGES: u64 = 512;
/// The writer's fills, (first page, pages): scattered, so that regions split.
const FILLS: [(u64, u64); 6] = [(0, 40), (64, 1), (100, 120), (300, 7), (400, 64), (480, 31)];

fn start(script: &str, engine: &str) -> Option<Live> {
    Live::try_start(script, &["--engine", engine, "--mem", "64"]).map_err(|r| {
        assert!(r.code == 69 && r.stderr.contains("is unavailable on this host"), "the VMM failed to start: {r:?}");
        eprintln!("SKIPPED ({engine}): {}", r.stderr.trim());
    }).ok()
}

/// `vmm pagemap-scan --json` with `args`: the answer object.
fn scan(live: &Live, args: &[&str]) -> Value {
    let mut all = vec!["--pid", "1", "--json"];
    all.extend_from_slice(args);
    let r = live.client("pagemap-scan", &all);
    assert_eq!(r.code, 0, "pagemap-scan {args:?}: {r:?}");
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {}", r.stdout))
}

/// The pages (index from BASE) of the answer's regions inside [BASE, BASE + PAGES).
fn pages_of(answer: &Value) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for r in answer["regions"].as_array().unwrap() {
        let (s, e) = (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap());
        assert!(s < e && s % 4096 == 0 && e % 4096 == 0, "{r}");
        set.extend((s.max(BASE)..e.min(BASE + PAGES * 4096)).step_by(4096).map(|a| (a - BASE) / 4096));
    }
    set
}

fn paused_at(live: &Live, label: &str) -> bool {
    let s: Value = vmm::api::call(&live.sock, &vmm::api::Request::Status {}).expect("status");
    assert_ne!(s["phase"], "finished", "the writer ended before sync {label}: {s}");
    s["phase"] == "paused" && s["label"] == label
}

/// The race-free protocol: a client loops `--written --clear` while the writer writes,
/// with no sync between them; whatever the interleaving, the union of what the scans
/// reported is exactly what the writer wrote (a superset for the guest-physical
/// engines), and the guest's own check of its pages passes.
fn written_clear_loop_loses_no_write(engine: &str) {
    let mut script = format!("proc writer\nmap {BASE:#x} {PAGES}\nfill {BASE:#x} 256 1\nsync ready\nloop 200\n");
    for (i, (first, n)) in FILLS.iter().enumerate() {
        script += &format!("  fill {:#x} {n} {}\n  yield\n", BASE + first * 4096, i + 2);
    }
    script += "end\n";
    for (i, (first, n)) in FILLS.iter().enumerate() {
        script += &format!("check {:#x} {n} {}\n", BASE + first * 4096, i + 2);
    }
    script += "sync done\n";
    let Some(live) = start(&script, engine) else { return };
    live.wait("ready");
    // Everything so far (the first fill, the new mapping) is reported and cleared.
    let first = scan(&live, &["--clear"]);
    assert_eq!(first["walk_end"].as_u64(), Some(workload::USER_TOP), "{first}");
    assert!(pages_of(&first).len() as u64 == PAGES, "a scan without --written covers every mapped page: {first}");
    let clean = scan(&live, &["--written"]);
    assert!(pages_of(&clean).is_empty() || !is_exact(engine), "nothing written right after the clear: {clean}");
    live.resume();
    let (mut seen, mut scans_while_running) = (BTreeSet::new(), 0);
    loop {
        let done = paused_at(&live, "done");
        seen.extend(pages_of(&scan(&live, &["--written", "--clear"])));
        if done {
            break;
        }
        scans_while_running += 1;
    }
    let wrote: BTreeSet<u64> = FILLS.iter().flat_map(|&(f, n)| f..f + n).collect();
    eprintln!("{engine}: {scans_while_running} scans while the writer ran, {} pages reported", seen.len());
    let lost: Vec<&u64> = wrote.difference(&seen).collect();
    assert!(lost.is_empty(), "{engine}: writes lost by the scan-and-clear loop: pages {lost:?}");
    if is_exact(engine) {
        let extra: Vec<&u64> = seen.difference(&wrote).collect();
        assert!(extra.is_empty(), "{engine}: pages reported written that the writer never wrote: {extra:?}");
    }
    live.resume();
    let r = live.finish();
    assert_eq!(r.code, 0, "the writer's own check of its pages: {r:?}");
}

/// A walk cut by --max-regions goes on from its walk_end to the same regions one walk
/// gives; a clear of part of a 2 MiB page keeps the whole page written (its writes
/// outside the range must not be forgotten).
fn walks_continue_and_partial_huge_clears_keep_written(engine: &str) {
    let huge = 0x4000_0000u64;
    let script = format!("proc p\nmap {BASE:#x} 64\nfill {BASE:#x} 64 1\nmap {huge:#x} 512 huge\nfill {huge:#x} 1 1\nsync cleared\n\
        fill {:#x} 1 2\nfill {:#x} 3 2\nfill {:#x} 1 2\nfill {huge:#x} 1 3\nsync written\n",
        BASE + 0x3000, BASE + 0x10000, BASE + 0x30000);
    let Some(live) = start(&script, engine) else { return };
    live.wait("cleared");
    scan(&live, &["--clear"]);
    live.resume();
    live.wait("written");
    let whole = scan(&live, &["--written"]);
    let regions = whole["regions"].as_array().unwrap().clone();
    assert!(regions.len() >= 4, "three written runs and the huge page: {whole}");
    // One region per request, going on from each walk_end.
    let (mut pieces, mut at) = (Vec::new(), 0u64);
    loop {
        let a = scan(&live, &["--written", "--max-regions", "1", "--start", &format!("{at:#x}")]);
        pieces.extend(a["regions"].as_array().unwrap().iter().cloned());
        let end = a["walk_end"].as_u64().unwrap();
        assert!(end > at, "the walk goes forward: {a}");
        if end == workload::USER_TOP {
            break;
        }
        at = end;
    }
    assert_eq!(pieces, regions, "a walk in one-region steps gives the regions of one walk");
    // Clear the first 4 KiB of the huge page only: it stays written, as a whole.
    let part = scan(&live, &["--written", "--clear", "--start", &format!("{huge:#x}"), "--end", &format!("{:#x}", huge + 4096)]);
    assert_eq!(part["regions"].as_array().unwrap().len(), 1, "{part}");
    assert_eq!(part["regions"][0]["huge"], true, "{part}");
    let after = scan(&live, &["--written", "--start", &format!("{huge:#x}"), "--end", &format!("{:#x}", huge + (2 << 20))]);
    assert_eq!(after["regions"].as_array().unwrap().len(), 1, "{after}");
    assert_eq!((after["regions"][0]["start"].as_u64(), after["regions"][0]["end"].as_u64()), (Some(huge), Some(huge + (2 << 20))),
        "a 2 MiB page cleared in part stays written whole: {after}");
    // A clear of the small pages' range leaves nothing written there, and the huge page as it was.
    scan(&live, &["--clear", "--start", &format!("{BASE:#x}"), "--end", &format!("{:#x}", BASE + 64 * 4096)]);
    let rest = scan(&live, &["--written"]);
    let starts: Vec<u64> = rest["regions"].as_array().unwrap().iter().map(|r| r["start"].as_u64().unwrap()).collect();
    assert_eq!(starts, vec![huge], "{rest}");
    live.resume();
    assert_eq!(live.finish().code, 0);
}

macro_rules! per_engine {
    ($($m:ident => $e:expr),*) => {$(
        mod $m {
            #[test]
            fn written_clear_loop_loses_no_write() { super::written_clear_loop_loses_no_write($e) }
            #[test]
            fn walks_continue_and_partial_huge_clears_keep_written() { super::walks_continue_and_partial_huge_clears_keep_written($e) }
        }
    )*};
}
per_engine!(pte => "pte", hybrid => "hybrid", kvm_bitmap => "kvm-bitmap", kvm_ring => "kvm-ring", uffd => "uffd");

#[test]
fn bad_requests_are_refused_naming_the_culprit() {
    let live = Live::start("proc p\nmap 0x10000000 4\nsync s\n", &[]);
    live.wait("s");
    for (args, code, says) in [
        (vec!["--pid", "1", "--start", "0x10000001"], 65, "page-aligned"),
        (vec!["--pid", "1", "--start", "0x10004000", "--end", "0x10000000"], 65, "is not below end"),
        (vec!["--pid", "1", "--end", "0x900000000000"], 65, "outside the user half"),
        (vec!["--pid", "7"], 65, "no process with pid 7"),
        (vec!["--pid", "1", "--max-regions", "0"], 64, "--max-regions 0"),
        (vec!["--pid", "1", "--start", "zz"], 64, "'zz' is not a hex address"),
    ] {
        let r = live.client("pagemap-scan", &args);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(says), "{args:?}: {r:?}");
    }
    // The API refuses too many regions per request.
    let req = vmm::api::Request::PagemapScan { pid: 1, start: None, end: None, written: None, clear: None, max_regions: Some(1 << 20) };
    let e = vmm::api::call::<vmm::api::PagemapScanned>(&live.sock, &req).unwrap_err().to_string();
    assert!(e.contains("max_regions 1048576 is not in 1..=65536"), "{e}");
    live.resume();
    assert_eq!(live.finish().code, 0);
}
