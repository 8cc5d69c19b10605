//! Hostile input through the real binary: snapshot and dump chains that loop, sizes that
//! wrap or are out of proportion to the files, FIFOs and devices where files belong,
//! files over their limits, an image without room for the boot data, and `--restore`
//! with flags the snapshot decides. Each is refused with exit 64 (65 for a request to a
//! running VMM) and a message naming the culprit.
//!
//! Most need no guest: the files are written by hand. Commands run under
//! [`guarded`]: 1 GiB of address space, and killed (failing the test) if still running
//! after 60 s — a hang detector, not a timing assertion.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AS_LIMIT: u64 = 1 << 30;
const HANG: Duration = Duration::from_secs(60);

/// Runs `vmm ARGS` with at most [`AS_LIMIT`] of address space; fails the test if it is
/// still running after [`HANG`] (it blocked, or reads without end).
fn guarded(args: &[&str]) -> Run {
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut cmd = Command::new(vmm_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // setrlimit(2), which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit { rlim_cur: AS_LIMIT, rlim_max: AS_LIMIT };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn vmm");
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("vmm {args:?} still ran after {HANG:?}: it blocked or read without bound");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap()).into_owned();
    Run { code: status.code().unwrap_or(-1), stdout: read(&out), stderr: read(&err) }
}

