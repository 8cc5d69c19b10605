//! The main job's view: at every `sync`, one line for the process that reached it saying
//! how many of its mapped pages were written since its previous sync, then a clear of
//! that process — incremental tracking in one command.
//!
//! Only the syncing process is reported: its work between two of its own syncs happens
//! in program order, so the counts cannot depend on when the guest's timer preempted it.
//! Another process's state at that moment depends on how far the scheduler let it run.

use crate::machine::devices::SyncPoint;
use crate::vcpu::runner::{SyncHook, VcpuContext};
use crate::tracking::softdirty::ClearRefs;

/// Prints `sync LABEL: pid N NAME: M mapped, K soft-dirty` for the process at the sync,
/// then clears its soft-dirty bits.
pub struct SummaryHook;

impl SyncHook for SummaryHook {
    fn at_sync(&mut self, ctx: &mut VcpuContext, point: &SyncPoint) {
        let t = &mut ctx.tracker;
        let snap = match t.snapshot(&ctx.mem) {
            Ok(s) => s,
            Err(e) => return eprintln!("vmm: summary at sync {}: {e}", point.label),
        };
        let Some(p) = snap.processes.iter().find(|p| p.pid == point.pid && p.is_live()) else {
            return eprintln!("vmm: summary at sync {}: pid {} is not a live process", point.label, point.pid);
        };
        let result = t.pagemap(&ctx.mem, p.pid, None).and_then(|pages| {
            let dirty = pages.iter().filter(|pg| pg.entry.soft_dirty()).count();
            println!("sync {}: pid {} {}: {} mapped, {} soft-dirty", point.label, p.pid, p.name, pages.len(), dirty);
            t.clear_refs(&ctx.mem, &ctx.vcpu, p.pid, ClearRefs::SoftDirty)
        });
        if let Err(e) = result {
            eprintln!("vmm: summary at sync {}: pid {}: {e}", point.label, p.pid);
        }
    }
}

/// Either hook, chosen at run time.
pub enum Hook {
    None,
    Summary(SummaryHook),
}

impl SyncHook for Hook {
    fn at_sync(&mut self, ctx: &mut VcpuContext, point: &SyncPoint) {
        if let Hook::Summary(h) = self {
            h.at_sync(ctx, point);
        }
    }
}
