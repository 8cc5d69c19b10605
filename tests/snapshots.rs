//! Incremental snapshots of the whole VM through the real binary: full + diffs, restore
//! into a new VMM, checksums and chains, and failures that lose nothing.

mod common;
use common::*;
use std::path::Path;

const SCRIPT: &str = "\
proc p
map 0x400000 64
fill 0x400000 64 1
sync s1
fill 0x400000 8 2
sync s2
fill 0x408000 8 3
sync s3
check 0x400000 8 2
check 0x408000 8 3
check 0x410000 48 1
exit 0
proc q
map 0x400000 4
fill 0x400000 4 9
loop 20
  yield
end
check 0x400000 4 9
";

fn snap(live: &Live, out: &Path, diff: bool) -> Run {
    let mut args = vec!["create", "--api-sock", live.sock(), "--out", out.to_str().unwrap()];
    if diff {
        args.push("--diff");
    }
    vmm(&[&["snapshot"][..], &args].concat())
}

/// Runs SCRIPT to s3 taking full@s1, diff@s2, diff@s3 (+ a full at s3 for comparison),
/// then kills the source VM. Returns the snapshot directory.
fn make_chain() -> tempfile::TempDir {
    make_chain_with(&[])
}

/// `make_chain` with extra `vmm run` arguments (an engine).
fn make_chain_with(extra: &[&str]) -> tempfile::TempDir {
    let dir = tempdir();
    let d = dir.path();
    let mut live = Live::start(SCRIPT, extra);
    for (label, name, diff) in [("s1", "full", false), ("s2", "d1", true), ("s3", "d2", true)] {
        live.wait(label);
        let r = snap(&live, &d.join(name), diff);
        assert_eq!(r.code, 0, "{name}: {r:?}");
        if label == "s3" {
            let r = snap(&live, &d.join("full3"), false);
            assert_eq!(r.code, 0, "{r:?}");
        } else {
            live.resume();
        }
    }
    let _ = live.child.kill();
    let _ = live.child.wait();
    dir
}

#[test]
fn restoring_the_last_diff_finishes_the_workload() {
    require_kvm();
    let dir = make_chain();
    let d = dir.path();
    let v = vmm(&["snapshot", "verify", d.join("d2").to_str().unwrap()]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.stdout.contains("chain of 3 snapshot(s) verified"), "{v:?}");
    let r = vmm(&["run", "--restore", d.join("d2").to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(r.code, 0, "every check passes after the restore: {r:?}");
    assert!(r.stdout.contains("kernel: all processes exited 0"), "{r:?}");
    // The diffs hold what was written (plus guest-kernel pages), not the whole guest.
    // q runs unordered with p's syncs: its 4 pages (and page tables) may land in `full`,
    // in d1 or in d2; the bounds hold wherever they do (q in d1: ~22 pages).
    let pages = |name: &str| {
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join(name).join("manifest.json")).unwrap()).unwrap();
        m["pages"].as_u64().unwrap()
    };
    assert!(pages("d1") >= 8 && pages("d1") < 40, "d1 has {} pages", pages("d1"));
    assert!(pages("full") >= 64, "at least p's 64 pages written before s1");
}

/// Guest memory as restoring `dir` (and its chain) would set it.
fn memory_of(dir: &Path) -> Vec<u8> {
    let size = vmm::storage::snapshot::read_manifest(dir).unwrap().mem_bytes;
    let mem = vmm::machine::memory::create(size).unwrap();
    vmm::storage::snapshot::load(dir, Some(&mem)).unwrap();
    vmm::machine::memory::read(&mem, 0, size as usize).unwrap()
}

fn assert_same_memory(a: &Path, b: &Path) {
    let (a, b) = (memory_of(a), memory_of(b));
    let first = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(first.is_none(), "memory differs first at {:#x}", first.unwrap_or(0));
}

