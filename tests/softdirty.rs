//! Soft-dirty from outside the guest (pte engine), through the real binary and API.
//! The scenarios port Linux's tools/testing/selftests/mm/soft-dirty.c.

mod common;
use common::*;

/// Starts the scenario's VM with `engine`; `None` (and a printed reason) when this host
/// lacks what the engine needs, as the VMM reports at startup.
fn start(script: &str, engine: &str) -> Option<Live> {
    Live::try_start(script, &["--engine", engine]).map_err(|r| {
        assert!(r.code == 69 && r.stderr.contains("is unavailable on this host"), "the VMM failed to start: {r:?}");
        eprintln!("SKIPPED ({engine}): {}", r.stderr.trim());
    }).ok()
}

const A: u64 = 0x40_0000;

fn test_simple_clear_write_clear_many_times(engine: &str) {
    let script = "proc p\nmap 0x400000 1\nfill 0x400000 1 1\nloop 10\n  sync cleared\n  fill 0x400000 1 2\n  sync written\nend\ncheck 0x400000 1 2\n";
    let (mut cleared, mut written) = (0, 0);
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "cleared" => {
            live.clear_refs(pid, 4);
            assert_eq!(live.soft_dirty(pid, A, 1), [false], "clean right after clear (round {cleared})");
            cleared += 1;
        }
        "written" => {
            assert_eq!(live.soft_dirty(pid, A, 1), [true], "dirty after a write (round {written})");
            written += 1;
        }
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!((cleared, written), (10, 10));
}

