//! The foundation end to end: `vmm run` boots the embedded guest kernel under KVM and
//! runs workload scripts as ring-3 processes with their own page tables.

mod common;
use common::*;

#[test]
fn demo_boots_and_exits_zero() {
    require_kvm();
    let r = vmm(&["run"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("kernel: all processes exited 0"), "{r:?}");
    assert!(r.stderr.contains("vmm: sync start (pid 1)"), "{r:?}");
    // The main job: incremental soft-dirty counts per process, found from outside. Each
    // line reports the process at its own sync, so every count is fixed whatever the
    // timer did; only how the three processes' lines interleave follows the scheduler.
    let expected: [(&str, &[&str]); 3] = [
        ("pid 1 ", &[
            "sync start: pid 1 writer: 64 mapped, 64 soft-dirty",
            "sync round: pid 1 writer: 64 mapped, 8 soft-dirty",
            "sync final: pid 1 writer: 64 mapped, 16 soft-dirty",
        ]),
        ("pid 2 ", &[
            "sync reader-mapped: pid 2 reader: 64 mapped, 64 soft-dirty",
            "sync reader-read: pid 2 reader: 64 mapped, 0 soft-dirty",
        ]),
        ("pid 3 ", &[
            "sync huge-mapped: pid 3 hugey: 512 mapped, 512 soft-dirty",
            "sync huge-read: pid 3 hugey: 512 mapped, 0 soft-dirty",
            "sync huge-written: pid 3 hugey: 512 mapped, 512 soft-dirty",
        ]),
    ];
    let lines: Vec<&str> = r.stdout.lines().filter(|l| l.starts_with("sync ")).collect();
    assert_eq!(lines.len(), 8, "one line per sync: {r:?}");
    for (pid, want) in expected {
        let got: Vec<&str> = lines.iter().copied().filter(|l| l.contains(pid)).collect();
        assert_eq!(got, want, "{r:?}");
    }
}

const THREE: &str = "\
# Three processes at the same and at different virtual addresses, interleaved.
proc alpha
map 0x400000 32
loop 4
  fill 0x400000 32 0xa1
  yield
  check 0x400000 32 0xa1
end
map 0x7f0000000000 2
fill 0x7f0000000000 2 0x0f
check 0x7f0000000000 2 0x0f
exit 0
proc beta
map 0x400000 32
loop 4
  fill 0x400000 16 0xb2
  yield
  check 0x400000 16 0xb2
  check 0x410000 16 0
end
exit 0
proc gamma
map 0x600000 8
loop 3
  loop 2
    fill 0x600000 8 0xc3
    yield
  end
  check 0x600000 8 0xc3
end
check 0x600000 8 CHECKBYTE
exit 0
";

#[test]
fn three_processes_interleave_with_private_memory() {
    let r = run_script(&THREE.replace("CHECKBYTE", "0xc3"), &[]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_wrong_check_fails_the_run_naming_the_process() {
    let r = run_script(&THREE.replace("CHECKBYTE", "0xc4"), &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stdout.contains("pid 3 (gamma): line 31: check failed at 0x600000: expected 0xc4, found 0xc3"), "{r:?}");
    assert!(r.stdout.contains("first failure: pid 3 (gamma) with status 1"), "{r:?}");
}

#[test]
fn exit_status_is_the_first_failing_process_code() {
    // Which of a and c fails first is the scheduler's choice, so the host watches: a
    // fails only after its last sync, and at each sync `ps` shows whether c already
    // failed. Once it has, c failed first (whatever pid order or code size suggest).
    let script = "proc a\nloop 50\n  yield\n  sync poll\nend\nexit 9\nproc b\nexit 0\nproc c\nexit 7\n";
    let mut c_first = false;
    let r = Live::start(script, &[]).drive(|live, _, _| {
        if !c_first {
            let c = &live.ps()[2];
            assert!(c["state"] == "running" || (c["state"] == "exited" && c["exit_code"] == 7), "{c}");
            c_first = c["state"] == "exited";
        }
    });
    if c_first {
        assert_eq!(r.code, 7, "c failed first: {r:?}");
        assert!(r.stdout.contains("first failure: pid 3 (c) with status 7"), "{r:?}");
    } else {
        // c still ran at a's last sync (never seen so far): either may have failed first.
        let first = if r.code == 7 { "pid 3 (c) with status 7" } else { "pid 1 (a) with status 9" };
        assert!(r.code == 7 || r.code == 9, "{r:?}");
        assert!(r.stdout.contains(&format!("first failure: {first}")), "{r:?}");
    }
}

#[test]
fn writing_read_only_or_unmapped_memory_kills_only_that_process() {
    let script = "\
proc ro
map 0x400000 1 ro
touch 0x400000 1
fill 0x400000 1 1
exit 0
proc unmapped
fill 0x900000 1 1
proc survivor
map 0x400000 4
fill 0x400000 4 0x55
yield
yield
check 0x400000 4 0x55
";
    let r = run_script(script, &[]);
    assert!(r.stdout.contains("kernel: pid 1 (ro): write to read-only mapping at 0x400000, killed"), "{r:?}");
    assert!(r.stdout.contains("kernel: pid 2 (unmapped): segmentation fault: no mapping at 0x900000, killed"), "{r:?}");
    assert_eq!(r.code, 139, "{r:?}");
    assert!(!r.stdout.contains("pid 3 (survivor): line"), "the survivor's checks pass: {r:?}");
}

#[test]
fn protect_unmap_and_remap_behave_like_linux() {
    let script = "\
proc p
map 0x400000 16
fill 0x400000 16 0xee
protect 0x404000 4 ro
check 0x404000 4 0xee
protect 0x404000 4 rw
fill 0x404000 4 0x11
check 0x400000 4 0xee
check 0x404000 4 0x11
unmap 0x400000 16
map 0x400000 16
check 0x400000 16 0
fill 0x400000 16 0x22
map 0x408000 8
check 0x400000 8 0x22
check 0x408000 8 0
unmap 0x500000 4
exit 0
proc after
map 0x600000 64
check 0x600000 64 0
fill 0x600000 64 0x33
check 0x600000 64 0x33
";
    let r = run_script(script, &[]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn freed_frames_come_back_zeroed() {
    // Fill, unmap and remap far more memory than the guest has: only recycled frames,
    // zeroed by the VMM on the guest's request, can satisfy it. ~24,000 page faults take
    // ~20 s of guest time on an idle host and ~55 s with two CPU hogs: the timeout (guest
    // time, which includes time the host takes the CPU away) only guards against a hang.
    let script = "\
proc churn
loop 12
  map 0x400000 2048
  check 0x400000 2048 0
  fill 0x400000 2048 0xff
  unmap 0x400000 2048
end
";
    let r = run_script(script, &["--mem", "32", "--timeout", "600"]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn huge_mappings_work() {
    let script = "\
proc h
map 0x40000000 1024 huge
fill 0x40000000 1 0x44
check 0x40001000 511 0
fill 0x40200000 512 0x45
check 0x40000000 1 0x44
check 0x40200000 512 0x45
unmap 0x40000000 512
check 0x40200000 512 0x45
exit 0
";
    let r = run_script(script, &[]);
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn ring3_cannot_hog_the_cpu() {
    // The spinner never yields and never finishes: other reaches its sync only if the
    // timer preempts the spinner (no race with a spinner that might finish first).
    let script = "proc spinner\nmap 0x400000 1\nloop 1000000000\n  loop 1000000000\n    touch 0x400000 1\n  end\nend\nsync spinner-done\nproc other\nsync other-done\n";
    let live = Live::start(script, &[]);
    let w = live.wait("other-done");
    assert_eq!(w.stdout.trim(), "2 other-done", "{w:?}");
    let spinner = &live.ps()[0];
    assert_eq!(spinner["state"], "running", "the spinner is still spinning: {spinner}");
}

#[test]
fn a_guest_that_never_finishes_times_out() {
    let r = run_script("proc s\nmap 0x400000 1\nloop 1000000000\ntouch 0x400000 1\nend\n", &["--timeout", "1"]);
    assert_eq!(r.code, 124, "{r:?}");
    assert!(r.stderr.contains("guest timed out"), "{r:?}");
}

#[test]
fn bad_input_is_refused_before_boot() {
    let dir = tempdir();
    let d = dir.path();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["run".into(), d.join("missing.img").display().to_string()], "cannot read image"),
        (vec!["run".into(), "/etc/hostname".into()], "is not an x86-64 ELF executable"),
        (vec!["run".into(), "--mem".into(), "lots".into()], "invalid value 'lots'"),
        (vec!["run".into(), "--mem".into(), "8".into()], "--mem 8: guest memory must be"),
        (vec!["run".into(), "--mem".into(), "17".into()], "--mem 17"),
        (vec!["run".into(), "--workload".into(), d.join("none.wl").display().to_string()], "cannot read workload"),
        (vec!["run".into(), "--timeout".into(), "-1".into()], ""),
    ];
    for (args, msg) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = vmm(&args);
        assert_eq!(r.code, 64, "{args:?}: {r:?}");
        assert!(r.stderr.contains(msg), "{args:?}: {r:?}");
        assert!(r.stdout.is_empty(), "no guest ran: {r:?}");
    }
    let scripts = [
        ("proc a\nfrobnicate 1\n", ":2: unknown statement 'frobnicate'"),
        ("proc a\nmap 0x400000 zz\n", ":2: count is not a decimal number 'zz'"),
        ("proc a\nmap 0x400800 1\n", ":2: address is not page-aligned"),
        ("proc a\nmap 0xffff800000000000 1\n", ":2: range reaches past the user half"),
        ("proc a\nyield\nend\n", ":3: end without loop"),
        ("# nothing here\n", "script has no proc"),
    ];
    for (text, msg) in scripts {
        let path = write_script(d, "bad.wl", text);
        let r = vmm(&["run", "--workload", path.to_str().unwrap()]);
        assert_eq!(r.code, 64, "{text:?}: {r:?}");
        assert!(r.stderr.contains(&format!("{}{msg}", path.display())) || r.stderr.contains(msg), "{text:?}: {r:?}");
        assert!(r.stdout.is_empty(), "no guest ran: {r:?}");
    }
}

/// A minimal ELF64 x86-64 executable header with one PT_LOAD segment.
fn tiny_elf(paddr: u64, memsz: u64) -> Vec<u8> {
    let mut e = vec![0u8; 64 + 56 + 16];
    e[..4].copy_from_slice(b"\x7fELF");
    (e[4], e[5], e[6]) = (2, 1, 1);
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes());
    e[54..56].copy_from_slice(&56u16.to_le_bytes());
    e[56..58].copy_from_slice(&1u16.to_le_bytes());
    let p = 64;
    e[p..p + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e[p + 4..p + 8].copy_from_slice(&5u32.to_le_bytes());
    e[p + 8..p + 16].copy_from_slice(&120u64.to_le_bytes()); // offset
    e[p + 16..p + 24].copy_from_slice(&paddr.to_le_bytes());
    e[p + 24..p + 32].copy_from_slice(&paddr.to_le_bytes());
    e[p + 32..p + 40].copy_from_slice(&16u64.to_le_bytes());
    e[p + 40..p + 48].copy_from_slice(&memsz.to_le_bytes());
    e
}

#[test]
fn images_that_do_not_fit_are_refused() {
    let dir = tempdir();
    let big = dir.path().join("big.img");
    std::fs::write(&big, tiny_elf(0x10_0000, 1 << 30)).unwrap();
    let r = vmm(&["run", big.to_str().unwrap(), "--mem", "64"]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("needs guest memory up to 0x40100000 but the guest has 64 MiB"), "{r:?}");
    let low = dir.path().join("low.img");
    std::fs::write(&low, tiny_elf(0x1000, 16)).unwrap();
    let r = vmm(&["run", low.to_str().unwrap()]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("below 0x100000"), "{r:?}");
}

#[test]
fn a_crashing_image_is_an_error_not_a_hang() {
    // An image whose code is zeros (`add [rax], al` on a bad address): the guest faults
    // with no IDT and triple-faults; the VMM must report it.
    require_kvm();
    let dir = tempdir();
    let img = dir.path().join("zero.img");
    std::fs::write(&img, tiny_elf(0x10_0000, 4096)).unwrap();
    let r = vmm(&["run", img.to_str().unwrap(), "--timeout", "10"]);
    assert!(r.code == 71 || r.code == 124, "{r:?}");
    assert!(r.stderr.contains("guest crashed") || r.stderr.contains("timed out"), "{r:?}");
}

#[test]
fn api_pauses_at_each_sync_until_resumed() {
    let live = Live::start("proc p\nsync one\nsync two\nproc q\nsync three\n", &[]);
    let first = live.client("wait", &["--timeout", "30"]);
    assert_eq!(first.code, 0, "{first:?}");
    // Still paused at the same sync: waiting again returns immediately with it.
    let again = live.client("wait", &["--timeout", "5"]);
    assert_eq!(again.stdout, first.stdout);
    live.resume();
    let second = live.client("wait", &["--timeout", "30"]);
    assert_ne!(second.stdout, first.stdout, "a new sync");
    live.resume();
    live.client("wait", &["--timeout", "30"]);
    live.resume();
    let r = live.finish();
    assert_eq!(r.code, 0, "{r:?}");
    for label in ["one", "two", "three"] {
        assert!(r.stderr.contains(&format!("sync {label}")), "{r:?}");
    }
}

#[test]
fn hostile_api_clients_do_not_stop_the_vm() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    let live = Live::start("proc p\nsync one\n", &[]);
    live.wait("one");
    // Garbage, an unknown command, an oversized line, and a client that hangs up mid-line.
    let mut s = UnixStream::connect(&live.sock).unwrap();
    s.write_all(b"{not json\n{\"cmd\":\"frob\"}\n").unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.contains("\"ok\":false") && text.contains("bad request"), "{text}");
    let mut s2 = UnixStream::connect(&live.sock).unwrap();
    let _ = s2.write_all(&vec![b'x'; 100 * 1024]);
    drop(s2);
    let mut s3 = UnixStream::connect(&live.sock).unwrap();
    s3.write_all(b"{\"cmd\":\"res").unwrap();
    drop(s3);
    let refused = live.client("wait", &["--label", "never", "--timeout", "0.2"]);
    assert_eq!(refused.code, 65, "{refused:?}");
    live.resume();
    let r = live.finish();
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn control_socket_is_private_and_removed_at_exit() {
    use std::os::unix::fs::PermissionsExt;
    let live = Live::start("proc p\nsync one\n", &[]);
    live.wait("one");
    let mode = std::fs::metadata(&live.sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let sock = live.sock.clone();
    live.resume();
    let dir_keep = &live.dir.path().to_path_buf();
    let r = live.finish();
    assert_eq!(r.code, 0, "{r:?}");
    assert!(!sock.exists(), "socket removed at exit ({})", dir_keep.display());
}

#[test]
fn control_socket_never_replaces_a_file() {
    require_kvm();
    let dir = tempdir();
    let f = dir.path().join("precious");
    std::fs::write(&f, "data").unwrap();
    let r = vmm(&["run", "--api-sock", f.to_str().unwrap()]);
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("exists and is not a socket"), "{r:?}");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "data");
}

#[test]
fn guest_kernel_has_no_sse_instructions() {
    // KVM's emulator runs ring 0 here and fails on SSE arithmetic; processes' vector
    // state is not switched. So no xmm/ymm register may appear anywhere in the guest.
    let dir = tempdir();
    let elf = dir.path().join("guest.elf");
    std::fs::write(&elf, vmm::machine::image::EMBEDDED_KERNEL).unwrap();
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn", elf.to_str().unwrap()])
        .output()
        .expect("objdump (binutils) is needed to inspect the guest kernel");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.lines().count() > 1000, "disassembly looks empty");
    let bad: Vec<&str> = text.lines().filter(|l| l.contains("xmm") || l.contains("ymm") || l.contains("popcnt")).collect();
    assert!(bad.is_empty(), "SSE or popcnt in the guest kernel:\n{}", bad.join("\n"));
}
