extern crate std;
use super::*;
use std::string::ToString;
use std::vec::Vec;

fn err_of(script: &str) -> (u32, ErrorKind) {
    let e = validate(script.as_bytes()).unwrap_err();
    (e.line, e.error.kind)
}

fn actions(script: &str, proc_index: usize) -> Vec<(u32, Statement<'_>)> {
    let mut c = BlockCursor::for_proc(script.as_bytes(), proc_index).unwrap();
    let mut out = Vec::new();
    while let Some(a) = c.next_action() {
        out.push(a.unwrap());
    }
    out
}

#[test]
fn parses_every_statement() {
    let s = "proc a # comment\n\
             map 0x400000 512 huge ro\n map 10000 1\n unmap 0x400000 1\n\
             protect 0x400000 2 ro\n fill 0x400000 1 0xff\n check 0x400000 1 255\n\
             touch 0x400000 3\n sync label-1.x\n loop 3\n yield\n end\n exit 7\n";
    assert_eq!(validate(s.as_bytes()), Ok(Summary { procs: 1 }));
    let acts = actions(s, 0);
    assert_eq!(acts[0].1, Statement::Map { range: Range { addr: 0x400000, pages: 512 }, huge: true, read_only: true, shared: false });
    assert_eq!(acts[1].1, Statement::Map { range: Range { addr: 0x10000, pages: 1 }, huge: false, read_only: false, shared: false });
    assert_eq!(acts[3].1, Statement::Protect { range: Range { addr: 0x400000, pages: 2 }, prot: Protection::ReadOnly });
    assert_eq!(acts[4].1, Statement::Fill { range: Range { addr: 0x400000, pages: 1 }, byte: 0xff, timed: false });
    assert_eq!(acts[5].1, Statement::Check { range: Range { addr: 0x400000, pages: 1 }, byte: 255 });
    assert_eq!(acts[7].1, Statement::Sync { label: "label-1.x" });
    let yields = acts.iter().filter(|(_, s)| *s == Statement::Yield).count();
    assert_eq!(yields, 3);
    assert_eq!(acts.last().unwrap(), &(13, Statement::Exit { code: 7 }));
}

#[test]
fn rejects_bad_statements_naming_line_and_token() {
    assert_eq!(err_of("proc a\nfrob 1\n"), (2, ErrorKind::UnknownStatement));
    assert_eq!(err_of("proc a\nmap 0x400001 1\n"), (2, ErrorKind::UnalignedAddress));
    assert_eq!(err_of("proc a\nmap 0x400000 x\n"), (2, ErrorKind::BadCount));
    assert_eq!(err_of("proc a\nmap 0xzz 1\n"), (2, ErrorKind::BadAddress));
    assert_eq!(err_of("proc a\nmap 0xffff800000000000 1\n"), (2, ErrorKind::OutsideUserHalf));
    assert_eq!(err_of("proc a\nmap 0x7ffffffff000 2\n"), (2, ErrorKind::OutsideUserHalf));
    assert_eq!(err_of("proc a\nmap 0x1000 1\n"), (2, ErrorKind::BelowMinAddress));
    assert_eq!(err_of("proc a\nmap 0x400000 0\n"), (2, ErrorKind::ZeroPages));
    assert_eq!(err_of("proc a\nmap 0x400000 18446744073709551615\n"), (2, ErrorKind::OutsideUserHalf));
    assert_eq!(err_of("proc a\nmap 0x401000 512 huge\n"), (2, ErrorKind::HugeUnaligned));
    assert_eq!(err_of("proc a\nmap 0x400000 511 huge\n"), (2, ErrorKind::HugeUnaligned));
    assert_eq!(err_of("proc a\nmap 0x400000 1 rx\n"), (2, ErrorKind::BadOption));
    assert_eq!(err_of("proc a\nfill 0x400000 1 256\n"), (2, ErrorKind::BadByte));
    assert_eq!(err_of("proc a\nfill 0x400000 1\n"), (2, ErrorKind::MissingArgument));
    assert_eq!(err_of("proc a\nyield now\n"), (2, ErrorKind::ExtraArgument));
    assert_eq!(err_of("proc a\nexit 300\n"), (2, ErrorKind::BadExitCode));
    assert_eq!(err_of("proc a\nend\n"), (2, ErrorKind::EndWithoutLoop));
    assert_eq!(err_of("proc a\nloop 2\nyield\n"), (2, ErrorKind::LoopNotClosed));
    assert_eq!(err_of("proc a\nloop 2\nproc b\nend\n"), (3, ErrorKind::LoopNotClosed));
    assert_eq!(err_of("map 0x400000 1\nproc a\n"), (1, ErrorKind::StatementBeforeProc));
    assert_eq!(err_of("# nothing\n\n"), (2, ErrorKind::NoProc));
    assert_eq!(err_of(""), (0, ErrorKind::NoProc));
    assert_eq!(err_of("proc this-name-is-too-long\n"), (1, ErrorKind::BadName));
    assert_eq!(err_of("proc a\nsync bad/label\n"), (2, ErrorKind::BadLabel));
    assert_eq!(err_of("proc a\nsync é\n"), (2, ErrorKind::NotAscii));
    let deep = "proc a\n".to_string() + &"loop 1\n".repeat(9) + &"end\n".repeat(9);
    assert_eq!(err_of(&deep), (10, ErrorKind::LoopTooDeep));
    let many = "proc a\n".repeat(17);
    assert_eq!(err_of(&many), (17, ErrorKind::TooManyProcs));
}

