//! Laying a checked [`Program`] out for the guest kernel: the pages of each segment
//! that come from the file (with Linux's zero tail after the file bytes), the initial
//! stack (argv, envp, the aux vector), and the [`exec::Image`] that tells the kernel
//! what to map where. Everything is built here, host-side, into one blob the kernel
//! finds at a known physical address: ring 0 (emulated on our hosts) only maps frames.

use super::elf::{Program, PAGE, USER_TOP};
use super::Error;
use guest_abi::exec::{self, Image, Segment, FILES_BYTES, FILE_BYTES, MAX_FILES, MAX_FILE_NAME};
use guest_abi::mapping_flags::{EXEC, READ_ONLY};

/// The initial stack's top and size, as Linux gives a process without randomization.
pub const STACK_TOP: u64 = USER_TOP - PAGE;
pub const STACK_SIZE: u64 = 8 << 20;
/// Most bytes of argument and environment strings plus their vectors (Linux allows a
/// quarter of the stack; this is plenty for tools and tests).
pub const MAX_ARG_BYTES: usize = 256 << 10;

const AT_NULL: u64 = 0;
const AT_PHDR: u64 = 3;
const AT_PHENT: u64 = 4;
const AT_PHNUM: u64 = 5;
const AT_PAGESZ: u64 = 6;
const AT_BASE: u64 = 7;
const AT_FLAGS: u64 = 8;
const AT_ENTRY: u64 = 9;
const AT_UID: u64 = 11;
const AT_EUID: u64 = 12;
const AT_GID: u64 = 13;
const AT_EGID: u64 = 14;
const AT_PLATFORM: u64 = 15;
const AT_HWCAP: u64 = 16;
const AT_CLKTCK: u64 = 17;
const AT_SECURE: u64 = 23;
const AT_RANDOM: u64 = 25;
const AT_EXECFN: u64 = 31;

/// The blob for physical address `base`: the image, then each segment's filled pages.
pub struct Laid {
    pub bytes: Vec<u8>,
    pub image: Image,
}

/// A file put into the guest: its absolute path there and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

/// Which process runs the program, and whether it owns the console.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement {
    pub proc_index: u64,
    pub owns_console: bool,
}

