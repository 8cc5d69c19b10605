//! What `/proc/PID/maps` names a Linux program's mappings by, which the process table
//! does not hold: the file a mapping maps and from which page, the program break and
//! the initial stack. The guest kernel sends it with each maps or smaps request
//! ([`guest_abi::names::MapNames`]); it is read from guest memory, so it is checked
//! like any guest data, and a mapping it says nothing of is anonymous.
//!
//! Linux's rules (fs/proc/task_mmu.c, 6.12): a file mapping shows its offset, device,
//! inode and path (" (deleted)" once unlinked); shared anonymous memory is a deleted
//! `/dev/zero` of the shmem device; otherwise `[heap]` is the mapping overlapping
//! `(start_brk, brk)` and `[stack]` the one holding `start_stack`.

use crate::guest_os::le::{u32_at, u64_at};
use crate::guest_os::process_table::Mapping;
use guest_abi::exec::MAX_FILE_NAME;
use guest_abi::names::{self, FILE_MAP_BYTES, MAX_FILE_MAPS};
use std::mem::offset_of;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{count} file mappings named (at most {MAX_FILE_MAPS})")]
    TooMany { count: u64 },
    #[error("file mapping {index}: a name of {len} bytes (at most {MAX_FILE_NAME})")]
    NameTooLong { index: usize, len: u32 },
    #[error("file mapping {index}: its name at {phys:#x} is not in guest RAM")]
    NameOutside { index: usize, phys: u64 },
    #[error("file mapping {index}: flags {flags:#x} unknown")]
    Flags { index: usize, flags: u32 },
    #[error("the description is {got} bytes, not {want}")]
    Size { got: usize, want: usize },
}

/// One file mapping, as the kernel described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMap {
    pub serial: u64,
    pub va: u64,
    pub pgoff: u64,
    pub ino: u64,
    /// The absolute path (None: an unnamed file, shared anonymous memory).
    pub path: Option<String>,
    pub deleted: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MapNames {
    pub brk: (u64, u64),
    pub start_stack: u64,
    pub files: Vec<FileMap>,
}

/// How maps shows a mapping after its permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// Bytes into the file.
    pub offset: u64,
    pub dev: (u32, u32),
    pub ino: u64,
    /// The name column (None: nothing after the inode).
    pub name: Option<String>,
}



