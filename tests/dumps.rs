//! Per-process incremental dumps through the real binary: a full dump, then dumps of
//! only the soft-dirty pages, rebuilt by `vmm dump verify` into exactly the memory a
//! full dump reads at the same moment — under the pte engine and a guest-physical one.

mod common;
use common::*;
use std::path::Path;

/// p writes, unmaps and remaps, and reads a shared page that q keeps writing (soft-dirty
/// is per PTE: q's writes never show in p's bits, so shared pages are always dumped).
/// q never ends, so it is alive at any of p's syncs whatever the scheduler did; p's last
/// sync, `done`, comes after its checks (the tests stop the VMM there).
const SCRIPT: &str = "\
proc p
map 0x400000 64
map 0x800000 16
map 0x600000000000 4 shared
fill 0x400000 64 1
touch 0x800000 4
touch 0x600000000000 1
sync a
fill 0x400000 8 2
unmap 0x800000 16
map 0x800000 4
fill 0x801000 1 5
loop 5
  yield
end
sync b
fill 0x410000 4 3
touch 0x803000 1
loop 5
  yield
end
sync c
check 0x400000 8 2
check 0x410000 4 3
sync done
exit 0
proc q
map 0x600000000000 4 shared
loop 1000000000
  fill 0x600000000000 1 7
  yield
  fill 0x600000000000 1 8
  yield
end
";

fn dump(live: &Live, out: &Path, prev: Option<&Path>) -> Run {
    let mut args = vec!["--pid", "1", "--out", out.to_str().unwrap()];
    if let Some(p) = prev {
        args.extend(["--prev", p.to_str().unwrap()]);
    }
    live.client("dump", &args)
}

fn counts(dir: &Path) -> serde_json::Value {
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    m["counts"].clone()
}

