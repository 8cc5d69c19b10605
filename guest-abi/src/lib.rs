//! The contract between the VMM and the project's guest kernel.
//!
//! Both sides compile this crate, so the layouts below cannot drift apart. Everything
//! here is `#[repr(C)]` plain data; the VMM treats every byte it reads back from the
//! guest as untrusted and validates it (magic, version, bounds) before use.
//!
//! Physical memory map (guest-physical addresses):
//!
//! ```text
//! 0x0000_0500  boot GDT (VMM)
//! 0x0000_7000  BootInfo (VMM -> kernel)
//! 0x0000_9000  boot page tables (VMM): PML4, then PDPTs and PDs
//! 0x0010_0000  kernel image (ELF PT_LOAD segments at their p_paddr)
//! kernel_end   workload script (page-aligned), then free frames up to mem_size
//! ```
//!
//! Virtual layout (kernel half, shared by every process):
//!
//! ```text
//! 0xffff_8880_0000_0000  direct map of all guest RAM (kernel only)
//! 0xffff_ffff_8000_0000  kernel image: phys = virt - KERNEL_VIRT_BASE
//! 0xffff_ffff_c000_0000  workload script, read-only, user-readable
//! 0xffff_ffff_c040_0000  local APIC registers
//! ```
#![no_std]

/// Guest-physical address of the [`BootInfo`] the VMM writes before boot.
pub const BOOT_INFO_PHYS: u64 = 0x7000;
/// Guest-physical address of the boot GDT.
pub const BOOT_GDT_PHYS: u64 = 0x500;
/// Guest-physical address of the boot PML4; further boot tables follow it.
pub const BOOT_PML4_PHYS: u64 = 0x9000;
/// Where the kernel's PT_LOAD segments start (their `p_paddr`).
pub const KERNEL_PHYS_BASE: u64 = 0x10_0000;
/// `virt - KERNEL_VIRT_BASE = phys` for the kernel image.
pub const KERNEL_VIRT_BASE: u64 = 0xffff_ffff_8000_0000;
/// Start of the direct map of guest RAM.
pub const DIRECT_MAP_BASE: u64 = 0xffff_8880_0000_0000;
/// Where the kernel maps the workload script.
pub const SCRIPT_VIRT: u64 = 0xffff_ffff_c000_0000;
/// Where the kernel maps the local APIC.
pub const LAPIC_VIRT: u64 = 0xffff_ffff_c040_0000;
/// Physical address of the local APIC.
pub const LAPIC_PHYS: u64 = 0xfee0_0000;
/// Guest RAM must be a multiple of this (the boot direct map uses 2 MiB pages).
pub const MEM_ALIGN: u64 = 2 << 20;
/// Largest guest RAM: below the 32-bit MMIO hole.
pub const MAX_MEM: u64 = 3 << 30;

/// 8250 UART (COM1): the guest console.
pub const SERIAL_PORT: u16 = 0x3f8;
/// `out` a 32-bit status here to end the run: the workload's exit status, or
/// [`EXIT_KERNEL_PANIC`] and above for a kernel failure.
pub const EXIT_PORT: u16 = 0xf4;
/// `out` the 32-bit physical address of a [`SyncRecord`] here at a `sync`.
pub const SYNC_PORT: u16 = 0xf5;
/// `out` the 32-bit physical address of a [`ZeroRequest`]: the VMM zeroes those frames.
pub const ZERO_PORT: u16 = 0xf6;

/// `rep outsb` the kernel's own log lines here when running a Linux program
/// ([`BootInfo::exec_phys`] set): the VMM writes them to its stderr, so that the
/// console (stdout) carries the program's output only.
pub const LOG_PORT: u16 = 0xf7;

/// `out` the 32-bit physical address of a [`ProcRequest`]: a Linux program read
/// `/proc/PID/pagemap` or wrote `/proc/PID/clear_refs`, and the VMM answers from outside,
/// through the same code as `vmm pagemap` and `vmm clear-refs` (the guest kernel keeps
/// no soft-dirty state).
pub const PROC_PORT: u16 = 0xf8;