/// Lays out `program` (whose file is `file`) with `argv` and `envp`, and `files`, for a
/// blob placed at guest-physical `base` (page-aligned). `random`: the 16 bytes of
/// `AT_RANDOM`.
#[allow(clippy::too_many_arguments)]
pub fn lay_out(program: &Program, file: &[u8], argv: &[String], envp: &[String], files: &[GuestFile], random: [u8; 16], base: u64,
    at: Placement) -> Result<Laid, Error> {
    let flags = if at.owns_console { exec::LOG_APART } else { 0 };
    let mut image = Image { magic: exec::MAGIC, entry: program.entry, proc_index: at.proc_index, flags, ..Image::default() };
    // The image first, on a page of its own; the frames follow.
    let mut bytes = vec![0u8; PAGE as usize];
    let mut segments = Vec::new();
    for load in &program.loads {
        let va = load.vaddr / PAGE * PAGE;
        let end = (load.vaddr + load.memsz).next_multiple_of(PAGE);
        // Pages holding file bytes; the zeros after them to the page's end come with
        // them (Linux's padzero), the pages after are demand-zero (bss).
        let fill_end = (load.vaddr + load.filesz).next_multiple_of(PAGE);
        let fill_phys = base + bytes.len() as u64;
        let file_from = (load.offset - (load.vaddr - va)) as usize;
        let in_file = (load.vaddr + load.filesz - va) as usize;
        let mut pages = file[file_from..file_from + in_file].to_vec();
        pages.resize((fill_end - va) as usize, 0);
        bytes.extend(&pages);
        let mut flags = 0;
        if !load.write {
            flags |= u64::from(READ_ONLY);
        }
        if load.exec {
            flags |= u64::from(EXEC);
        }
        segments.push(Segment { va, pages: (end - va) / PAGE, flags, fill_va: va, fill_pages: (fill_end - va) / PAGE, fill_phys });
    }
    image.brk = program.loads.iter().map(|l| (l.vaddr + l.memsz).next_multiple_of(PAGE)).max().expect("a program has a segment");
    let stack = initial_stack(program, argv, envp, random)?;
    image.rsp = stack.rsp;
    let fill_va = STACK_TOP - stack.bytes.len() as u64;
    segments.push(Segment {
        va: STACK_TOP - STACK_SIZE,
        pages: STACK_SIZE / PAGE,
        flags: 0,
        fill_va,
        fill_pages: stack.bytes.len() as u64 / PAGE,
        fill_phys: base + bytes.len() as u64,
    });
    bytes.extend(&stack.bytes);
    if segments.len() > exec::MAX_SEGMENTS {
        return Err(Error::BadElf(format!("{} loadable segments; at most {} fit", segments.len() - 1, exec::MAX_SEGMENTS - 1)));
    }
    image.nsegments = segments.len() as u64;
    image.segments[..segments.len()].copy_from_slice(&segments);
    if !files.is_empty() {
        if files.len() > MAX_FILES {
            return Err(Error::Files(format!("{} files; at most {MAX_FILES} fit", files.len())));
        }
        // The table on a page of its own, then each file from a page boundary.
        image.files = base + bytes.len() as u64;
        let table_at = bytes.len();
        bytes.resize(table_at + FILES_BYTES.next_multiple_of(PAGE as usize), 0);
        bytes[table_at..table_at + 8].copy_from_slice(&(files.len() as u64).to_le_bytes());
        for (i, f) in files.iter().enumerate() {
            let phys = base + bytes.len() as u64;
            bytes.extend(&f.bytes);
            bytes.resize(bytes.len().next_multiple_of(PAGE as usize), 0);
            let e = table_at + 8 + i * FILE_BYTES;
            bytes[e..e + f.name.len()].copy_from_slice(f.name.as_bytes());
            bytes[e + MAX_FILE_NAME + 1..e + MAX_FILE_NAME + 9].copy_from_slice(&(f.bytes.len() as u64).to_le_bytes());
            bytes[e + MAX_FILE_NAME + 9..e + MAX_FILE_NAME + 17].copy_from_slice(&phys.to_le_bytes());
        }
    }
    write_image(&image, &mut bytes[..exec::IMAGE_BYTES]);
    Ok(Laid { bytes, image })
}

/// The image's bytes as the kernel reads them: every field a little-endian u64, in order.
fn write_image(image: &Image, out: &mut [u8]) {
    let mut words = vec![image.magic, image.entry, image.rsp, image.brk, image.nsegments];
    for s in &image.segments {
        words.extend([s.va, s.pages, s.flags, s.fill_va, s.fill_pages, s.fill_phys]);
    }
    words.extend([image.files, image.proc_index, image.flags]);
    for (chunk, w) in out.chunks_exact_mut(8).zip(words) {
        chunk.copy_from_slice(&w.to_le_bytes());
    }
}

/// The top pages of the stack, ending at [`STACK_TOP`], and the initial `rsp`.
struct Stack {
    bytes: Vec<u8>,
    rsp: u64,
}

