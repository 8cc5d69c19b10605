//! What the VMM writes to disk: whole-VM snapshots, per-process dumps, and what both
//! build on (manifests and chains, durable directory writes, checksums, progress
//! reports). Creating a snapshot or dump takes what it writes (guest memory, the
//! stopped vCPU and VM, the dirty log, the saved device and tracker state) and returns
//! what the next one builds on, which the VM's owner keeps in a [`History`].
pub mod chain;
pub mod checksum;
pub mod dump;
pub mod durable;
pub mod history;
pub mod progress;
pub mod snapshot;

pub use history::History;
