//! Kernel-global state on a single vCPU.

use core::cell::UnsafeCell;

/// A global touched only by ring 0, which runs on one vCPU with interrupts off and
/// never re-enters itself: so at most one `&mut` is live at a time.
#[repr(transparent)]
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: there is one vCPU and ring 0 is never interrupted (IF=0, no nested traps),
// so accesses are never concurrent.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Global(UnsafeCell::new(value))
    }

    /// A raw pointer, for touching one field while a reference to another part is live.
    pub const fn as_ptr(&self) -> *mut T {
        self.0.get()
    }

    /// # Safety
    /// Ring 0 only, and the caller must not hold another reference from this `Global`.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn get(&self) -> &mut T {
        // SAFETY: exclusive by the caller's contract (see the `Sync` impl).
        unsafe { &mut *self.0.get() }
    }
}
