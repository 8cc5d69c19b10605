//! `--initrd FILE.cpio`: the regular files of a cpio archive in the "newc" format (what
//! `cpio -H newc`, `gen_init_cpio` and initramfs tools make) become files of the guest's
//! file system, each at its path made absolute. Directories need no entry of their own
//! (a file's path makes its directories); symlinks, devices, FIFOs and sockets have no
//! place in the guest's file system and are skipped, and counted, so the caller can say
//! so. The archive is untrusted: every header field is checked against the bytes that
//! are there, and a malformed archive is refused with what was wrong and where.

use super::layout::GuestFile;
use guest_abi::exec::MAX_FILE_NAME;

const MAGIC: &[u8; 6] = b"070701";
const MAGIC_CRC: &[u8; 6] = b"070702";
const HEADER: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("at byte {at}: {why}")]
    Malformed { at: usize, why: String },
    #[error("ends at byte {0} without the TRAILER!!! entry")]
    NoTrailer(usize),
    #[error("entry {name:?}: {why}")]
    Entry { name: String, why: String },
}

/// What an archive holds for the guest.
#[derive(Debug, Default)]
pub struct Archive {
    pub files: Vec<GuestFile>,
    /// Entries that are neither regular files nor directories (symlinks, devices, ...).
    pub skipped: Vec<String>,
}

fn hex_field(b: &[u8], at: usize, index: usize) -> Result<u32, Error> {
    let field = &b[at + 6 + index * 8..at + 6 + index * 8 + 8];
    let text = std::str::from_utf8(field).ok().filter(|t| t.bytes().all(|c| c.is_ascii_hexdigit()));
    text.and_then(|t| u32::from_str_radix(t, 16).ok())
        .ok_or_else(|| Error::Malformed { at: at + 6 + index * 8, why: format!("header field {index} is not 8 hex digits: {:?}", String::from_utf8_lossy(field)) })
}

fn align4(n: usize) -> usize {
    n.next_multiple_of(4)
}

/// Reads the archive's entries (each file's bytes copied out).
pub fn parse(b: &[u8]) -> Result<Archive, Error> {
    let mut out = Archive::default();
    let mut at = 0;
    loop {
        if at + HEADER > b.len() {
            return Err(if at >= b.len() { Error::NoTrailer(at) } else { Error::Malformed { at, why: "truncated header".into() } });
        }
        let magic = &b[at..at + 6];
        if magic != MAGIC && magic != MAGIC_CRC {
            return Err(Error::Malformed { at, why: format!("magic {:?} is not newc's 070701 (an old binary or odc cpio? make it with `cpio -H newc`)", String::from_utf8_lossy(magic)) });
        }
        let mode = hex_field(b, at, 1)?;
        let size = hex_field(b, at, 6)? as usize;
        let namesize = hex_field(b, at, 11)? as usize;
        let name_at = at + HEADER;
        if namesize == 0 || name_at + namesize > b.len() {
            return Err(Error::Malformed { at: name_at, why: format!("name of {namesize} bytes runs past the archive's end") });
        }
        let raw_name = &b[name_at..name_at + namesize];
        let Some((&0, name_bytes)) = raw_name.split_last() else {
            return Err(Error::Malformed { at: name_at, why: "name is not NUL-terminated".into() });
        };
        let name = String::from_utf8_lossy(name_bytes).into_owned();
        let data_at = align4(name_at + namesize);
        if data_at + size > b.len() {
            return Err(Error::Malformed { at: data_at, why: format!("entry {name:?} claims {size} bytes; the archive ends first") });
        }
        at = align4(data_at + size);
        if name == TRAILER {
            return Ok(out);
        }
        let path = guest_path(&name);
        match mode & S_IFMT {
            S_IFREG => {
                let path = path.ok_or_else(|| Error::Entry { name: name.clone(), why: "is not a path for a file".into() })?;
                if path.len() > MAX_FILE_NAME || path.contains('\0') {
                    return Err(Error::Entry { name, why: format!("the guest path {path:?} is longer than {MAX_FILE_NAME} bytes") });
                }
                let bytes = b[data_at..data_at + size].to_vec();
                // A hard link's earlier names come with no bytes; the last carries them.
                match out.files.iter_mut().find(|f| f.name == path) {
                    Some(f) => f.bytes = bytes,
                    None => out.files.push(GuestFile { name: path, bytes }),
                }
            }
            S_IFDIR => {}
            _ => out.skipped.push(name),
        }
    }
}

/// `./bin/x`, `bin/x` and `/bin/x` are all `/bin/x`; `.` (the root) is none.
fn guest_path(name: &str) -> Option<String> {
    let parts: Vec<&str> = name.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(format!("/{}", parts.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One newc entry, as `cpio -H newc` writes it.
    fn entry(name: &str, mode: u32, data: &[u8]) -> Vec<u8> {
        let mut e = format!("070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}", 1, 0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0)
            .into_bytes();
        e.extend(name.as_bytes());
        e.push(0);
        e.resize(align4(e.len()), 0);
        e.extend(data);
        e.resize(align4(e.len()), 0);
        e
    }

    fn archive(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut a: Vec<u8> = entries.concat();
        a.extend(entry(TRAILER, 0, b""));
        a
    }

    #[test]
    fn files_take_absolute_paths_and_directories_and_specials_need_no_room() {
        let a = archive(&[
            entry(".", S_IFDIR | 0o755, b""),
            entry("bin", S_IFDIR | 0o755, b""),
            entry("./bin/tool", S_IFREG | 0o755, b"\x7fELF..."),
            entry("etc/motd", S_IFREG | 0o644, b"hello\n"),
            entry("dev/console", 0o020600, b""),
            entry("bin/sh", 0o120777, b"tool"),
        ]);
        let got = parse(&a).unwrap();
        let files: Vec<(&str, &[u8])> = got.files.iter().map(|f| (f.name.as_str(), f.bytes.as_slice())).collect();
        assert_eq!(files, vec![("/bin/tool", &b"\x7fELF..."[..]), ("/etc/motd", &b"hello\n"[..])]);
        assert_eq!(got.skipped, vec!["dev/console", "bin/sh"]);
    }

    #[test]
    fn malformed_archives_say_what_and_where() {
        let good = archive(&[entry("a", S_IFREG | 0o644, b"12345")]);
        assert!(parse(&good).is_ok());
        assert!(matches!(parse(&good[..good.len() - 120]), Err(Error::NoTrailer(_)) | Err(Error::Malformed { .. })));
        let mut bad_magic = good.clone();
        bad_magic[..6].copy_from_slice(b"070707");
        assert!(matches!(parse(&bad_magic), Err(Error::Malformed { at: 0, why }) if why.contains("newc")));
        let mut bad_hex = good.clone();
        bad_hex[6 + 6 * 8] = b'g';
        assert!(matches!(parse(&bad_hex), Err(Error::Malformed { at: 54, .. })));
        // A size beyond the archive's end is refused, not read past.
        let mut huge = good.clone();
        huge[6 + 6 * 8..6 + 7 * 8].copy_from_slice(b"7fffffff");
        assert!(matches!(parse(&huge), Err(Error::Malformed { why, .. }) if why.contains("claims")));
        assert!(matches!(parse(b""), Err(Error::NoTrailer(0))));
        let up = archive(&[entry("../escape", S_IFREG, b"x")]);
        assert!(matches!(parse(&up), Err(Error::Entry { .. })));
        let long = archive(&[entry(&"d/".repeat(40), S_IFREG, b"x")]);
        assert!(matches!(parse(&long), Err(Error::Entry { why, .. }) if why.contains("longer")));
    }
}
