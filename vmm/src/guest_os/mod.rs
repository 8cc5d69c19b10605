//! What the VMM knows about the guest operating system: its process table, read from
//! outside ([`process_table`]), the workload script it runs ([`script`]), and Linux
//! programs it runs as processes ([`linux`]).
pub mod le;
pub mod linux;
pub mod process_table;
pub mod script;

pub use process_table::*;
