//! Linux's own per-page write tracking for a host mapping: userfaultfd asynchronous
//! write-protect, read and re-armed with the `PAGEMAP_SCAN` ioctl on
//! `/proc/self/pagemap`. The host kernel here has no soft-dirty (`CONFIG_MEM_SOFT_DIRTY`
//! is off), so this is the host baseline our benchmarks compare against, and the
//! mechanism of the `uffd` guest-physical engine.
//!
//! The system's headers predate these interfaces, so the structs and constants are
//! defined here (from include/uapi/linux/fs.h and userfaultfd.h).

use super::{Cause, DirtySource, Harvested};
use crate::tracking::frame_set::FrameSet;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use vmm_sys_util::ioctl_iowr_nr;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range` (also used by post-copy's ioctls).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

const UFFD_API: u64 = 0xaa;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

ioctl_iowr_nr!(UFFDIO_API, 0xaa, 0x3f, UffdioApi);
ioctl_iowr_nr!(UFFDIO_REGISTER, 0xaa, 0x00, UffdioRegister);
ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, 0xaa, 0x06, UffdioWriteprotect);
ioctl_iowr_nr!(PAGEMAP_SCAN, b'f' as u32, 16, PmScanArg);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("userfaultfd {op} failed: {source}")]
    Uffd { op: &'static str, source: std::io::Error },
    #[error("the kernel lacks userfaultfd async write-protect (features {0:#x} missing)")]
    Unsupported(u64),
    #[error("PAGEMAP_SCAN on /proc/self/pagemap failed: {0}")]
    Scan(std::io::Error),
    #[error("PAGEMAP_SCAN reported written pages from frame {pfn:#x} on, outside guest RAM")]
    Outside { pfn: u64 },
}

fn last(op: &'static str) -> Error {
    Error::Uffd { op, source: std::io::Error::last_os_error() }
}

/// `UFFDIO_REGISTER_MODE_MISSING`: faults on pages not populated yet are reported.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

/// A new userfaultfd (non-blocking, close-on-exec), its API handshake done with
/// `features` (all of which the kernel must offer), and `[start, start+len)` (a mapping
/// of the caller's, page-aligned) registered in `mode`.
pub fn open_registered(start: u64, len: u64, features: u64, mode: u64) -> Result<OwnedFd, Error> {
    // SAFETY: plain system call with no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(last("open"));
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes a UffdioApi we own.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) } < 0 {
        return Err(Error::Unsupported(features));
    }
    if api.features & features != features {
        return Err(Error::Unsupported(features & !api.features));
    }
    let mut reg = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes a UffdioRegister we own; the range is
    // the caller's mapping.
    if unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&uffd, UFFDIO_REGISTER(), &mut reg) } < 0 {
        return Err(last("register"));
    }
    Ok(uffd)
}

/// Asynchronous write-protect tracking over one host range.
pub struct AsyncWp {
    uffd: OwnedFd,
    pagemap: File,
    start: u64,
    len: u64,
    regions: Vec<PageRegion>,
    /// ioctls issued so far.
    pub ioctls: u64,
}

impl AsyncWp {
    /// Registers `[start, start+len)` (page-aligned, mapped) for async write-protect.
    /// Pages start write-protected only once [`Self::protect`] or a scan with
    /// re-protection has run.
    pub fn register(start: u64, len: u64) -> Result<AsyncWp, Error> {
        let uffd = open_registered(start, len, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, UFFDIO_REGISTER_MODE_WP)?;
        let pagemap = File::open("/proc/self/pagemap").map_err(Error::Scan)?;
        Ok(AsyncWp { uffd, pagemap, start, len, regions: vec![PageRegion::default(); 1024], ioctls: 2 })
    }

    /// Write-protects the whole range (the next write to each page is recorded).
    pub fn protect(&mut self) -> Result<(), Error> {
        let wp = UffdioWriteprotect { range: UffdioRange { start: self.start, len: self.len }, mode: UFFDIO_WRITEPROTECT_MODE_WP };
        self.ioctls += 1;
        // SAFETY: UFFDIO_WRITEPROTECT only reads the struct.
        if unsafe { vmm_sys_util::ioctl::ioctl_with_ref(&self.uffd, UFFDIO_WRITEPROTECT(), &wp) } < 0 {
            return Err(last("writeprotect"));
        }
        Ok(())
    }

    /// Calls `f(first_addr, pages)` for every run of pages written since they were last
    /// protected; with `reprotect`, write-protects them again in the same walk (atomic
    /// with the read: no write can slip between them). Returns the pages written.
    pub fn scan(&mut self, reprotect: bool, mut f: impl FnMut(u64, u64)) -> Result<u64, Error> {
        let mut from = self.start;
        let end = self.start + self.len;
        let mut pages = 0;
        while from < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: if reprotect { PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC } else { 0 },
                start: from,
                end,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..Default::default()
            };
            self.ioctls += 1;
            // SAFETY: `arg` points at `regions`, which has `vec_len` entries and lives
            // across the call; the kernel writes at most that many.
            let n = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.pagemap, PAGEMAP_SCAN(), &mut arg) };
            if n < 0 {
                return Err(Error::Scan(std::io::Error::last_os_error()));
            }
            for r in &self.regions[..n as usize] {
                let count = (r.end - r.start) / 4096;
                pages += count;
                f(r.start, count);
            }
            if arg.walk_end <= from {
                break;
            }
            from = arg.walk_end;
        }
        Ok(pages)
    }

    pub fn fd(&self) -> i32 {
        self.uffd.as_raw_fd()
    }
}

/// Guest RAM (mapped at `host_base` in the VMM) tracked by async write-protect: each
/// harvest reads and re-protects in one walk, so no write slips between the two.
pub struct UffdSource {
    wp: AsyncWp,
    host_base: u64,
    pages: u64,
}

impl UffdSource {
    /// Registers and write-protects the `ram_pages` frames of guest RAM mapped at
    /// `host_base`.
    pub fn new(host_base: u64, ram_pages: u64) -> Result<UffdSource, Error> {
        let mut wp = AsyncWp::register(host_base, ram_pages * 4096)?;
        wp.protect()?;
        Ok(UffdSource { wp, host_base, pages: ram_pages })
    }
}

impl DirtySource for UffdSource {
    fn name(&self) -> &'static str {
        "uffd"
    }

    fn harvest(&mut self, _cause: Cause, into: &mut FrameSet) -> Result<Harvested, super::Error> {
        let before = self.wp.ioctls;
        let (base, pages) = (self.host_base, self.pages);
        let mut outside = None;
        self.wp.scan(true, |addr, count| {
            let pfn = (addr - base) / 4096;
            if pfn + count > pages {
                outside.get_or_insert(pfn);
            }
            into.insert_range(pfn, count);
        })?;
        if let Some(pfn) = outside {
            return Err(Error::Outside { pfn }.into());
        }
        Ok(Harvested { ioctls: self.wp.ioctls - before, overflowed: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_writes_to_a_host_mapping() {
        let pages = 64u64;
        let len = (pages * 4096) as usize;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end of the test.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
        };
        assert_ne!(base, libc::MAP_FAILED);
        let mut wp = AsyncWp::register(base as u64, len as u64).expect("userfaultfd async WP");
        wp.protect().unwrap();
        // SAFETY: writes inside the mapping.
        unsafe {
            *(base as *mut u8).add(3 * 4096) = 1;
            *(base as *mut u8).add(4 * 4096 + 17) = 1;
            *(base as *mut u8).add(40 * 4096) = 1;
        }
        let mut runs = Vec::new();
        let n = wp.scan(true, |a, c| runs.push(((a - base as u64) / 4096, c))).unwrap();
        assert_eq!(n, 3);
        assert_eq!(runs, vec![(3, 2), (40, 1)]);
        assert_eq!(wp.scan(false, |_, _| {}).unwrap(), 0, "re-protected by the scan");
        // SAFETY: as above.
        unsafe { *(base as *mut u8).add(63 * 4096) = 1 };
        assert_eq!(wp.scan(false, |_, _| {}).unwrap(), 1);
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(base, len) };
    }
}
