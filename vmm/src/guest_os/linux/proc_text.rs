//! The text of `/proc/PID/smaps`, `/proc/PID/maps` and `/proc/PID/status` for a Linux
//! program, in Linux's format to the byte (what parsers such as the kernel's own
//! self-tests match on).

use super::map_names::Identity;
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
    /// Resident in frames mapped more than once (Linux's `Shared_*`; the rest is
    /// `Private_*`), and the proportional set size (each page divided by how many
    /// times it is mapped), in KiB.
    pub shared_kb: u64,
    pub pss_kb: u64,
    /// Linux's VM_SOFTDIRTY (`sd`).
    pub soft_dirty: bool,
    /// Offset, device, inode and name.
    pub identity: Identity,
}

fn header(out: &mut String, v: &Vma) {
    let r = 'r';
    let w = if v.read_only { '-' } else { 'w' };
    let x = if v.exec { 'x' } else { '-' };
    let p = if v.shared { 's' } else { 'p' };
    let id = &v.identity;
    let start = out.len();
    let _ = write!(out, "{:08x}-{:08x} {r}{w}{x}{p} {:08x} {:02x}:{:02x} {} ", v.start, v.end, id.offset, id.dev.0, id.dev.1, id.ino);
    // A name starts at column 73 (Linux pads to it); with none, the line ends with
    // the space before the name column.
    if let Some(name) = &id.name {
        while out.len() - start < NAME_COLUMN {
            out.push(' ');
        }
        out.push_str(name);
    }
    out.push('\n');
}

/// Where maps's name column starts: Linux's `25 + sizeof(void *) * 6 - 1`.
const NAME_COLUMN: usize = 73;

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
        // Every resident page is dirty: an anonymous one was written (a read maps the
        // zero page, which is not resident), a file's is in memory only, as tmpfs's.
        let shared_dirty = v.shared_kb.min(v.rss_kb);
        let private_dirty = v.rss_kb - shared_dirty;
        let page_kb = 4;
        for (name, kb) in [
            ("Size:", size),
            ("KernelPageSize:", page_kb),
            ("MMUPageSize:", page_kb),
            ("Rss:", v.rss_kb),
            ("Pss:", v.pss_kb),
            ("Pss_Dirty:", v.pss_kb),
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
        let v = Vma { start: 0x7f0b_51b6_f000, end: 0x7f0b_51ca_2000, rss_kb: 740, pss_kb: 740, referenced_kb: 740, soft_dirty: true, ..Vma::default() };
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

    #[test]
    fn named_mappings_put_their_name_at_linux_s_column() {
        let file = Identity { offset: 0x2000, dev: (0xfe, 0), ino: 247_282, name: Some("/usr/bin/head".into()) };
        let v = Vma { start: 0x55a9_2915_1000, end: 0x55a9_2915_7000, read_only: true, exec: true, identity: file, ..Vma::default() };
        // A line of a Linux 6.x host's /proc/self/maps.
        assert_eq!(maps(&[v]), "55a929151000-55a929157000 r-xp 00002000 fe:00 247282                     /usr/bin/head\n");
        let heap = Vma { start: 0x561e_1916_c000, end: 0x561e_191a_e000, identity: Identity { name: Some("[heap]".into()), ..Identity::default() }, ..Vma::default() };
        assert_eq!(maps(&[heap]), "561e1916c000-561e191ae000 rw-p 00000000 00:00 0                          [heap]\n");
    }

    #[test]
    fn smaps_splits_resident_pages_into_shared_and_private_by_how_often_they_are_mapped() {
        let v = Vma { start: 0x1000, end: 0x5000, shared: true, rss_kb: 12, shared_kb: 8, pss_kb: 8, ..Vma::default() };
        let text = smaps(&[v]);
        let line = |name: &str| text.lines().find(|l| l.starts_with(name)).unwrap().to_string();
        assert_eq!(line("Pss:"), "Pss:                   8 kB");
        assert_eq!(line("Shared_Dirty:"), "Shared_Dirty:          8 kB");
        assert_eq!(line("Private_Dirty:"), "Private_Dirty:         4 kB");
        assert_eq!(line("Anonymous:"), "Anonymous:             0 kB");
    }
}
