//! Linux's own soft-dirty self-test (tools/testing/selftests/mm/soft-dirty.c of
//! Debian's linux-source-6.12, built unmodified by scripts/soft-dirty-selftest.sh as a
//! static glibc program) run in our guest, where every pagemap read and clear_refs
//! write it makes is answered by the VMM from outside, under each engine.
//!
//! What it must print: TAP `1..15`, every line `ok` (the huge-page test runs for real;
//! the file-backed mprotect test maps a file it creates, unlinks and truncates in our
//! guest's file system), and exit 0; `not ok` anywhere (a lost or invented write)
//! fails. See docs/linux-programs.md and docs/fidelity.md.

mod common;
use common::{require_kvm, vmm};
use std::path::PathBuf;
use std::sync::OnceLock;

/// Built once for the whole binary (the four tests would otherwise all fetch it).
fn selftest() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-selftest");
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/soft-dirty-selftest.sh");
        let out = std::process::Command::new(script).arg(&cache).output().expect("run scripts/soft-dirty-selftest.sh");
        assert!(out.status.success(), "building the self-test failed: {}", String::from_utf8_lossy(&out.stderr));
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

const EXPECTED: [&str; 18] = [
    "TAP version 13",
    "1..15",
    "ok 1 Test test_simple",
    "ok 2 Test test_vma_reuse dirty bit of allocated page",
    "ok 3 Test test_vma_reuse dirty bit of reused address page",
    "ok 4 Test test_hugepage huge page allocation",
    "ok 5 Test test_hugepage huge page dirty bit",
    "ok 6 Test test_mprotect-anon dirty bit of new written page",
    "ok 7 Test test_mprotect-anon soft-dirty clear after clear_refs",
    "ok 8 Test test_mprotect-anon soft-dirty clear after marking RO",
    "ok 9 Test test_mprotect-anon soft-dirty clear after marking RW",
    "ok 10 Test test_mprotect-anon soft-dirty after rewritten",
    "ok 11 Test test_mprotect-file dirty bit of new written page",
    "ok 12 Test test_mprotect-file soft-dirty clear after clear_refs",
    "ok 13 Test test_mprotect-file soft-dirty clear after marking RO",
    "ok 14 Test test_mprotect-file soft-dirty clear after marking RW",
    "ok 15 Test test_mprotect-file soft-dirty after rewritten",
    "# Totals: pass:15 fail:0 xfail:0 xpass:0 skip:0 error:0",
];

fn runs_under(engine: &str) {
    require_kvm();
    let program = selftest();
    let r = vmm(&["run", "--exec", program.to_str().unwrap(), "--engine", engine, "--timeout", "900"]);
    assert!(!r.stdout.contains("not ok"), "a check failed under {engine}: {r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert!(lines.len() >= EXPECTED.len() && lines[..EXPECTED.len()] == EXPECTED, "under {engine}: {r:?}");
    assert_eq!(r.code, 0, "under {engine}: {r:?}");
}

#[test]
fn linux_soft_dirty_selftest_under_pte() {
    runs_under("pte");
}

#[test]
fn linux_soft_dirty_selftest_under_hybrid() {
    runs_under("hybrid");
}

#[test]
fn linux_soft_dirty_selftest_under_kvm_bitmap() {
    runs_under("kvm-bitmap");
}

#[test]
fn linux_soft_dirty_selftest_under_kvm_ring() {
    runs_under("kvm-ring");
}

#[test]
fn linux_soft_dirty_selftest_under_uffd() {
    runs_under("uffd");
}
