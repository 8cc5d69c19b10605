//! `sd-linux SCENARIO...`: runs each scenario's workload as real Linux processes and
//! its plan through `/proc/PID/clear_refs` and `/proc/PID/pagemap`, printing the
//! normalized output of `workload::scenario` — Linux's answer to compare ours with.
//!
//! Each `proc` runs as a forked child, one after another (plans only name the syncing
//! process, so interleaving cannot change an answer). At a `sync` the child reports the
//! label on a pipe and waits; the parent carries out the plan steps for that label on
//! the child, then lets it go on. Built as a static PIE (`scripts/linux-oracle.sh`) so
//! that it stays clear of the addresses scripts map; a scenario address that collides
//! with the executor's own memory is an error, never a silent overwrite.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use workload::scenario::{self, Action, Scenario};
use workload::{BlockCursor, Protection, Range, Statement};

fn pipe() -> (File, File) {
    let mut fds = [0i32; 2];
    // SAFETY: pipe writes two fds into the array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe failed");
    // SAFETY: fresh descriptors we own.
    unsafe { (File::from(OwnedFd::from_raw_fd(fds[0])), File::from(OwnedFd::from_raw_fd(fds[1]))) }
}

/// Ranges the child itself mapped (so MAP_FIXED only ever replaces scenario memory).
struct Child {
    mine: Vec<(u64, u64)>,
    to_parent: File,
    from_parent: File,
    name: String,
    pid: u32,
}

fn die(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: ends the child without running the parent's atexit handlers twice.
    unsafe { libc::_exit(code) }
}

impl Child {
    fn fail(&self, line: u32, msg: &str) -> ! {
        println!("pid {} ({}): line {line}: {msg}", self.pid, self.name);
        die(1)
    }

    fn overlaps_foreign(&self, addr: u64, len: u64) -> bool {
        // Any page of the range that is mapped but not by the scenario?
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        maps.lines().any(|l| {
            let mut it = l.split(['-', ' ']);
            let (Some(s), Some(e)) = (it.next(), it.next()) else { return false };
            let (s, e) = (u64::from_str_radix(s, 16).unwrap_or(0), u64::from_str_radix(e, 16).unwrap_or(0));
            s < addr + len && addr < e && !self.mine.iter().any(|&(ms, me)| ms <= s.max(addr) && e.min(addr + len) <= me)
        })
    }

    fn map(&mut self, line: u32, r: Range, huge: bool, ro: bool) {
        if self.overlaps_foreign(r.addr, r.len()) {
            self.fail(line, "map collides with the executor's own memory");
        }
        let prot = libc::PROT_READ | if ro { 0 } else { libc::PROT_WRITE };
        // SAFETY: the range holds no memory but the scenario's own (checked above).
        let p = unsafe {
            libc::mmap(r.addr as *mut libc::c_void, r.len() as usize, prot,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED, -1, 0)
        };
        if p == libc::MAP_FAILED {
            self.fail(line, "map failed: out of memory or mappings");
        }
        if huge {
            // SAFETY: advice on our own mapping.
            unsafe { libc::madvise(p, r.len() as usize, libc::MADV_HUGEPAGE) };
        }
        self.mine.push((r.addr, r.end()));
    }

