//! Unmodified static Linux programs as guest processes (`vmm run --exec PROGRAM --
//! ARGS`), built from C here with the host's gcc (glibc) and musl-gcc, run through the
//! real binary under KVM.

mod common;
use common::linux::{glibc_static, glibc_static_pie, musl_static, program};
use common::{require_kvm, tempdir, vmm, Live, Run, ENGINES};
use std::path::Path;
use std::time::{Duration, Instant};


const HELLO: &str = r#"#include <stdio.h>
int main(void) { printf("hello, world\n"); return 3; }
"#;

/// `vmm run --exec PROGRAM EXTRA... -- ARGS...`
fn exec(program: &Path, extra: &[&str], args: &[&str]) -> Run {
    require_kvm();
    let mut a = vec!["run", "--exec", program.to_str().unwrap(), "--timeout", "120"];
    a.extend_from_slice(extra);
    if !args.is_empty() {
        a.push("--");
        a.extend_from_slice(args);
    }
    vmm(&a)
}

#[test]
fn static_glibc_programs_print_and_exit_with_their_status_under_every_engine() {
    for program in [glibc_static("hello", HELLO), glibc_static_pie("hello-pie", HELLO)] {
        for engine in ENGINES {
            let r = exec(&program, &["--engine", engine], &[]);
            assert_eq!(r.code, 3, "{} under {engine}: the program's status is vmm's: {r:?}", program.display());
            assert_eq!(r.stdout, "hello, world\n", "{} under {engine}: the console carries the program's output only: {r:?}", program.display());
            assert!(r.stderr.contains("guest kernel:") && r.stderr.contains("with status 3"), "the kernel's lines go to stderr: {r:?}");
        }
    }
}

#[test]
fn a_static_musl_program_runs_as_on_the_host() {
    let r = exec(&musl_static("hello-musl", HELLO), &[], &[]);
    assert_eq!((r.code, r.stdout.as_str()), (3, "hello, world\n"), "{r:?}");
}

const ARGS: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
int main(int argc, char **argv, char **envp) {
    printf("argc=%d\n", argc);
    for (int i = 0; i < argc; i++) printf("argv[%d]=%s\n", i, argv[i]);
    int n = 0;
    for (char **e = envp; *e; e++) n++;
    unsigned char *r = (unsigned char *)getauxval(AT_RANDOM);
    printf("envc=%d pagesz=%lu secure=%lu random=%d\n", n, getauxval(AT_PAGESZ), getauxval(AT_SECURE), r != 0);
    /* malloc: small from brk, large from mmap; then give it back. */
    char *big = malloc(4 << 20);
    memset(big, 7, 4 << 20);
    char *small = malloc(100);
    strcpy(small, "heap");
    printf("%s %d %d\n", small, big[12345], big[(4 << 20) - 1]);
    free(big);
    /* A fixed mapping, made read-only, then unmapped. */
    char *m = mmap((void *)0x10000000, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    m[0] = 1;
    int ro = mprotect(m, 4096, PROT_READ);
    int again = mmap((void *)0x10000000, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0) == MAP_FAILED;
    printf("fixed=%p mprotect=%d noreplace-refused=%d munmap=%d\n", (void *)m, ro, again, munmap(m, 8192));
    fprintf(stderr, "to stderr\n");
    return 0;
}
"#;

#[test]
fn arguments_memory_calls_and_the_aux_vector_work_as_on_linux() {
    for program in [glibc_static("args", ARGS), musl_static("args-musl", ARGS)] {
        let r = exec(&program, &[], &["one", "two three"]);
        assert_eq!(r.code, 0, "{r:?}");
        let expected = format!(
            "argc=3\nargv[0]={}\nargv[1]=one\nargv[2]=two three\nenvc=0 pagesz=4096 secure=0 random=1\nheap 7 7\n\
             fixed=0x10000000 mprotect=0 noreplace-refused=1 munmap=0\n",
            program.display()
        );
        // stderr is unbuffered and both go to the console: take it out wherever it is.
        assert_eq!(r.stdout.replacen("to stderr\n", "", 1), expected, "{}: {r:?}", program.display());
        assert!(r.stdout.contains("to stderr\n"), "{r:?}");
    }
}

#[test]
fn unimplemented_system_calls_fail_with_enosys_and_are_reported() {
    let src = r#"#include <stdio.h>
#include <errno.h>
#include <unistd.h>
int main(void) {
    long r = syscall(500, 1, 2, 3);
    printf("%ld %d\n", r, errno);
    syscall(500);
    return 0;
}
"#;
    let r = exec(&glibc_static("enosys", src), &[], &[]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "-1 38\n"), "{r:?}");
    assert!(r.stderr.contains("unimplemented system calls: ") && r.stderr.contains("500 x2"), "{r:?}");
}

