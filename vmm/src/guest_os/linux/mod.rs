//! Static Linux programs as guest processes (`vmm run --exec PROGRAM -- ARGS`): the
//! executable is read and checked here ([`elf`]) and laid out into frames and an
//! initial stack ([`layout`]) that the guest kernel maps into the process; its system
//! calls are the guest kernel's (docs/linux-programs.md).

pub mod cpio;
pub mod elf;
pub mod layout;
pub mod map_names;
pub mod proc_text;

use std::path::Path;

/// Largest program file read.
pub const MAX_PROGRAM_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("not an ELF file")]
    NotElf,
    #[error("a dynamically linked program (it names an interpreter, PT_INTERP): only static programs run here; link it with -static or -static-pie")]
    Dynamic,
    #[error("{0}")]
    BadElf(String),
    #[error("arguments and environment take {bytes} bytes of the initial stack; at most {max} fit")]
    ArgsTooLong { bytes: usize, max: usize },
    #[error("--file: {0}")]
    Files(String),
}

/// A program for the guest, read and checked.
pub struct Exec {
    pub program: elf::Program,
    pub file: Vec<u8>,
    /// `argv[0]` first.
    pub argv: Vec<String>,
    /// The process's name (`ps`, the kernel's messages): the file's base name, as
    /// Linux's `comm` (15 characters of it), restricted to the workload language's
    /// name characters.
    pub name: String,
}

/// Largest file put into the guest with `--file`.
pub const MAX_FILE_BYTES: u64 = 64 << 20;

/// `--file HOST[:GUEST]`: reads HOST; GUEST is its absolute path in the guest
/// (default: `/` and HOST's file name).
pub fn read_file(spec: &str) -> Result<layout::GuestFile, ReadError> {
    let (host, guest) = match spec.split_once(':') {
        Some((h, g)) => (h, g.to_string()),
        None => (spec, format!("/{}", Path::new(spec).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())),
    };
    let bad = |why: String| ReadError::File { spec: spec.to_string(), why };
    if !guest.starts_with('/') || guest.len() < 2 || guest.len() > guest_abi::exec::MAX_FILE_NAME || guest.contains('\0') || guest.ends_with('/') {
        return Err(bad(format!("the guest path {guest:?} must be absolute, name a file, and have at most {} bytes", guest_abi::exec::MAX_FILE_NAME)));
    }
    let bytes = crate::input::read_limited(Path::new(host), MAX_FILE_BYTES).map_err(|e| bad(e.to_string()))?;
    Ok(layout::GuestFile { name: guest, bytes })
}

/// Largest `--initrd` archive read (guest RAM bounds it further).
pub const MAX_INITRD_BYTES: u64 = 512 << 20;

/// `--initrd FILE.cpio`: the archive's regular files, checked.
pub fn read_initrd(path: &Path) -> Result<cpio::Archive, ReadError> {
    let bad = |why: String| ReadError::Initrd { path: path.into(), why };
    let bytes = crate::input::read_limited(path, MAX_INITRD_BYTES).map_err(|e| bad(e.to_string()))?;
    let archive = cpio::parse(&bytes).map_err(|e| bad(e.to_string()))?;
    if let Some(big) = archive.files.iter().find(|f| f.bytes.len() as u64 > MAX_FILE_BYTES) {
        return Err(bad(format!("{} has {} bytes; at most {MAX_FILE_BYTES} a file", big.name, big.bytes.len())));
    }
    Ok(archive)
}

/// Reads `path` and checks it can run here; `args` follow `argv[0]` (the path as given).
pub fn read(path: &Path, args: &[String]) -> Result<Exec, ReadError> {
    let file = crate::input::read_limited(path, MAX_PROGRAM_BYTES).map_err(|source| ReadError::Io { path: path.into(), source })?;
    let mut argv = vec![path.display().to_string()];
    argv.extend(args.iter().cloned());
    from_file(path, file, argv)
}

/// A script's `proc NAME exec PATH ARGS...`: PATH from the files put into the guest.
pub fn from_script(exec: &workload::Exec<'_>, files: &[layout::GuestFile]) -> Result<Exec, ReadError> {
    let argv: Vec<String> = exec.words().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
    let path = argv[0].clone();
    let file = files.iter().find(|f| f.name == path).ok_or_else(|| ReadError::File {
        spec: path.clone(),
        why: format!("`exec {path}` names no file of the guest: give it with --file HOST:{path}"),
    })?;
    from_file(Path::new(&path), file.bytes.clone(), argv)
}

fn from_file(path: &Path, file: Vec<u8>, argv: Vec<String>) -> Result<Exec, ReadError> {
    let program = elf::parse(&file).map_err(|source| ReadError::Elf { path: path.into(), source })?;
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut name: String = base.chars().map(|c| if c.is_ascii_alphanumeric() || "_.-".contains(c) { c } else { '_' }).take(15).collect();
    if name.is_empty() {
        name.push_str("program");
    }
    Ok(Exec { program, file, argv, name })
}

/// Why a program cannot run, naming it.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read program {}: {source}", path.display())]
    Io { path: std::path::PathBuf, source: std::io::Error },
    #[error("program {}: {source}", path.display())]
    Elf { path: std::path::PathBuf, source: Error },
    #[error("--file {spec}: {why}")]
    File { spec: String, why: String },
    #[error("--initrd {}: {why}", path.display())]
    Initrd { path: std::path::PathBuf, why: String },
}

impl Exec {
    /// The blob for guest-physical `base`: the kernel's [`guest_abi::exec::Image`], the
    /// program's frames and its initial stack (no environment: the host's is not the
    /// guest's business), then `files`.
    pub fn lay_out(&self, files: &[layout::GuestFile], base: u64, at: layout::Placement) -> Result<Vec<u8>, ReadError> {
        let mut random = [0u8; 16];
        // AT_RANDOM seeds the program's stack protector and pointer guard.
        getrandom(&mut random);
        if let Some(dup) = files.iter().enumerate().find(|(i, f)| files[..*i].iter().any(|g| g.name == f.name)) {
            return Err(ReadError::File { spec: dup.1.name.clone(), why: "the guest path is given twice".into() });
        }
        layout::lay_out(&self.program, &self.file, &self.argv, &[], files, random, base, at)
            .map(|l| l.bytes)
            .map_err(|source| ReadError::Elf { path: self.argv[0].clone().into(), source })
    }
}

fn getrandom(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n != buf.len() as isize {
        // Not secret-grade then, but never the same twice.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        buf.copy_from_slice(&t.to_le_bytes()[..buf.len()]);
    }
}
