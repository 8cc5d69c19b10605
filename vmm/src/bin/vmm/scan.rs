//! `vmm pagemap-scan`: Linux's PAGEMAP_SCAN on a guest process, request after request
//! until the range is walked (or `--max-regions` regions are out), printed as it comes.

use crate::{client_code, fail, yes};
use std::io::Write;
use std::path::Path;
use vmm::api::{self, PagemapScanned, Request, ScanRegion};
use vmm::tracking::softdirty::scan::MAX_SCAN_REGIONS;
use vmm::ExitCode;

/// What to scan and how to print it.
pub struct Args {
    pub pid: u32,
    pub start: Option<u64>,
    pub end: Option<u64>,
    pub written: bool,
    pub clear: bool,
    pub max_regions: Option<u64>,
    pub json: bool,
}

fn text_line(r: &ScanRegion) -> String {
    format!("{:#014x}  {:#014x}  {:>8}  {:<7}  {:<7}  {:<11}  {}\n", r.start, r.end, r.pages(), yes(r.written), yes(r.present),
        yes(r.file_shared), yes(r.huge))
}

pub fn run(api_sock: &Path, a: Args) -> ExitCode {
    if a.max_regions == Some(0) {
        return fail(ExitCode::BadInput, "--max-regions 0: must be at least 1");
    }
    let end = a.end.unwrap_or(workload::USER_TOP);
    let mut cur = a.start.unwrap_or(0);
    let mut out = std::io::stdout().lock();
    let (mut regions, mut scanned, mut changed) = (0u64, 0u64, 0u64);
    let mut lines = String::new();
    if a.json {
        lines += &format!("{{\"pid\":{},\"regions\":[", a.pid);
    } else {
        lines += &format!("{:<14}  {:<14}  {:>8}  {:<7}  {:<7}  {:<11}  {}\n", "START", "END", "PAGES", "WRITTEN", "PRESENT",
            "FILE-SHARED", "HUGE");
    }
    loop {
        let want = a.max_regions.map_or(MAX_SCAN_REGIONS, |m| m - regions).min(MAX_SCAN_REGIONS);
        let req = Request::PagemapScan {
            pid: a.pid,
            start: Some(cur),
            end: Some(end),
            written: a.written.then_some(true),
            clear: a.clear.then_some(true),
            max_regions: Some(want),
        };
        let ans: PagemapScanned = match api::call(api_sock, &req) {
            Ok(ans) => ans,
            Err(e) => return fail(client_code(&e), e),
        };
        for r in &ans.regions {
            if a.json {
                if regions > 0 {
                    lines.push(',');
                }
                lines += &serde_json::to_string(r).unwrap_or_default();
            } else {
                lines += &text_line(r);
            }
            regions += 1;
        }
        scanned += ans.pages_scanned;
        changed += ans.entries_changed;
        if let Err(e) = out.write_all(lines.as_bytes()) {
            return stdout_failed(e);
        }
        lines.clear();
        if ans.walk_end <= cur || ans.walk_end > end {
            return fail(ExitCode::Internal, format!("the VMM's walk ended at {:#x}, outside ({cur:#x}, {end:#x}]", ans.walk_end));
        }
        cur = ans.walk_end;
        if cur == end || a.max_regions.is_some_and(|m| regions >= m) {
            break;
        }
    }
    if a.json {
        lines += &format!("],\"walk_end\":{cur},\"pages_scanned\":{scanned},\"entries_changed\":{changed}}}\n");
    } else if cur < end {
        eprintln!("vmm: stopped at --max-regions {regions}: the walk ended at {cur:#x}; go on with --start {cur:#x}");
    }
    match out.write_all(lines.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::Success,
        Err(e) => stdout_failed(e),
    }
}

fn stdout_failed(e: std::io::Error) -> ExitCode {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        return ExitCode::Success;
    }
    fail(ExitCode::Internal, format!("writing the scan failed: {e}"))
}
