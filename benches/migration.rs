//! Live-migration costs (issue: live migration).
//!
//! For 256 MiB and 1 GiB guests with half their memory resident (2 MiB pages, filled),
//! and a writer rewriting a hot set of 0, 1, 4 or 16 MiB as fast as it can: pre-copy
//! (`vmm migrate` while the guest runs) and stop-and-copy (the same migration of a VM
//! paused at a sync: everything is sent with the guest stopped) side by side — total
//! time, downtime, rounds, bytes sent / resident bytes — and round 0's transfer rate
//! against a plain copy of the same number of bytes through a Unix socket pair in this
//! process (the limit of the link); writes docs/benchmarks/migration.{md,json}. Then the
//! cost of the transport: the same 1 GiB pre-copy over a Unix socket, plain TCP and TCP
//! with mutual TLS, on loopback; writes docs/benchmarks/migration_transports.{md,json}.
//! One run of each.
//!
//! Run: `cargo bench -p vmm --bench migration` (needs /dev/kvm; a few minutes, most of
//! it the guests populating their memory); `... -- transports` for the second part only.

mod common;
#[path = "../tests/common/pki.rs"]
mod pki;
use common::Guest;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};
use vmm::run::child::{Options, Stream, VmmChild};

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

/// How the destination listens, and the flags both sides add.
enum Transport {
    Unix,
    Plaintext,
    Tls(pki::TlsFiles),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Unix => "unix",
            Transport::Plaintext => "tcp, plaintext",
            Transport::Tls(_) => "tcp, mutual TLS",
        }
    }
}

/// Migrates `g` to a fresh destination over a Unix socket; returns the summary and
/// round 0's bandwidth.
fn migrate(g: &Guest) -> (Value, f64) {
    migrate_over(g, &Transport::Unix)
}

fn migrate_over(g: &Guest, t: &Transport) -> (Value, f64) {
    migrate_with(g, t, false)
}

fn migrate_with(g: &Guest, t: &Transport, postcopy: bool) -> (Value, f64) {
    let dir = tempfile::tempdir().unwrap();
    let opts = Options { stdout: Stream::Null, stderr: Stream::Null, ..Options::default() };
    let (addr, mut args) = match t {
        Transport::Unix => (format!("unix:{}", dir.path().join("in.sock").display()), vec![]),
        Transport::Plaintext => ("tcp:127.0.0.1:0".to_string(), vec!["--insecure-plaintext".to_string()]),
        Transport::Tls(files) => ("tcp:127.0.0.1:0".to_string(), files.args()),
    };
    args.extend(["--timeout".to_string(), "3000".to_string()]);
    let dest = VmmChild::spawn_incoming_on(Path::new(env!("CARGO_BIN_EXE_vmm")), dir.path(), &addr, &args, &opts)
        .unwrap_or_else(|e| panic!("the destination did not listen: {e}"));
    let mut round0 = 0.0;
    let mut req = json!({"cmd": "migrate", "to": dest.incoming_addr().expect("an incoming child"), "timeout_ms": 600_000});
    if postcopy {
        req["postcopy"] = json!(true);
    }
    match t {
        Transport::Unix => {}
        Transport::Plaintext => req["insecure_plaintext"] = json!(true),
        Transport::Tls(f) => {
            req["tls_cert"] = json!(f.cert);
            req["tls_key"] = json!(f.key);
            req["tls_ca"] = json!(f.ca);
        }
    }
    let summary: Value = vmm::api::call_with_updates(&g.sock, &req, |line| {
        if line["round"]["round"] == 0 {
            round0 = line["round"]["bandwidth_mib_s"].as_f64().unwrap_or(0.0);
        }
    })
    .unwrap_or_else(|e| panic!("migrate: {e}"));
    drop(dest); // killed and reaped: it would run the writer forever
    (summary, round0)
}

