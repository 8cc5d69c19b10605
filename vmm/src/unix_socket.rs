//! Binding a Unix socket that only we can reach: the control socket and a migration's
//! incoming socket. A leaf that any layer may use.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path} exists and is not a socket; refusing to replace it")]
    NotASocket { path: PathBuf },
    #[error("another process is listening on {path}")]
    InUse { path: PathBuf },
    #[error("cannot use socket {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

/// Binds and listens on `path` with mode 0600. A leftover socket nobody listens on is
/// replaced; any other existing file is an error.
///
/// The socket is bound inside a fresh private directory (mode 0700, unpredictable name,
/// beside `path`), restricted, then renamed into place: nobody else can reach it before
/// it is 0600, and the path appears only once it accepts connections. (Binding the final
/// path directly leaves a window between bind() and listen() in which clients that see
/// the file get ECONNREFUSED — seen under load — and one in which its mode is the
/// umask's.)
pub fn bind_private(path: &Path) -> Result<UnixListener, Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Error::NotASocket { path: path.to_path_buf() });
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(Error::InUse { path: path.to_path_buf() }),
            Err(_) => std::fs::remove_file(path).map_err(io)?,
        }
    }
    let private = PrivateDir::beside(path).map_err(io)?;
    let tmp = private.0.join("sock");
    let listener = UnixListener::bind(&tmp).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io)?;
    Ok(listener)
}

/// A directory only we can enter, removed (with whatever is left in it) when dropped.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn beside(path: &Path) -> std::io::Result<PrivateDir> {
        use std::os::unix::ffi::OsStrExt;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut template = parent.join(".vmm-sock-XXXXXX").as_os_str().as_bytes().to_vec();
        template.push(0);
        // SAFETY: `template` is a NUL-terminated buffer ending in XXXXXX that mkdtemp
        // rewrites in place; it outlives the call.
        let made = unsafe { libc::mkdtemp(template.as_mut_ptr().cast()) };
        if made.is_null() {
            return Err(std::io::Error::last_os_error());
        }
        template.pop();
        Ok(PrivateDir(PathBuf::from(std::ffi::OsStr::from_bytes(&template))))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
