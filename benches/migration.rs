//! Live-migration costs (issue: live migration).
//!
//! For 256 MiB and 1 GiB guests with half their memory resident (2 MiB pages, filled),
//! and a writer rewriting a hot set of 0, 1, 4 or 16 MiB as fast as it can: pre-copy
//! (`vmm migrate` while the guest runs) and stop-and-copy (the same migration of a VM
//! paused at a sync: everything is sent with the guest stopped) side by side — total
//! time, downtime, rounds, bytes sent / resident bytes — and round 0's transfer rate
//! against a plain copy of the same number of bytes through a Unix socket pair in this
//! process (the limit of the link). One run; writes docs/benchmarks/migration.{md,json}.
//!
//! Run: `cargo bench -p vmm --bench migration` (needs /dev/kvm; a few minutes, most of
//! it the guests populating their memory).

mod common;
use common::Guest;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIZES: [u64; 2] = [256, 1024];
const HOT_MIB: [u64; 4] = [0, 1, 4, 16];
const RESIDENT: u64 = 0x4000_0000;
const HOT: u64 = 0x8000_0000;

/// Half of memory resident, then a writer over `hot` MiB that never stops (the
/// destination is killed once it has the VM).
fn script(mem_mib: u64, hot: u64) -> String {
    let resident = mem_mib / 2 * 256;
    let mut s = format!("proc resident\nmap {RESIDENT:#x} {resident} huge\nfill {RESIDENT:#x} {resident} 0x5a\nsync ready\nloop 100000000\n  yield\nend\n");
    if hot > 0 {
        let pages = hot * 256;
        s += &format!("proc writer\nmap {HOT:#x} {pages}\nloop 100000000\n  fill {HOT:#x} {pages} 0x11\n  fill {HOT:#x} {pages} 0x22\nend\n");
    }
    s
}

/// A destination waiting on DIR/in.sock.
fn destination(dir: &Path) -> (Child, PathBuf) {
    let sock = dir.join("in.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "--incoming", &format!("unix:{}", sock.display()), "--timeout", "3000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the destination");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, sock)
}

/// Migrates `g` to a fresh destination; returns the summary and round 0's bandwidth.
fn migrate(g: &Guest) -> (Value, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (mut dest, sock) = destination(dir.path());
    let mut round0 = 0.0;
    let req = json!({"cmd": "migrate", "to": format!("unix:{}", sock.display()), "timeout_ms": 600_000});
    let summary: Value = vmm::api::call_with_updates(&g.sock, &req, |line| {
        if line["round"]["round"] == 0 {
            round0 = line["round"]["bandwidth_mib_s"].as_f64().unwrap_or(0.0);
        }
    })
    .unwrap_or_else(|e| panic!("migrate: {e}"));
    let _ = dest.kill();
    let _ = dest.wait();
    (summary, round0)
}

/// MiB/s of a plain copy of `bytes` through a Unix socket pair (1 MiB writes).
fn socket_copy(bytes: u64) -> f64 {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = b.read(&mut buf) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        a.write_all(&chunk[..k]).unwrap();
        left -= k as u64;
    }
    drop(a);
    let got = reader.join().unwrap();
    assert_eq!(got, bytes);
    bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    if !common::bench_start("migration") {
        return;
    }
    let mut rows = Vec::new();
    for mem in SIZES {
        let resident_bytes = (mem / 2) << 20;
        for hot in HOT_MIB {
            // Pre-copy: the guest runs all along.
            let g = Guest::start(&script(mem, hot), mem, "kvm-bitmap", false);
            g.wait("ready");
            g.resume();
            std::thread::sleep(Duration::from_millis(300));
            let (pre, round0) = migrate(&g);
            drop(g);
            // Stop-and-copy: the same VM paused at its sync for the whole migration.
            let g = Guest::start(&script(mem, hot), mem, "kvm-bitmap", false);
            g.wait("ready");
            let (stop, _) = migrate(&g);
            drop(g);
            let link = socket_copy(pre["bytes_sent"].as_u64().unwrap());
            let row = json!({
                "mem_mib": mem, "hot_mib": hot, "resident_bytes": resident_bytes,
                "precopy": pre, "stop_and_copy": stop, "round0_mib_s": round0, "socket_copy_mib_s": link,
            });
            println!("{row}");
            rows.push(row);
        }
    }
    let mut md = String::from("# Live migration (generated by `cargo bench -p vmm --bench migration`)\n\n");
    md += "kvm-bitmap engine, Unix socket on one host, half of memory resident (2 MiB pages), a writer rewriting the hot set without pause. ";
    md += "Stop-and-copy: the same migration of a VM paused at a sync (all of it is downtime). Link: a plain copy of the same bytes through a Unix socket pair.\n\n";
    md += "| guest | hot set | pre-copy total | pre-copy downtime | rounds | sent / resident | stop-and-copy downtime | round 0 MiB/s | link MiB/s |\n|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let p = &r["precopy"];
        md += &format!(
            "| {} MiB | {} MiB | {:.0} ms | {:.1} ms | {} | {:.2} | {:.0} ms | {:.0} | {:.0} |\n",
            r["mem_mib"], r["hot_mib"], p["total_ms"].as_f64().unwrap(), p["downtime_ms"].as_f64().unwrap(), p["rounds"],
            p["bytes_sent"].as_f64().unwrap() / r["resident_bytes"].as_f64().unwrap(),
            r["stop_and_copy"]["total_ms"].as_f64().unwrap(), r["round0_mib_s"].as_f64().unwrap(), r["socket_copy_mib_s"].as_f64().unwrap()
        );
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::write(docs.join("migration.md"), md).unwrap();
    std::fs::write(docs.join("migration.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
}
