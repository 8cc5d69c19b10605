//! Builds the guest kernel (a separate Cargo workspace with freestanding, no-SSE flags;
//! see guest-kernel/.cargo/config.toml) and places its ELF in OUT_DIR, so that a plain
//! `cargo build` yields a `vmm` with the guest embedded.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest.parent().expect("vmm/ lives in the workspace root").to_path_buf();
    let guest = root.join("guest-kernel");
    for dir in ["guest-kernel/src", "guest-kernel/Cargo.toml", "guest-kernel/Cargo.lock", "guest-kernel/build.rs",
        "guest-kernel/linker.ld", "guest-kernel/.cargo/config.toml", "workload/src", "workload/Cargo.toml",
        "guest-abi/src", "guest-abi/Cargo.toml"]
    {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest).args(["build", "--release", "--offline", "--quiet"]);
    // The outer build's flags and target dir must not leak into the guest build: its
    // own .cargo/config.toml sets the guest's flags.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS", "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET", "RUSTC_WORKSPACE_WRAPPER", "CARGO_PRIMARY_PACKAGE", "CARGO_MAKEFLAGS"]
    {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("failed to run cargo for the guest kernel");
    assert!(status.success(), "building the guest kernel failed (see the errors above)");

    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for (bin, name) in [("guest-kernel", "guest-kernel.elf"), ("hostile-guest", "hostile-guest.elf")] {
        let elf = guest.join("target/release").join(bin);
        let out = out_dir.join(name);
        std::fs::copy(&elf, &out).unwrap_or_else(|e| panic!("copying {} failed: {e}", elf.display()));
    }
    // The robustness tests boot the hostile guest (guest-kernel/src/hostile) by path.
    println!("cargo:rustc-env=HOSTILE_GUEST_ELF={}", out_dir.join("hostile-guest.elf").display());
}
