//! softdirty-vmm: a small KVM VMM that runs the project's guest kernel and answers,
//! from outside, which memory each guest process changed.
//!
//! The folders are the layers, each using only those listed before it:
//!
//! | folder | what lives there |
//! |---|---|
//! | [`machine`] | guest memory, kernel image, boot structures, the KVM VM and vCPU, port devices |
//! | [`guest_os`] | the guest kernel's process table read from outside; workload scripts |
//! | [`tracking`] | engines, guest-physical dirty sources, frame sets, the soft-dirty tracker |
//! | [`storage`] | snapshots, per-process dumps, durable writes, checksums, progress |
//! | [`vcpu`] | the vCPU loop and the state it shares with other threads |
//! | [`api`] | the control-socket protocol, its server and its client |
//! | [`run`](mod@run) | `vmm run` assembled from all of the above; the summary; `vmm scenario` and the `vmm run` child it drives |
//!
//! Entry points: [`run::run`] with [`RunOptions`], [`api`]'s client for talking to a
//! running VMM, and the storage readers for snapshots and dumps on disk.
pub mod api;
pub mod exit_code;
pub mod guest_os;
pub mod input;
pub mod machine;
pub mod migration;
pub mod plot;
pub mod run;
pub mod storage;
pub mod tracking;
pub mod unix_socket;
pub mod vcpu;

pub use exit_code::ExitCode;
pub use run::{run, RunOptions};
pub use tracking::EngineKind;
pub use vcpu::Outcome;
