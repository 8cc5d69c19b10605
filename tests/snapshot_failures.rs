//! Snapshots that fail midway lose nothing: the VMM killed at random points during
//! `snapshot create`, the client killed, and a file system that fills up.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// 16 MiB resident, so that a full snapshot takes long enough to be interrupted.
const SCRIPT: &str = "\
proc p
map 0x400000 4096
fill 0x400000 4096 1
sync s1
fill 0x400000 1024 2
sync s2
check 0x400000 1024 2
check 0x800000 3072 1
exit 0
";

fn create_args(live: &Live, out: &Path, diff: bool) -> Vec<String> {
    let mut a: Vec<String> = ["snapshot", "create", "--api-sock", live.sock(), "--out", out.to_str().unwrap()].map(String::from).into();
    if diff {
        a.push("--diff".into());
    }
    a
}

fn snap(live: &Live, out: &Path, diff: bool) -> Run {
    let args = create_args(live, out, diff);
    vmm(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Directories in `d` whose names contain `part`.
fn names_with(d: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| n.contains(part)).collect()
}

#[test]
fn killing_the_vmm_mid_snapshot_leaves_the_chain_restorable() {
    require_kvm();
    let dir = tempdir();
    let d = dir.path();
    let mut rng = Rng(0x5eed_cafe ^ std::process::id() as u64);
    // How long a full snapshot takes here, to spread the kills over it.
    let probe = Live::start(SCRIPT, &[]);
    probe.wait("s1");
    let t0 = Instant::now();
    assert_eq!(snap(&probe, &d.join("probe"), false).code, 0);
    let span = t0.elapsed();
    drop(probe);
    let mut outcomes = Vec::new();
    for round in 0..5u64 {
        let live = Live::start(SCRIPT, &[]);
        let base = d.join(format!("base{round}"));
        live.wait("s1");
        assert_eq!(snap(&live, &base, false).code, 0);
        live.resume();
        live.wait("s2");
        // Kill somewhere in [0, 1.2 x span) after asking for the next snapshot.
        let target = d.join(format!("next{round}"));
        let diff = round % 2 == 1;
        let client = Command::new(vmm_bin())
            .args(create_args(&live, &target, diff))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let delay = span.mul_f64((round as f64 + rng.below(1000) as f64 / 1000.0) / 5.0 * 1.2);
        std::thread::sleep(if diff { delay / 20 } else { delay });
        let pid = live.child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        drop(live);
        let _ = client.wait_with_output();
        // The interrupted snapshot is either whole and valid, or absent (a `.tmp-`
        // directory may remain; it is never taken for a snapshot).
        let complete = target.exists();
        if complete {
            let v = vmm(&["snapshot", "verify", target.to_str().unwrap()]);
            assert_eq!(v.code, 0, "a snapshot that appeared must be whole: {v:?}");
        }
        for tmp in names_with(d, &format!("next{round}.tmp-")) {
            let v = vmm(&["snapshot", "verify", d.join(&tmp).to_str().unwrap()]);
            assert_ne!(v.code, 0, "a staging directory is not a snapshot: {v:?}");
        }
        outcomes.push((delay, complete));
        // The previous chain is untouched and restores; the workload finishes from it.
        let v = vmm(&["snapshot", "verify", base.to_str().unwrap()]);
        assert_eq!(v.code, 0, "{v:?}");
        let r = vmm(&["run", "--restore", base.to_str().unwrap(), "--timeout", "60"]);
        assert_eq!(r.code, 0, "round {round}: restoring the previous snapshot: {r:?}");
    }
    eprintln!("full snapshot took {span:?}; kills (delay, snapshot completed): {outcomes:?}");
}

#[test]
fn a_killed_client_does_not_stop_the_snapshot_or_the_vm() {
    let dir = tempdir();
    let d = dir.path();
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    let mut client = Command::new(vmm_bin()).args(create_args(&live, &d.join("full"), false)).stdout(Stdio::null()).spawn().unwrap();
    // Kill it once the VMM has started writing (its staging directory exists).
    let deadline = Instant::now() + Duration::from_secs(30);
    while names_with(d, "full").is_empty() {
        assert!(Instant::now() < deadline, "the snapshot never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = client.kill();
    let _ = client.wait();
    // The VMM finishes what it started; the snapshot appears whole.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.join("full").exists() {
        assert!(Instant::now() < deadline, "the snapshot never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(vmm(&["snapshot", "verify", d.join("full").to_str().unwrap()]).code, 0);
    live.resume();
    live.wait("s2");
    assert_eq!(snap(&live, &d.join("d1"), true).code, 0, "the VMM serves on");
    live.resume();
    assert_eq!(live.finish().code, 0);
}

/// A tmpfs of a given size, unmounted on drop. CI runs as root; elsewhere this fails
/// loudly rather than skip.
struct TinyFs(PathBuf);

impl TinyFs {
    fn mount(at: &Path, size: &str) -> TinyFs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", at.to_str().unwrap()]).output();
        match out {
            Ok(o) if o.status.success() => TinyFs(at.to_path_buf()),
            other => panic!("mounting a {size} tmpfs at {} failed ({other:?}): this test needs root (CI runs as root)", at.display()),
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_file_system_fails_the_snapshot_and_loses_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let tiny = TinyFs::mount(&d.join("tiny"), "2m");
    let live = Live::start(SCRIPT, &[]);
    live.wait("s1");
    // 16 MiB of pages into 2 MiB: ENOSPC midway.
    let r = snap(&live, &tiny.0.join("full"), false);
    assert_eq!(r.code, 65, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    assert!(std::fs::read_dir(&tiny.0).unwrap().next().is_none(), "nothing is left behind in the full file system");
    // The VM goes on; a snapshot to a roomy place works.
    assert_eq!(snap(&live, &d.join("full"), false).code, 0);
    live.resume();
    live.wait("s2");
    // A 4 MiB diff does not fit either; the pages it held stay in the next diff.
    let r = snap(&live, &tiny.0.join("d1"), true);
    assert!(r.code != 0 && r.stderr.contains("No space left on device"), "{r:?}");
    assert_eq!(snap(&live, &d.join("d1"), true).code, 0);
    let m = vmm::storage::snapshot::read_manifest(&d.join("d1")).unwrap();
    assert!(m.pages >= 1024, "the failed diff's pages are in the next one: {}", m.pages);
    live.resume();
    assert_eq!(live.finish().code, 0);
    let r = vmm(&["run", "--restore", d.join("d1").to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(r.code, 0, "{r:?}");
    drop(tiny);
    // A merge that fills the file system fails and leaves the base whole: a copy of
    // `full` (~16 MiB) on a 24 MiB tmpfs has no room for the merged copy beside it.
    let fs = TinyFs::mount(&d.join("tiny24"), "24m");
    let st = Command::new("cp").args(["-r", "--sparse=always", d.join("full").to_str().unwrap(), fs.0.to_str().unwrap()]).status().unwrap();
    assert!(st.success());
    let before = vmm::storage::snapshot::read_manifest(&fs.0.join("full")).unwrap();
    let r = vmm(&["snapshot", "merge", d.join("d1").to_str().unwrap(), "--into", fs.0.join("full").to_str().unwrap()]);
    assert_eq!(r.code, 74, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    assert_eq!(vmm::storage::snapshot::read_manifest(&fs.0.join("full")).unwrap(), before);
    assert_eq!(vmm(&["snapshot", "verify", fs.0.join("full").to_str().unwrap()]).code, 0, "the base is whole");
    assert_eq!(names_with(&fs.0, ".tmp-"), Vec::<String>::new());
}