fn test_vma_reuse_remapped_range_reads_soft_dirty_without_a_write(engine: &str) {
    let script = "proc p\nmap 0x400000 16\nfill 0x400000 16 3\nsync cleared\nunmap 0x400000 16\nmap 0x400000 16\nsync remapped\ncheck 0x400000 16 0\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "cleared" => {
            live.clear_refs(pid, 4);
            assert_eq!(live.soft_dirty(pid, A, 16), all(false, 16));
        }
        "remapped" => {
            let pages = live.pagemap(pid, A, 16);
            assert!(pages.iter().all(|p| p.soft_dirty && !p.present), "{pages:?}");
        }
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn test_hugepage_one_write_dirties_all_512_entries(engine: &str) {
    let script = "proc p\nmap 0x40000000 1024 huge\nfill 0x40000000 1 1\nfill 0x40200000 1 1\nsync cleared\nfill 0x40100000 1 2\nsync written\ncheck 0x40100000 1 2\ncheck 0x40000000 1 1\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| {
        let pages = |start| live.pagemap(pid, start, 512);
        match label {
            "cleared" => {
                live.clear_refs(pid, 4);
                let p = pages(0x4000_0000);
                assert!(p.iter().all(|p| p.huge && p.present && !p.soft_dirty), "{:?}", &p[..2]);
                let pfns: Vec<u64> = p.iter().map(|p| p.pfn.unwrap()).collect();
                assert!(pfns.windows(2).all(|w| w[1] == w[0] + 1), "512 consecutive frames");
            }
            "written" => {
                assert!(pages(0x4000_0000).iter().all(|p| p.soft_dirty), "the whole 2 MiB page is dirty");
                assert!(pages(0x4020_0000).iter().all(|p| !p.soft_dirty), "the other huge page is not");
            }
            _ => unreachable!(),
        }
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn test_mprotect_does_not_set_or_lose_soft_dirty(engine: &str) {
    // write -> 1; clear -> 0; ro -> 0; rw -> 0; write -> 1. The last write goes through a
    // PTE the guest made writable again itself: only the dirty-log backstop sees it.
    let script = "proc p\nmap 0x400000 2\nfill 0x400000 2 1\nsync w1\nprotect 0x400000 2 ro\nsync ro\nprotect 0x400000 2 rw\nsync rw\nfill 0x400000 1 2\nsync w2\ncheck 0x400000 1 2\ncheck 0x401000 1 1\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| {
        let sd = live.soft_dirty(pid, A, 2);
        match label {
            "w1" => {
                assert_eq!(sd, [true, true]);
                live.clear_refs(pid, 4);
                assert_eq!(live.soft_dirty(pid, A, 2), [false, false]);
            }
            "ro" | "rw" => assert_eq!(sd, [false, false], "at {label}"),
            "w2" => assert_eq!(sd, [true, false]),
            _ => unreachable!(),
        }
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn test_merge_adjacent_new_mappings_read_soft_dirty(engine: &str) {
    // Written pages stay clean where no merge happens: a gap keeps mappings apart.
    let script = "proc p\nmap 0x400000 1\nfill 0x400000 1 1\nsync cleared\nmap 0x401000 1\nsync right\nmap 0x3ff000 1\nsync left\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "cleared" => live.clear_refs(pid, 4),
        // As Linux (checked against it by the oracle): the new mapping merges with the
        // old one and the whole merged VMA reads soft-dirty, the old page included.
        "right" => assert_eq!(live.soft_dirty(pid, A, 2), [true, true]),
        "left" => assert_eq!(live.soft_dirty(pid, 0x3f_f000, 3), [true, true, true]),
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn split_mappings_keep_their_history_in_every_piece(engine: &str) {
    // protect splits one mapping into three records with the same serial: none of the
    // pieces is "new" after a clear (a bug the differential test found).
    let script = "proc p\nmap 0x400000 8\nfill 0x400000 8 1\nprotect 0x402000 2 ro\nsync cleared\nsync later\nfill 0x406000 1 2\nsync written\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "cleared" => live.clear_refs(pid, 4),
        "later" => assert_eq!(live.soft_dirty(pid, A, 8), all(false, 8)),
        "written" => assert_eq!(live.soft_dirty(pid, A, 8), [false, false, false, false, false, false, true, false]),
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn dirty_rate_and_top_see_the_writer_not_the_reader(engine: &str) {
    // idle's only writes come before its sync: every window opened after it reads 0 for
    // idle. busy writes the same 16 pages forever; a window (a span of host time) shows
    // all 16 once busy got the CPU long enough in it, so windows are retried until then.
    let script = "proc busy\nmap 0x400000 64\nloop 50000000\n  fill 0x400000 16 1\nend\nproc idle\nmap 0x400000 64\nfill 0x400000 64 1\nsync idle-ready\nloop 50000000\n  touch 0x400000 1\nend\n";
    let Some(mut live) = start(script, engine) else { return };
    live.wait("idle-ready");
    live.resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let r = live.client("dirty-rate", &["--seconds", "0.3", "--json"]);
        assert_eq!(r.code, 0, "{r:?}");
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let procs = v["processes"].as_array().unwrap();
        assert_eq!((&procs[0]["name"], &procs[1]["name"]), (&"busy".into(), &"idle".into()), "{v}");
        assert_eq!(procs[1]["pages"], 0, "idle wrote nothing after its sync: {v}");
        let busy = procs[0]["pages"].as_u64().unwrap();
        assert!(busy <= 16, "{v}");
        if busy == 16 {
            assert!(v["vm_pages"].as_u64().unwrap() >= 16 && v["running_seconds"].as_f64().unwrap() > 0.0, "{v}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "busy never got to write its 16 pages in a window: {v}");
    }
    let top = live.client("top", &["--interval", "0.2", "--count", "2"]);
    assert_eq!(top.code, 0, "{top:?}");
    assert_eq!(top.stdout.matches("busy").count(), 2, "{top:?}");
    let info = live.info();
    assert_eq!(info["engine"], engine);
    assert!(info["log"]["harvests"].as_u64().unwrap() >= 4, "{info}");
    let _ = live.child.kill();
    let _ = live.child.wait();
}

fn a_write_to_a_shared_frame_marks_the_other_mapper_only_for_guest_physical_engines(engine: &str) {
    // The one documented difference from Linux (docs/engines.md): soft-dirty is a
    // property of the mapping for the pte engine (as in Linux) and of the frame for the
    // guest-physical engines.
    //
    // What is checked needs an order across processes: b mapped and cleared, then a
    // writes, then both are read. The processes cannot wait for each other, so the host
    // orders it from outside: a writes only between its syncs `a-before` and `a-wrote`,
    // and a round counts only if b's clear (at b-ready, or after the previous round)
    // came before its `a-before`. Both loop until the test has seen such a round.
    const S: u64 = 0x6000_0000_0000;
    let script = "\
proc a
map 0x600000000000 1 shared
fill 0x600000000000 1 1
loop 1000000000
  sync a-before
  fill 0x600000000000 1 2
  sync a-wrote
  check 0x600000000000 1 2
  yield
end
proc b
map 0x600000000000 1 shared
touch 0x600000000000 1
sync b-ready
loop 1000000000
  yield
end
";
    let Some(live) = start(script, engine) else { return };
    let (mut b_cleared, mut armed) = (false, false);
    loop {
        let (pid, label) = live.next_sync();
        match label.as_str() {
            "b-ready" => {
                live.clear_refs(pid, 4);
                b_cleared = true;
            }
            "a-before" => {
                live.clear_refs(pid, 4);
                armed = b_cleared;
            }
            "a-wrote" if armed => {
                let (a, b) = (live.pagemap(1, S, 1)[0], live.pagemap(2, S, 1)[0]);
                assert_eq!(a.pfn, b.pfn, "one frame, two processes");
                assert!(a.present && b.present && !a.exclusive && !b.exclusive, "{a:?} {b:?}");
                assert!(a.soft_dirty, "the writer's page is soft-dirty");
                assert_eq!(b.soft_dirty, !is_exact(engine), "{engine}: the other mapper's page");
                break;
            }
            "a-wrote" => {}
            _ => unreachable!("{label}"),
        }
        live.resume();
    }
}

fn processes_see_only_their_own_writes(engine: &str) {
    // Same virtual addresses, separate address spaces: pid 1 writes pages 0-1, pid 2
    // pages 6-7. Syncs arrive in whatever order the scheduler gives.
    let script = "\
proc a
map 0x400000 8
fill 0x400000 8 1
sync ready-a
fill 0x400000 2 2
sync done-a
check 0x400000 2 2
proc b
map 0x400000 8
fill 0x400000 8 1
sync ready-b
fill 0x406000 2 3
sync done-b
check 0x406000 2 3
";
    let mut done = 0;
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "ready-a" | "ready-b" => live.clear_refs(pid, 4),
        "done-a" => {
            assert_eq!(live.soft_dirty(1, A, 8), [true, true, false, false, false, false, false, false]);
            done += 1;
        }
        "done-b" => {
            assert_eq!(live.soft_dirty(2, A, 8), [false, false, false, false, false, false, true, true]);
            done += 1;
        }
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(done, 2);
}

fn the_vmm_never_grants_a_write_the_guest_took_away(engine: &str) {
    let script = "proc p\nmap 0x400000 2\nfill 0x400000 2 1\nsync cleared\nprotect 0x400000 1 ro\nfill 0x400000 1 2\nexit 0\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, _, pid| live.clear_refs(pid, 4));
    assert_eq!(r.code, 139, "{r:?}");
    assert!(r.stdout.contains("kernel: pid 1 (p): write to read-only mapping at 0x400000, killed"), "{r:?}");
}

fn clear_refs_1_then_touch_shows_accessed(engine: &str) {
    let script = "proc p\nmap 0x400000 4\nfill 0x400000 4 1\nsync cleared\ntouch 0x401000 1\nsync touched\ncheck 0x400000 4 1\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| {
        let acc: Vec<bool> = live.pagemap(pid, A, 4).iter().map(|p| p.accessed).collect();
        match label {
            "cleared" => {
                assert_eq!(acc, [true; 4]);
                live.clear_refs(pid, 1);
                let acc: Vec<bool> = live.pagemap(pid, A, 4).iter().map(|p| p.accessed).collect();
                assert_eq!(acc, [false; 4]);
            }
            "touched" => assert_eq!(acc, [false, true, false, false]),
            _ => unreachable!(),
        }
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn read_only_touched_pages_map_the_shared_zero_frame_and_stay_clean(engine: &str) {
    let script = "proc p\nmap 0x400000 2\nsync cleared\ntouch 0x400000 2\nsync touched\nfill 0x401000 1 9\nsync written\ncheck 0x400000 1 0\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| match label {
        "cleared" => live.clear_refs(pid, 4),
        "touched" => {
            let p = live.pagemap(pid, A, 2);
            assert!(p.iter().all(|p| p.present && !p.soft_dirty && !p.exclusive), "zero frame: {p:?}");
            assert_eq!(p[0].pfn, p[1].pfn, "both pages map the same zero frame");
        }
        "written" => {
            let p = live.pagemap(pid, A, 2);
            assert!(!p[0].soft_dirty && p[1].soft_dirty && p[1].exclusive, "{p:?}");
            assert_ne!(p[0].pfn, p[1].pfn);
        }
        _ => unreachable!(),
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn raw_pagemap_is_linux_byte_format(engine: &str) {
    let script = "proc p\nmap 0x400000 3\nfill 0x400000 2 1\nsync s\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, _, pid| {
        let json = live.pagemap(pid, A, 3);
        let out = std::process::Command::new(vmm_bin())
            .args(["pagemap", "--api-sock", live.sock(), "--pid", &pid.to_string(), "--start", "400000", "--pages", "3", "--raw"])
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(out.stdout.len(), 24);
        for (i, p) in json.iter().enumerate() {
            let e = u64::from_le_bytes(out.stdout[i * 8..i * 8 + 8].try_into().unwrap());
            assert_eq!(e, p.entry);
            assert_eq!(e >> 63 == 1, p.present);
            assert_eq!((e >> 55) & 1 == 1, p.soft_dirty);
            assert_eq!((e >> 56) & 1 == 1, p.exclusive);
            if p.present {
                assert_eq!(Some(e & ((1 << 55) - 1)), p.pfn);
            }
        }
        assert!(json[0].present && json[1].present && !json[2].present);
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn ps_lists_processes_found_from_outside(engine: &str) {
    let script = "proc writer\nmap 0x400000 8\nfill 0x400000 8 1\nsync s\nproc quitter\nexit 3\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, _, _| {
        let r = live.client("ps", &["--json"]);
        assert_eq!(r.code, 0, "{r:?}");
        let procs: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(procs[0]["name"], "writer");
        assert_eq!(procs[0]["state"], "running");
        assert_eq!(procs[0]["rss_pages"], 8);
        assert_eq!(procs[0]["mappings"][0]["start"], 0x400000);
        let table = live.client("ps", &[]);
        assert!(table.stdout.contains("writer") && table.stdout.contains("PEAK-RSS"), "{table:?}");
    });
    assert_eq!(r.code, 3, "{r:?}");
}

fn clear_refs_5_resets_peak_rss(engine: &str) {
    let script = "proc p\nmap 0x400000 8\nfill 0x400000 8 1\nunmap 0x404000 4\nsync s\nsync t\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, _| {
        let r = live.client("ps", &["--json"]);
        let p: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
        match label {
            "s" => {
                assert_eq!((p["rss_pages"].as_u64(), p["peak_rss_pages"].as_u64()), (Some(4), Some(8)));
                live.clear_refs(1, 5);
            }
            "t" => assert_eq!(p["peak_rss_pages"].as_u64(), Some(4)),
            _ => unreachable!(),
        }
    });
    assert_eq!(r.code, 0, "{r:?}");
}

fn bad_requests_get_clear_errors_and_the_vm_keeps_running(engine: &str) {
    // "gone" exits whenever the scheduler lets it: p syncs in a loop until `ps` shows
    // from outside that it has, and only then are the requests about it made.
    let script = "proc gone\nexit 0\nproc p\nmap 0x400000 1\nloop 1000000000\n  yield\n  sync s\n  fill 0x400000 1 1\n  check 0x400000 1 1\nend\n";
    let Some(live) = start(script, engine) else { return };
    loop {
        live.wait("s");
        if live.ps()[0]["state"] == "exited" {
            break;
        }
        live.resume();
    }
    let cases: &[(&[&str], i32, &str)] = &[
        (&["pagemap", "--pid", "99"], 65, "no process with pid 99"),
        (&["pagemap", "--pid", "1"], 65, "pid 1 has exited"),
        (&["clear-refs", "--pid", "1"], 65, "pid 1 has exited"),
        (&["pagemap", "--pid", "2", "--start", "0xffff800000000000"], 65, "outside the user half"),
        (&["pagemap", "--pid", "2", "--start", "0x7ffffffff000", "--pages", "2"], 65, "outside the user half"),
        (&["pagemap", "--pid", "2", "--start", "0x400000", "--pages", "0"], 65, "page count is 0"),
        (&["pagemap", "--pid", "2", "--start", "0x400000", "--pages", "100000000"], 65, "exceed the limit"),
        (&["pagemap", "--pid", "2", "--start", "0x400800"], 65, "not page-aligned"),
        (&["pagemap", "--pid", "2", "--start", "zz"], 64, "not a hex address"),
        (&["clear-refs", "--pid", "2", "7"], 65, "invalid clear_refs value 7 (EINVAL)"),
        (&["clear-refs", "--pid", "2", "0"], 65, "EINVAL"),
        (&["clear-refs", "--pid", "x"], 64, "invalid value"),
    ];
    for (args, code, msg) in cases {
        let mut all = vec![args[0], "--api-sock", live.sock()];
        all.extend_from_slice(&args[1..]);
        let r = vmm(&all);
        assert_eq!(r.code, *code, "{args:?}: {r:?}");
        assert!(r.stderr.contains(msg), "{args:?}: {r:?}");
    }
    assert_eq!(live.soft_dirty(2, A, 1), [true], "state intact after the errors");
    // The VM goes on: p writes and checks its page, then reaches its next sync.
    live.clear_refs(2, 4);
    live.resume();
    live.wait("s");
    assert_eq!(live.soft_dirty(2, A, 1), [true], "the write after the clear");
    assert_eq!(live.ps()[1]["state"], "running");
}

fn concurrent_clients_while_the_guest_runs_never_lose_a_write(engine: &str) {
    // The guest rewrites and checks memory in a long loop while several clients clear
    // and read at the same time, with the VM running (not paused): every request must be
    // served at a safe point, and the guest's checks must keep passing.
    let script = "proc busy\nmap 0x400000 64\nfill 0x400000 64 0x5a\nsync go\nloop 3000\n  fill 0x400000 64 0x5a\n  check 0x400000 64 0x5a\n  fill 0x400000 64 0xa5\n  check 0x400000 64 0xa5\nend\nsync end\n";
    let Some(live) = start(script, engine) else { return };
    let r = live.drive(|live, label, pid| {
        if label != "go" {
            return;
        }
        // One clear while paused, before the guest writes again: the faults (or dirty
        // frames) counted below then exist whatever the clients' timing.
        live.clear_refs(pid, 4);
        let sock = live.sock().to_string();
        let pid = pid.to_string();
        let workers: Vec<_> = (0..3)
            .map(|k| {
                let (sock, pid) = (sock.clone(), pid.clone());
                std::thread::spawn(move || {
                    for _ in 0..15 {
                        let args: &[&str] = if k == 0 {
                            &["clear-refs", "--api-sock", &sock, "--pid", &pid]
                        } else {
                            &["pagemap", "--api-sock", &sock, "--pid", &pid, "--json"]
                        };
                        let r = vmm(args);
                        if r.code != 0 {
                            return Err(format!("{args:?}: {r:?}"));
                        }
                        if k != 0 && r.stdout.lines().count() != 64 {
                            return Err(format!("pagemap returned {} pages", r.stdout.lines().count()));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        // Let the guest run while the workers hammer it.
        live.resume();
        for w in workers {
            w.join().unwrap().unwrap();
        }
        // Now paused at "end" (or about to be).
        let w = live.client("wait", &["--label", "end", "--timeout", "60"]);
        assert_eq!(w.code, 0, "{w:?}");
        let info = live.info();
        assert_eq!(info["engine"], engine);
        if engine == "pte" {
            assert!(info["tracker"]["faults_caught"].as_u64().unwrap() > 0, "{info}");
        } else {
            assert!(info["log"]["frames_harvested"].as_u64().unwrap() > 0, "{info}");
        }
    });
    assert_eq!(r.code, 0, "{r:?}");
}

macro_rules! for_each_engine {
    ($($name:ident),* $(,)?) => {
        mod pte { $( #[test] fn $name() { super::$name("pte") } )* }
        mod hybrid { $( #[test] fn $name() { super::$name("hybrid") } )* }
        mod kvm_bitmap { $( #[test] fn $name() { super::$name("kvm-bitmap") } )* }
        mod kvm_ring { $( #[test] fn $name() { super::$name("kvm-ring") } )* }
        mod uffd { $( #[test] fn $name() { super::$name("uffd") } )* }
    };
}

for_each_engine!(
    a_write_to_a_shared_frame_marks_the_other_mapper_only_for_guest_physical_engines,
    dirty_rate_and_top_see_the_writer_not_the_reader,
    split_mappings_keep_their_history_in_every_piece,
    test_simple_clear_write_clear_many_times,
    test_vma_reuse_remapped_range_reads_soft_dirty_without_a_write,
    test_hugepage_one_write_dirties_all_512_entries,
    test_mprotect_does_not_set_or_lose_soft_dirty,
    test_merge_adjacent_new_mappings_read_soft_dirty,
    processes_see_only_their_own_writes,
    the_vmm_never_grants_a_write_the_guest_took_away,
    clear_refs_1_then_touch_shows_accessed,
    read_only_touched_pages_map_the_shared_zero_frame_and_stay_clean,
    raw_pagemap_is_linux_byte_format,
    ps_lists_processes_found_from_outside,
    clear_refs_5_resets_peak_rss,
    bad_requests_get_clear_errors_and_the_vm_keeps_running,
    concurrent_clients_while_the_guest_runs_never_lose_a_write,
);
