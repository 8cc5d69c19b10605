//! The text of `/proc/PID/smaps` and `/proc/PID/maps` for a Linux program, in Linux's
//! format to the byte (what parsers such as the kernel's own self-tests match on).

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

#[cfg(test)]
mod tests {
    use super::*;

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