/// The digest `vmm dump verify` prints for the memory it rebuilt.
fn verified_digest(dir: &Path) -> String {
    let r = vmm(&["dump", "verify", dir.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    let line = r.stdout.lines().find(|l| l.contains("digest")).unwrap_or_else(|| panic!("{r:?}"));
    line.rsplit(' ').next().unwrap().to_string()
}

fn dump_chain_rebuilds_the_process(engine: &str) {
    let live = Live::start(SCRIPT, &["--engine", engine]);
    let dir = tempdir();
    let d = dir.path().to_path_buf();
    // VM snapshots at the same pauses: the dumps' soft-dirty clears must not hide
    // writes from the snapshot diffs.
    let snapshot = |name: &str, diff: bool| {
        let out = d.join(name);
        let mut args = vec!["snapshot", "create", "--api-sock", live.sock(), "--out", out.to_str().unwrap()];
        if diff {
            args.push("--diff");
        }
        let r = vmm(&args);
        assert_eq!(r.code, 0, "{r:?}");
    };
    live.wait("a");
    snapshot("snap-a", false);
    assert_eq!(dump(&live, &d.join("d0"), None).code, 0);
    live.resume();
    live.wait("b");
    let r = dump(&live, &d.join("d1"), Some(&d.join("d0")));
    assert_eq!(r.code, 0, "{r:?}");
    snapshot("snap-b", true);
    live.resume();
    live.wait("c");
    let r = dump(&live, &d.join("d2"), Some(&d.join("d1")));
    assert_eq!(r.code, 0, "{r:?}");
    snapshot("snap-c", true);
    snapshot("snap-c-full", false);
    // A full dump at the same moment reads the guest's memory directly.
    assert_eq!(dump(&live, &d.join("full"), None).code, 0);
    live.resume();
    // p's checks after the dumps passed (q runs on; dropping `live` stops the VMM).
    live.wait("done");

    // Full: 64 written + the shared page; 4 + 0 read-only zero pages.
    let c0 = counts(&d.join("d0"));
    assert_eq!((c0["data"].as_u64(), c0["parent"].as_u64()), (Some(65), Some(0)), "{c0}");
    assert_eq!(c0["zero"], 4, "{c0}");
    // d1: the 8 rewritten pages, the page written in the new mapping, the shared page
    // (the gpa engines may add frames written around them, never fewer).
    let c1 = counts(&d.join("d1"));
    let data1 = c1["data"].as_u64().unwrap();
    assert!((10..=12).contains(&data1), "{c1}");
    assert_eq!(data1 + c1["parent"].as_u64().unwrap(), 64 + 1 + 1, "{c1}");
    let c2 = counts(&d.join("d2"));
    let data2 = c2["data"].as_u64().unwrap();
    assert!((5..=7).contains(&data2), "4 written + shared: {c2}");
    assert_eq!(c2["zero"], 1, "the page read in the new mapping: {c2}");

    assert_eq!(verified_digest(&d.join("d2")), verified_digest(&d.join("full")), "the chain rebuilds the process exactly");
    let memory = |dir: &str| {
        let mem = vmm::machine::memory::create(256 << 20).unwrap();
        vmm::storage::snapshot::load(&d.join(dir), Some(&mem)).unwrap();
        vmm::machine::memory::read(&mem, 0, 256 << 20).unwrap()
    };
    assert!(memory("snap-c") == memory("snap-c-full"), "the snapshot chain equals a full snapshot despite the dumps' clears");
    let chain = vmm::storage::dump::reconstruct(&d.join("d2")).unwrap();
    let full = vmm::storage::dump::reconstruct(&d.join("full")).unwrap();
    assert_eq!(chain.chain.len(), 3);
    assert_eq!(chain.mappings, full.mappings);
    assert_eq!(chain.pages, full.pages);
    // And it is not simply the first dump again: the rewritten pages changed.
    let first = vmm::storage::dump::reconstruct(&d.join("d0")).unwrap();
    assert_ne!(first.pages.get(&0x400000), chain.pages.get(&0x400000));
    assert_eq!(first.pages.get(&0x420000), chain.pages.get(&0x420000));
}

#[test]
fn a_dump_chain_rebuilds_the_process_exactly_pte() {
    dump_chain_rebuilds_the_process("pte");
}

#[test]
fn a_dump_chain_rebuilds_the_process_exactly_kvm_bitmap() {
    dump_chain_rebuilds_the_process("kvm-bitmap");
}

#[test]
fn dumps_refuse_a_prev_that_soft_dirty_cannot_vouch_for() {
    let live = Live::start(SCRIPT, &[]);
    let dir = tempdir();
    let d = dir.path().to_path_buf();
    live.wait("a");
    let refused = |r: Run, msg: &str| {
        assert_eq!(r.code, 65, "{r:?}");
        assert!(r.stderr.contains(msg), "should say '{msg}': {r:?}");
    };
    assert_eq!(dump(&live, &d.join("d0"), None).code, 0);
    assert_eq!(live.client("dump", &["--pid", "2", "--out", d.join("q0").to_str().unwrap()]).code, 0);
    refused(dump(&live, &d.join("x"), Some(&d.join("q0"))), "is a dump of pid 2");
    refused(dump(&live, &d.join("d0"), None), "already exists");
    refused(live.client("dump", &["--pid", "9", "--out", d.join("y").to_str().unwrap()]), "no process with pid 9");
    live.resume();
    live.wait("b");
    // A failed dump clears nothing: the next one still has every page written since d0.
    let r = dump(&live, &d.join("d0/pages.bin/x"), Some(&d.join("d0")));
    assert!(r.code != 0, "{r:?}");
    assert_eq!(dump(&live, &d.join("d1"), Some(&d.join("d0"))).code, 0);
    assert!(counts(&d.join("d1"))["data"].as_u64().unwrap() >= 10);
    // Only the latest dump vouches for what changed.
    refused(dump(&live, &d.join("x"), Some(&d.join("d0"))), "the latest dump of pid 1 is");
    // After a clear-refs nobody knows what changed since d1.
    assert_eq!(live.client("clear-refs", &["--pid", "1"]).code, 0);
    refused(dump(&live, &d.join("x"), Some(&d.join("d1"))), "were cleared (clear-refs) after that dump");
    assert_eq!(dump(&live, &d.join("d2"), None).code, 0, "a full dump starts a new chain");
    live.resume();
    live.wait("c");
    live.resume();
    live.wait("done");
    drop(live);

    // Damaged chains are refused by verify, naming the culprit.
    let bad = |dir: &Path, msg: &str| {
        let r = vmm(&["dump", "verify", dir.to_str().unwrap()]);
        assert_eq!(r.code, 64, "{r:?}");
        assert!(r.stderr.contains(msg), "should say '{msg}': {r:?}");
    };
    let pages = d.join("d0/pages.bin");
    let mut bytes = std::fs::read(&pages).unwrap();
    bytes[5000] ^= 1;
    std::fs::write(&pages, &bytes).unwrap();
    bad(&d.join("d1"), "pages.bin does not match its checksum");
    bytes[5000] ^= 1;
    std::fs::write(&pages, &bytes).unwrap();
    assert_eq!(vmm(&["dump", "verify", d.join("d1").to_str().unwrap()]).code, 0);
    std::fs::rename(d.join("d0"), d.join("gone")).unwrap();
    bad(&d.join("d1"), "manifest.json");
    std::fs::rename(d.join("q0"), d.join("d0")).unwrap();
    bad(&d.join("d1"), "expects previous dump");
}
