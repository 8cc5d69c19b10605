//! The text of `/proc/PID/smaps`, `/proc/PID/maps` and `/proc/PID/status` for a Linux
//! program, in Linux's format to the byte (what parsers such as the kernel's own
//! self-tests match on).

use std::fmt::Write;

/// One mapping as smaps shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    pub read_only: bool,
    pub exec: bool,
    pub shared: bool,
    /// Backed by 2 MiB pages (`hg`: our huge mappings are what MADV_HUGEPAGE gives).
    pub huge: bool,
    /// Resident, referenced (accessed), and resident in 2 MiB pages, in KiB.
    pub rss_kb: u64,
    pub referenced_kb: u64,
    pub anon_huge_kb: u64,
    /// Linux's VM_SOFTDIRTY (`sd`).
    pub soft_dirty: bool,
}

fn header(out: &mut String, v: &Vma) {
    let r = 'r';
    let w = if v.read_only { '-' } else { 'w' };
    let x = if v.exec { 'x' } else { '-' };
    let p = if v.shared { 's' } else { 'p' };
    // Anonymous: no offset, device or inode, and no name (Linux ends the line with
    // the space before the name column).
    let _ = writeln!(out, "{:08x}-{:08x} {r}{w}{x}{p} 00000000 00:00 0 ", v.start, v.end);
}

/// `/proc/PID/maps`.
pub fn maps(vmas: &[Vma]) -> String {
    let mut out = String::new();
    for v in vmas {
        header(&mut out, v);
    }
    out
}

/// `/proc/PID/smaps`.
pub fn smaps(vmas: &[Vma]) -> String {
    let mut out = String::new();
    for v in vmas {
        header(&mut out, v);
        let size = (v.end - v.start) / 1024;
        let private_dirty = if v.shared { 0 } else { v.rss_kb };
        let shared_dirty = if v.shared { v.rss_kb } else { 0 };
        let page_kb = 4;
        for (name, kb) in [
            ("Size:", size),
            ("KernelPageSize:", page_kb),
            ("MMUPageSize:", page_kb),
            ("Rss:", v.rss_kb),
            ("Pss:", v.rss_kb),
            ("Pss_Dirty:", v.rss_kb),
            ("Shared_Clean:", 0),
            ("Shared_Dirty:", shared_dirty),
            ("Private_Clean:", 0),
            ("Private_Dirty:", private_dirty),
            ("Referenced:", v.referenced_kb),
            ("Anonymous:", if v.shared { 0 } else { v.rss_kb }),
            ("KSM:", 0),
            ("LazyFree:", 0),
            ("AnonHugePages:", v.anon_huge_kb),
            ("ShmemPmdMapped:", 0),
            ("FilePmdMapped:", 0),
            ("Shared_Hugetlb:", 0),
            ("Private_Hugetlb:", 0),
            ("Swap:", 0),
            ("SwapPss:", 0),
            ("Locked:", 0),
        ] {
            let _ = writeln!(out, "{name:<16}{kb:>8} kB");
        }
        let _ = writeln!(out, "{:<16}{:>8}", "THPeligible:", u8::from(v.huge));
        out.push_str("VmFlags: rd ");
        if !v.read_only {
            out.push_str("wr ");
        }
        if v.exec {
            out.push_str("ex ");
        }
        if v.shared {
            out.push_str("sh mr mw me ms ");
        } else {
            out.push_str("mr mw me ");
        }
        if !v.read_only && !v.shared {
            out.push_str("ac ");
        }
        if v.soft_dirty {
            out.push_str("sd ");
        }
        if v.huge {
            out.push_str("hg ");
        }
        out.push('\n');
    }
    out
}

/// What `/proc/PID/status` says of a process (sizes in KiB).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Status {
    pub name: String,
    pub pid: u32,
    /// Linux's state letter and word: `R (running)`, `Z (zombie)`.
    pub running: bool,
    pub vm_size_kb: u64,
    pub hwm_kb: u64,
    pub rss_kb: u64,
    pub rss_shmem_kb: u64,
    pub data_kb: u64,
    pub stack_kb: u64,
    pub exe_kb: u64,
}