fn refused(args: &[&str], code: i32, msg: &str) {
    let r = guarded(args);
    assert_eq!(r.code, code, "{args:?}: {r:?}");
    assert!(r.stderr.contains(msg), "{args:?} should say '{msg}': {r:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn mkfifo(p: &Path) {
    let c = std::ffi::CString::new(s(p)).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", p.display());
}

// ---- snapshots written by hand (format: docs/snapshots.md) ----

const MEM: u64 = 1 << 20;
const TAGS: [&str; 12] =
    ["regs", "sregs", "fpu", "lapic", "events", "debugregs", "msrs", "pic0", "pic1", "ioapic", "clock", "serial"];

/// A state.bin with every section present (and empty).
fn state_bin() -> Vec<u8> {
    let mut out = Vec::new();
    for t in TAGS {
        out.extend((t.len() as u32).to_le_bytes());
        out.extend(t.as_bytes());
        out.extend(0u64.to_le_bytes());
    }
    out
}

fn snapshot_manifest(id: &str, base: Option<(&Path, &str)>, pages: u64) -> Value {
    json!({
        "format": "softdirty-vmm-snapshot", "version": 2, "id": id,
        "kind": if base.is_some() { "diff" } else { "full" },
        "base": base.map(|(p, id)| json!({"path": s(p), "id": id})),
        "mem_bytes": MEM, "engine": "pte",
        "image_sha256": vmm::storage::snapshot::sha256_hex(vmm::machine::image::EMBEDDED_KERNEL),
        "pages": pages, "checksum": "blake3", "files": {},
    })
}

/// Writes `files` into `dir` and `m`, with their checksums, as its manifest.
fn put(dir: &Path, mut m: Value, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, data) in files {
        std::fs::write(dir.join(name), data).unwrap();
        m["files"][*name] = json!(vmm::storage::checksum::of(data));
    }
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// A valid full snapshot of a 1 MiB guest whose memory is all zeros.
fn full_snapshot(dir: &Path, id: &str) {
    put(dir, snapshot_manifest(id, None, 0), &[("memory.bin", &vec![0; MEM as usize]), ("state.bin", &state_bin())]);
}

fn both_refuse(dir: &Path, msg: &str) {
    refused(&["snapshot", "verify", s(dir)], 64, msg);
    refused(&["run", "--restore", s(dir)], 64, msg);
}

#[test]
fn snapshot_and_dump_chains_that_loop_are_refused() {
    let t = tempdir();
    let d = t.path();
    // A merge result that names itself as its base: resolving it replaced it by itself.
    let me = d.join("self");
    let mut m = snapshot_manifest("x", Some((&me, "y")), 0);
    m["merged"] = json!(["y"]);
    put(&me, m, &[]);
    both_refuse(&me, &format!("its base {} is already in the chain", me.display()));
    // Two merge results, each standing in for the other.
    let (a, b) = (d.join("a"), d.join("b"));
    let mut m = snapshot_manifest("x", Some((&b, "y")), 0);
    m["merged"] = json!(["z"]);
    put(&a, m, &[]);
    let mut m = snapshot_manifest("x", Some((&a, "z")), 0);
    m["merged"] = json!(["y"]);
    put(&b, m, &[]);
    both_refuse(&a, "(a loop)");

    // A dump that is its own previous dump, and two that are each other's.
    let dump = |dir: &Path, id: &str, prev: &Path, prev_id: &str| {
        let m = json!({
            "format": "softdirty-vmm-dump", "version": 1, "id": id, "pid": 1, "name": "p",
            "prev": {"path": s(prev), "id": prev_id},
            "mappings": [], "counts": {"data": 0, "zero": 0, "parent": 0, "absent": 0},
            "checksum": "blake3", "files": {},
        });
        put(dir, m, &[("pagemap.bin", b""), ("pages.bin", b"")]);
    };
    let d0 = d.join("d0");
    dump(&d0, "a", &d0, "a");
    refused(&["dump", "verify", s(&d0)], 64, &format!("its previous dump {} is already in the chain", d0.display()));
    let d1 = d.join("d1");
    dump(&d0, "a", &d1, "b");
    dump(&d1, "b", &d0, "a");
    refused(&["dump", "verify", s(&d1)], 64, "is already in the chain");
}

#[test]
fn page_counts_are_checked_against_the_guest_and_the_files() {
    let t = tempdir();
    let d = t.path();
    let full = d.join("full");
    full_snapshot(&full, "f");
    assert_eq!(guarded(&["snapshot", "verify", s(&full)]).code, 0, "the hand-made base is valid");
    // 2^61 pages: * 8 and * 4096 wrap to 0, matching two empty files.
    let diff = d.join("diff");
    put(&diff, snapshot_manifest("d", Some((&full, "f")), 1 << 61), &[("pages.bin", b""), ("memory.bin", b""), ("state.bin", &state_bin())]);
    both_refuse(&diff, "pages = 2305843009213693952 is more than the guest's 256 frames");
    // A count the files do not have, found before they are read.
    put(&diff, snapshot_manifest("d", Some((&full, "f")), 3), &[("pages.bin", &[0; 16]), ("memory.bin", b""), ("state.bin", &state_bin())]);
    both_refuse(&diff, "pages.bin is 16 bytes, but pages = 3 needs 24");
}

fn dump_manifest(mappings: Value, data: u64) -> Value {
    json!({
        "format": "softdirty-vmm-dump", "version": 1, "id": "a", "pid": 1, "name": "p", "prev": null,
        "mappings": mappings, "counts": {"data": data, "zero": 0, "parent": 0, "absent": 0},
        "checksum": "blake3", "files": {},
    })
}

fn mapping(start: u64, pages: u64) -> Value {
    json!({"start": start, "pages": pages, "read_only": false, "huge": false, "shared": false})
}

fn run_bytes(va: u64, pages: u32, kind: u32) -> Vec<u8> {
    [&va.to_le_bytes()[..], &pages.to_le_bytes(), &kind.to_le_bytes()].concat()
}

#[test]
fn dump_verify_work_is_bounded_by_the_files() {
    let t = tempdir();
    let d = t.path().join("d");
    // 16 bytes of pagemap.bin claiming 16 TiB of zero pages: verified as one range.
    let pagemap = run_bytes(0x40_0000, u32::MAX, 1);
    put(&d, dump_manifest(json!([mapping(0x40_0000, u32::MAX as u64)]), 0), &[("pagemap.bin", &pagemap), ("pages.bin", b"")]);
    let r = guarded(&["dump", "verify", s(&d)]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("1 mappings, 4294967295 pages present (4294967295 zero)"), "{r:?}");
    // More mappings than a guest process can have (and one run in each): refused
    // before any run is matched against them.
    let maps: Vec<Value> = (0..5000u64).map(|i| mapping(0x40_0000 + 2 * i * 4096, 1)).collect();
    let pagemap: Vec<u8> = (0..5000u64).flat_map(|i| run_bytes(0x40_0000 + 2 * i * 4096, 1, 1)).collect();
    put(&d, dump_manifest(json!(maps), 0), &[("pagemap.bin", &pagemap), ("pages.bin", b"")]);
    refused(&["dump", "verify", s(&d)], 64, "5000 mappings, more than a guest process can have (64)");
    // Data pages claimed beyond any guest's memory.
    put(&d, dump_manifest(json!([mapping(0x40_0000, 1)]), 1 << 62), &[("pagemap.bin", b""), ("pages.bin", b"")]);
    refused(&["dump", "verify", s(&d)], 64, "counts.data = 4611686018427387904 is more than the largest guest's");
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let t = tempdir();
    let d = t.path();
    let fifo = d.join("fifo");
    mkfifo(&fifo);
    let zero = d.join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    refused(&["run", s(&fifo)], 64, &format!("cannot read image {}: is a FIFO, not a regular file", fifo.display()));
    refused(&["run", s(&zero)], 64, "is a character device, not a regular file");
    refused(&["run", "--workload", s(&fifo)], 64, &format!("cannot read workload {}: is a FIFO", fifo.display()));
    refused(&["run", "--workload", s(&zero)], 64, "is a character device, not a regular file");

    // A full snapshot whose memory.bin is a FIFO; a diff whose pages.bin is one.
    let full = d.join("full");
    full_snapshot(&full, "f");
    std::fs::remove_file(full.join("memory.bin")).unwrap();
    mkfifo(&full.join("memory.bin"));
    both_refuse(&full, "memory.bin: is a FIFO, not a regular file");
    let (base, diff) = (d.join("base"), d.join("diff"));
    full_snapshot(&base, "b");
    put(&diff, snapshot_manifest("d", Some((&base, "b")), 0), &[("memory.bin", b""), ("state.bin", &state_bin())]);
    mkfifo(&diff.join("pages.bin"));
    both_refuse(&diff, "pages.bin: is a FIFO, not a regular file");

    // Manifests that are /dev/zero, for snapshots and dumps.
    let link = d.join("link");
    std::fs::create_dir(&link).unwrap();
    std::os::unix::fs::symlink("/dev/zero", link.join("manifest.json")).unwrap();
    both_refuse(&link, "manifest.json: is a character device, not a regular file");
    refused(&["dump", "verify", s(&link)], 64, "manifest.json: is a character device, not a regular file");
    // A dump whose pagemap.bin is a FIFO.
    let dump = d.join("dump");
    put(&dump, dump_manifest(json!([mapping(0x40_0000, 1)]), 0), &[("pages.bin", b"")]);
    mkfifo(&dump.join("pagemap.bin"));
    refused(&["dump", "verify", s(&dump)], 64, "pagemap.bin: is a FIFO, not a regular file");
}

#[test]
fn files_over_their_documented_limits_are_refused() {
    let t = tempdir();
    let d = t.path();
    // A valid manifest padded past 1 MiB.
    let full = d.join("full");
    full_snapshot(&full, "f");
    let man = full.join("manifest.json");
    let mut text = std::fs::read(&man).unwrap();
    let valid = text.clone();
    text.resize((1 << 20) + 1, b' ');
    std::fs::write(&man, &text).unwrap();
    both_refuse(&full, "manifest.json: is 1048577 bytes, more than the limit of 1048576");
    std::fs::write(&man, &valid).unwrap();
    // A state.bin (checksum and all) past 4 MiB.
    let mut state = state_bin();
    state.resize((4 << 20) + 1, 0);
    put(&full, snapshot_manifest("f", None, 0), &[("memory.bin", &vec![0; MEM as usize]), ("state.bin", &state)]);
    both_refuse(&full, "state.bin: is 4194305 bytes, more than the limit of 4194304");
    // A workload past 256 KiB and an image past 64 MiB (sparse).
    let w = d.join("w.wl");
    std::fs::write(&w, vec![b'\n'; (256 << 10) + 1]).unwrap();
    refused(&["run", "--workload", s(&w)], 64, "is 262145 bytes, more than the limit of 262144");
    let img = d.join("big.elf");
    std::fs::File::create(&img).unwrap().set_len((64 << 20) + 1).unwrap();
    refused(&["run", s(&img)], 64, &format!("cannot read image {}: is 67108865 bytes, more than the limit of 67108864", img.display()));
}

/// An x86-64 ELF with one loadable segment from 1 MiB to `end` (a `hlt` and bss).
fn elf_ending_at(end: u64) -> Vec<u8> {
    let base = 0x10_0000u64;
    let mut f = Vec::new();
    f.extend([0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    f.extend(2u16.to_le_bytes()); // executable
    f.extend(62u16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(base.to_le_bytes()); // entry
    f.extend(64u64.to_le_bytes()); // program headers
    f.extend(0u64.to_le_bytes()); // no sections
    f.extend(0u32.to_le_bytes());
    for half in [64u16, 56, 1, 64, 0, 0] {
        f.extend(half.to_le_bytes());
    }
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // r-x
    for word in [0, base, base, 128, end - base, 0x1000] {
        f.extend(u64::to_le_bytes(word));
    }
    f.resize(128, 0xf4);
    f
}

#[test]
fn an_image_without_room_for_the_boot_data_is_bad_input() {
    let t = tempdir();
    let img = t.path().join("k.elf");
    // Ends exactly at the end of a 16 MiB guest: the script does not fit after it.
    std::fs::write(&img, elf_ending_at(16 << 20)).unwrap();
    let msg = format!("guest memory is too small for {}", img.display());
    refused(&["run", s(&img), "--mem", "16"], 64, &msg);
    // Room for the script but not for the guest's 8 MiB.
    std::fs::write(&img, elf_ending_at(12 << 20)).unwrap();
    refused(&["run", s(&img), "--mem", "16"], 64, &msg);
}

// ---- with a guest ----

const SCRIPT: &str = "\
proc p
map 0x400000 4
fill 0x400000 4 1
sync s1
check 0x400000 4 1
exit 0
";

#[test]
fn restore_refuses_mem_and_engine_even_at_their_defaults() {
    require_kvm();
    let t = tempdir();
    let snap = t.path().join("snap");
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    let r = vmm(&["snapshot", "create", "--api-sock", live.sock(), "--out", s(&snap)]);
    assert_eq!(r.code, 0, "{r:?}");
    live.resume();
    assert_eq!(live.finish().code, 0);
    for (flag, value) in [("--mem", "512"), ("--mem", "256"), ("--engine", "kvm-bitmap"), ("--engine", "pte")] {
        let r = vmm(&["run", "--restore", s(&snap), flag, value, "--timeout", "60"]);
        assert_eq!(r.code, 64, "{flag} {value}: {r:?}");
        assert!(r.stderr.contains(&format!("cannot be used with '{flag}")), "{flag} {value}: {r:?}");
        assert!(r.stdout.is_empty(), "no guest ran: {r:?}");
    }
    let r = vmm(&["run", "--restore", s(&snap), "--timeout", "60"]);
    assert_eq!(r.code, 0, "without them the snapshot restores: {r:?}");
}

#[test]
fn a_fifo_as_the_previous_dump_is_refused_and_the_vm_goes_on() {
    require_kvm();
    let t = tempdir();
    let prev: PathBuf = t.path().join("prev");
    std::fs::create_dir(&prev).unwrap();
    mkfifo(&prev.join("manifest.json"));
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    let out = t.path().join("d1");
    refused(&["dump", "--api-sock", live.sock(), "--pid", "1", "--out", s(&out), "--prev", s(&prev)], 65,
        "manifest.json: is a FIFO, not a regular file");
    assert!(!out.exists());
    live.resume();
    let end = live.finish();
    assert_eq!(end.code, 0, "{end:?}");
}
