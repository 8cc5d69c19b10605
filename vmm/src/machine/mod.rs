//! The machine: guest memory, the kernel image and boot structures, the KVM VM and
//! vCPU, the port devices, and kicking a vCPU out of `KVM_RUN`. Knows nothing of
//! tracking, storage or the API.
pub mod boot;
pub mod devices;
pub mod image;
pub mod kick;
pub mod memory;
pub mod vm;