/// Linux's initial stack, from the top down: a zero word, the file name, the
/// environment and argument strings, `AT_RANDOM`'s bytes and the platform string; then,
/// 16-byte aligned, argc, argv[], NULL, envp[], NULL, the aux vector (`rsp` points at argc).
fn initial_stack(program: &Program, argv: &[String], envp: &[String], random: [u8; 16]) -> Result<Stack, Error> {
    let mut strings: Vec<u8> = Vec::new(); // built downward: `strings[i]` is at top - len + i
    let push = |strings: &mut Vec<u8>, s: &[u8]| -> u64 {
        let mut v = s.to_vec();
        v.push(0);
        v.extend(std::mem::take(strings));
        *strings = v;
        strings.len() as u64 // distance from the top
    };
    strings.extend([0u8; 8]);
    let execfn = push(&mut strings, argv.first().map_or(&b""[..], |a| a.as_bytes()));
    let env_at: Vec<u64> = envp.iter().rev().map(|e| push(&mut strings, e.as_bytes())).collect();
    let arg_at: Vec<u64> = argv.iter().rev().map(|a| push(&mut strings, a.as_bytes())).collect();
    let mut rnd = random.to_vec();
    rnd.extend(std::mem::take(&mut strings));
    strings = rnd;
    let random_at = strings.len() as u64;
    let platform = push(&mut strings, b"x86_64");
    let at = |from_top: u64| STACK_TOP - from_top;
    let auxv = [
        (AT_PHDR, program.phdr),
        (AT_PHENT, 56),
        (AT_PHNUM, program.phnum),
        (AT_PAGESZ, PAGE),
        (AT_BASE, 0),
        (AT_FLAGS, 0),
        (AT_ENTRY, program.entry),
        (AT_UID, 0),
        (AT_EUID, 0),
        (AT_GID, 0),
        (AT_EGID, 0),
        (AT_PLATFORM, at(platform)),
        (AT_HWCAP, 0),
        (AT_CLKTCK, 100),
        (AT_SECURE, 0),
        (AT_RANDOM, at(random_at)),
        (AT_EXECFN, at(execfn)),
        (AT_NULL, 0),
    ];
    let mut words: Vec<u64> = vec![argv.len() as u64];
    words.extend(arg_at.iter().rev().map(|&d| at(d)));
    words.push(0);
    words.extend(env_at.iter().rev().map(|&d| at(d)));
    words.push(0);
    for (k, v) in auxv {
        words.extend([k, v]);
    }
    let strings_start = at(strings.len() as u64);
    let rsp = (strings_start - words.len() as u64 * 8) & !15;
    let total = (STACK_TOP - rsp) as usize;
    if total > MAX_ARG_BYTES {
        return Err(Error::ArgsTooLong { bytes: total, max: MAX_ARG_BYTES });
    }
    let filled = (STACK_TOP - rsp / PAGE * PAGE) as usize;
    let mut bytes = vec![0u8; filled];
    let off = |va: u64| (va - (STACK_TOP - filled as u64)) as usize;
    let s = off(strings_start);
    bytes[s..s + strings.len()].copy_from_slice(&strings);
    for (i, w) in words.iter().enumerate() {
        let o = off(rsp) + i * 8;
        bytes[o..o + 8].copy_from_slice(&w.to_le_bytes());
    }
    Ok(Stack { bytes, rsp })
}

#[cfg(test)]
mod tests {
    use super::super::elf::{self, tests::elf};
    use crate::guest_os::le::u64_at;
    use super::*;


    fn c_string(b: &[u8], at: usize) -> String {
        let end = b[at..].iter().position(|&c| c == 0).unwrap();
        String::from_utf8(b[at..at + end].to_vec()).unwrap()
    }

    #[test]
    fn segments_keep_their_file_bytes_and_rights_and_the_rest_is_zero() {
        let f = elf(2, 0x40_1000, &[(0x40_0000, 0x1800, 0x1800, 1), (0x40_3010, 0x100, 0x3000, 2)]);
        let p = elf::parse(&f).unwrap();
        let l = lay_out(&p, &f, &["prog".into()], &[], &[], [9; 16], 0x20_0000, Placement::default()).unwrap();
        let segs = &l.image.segments[..l.image.nsegments as usize];
        assert_eq!(segs.len(), 3, "two segments and the stack");
        let text = segs[0];
        assert_eq!((text.va, text.pages, text.fill_pages), (0x40_0000, 2, 2));
        assert_eq!(text.flags, u64::from(READ_ONLY | EXEC));
        let data = segs[1];
        assert_eq!((data.va, data.pages, data.fill_pages, data.flags), (0x40_3000, 4, 1, 0), "bss pages are demand-zero");
        let at = |s: &Segment, va: u64| (s.fill_phys - 0x20_0000 + (va - s.fill_va)) as usize;
        assert_eq!(l.bytes[at(&text, 0x40_1000)], 1);
        assert_eq!(l.bytes[at(&text, 0x40_17ff)], 1);
        assert_eq!(l.bytes[at(&text, 0x40_1800)], 0, "zeros after the file bytes to the page's end");
        assert_eq!(l.bytes[at(&data, 0x40_3010)], 2);
        assert_eq!(l.bytes[at(&data, 0x40_3110)], 0);
        assert_eq!(l.image.brk, 0x40_7000);
        assert_eq!(u64_at(&l.bytes, 0), exec::MAGIC, "the image heads the blob");
        assert_eq!(u64_at(&l.bytes, 32), 3);
    }