/// What a [`ProcRequest`] asks.
pub mod proc_op {
    /// `count` pagemap entries (Linux's 64-bit format) for the pages from virtual page
    /// `arg`, stored at `buf` in the process's own address space.
    pub const PAGEMAP: u32 = 1;
    /// `clear_refs` with value `arg` (1-5).
    pub const CLEAR_REFS: u32 = 2;
    /// Copy `count` bytes of guest RAM from physical `arg` (a file's bytes) to `buf` in
    /// the process's address space: `read` of a file, done by the VMM (ring 0 copying
    /// bytes is emulated here, ~1 µs an instruction).
    pub const COPY: u32 = 3;
    /// `count` bytes from offset `arg` of the process's `/proc/PID/smaps` text, which
    /// the VMM renders from the process table and the pagemap, into `buf`.
    pub const SMAPS: u32 = 4;
    /// The same of `/proc/PID/maps`.
    pub const MAPS: u32 = 5;
    /// The same of `/proc/PID/status`.
    pub const STATUS: u32 = 9;
    /// `read` of a file of the guest's file system: `count` [`Piece`]s at physical
    /// `arg` (each a run of guest RAM: a file page's bytes, or the zero frame for a
    /// hole), copied one after the other into `buf` in the process's address space.
    pub const GATHER: u32 = 6;
    /// `write` to such a file: the bytes at `buf` in the process's address space,
    /// copied into the `count` [`Piece`]s at physical `arg`, one after the other.
    pub const SCATTER: u32 = 7;
    /// Copy `count` bytes of guest RAM from physical `arg` to physical `buf` (a page
    /// of a file into a private mapping's own frame: copy on write).
    pub const PHYS_COPY: u32 = 8;
}

/// One run of guest RAM in a [`proc_op::GATHER`] or [`proc_op::SCATTER`] list.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Piece {
    pub phys: u64,
    pub len: u64,
}

/// Most pieces in one GATHER or SCATTER list (1 MiB of 4 KiB pages, and one more for
/// a start inside a page).
pub const PROC_PIECES_MAX: u64 = 257;

/// Most pagemap entries one request asks for.
pub const PROC_PAGEMAP_MAX: u64 = 8192;

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcRequest {
    pub op: u32,
    /// The calling process: `buf` is in its address space.
    pub pid: u32,
    pub arg: u64,
    pub count: u64,
    pub buf: u64,
    /// The VMM's answer: bytes stored (pagemap), 0 (clear_refs), or -errno.
    pub result: i64,
    /// The process whose /proc entry it is (`/proc/PID/...`); the caller itself if 0.
    pub target: u32,
    pub _pad: u32,
    /// Guest-physical address of what the request carries besides (0: nothing): the
    /// [`names::MapNames`] of a MAPS or SMAPS request.
    pub aux: u64,
}

/// What `/proc/PID/maps` names a mapping by, which the process table does not hold:
/// the file a mapping maps and from which page, and where the program break is. The
/// kernel fills a [`MapNames`] for each MAPS or SMAPS request ([`ProcRequest::aux`]);
/// the VMM checks it like anything read from guest memory.
pub mod names {
    /// File mappings all processes hold at once (so at most this many in one request).
    pub const MAX_FILE_MAPS: usize = 64;
    /// [`FileMap::flags`]: the file has no name any more (unlinked): Linux appends
    /// " (deleted)".
    pub const DELETED: u32 = 1;
    /// The device of the guest file system's files (`st_dev`, and maps's `00:02`).
    pub const FILES_DEV: u32 = 0x02;
    /// The device of shared anonymous memory (maps's `00:01 ... /dev/zero (deleted)`).
    pub const SHMEM_DEV: u32 = 0x01;

    /// One mapping of a file (every process-table record with its `serial`).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct FileMap {
        pub serial: u64,
        /// The address whose page is the file's page `pgoff`.
        pub va: u64,
        pub pgoff: u64,
        pub ino: u64,
        /// Guest-physical address and length of the file's absolute path (length 0: an
        /// unnamed file, shared anonymous memory).
        pub name_phys: u64,
        pub name_len: u32,
        pub flags: u32,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct MapNames {
        /// The program break's range, Linux's `start_brk` and `brk` (`[heap]`; 0, 0: none).
        pub brk_start: u64,
        pub brk: u64,
        /// The initial stack pointer, Linux's `start_stack` (`[stack]`; 0: none).
        pub start_stack: u64,
        pub count: u64,
        pub maps: [FileMap; MAX_FILE_MAPS],
    }

