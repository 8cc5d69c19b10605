//! softdirty-vmm: a small KVM VMM that runs the project's guest kernel and answers,
//! from outside, which memory each guest process changed.
//!
//! Assembly of a run (see `run::run`): guest memory ([`memory`]) → kernel image and boot
//! structures ([`image`], [`boot`]) → KVM VM and vCPU ([`vm`]) → the vCPU loop with its
//! port devices ([`runner`], [`devices`]) → the control socket ([`control`]).
pub mod api;
pub mod boot;
pub mod checksum;
pub mod control;
pub mod devices;
pub mod engine;
pub mod dirty_log;
pub mod dirty_ring;
pub mod dump;
pub mod durable;
pub mod exit_code;
pub mod frame_set;
pub mod guest_os;
pub mod image;
pub mod kick;
pub mod memory;
pub mod pf_trap;
pub mod progress;
pub mod run;
pub mod runner;
pub mod scenario_exec;
pub mod script;
pub mod snapshot;
pub mod softdirty;
pub mod summary;
pub mod uffd;
pub mod vm;