    #[test]
    fn the_initial_stack_holds_argv_envp_and_the_aux_vector() {
        let f = elf(2, 0x40_1000, &[(0x40_0000, 0x2000, 0x2000, 1)]);
        let p = elf::parse(&f).unwrap();
        let argv: Vec<String> = ["prog", "a", "b c"].iter().map(|s| s.to_string()).collect();
        let l = lay_out(&p, &f, &argv, &["HOME=/".into()], &[], [7; 16], 0x20_0000, Placement::default()).unwrap();
        let stack = l.image.segments[1];
        assert_eq!((stack.va, stack.pages), (STACK_TOP - STACK_SIZE, STACK_SIZE / PAGE));
        let rsp = l.image.rsp;
        assert_eq!(rsp % 16, 0);
        let base = (stack.fill_phys - 0x20_0000) as usize;
        let at = |va: u64| base + (va - stack.fill_va) as usize;
        assert_eq!(u64_at(&l.bytes, at(rsp)), 3, "argc");
        let word = |i: u64| u64_at(&l.bytes, at(rsp + 8 * i));
        assert_eq!(c_string(&l.bytes, at(word(1))), "prog");
        assert_eq!(c_string(&l.bytes, at(word(3))), "b c");
        assert_eq!(word(4), 0);
        assert_eq!(c_string(&l.bytes, at(word(5))), "HOME=/");
        assert_eq!(word(6), 0);
        let mut aux = std::collections::HashMap::new();
        let mut i = 7;
        while word(i) != AT_NULL {
            aux.insert(word(i), word(i + 1));
            i += 2;
        }
        assert_eq!(aux[&AT_PAGESZ], 4096);
        assert_eq!(aux[&AT_ENTRY], 0x40_1000);
        assert_eq!((aux[&AT_PHDR], aux[&AT_PHNUM], aux[&AT_PHENT]), (0x40_0040, 1, 56));
        assert_eq!(aux[&AT_SECURE], 0);
        assert_eq!(aux[&AT_UID], aux[&AT_EUID]);
        let r = at(aux[&AT_RANDOM]);
        assert_eq!(&l.bytes[r..r + 16], &[7; 16]);
        assert_eq!(c_string(&l.bytes, at(aux[&AT_PLATFORM])), "x86_64");
        assert_eq!(c_string(&l.bytes, at(aux[&AT_EXECFN])), "prog");
        assert_eq!(stack.fill_va + stack.fill_pages * PAGE, STACK_TOP);
    }

    #[test]
    fn files_follow_with_a_table_of_names_sizes_and_frames() {
        let f = elf(2, 0x40_1000, &[(0x40_0000, 0x2000, 0x2000, 1)]);
        let p = elf::parse(&f).unwrap();
        let files = [GuestFile { name: "/a.txt".into(), bytes: b"hello".to_vec() }, GuestFile { name: "/b".into(), bytes: vec![3; 5000] }];
        let l = lay_out(&p, &f, &["prog".into()], &[], &files, [0; 16], 0x20_0000, Placement::default()).unwrap();
        let table = (l.image.files - 0x20_0000) as usize;
        assert_eq!(u64_at(&l.bytes, table), 2);
        let entry = |i: usize| table + 8 + i * FILE_BYTES;
        assert_eq!(c_string(&l.bytes, entry(1)), "/b");
        assert_eq!(u64_at(&l.bytes, entry(1) + 64), 5000);
        let phys = u64_at(&l.bytes, entry(1) + 72);
        assert_eq!(phys % PAGE, 0);
        let at = (phys - 0x20_0000) as usize;
        assert_eq!(&l.bytes[at..at + 5000], &[3; 5000][..]);
        let a = (u64_at(&l.bytes, entry(0) + 72) - 0x20_0000) as usize;
        assert_eq!(&l.bytes[a..a + 5], b"hello");
        assert_eq!(u64_at(&l.bytes, exec::IMAGE_BYTES - 24), l.image.files, "the image names the table");
    }

    #[test]
    fn arguments_too_long_are_refused() {
        let f = elf(2, 0x40_1000, &[(0x40_0000, 0x2000, 0x2000, 1)]);
        let p = elf::parse(&f).unwrap();
        let huge = vec!["x".repeat(1 << 20)];
        assert!(matches!(lay_out(&p, &f, &huge, &[], &[], [0; 16], 0, Placement::default()), Err(Error::ArgsTooLong { .. })));
    }
}