    pub const FILE_MAP_BYTES: usize = 48;
    pub const MAP_NAMES_BYTES: usize = 32 + MAX_FILE_MAPS * FILE_MAP_BYTES;
    const _: () = assert!(core::mem::size_of::<FileMap>() == FILE_MAP_BYTES);
    const _: () = assert!(core::mem::size_of::<MapNames>() == MAP_NAMES_BYTES);
}

/// Exit-port values at or above this are not a workload status but a kernel failure.
pub const EXIT_KERNEL_PANIC: u32 = 0x1_0000;

/// Page-table entry bits the guest kernel leaves to the hypervisor.
///
/// Bits 52..=58 of every entry at every level are ignored by the CPU. The guest kernel
/// never sets them and keeps them whenever it rewrites an entry, so the VMM can keep its
/// own per-page state there (soft-dirty tracking, done from outside).
pub mod pte {
    /// Every bit reserved for the hypervisor (52..=58).
    pub const HV_BITS: u64 = 0x7f << 52;
    /// The page was written since the last soft-dirty clear (Linux's soft-dirty bit).
    pub const HV_SOFT_DIRTY: u64 = 1 << 52;
    /// The hypervisor, not the guest, cleared the entry's writable bit.
    pub const HV_WRITE_PROTECTED: u64 = 1 << 53;

    const _: () = assert!(HV_SOFT_DIRTY & !HV_BITS == 0 && HV_WRITE_PROTECTED & !HV_BITS == 0);
    const _: () = assert!(HV_SOFT_DIRTY != HV_WRITE_PROTECTED);
}

/// System calls of the guest's ring-3 runtime: `ud2` with the number in `rax` and
/// arguments in `rdi`, `rsi`, `rdx`; the result (negative errno on failure) comes back
/// in `rax`.
pub mod syscall {
    /// `exit(code)`: ends the calling process.
    pub const EXIT: u64 = 0;
    /// `write(ptr, len)`: one line on the console.
    pub const WRITE: u64 = 1;
    /// `map(addr, pages, flags)`, flags from [`mapping_flags`](crate::mapping_flags).
    pub const MAP: u64 = 2;
    /// `unmap(addr, pages)`.
    pub const UNMAP: u64 = 3;
    /// `protect(addr, pages, read_only)`.
    pub const PROTECT: u64 = 4;
    /// `sync(label_ptr, label_len)`: pauses the whole VM and reports the label.
    pub const SYNC: u64 = 5;
    /// `yield()`: lets the next process run.
    pub const YIELD: u64 = 6;
    /// For Linux programs, through `syscall`: `sync(label_ptr, label_len)` as above, so
    /// that a test program can pause at a point a client waits for. Not a Linux system
    /// call (Linux answers ENOSYS to every number this high).
    pub const LINUX_SYNC: u64 = 0x5d00;
}

pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"SDBOOT02");

/// Written by the VMM at [`BOOT_INFO_PHYS`]; the kernel gets its address in `rdi`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootInfo {
    pub magic: u64,
    /// Bytes of guest RAM, starting at physical 0.
    pub mem_size: u64,
    /// Physical address of the workload script (page-aligned).
    pub script_phys: u64,
    pub script_len: u64,
    /// First physical address the kernel may hand out as a frame (page-aligned).
    pub free_phys: u64,
    /// Physical address of an [`exec::Image`]: the script's first `proc` runs that Linux
    /// program instead of statements. 0: none.
    pub exec_phys: u64,
    /// The guest TSC's rate in kHz (0: unknown), and the wall-clock time (ns since the
    /// Unix epoch) when the VMM started the vCPU: Linux programs' clocks.
    pub tsc_khz: u64,
    pub boot_unix_ns: u64,
}

