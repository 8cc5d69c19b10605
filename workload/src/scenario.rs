//! Scenario files: a workload script plus a host plan keyed by `sync` labels, run by two
//! executors (our VMM; Linux itself under QEMU) whose normalized outputs are compared.
//!
//! ```text
//! proc writer
//! map 0x400000 4
//! fill 0x400000 4 1
//! sync cleared
//! fill 0x401000 1 2
//! sync written
//! @cleared clear 1 4          # at every arrival at `cleared`: clear_refs 4 of pid 1
//! @cleared read 1 0x400000 4  # then read 4 pagemap entries from 0x400000
//! @written read 1 0x400000 4
//! ```
//!
//! Lines starting with `@` are the plan; every other line is the workload (plan lines
//! become blank lines, so workload line numbers are the file's). At each arrival at a
//! label, its plan steps run in file order. A step may only name the process whose
//! block holds that `sync`: what another process has done by then depends on
//! scheduling, which two different kernels do not share.
//!
//! Output, one line per page read, identical in both executors:
//! `LABEL#N pid P ADDR present=0|1 soft-dirty=0|1 exclusive=0|1` (N = arrival count
//! from 1; PFNs differ between executors and are not compared), and at the end
//! `status ok` or `status failed`.

use crate::statement::{parse_statement, Statement};
use crate::{validate, Lines, MAX_PROCS, USER_TOP};
use std::collections::BTreeMap;
use std::format;
use std::string::{String, ToString};
use std::vec::Vec;

/// Largest read in one plan step.
pub const MAX_READ_PAGES: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Clear { pid: u32, value: u64 },
    Read { pid: u32, addr: u64, pages: u64 },
}