/// Linux's seq_path escapes a newline in a path as `\012` (and the VMM escapes every
/// other control byte so, which Linux would print raw).
fn printable(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(bytes).chars() {
        if c.is_control() {
            out.push_str(&format!("\\{:03o}", c as u32 & 0xff));
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses the [`names::MapNames`] bytes `raw`; `name(phys, len)` reads a name's bytes
/// from guest RAM (None: not in guest RAM).
pub fn parse(raw: &[u8], mut name: impl FnMut(u64, usize) -> Option<Vec<u8>>) -> Result<MapNames, Error> {
    use names::{FileMap as Raw, MapNames as RawNames};
    if raw.len() != names::MAP_NAMES_BYTES {
        return Err(Error::Size { got: raw.len(), want: names::MAP_NAMES_BYTES });
    }
    let count = u64_at(raw, offset_of!(RawNames, count));
    if count > MAX_FILE_MAPS as u64 {
        return Err(Error::TooMany { count });
    }
    let mut files = Vec::with_capacity(count as usize);
    for index in 0..count as usize {
        let e = &raw[offset_of!(RawNames, maps) + index * FILE_MAP_BYTES..][..FILE_MAP_BYTES];
        let (len, phys, flags) = (u32_at(e, offset_of!(Raw, name_len)), u64_at(e, offset_of!(Raw, name_phys)), u32_at(e, offset_of!(Raw, flags)));
        if len as usize > MAX_FILE_NAME {
            return Err(Error::NameTooLong { index, len });
        }
        if flags & !names::DELETED != 0 {
            return Err(Error::Flags { index, flags });
        }
        let path = match len {
            0 => None,
            _ => Some(printable(&name(phys, len as usize).ok_or(Error::NameOutside { index, phys })?)),
        };
        files.push(FileMap {
            serial: u64_at(e, offset_of!(Raw, serial)),
            va: u64_at(e, offset_of!(Raw, va)),
            pgoff: u64_at(e, offset_of!(Raw, pgoff)),
            ino: u64_at(e, offset_of!(Raw, ino)),
            path,
            deleted: flags & names::DELETED != 0,
        });
    }
    Ok(MapNames {
        brk: (u64_at(raw, offset_of!(RawNames, brk_start)), u64_at(raw, offset_of!(RawNames, brk))),
        start_stack: u64_at(raw, offset_of!(RawNames, start_stack)),
        files,
    })
}

impl MapNames {
    /// How maps shows mapping `m`.
    pub fn identify(&self, m: &Mapping) -> Identity {
        let file = if m.file { self.files.iter().find(|f| f.serial == m.serial) } else { None };
        if let Some(f) = file {
            // A piece split off the mapping starts further into the file; a record the
            // kernel says begins before its own mapping is not believed (offset 0).
            let offset = m.start.checked_sub(f.va).map_or(0, |d| (f.pgoff.saturating_mul(4096)).saturating_add(d));
            return match &f.path {
                Some(p) => Identity { offset, dev: (0, names::FILES_DEV), ino: f.ino, name: Some(if f.deleted { format!("{p} (deleted)") } else { p.clone() }) },
                None => Identity { offset, dev: (0, names::SHMEM_DEV), ino: f.ino, name: Some("/dev/zero (deleted)".into()) },
            };
        }
        let (start_brk, brk) = self.brk;
        let name = if m.start < brk && m.end() > start_brk {
            Some("[heap]")
        } else if self.start_stack != 0 && m.start <= self.start_stack && m.end() >= self.start_stack {
            Some("[stack]")
        } else {
            None
        };
        Identity { name: name.map(String::from), ..Identity::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(brk: (u64, u64), stack: u64, maps: &[names::FileMap]) -> Vec<u8> {
        let mut t = names::MapNames { brk_start: brk.0, brk: brk.1, start_stack: stack, count: maps.len() as u64, maps: [names::FileMap::default(); MAX_FILE_MAPS] };
        t.maps[..maps.len()].copy_from_slice(maps);
        // SAFETY: MapNames is repr(C) of u64/u32 fields with no padding (its size is
        // asserted), so all of its bytes are initialized.
        unsafe { std::slice::from_raw_parts((&raw const t).cast::<u8>(), names::MAP_NAMES_BYTES) }.to_vec()
    }

    fn mapping(start: u64, pages: u64, file: bool, serial: u64) -> Mapping {
        Mapping { start, pages, read_only: false, huge: false, shared: file, exec: false, file, serial }
    }

    const NAME_AT: u64 = 0x5000;

    fn guest_name(phys: u64, len: usize) -> Option<Vec<u8>> {
        (phys == NAME_AT).then(|| b"/tmp/data\nx"[..len].to_vec())
    }

    #[test]
    fn a_file_mapping_and_its_split_pieces_show_their_offset_device_inode_and_path() {
        let f = names::FileMap { serial: 7, va: 0x1000_0000, pgoff: 2, ino: 103, name_phys: NAME_AT, name_len: 9, flags: 0 };
        let n = parse(&raw((0, 0), 0, &[f]), guest_name).unwrap();
        let whole = n.identify(&mapping(0x1000_0000, 4, true, 7));
        assert_eq!(whole, Identity { offset: 0x2000, dev: (0, 2), ino: 103, name: Some("/tmp/data".into()) });
        assert_eq!(n.identify(&mapping(0x1000_3000, 1, true, 7)).offset, 0x5000);
        // Another serial is another mapping: anonymous.
        assert_eq!(n.identify(&mapping(0x2000_0000, 1, false, 8)), Identity::default());
    }

    #[test]
    fn unlinked_files_shared_anonymous_memory_the_heap_and_the_stack_are_named_as_linux_names_them() {
        let gone = names::FileMap { serial: 1, va: 0x1000, pgoff: 0, ino: 101, name_phys: NAME_AT, name_len: 11, flags: names::DELETED };
        let shm = names::FileMap { serial: 2, va: 0x8000, pgoff: 0, ino: 102, name_phys: 0, name_len: 0, flags: 0 };
        let n = parse(&raw((0x40_0000, 0x40_2100), 0x7fff_f000, &[gone, shm]), guest_name).unwrap();
        assert_eq!(n.identify(&mapping(0x1000, 1, true, 1)).name.unwrap(), "/tmp/data\\012x (deleted)");
        let s = n.identify(&mapping(0xa000, 1, true, 2));
        assert_eq!((s.offset, s.dev, s.name.unwrap().as_str()), (0x2000, (0, 1), "/dev/zero (deleted)"));
        assert_eq!(n.identify(&mapping(0x40_0000, 3, false, 3)).name.unwrap(), "[heap]");
        assert_eq!(n.identify(&mapping(0x7ffe_0000, 32, false, 4)).name.unwrap(), "[stack]");
        // start_brk == brk: no heap yet, as in Linux.
        let none = parse(&raw((0x40_0000, 0x40_0000), 0, &[]), guest_name).unwrap();
        assert_eq!(none.identify(&mapping(0x40_0000, 1, false, 3)).name, None);
    }

    #[test]
    fn a_bad_description_is_refused_naming_what_is_wrong() {
        let mut r = raw((0, 0), 0, &[]);
        r[offset_of!(names::MapNames, count)] = 65;
        assert_eq!(parse(&r, guest_name), Err(Error::TooMany { count: 65 }));
        let long = names::FileMap { name_len: 64, ..Default::default() };
        assert_eq!(parse(&raw((0, 0), 0, &[long]), guest_name), Err(Error::NameTooLong { index: 0, len: 64 }));
        let outside = names::FileMap { name_phys: 0x9999, name_len: 3, ..Default::default() };
        assert_eq!(parse(&raw((0, 0), 0, &[outside]), guest_name), Err(Error::NameOutside { index: 0, phys: 0x9999 }));
        let flags = names::FileMap { flags: 6, ..Default::default() };
        assert_eq!(parse(&raw((0, 0), 0, &[flags]), guest_name), Err(Error::Flags { index: 0, flags: 6 }));
        assert_eq!(parse(&r[..10], guest_name), Err(Error::Size { got: 10, want: names::MAP_NAMES_BYTES }));
    }
}
