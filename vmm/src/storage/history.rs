//! What this VM's next snapshot or dump needs to know of the earlier ones. Creation
//! returns what it adds ([`crate::storage::snapshot::Last`],
//! [`crate::storage::dump::Last`]); the owner of the VM keeps one `History` and
//! records those here.

use crate::storage::{dump, snapshot};
use std::collections::HashMap;

/// One VM's snapshot and dump history.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// SHA-256 of the guest image ([`snapshot::sha256_hex`]): every snapshot records it.
    pub image_sha256: String,
    /// The last snapshot written or restored: the base of the next diff.
    pub last_snapshot: Option<snapshot::Last>,
    /// Each pid's latest dump: the only valid `--prev` of its next one.
    pub dumps: HashMap<u32, dump::Last>,
    /// A live snapshot stopped the guest and is being committed: until it is, no other
    /// snapshot can know its base.
    pub live_snapshot_committing: bool,
}

impl History {
    /// A VM booted (or restored) from the image with this SHA-256, with no snapshot yet.
    pub fn new(image_sha256: String) -> History {
        History { image_sha256, ..History::default() }
    }

    /// The base a new snapshot is a diff against: none for a full one, the last
    /// snapshot for a diff ([`snapshot::Error::NoBase`] if there is none).
    pub fn snapshot_base(&self, diff: bool) -> Result<Option<&snapshot::Last>, snapshot::Error> {
        if self.live_snapshot_committing {
            return Err(snapshot::Error::LiveCommitting);
        }
        if diff { self.last_snapshot.as_ref().map(Some).ok_or(snapshot::Error::NoBase) } else { Ok(None) }
    }
}
