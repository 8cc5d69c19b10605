//! A hostile guest cannot crash, stall or bloat the VMM (docs/security.md).
//!
//! The guest here is `guest-kernel/src/hostile` (built with the VMM): it publishes a valid
//! process table whose processes have page tables built to hurt — leaves past the end of
//! RAM, fan-out and self-referencing tables, 131072 leaves of 1 GiB, RAM full of tables,
//! mappings of terabytes — pauses at one `sync` while these tests attack the VMM through
//! its real binary, then checks that every 2 MiB of its RAM is still writable and exits 0.

mod common;
use common::*;
use serde_json::Value;

fn hostile_guest() -> &'static str {
    env!("HOSTILE_GUEST_ELF")
}

/// Boots the hostile guest with `procs` (the first name picks the shape) in `mem` MiB and
/// waits until it has built its tables and paused.
fn boot(procs: &[&str], mem: u32, engine: &str) -> Live {
    let script: String = procs.iter().map(|p| format!("proc {p}\nexit 0\n")).collect();
    let mem = mem.to_string();
    let live = Live::start(&script, &[hostile_guest(), "--mem", &mem, "--engine", engine, "--timeout", "600"]);
    let r = live.client("wait", &["--label", "hostile", "--timeout", "300"]);
    assert_eq!(r.code, 0, "the hostile guest did not reach its sync: {r:?}");
    live
}

/// A request either succeeds or is refused with a message naming why (exit 65); the
/// VMM never dies or hangs on it.
fn ok_or_refused(live: &Live, cmd: &str, args: &[&str], refusal: &str) -> Run {
    let r = live.client(cmd, args);
    assert!(
        r.code == 0 || (r.code == 65 && r.stderr.contains(refusal)),
        "{cmd} {args:?}: neither served nor refused with '{refusal}': {r:?}"
    );
    r
}

/// Resumes the guest and checks it finishes cleanly: guest RAM is writable everywhere.
fn finish_cleanly(live: Live) {
    live.resume();
    let r = live.finish();
    assert_eq!(r.code, 0, "the hostile guest could not finish (guest RAM damaged or VMM dead): {r:?}");
}