#[test]
fn a_fault_or_an_illegal_instruction_ends_the_program_as_a_signal_would() {
    let segv = glibc_static("segv", "int main(void) { *(volatile int *)8 = 1; return 0; }\n");
    let r = exec(&segv, &[], &[]);
    assert_eq!(r.code, 139, "{r:?}");
    assert!(r.stderr.contains("(segv): segmentation fault: no mapping at 0x8, killed"), "{r:?}");
    let ill = glibc_static("ill", "int main(void) { __builtin_trap(); }\n");
    let r = exec(&ill, &[], &[]);
    assert_eq!(r.code, 132, "{r:?}");
    assert!(r.stderr.contains("(ill): illegal instruction at"), "{r:?}");
}

#[test]
fn programs_that_cannot_run_here_are_refused_before_anything_boots() {
    let dir = tempdir();
    let hello = glibc_static("hello", HELLO);
    let dynamic = program("gcc", "hello-dynamic", HELLO, &["-O2"]);
    let mut bytes = std::fs::read(&hello).unwrap();
    bytes[4] = 1; // ELFCLASS32
    let class32 = dir.path().join("class32");
    std::fs::write(&class32, &bytes).unwrap();
    let text = dir.path().join("script.sh");
    std::fs::write(&text, "#!/bin/sh\necho hi\n").unwrap();
    let missing = dir.path().join("missing");
    let truncated = dir.path().join("truncated");
    std::fs::write(&truncated, &std::fs::read(&hello).unwrap()[..100_000]).unwrap();
    // 300 KiB in three arguments (the host takes at most 128 KiB per argument).
    let long = "x".repeat(100 << 10);
    let longs = [long.as_str(); 3];
    for (path, why, args) in [
        (&dynamic, "dynamically linked", &[][..]),
        (&class32, "32-bit", &[]),
        (&text, "not an ELF file", &[]),
        (&missing, "cannot read program", &[]),
        (&truncated, "past the end of the file", &[]),
        (&hello, "arguments and environment take", &longs[..]),
    ] {
        let r = exec(path, &[], args);
        assert_eq!(r.code, 64, "{}: {r:?}", path.display());
        assert!(r.stderr.contains(&path.display().to_string()) && r.stderr.contains(why), "{}: {r:?}", path.display());
        assert!(!r.stderr.contains("guest kernel"), "refused before the guest booted: {r:?}");
    }
}