/// MiB/s of a plain copy of `bytes` through a Unix socket pair, in 1 MiB writes.
///
/// `Warm`: from and into one reused 1 MiB buffer (cache-hot, no page ever faulted in):
/// the socket alone. `FreshMemory`: the same bytes from a filled buffer of their size
/// into memory that did not exist before, as a migration's destination has to: the
/// kernel zeroes every page on first touch, which in this nested VM costs more than
/// the socket (docs/migration.md).
fn socket_copy(bytes: u64, kind: LinkCopy) -> f64 {
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    const CHUNK: usize = 1 << 20;
    let fresh = kind == LinkCopy::FreshMemory;
    // Filled before the clock starts: reading it is part of the copy, faulting it is not.
    let from = if fresh { vec![0x5au8; bytes as usize] } else { vec![0x5au8; CHUNK] };
    let reader = std::thread::spawn(move || {
        // `vec![0; n]` of this size is a fresh anonymous mapping: nothing faulted in yet.
        let mut into = vec![0u8; if fresh { bytes as usize } else { CHUNK }];
        let mut n = 0usize;
        loop {
            let at = if fresh { n } else { 0 };
            let end = (at + CHUNK).min(into.len());
            match b.read(&mut into[at..end]) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k,
            }
        }
        n as u64
    });
    let t = Instant::now();
    let mut sent = 0usize;
    while sent < bytes as usize {
        let k = (bytes as usize - sent).min(CHUNK);
        let at = if fresh { sent } else { 0 };
        a.write_all(&from[at..at + k]).unwrap();
        sent += k;
    }
    drop(a);
    let got = reader.join().unwrap();
    assert_eq!(got, bytes);
    bytes as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
}

#[derive(Clone, Copy, PartialEq)]
enum LinkCopy {
    Warm,
    FreshMemory,
}

fn main() {
    if !common::bench_start("migration") {
        return;
    }
    if !std::env::args().any(|a| a == "transports") {
        precopy_against_stop_and_copy();
    }
    transports();
}