#[test]
fn error_message_names_the_token() {
    let e = validate(b"proc a\nmap 0x400001 1\n").unwrap_err();
    assert_eq!(e.to_string(), "line 2: address is not page-aligned (4096) '0x400001'");
}

#[test]
fn cursor_expands_nested_loops_and_stops_at_next_proc() {
    let s = "proc a\nloop 2\nloop 3\ntouch 0x10000 1\nend\nyield\nend\nexit 1\nproc b\nyield\n";
    let acts = actions(s, 0);
    let kinds: Vec<u32> = acts.iter().map(|(l, _)| *l).collect();
    assert_eq!(kinds, [4, 4, 4, 6, 4, 4, 4, 6, 8]);
    assert_eq!(actions(s, 1), [(10, Statement::Yield)]);
    assert!(BlockCursor::for_proc(s.as_bytes(), 2).is_none());
}

#[test]
fn cursor_skips_zero_count_loops() {
    let s = "proc a\nloop 0\nloop 5\nyield\nend\nend\nexit 3\n";
    assert_eq!(actions(s, 0), [(7, Statement::Exit { code: 3 })]);
}

#[test]
fn proc_names_in_pid_order() {
    let s = "proc first\nyield\n  proc second # x\n";
    let names: Vec<_> = proc_names(s.as_bytes()).collect();
    assert_eq!(names, [(1, "first"), (3, "second")]);
}

#[test]
fn shared_mappings_live_in_the_shared_window() {
    let acts = actions("proc a\nmap 0x600000000000 4 shared ro\n", 0);
    assert_eq!(acts[0].1, Statement::Map { range: Range { addr: SHARED_VA, pages: 4 }, huge: false, read_only: true, shared: true });
    assert_eq!(err_of("proc a\nmap 0x400000 1 shared\n"), (2, ErrorKind::SharedOutsideWindow));
    assert_eq!(err_of("proc a\nmap 0x6000000ff000 2 shared\n"), (2, ErrorKind::SharedOutsideWindow));
    assert_eq!(err_of("proc a\nmap 0x600000000000 512 huge shared\n"), (2, ErrorKind::BadOption));
}

#[test]
fn fill_can_be_timed() {
    let acts = actions("proc a\nfill 0x400000 2 7 timed\n", 0);
    assert_eq!(acts[0].1, Statement::Fill { range: Range { addr: 0x400000, pages: 2 }, byte: 7, timed: true });
    assert_eq!(err_of("proc a\nfill 0x400000 2 7 slowly\n"), (2, ErrorKind::BadOption));
}

#[test]
fn windows_line_endings_are_accepted() {
    assert_eq!(validate(b"proc a\r\nyield\r\n"), Ok(Summary { procs: 1 }));
}

#[test]
fn a_proc_may_exec_a_linux_program_with_arguments_and_no_statements() {
    let script = b"proc sh\nyield\nproc tool exec /bin/busybox sha256sum /data.txt # a comment\nproc b\nexit 0\n";
    assert_eq!(validate(script), Ok(Summary { procs: 3 }));
    let execs: Vec<(usize, Vec<&[u8]>)> = execs(script).map(|(i, e)| (i, e.words().collect())).collect();
    assert_eq!(execs, [(1, std::vec![&b"/bin/busybox"[..], b"sha256sum", b"/data.txt"])]);
    assert_eq!(proc_names(script).map(|(_, n)| n).collect::<Vec<_>>(), ["sh", "tool", "b"]);
    assert_eq!(err_of("proc a exec bin/x\n"), (1, ErrorKind::BadExecPath));
    assert_eq!(err_of("proc a exec\n"), (1, ErrorKind::MissingArgument));
    assert_eq!(err_of("proc a run /bin/x\n"), (1, ErrorKind::ExtraArgument));
    assert_eq!(err_of("proc a exec /bin/x\nyield\n"), (2, ErrorKind::StatementInExecProc));
    let many = "proc a exec /x".to_string() + &" y".repeat(MAX_EXEC_ARGS + 1) + "\n";
    assert_eq!(err_of(&many), (1, ErrorKind::TooManyExecArgs));
}
