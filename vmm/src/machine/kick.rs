//! Interrupting a vCPU thread that sits in `KVM_RUN`: a real-time signal with an empty
//! handler makes the ioctl return `EINTR`. A signal that arrives outside `KVM_RUN` is
//! lost, so kickers set a flag first and re-send until the vCPU thread has seen it.

use std::sync::Once;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

fn signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the handler (idempotent). Must run before the first kick.
pub fn install() -> Result<(), vmm_sys_util::errno::Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = register_signal_handler(signal(), on_kick));
    result
}

/// A handle to kick one thread.
#[derive(Debug, Clone, Copy)]
pub struct Kicker(libc::pthread_t);

impl Kicker {
    /// For the calling thread.
    pub fn current() -> Self {
        // SAFETY: pthread_self has no preconditions.
        Kicker(unsafe { libc::pthread_self() })
    }

    pub fn kick(&self) {
        // SAFETY: the thread id was taken from a live thread that outlives every kicker
        // (the run joins its helper threads before the vCPU thread ends); the handler is
        // installed before any kick.
        unsafe { libc::pthread_kill(self.0, signal()) };
    }
}
