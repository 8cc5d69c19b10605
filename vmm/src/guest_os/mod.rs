//! What the VMM knows about the guest operating system: its process table, read from
//! outside ([`process_table`]), and the workload script it runs ([`script`]).
pub mod process_table;
pub mod script;

pub use process_table::*;
