//! The workload script language, shared by the guest kernel and the host.
//!
//! One statement per line, `#` starts a comment, addresses are hex (`0x` optional),
//! counts are decimal, bytes are decimal or `0x`-prefixed hex:
//!
//! ```text
//! proc NAME                  start a new process (pid = its position, from 1)
//! proc NAME exec PATH [ARGS...]  a process that runs the static Linux program PATH
//!                            of the guest's file system (`vmm run --file`) instead of
//!                            statements (its block has none)
//! map ADDR PAGES [huge] [ro] [shared]  anonymous zero-filled mapping (shared: inside the
//!                            shared window, the same address maps the same frames in
//!                            every process)
//! unmap ADDR PAGES
//! protect ADDR PAGES ro|rw
//! fill ADDR PAGES BYTE [timed]  write BYTE into every byte of each page (timed: report
//!                            the duration in TSC cycles on the console)
//! check ADDR PAGES BYTE      verify every byte equals BYTE
//! touch ADDR PAGES           read one byte of each page
//! sync LABEL                 pause the whole VM here and report LABEL
//! loop N / end               repeat the enclosed statements N times (nestable)
//! yield
//! exit CODE
//! ```
//!
//! The crate is `no_std`, allocation-free and avoids `core::fmt` on every path the guest
//! uses (the guest is built without SSE and the precompiled formatting code uses it):
//! errors carry a `&'static str` description plus the offending token, and implement
//! `Display` only for the host.
//!
//! ```
//! let script = b"proc writer\nmap 0x400000 4\nfill 0x400000 4 0xaa\n";
//! let summary = workload::validate(script).unwrap();
//! assert_eq!(summary.procs, 1);
//! let mut cursor = workload::BlockCursor::for_proc(script, 0).unwrap();
//! let (line, stmt) = cursor.next_action().unwrap().unwrap();
//! assert_eq!(line, 2);
//! assert!(matches!(stmt, workload::Statement::Map { huge: false, .. }));
//! ```
#![no_std]

#[cfg(feature = "std")]
extern crate std;

mod cursor;
#[cfg(feature = "std")]
pub mod scenario;
mod lex;
mod statement;

pub use cursor::{execs, proc_names, BlockCursor};
pub use lex::{Line, Lines};
pub use statement::{parse_statement, ErrorKind, Exec, ParseError, Protection, Range, Statement, MAX_EXEC_ARGS};

/// The shared window: `map ... shared` must lie inside it; page `i` of the window is
/// the same frame in every process that maps it.
pub const SHARED_VA: u64 = 0x6000_0000_0000;
pub const SHARED_PAGES: u64 = 256;

/// Size of a small page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a huge (2 MiB) page.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// First address above the user half of a 4-level address space.
pub const USER_TOP: u64 = 0x0000_8000_0000_0000;
/// Lowest mappable address, as Linux's default `mmap_min_addr`.
pub const MIN_ADDR: u64 = 0x10000;
/// Longest process name: the guest's process-table name field less its NUL (15, as
/// Linux's `comm`).
pub const MAX_NAME_LEN: usize = guest_abi::PROC_NAME_LEN - 1;
/// Longest `sync` label: what the guest's sync record holds.
pub const MAX_LABEL_LEN: usize = guest_abi::SYNC_LABEL_MAX;
/// Deepest `loop` nesting.
pub const MAX_LOOP_DEPTH: usize = 8;
/// Most processes in one script: the guest kernel's process-table size.
pub const MAX_PROCS: usize = guest_abi::MAX_PROCS;
/// Largest script the guest accepts.
pub const MAX_SCRIPT_LEN: usize = 256 * 1024;

/// An error in a script, with the 1-based line it is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptError<'a> {
    pub line: u32,
    pub error: ParseError<'a>,
}

impl core::fmt::Display for ScriptError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "line {}: {}", self.line, self.error)
    }
}

/// What validation learned about a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Number of `proc` blocks; process ids are 1..=procs.
    pub procs: usize,
}

/// Checks a whole script: every statement parses, the first statement is `proc`, loops
/// are balanced inside each process block and no deeper than [`MAX_LOOP_DEPTH`], and there
/// are between 1 and [`MAX_PROCS`] processes.
pub fn validate(script: &[u8]) -> Result<Summary, ScriptError<'_>> {
    if script.len() > MAX_SCRIPT_LEN {
        return Err(ScriptError { line: 0, error: ParseError::new(ErrorKind::ScriptTooLong, b"") });
    }
    let mut procs = 0usize;
    let mut depth = 0usize;
    let mut open_loop_line = 0u32;
    let mut last_line = 0u32;
    let mut in_exec = false;
    for line in Lines::new(script) {
        last_line = line.number;
        let at = |error| ScriptError { line: line.number, error };
        let Some(stmt) = parse_statement(line.text).map_err(at)? else { continue };
        match stmt {
            Statement::Proc { name, exec } => {
                if depth > 0 {
                    return Err(at(ParseError::new(ErrorKind::LoopNotClosed, name.as_bytes())));
                }
                procs += 1;
                if procs > MAX_PROCS {
                    return Err(at(ParseError::new(ErrorKind::TooManyProcs, name.as_bytes())));
                }
                in_exec = exec.is_some();
            }
            _ if procs == 0 => {
                return Err(at(ParseError::new(ErrorKind::StatementBeforeProc, line.keyword())));
            }
            _ if in_exec => {
                return Err(at(ParseError::new(ErrorKind::StatementInExecProc, line.keyword())));
            }
            Statement::Loop { .. } => {
                depth += 1;
                if depth > MAX_LOOP_DEPTH {
                    return Err(at(ParseError::new(ErrorKind::LoopTooDeep, b"loop")));
                }
                if depth == 1 {
                    open_loop_line = line.number;
                }
            }
            Statement::End => {
                if depth == 0 {
                    return Err(at(ParseError::new(ErrorKind::EndWithoutLoop, b"end")));
                }
                depth -= 1;
            }
            _ => {}
        }
    }
    if depth > 0 {
        return Err(ScriptError {
            line: open_loop_line,
            error: ParseError::new(ErrorKind::LoopNotClosed, b"loop"),
        });
    }
    if procs == 0 {
        return Err(ScriptError { line: last_line, error: ParseError::new(ErrorKind::NoProc, b"") });
    }
    Ok(Summary { procs })
}

#[cfg(test)]
mod tests;