/// Offset of [`BootInfo::tsc_khz`]: the VMM fills the clock once its vCPU exists.
pub const BOOT_INFO_CLOCK_OFFSET: u64 = 48;

/// A static Linux program laid out by the VMM (ELF segments, initial stack), for the
/// kernel to map into the first process: the VMM does every byte-heavy step, ring 0
/// only maps frames the VMM filled.
pub mod exec {
    pub const MAGIC: u64 = u64::from_le_bytes(*b"SDEXEC01");
    /// Segments one program may have (its PT_LOADs and the stack).
    pub const MAX_SEGMENTS: usize = 16;

    /// One mapping of the program: `pages` from `va`, with
    /// [`mapping_flags`](crate::mapping_flags); of those, the `fill_pages` from `fill_va`
    /// are present from the start, backed by the frames from `fill_phys` that the VMM
    /// filled (the program's file bytes, the stack's vectors); the rest is
    /// demand-zero.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Segment {
        pub va: u64,
        pub pages: u64,
        pub flags: u64,
        pub fill_va: u64,
        pub fill_pages: u64,
        pub fill_phys: u64,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Image {
        pub magic: u64,
        /// First instruction and initial stack pointer (argc at `[rsp]`).
        pub entry: u64,
        pub rsp: u64,
        /// Start of the program break (page-aligned, after the highest segment).
        pub brk: u64,
        pub nsegments: u64,
        pub segments: [Segment; MAX_SEGMENTS],
        /// Physical address of the [`Files`] put into the guest (`--file`), 0: none.
        pub files: u64,
        /// Which `proc` of the script runs the program (0-based).
        pub proc_index: u64,
        /// [`LOG_APART`]: the program owns the console, the kernel logs to the log port.
        pub flags: u64,
    }

    pub const LOG_APART: u64 = 1;

    /// Bytes of an [`Image`], as the VMM writes it (all fields u64, in order).
    pub const IMAGE_BYTES: usize = 5 * 8 + MAX_SEGMENTS * 6 * 8 + 3 * 8;
    const _: () = assert!(core::mem::size_of::<Image>() == IMAGE_BYTES);

    /// Files one run may put into the guest.
    pub const MAX_FILES: usize = 64;
    /// Longest file name (an absolute guest path), the NUL not counted.
    pub const MAX_FILE_NAME: usize = 63;

    /// A file the VMM put into the guest (`--file`, `--initrd`): its bytes are `size`
    /// bytes of guest RAM from `phys`.
    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct File {
        /// Absolute path, NUL-padded.
        pub name: [u8; MAX_FILE_NAME + 1],
        pub size: u64,
        pub phys: u64,
    }

    #[repr(C)]
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Files {
        pub count: u64,
        pub files: [File; MAX_FILES],
    }

    pub const FILE_BYTES: usize = MAX_FILE_NAME + 1 + 16;
    pub const FILES_BYTES: usize = 8 + MAX_FILES * FILE_BYTES;
    const _: () = assert!(core::mem::size_of::<Files>() == FILES_BYTES);
}

/// Longest `sync` label, in bytes (the script language's limit too).
pub const SYNC_LABEL_MAX: usize = 32;

/// What the kernel reports at a `sync` statement.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncRecord {
    pub pid: u32,
    pub label_len: u32,
    pub label: [u8; SYNC_LABEL_MAX],
}

/// A run of frames to zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroRange {
    pub pfn: u64,
    pub pages: u64,
}

pub const ZERO_REQUEST_MAX: usize = 128;

/// Frames freed by the guest that the VMM must zero before the guest reuses them
/// (ring 0 is emulated here and must never loop over page contents).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ZeroRequest {
    pub count: u64,
    pub ranges: [ZeroRange; ZERO_REQUEST_MAX],
}

