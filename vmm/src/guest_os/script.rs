//! Workload scripts on the host: read, validated before any guest runs.

use std::path::{Path, PathBuf};

/// The workload `vmm run` uses when none is given: three processes writing and
/// checking disjoint and shared-address memory, with syncs between rounds.
pub const DEMO: &str = include_str!("demo.wl");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read workload {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// `file:line: message`, as compilers print it.
    #[error("{path}:{line}: {message}")]
    Invalid { path: String, line: u32, message: String },
}

/// Checks `script`, naming `origin` (a path or "built-in demo") in errors.
pub fn validate(origin: &str, script: &[u8]) -> Result<workload::Summary, Error> {
    workload::validate(script).map_err(|e| Error::Invalid {
        path: origin.to_string(),
        line: e.line,
        message: e.error.to_string(),
    })
}

/// Reads and validates a workload file: a regular file of at most
/// [`workload::MAX_SCRIPT_LEN`] (256 KiB) bytes.
pub fn load(path: &Path) -> Result<Vec<u8>, Error> {
    let bytes = crate::input::read_limited(path, workload::MAX_SCRIPT_LEN as u64)
        .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    validate(&path.display().to_string(), &bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    #[test]
    fn demo_is_valid() {
        let s = super::validate("demo", super::DEMO.as_bytes()).unwrap();
        assert!(s.procs >= 2);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = super::validate("w.wl", b"proc a\nmap 0x400001 1\n").unwrap_err();
        assert_eq!(e.to_string(), "w.wl:2: address is not page-aligned (4096) '0x400001'");
    }
}
