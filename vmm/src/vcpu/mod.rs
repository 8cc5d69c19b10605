//! The vCPU thread: the loop that enters the guest and handles its exits ([`runner`]),
//! the state it shares with everyone else ([`control`]), and the throttle that holds it
//! out of the guest for a share of the time ([`throttle`]).
pub mod control;
pub mod linux_proc;
pub mod runner;
pub mod throttle;

pub use runner::Outcome;
