//! A hostile or broken client cannot lock others out of the control socket, stall the
//! VMM or make it hold gigabytes (docs/security.md).

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

/// `Threads:` and open file descriptors of the VMM.
fn threads_and_fds(live: &Live) -> (u64, u64) {
    let pid = live.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("VMM status");
    let threads = status.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|v| v.trim().parse().ok()).unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).expect("VMM fds").count() as u64;
    (threads, fds)
}

/// Lets this test process hold more descriptors than the default 1024.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max.min(8192);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

const PAUSED: &str = "proc p\nmap 0x400000 4\nfill 0x400000 4 1\nsync ready\ncheck 0x400000 4 1\nexit 0\n";

#[test]
fn idle_connections_cannot_lock_clients_out() {
    raise_fd_limit();
    let live = Live::start(PAUSED, &[]);
    live.wait("ready");
    // More silent connections than the VMM's default descriptor limit (1024).
    let idle: Vec<UnixStream> = (0..1100).map(|_| UnixStream::connect(live.sock()).expect("connect")).collect();
    // Everyone else is still served, at once.
    for _ in 0..3 {
        let r = live.client("ps", &["--json"]);
        assert_eq!(r.code, 0, "a client locked out by {} idle connections: {r:?}", idle.len());
    }
    // Evicted connections' threads end on their own once their socket is shut down; on
    // a loaded machine that takes a moment, so look until they have settled (or give
    // up: a VMM that keeps a thread per idle connection never settles).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (threads, fds) = loop {
        let (threads, fds) = threads_and_fds(&live);
        if (threads <= 64 + 16 && fds <= 64 + 64) || std::time::Instant::now() > deadline {
            break (threads, fds);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(threads <= 64 + 16, "{threads} threads for idle connections");
    assert!(fds <= 64 + 64, "{fds} descriptors open for idle connections");
    drop(idle);
    live.resume();
    let r = live.finish();
    assert_eq!(r.code, 0, "{r:?}");
}

#[test]
fn a_request_that_never_ends_is_cut_off() {
    let live = Live::start(PAUSED, &[]);
    live.wait("ready");
    let mut slow = UnixStream::connect(live.sock()).unwrap();
    slow.write_all(br#"{"cmd":"st"#).unwrap();
    // The VMM closes it (REQUEST_TIMEOUT, 10 s); this only bounds how long we look.
    slow.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut buf = [0u8; 64];
    let n = slow.read(&mut buf).expect("the VMM closes a request that never ends");
    assert_eq!(n, 0, "expected the connection closed, got {:?}", String::from_utf8_lossy(&buf[..n]));
    let r = live.client("ps", &[]);
    assert_eq!(r.code, 0, "{r:?}");
    live.resume();
    assert_eq!(live.finish().code, 0);
}

#[test]
fn clients_that_never_read_their_pagemaps_cannot_bloat_the_vmm() {
    // A legal 4 GiB mapping: 2^20 pages, the most one pagemap request may ask for.
    let script = "proc big\nmap 0x100000000 1048576\nfill 0x100000000 2 7\nsync ready\nexit 0\n";
    let live = Live::start(script, &["--mem", "64"]);
    live.wait("ready");
    let base = live.peak_rss_mib();
    let stuck: Vec<UnixStream> = (0..8)
        .map(|_| {
            let mut s = UnixStream::connect(live.sock()).unwrap();
            s.write_all(b"{\"cmd\":\"pagemap\",\"pid\":1}\n").unwrap();
            s
        })
        .collect();
    // Each answer has been computed once its first bytes wait in the socket.
    for mut s in &stuck {
        s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).expect("an answer starts"), 1);
    }
    let grown = live.peak_rss_mib().saturating_sub(base);
    assert!(grown < 160, "8 unread 2^20-page answers grew the VMM by {grown} MiB (base {base} MiB)");
    drop(stuck);

    // The CLI streams the same answer: Linux's bytes, or a line per page.
    let raw = std::process::Command::new(vmm_bin())
        .args(["pagemap", "--api-sock", live.sock(), "--pid", "1", "--raw"])
        .output()
        .unwrap();
    assert!(raw.status.success(), "{}", String::from_utf8_lossy(&raw.stderr));
    assert_eq!(raw.stdout.len(), 8 << 20);
    let entry = |i: usize| u64::from_le_bytes(raw.stdout[i * 8..i * 8 + 8].try_into().unwrap());
    assert!(entry(0) >> 63 == 1 && entry(1) >> 63 == 1 && entry(2) >> 63 == 0, "present bits of the first pages");
    let lines = std::process::Command::new(vmm_bin())
        .args(["pagemap", "--api-sock", live.sock(), "--pid", "1", "--json"])
        .output()
        .unwrap();
    assert!(lines.status.success());
    assert_eq!(lines.stdout.iter().filter(|&&b| b == b'\n').count(), 1 << 20);
    let grown = live.peak_rss_mib().saturating_sub(base);
    assert!(grown < 160, "the VMM grew by {grown} MiB");
    live.resume();
    assert_eq!(live.finish().code, 0);
}

#[test]
fn the_client_gives_up_on_a_vmm_that_never_answers() {
    let dir = tempdir();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let hold = std::thread::spawn(move || {
        let conn = listener.accept().map(|(s, _)| s);
        std::thread::sleep(Duration::from_secs(20));
        drop(conn);
    });
    let out = std::process::Command::new(vmm_bin())
        .args(["ps", "--api-sock", path.to_str().unwrap()])
        .env("VMM_CLIENT_TIMEOUT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("did not answer in time"), "{stderr}");
    hold.join().unwrap();
}
