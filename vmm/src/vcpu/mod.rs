//! The vCPU thread: the loop that enters the guest and handles its exits ([`runner`]),
//! and the state it shares with everyone else ([`control`]).
pub mod control;
pub mod runner;

pub use runner::Outcome;