impl Action {
    pub fn pid(&self) -> u32 {
        match self {
            Action::Clear { pid, .. } | Action::Read { pid, .. } => *pid,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: u32,
    pub label: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// The workload script, plan lines blanked.
    pub workload: String,
    pub steps: Vec<Step>,
}

impl Scenario {
    /// The plan steps for `label`, in file order.
    pub fn steps_at<'a>(&'a self, label: &'a str) -> impl Iterator<Item = &'a Step> + 'a {
        self.steps.iter().filter(move |s| s.label == label)
    }
}

/// `line N: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub line: u32,
    pub message: String,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for Error {}

fn number(tok: &str, hex: bool) -> Option<u64> {
    if hex {
        u64::from_str_radix(tok.strip_prefix("0x").unwrap_or(tok), 16).ok()
    } else {
        tok.parse().ok()
    }
}

/// Parses and checks a scenario: the workload validates, every plan step names a
/// label that the workload syncs at, a pid that exists and owns that sync, a valid
/// clear_refs value and a page-aligned range in the user half.
pub fn parse(text: &str) -> Result<Scenario, Error> {
    let mut workload = String::with_capacity(text.len());
    let mut plan_lines = Vec::new();
    for (i, line) in text.split('\n').enumerate() {
        if let Some(rest) = line.trim_start().strip_prefix('@') {
            plan_lines.push((i as u32 + 1, rest.to_string()));
            workload.push('\n');
        } else {
            workload.push_str(line);
            workload.push('\n');
        }
    }
    validate(workload.as_bytes()).map_err(|e| Error { line: e.line, message: e.error.to_string() })?;

    // Which pid owns each sync label.
    let mut owner: BTreeMap<String, u32> = BTreeMap::new();
    let mut pid = 0u32;
    for line in Lines::new(workload.as_bytes()) {
        match parse_statement(line.text) {
            Ok(Some(Statement::Proc { .. })) => pid += 1,
            Ok(Some(Statement::Sync { label })) => {
                if let Some(&other) = owner.get(label) {
                    if other != pid {
                        return Err(Error {
                            line: line.number,
                            message: format!("sync label '{label}' is used by pid {other} and pid {pid}: plans need one owner"),
                        });
                    }
                }
                owner.insert(label.to_string(), pid);
            }
            _ => {}
        }
    }

    let mut steps = Vec::new();
    for (line, rest) in plan_lines {
        let err = |message: String| Error { line, message };
        let rest = rest.split('#').next().unwrap_or("");
        let toks: Vec<&str> = rest.split_whitespace().collect();
        let (label, verb) = match toks.as_slice() {
            [label, verb, ..] => (*label, *verb),
            _ => return Err(err("plan line needs '@LABEL clear PID [VALUE]' or '@LABEL read PID ADDR PAGES'".into())),
        };
        let Some(&owner_pid) = owner.get(label) else {
            return Err(err(format!("plan names label '{label}', which no sync in the workload reaches")));
        };
        let pid: u32 = toks
            .get(2)
            .and_then(|t| number(t, false))
            .filter(|&p| p >= 1 && p <= MAX_PROCS as u64)
            .ok_or_else(|| err(format!("bad pid '{}'", toks.get(2).unwrap_or(&""))))? as u32;
        if pid != owner_pid {
            return Err(err(format!(
                "plan at '{label}' names pid {pid}, but '{label}' is a sync of pid {owner_pid}: only the syncing process is in a known state"
            )));
        }
        let action = match (verb, &toks[3..]) {
            ("clear", []) => Action::Clear { pid, value: 4 },
            ("clear", [v]) => {
                let value = number(v, false).ok_or_else(|| err(format!("bad clear_refs value '{v}'")))?;
                Action::Clear { pid, value }
            }
            ("read", [a, n]) => {
                let addr = number(a, true).ok_or_else(|| err(format!("bad address '{a}'")))?;
                let pages = number(n, false).ok_or_else(|| err(format!("bad page count '{n}'")))?;
                let end = pages.checked_mul(4096).and_then(|l| l.checked_add(addr));
                if addr % 4096 != 0 || pages == 0 || pages > MAX_READ_PAGES || end.is_none_or(|e| e > USER_TOP) {
                    return Err(err(format!("read range {a} + {n} pages is not an aligned user range of 1..{MAX_READ_PAGES} pages")));
                }
                Action::Read { pid, addr, pages }
            }
            _ => return Err(err(format!("unknown plan step '{}'", toks[1..].join(" ")))),
        };
        steps.push(Step { line, label: label.to_string(), action });
    }
    Ok(Scenario { workload, steps })
}

/// Output lines for plan labels that were never reached (a plan that did nothing must
/// not pass silently), in plan order.
pub fn unreached(sc: &Scenario, arrivals: &std::collections::HashMap<String, u32>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for step in &sc.steps {
        let line = format!("error: plan label '{}' was never reached", step.label);
        if arrivals.get(&step.label).copied().unwrap_or(0) == 0 && !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

/// One normalized output line for a page read.
pub fn read_line(label: &str, arrival: u32, pid: u32, addr: u64, present: bool, soft_dirty: bool, exclusive: bool) -> String {
    format!(
        "{label}#{arrival} pid {pid} {addr:#x} present={} soft-dirty={} exclusive={}",
        u8::from(present),
        u8::from(soft_dirty),
        u8::from(exclusive)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "proc w\nmap 0x400000 2\nsync a\n@a clear 1\n@a read 1 0x400000 2 # both\nproc r\nsync b\n@b read 2 400000 1\n";

    #[test]
    fn splits_workload_and_plan() {
        let s = parse(OK).unwrap();
        assert_eq!(s.workload.lines().nth(3), Some(""), "plan lines are blanked");
        assert_eq!(s.steps.len(), 3);
        assert_eq!(s.steps[0].action, Action::Clear { pid: 1, value: 4 });
        assert_eq!(s.steps[1].action, Action::Read { pid: 1, addr: 0x400000, pages: 2 });
        assert_eq!(s.steps_at("b").count(), 1);
    }

    #[test]
    fn rejects_plans_that_cannot_be_run_the_same_way_twice() {
        let e = |t: &str| parse(t).unwrap_err().to_string();
        assert!(e("proc a\nsync x\n@y read 1 0x400000 1\n").contains("label 'y', which no sync"));
        assert!(e("proc a\nsync x\nproc b\n@x read 2 0x400000 1\n").contains("is a sync of pid 1"));
        assert!(e("proc a\nsync x\n@x read 99 0x400000 1\n").contains("bad pid"));
        assert!(e("proc a\nsync x\n@x read 1 0x400800 1\n").contains("not an aligned user range"));
        assert!(e("proc a\nsync x\n@x frob 1\n").contains("unknown plan step"));
        assert!(e("proc a\nsync x\nproc b\nsync x\n").contains("used by pid 1 and pid 2"));
        assert!(e("proc a\nbogus\n").starts_with("line 2:"));
    }

    #[test]
    fn output_lines_are_stable() {
        assert_eq!(read_line("a", 2, 1, 0x400000, true, false, true), "a#2 pid 1 0x400000 present=1 soft-dirty=0 exclusive=1");
    }
}