fn manifest(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn a_restored_chain_equals_the_source_memory_byte_for_byte() {
    require_kvm();
    let dir = make_chain();
    assert_same_memory(&dir.path().join("d2"), &dir.path().join("full3"));
}

#[test]
fn merging_diffs_rolls_the_full_base_forward() {
    require_kvm();
    let dir = make_chain();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (full_id, d1_id, d2_id) = (manifest(&d.join("full"))["id"].clone(), manifest(&d.join("d1"))["id"].clone(), manifest(&d.join("d2"))["id"].clone());
    // Only a diff onto its own base.
    let r = vmm(&["snapshot", "merge", &p("d2"), "--into", &p("full")]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("its base is snapshot"), "{r:?}");
    let r = vmm(&["snapshot", "merge", &p("full3"), "--into", &p("full")]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("only a diff can be merged"), "{r:?}");
    assert_eq!(manifest(&d.join("full"))["id"], full_id, "refused merges leave the base alone");

    let r = vmm(&["snapshot", "merge", &p("d1"), "--into", &p("full")]);
    assert_eq!(r.code, 0, "{r:?}");
    let m = manifest(&d.join("full"));
    assert_eq!((m["id"].clone(), m["kind"].as_str()), (d1_id, Some("full")), "{m}");
    assert_eq!(m["merged"], serde_json::json!([full_id]));
    // d2 was built on d1: its chain now goes through the merged base.
    let v = vmm(&["snapshot", "verify", &p("d2")]);
    assert_eq!(v.code, 0, "{v:?}");
    assert!(v.stdout.contains("chain of 2 snapshot(s)"), "{v:?}");
    assert_same_memory(&d.join("d2"), &d.join("full3"));

    // Rolling on: the base becomes d2's point in time, equal to a full snapshot there.
    let r = vmm(&["snapshot", "merge", &p("d2"), "--into", &p("full")]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(manifest(&d.join("full"))["id"], d2_id);
    assert_same_memory(&d.join("full"), &d.join("full3"));
    let entries: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(entries.iter().all(|n| !n.contains(".tmp-")), "no staging left: {entries:?}");
    let r = vmm(&["run", "--restore", &p("full"), "--timeout", "60"]);
    assert_eq!(r.code, 0, "the merged snapshot runs the workload to the end: {r:?}");
}

#[test]
fn a_diff_merges_into_a_diff() {
    require_kvm();
    let dir = make_chain();
    let d = dir.path();
    let p = |n: &str| d.join(n).to_str().unwrap().to_string();
    let (n1, n2) = (manifest(&d.join("d1"))["pages"].as_u64().unwrap(), manifest(&d.join("d2"))["pages"].as_u64().unwrap());
    let r = vmm(&["snapshot", "merge", &p("d2"), "--into", &p("d1")]);
    assert_eq!(r.code, 0, "{r:?}");
    let m = manifest(&d.join("d1"));
    assert_eq!(m["kind"], "diff");
    let pages = m["pages"].as_u64().unwrap();
    assert!(pages >= n1.max(n2) && pages <= n1 + n2, "union of {n1} and {n2} pages: {pages}");
    assert_same_memory(&d.join("d1"), &d.join("full3"));
    // A flipped byte in the base is refused and the base is left as it was.
    let mem = d.join("full/memory.bin");
    let mut bytes = std::fs::read(&mem).unwrap();
    bytes[4096 * 300] ^= 0x40;
    std::fs::write(&mem, &bytes).unwrap();
    let r = vmm(&["snapshot", "merge", &p("d1"), "--into", &p("full")]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("memory.bin does not match its checksum"), "{r:?}");
    assert_eq!(std::fs::read(&mem).unwrap(), bytes, "untouched");
    bytes[4096 * 300] ^= 0x40;
    std::fs::write(&mem, &bytes).unwrap();
    let r = vmm(&["snapshot", "merge", &p("d1"), "--into", &p("full")]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_same_memory(&d.join("full"), &d.join("full3"));
    let r = vmm(&["run", "--restore", &p("full"), "--timeout", "60"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn corrupted_truncated_or_mismatched_snapshots_are_refused() {
    require_kvm();
    let dir = make_chain();
    let d = dir.path();
    let refuse = |target: &Path, msg: &str| {
        for args in [vec!["snapshot", "verify", target.to_str().unwrap()], vec!["run", "--restore", target.to_str().unwrap()]] {
            let r = vmm(&args);
            assert_eq!(r.code, 64, "{args:?}: {r:?}");
            assert!(r.stderr.contains(msg), "{args:?} should say '{msg}': {r:?}");
            assert!(r.stdout.is_empty() || args[0] == "snapshot", "no guest ran: {r:?}");
        }
    };
    // A flipped byte in a diff's memory.
    let mem = d.join("d1/memory.bin");
    let mut bytes = std::fs::read(&mem).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&mem, &bytes).unwrap();
    refuse(&d.join("d2"), "memory.bin does not match its checksum");
    bytes[100] ^= 1;
    std::fs::write(&mem, &bytes).unwrap();
    // Truncated state.
    let st = d.join("d2/state.bin");
    let orig = std::fs::read(&st).unwrap();
    std::fs::write(&st, &orig[..orig.len() / 2]).unwrap();
    refuse(&d.join("d2"), "state.bin does not match its checksum");
    std::fs::write(&st, &orig).unwrap();
    // The wrong base: d1 replaced by another snapshot.
    std::fs::rename(d.join("d1"), d.join("d1-real")).unwrap();
    std::fs::rename(d.join("full3"), d.join("d1")).unwrap();
    refuse(&d.join("d2"), "expects base");
    std::fs::rename(d.join("d1"), d.join("full3")).unwrap();
    std::fs::rename(d.join("d1-real"), d.join("d1")).unwrap();
    // Not a snapshot at all; a manifest from the future.
    refuse(d, "manifest.json");
    let man = d.join("full/manifest.json");
    let text = std::fs::read_to_string(&man).unwrap();
    std::fs::write(&man, text.replace("\"version\": 2", "\"version\": 99")).unwrap();
    refuse(&d.join("full"), "version 99");
    std::fs::write(&man, text).unwrap();
    assert_eq!(vmm(&["snapshot", "verify", d.join("d2").to_str().unwrap()]).code, 0, "intact again");
}

#[test]
fn a_failed_snapshot_loses_nothing_and_the_vm_goes_on() {
    let dir = tempdir();
    let d = dir.path();
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    // A diff needs a base; an existing directory is never overwritten; an unwritable
    // place fails cleanly.
    let r = snap(&live, &d.join("x"), true);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(r.stderr.contains("create a full snapshot of this VM first"), "{r:?}");
    assert_eq!(snap(&live, &d.join("full"), false).code, 0);
    let r = snap(&live, &d.join("full"), false);
    assert!(r.code != 0 && r.stderr.contains("already exists"), "{r:?}");
    live.resume();
    live.wait("s2");
    let blocker = d.join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let r = snap(&live, &blocker.join("d1"), true);
    assert!(r.code != 0, "{r:?}");
    assert!(!blocker.join("d1").exists());
    // The pages written since `full` are still in the next diff.
    assert_eq!(snap(&live, &d.join("d1"), true).code, 0);
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("d1/manifest.json")).unwrap()).unwrap();
    assert!(m["pages"].as_u64().unwrap() >= 8, "{m}");
    live.resume();
    let r = live.drive(|_, _, _| {});
    assert_eq!(r.code, 0, "the VM went on: {r:?}");
    let restored = vmm(&["run", "--restore", d.join("d1").to_str().unwrap()]);
    assert_eq!(restored.code, 0, "{restored:?}");
}

#[test]
fn a_progress_bar_is_drawn_on_a_terminal_and_only_there() {
    let dir = tempdir();
    let d = dir.path();
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    // script(1) gives the client a terminal.
    let cmd = format!("{} snapshot create --api-sock {} --out {}", vmm_bin(), live.sock(), d.join("full").display());
    let out = std::process::Command::new("script").args(["-qefc", &cmd, "/dev/null"]).output().expect("script(1) from util-linux");
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{tty}");
    assert!(tty.contains("snapshot [") && tty.contains("MiB"), "a bar on the terminal: {tty:?}");
    assert!(tty.contains("full snapshot"), "{tty:?}");
    // Not a terminal: no bar, nothing on stderr.
    let r = snap(&live, &d.join("full2"), false);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");
}

/// Restores d1 (taken at s2) with `engine`, lets it run to s3, takes a diff there:
/// the diff holds only what the restored VM wrote, and restores in turn.
fn restored_vm_snapshots_on_its_base(engine: &str) {
    require_kvm();
    let dir = make_chain_with(&["--engine", engine]);
    let d = dir.path();
    let live = Live::restore(&d.join("d1"));
    live.wait("s3");
    let r = snap(&live, &d.join("r1"), true);
    assert_eq!(r.code, 0, "{r:?}");
    live.resume();
    let end = live.finish();
    assert_eq!(end.code, 0, "{end:?}");
    let v = vmm(&["snapshot", "verify", d.join("r1").to_str().unwrap()]);
    assert!(v.code == 0 && v.stdout.contains("chain of 3 snapshot(s)"), "full + d1 + r1: {v:?}");
    assert!(v.stdout.contains(&format!("engine {engine}")), "{v:?}");
    let pages = manifest(&d.join("r1"))["pages"].as_u64().unwrap();
    assert!((8..64).contains(&pages), "only what the restored VM wrote: {pages}");
    let r = vmm(&["run", "--restore", d.join("r1").to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_restored_vm_snapshots_on_top_of_the_snapshot_it_came_from_pte() {
    restored_vm_snapshots_on_its_base("pte");
}

#[test]
fn a_restored_vm_snapshots_on_top_of_the_snapshot_it_came_from_kvm_ring() {
    restored_vm_snapshots_on_its_base("kvm-ring");
}

#[test]
fn a_restored_vm_snapshots_on_top_of_the_snapshot_it_came_from_uffd() {
    restored_vm_snapshots_on_its_base("uffd");
}
