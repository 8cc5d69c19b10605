//! Live migration between two real VMMs under KVM (docs/migration.md): a running guest
//! under every engine (over a Unix socket, then on over TCP with mutual TLS), a guest
//! paused at a sync, failures that must leave the source running (refused certificates
//! and TLS files among them), plain TCP only by explicit choice, and streams the
//! destination must refuse.

mod common;
use common::pki::{Ca, TlsFiles};
use common::*;
use std::io::Write;
use std::os::unix::net::UnixStream;

/// A keeper writes its pages once and checks them over and over, a writer rewrites its
/// pages with changing bytes and checks them: a page lost or stale after the move fails
/// a `check` (exit 1). The first sync only says the guest is up; the rest runs freely,
/// up to `$end` in the keeper (nothing, or a last sync).
macro_rules! busy {
    ($end:literal) => {
        concat!("\
proc keeper
map 0x400000 64
fill 0x400000 64 0x5a
sync go
loop 10000
  check 0x400000 64 0x5a
  yield
end
", $end, "\
exit 0

proc writer
map 0x800000 256
loop 5000
  fill 0x800000 256 0x11
  check 0x800000 256 0x11
  fill 0x800000 256 0x22
  check 0x800000 256 0x22
  yield
end
exit 0
")
    };
}

const BUSY: &str = busy!("");
/// BUSY whose keeper waits at `sync release` before it exits: however fast the guest
/// runs, it is still there for every migration the test makes (a VM paused at the sync
/// migrates as well as a running one), and finishes only when the test releases it.
const BUSY_HELD: &str = busy!("sync release\n");

fn migrate(src: &Live, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--to", to];
    args.extend_from_slice(extra);
    src.client("migrate", &args)
}

/// `migrate --to TO --tls-cert C --tls-key K --tls-ca A EXTRA...` of `files`, through `client`.
fn migrate_tls(client: &dyn Fn(&[&str]) -> Run, to: &str, files: &TlsFiles, extra: &[&str]) -> Run {
    let tls = files.args();
    let mut args = vec!["--to", to];
    args.extend(tls.iter().map(String::as_str));
    args.extend_from_slice(extra);
    client(&args)
}

/// Under `engine`, a running guest moves over a Unix socket, and from there on over TCP
/// with mutual TLS; every check passes at the end.
fn migrates_while_running_and_loses_nothing(engine: &str) {
    let src = Live::start(BUSY_HELD, &["--engine", engine, "--mem", "64", "--timeout", "120"]);
    src.wait("go");
    src.resume();
    let mid = Dest::start(&[]);
    let r = migrate(&src, &mid.addr(), &[]);
    assert_eq!(r.code, 0, "migrate under {engine}: {r:?}");
    assert!(r.stdout.lines().any(|l| l.starts_with("round 0: ")), "a line per round: {r:?}");
    assert!(r.stdout.contains("migrated to unix:") && r.stdout.contains("downtime"), "a summary: {r:?}");
    let s = src.finish();
    assert_eq!(s.code, 80, "the source's run ends with the documented status: {s:?}");
    assert!(s.stderr.contains(&format!("migrated to {}", mid.addr())), "and names the destination: {s:?}");

    // Both ends' certificates from one CA, each naming 127.0.0.1.
    let dir = tempdir();
    let ca = Ca::new("migration CA");
    let (mid_files, dest_files) = (ca.issue(dir.path(), "mid", &["127.0.0.1"]), ca.issue(dir.path(), "dest", &["127.0.0.1"]));
    let dest = Dest::start_tls(&dest_files);
    let r = migrate_tls(&|a| mid.client("migrate", a), &dest.addr(), &mid_files, &[]);
    assert_eq!(r.code, 0, "migrate over TLS under {engine}: {r:?}");
    assert!(r.stdout.contains(&format!("migrated to {}", dest.addr())), "{r:?}");
    let m = mid.finish();
    assert_eq!(m.code, 80, "{m:?}");
    assert!(m.stderr.contains(&format!("migrated to {}", dest.addr())), "{m:?}");
    let w = dest.client("wait", &["--label", "release", "--timeout", "300"]);
    if w.code != 0 {
        panic!("the guest did not reach its last sync on the TLS destination under {engine}: {w:?}\ndestination: {:?}", dest.finish());
    }
    assert_eq!(dest.client("resume", &[]).code, 0);
    let d = dest.finish();
    assert_eq!(d.code, 0, "every check passed after two moves under {engine}: {d:?}");
}

#[test]
fn pte_migrates_while_running_and_loses_nothing() {
    migrates_while_running_and_loses_nothing("pte");
}

#[test]
fn kvm_bitmap_migrates_while_running_and_loses_nothing() {
    migrates_while_running_and_loses_nothing("kvm-bitmap");
}

#[test]
fn kvm_ring_migrates_while_running_and_loses_nothing() {
    migrates_while_running_and_loses_nothing("kvm-ring");
}

#[test]
fn uffd_migrates_while_running_and_loses_nothing() {
    migrates_while_running_and_loses_nothing("uffd");
}

/// Cleared at `start`, then some pages written: at `mid`, soft-dirty is a mix.
const PAUSED: &str = "\
proc p
map 0x400000 32
fill 0x400000 32 1
sync start
fill 0x404000 3 2
map 0x500000 4
sync mid
check 0x400000 4 1
check 0x404000 3 2
fill 0x408000 1 3
sync after
exit 0
";

#[test]
fn a_vm_paused_at_a_sync_arrives_paused_there_with_the_same_answers() {
    for engine in ["pte", "hybrid", "kvm-bitmap"] {
        let src = Live::start(PAUSED, &["--engine", engine]);
        let (pid, _) = src.next_sync();
        src.clear_refs(pid, 4);
        src.resume();
        src.wait("mid");
        let pid_s = pid.to_string();
        let ps = src.client("ps", &["--json"]);
        let pagemap = src.client("pagemap", &["--pid", &pid_s, "--json"]);
        assert_eq!((ps.code, pagemap.code), (0, 0), "{ps:?} {pagemap:?}");

        let dest = Dest::start(&[]);
        let r = migrate(&src, &dest.addr(), &["--json"]);
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(src.finish().code, 80);
        let w = dest.client("wait", &["--label", "mid", "--timeout", "30"]);
        assert_eq!(w.code, 0, "the destination is paused at the same sync: {w:?}");
        assert_eq!(dest.client("ps", &["--json"]).stdout, ps.stdout, "{engine}: ps, byte for byte");
        assert_eq!(dest.client("pagemap", &["--pid", &pid_s, "--json"]).stdout, pagemap.stdout, "{engine}: pagemap, byte for byte");
        // And it goes on as if it had never moved: a clear, then only the page written.
        let c = dest.client("clear-refs", &["--pid", &pid_s, "4"]);
        assert_eq!(c.code, 0, "{c:?}");
        assert_eq!(dest.client("resume", &[]).code, 0);
        assert_eq!(dest.client("wait", &["--label", "after", "--timeout", "30"]).code, 0);
        let after = dest.client("pagemap", &["--pid", &pid_s, "--start", "400000", "--pages", "12", "--json"]);
        let dirty: Vec<bool> = after.stdout.lines().map(parse_page).map(|p| p.soft_dirty).collect();
        let mut want = vec![false; 12];
        want[8] = true;
        if is_exact(engine) {
            assert_eq!(dirty, want, "{engine}: no page reads soft-dirty merely because it arrived");
        } else {
            // KVM logs a page whose guest PTE is dirty when it first maps it on the
            // destination, even for a read (docs/migration.md): a superset, never less.
            assert!(dirty[8] && dirty[9..].iter().all(|d| !d), "{engine}: the written page, and no untouched one: {dirty:?}");
        }
        assert_eq!(dest.client("resume", &[]).code, 0);
        let d = dest.finish();
        assert_eq!(d.code, 0, "{d:?}");
    }
}

#[test]
fn failed_migrations_leave_the_source_running_as_before() {
    let src = Live::start(BUSY, &["--timeout", "120"]);
    src.wait("go");
    // Nobody listens there.
    let dir = tempdir();
    let nowhere = format!("unix:{}", dir.path().join("nobody.sock").display());
    let r = migrate(&src, &nowhere, &[]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("cannot connect to the migration destination"), "{r:?}");
    // TCP without TLS (or the flag that says it is insecure) is refused by name, not
    // half done.
    let r = migrate(&src, "tcp:127.0.0.1:9", &[]);
    assert!(r.code != 0 && r.stderr.contains("TLS"), "{r:?}");
    // A connection dropped in the middle of round 0: the "destination" reads 256 KiB and
    // hangs up.
    let fake = FakeDest::start(Fake::HangUpAfter(256 << 10), None);
    let r = migrate(&src, &fake.addr(), &[]);
    assert_ne!(r.code, 0, "the migration failed: {r:?}");
    assert!(r.stderr.contains("migration connection failed"), "{r:?}");
    // A destination process killed while it waits for the stream.
    let mut dest = Dest::start(&[]);
    dest.kill();
    let r = migrate(&src, &dest.addr(), &[]);
    assert_ne!(r.code, 0, "{r:?}");
    // The source goes on, and a later migration still works.
    src.resume();
    let dest = Dest::start(&[]);
    let r = migrate(&src, &dest.addr(), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(src.finish().code, 80);
    let d = dest.finish();
    assert_eq!(d.code, 0, "{d:?}");
}

#[test]
fn refused_certificates_and_bad_tls_files_leave_the_source_running() {
    let src = Live::start(BUSY, &["--timeout", "120"]);
    src.wait("go");
    let client = |args: &[&str]| src.client("migrate", args);
    let dir = tempdir();
    let (ours, theirs) = (Ca::new("ours"), Ca::new("theirs"));
    let src_files = ours.issue(dir.path(), "src", &["127.0.0.1"]);

    // A destination whose certificate another CA signed (it would trust the source).
    let impostor = TlsFiles { ca: src_files.ca.clone(), ..theirs.issue(dir.path(), "impostor", &["127.0.0.1"]) };
    let dest = Dest::start_tls(&impostor);
    let r = migrate_tls(&client, &dest.addr(), &src_files, &[]);
    assert!(r.code == 65 && r.stderr.contains(&format!("TLS handshake with {} failed: invalid peer certificate: UnknownIssuer", dest.addr())),
        "the source names the certificate it refused: {r:?}");
    let d = dest.finish();
    assert!(d.code == 64 && d.stderr.contains("TLS handshake with tcp:127.0.0.1:") && d.stderr.contains("the source refused it"), "{d:?}");

    // A source whose certificate another CA signed (it trusts the destination).
    let dest_files = ours.issue(dir.path(), "dest", &["127.0.0.1"]);
    let stranger = TlsFiles { ca: dest_files.ca.clone(), ..theirs.issue(dir.path(), "stranger", &["127.0.0.1"]) };
    let dest = Dest::start_tls(&dest_files);
    let r = migrate_tls(&client, &dest.addr(), &stranger, &[]);
    assert!(r.code == 65 && r.stderr.contains("waiting for the destination to accept this side's certificate"), "{r:?}");
    let d = dest.finish();
    assert!(d.code == 64 && d.stderr.contains("failed: invalid peer certificate: UnknownIssuer"), "the destination refuses it by name: {d:?}");

    // One side TLS, the other plaintext: the destination says which, the source goes on.
    let dest = Dest::start_tcp(&["--insecure-plaintext"]);
    let r = migrate_tls(&client, &dest.addr(), &src_files, &[]);
    assert_eq!(r.code, 65, "{r:?}");
    let d = dest.finish();
    assert!(d.code == 64 && d.stderr.contains("a TLS handshake arrived, not a migration stream"), "{d:?}");

    // Files that are not what the flags say, named with the path the VMM read: the
    // client made a relative path absolute.
    let keyless = TlsFiles { key: src_files.cert.clone(), ..src_files.clone() };
    let r = migrate_tls(&client, "tcp:127.0.0.1:9", &keyless, &[]);
    assert!(r.code == 65 && r.stderr.contains(&format!("--tls-key {}: no private key in the file", src_files.cert.display())), "{r:?}");
    let (key, ca) = (src_files.key.to_str().unwrap(), src_files.ca.to_str().unwrap());
    let r = client(&["--to", "tcp:127.0.0.1:9", "--tls-cert", "no-such-cert.pem", "--tls-key", key, "--tls-ca", ca]);
    let abs = std::env::current_dir().unwrap().join("no-such-cert.pem");
    assert!(r.code == 65 && r.stderr.contains(&format!("--tls-cert {}: cannot read it", abs.display())), "{r:?}");
    let r = migrate(&src, "unix:/nowhere.sock", &["--insecure-plaintext"]);
    assert!(r.code == 65 && r.stderr.contains("--insecure-plaintext: only for tcp: addresses"), "{r:?}");

    src.resume();
    let s = src.finish();
    assert_eq!(s.code, 0, "the guest finished here, every check passing: {s:?}");
}

#[test]
fn plain_tcp_needs_insecure_plaintext_on_both_sides() {
    let r = Dest::try_start_tcp(&[]).err().expect("a TCP destination without TLS or --insecure-plaintext does not start");
    assert!(r.code == 64 && r.stderr.contains("missing: --tls-cert, --tls-key, --tls-ca") && r.stderr.contains("--insecure-plaintext"), "{r:?}");
    let src = Live::start(BUSY_HELD, &["--timeout", "120"]);
    src.wait("go");
    let dest = Dest::start_tcp(&["--insecure-plaintext"]);
    let r = migrate(&src, &dest.addr(), &[]);
    assert!(r.code == 65 && r.stderr.contains("--insecure-plaintext"), "nothing starts without the flag: {r:?}");
    src.resume();
    let r = migrate(&src, &dest.addr(), &["--insecure-plaintext"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(src.finish().code, 80);
    assert_eq!(dest.client("wait", &["--label", "release", "--timeout", "300"]).code, 0);
    assert_eq!(dest.client("resume", &[]).code, 0);
    let d = dest.finish();
    assert_eq!(d.code, 0, "{d:?}");
}

/// Starts `vmm migrate ARGS...` on `src` and cancels it once it is known to run (the
/// cancel says whether it was); returns how the migration ended.
fn migrate_and_cancel(src: &Live, args: Vec<String>) -> Run {
    let sock = src.sock.to_str().unwrap().to_string();
    let mig = std::thread::spawn(move || {
        let mut all = vec!["migrate", "--api-sock", &sock];
        all.extend(args.iter().map(String::as_str));
        vmm(&all)
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let c = src.client("migrate-cancel", &[]);
        if c.code == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the migration never started: {c:?}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    mig.join().unwrap()
}

#[test]
fn a_cancelled_migration_leaves_the_guest_running_here() {
    let src = Live::start(BUSY, &["--timeout", "120"]);
    src.wait("go");
    // A destination that reads 64 KiB and then nothing, without hanging up: the
    // migration can only end by the cancel, whenever it comes.
    let fake = FakeDest::start(Fake::StallAfter(64 << 10), None);
    let r = migrate_and_cancel(&src, vec!["--to".into(), fake.addr()]);
    assert!(r.code != 0 && r.stderr.contains("cancelled"), "{r:?}");
    // The same over TLS, where a write that timed out may already be encrypted: the
    // cancel still stops it.
    let dir = tempdir();
    let ca = Ca::new("ca");
    let (dest_files, src_files) = (ca.issue(dir.path(), "dest", &["127.0.0.1"]), ca.issue(dir.path(), "src", &["127.0.0.1"]));
    let fake = FakeDest::start(Fake::StallAfter(64 << 10), Some(&dest_files));
    let mut args = vec!["--to".to_string(), fake.addr()];
    args.extend(src_files.args());
    let r = migrate_and_cancel(&src, args);
    assert!(r.code != 0 && r.stderr.contains("cancelled"), "over TLS: {r:?}");
    src.resume();
    let s = src.finish();
    assert_eq!(s.code, 0, "the guest finished here, every check passing: {s:?}");
}

/// A writer that rewrites 512 pages one page per `yield`, with changing bytes, checking
/// them after every pass: about 1,700 pages a second here (6.7 MiB/s, a third of that
/// under two CPU hogs), each pass over in well under a second. Behind a 2 MiB/s link
/// (512 pages a second, 150 pages fit in the 300 ms downtime) every round finds the
/// whole set rewritten, so pre-copy alone cannot converge; held out 99% of the time the
/// writer dirties a few dozen pages a second, so throttled it must. At `done` the pages
/// hold 0x33, which the last `check` verifies (after a restore, too).
fn fast_writer(loops: u32) -> String {
    writer_of(512, loops)
}

/// [`fast_writer`] over `pages` pages.
fn writer_of(pages: u64, loops: u32) -> String {
    let mut s = format!("proc writer\nmap 0x400000 {pages}\nfill 0x400000 {pages} 0x11\nsync go\n");
    s += &format!("loop {loops}\n");
    for byte in ["0x22", "0x33"] {
        for i in 0..pages {
            s += &format!("fill {:#x} 1 {byte}\nyield\n", 0x400000 + i * 4096);
        }
        s += &format!("check 0x400000 {pages} {byte}\n");
    }
    s += &format!("end\nsync done\ncheck 0x400000 {pages} 0x33\nexit 0\n");
    s
}

/// Waits for [`writer_of`]'s `done` on the source, takes a diff snapshot there into
/// `dir/diff`, and lets the guest finish (every check passing). Returns the diff.
fn diff_at_done_then_finish(src: Live, dir: &std::path::Path) -> std::path::PathBuf {
    let w = src.client("wait", &["--label", "done", "--timeout", "240"]);
    assert_eq!(w.code, 0, "{w:?}");
    let diff = dir.join("diff");
    let d = vmm(&["snapshot", "create", "--api-sock", src.sock(), "--out", diff.to_str().unwrap(), "--diff"]);
    assert_eq!(d.code, 0, "{d:?}");
    src.resume();
    let s = src.finish();
    assert_eq!(s.code, 0, "the source's guest finished, every check passing: {s:?}");
    diff
}

/// Handles [`writer_of`]'s `done` on a destination, and returns its finished run, which
/// must have exited 0 (`what` says why that matters).
fn finish_past_done(dest: Dest, what: &str) -> Run {
    let w = dest.client("wait", &["--label", "done", "--timeout", "240"]);
    assert_eq!(w.code, 0, "{w:?}");
    assert_eq!(dest.client("resume", &[]).code, 0);
    let d = dest.finish();
    assert_eq!(d.code, 0, "{what}: {d:?}");
    d
}

#[test]
fn a_destination_killed_in_a_later_round_leaves_the_source_running() {
    let dir = tempdir();
    let src = Live::start(&fast_writer(20), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    let full = dir.path().join("full");
    assert_eq!(vmm(&["snapshot", "create", "--api-sock", src.sock(), "--out", full.to_str().unwrap()]).code, 0);
    src.resume();
    // Unthrottled behind 2 MiB/s it never converges: rounds go on until the kill.
    let mut dest = Dest::start(&[]);
    let mut mig = std::process::Command::new(vmm_bin())
        .args(["migrate", "--api-sock", src.sock(), "--to", &dest.addr(), "--bandwidth", "2", "--no-throttle", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(mig.stdout.take().unwrap()));
    // Round 1's line comes once round 1 was sent: the kill lands in round 2.
    loop {
        let line = lines.next().expect("the migration ended before round 1").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["round"]["round"] == 1 {
            break;
        }
    }
    dest.kill();
    let out = mig.wait_with_output().unwrap();
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("migration connection failed"), "{out:?}");
    // The source goes on; a diff taken at the end has every page written meanwhile.
    let diff = diff_at_done_then_finish(src, dir.path());
    let restored = vmm(&["run", "--restore", diff.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(restored.code, 0, "{restored:?}");
}

#[test]
fn a_writer_faster_than_the_link_is_throttled_until_it_converges() {
    let src = Live::start(&fast_writer(20), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    src.resume();
    let dest = Dest::start(&[]);
    let r = migrate(&src, &dest.addr(), &["--bandwidth", "2", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = lines.last().unwrap();
    assert_eq!(summary["throttled"], true, "the writer had to be throttled: {r:?}");
    assert!(summary["max_throttle_pct"].as_f64().unwrap() > 0.0 && summary["throttled_ms"].as_f64().unwrap() > 0.0, "{r:?}");
    assert!(lines.iter().any(|l| l["round"]["throttle_pct"].as_f64().is_some_and(|p| p > 0.0)), "progress says so: {r:?}");
    assert_eq!(src.finish().code, 80);
    // Handle `done` on the destination; the writer's last check then passes there.
    finish_past_done(dest, "every check passed after the throttled move");
}

#[test]
fn a_migration_that_cannot_converge_times_out_and_loses_nothing() {
    let dir = tempdir();
    let src = Live::start(&fast_writer(20), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    let full = dir.path().join("full");
    let s = vmm(&["snapshot", "create", "--api-sock", src.sock(), "--out", full.to_str().unwrap()]);
    assert_eq!(s.code, 0, "{s:?}");
    src.resume();
    // Unthrottled, every round finds the whole set rewritten: only the timeout ends it.
    let dest = Dest::start(&[]);
    let r = migrate(&src, &dest.addr(), &["--bandwidth", "2", "--no-throttle", "--timeout", "4"]);
    assert_ne!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains("did not finish within 4s and was cancelled"), "{r:?}");
    let d = dest.finish();
    assert_ne!(d.code, 0, "the destination got a stream that stopped short: {d:?}");
    // The source goes on; what it wrote during the attempt is in a diff taken after it.
    let diff = diff_at_done_then_finish(src, dir.path());
    let v = vmm(&["snapshot", "verify", diff.to_str().unwrap()]);
    assert_eq!(v.code, 0, "{v:?}");
    let restored = vmm(&["run", "--restore", diff.to_str().unwrap(), "--timeout", "60"]);
    assert_eq!(restored.code, 0, "every page written during the failed migration is in the diff: {restored:?}");
}

#[test]
fn a_live_snapshot_is_an_ordinary_full_one_that_restores_and_bases_diffs() {
    let dir = tempdir();
    let src = Live::start(&fast_writer(6), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    src.resume();
    // Taken while the writer rewrites its pages.
    let live = dir.path().join("live");
    let r = vmm(&["snapshot", "create", "--live", "--api-sock", src.sock(), "--out", live.to_str().unwrap(), "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let lines: Vec<serde_json::Value> = r.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines[0]["round"]["round"] == 0, "a line per round: {r:?}");
    let answer = lines.last().unwrap();
    assert_eq!(answer["kind"], "full", "{r:?}");
    assert!(answer["live"]["rounds"].as_u64().unwrap() >= 2 && answer["pause_ns"].as_u64().unwrap() > 0, "{r:?}");
    // A second one into the same directory is refused, and the VM goes on.
    let again = vmm(&["snapshot", "create", "--live", "--api-sock", src.sock(), "--out", live.to_str().unwrap()]);
    assert!(again.code != 0 && again.stderr.contains("exists"), "{again:?}");
    // The chain goes on from the live snapshot.
    let diff = diff_at_done_then_finish(src, dir.path());
    let v = vmm(&["snapshot", "verify", diff.to_str().unwrap()]);
    assert!(v.code == 0 && v.stdout.contains("chain of 2 snapshot(s) verified"), "{v:?}");
    // Restored from the moment of its pause, the writer finishes its loop, every check
    // passing; so does the diff.
    for snap in [&live, &diff] {
        let restored = vmm(&["run", "--restore", snap.to_str().unwrap(), "--timeout", "240"]);
        assert_eq!(restored.code, 0, "{}: {restored:?}", snap.display());
    }
}

#[test]
fn post_copy_runs_the_guest_before_its_memory_arrived() {
    post_copy_runs(|src| {
        let dest = Dest::start(&[]);
        let r = migrate(src, &dest.addr(), &["--postcopy", "--bandwidth", "1", "--json"]);
        (dest, r)
    });
}

#[test]
fn post_copy_runs_over_tls() {
    // The fault thread's requests and the source's pushes share one TLS session.
    let dir = tempdir();
    let ca = Ca::new("migration CA");
    let (src_files, dest_files) = (ca.issue(dir.path(), "src", &["127.0.0.1"]), ca.issue(dir.path(), "dest", &["127.0.0.1"]));
    post_copy_runs(|src| {
        let dest = Dest::start_tls(&dest_files);
        let r = migrate_tls(&|a| src.client("migrate", a), &dest.addr(), &src_files, &["--postcopy", "--bandwidth", "1", "--json"]);
        (dest, r)
    });
}

/// A writer moved in post-copy by `migrate` (which starts its destination) faults on
/// frames that have not arrived, and finishes there with every check passing.
fn post_copy_runs(migrate: impl FnOnce(&Live) -> (Dest, Run)) {
    // 30 loops take ~18 s here, round 0 at 1 MiB/s ~2 s: the writer is still writing
    // (not paused at `done`) when the guest moves, with an 8x margin.
    let src = Live::start(&fast_writer(30), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    src.resume();
    // At 1 MiB/s the 512 pages the writer rewrote during round 0 take 2 s to push,
    // while the writer, running there at once, touches them within microseconds.
    let (dest, r) = migrate(&src);
    assert_eq!(r.code, 0, "{r:?}");
    let summary: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["postcopy"], true, "{r:?}");
    assert!(summary["postcopy_pages"].as_u64().unwrap() > 0, "frames came after the switch-over: {r:?}");
    assert!(summary["demand_faults"].as_u64().unwrap() > 0, "the guest ran before they all arrived: {r:?}");
    assert_eq!(src.finish().code, 80);
    let d = finish_past_done(dest, "every check passed on frames fetched on demand");
    assert!(d.stderr.contains("post-copy done:"), "{d:?}");
}

#[test]
fn a_source_killed_during_post_copy_ends_the_destination_with_the_documented_error() {
    let mut src = Live::start(&writer_of(1024, 20), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    src.resume();
    let dest = Dest::start(&[]);
    let (sock, addr) = (src.sock.clone(), dest.addr());
    let mig = std::thread::spawn(move || vmm(&["migrate", "--api-sock", sock.to_str().unwrap(), "--to", &addr, "--postcopy", "--bandwidth", "1"]));
    // The destination's control socket appears once it committed and runs the guest;
    // its 1,024 missing frames then take 4 s to push at 1 MiB/s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while dest.client("info", &[]).code != 0 {
        assert!(std::time::Instant::now() < deadline, "the destination never ran");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = src.child.kill();
    let d = dest.finish();
    assert_eq!(d.code, 81, "the documented status: {d:?}");
    assert!(d.stderr.contains("the migration source failed during post-copy") && d.stderr.contains("the guest is lost"), "{d:?}");
    let r = mig.join().unwrap();
    assert_ne!(r.code, 0, "{r:?}");
}

#[test]
fn a_migration_that_cannot_converge_falls_back_to_post_copy_when_asked() {
    // 20 loops take ~12 s here: still writing when the 3 s timeout passes (4x margin);
    // a writer paused at `done` would dirty nothing and converge.
    let src = Live::start(&fast_writer(20), &["--mem", "64", "--timeout", "300"]);
    src.wait("go");
    src.resume();
    let dest = Dest::start(&[]);
    // Unthrottled behind 2 MiB/s it never converges (see fast_writer); at the timeout it
    // goes post-copy instead of being cancelled.
    let r = migrate(&src, &dest.addr(), &["--bandwidth", "2", "--no-throttle", "--timeout", "3", "--postcopy-fallback", "--json"]);
    assert_eq!(r.code, 0, "{r:?}");
    let summary: serde_json::Value = serde_json::from_str(r.stdout.lines().last().unwrap()).unwrap();
    assert_eq!(summary["postcopy"], true, "{r:?}");
    // At least round 0 went out before the switch (how many more fit into the 3 s
    // depends on how fast this machine is: on a loaded one round 0 alone may take them).
    let first: serde_json::Value = serde_json::from_str(r.stdout.lines().next().unwrap()).unwrap();
    assert_eq!(first["round"]["round"], 0, "a pre-copy round ran first: {r:?}");
    assert!(summary["rounds"].as_u64().unwrap() >= 2, "pre-copy, then the post-copy switch: {r:?}");
    assert_eq!(src.finish().code, 80);
    finish_past_done(dest, "every check passed after the fallback");
}

#[test]
fn post_copy_is_refused_under_the_uffd_engine() {
    let src = Live::start(&fast_writer(1), &["--engine", "uffd"]);
    src.wait("go");
    let dest = Dest::start(&[]);
    let r = migrate(&src, &dest.addr(), &["--postcopy"]);
    assert!(r.code != 0 && r.stderr.contains("uffd engine"), "{r:?}");
    // Nothing happened: a pre-copy migration still works.
    let r = migrate(&src, &dest.addr(), &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(src.finish().code, 80);
    // It arrives paused at `go`; then `done` pauses it once more.
    assert_eq!(dest.client("resume", &[]).code, 0);
    assert_eq!(dest.client("wait", &["--label", "done", "--timeout", "120"]).code, 0);
    assert_eq!(dest.client("resume", &[]).code, 0);
    let d = dest.finish();
    assert_eq!(d.code, 0, "{d:?}");
}

/// What a [`FakeDest`] does after reading so many bytes of the stream.
#[derive(Clone, Copy)]
enum Fake {
    HangUpAfter(usize),
    /// Reads nothing more, but keeps the connection open (until the test ends).
    StallAfter(usize),
}

/// A listener in this test that plays a destination which never commits: on a Unix
/// socket, or with `tls` on TCP with TLS (the library's own transport).
struct FakeDest {
    addr: String,
    _dir: tempfile::TempDir,
}

impl FakeDest {
    fn start(mode: Fake, tls: Option<&TlsFiles>) -> FakeDest {
        use vmm::migration::transport::{self, Flags, Security};
        let dir = tempdir();
        let (addr, flags) = match tls {
            None => (format!("unix:{}", dir.path().join("fake.sock").display()), Flags::default()),
            Some(f) => ("tcp:127.0.0.1:0".to_string(), Flags {
                tls_cert: Some(f.cert.clone()), tls_key: Some(f.key.clone()), tls_ca: Some(f.ca.clone()), insecure_plaintext: false,
            }),
        };
        let addr: vmm::migration::Addr = addr.parse().unwrap();
        let listener = transport::listen(&addr, &Security::new(&addr, &flags).unwrap()).unwrap();
        let addr = listener.addr().to_string();
        std::thread::spawn(move || {
            let Ok(mut c) = listener.accept_within(std::time::Duration::from_secs(60)) else { return };
            let mut buf = vec![0u8; 64 << 10];
            let (mut total, limit) = match mode {
                Fake::HangUpAfter(n) | Fake::StallAfter(n) => (0, n),
            };
            while total < limit {
                match std::io::Read::read(&mut c, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
            if let Fake::StallAfter(_) = mode {
                // Hold the connection open, reading nothing, for longer than the test.
                std::thread::sleep(std::time::Duration::from_secs(600));
                drop(c);
            }
        });
        FakeDest { addr, _dir: dir }
    }

    fn addr(&self) -> String {
        self.addr.clone()
    }
}

/// Sends `bytes` to a fresh destination and returns how it ended.
fn feed(bytes: &[u8]) -> Run {
    let dest = Dest::start(&[]);
    if let Ok(mut c) = UnixStream::connect(dest.incoming()) {
        let _ = c.write_all(bytes);
    }
    dest.finish()
}

#[test]
fn garbage_truncated_and_future_streams_are_refused() {
    let r = feed(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(r.code, 64, "{r:?}");
    assert!(r.stderr.contains("not a migration stream"), "{r:?}");

    let mut future = b"SDVMMIG\0".to_vec();
    future.extend(9u32.to_le_bytes());
    let r = feed(&future);
    assert!(r.code == 64 && r.stderr.contains("version 9 is not supported"), "{r:?}");

    let mut lying = b"SDVMMIG\0".to_vec();
    lying.extend(1u32.to_le_bytes());
    let hello = br#"{"mem_bytes":1099511627776,"engine":"pte","image_sha256":"00","image_len":1}"#;
    lying.push(1);
    lying.extend((hello.len() as u32).to_le_bytes());
    lying.extend(hello);
    let r = feed(&lying);
    assert!(r.code == 64 && r.stderr.contains("guest memory of 1099511627776 bytes"), "a 1 TiB guest is refused before any allocation: {r:?}");

    let mut truncated = b"SDVMMIG\0".to_vec();
    truncated.extend(1u32.to_le_bytes());
    truncated.extend([3, 0xff, 0xff, 0xff, 0x7f]);
    let r = feed(&truncated);
    assert!(r.code == 64 && r.stderr.contains("exceeds the limit"), "a 2 GiB record is refused unread: {r:?}");

    let r = feed(b"SDVMMIG\0\x01\0\0\0");
    assert!(r.code == 64 && r.stderr.contains("migration"), "a stream that ends early: {r:?}");
}