#[test]
fn a_running_program_is_seen_from_outside_with_its_mappings_and_soft_dirty_pages() {
    // Writes 16 pages of a fixed mapping once, then yields forever.
    let src = r#"#include <sched.h>
#include <string.h>
#include <sys/mman.h>
int main(void) {
    char *p = mmap((void *)0x10000000, 16 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    memset(p, 1, 16 * 4096);
    for (;;) sched_yield();
}
"#;
    let program = glibc_static("yielder", src);
    for engine in ["pte", "kvm-bitmap"] {
        let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--engine", engine, "--timeout", "300"]);
        // The writes are done once all 16 pages are present (bounded wait, no timing).
        let deadline = Instant::now() + Duration::from_secs(60);
        while !live.pagemap(1, 0x1000_0000, 16).iter().all(|p| p.present) {
            assert!(Instant::now() < deadline, "the program never wrote its pages under {engine}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ps = live.ps();
        assert_eq!(ps[0]["name"], "yielder", "{ps:?}");
        let maps = ps[0]["mappings"].as_array().unwrap();
        assert!(maps.iter().any(|m| m["start"] == 0x1000_0000u64 && m["pages"] == 16), "{maps:?}");
        assert!(maps.iter().any(|m| m["exec"] == true && m["read_only"] == true), "the text is an executable mapping: {maps:?}");
        assert!(live.soft_dirty(1, 0x1000_0000, 16).iter().all(|&d| d), "written since it started, under {engine}");
        live.clear_refs(1, 4);
        assert!(live.soft_dirty(1, 0x1000_0000, 16).iter().all(|&d| !d), "not written since the clear, under {engine}");
    }
}

#[test]
fn what_a_system_call_stores_into_the_program_is_a_soft_dirty_write_under_every_engine() {
    // Pauses at `sync`s (softdirty-vmm's extension call) so that the test clears and
    // reads at known points; uname() then stores into the middle page only.
    let src = r#"#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/utsname.h>
static void sd_sync(const char *label) { syscall(0x5d00, label, strlen(label)); }
int main(void) {
    char *p = mmap((void *)0x10000000, 3 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    memset(p, 1, 3 * 4096);
    sd_sync("written");
    struct utsname *u = (struct utsname *)(p + 4096);
    if (uname(u) != 0) return 2;
    sd_sync("stored");
    return strcmp(u->sysname, "Linux") == 0 && strcmp(u->machine, "x86_64") == 0 ? 0 : 1;
}
"#;
    let program = glibc_static("uname-store", src);
    for engine in ENGINES {
        let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--engine", engine, "--timeout", "120"]);
        live.wait("written");
        live.clear_refs(1, 4);
        assert_eq!(live.soft_dirty(1, 0x1000_0000, 3), vec![false; 3], "clean after the clear, under {engine}");
        let caught = live.info()["tracker"]["faults_caught"].as_u64().unwrap();
        live.resume();
        live.wait("stored");
        assert_eq!(live.soft_dirty(1, 0x1000_0000, 3), vec![false, true, false], "uname's store is a write, under {engine}");
        if engine == "pte" {
            // Ring 0's store hit the page the clear write-protected, and the trap took
            // it like a store of the program's own (not only KVM's log, the backstop).
            assert!(live.info()["tracker"]["faults_caught"].as_u64().unwrap() > caught, "under pte");
        }
        live.resume();
        let r = live.finish();
        assert_eq!(r.code, 0, "uname's answer is Linux's, under {engine}: {r:?}");
    }
}

/// The VMM's own stores into a program (a file's bytes for `read`, a pagemap answer
/// for `pread` of /proc/self/pagemap: written by the VMM into the program's frames, not
/// by the CPU through its page tables) are writes of the program's pages, as Linux's
/// copy_to_user is: the pages read soft-dirty under every engine, the ones beside them
/// clean. The hybrid engine reads PTE Dirty bits, which such a store does not set.
#[test]
fn what_the_vmm_stores_into_the_program_is_a_soft_dirty_write_under_every_engine() {
    let src = r#"#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
static void sd_sync(const char *label) { syscall(0x5d00, label, strlen(label)); }
int main(int argc, char **argv) {
    char *p = mmap((void *)0x10000000, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    memset(p, 1, 4 * 4096);
    int fd = open(argv[1], O_RDONLY), pm = open("/proc/self/pagemap", O_RDONLY);
    if (fd < 0 || pm < 0) return 2;
    sd_sync("written");
    if (read(fd, p + 4096, 100) != 100) return 3;
    if (pread(pm, p + 3 * 4096, 8, 0x10000000 / 4096 * 8) != 8) return 4;
    sd_sync("stored");
    return p[4096] == 'l' && (*(uint64_t *)(p + 3 * 4096) >> 63) == 1 ? 0 : 1;
}
"#;
    let program = glibc_static("vmm-store", src);
    let dir = tempdir();
    let file = text_file(dir.path(), "in.txt", 1000);
    let spec = format!("{}:/data/in.txt", file.display());
    for engine in ENGINES {
        let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--file", &spec, "--engine", engine, "--timeout", "120",
            "--", "/data/in.txt"]);
        live.wait("written");
        live.clear_refs(1, 4);
        assert_eq!(live.soft_dirty(1, 0x1000_0000, 4), vec![false; 4], "clean after the clear, under {engine}");
        live.resume();
        live.wait("stored");
        assert_eq!(live.soft_dirty(1, 0x1000_0000, 4), vec![false, true, false, true],
            "read()'s and pread()'s stores are writes, under {engine}");
        live.resume();
        let r = live.finish();
        assert_eq!(r.code, 0, "the program got its bytes, under {engine}: {r:?}");
    }
}

/// Reads its own /proc/self/pagemap and writes /proc/self/clear_refs as Linux's
/// soft-dirty users do, then prints what it read.
const OWN_PAGEMAP: &str = r#"#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
static void sd_sync(const char *label) { syscall(0x5d00, label, strlen(label)); }
static uint64_t entry(int fd, void *addr) {
    uint64_t e;
    if (pread(fd, &e, 8, (uintptr_t)addr / 4096 * 8) != 8) return ~0ull;
    return e;
}
static int sd(uint64_t e) { return (int)(e >> 55 & 1); }
int main(void) {
    int pm = open("/proc/self/pagemap", O_RDONLY);
    int cr = open("/proc/self/clear_refs", O_WRONLY);
    char *p = mmap((void *)0x10000000, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    memset(p, 1, 4 * 4096);
    printf("written sd=%d present=%d\n", sd(entry(pm, p)), (int)(entry(pm, p) >> 63));
    if (write(cr, "4\n", 2) != 2) return 2;
    printf("cleared sd=%d\n", sd(entry(pm, p)));
    p[4096] = 2;
    printf("after sd=%d,%d\n", sd(entry(pm, p)), sd(entry(pm, p + 4096)));
    uint64_t e[4];
    lseek(pm, (uintptr_t)p / 4096 * 8, SEEK_SET);
    long n = read(pm, e, sizeof e);
    printf("bulk %ld %d%d%d%d\n", n, sd(e[0]), sd(e[1]), sd(e[2]), sd(e[3]));
    errno = 0; int bad = write(cr, "9", 1); printf("clear 9: %d %d\n", bad, errno);
    errno = 0; bad = pread(pm, e, 8, 3); printf("pread odd: %d %d\n", bad, errno);
    errno = 0; bad = open("/proc/self/environ", O_RDONLY); printf("open environ: %d %d\n", bad, errno);
    errno = 0; bad = open("/proc/self/pagemap", O_WRONLY); printf("open pagemap wr: %d %d\n", bad, errno);
    errno = 0; bad = ioctl(pm, 0xc0606610, 0); printf("scan: %d %d\n", bad, errno);
    sd_sync("compare");
    for (int i = 0; i < 4; i++) printf("%016llx\n", (unsigned long long)e[i]);
    return 0;
}
"#;

#[test]
fn a_program_reads_its_own_pagemap_and_clears_its_own_refs_through_the_vmm() {
    let program = glibc_static("own-pagemap", OWN_PAGEMAP);
    for engine in ENGINES {
        let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--engine", engine, "--timeout", "120"]);
        live.wait("compare");
        let outside: Vec<u64> = live.pagemap(1, 0x1000_0000, 4).iter().map(|p| p.entry).collect();
        live.resume();
        let r = live.finish();
        assert_eq!(r.code, 0, "under {engine}: {r:?}");
        let lines: Vec<&str> = r.stdout.lines().collect();
        let expected = [
            "written sd=1 present=1",
            "cleared sd=0",
            "after sd=0,1",
            "bulk 32 0100",
            "clear 9: -1 22",
            "pread odd: -1 22",
            "open environ: -1 2",
            "open pagemap wr: -1 13",
            "scan: -1 25",
        ];
        assert!(lines.len() == 13 && lines[..9] == expected, "Linux's answers and errors, under {engine}: {r:?}");
        let inside: Vec<u64> = lines[9..13].iter().map(|l| u64::from_str_radix(l, 16).unwrap()).collect();
        assert_eq!(inside, outside, "the program's own pagemap read is `vmm pagemap`'s answer, entry for entry, under {engine}");
    }
}

/// A text file of `n` bytes that no two tests share by accident.
fn text_file(dir: &Path, name: &str, n: usize) -> std::path::PathBuf {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < n {
        s += &format!("line {i} {:x}\n", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        i += 1;
    }
    s.truncate(n);
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn files_put_in_with_file_read_as_linux_files_do() {
    let src = r#"#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include <sys/stat.h>
int main(int argc, char **argv) {
    int fd = open(argv[1], O_RDONLY);
    if (fd < 0) { perror("open"); return 1; }
    struct stat st;
    if (fstat(fd, &st) != 0) return 2;
    char buf[1000];
    long n, total = 0;
    while ((n = read(fd, buf, sizeof buf)) > 0) { write(1, buf, n); total += n; }
    char tail[5] = {0};
    long end = lseek(fd, -4, SEEK_END);
    long got = pread(fd, tail, 4, end);
    int dup = dup2(fd, 7);
    printf("size=%ld total=%ld end=%ld pread=%ld tail=%s dup=%d\n", (long)st.st_size, total, end, got, tail, dup);
    printf("missing=%d write=%d\n", open("/nope", O_RDONLY), open(argv[1], O_WRONLY) >= 0);
    return 0;
}
"#;
    let dir = tempdir();
    let file = text_file(dir.path(), "in.txt", 100_000);
    let spec = format!("{}:/data/in.txt", file.display());
    let r = exec(&glibc_static("readfile", src), &["--file", &spec], &["/data/in.txt"]);
    assert_eq!(r.code, 0, "{r:?}");
    let content = std::fs::read_to_string(&file).unwrap();
    let tail = &content[content.len() - 4..];
    let expected = format!("{content}size=100000 total=100000 end=99996 pread=4 tail={tail} dup=7\nmissing=-1 write=1\n");
    assert!(r.stdout == expected, "the file's bytes, then Linux's answers (stdout {} bytes, expected {}): {}", r.stdout.len(), expected.len(),
        &r.stdout[r.stdout.len().saturating_sub(200)..]);
    // Bad --file specs are refused before boot.
    let bad = exec(&glibc_static("readfile", src), &["--file", "/no/such/file"], &[]);
    assert!(bad.code == 64 && bad.stderr.contains("--file /no/such/file"), "{bad:?}");
    let relative = exec(&glibc_static("readfile", src), &["--file", &format!("{}:data/x", file.display())], &[]);
    assert!(relative.code == 64 && relative.stderr.contains("must be absolute"), "{relative:?}");
}

#[test]
fn files_the_program_makes_behave_as_on_a_linux_host_under_every_engine() {
    same_output_as_on_the_host("files", include_str!("linux/files.c"), "store-through-map=X\nwrite-seen-in-map=W\n");
}

#[test]
fn madvise_pagemap_and_status_answer_as_on_a_linux_host_under_every_engine() {
    same_output_as_on_the_host("memory", include_str!("linux/memory.c"), "anon: 1/10 0/0 0/0 1/13\n");
}

#[test]
fn maps_and_smaps_name_files_shared_memory_the_heap_and_the_stack_as_a_linux_host_does_under_every_engine() {
    same_output_as_on_the_host("maps", include_str!("linux/maps.c"), "tmp-unlinked: rw-s 00000000 col=73 ids=file name=/tmp/sdvmm-maps-PID (deleted)\n");
}

/// Builds `source`, runs it on the host (in a directory of its own) and in the guest
/// under every engine: the guest's output must be the host's, line by line. `landmark`
/// is a piece the host's output must hold (the reference is what was meant).
fn same_output_as_on_the_host(name: &str, source: &str, landmark: &str) {
    let program = glibc_static(name, source);
    let dir = tempdir();
    let host = std::process::Command::new(&program).current_dir(dir.path()).output().unwrap();
    assert!(host.status.success(), "on the host: {host:?}");
    let host = String::from_utf8(host.stdout).unwrap();
    assert!(host.contains(landmark), "the host's run is the reference: {host}");
    for engine in ENGINES {
        let r = exec(&program, &["--engine", engine], &[]);
        assert_eq!(r.code, 0, "under {engine}: {r:?}");
        assert!(r.stdout == host, "under {engine}, line by line against the host's:\n{}", first_difference(&host, &r.stdout));
    }
}

/// The first line where two outputs differ, for a readable failure.
fn first_difference(want: &str, got: &str) -> String {
    let (w, g): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    match (0..w.len().max(g.len())).find(|&i| w.get(i) != g.get(i)) {
        Some(i) => format!("line {}: host {:?}, guest {:?}", i + 1, w.get(i), g.get(i)),
        None => "no line differs (line ends do)".into(),
    }
}

#[test]
fn busybox_tools_give_the_hosts_output() {
    require_kvm();
    let busybox = common::linux::busybox_static();
    let dir = tempdir();
    let file = text_file(dir.path(), "data.txt", 200_000);
    for tool in [&["sha256sum"][..], &["md5sum"], &["gzip", "-c"], &["wc", "-l"]] {
        let mut guest_args = vec!["run", "--exec", busybox.to_str().unwrap(), "--file"];
        let spec = format!("{}:/data.txt", file.display());
        guest_args.extend([spec.as_str(), "--timeout", "120", "--"]);
        guest_args.extend_from_slice(tool);
        guest_args.push("/data.txt");
        let guest = std::process::Command::new(common::vmm_bin()).args(&guest_args).output().unwrap();
        // The same busybox on the host, on the same bytes at the same path name.
        let host = std::process::Command::new(&busybox).args(tool).arg("data.txt").current_dir(dir.path()).output().unwrap();
        assert!(guest.status.success(), "{tool:?} in the guest: {}", String::from_utf8_lossy(&guest.stderr));
        let fix = |b: &[u8]| String::from_utf8_lossy(b).replace("/data.txt", "data.txt").into_bytes();
        let (g, h) = if tool[0] == "gzip" { (guest.stdout.clone(), host.stdout.clone()) } else { (fix(&guest.stdout), host.stdout.clone()) };
        assert!(!h.is_empty() && g == h, "busybox {tool:?}: the guest's output differs from the host's ({} against {} bytes)", g.len(), h.len());
    }
}

#[test]
fn a_linux_program_and_scripted_processes_run_side_by_side() {
    // pid 1 is scripted; pid 2 execs a C program from the guest's file system. Their
    // syncs come in either order; each check holds whenever the other process is.
    let src = r#"#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
static void sd_sync(const char *label) { syscall(0x5d00, label, strlen(label)); }
int main(int argc, char **argv) {
    /* The scripted process's /proc entry, as Linux's /proc/PID of another process. */
    char status[4096] = {0};
    int fd = open("/proc/1/status", O_RDONLY);
    if (fd < 0 || read(fd, status, sizeof status - 1) <= 0 || strncmp(status, "Name:\twriter\n", 13) != 0) return 5;
    close(fd);
    char *p = mmap((void *)0x10000000, 4 * 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    p[0] = 1;
    p[2 * 4096] = 1;
    sd_sync(argv[1]);
    p[4096] = 1;
    sd_sync("again");
    return 0;
}
"#;
    let program = glibc_static("side", src);
    for engine in ["pte", "kvm-bitmap"] {
        let dir = tempdir();
        let script = common::write_script(dir.path(), "w.wl", "proc writer\nmap 0x400000 4\nfill 0x400000 4 0x11\nsync scripted\ncheck 0x400000 4 0x11\nproc side exec /bin/side wrote\n");
        let file = format!("{}:/bin/side", program.display());
        let live = Live::with_args(&["--workload", script.to_str().unwrap(), "--file", &file, "--engine", engine, "--timeout", "120"]);
        let ps = live.ps();
        assert_eq!((ps[0]["name"].as_str(), ps[1]["name"].as_str()), (Some("writer"), Some("side")), "{ps:?}");
        let mut seen = Vec::new();
        let r = live.drive(|live, label, pid| {
            seen.push(label.to_string());
            match (label, pid) {
                ("scripted", 1) => assert_eq!(live.soft_dirty(1, 0x40_0000, 4), vec![true; 4], "under {engine}"),
                ("wrote", 2) => {
                    let pages = live.pagemap(2, 0x1000_0000, 4);
                    assert_eq!(pages.iter().map(|p| p.present).collect::<Vec<_>>(), [true, false, true, false], "under {engine}");
                    assert!(pages[0].soft_dirty && pages[2].soft_dirty, "under {engine}");
                    live.clear_refs(2, 4);
                }
                ("again", 2) => {
                    assert_eq!(live.soft_dirty(2, 0x1000_0000, 4), vec![false, true, false, false], "what it wrote since the clear, under {engine}");
                }
                other => panic!("unexpected sync {other:?}"),
            }
        });
        assert_eq!(r.code, 0, "every check passed on both sides under {engine}: {r:?}");
        seen.sort();
        assert_eq!(seen, ["again", "scripted", "wrote"]);
    }
}

/// Packs `root` with GNU cpio in the newc format, as initramfs tools do.
fn cpio_newc(root: &Path, out: &Path) {
    let list = std::process::Command::new("find").arg(".").current_dir(root).output().unwrap();
    let mut cpio = std::process::Command::new("cpio")
        .args(["-o", "-H", "newc", "--quiet"])
        .current_dir(root)
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(out).unwrap())
        .spawn()
        .expect("GNU cpio (scripts/test.sh installs it)");
    std::io::Write::write_all(cpio.stdin.as_mut().unwrap(), &list.stdout).unwrap();
    drop(cpio.stdin.take());
    assert!(cpio.wait().unwrap().success());
}

#[test]
fn an_initrd_archive_fills_the_guests_writable_file_system() {
    require_kvm();
    let src = r#"#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
int main(int argc, char **argv) {
    char buf[256] = {0};
    int fd = open(argv[1], O_RDWR | O_APPEND);
    long n = read(fd, buf, sizeof buf - 1);
    printf("read=%ld text=%s", n, buf);
    write(fd, "appended\n", 9);
    memset(buf, 0, sizeof buf);
    n = pread(fd, buf, sizeof buf - 1, 0);
    printf("pread=%ld text=%s", n, buf);
    struct stat st;
    int r = stat("/etc", &st);
    printf("etc=%d dir=%d\n", r, S_ISDIR(st.st_mode));
    int c = open("/etc/new", O_WRONLY | O_CREAT, 0644);
    printf("created=%d missing=%d\n", c >= 0, open("/etc/link", O_RDONLY));
    return 0;
}
"#;
    let program = glibc_static("reader", src);
    let dir = tempdir();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::write(root.join("etc/motd"), "hello from the archive\n").unwrap();
    std::fs::copy(&program, root.join("bin/reader")).unwrap();
    std::os::unix::fs::symlink("motd", root.join("etc/link")).unwrap();
    let archive = dir.path().join("root.cpio");
    cpio_newc(&root, &archive);
    let expected = "read=23 text=hello from the archive\npread=32 text=hello from the archive\nappended\netc=0 dir=1\ncreated=1 missing=-1\n";
    // The program from the host, its files from the archive...
    let r = exec(&program, &["--initrd", archive.to_str().unwrap()], &["/etc/motd"]);
    assert!(r.code == 0 && r.stdout == expected, "{r:?}");
    assert!(r.stderr.contains("--initrd") && r.stderr.contains("1 entries are not regular files") && r.stderr.contains("etc/link"), "{r:?}");
    // ... or the program from the archive too, as a script's process.
    let script = common::write_script(dir.path(), "w.wl", "proc reader exec /bin/reader /etc/motd\n");
    let r = vmm(&["run", "--workload", script.to_str().unwrap(), "--initrd", archive.to_str().unwrap(), "--timeout", "120"]);
    assert!(r.code == 0 && r.stdout.contains(expected), "{r:?}");
    // A damaged archive is refused before boot, saying where.
    let bytes = std::fs::read(&archive).unwrap();
    let cut = dir.path().join("cut.cpio");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let r = exec(&program, &["--initrd", cut.to_str().unwrap()], &["/etc/motd"]);
    assert!(r.code == 64 && r.stderr.contains("--initrd") && r.stderr.contains("at byte"), "{r:?}");
    let r = exec(&program, &["--initrd", "/no/such.cpio"], &[]);
    assert!(r.code == 64 && r.stderr.contains("--initrd /no/such.cpio"), "{r:?}");
}

#[test]
fn a_linux_program_goes_on_after_a_snapshot_restore_and_a_migration() {
    // Its system calls (the `syscall` MSRs), its TLS base, its SSE registers and its
    // files all travel with the VM: the run ends as an unbroken one does.
    let src = r#"#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static void sd_sync(const char *label) { syscall(0x5d00, label, strlen(label)); }
static __thread int tls = 7;
int main(void) {
    int fd = open("/tmp/state", O_RDWR | O_CREAT, 0644);
    ftruncate(fd, 4096);
    char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    for (int i = 0; i < 100; i++) m[i] = 'a' + i % 26;
    volatile double x = 1.5;
    sd_sync("mid");
    for (int i = 0; i < 10; i++) x = x * 1.25;
    char buf[8] = {0};
    pread(fd, buf, 4, 0);
    printf("x=%.4f file=%s map=%c tls=%d\n", x, buf, m[27], tls);
    return 0;
}
"#;
    let program = glibc_static("moving", src);
    let expected = "x=13.9698 file=abcd map=b tls=7\n";
    let unbroken = exec(&program, &[], &[]);
    assert!(unbroken.code == 0 && unbroken.stdout == expected, "{unbroken:?}");
    let dir = tempdir();
    let snap = dir.path().join("snap");
    let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--timeout", "120"]);
    live.wait("mid");
    let s = vmm(&["snapshot", "create", "--api-sock", live.sock(), "--out", snap.to_str().unwrap()]);
    assert_eq!(s.code, 0, "{s:?}");
    live.resume();
    let first = live.finish();
    assert!(first.code == 0 && first.stdout.ends_with(expected), "{first:?}");
    let restored = vmm(&["run", "--restore", snap.to_str().unwrap(), "--timeout", "120"]);
    assert!(restored.code == 0 && restored.stdout.ends_with(expected), "restored: {restored:?}");
    let live = Live::with_args(&["--exec", program.to_str().unwrap(), "--timeout", "120"]);
    live.wait("mid");
    let dest = common::Dest::start(&[]);
    let m = live.client("migrate", &["--to", &dest.addr()]);
    assert_eq!(m.code, 0, "{m:?}");
    assert_eq!(live.finish().code, 80);
    // The destination is paused at the same sync, as the source was.
    let w = dest.client("wait", &["--label", "mid", "--timeout", "30"]);
    assert_eq!(w.code, 0, "{w:?}");
    assert_eq!(dest.client("resume", &[]).code, 0);
    let d = dest.finish();
    assert!(d.code == 0 && d.stdout.ends_with(expected), "migrated: {d:?}");
}

#[test]
fn scripts_that_exec_what_the_guest_does_not_have_are_refused() {
    require_kvm();
    let dir = tempdir();
    let script = common::write_script(dir.path(), "w.wl", "proc a exec /bin/missing\n");
    let r = vmm(&["run", "--workload", script.to_str().unwrap()]);
    assert!(r.code == 64 && r.stderr.contains("`exec /bin/missing` names no file of the guest"), "{r:?}");
    let two = common::write_script(dir.path(), "two.wl", "proc a exec /bin/x\nproc b exec /bin/y\n");
    let r = vmm(&["run", "--workload", two.to_str().unwrap()]);
    assert!(r.code == 64 && r.stderr.contains("at most one runs per VM"), "{r:?}");
    let hello = glibc_static("hello", HELLO);
    let lonely = vmm(&["run", "--file", hello.to_str().unwrap()]);
    assert!(lonely.code == 64 && lonely.stderr.contains("no Linux program to read it"), "{lonely:?}");
}

#[test]
fn the_programs_clocks_follow_the_hosts_time() {
    let src = r#"#include <stdio.h>
#include <time.h>
#include <sys/time.h>
int main(void) {
    struct timespec real, m1, m2, res;
    struct timeval tv;
    clock_gettime(CLOCK_REALTIME, &real);
    gettimeofday(&tv, 0);
    clock_getres(CLOCK_MONOTONIC, &res);
    clock_gettime(CLOCK_MONOTONIC, &m1);
    for (volatile int i = 0; i < 1000000; i++);
    clock_gettime(CLOCK_MONOTONIC, &m2);
    long spent = (m2.tv_sec - m1.tv_sec) * 1000000000L + (m2.tv_nsec - m1.tv_nsec);
    printf("%ld %ld %ld %ld %ld\n", (long)real.tv_sec, (long)tv.tv_sec, (long)time(0), res.tv_nsec, spent);
    return 0;
}
"#;
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let r = exec(&glibc_static("clocks", src), &[], &[]);
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    assert_eq!(r.code, 0, "{r:?}");
    let v: Vec<i64> = r.stdout.split_whitespace().map(|w| w.parse().unwrap()).collect();
    for &secs in &v[..3] {
        assert!(before - 1 <= secs && secs <= after + 1, "realtime, gettimeofday and time read the host's clock: {r:?}");
    }
    assert_eq!(v[3], 1, "a nanosecond clock");
    assert!(v[4] > 0 && v[4] < 60_000_000_000, "the monotonic clock moves while the program runs: {r:?}");
    assert!(!r.stderr.contains("228 x"), "clock_gettime is implemented: {r:?}");
}