/// `/proc/PID/status`, as Linux 6.12 prints it for a single-threaded root process
/// (its ids, signal masks, capabilities and CPU lists are those of one vCPU, uid 0).
pub fn status(s: &Status) -> String {
    let mut out = String::new();
    let state = if s.running { "R (running)" } else { "Z (zombie)" };
    let _ = write!(
        out,
        "Name:\t{}\nUmask:\t0022\nState:\t{state}\nTgid:\t{pid}\nNgid:\t0\nPid:\t{pid}\nPPid:\t0\nTracerPid:\t0\n\
         Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nFDSize:\t64\nGroups:\t \nNStgid:\t{pid}\nNSpid:\t{pid}\nNSpgid:\t{pid}\n\
         NSsid:\t{pid}\nKthread:\t0\n",
        s.name,
        pid = s.pid
    );
    for (name, kb) in [
        ("VmPeak", s.vm_size_kb),
        ("VmSize", s.vm_size_kb),
        ("VmLck", 0),
        ("VmPin", 0),
        ("VmHWM", s.hwm_kb.max(s.rss_kb)),
        ("VmRSS", s.rss_kb),
        ("RssAnon", s.rss_kb - s.rss_shmem_kb),
        ("RssFile", 0),
        ("RssShmem", s.rss_shmem_kb),
        ("VmData", s.data_kb),
        ("VmStk", s.stack_kb),
        ("VmExe", s.exe_kb),
        ("VmLib", 0),
        ("VmPTE", 0),
        ("VmSwap", 0),
        ("HugetlbPages", 0),
    ] {
        let _ = writeln!(out, "{name}:\t{kb:>8} kB");
    }
    out.push_str(
        "CoreDumping:\t0\nTHP_enabled:\t1\nuntag_mask:\t0xffffffffffffffff\nThreads:\t1\nSigQ:\t0/63448\n\
         SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\nSigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n\
         SigCgt:\t0000000000000000\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
         CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\nSeccomp:\t0\nSeccomp_filters:\t0\n\
         Speculation_Store_Bypass:\tthread vulnerable\nSpeculationIndirectBranch:\tconditional enabled\n\
         Cpus_allowed:\t1\nCpus_allowed_list:\t0\nMems_allowed:\t00000001\nMems_allowed_list:\t0\n\
         voluntary_ctxt_switches:\t0\nnonvoluntary_ctxt_switches:\t0\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_linux_s_to_the_byte() {
        let s = Status { name: "cat".into(), pid: 6086, running: true, vm_size_kb: 3060, hwm_kb: 1600, rss_kb: 1600, data_kb: 360, stack_kb: 132, exe_kb: 20, ..Status::default() };
        let text = status(&s);
        let lines: Vec<&str> = text.lines().collect();
        // Lines taken from a Linux 6.x host's /proc/self/status of `cat`.
        assert_eq!(lines[0], "Name:\tcat");
        assert_eq!(lines[2], "State:\tR (running)");
        assert_eq!(lines[5], "Pid:\t6086");
        assert_eq!(lines[8], "Uid:\t0\t0\t0\t0");
        assert_eq!(lines[11], "Groups:\t ");
        assert_eq!(lines[17], "VmPeak:\t    3060 kB");
        assert_eq!(lines[21], "VmHWM:\t    1600 kB");
        assert_eq!(lines[24], "RssFile:\t       0 kB");
        assert_eq!(lines[28], "VmExe:\t      20 kB");
        assert_eq!(lines[32], "HugetlbPages:\t       0 kB");
        assert_eq!(lines[36], "Threads:\t1");
        assert_eq!(lines.last(), Some(&"nonvoluntary_ctxt_switches:\t0"));
        assert_eq!(lines.len(), 59);
    }

    #[test]
    fn smaps_lines_are_linux_s_to_the_byte() {
        let v = Vma { start: 0x7f0b_51b6_f000, end: 0x7f0b_51ca_2000, rss_kb: 740, referenced_kb: 740, soft_dirty: true, ..Vma::default() };
        let text = smaps(std::slice::from_ref(&v));
        let lines: Vec<&str> = text.lines().collect();
        // Taken from a Linux 6.x host's smaps (that host lacks soft-dirty: `sd` added).
        assert_eq!(lines[0], "7f0b51b6f000-7f0b51ca2000 rw-p 00000000 00:00 0 ");
        assert_eq!(lines[1], "Size:               1228 kB");
        assert_eq!(lines[2], "KernelPageSize:        4 kB");
        assert_eq!(lines[4], "Rss:                 740 kB");
        assert_eq!(lines[15], "AnonHugePages:         0 kB");
        assert_eq!(lines[23], "THPeligible:           0");
        assert_eq!(lines[24], "VmFlags: rd wr mr mw me ac sd ");
        assert_eq!(lines.len(), 25);
        assert_eq!(maps(&[v]), "7f0b51b6f000-7f0b51ca2000 rw-p 00000000 00:00 0 \n");
        let text = Vma { start: 0x40_1000, end: 0x47_9000, read_only: true, exec: true, ..Vma::default() };
        assert!(smaps(&[text]).starts_with("00401000-00479000 r-xp 00000000 00:00 0 \n"), "at least 8 hex digits, as %08lx");
    }
}
