//! What the VMM writes to disk: whole-VM snapshots, per-process dumps, and what both
//! build on (durable directory writes, checksums, progress reports).
pub mod checksum;
pub mod dump;
pub mod durable;
pub mod progress;
pub mod snapshot;
