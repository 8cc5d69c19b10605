//! Live migration between two VMMs (docs/migration.md): [`source::migrate`] sends a
//! running (or sync-paused) VM, [`incoming::receive`] takes one in for `vmm run
//! --incoming`. Built on the same pieces as snapshots: the dirty log (with a view of its
//! own), the saved state sections, the tracker's state.
//!
//! Pre-copy ([`precopy`], into a stream or a live snapshot), throttled when it does
//! not converge; post-copy ([`postcopy`]). Connections ([`transport`]): a Unix socket,
//! or TCP with mutual TLS 1.3 (rustls, ring; plain TCP only with
//! `--insecure-plaintext`).
//!
//! Limits of this build: post-copy is not under the uffd engine. Over TLS: one CA bundle per side, any certificate it
//! issued is accepted as a source, no revocation; the destination takes the first
//! connection, so a peer that fails the handshake (or stays silent for
//! [`transport::HANDSHAKE_TIMEOUT`]) ends it.

pub mod addr;
pub mod incoming;
pub mod live_snapshot;
pub mod postcopy;
pub mod precopy;
pub mod source;
pub mod stream;
pub mod transport;

pub use addr::Addr;

use crate::machine::devices::SyncPoint;
use crate::storage::snapshot::Sections;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Addr(#[from] addr::Error),
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error(transparent)]
    Stream(#[from] stream::Error),
    #[error(transparent)]
    Log(#[from] crate::tracking::dirty_log::Error),
    #[error(transparent)]
    Snapshot(#[from] crate::storage::snapshot::Error),
    #[error("reading guest memory at frame {pfn:#x} failed")]
    Memory { pfn: u64 },
    #[error("saving the machine's state failed: {0}")]
    State(String),
    #[error("the destination did not commit: {0}")]
    NoCommit(String),
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the migration was cancelled; the VM goes on here")]
    Cancelled,
    #[error("the migration did not finish within {}s and was cancelled; the VM goes on here", .0.as_secs_f64())]
    Timeout(std::time::Duration),
    #[error("post-copy failed after the switch-over: {0}; the guest ran on the destination with part of its memory here, and is lost")]
    PostcopyLost(String),
    #[error("{0}")]
    Finished(String),
    #[error("{0}")]
    Unsupported(String),
}

/// Sections as one STATE payload: `u32 count`, then per section `u16 name length | name |
/// u32 length | bytes`.
pub fn encode_sections(s: &Sections) -> Vec<u8> {
    let mut out = (s.len() as u32).to_le_bytes().to_vec();
    for (name, bytes) in s {
        out.extend((name.len() as u16).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((bytes.len() as u32).to_le_bytes());
        out.extend(bytes);
    }
    out
}

/// Most sections a STATE record may hold.
const MAX_SECTIONS: u32 = 64;

/// Parses [`encode_sections`]'s output; every length is checked against what is left.
pub fn decode_sections(mut b: &[u8]) -> Result<Sections, String> {
    fn take<'a>(b: &mut &'a [u8], n: usize, what: &str) -> Result<&'a [u8], String> {
        if b.len() < n {
            return Err(format!("{what}: {n} bytes wanted, {} left", b.len()));
        }
        let (head, rest) = b.split_at(n);
        *b = rest;
        Ok(head)
    }
    let count = u32::from_le_bytes(take(&mut b, 4, "section count")?.try_into().expect("4 bytes"));
    if count > MAX_SECTIONS {
        return Err(format!("{count} sections, more than {MAX_SECTIONS}"));
    }
    let mut s = Sections::new();
    for _ in 0..count {
        let n = u16::from_le_bytes(take(&mut b, 2, "name length")?.try_into().expect("2 bytes")) as usize;
        let name = std::str::from_utf8(take(&mut b, n, "name")?).map_err(|_| "a section name is not UTF-8".to_string())?;
        let len = u32::from_le_bytes(take(&mut b, 4, "section length")?.try_into().expect("4 bytes")) as usize;
        let bytes = take(&mut b, len, name)?;
        if s.insert(name.to_string(), bytes.to_vec()).is_some() {
            return Err(format!("section {name} appears twice"));
        }
    }
    if !b.is_empty() {
        return Err(format!("{} bytes after the last section", b.len()));
    }
    Ok(s)
}

/// The sync a VM was paused at: `u32 pid | label`.
pub fn encode_pause(p: &SyncPoint) -> Vec<u8> {
    let mut out = p.pid.to_le_bytes().to_vec();
    out.extend(p.label.as_bytes());
    out
}

pub fn decode_pause(b: &[u8]) -> Result<SyncPoint, String> {
    if b.len() < 4 || b.len() > 4 + guest_abi::SYNC_LABEL_MAX {
        return Err(format!("pause section of {} bytes", b.len()));
    }
    let label = std::str::from_utf8(&b[4..]).map_err(|_| "the pause label is not UTF-8".to_string())?;
    Ok(SyncPoint { pid: u32::from_le_bytes(b[..4].try_into().expect("4 bytes")), label: label.into() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_round_trip_and_lies_are_refused() {
        let mut s = Sections::new();
        s.insert("regs".into(), vec![1, 2, 3]);
        s.insert("tracker".into(), b"{}".to_vec());
        let b = encode_sections(&s);
        assert_eq!(decode_sections(&b).unwrap(), s);
        assert!(decode_sections(&b[..b.len() - 1]).unwrap_err().contains("wanted"));
        let mut lie = b.clone();
        lie[0] = 200;
        assert!(decode_sections(&lie).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(decode_sections(&long).unwrap_err().contains("after the last"));
        let p = SyncPoint { pid: 3, label: "mid".into() };
        assert_eq!(decode_pause(&encode_pause(&p)).unwrap(), p);
        assert!(decode_pause(&[1, 2]).is_err());
    }
}