    fn run(&mut self, script: &[u8], index: usize) -> ! {
        let mut cursor = BlockCursor::for_proc(script, index).expect("validated scenario");
        while let Some(next) = cursor.next_action() {
            let (line, stmt) = match next {
                Ok(x) => x,
                Err(e) => self.fail(e.line, e.error.kind.describe()),
            };
            match stmt {
                Statement::Map { shared: true, .. } => self.fail(line, "shared mappings are not supported by the Linux executor"),
                Statement::Map { range, huge, read_only, .. } => self.map(line, range, huge, read_only),
                Statement::Unmap { range } => {
                    if !self.overlaps_foreign(range.addr, range.len()) {
                        // SAFETY: the range holds only scenario memory (checked just above);
                        // unmapping holes is allowed, as in the guest.
                        unsafe { libc::munmap(range.addr as *mut libc::c_void, range.len() as usize) };
                    }
                }
                Statement::Protect { range, prot } => {
                    let p = libc::PROT_READ | if prot == Protection::ReadWrite { libc::PROT_WRITE } else { 0 };
                    // SAFETY: changes protection of the scenario's own range.
                    if unsafe { libc::mprotect(range.addr as *mut libc::c_void, range.len() as usize, p) } != 0 {
                        self.fail(line, "protect failed: out of memory or mappings");
                    }
                }
                // SAFETY: the scenario's own mapping; a bad address faults and kills the
                // child (status 139), which is the statement's meaning.
                Statement::Fill { range, byte, .. } => unsafe {
                    std::ptr::write_bytes(range.addr as *mut u8, byte, range.len() as usize)
                },
                Statement::Check { range, byte } => {
                    for i in 0..range.len() {
                        // SAFETY: as for fill.
                        let got = unsafe { std::ptr::read_volatile((range.addr + i) as *const u8) };
                        if got != byte {
                            self.fail(line, &format!("check failed at {:#x}: expected {byte:#x}, found {got:#x}", range.addr + i));
                        }
                    }
                }
                Statement::Touch { range } => {
                    for p in 0..range.pages {
                        // SAFETY: as for fill.
                        unsafe { std::ptr::read_volatile((range.addr + p * 4096) as *const u8) };
                    }
                }
                Statement::Sync { label } => {
                    let _ = writeln!(self.to_parent, "{label}");
                    let mut b = [0u8; 1];
                    if self.from_parent.read_exact(&mut b).is_err() {
                        die(2);
                    }
                }
                Statement::Yield => {
                    // SAFETY: no arguments.
                    unsafe { libc::sched_yield() };
                }
                Statement::Exit { code } => die(i32::from(code)),
                Statement::Proc { .. } | Statement::Loop { .. } | Statement::End => {}
            }
        }
        die(0)
    }
}

/// Runs one scenario; returns its normalized output.
fn run(sc: &Scenario) -> Vec<String> {
    let script = sc.workload.as_bytes();
    let names: Vec<String> = workload::proc_names(script).map(|(_, n)| n.to_string()).collect();
    let mut out = Vec::new();
    let mut arrivals = std::collections::HashMap::<String, u32>::new();
    let mut failed = false;
    for (index, name) in names.iter().enumerate() {
        let pid = index as u32 + 1;
        let (from_child, to_parent) = pipe();
        let (from_parent, to_child) = pipe();
        let _ = std::io::stdout().flush();
        // SAFETY: single-threaded program; the child only runs the workload and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            drop((from_child, to_child));
            let mut c = Child { mine: Vec::new(), to_parent, from_parent, name: name.clone(), pid };
            c.run(script, index);
        }
        drop((to_parent, from_parent));
        let mut to_child = to_child;
        for label in BufReader::new(from_child).lines().map_while(Result::ok) {
            let n = arrivals.entry(label.clone()).or_insert(0);
            *n += 1;
            for step in sc.steps_at(&label) {
                match step.action {
                    Action::Clear { value, .. } => {
                        let path = format!("/proc/{child}/clear_refs");
                        let r = OpenOptions::new().write(true).open(&path).and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()));
                        if r.is_err() {
                            out.push(format!("{label}#{n} pid {pid} clear {value} refused (EINVAL)"));
                        }
                    }
                    Action::Read { addr, pages, .. } => {
                        let f = File::open(format!("/proc/{child}/pagemap")).expect("pagemap");
                        let mut buf = vec![0u8; (pages * 8) as usize];
                        f.read_exact_at(&mut buf, addr / 4096 * 8).expect("pagemap read");
                        for (i, e) in buf.chunks_exact(8).enumerate() {
                            let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                            out.push(scenario::read_line(&label, *n, pid, addr + i as u64 * 4096, e >> 63 == 1,
                                (e >> 55) & 1 == 1, (e >> 56) & 1 == 1));
                        }
                    }
                }
            }
            let _ = to_child.write_all(b"g");
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(child, &mut status, 0) };
        let code = if libc::WIFSIGNALED(status) { 128 + libc::WTERMSIG(status) } else { libc::WEXITSTATUS(status) };
        failed |= code != 0;
    }
    out.extend(scenario::unreached(sc, &arrivals));
    out.push(format!("status {}", if failed { "failed" } else { "ok" }));
    out
}

fn main() {
    let files: Vec<String> = std::env::args().skip(1).collect();
    if files.is_empty() {
        eprintln!("usage: sd-linux SCENARIO...");
        std::process::exit(64);
    }
    for path in files {
        println!("== {path}");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                println!("error: cannot read {path}: {e}");
                continue;
            }
        };
        match scenario::parse(&text) {
            Ok(sc) => {
                for line in run(&sc) {
                    println!("{line}");
                }
            }
            Err(e) => println!("error: {path}:{e}"),
        }
    }
    let _ = std::io::stdout().flush();
}
