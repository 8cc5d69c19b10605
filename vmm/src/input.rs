//! Reading files the VMM does not trust (images, scripts, snapshots, dumps):
//! [`open_regular`] refuses anything but a regular file (a FIFO would block, a device
//! never end) and [`read_limited`] reads at most a stated number of bytes. A leaf that
//! every layer may use.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading if it is a regular file (symlinks followed), judged by the
/// opened file itself, not by a separate look-up; returns it with its size. The open
/// is non-blocking, so a FIFO is refused instead of waiting for a writer (the flag has
/// no effect on reads of a regular file). Errors are sentences about the file, for the
/// caller to prefix with its path.
pub fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY).open(path)?;
    let meta = f.metadata()?;
    let t = meta.file_type();
    if !t.is_file() {
        let what = if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("is {what}, not a regular file")));
    }
    Ok((f, meta.len()))
}

/// Reads what is left of `f`, refusing more than `limit` bytes. It reads through
/// `take(limit + 1)`, so a file that grows while being read is still bounded.
pub fn read_at_most(f: File, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut data = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut data)?;
    if data.len() as u64 > limit {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("grew past {limit} bytes while being read")));
    }
    Ok(data)
}

/// All of regular file `path`, which must hold at most `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let (f, len) = open_regular(path)?;
    if len > limit {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("is {len} bytes, more than the limit of {limit}")));
    }
    read_at_most(f, limit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = |p: &Path, limit| read_limited(p, limit).unwrap_err().to_string();
        assert_eq!(err(&fifo, 10), "is a FIFO, not a regular file");
        let zero = d.path().join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(err(&zero, 10), "is a character device, not a regular file");
        assert_eq!(err(d.path(), 10), "is a directory, not a regular file");
        let f = d.path().join("f");
        std::fs::write(&f, b"12345").unwrap();
        assert_eq!(err(&f, 4), "is 5 bytes, more than the limit of 4");
        assert_eq!(read_limited(&f, 5).unwrap(), b"12345");
        let (file, _) = open_regular(&f).unwrap();
        assert_eq!(read_at_most(file, 3).unwrap_err().to_string(), "grew past 3 bytes while being read");
    }

}
