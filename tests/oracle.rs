//! Linux as the oracle: the same scenarios run as real Linux processes (Debian's cloud
//! kernel under QEMU TCG, `scripts/linux-oracle.sh`) and through our VMM, compared page
//! by page with `sd-compare`. The pte engine must agree with Linux exactly on every page
//! read; guest-physical engines must report every page Linux reports soft-dirty.
//!
//! Scenarios: the selftest-derived files in tests/scenarios/ plus 50 seeded random ones
//! (several processes, loops, small and huge mappings, map/unmap/protect/fill/touch,
//! clears and reads at random syncs). Writes target/oracle/fidelity.md.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const RANDOM: u64 = 50;


/// One random scenario. Mappings live in separate 2 MiB slots (so that only the
/// generator's own operations decide merges), huge mappings are handled whole, and
/// every access is valid (no process is killed): what is compared is soft-dirty.
fn random_scenario(seed: u64) -> String {
    let mut r = Rng(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut text = String::new();
    let mut plan = String::new();
    let procs = 1 + r.below(3);
    let mut label = 0;
    for p in 1..=procs {
        text += &format!("proc p{p}\n");
        // Per slot: None, or Some((ro, pages mapped as a bitmap)).
        let mut slots: Vec<Option<(bool, u64)>> = vec![None; 4];
        let base = |i: usize| 0x4000_0000u64 + i as u64 * 0x40_0000;
        let huge_base = 0x8000_0000u64;
        let mut huge: Option<bool> = None;
        for _ in 0..12 + r.below(12) {
            let i = r.below(4) as usize;
            let (first, n) = { let f = r.below(16); (f, 1 + r.below(16 - f)) };
            let addr = base(i) + first * 4096;
            let range_mask = ((1u64 << n) - 1) << first;
            match r.below(10) {
                0 | 1 => {
                    let ro = r.below(4) == 0;
                    text += &format!("map {:#x} 16{}\n", base(i), if ro { " ro" } else { "" });
                    slots[i] = Some((ro, 0xffff));
                }
                2 => {
                    text += &format!("unmap {addr:#x} {n}\n");
                    if let Some((_, m)) = &mut slots[i] {
                        *m &= !range_mask;
                    }
                }
                3 => {
                    if let Some((ro, m)) = &mut slots[i] {
                        if *m & range_mask == range_mask && *m == 0xffff {
                            // Whole-slot protect (sub-range splits re-merge the same way).
                            let to_ro = r.below(2) == 0;
                            text += &format!("protect {:#x} 16 {}\n", base(i), if to_ro { "ro" } else { "rw" });
                            *ro = to_ro;
                        }
                    }
                }
                4 | 5 => {
                    if let Some((false, m)) = slots[i] {
                        if m & range_mask == range_mask {
                            text += &format!("fill {addr:#x} {n} {}\n", r.below(256));
                        }
                    }
                }
                6 => {
                    if let Some((_, m)) = slots[i] {
                        if m & range_mask == range_mask {
                            text += &format!("touch {addr:#x} {n}\n");
                        }
                    }
                }
                7 => match (r.below(3), huge) {
                    (0, _) => {
                        text += &format!("map {huge_base:#x} 1024 huge\n");
                        huge = Some(false);
                    }
                    (1, Some(false)) => {
                        let off = r.below(1024) * 4096;
                        text += &format!("fill {:#x} 1 9\n", huge_base + off);
                    }
                    (2, Some(_)) => {
                        text += &format!("touch {:#x} 1\n", huge_base + r.below(1024) * 4096);
                    }
                    _ => {}
                },
                _ => {
                    label += 1;
                    let l = format!("s{label}");
                    let in_loop = r.below(4) == 0 && slots[i].is_some_and(|(ro, m)| !ro && m == 0xffff);
                    if in_loop {
                        text += &format!("loop 2\n  fill {:#x} 2 {}\n  sync {l}\nend\n", base(i), r.below(256));
                    } else {
                        text += &format!("sync {l}\n");
                    }
                    if r.below(3) != 0 {
                        plan += &format!("@{l} clear {p} 4\n");
                    }
                    for (j, s) in slots.iter().enumerate() {
                        if s.is_some() || r.below(3) == 0 {
                            plan += &format!("@{l} read {p} {:#x} 16\n", base(j));
                        }
                    }
                    if huge.is_some() {
                        plan += &format!("@{l} read {p} {huge_base:#x} 1024\n");
                    }
                }
            }
        }
        label += 1;
        text += &format!("sync s{label}\n");
        for j in 0..4 {
            plan += &format!("@s{label} read {p} {:#x} 16\n", base(j));
        }
    }
    text + &plan
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sh(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() || out.status.code() == Some(1), "{cmd:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr));
    stdout
}

#[test]
fn every_scenario_agrees_with_linux() {
    require_kvm();
    let work = root().join("target/oracle/run");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(root().join("tests/scenarios")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "sd") {
            let dst = work.join(p.file_name().unwrap());
            std::fs::copy(&p, &dst).unwrap();
            files.push(dst);
        }
    }
    for seed in 0..RANDOM {
        let f = work.join(format!("random-{seed:02}.sd"));
        std::fs::write(&f, random_scenario(seed)).unwrap();
        workload::scenario::parse(&std::fs::read_to_string(&f).unwrap())
            .unwrap_or_else(|e| panic!("generated scenario {seed} is invalid: {e}"));
        files.push(f);
    }
    files.sort();

    // Linux's answers (QEMU TCG; installs and fetches what it needs).
    let linux = work.join("linux.out");
    let out = sh(Command::new(root().join("scripts/linux-oracle.sh")).args(&files));
    std::fs::write(&linux, &out).unwrap();
    assert_eq!(out.matches("\n== ").count() + usize::from(out.starts_with("== ")), files.len(), "Linux ran every scenario");
    assert!(!out.contains("error:"), "the Linux executor refused a scenario:\n{out}");

    let linux_text = std::fs::read_to_string(&linux).unwrap();
    let mut report = String::from("# Fidelity: our soft-dirty answers against Linux's\n\n");
    report += &format!("{} scenarios ({} from tests/scenarios, {RANDOM} seeded random); Linux: Debian linux-image-cloud-amd64 under QEMU TCG.\n",
        files.len(), files.len() as u64 - RANDOM);
    report += "Generated by `cargo test -p vmm --test oracle` (tests/oracle.rs) into target/oracle/fidelity.md.\n\n";
    let mut failures = Vec::new();
    for engine in ENGINES {
        let ours = work.join(format!("ours-{engine}.out"));
        let o = sh(Command::new(vmm_bin()).arg("scenario").arg("--engine").arg(engine).args(&files));
        std::fs::write(&ours, &o).unwrap();
        // Includes pagemap-scan's agreement with pagemap at every read (run/scenario.rs).
        assert!(!o.contains("error:"), "{engine}: the VMM executor failed a scenario:\n{o}");
        let r = linux_oracle::compare(&linux_text, &o, !is_exact(engine));
        report += &format!("## {engine} ({}): {} disagreement(s)\n\n{}\n",
            if is_exact(engine) { "exact: present, soft-dirty, exclusive" } else { "every page Linux reports soft-dirty is soft-dirty here; presence agrees" },
            r.disagreements.len(), r.table);
        if !r.disagreements.is_empty() {
            failures.push(format!("{engine}:\n{}", r.disagreements.iter().take(20).cloned().collect::<Vec<_>>().join("\n")));
        }
    }
    std::fs::write(root().join("target/oracle/fidelity.md"), &report).unwrap();
    assert!(failures.is_empty(), "disagreements with Linux:\n{}", failures.join("\n"));
}