fn json(r: &Run) -> Vec<Value> {
    r.stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn leaves_past_the_end_of_ram_never_reach_the_host() {
    require_kvm();
    for engine in ["pte", "kvm-bitmap", "kvm-ring", "uffd"] {
        let live = boot(&["pastram"], 256, engine);
        let mem_pfns: u64 = 256 << 8;
        // Every clear_refs value walks the process: a 1 GiB leaf at frame 0 in 256 MiB,
        // a 1 GiB leaf at 4 GiB, a 2 MiB and two 4 KiB leaves past the end.
        for value in ["1", "2", "3", "4", "5", "4", "1"] {
            let r = live.client("clear-refs", &["--pid", "1", value]);
            assert_eq!(r.code, 0, "{engine}: clear-refs {value}: {r:?}");
        }
        // Pagemap reports them as a CPU would see them: present, with the PFN the entry
        // names; frames that are not RAM are never exclusive (no page backs them).
        let pages = live.pagemap(1, 0x4fff_f000, 2);
        assert_eq!((pages[0].pfn, pages[1].pfn), (Some(mem_pfns - 1), Some(mem_pfns)), "{engine}: {pages:?}");
        let past = live.pagemap(1, 0x8000_0000, 1);
        assert_eq!(past[0].pfn, Some(4 << 18), "{engine}: the leaf at 4 GiB: {past:?}");
        assert!(past[0].present && !past[0].exclusive && !past[0].soft_dirty, "{engine}: {past:?}");
        let small = live.pagemap(1, 0xc020_0000, 3);
        assert_eq!(small.iter().map(|p| p.pfn).collect::<Vec<_>>(),
            vec![Some(mem_pfns - 1), Some(mem_pfns), Some(mem_pfns + 5)], "{engine}");
        assert!(small[0].exclusive && !small[1].exclusive && !small[2].exclusive, "{engine}: {small:?}");
        let r = live.client("dirty-rate", &["--seconds", "0.05"]);
        assert_eq!(r.code, 0, "{engine}: {r:?}");
        // A dump cannot copy frames that are not memory: refused, naming the page.
        let dir = tempdir();
        let out = dir.path().join("d");
        let r = live.client("dump", &["--pid", "1", "--out", out.to_str().unwrap()]);
        assert_eq!(r.code, 65, "{engine}: {r:?}");
        assert!(r.stderr.contains("outside guest memory"), "{engine}: {r:?}");
        finish_cleanly(live);
    }
}

#[test]
fn fan_out_and_giant_tables_cost_what_ram_holds() {
    require_kvm();
    // `fanout`: every table points at one table of the next level and the root at
    // itself; `giant`: 256 tables of 512 leaves of 1 GiB, each claiming all of RAM.
    // Two processes share the tables.
    for shape in ["fanout", "giant"] {
        let live = boot(&[shape, "twin"], 256, "pte");
        for value in ["1", "4"] {
            let r = live.client("clear-refs", &["--pid", "1", value]);
            assert_eq!(r.code, 0, "{shape}: clear-refs {value}: {r:?}");
        }
        let r = live.client("clear-refs", &["--pid", "2", "4"]);
        assert_eq!(r.code, 0, "{shape}: {r:?}");
        let pages = live.pagemap(1, 0x4000_0000, 4);
        assert!(pages.iter().all(|p| p.present && p.huge == (shape == "giant")), "{shape}: {pages:?}");
        let r = live.client("dirty-rate", &["--seconds", "0.05", "--json"]);
        assert_eq!(r.code, 0, "{shape}: {r:?}");
        let v: Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(v["processes"].as_array().map(Vec::len), Some(2), "{shape}: {v}");
        // Every page of a 2^35-page mapping is more than one request may ask for.
        let r = live.client("pagemap", &["--pid", "1"]);
        assert_eq!(r.code, 65, "{shape}: {r:?}");
        assert!(r.stderr.contains("exceed the limit"), "{shape}: {r:?}");
        assert!(live.peak_rss_mib() < 256 + 64, "{shape}: the VMM grew to {} MiB", live.peak_rss_mib());
        finish_cleanly(live);
    }
}

#[test]
fn ram_full_of_tables_is_bounded_in_memory_and_work() {
    require_kvm();
    // Almost every free frame of a 64 MiB guest is a table of 512 leaves (about 8 M
    // leaves); 16 processes share them, so walking all of them would read 16 x RAM.
    let mut procs = vec!["ramfull"];
    procs.extend(["p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9", "p10", "p11", "p12", "p13", "p14", "p15", "p16"]);
    let live = boot(&procs, 64, "pte");
    let base = live.peak_rss_mib();
    // Requests on one process read at most what RAM holds: they are served.
    for value in ["1", "4"] {
        let r = live.client("clear-refs", &["--pid", "3", value]);
        assert_eq!(r.code, 0, "clear-refs {value}: {r:?}");
    }
    // Requests that need every process's tables would read 16 x RAM: refused, by name.
    let refusal = "table pages for this request";
    let r = ok_or_refused(&live, "pagemap", &["--pid", "1", "--start", "0x10000", "--pages", "1"], refusal);
    assert_eq!(r.code, 65, "16 processes sharing RAM-sized tables: {r:?}");
    ok_or_refused(&live, "dirty-rate", &["--seconds", "0.05"], refusal);
    // Other clients are served meanwhile and afterwards.
    let heavy: Vec<_> = (0..2)
        .map(|_| {
            let sock = live.sock().to_string();
            std::thread::spawn(move || vmm(&["clear-refs", "--api-sock", &sock, "--pid", "2", "4"]))
        })
        .collect();
    let ps = live.client("ps", &["--json"]);
    assert_eq!(ps.code, 0, "{ps:?}");
    assert_eq!(json(&ps).len(), 16, "{ps:?}");
    for h in heavy {
        let r = h.join().unwrap();
        assert_eq!(r.code, 0, "{r:?}");
    }
    let grown = live.peak_rss_mib().saturating_sub(base);
    assert!(grown < 48, "the VMM grew by {grown} MiB over its {base} MiB for a 64 MiB guest");
    finish_cleanly(live);
}

#[test]
fn terabyte_mappings_are_refused_per_request_not_served() {
    require_kvm();
    let live = boot(&["manymaps"], 64, "kvm-bitmap");
    let ps = live.client("ps", &["--json"]);
    assert_eq!(ps.code, 0, "{ps:?}");
    assert_eq!(json(&ps)[0]["mappings"].as_array().map(Vec::len), Some(64), "{ps:?}");
    let r = live.client("pagemap", &["--pid", "1"]);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(r.stderr.contains("exceed the limit"), "{r:?}");
    let dir = tempdir();
    let r = live.client("dump", &["--pid", "1", "--out", dir.path().join("d").to_str().unwrap()]);
    assert_eq!(r.code, 65, "{r:?}");
    let r = live.client("pagemap", &["--pid", "1", "--start", "0x10000", "--pages", "2"]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = live.client("clear-refs", &["--pid", "1"]);
    assert_eq!(r.code, 0, "{r:?}");
    finish_cleanly(live);
}