/// Symbol of the process table in the kernel ELF.
pub const PROCESS_TABLE_SYMBOL: &str = "PROCESS_TABLE";
/// Symbol of the #PF entry stub (IDT vector 14) in the kernel ELF.
pub const PAGE_FAULT_ENTRY_SYMBOL: &str = "isr14";
pub const PROCESS_TABLE_MAGIC: u64 = u64::from_le_bytes(*b"SDPTABLE");
pub const PROCESS_TABLE_VERSION: u32 = 2;
/// Slots in the process table: the most processes one script may start.
pub const MAX_PROCS: usize = 16;
/// Mappings one process may have.
pub const MAX_MAPPINGS: usize = 64;
/// Bytes of [`ProcSlot::name`]: a name of up to `PROC_NAME_LEN - 1` characters and
/// a NUL (Linux's `comm` holds 15 characters).
pub const PROC_NAME_LEN: usize = 16;

/// Process states in [`ProcSlot::state`].
pub mod state {
    pub const FREE: u32 = 0;
    pub const RUNNABLE: u32 = 1;
    pub const EXITED: u32 = 2;
    pub const KILLED: u32 = 3;
}

/// Flags in [`MappingRecord::flags`].
pub mod mapping_flags {
    pub const READ_ONLY: u32 = 1;
    pub const HUGE: u32 = 2;
    /// Backed by the shared window's frames (the same frames in every process).
    pub const SHARED: u32 = 4;
    /// Executable (a Linux program's text): its pages are mapped without NX.
    pub const EXEC: u32 = 8;
    /// A mapping of a file of the Linux program's file system (with SHARED:
    /// `MAP_SHARED`, the file's own frames; without: `MAP_PRIVATE`, a copy of each page
    /// the process touches).
    pub const FILE: u32 = 16;
}

/// One anonymous mapping of a process, like a Linux VMA.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MappingRecord {
    pub start: u64,
    pub pages: u64,
    pub flags: u32,
    pub _pad: u32,
    /// Unique per `map` call; pieces split off by `protect`/`unmap` keep it.
    pub serial: u64,
}

/// One process. A slot is reused only if its state is FREE.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ProcSlot {
    pub pid: u32,
    pub state: u32,
    pub exit_code: u32,
    pub nmappings: u32,
    pub name: [u8; PROC_NAME_LEN],
    /// Physical address of the process's PML4.
    pub cr3: u64,
    pub rss_pages: u64,
    pub peak_rss_pages: u64,
    pub mappings: [MappingRecord; MAX_MAPPINGS],
}

/// The process table the kernel publishes at [`PROCESS_TABLE_SYMBOL`].
///
/// `seq` is a sequence lock: odd while the kernel is changing the table.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ProcessTable {
    pub magic: u64,
    pub version: u32,
    pub max_procs: u32,
    pub max_mappings: u32,
    pub slot_size: u32,
    pub seq: u64,
    pub nprocs: u32,
    pub _pad: u32,
    /// Physical address of the shared zero frame mapped for read faults.
    pub zero_frame: u64,
    /// Physical address of the 2 MiB zero block mapped for read faults on huge
    /// mappings (0 until the first one).
    pub huge_zero_frame: u64,
    pub procs: [ProcSlot; MAX_PROCS],
}

impl ProcSlot {
    pub const EMPTY: ProcSlot = ProcSlot {
        pid: 0,
        state: state::FREE,
        exit_code: 0,
        nmappings: 0,
        name: [0; PROC_NAME_LEN],
        cr3: 0,
        rss_pages: 0,
        peak_rss_pages: 0,
        mappings: [MappingRecord { start: 0, pages: 0, flags: 0, _pad: 0, serial: 0 }; MAX_MAPPINGS],
    };
}

impl ProcessTable {
    pub const EMPTY: ProcessTable = ProcessTable {
        magic: 0,
        version: 0,
        max_procs: 0,
        max_mappings: 0,
        slot_size: 0,
        seq: 0,
        nprocs: 0,
        _pad: 0,
        zero_frame: 0,
        huge_zero_frame: 0,
        procs: [ProcSlot::EMPTY; MAX_PROCS],
    };

    /// An empty table with the header the kernel publishes (magic, version, limits):
    /// what a reader accepts, with no processes yet.
    pub const fn with_header() -> ProcessTable {
        let mut t = ProcessTable::EMPTY;
        t.magic = PROCESS_TABLE_MAGIC;
        t.version = PROCESS_TABLE_VERSION;
        t.max_procs = MAX_PROCS as u32;
        t.max_mappings = MAX_MAPPINGS as u32;
        t.slot_size = core::mem::size_of::<ProcSlot>() as u32;
        t
    }