fn precopy_against_stop_and_copy() {
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
            // Post-copy: round 0, then the destination runs and fetches the rest.
            let g = Guest::start(&script(mem, hot), mem, "kvm-bitmap", false);
            g.wait("ready");
            g.resume();
            std::thread::sleep(Duration::from_millis(300));
            let (post, _) = migrate_with(&g, &Transport::Unix, true);
            drop(g);
            // Snapshots of the running guest: live (pre-copied) against paused.
            let g = Guest::start(&script(mem, hot), mem, "kvm-bitmap", false);
            g.wait("ready");
            g.resume();
            std::thread::sleep(Duration::from_millis(300));
            let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
            let live: Value = vmm::api::call_with_updates(&g.sock, &json!({"cmd": "snapshot-create", "out": dir.path().join("live"), "live": true}), |_| {})
                .unwrap_or_else(|e| panic!("live snapshot: {e}"));
            let paused = g.call(json!({"cmd": "snapshot-create", "out": dir.path().join("paused")}));
            drop(g);
            let link = socket_copy(pre["bytes_sent"].as_u64().unwrap(), LinkCopy::Warm);
            let fresh = socket_copy(pre["bytes_sent"].as_u64().unwrap(), LinkCopy::FreshMemory);
            let row = json!({
                "mem_mib": mem, "hot_mib": hot, "resident_bytes": resident_bytes,
                "precopy": pre, "stop_and_copy": stop, "postcopy": post, "round0_mib_s": round0, "socket_copy_mib_s": link, "fresh_memory_copy_mib_s": fresh,
                "live_snapshot": live, "paused_snapshot": paused,
            });
            println!("{row}");
            rows.push(row);
        }
    }
    let mut md = String::from("# Live migration (generated by `cargo bench -p vmm --bench migration`)\n\n");
    md += "kvm-bitmap engine, Unix socket on one host, half of memory resident (2 MiB pages), a writer rewriting the hot set without pause. ";
    md += "Stop-and-copy: the same migration of a VM paused at a sync (all of it is downtime). Link: a plain copy of the same bytes through a Unix socket pair, between two reused 1 MiB buffers (warm) and from a filled buffer into fresh memory (what a destination must do: the kernel zeroes each page it first touches); round 0 / fresh is the share of that limit round 0 reached.\n\n";
    md += "Post-copy: the same guest, switched over after round 0 (downtime: the state and the commit; the rest is fetched on demand or pushed). ";
    md += "Snapshots: a live (pre-copied) full snapshot of the running guest against a paused full snapshot, both to the same disk.\n\n";
    md += "| guest | hot set | pre-copy total | pre-copy downtime | rounds | sent / resident | stop-and-copy downtime | post-copy total | post-copy downtime | demand faults | blocked | round 0 MiB/s | link warm MiB/s | link into fresh memory MiB/s | round 0 / fresh |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let (p, q) = (&r["precopy"], &r["postcopy"]);
        md += &format!(
            "| {} MiB | {} MiB | {:.0} ms | {:.1} ms | {} | {:.2} | {:.0} ms | {:.0} ms | {:.1} ms | {} | {:.1} ms | {:.0} | {:.0} | {:.0} | {:.0}% |\n",
            r["mem_mib"], r["hot_mib"], p["total_ms"].as_f64().unwrap(), p["downtime_ms"].as_f64().unwrap(), p["rounds"],
            p["bytes_sent"].as_f64().unwrap() / r["resident_bytes"].as_f64().unwrap(),
            r["stop_and_copy"]["total_ms"].as_f64().unwrap(), q["total_ms"].as_f64().unwrap(), q["downtime_ms"].as_f64().unwrap(),
            q["demand_faults"], q["postcopy_blocked_ms"].as_f64().unwrap(),
            r["round0_mib_s"].as_f64().unwrap(), r["socket_copy_mib_s"].as_f64().unwrap(), r["fresh_memory_copy_mib_s"].as_f64().unwrap(),
            100.0 * r["round0_mib_s"].as_f64().unwrap() / r["fresh_memory_copy_mib_s"].as_f64().unwrap()
        );
    }
    md += "\n| guest | hot set | live snapshot pause | live rounds | live total | paused snapshot pause | live / paused |\n|---|---|---|---|---|---|---|\n";
    for r in &rows {
        let (l, p) = (&r["live_snapshot"], &r["paused_snapshot"]);
        let (lp, pp) = (l["pause_ns"].as_f64().unwrap() / 1e6, p["pause_ns"].as_f64().unwrap() / 1e6);
        md += &format!(
            "| {} MiB | {} MiB | {lp:.1} ms | {} | {:.0} ms | {pp:.0} ms | {:.1}% |\n",
            r["mem_mib"], r["hot_mib"], l["live"]["rounds"], l["live"]["total_ns"].as_f64().unwrap() / 1e6, 100.0 * lp / pp
        );
    }
    md += "\n![downtime against hot set](migration.svg)\n";
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    plot(&rows, &docs.join("migration.svg")).unwrap();
    std::fs::write(docs.join("migration.md"), md).unwrap();
    std::fs::write(docs.join("migration.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
}

/// Downtime against hot set: pre-copy, post-copy and stop-and-copy at each size (log).
fn plot(rows: &[Value], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Migration downtime against the writer's hot set (kvm-bitmap, Unix socket)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..17f64, (1f64..5000f64).log_scale())?;
    chart.configure_mesh().x_desc("hot set (MiB)").y_desc("downtime (ms)").draw()?;
    let mut i = 0;
    for (kind, label) in [("precopy", "pre-copy"), ("postcopy", "post-copy"), ("stop_and_copy", "stop-and-copy")] {
        for mem in SIZES {
            let color = Palette99::pick(i).to_rgba();
            i += 1;
            let field = if kind == "stop_and_copy" { "total_ms" } else { "downtime_ms" };
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r["mem_mib"] == mem)
                .map(|r| (r["hot_mib"].as_f64().unwrap(), r[kind][field].as_f64().unwrap().max(1.0)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                .label(format!("{label}, {mem} MiB"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
    }
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    root.present()?;
    Ok(())
}

/// MiB/s of a plain copy of `bytes` over `t` in this process (1 MiB writes): the
/// migration's connection without the migration.
fn link_copy(t: &Transport, bytes: u64) -> f64 {
    use vmm::migration::transport::{self, Flags, Security};
    let dir = tempfile::tempdir().unwrap();
    let (addr, flags) = match t {
        Transport::Unix => (format!("unix:{}", dir.path().join("link.sock").display()), Flags::default()),
        Transport::Plaintext => ("tcp:127.0.0.1:0".to_string(), Flags { insecure_plaintext: true, ..Flags::default() }),
        Transport::Tls(f) => ("tcp:127.0.0.1:0".to_string(), Flags {
            tls_cert: Some(f.cert.clone()), tls_key: Some(f.key.clone()), tls_ca: Some(f.ca.clone()), insecure_plaintext: false,
        }),
    };
    let addr: vmm::migration::Addr = addr.parse().unwrap();
    let security = Security::new(&addr, &flags).unwrap();
    let listener = transport::listen(&addr, &security).unwrap();
    let bound = listener.addr().clone();
    let reader = std::thread::spawn(move || {
        let mut conn = listener.accept_within(Duration::from_secs(10)).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while n < bytes {
            match conn.read(&mut buf).unwrap() {
                0 => break,
                k => n += k as u64,
            }
        }
        n
    });
    let mut conn = transport::connect(&bound, &security).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let t0 = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(chunk.len() as u64) as usize;
        conn.write_all(&chunk[..k]).unwrap();
        left -= k as u64;
    }
    conn.flush().unwrap();
    assert_eq!(reader.join().unwrap(), bytes);
    bytes as f64 / (1 << 20) as f64 / t0.elapsed().as_secs_f64()
}

/// The transport's cost: one 1 GiB guest, no hot set, migrated over each transport in
/// turn, three times (the certificates: one CA, a leaf for 127.0.0.1 that both ends
/// use), and the same bytes copied over each connection alone.
fn transports() {
    let pki_dir = tempfile::tempdir().unwrap();
    let files = pki::Ca::new("bench CA").issue(pki_dir.path(), "bench", &["127.0.0.1"]);
    let all = [Transport::Unix, Transport::Plaintext, Transport::Tls(files)];
    let mut rows = Vec::new();
    for run in 1..=3 {
        for t in &all {
            let g = Guest::start(&script(1024, 0), 1024, "kvm-bitmap", false);
            g.wait("ready");
            g.resume();
            std::thread::sleep(Duration::from_millis(300));
            let (pre, round0) = migrate_over(&g, t);
            drop(g);
            let link = link_copy(t, pre["bytes_sent"].as_u64().unwrap());
            let row = json!({"transport": t.name(), "run": run, "mem_mib": 1024, "hot_mib": 0, "precopy": pre,
                "round0_mib_s": round0, "link_mib_s": link});
            println!("{row}");
            rows.push(row);
        }
    }
    let mut md = String::from("# Migration transports (generated by `cargo bench -p vmm --bench migration -- transports`)\n\n");
    md += "The same 1 GiB guest (kvm-bitmap, half resident, no hot set), pre-copy over each transport on loopback, three runs in turn. ";
    md += "TLS: 1.3, ring, ECDSA P-256 certificates, both ends verified. Link: the same bytes copied over that connection (`vmm::migration::transport`) in one process, 1 MiB writes.\n\n";
    md += "| transport | run | total | downtime | round 0 MiB/s | link MiB/s |\n|---|---|---|---|---|---|\n";
    for r in &rows {
        let p = &r["precopy"];
        md += &format!("| {} | {} | {:.0} ms | {:.1} ms | {:.0} | {:.0} |\n", r["transport"].as_str().unwrap(), r["run"],
            p["total_ms"].as_f64().unwrap(), p["downtime_ms"].as_f64().unwrap(), r["round0_mib_s"].as_f64().unwrap(),
            r["link_mib_s"].as_f64().unwrap());
    }
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks");
    std::fs::write(docs.join("migration_transports.md"), md).unwrap();
    std::fs::write(docs.join("migration_transports.json"), serde_json::to_string_pretty(&rows).unwrap()).unwrap();
}
