//! Linux programs for the tests, compiled from C at test time with the host's
//! toolchain (gcc with static glibc, musl-gcc) and cached by source and flags.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds `source` with `compiler` and `flags` (once per content) and returns the
/// program. A missing compiler fails the test loudly: `scripts/test.sh` installs them.
pub fn program(compiler: &str, name: &str, source: &str, flags: &[&str]) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (compiler, source, flags).hash(&mut h);
    // One directory per content: the program keeps its own name (the guest's process name).
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-programs").join(format!("{name}-{:016x}", h.finish()));
    let out = dir.join(name);
    if out.exists() {
        return out;
    }
    std::fs::create_dir_all(&dir).unwrap();
    // Built under a name of this thread's own: tests running in parallel never see half
    // a file, nor write each other's.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = format!("{}.{}", std::process::id(), NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    let src = dir.join(format!("{name}.{unique}.c"));
    std::fs::write(&src, source).unwrap();
    let tmp = dir.join(format!("{name}.{unique}.tmp"));
    let r = Command::new(compiler)
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("{compiler} is needed to build the test's Linux programs (scripts/test.sh installs it): {e}"));
    assert!(r.status.success(), "{compiler} {flags:?} {name}: {}", String::from_utf8_lossy(&r.stderr));
    std::fs::rename(&tmp, &out).unwrap();
    let _ = std::fs::remove_file(&src);
    out
}

/// `gcc -O2 -static` (glibc).
pub fn glibc_static(name: &str, source: &str) -> PathBuf {
    program("gcc", name, source, &["-O2", "-static"])
}

/// `gcc -O2 -static-pie` (glibc, position-independent).
pub fn glibc_static_pie(name: &str, source: &str) -> PathBuf {
    program("gcc", name, source, &["-O2", "-static-pie"])
}

/// `musl-gcc -O2 -static`.
pub fn musl_static(name: &str, source: &str) -> PathBuf {
    program("musl-gcc", name, source, &["-O2", "-static"])
}

/// Debian's `busybox-static` (a static glibc busybox), fetched with apt once and kept
/// under the target directory. Fails loudly if it cannot be had: the tests need it.
pub fn busybox_static() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("busybox-static");
    let bin = dir.join("root/bin/busybox");
    if bin.exists() {
        return bin;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let download = || Command::new("apt-get").args(["download", "busybox-static"]).current_dir(&dir).output();
    let mut r = download().unwrap_or_else(|e| panic!("apt-get is needed to fetch busybox-static: {e}"));
    if !r.status.success() {
        // A fresh machine's package lists may not know it yet.
        let _ = Command::new("apt-get").args(["update", "-qq"]).output();
        r = download().unwrap();
    }
    assert!(r.status.success(), "apt-get download busybox-static: {}", String::from_utf8_lossy(&r.stderr));
    let deb = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .expect("the downloaded .deb");
    // Unpacked beside, then moved into place: a test running at the same time sees all or nothing.
    let tmp = dir.join(format!("unpack.{}", std::process::id()));
    let r = Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp).output().expect("dpkg");
    assert!(r.status.success(), "dpkg -x: {}", String::from_utf8_lossy(&r.stderr));
    let _ = std::fs::rename(&tmp, dir.join("root"));
    assert!(bin.exists(), "busybox is not in {}", deb.display());
    bin
}