    /// The table's bytes, as a reader in guest memory sees them.
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: ProcessTable is repr(C) plain old data (integers and arrays of them,
        // padding fields explicit), so all of its bytes are initialized; the slice lives
        // as long as the borrow of `self`.
        unsafe { core::slice::from_raw_parts((self as *const ProcessTable).cast::<u8>(), core::mem::size_of::<ProcessTable>()) }
    }
}

// The VMM reads the process table byte-wise at `offset_of!` offsets and checks `slot_size`, so
// either side changing the layout without the other fails loudly at boot; these pin the
// layout at compile time so that a change is deliberate (and bumps
// PROCESS_TABLE_VERSION).
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(size_of::<MappingRecord>() == 32);
    assert!(offset_of!(MappingRecord, start) == 0);
    assert!(offset_of!(MappingRecord, pages) == 8);
    assert!(offset_of!(MappingRecord, flags) == 16);
    assert!(offset_of!(MappingRecord, serial) == 24);

    assert!(offset_of!(ProcSlot, pid) == 0);
    assert!(offset_of!(ProcSlot, state) == 4);
    assert!(offset_of!(ProcSlot, exit_code) == 8);
    assert!(offset_of!(ProcSlot, nmappings) == 12);
    assert!(offset_of!(ProcSlot, name) == 16);
    assert!(offset_of!(ProcSlot, cr3) == 32);
    assert!(offset_of!(ProcSlot, rss_pages) == 40);
    assert!(offset_of!(ProcSlot, peak_rss_pages) == 48);
    assert!(offset_of!(ProcSlot, mappings) == 56);
    assert!(size_of::<ProcSlot>() == 56 + MAX_MAPPINGS * 32);

    assert!(offset_of!(ProcessTable, magic) == 0);
    assert!(offset_of!(ProcessTable, version) == 8);
    assert!(offset_of!(ProcessTable, max_procs) == 12);
    assert!(offset_of!(ProcessTable, max_mappings) == 16);
    assert!(offset_of!(ProcessTable, slot_size) == 20);
    assert!(offset_of!(ProcessTable, seq) == 24);
    assert!(offset_of!(ProcessTable, nprocs) == 32);
    assert!(offset_of!(ProcessTable, zero_frame) == 40);
    assert!(offset_of!(ProcessTable, huge_zero_frame) == 48);
    assert!(offset_of!(ProcessTable, procs) == 56);
    assert!(size_of::<ProcessTable>() == 56 + MAX_PROCS * size_of::<ProcSlot>());

    // SyncRecord: the VMM reads `pid`, `label_len`, then the label, at fixed offsets.
    assert!(offset_of!(SyncRecord, pid) == 0);
    assert!(offset_of!(SyncRecord, label_len) == 4);
    assert!(offset_of!(SyncRecord, label) == 8);
    assert!(size_of::<SyncRecord>() == 8 + SYNC_LABEL_MAX);
    // ZeroRequest: a u64 count, then (pfn, pages) pairs of u64.
    assert!(offset_of!(ZeroRequest, ranges) == 8);
    assert!(size_of::<ZeroRange>() == 16);
    assert!(size_of::<ZeroRequest>() == 8 + 16 * ZERO_REQUEST_MAX);
    // ProcRequest: u32 op, u32 pid, then u64 arg, count, buf, result.
    assert!(offset_of!(ProcRequest, arg) == 8 && offset_of!(ProcRequest, result) == 32 && offset_of!(ProcRequest, target) == 40 && offset_of!(ProcRequest, aux) == 48 && size_of::<ProcRequest>() == 56);
    assert!(size_of::<Piece>() == 16);
    // BootInfo: eight u64 in order.
    assert!(offset_of!(BootInfo, free_phys) == 32 && offset_of!(BootInfo, exec_phys) == 40 && size_of::<BootInfo>() == 64);
    assert!(offset_of!(BootInfo, tsc_khz) as u64 == BOOT_INFO_CLOCK_OFFSET && offset_of!(BootInfo, boot_unix_ns) == 56);
};
