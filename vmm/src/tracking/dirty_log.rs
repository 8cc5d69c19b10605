//! Guest-physical dirty tracking: which guest frames were written, by whichever
//! [`DirtySource`] the engine runs, plus the VMM's own writes, which KVM does not log
//! (the RAM reports them: [`Ram::take_vmm_writes`]).
//!
//! [`GpaLog`] keeps `accumulated`: per frame, "written since this frame was last
//! cleared". Harvests OR into it and only an explicit clear resets a bit, so reading the
//! log never loses information. `window` is the same since the last
//! [`GpaLog::window_start`] (for dirty rates), `snap` since the last snapshot.

use super::frame_set::FrameSet;
use super::ram::Ram;
use super::source::{self, Cause, DirtySource};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Source(#[from] source::Error),
    #[error(transparent)]
    Ram(#[from] super::ram::Error),
}

/// Counters for `vmm info`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LogStats {
    pub harvests: u64,
    /// Frame bits reported by the mechanism (a frame may count again after a clear).
    pub frames_harvested: u64,
    pub vmm_writes_harvested: u64,
    pub ioctls: u64,
    pub harvest_ns: u64,
    /// Dirty-ring harvests that found the ring completely full (everything then counts
    /// as written).
    pub ring_overflows: u64,
}

/// One bit per guest frame from frame 0.
type Bits = Vec<u64>;

fn test(bits: &[u64], pfn: u64) -> bool {
    bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
}

/// Frames written since their last clear, read-only: [`GpaLog::dirty_bits`].
#[derive(Debug, Clone, Copy)]
pub struct DirtyBits<'a> {
    words: &'a [u64],
    pages: u64,
}

impl DirtyBits<'_> {
    #[inline]
    pub fn is_dirty(&self, pfn: u64) -> bool {
        pfn < self.pages && test(self.words, pfn)
    }

    /// True whenever [`Self::is_dirty`] is; may also be true for a frame past the end of
    /// RAM (the last word's spare bits). No test against the end of RAM, only against
    /// the end of the words.
    #[inline(always)]
    pub fn may_be_dirty(&self, pfn: u64) -> bool {
        let word = self.words.get((pfn / 64) as usize).copied().unwrap_or(0);
        (word >> (pfn % 64)) & 1 != 0
    }

    /// Any of `[pfn, pfn + count)` written; frames past the end of RAM never are.
    #[inline]
    pub fn any_dirty(&self, pfn: u64, count: u64) -> bool {
        if count == 1 {
            return self.is_dirty(pfn);
        }
        (pfn..pfn.saturating_add(count).min(self.pages)).any(|p| test(self.words, p))
    }
}

pub struct GpaLog {
    pages: u64,
    accumulated: Bits,
    window: Bits,
    /// Written since the last snapshot of the VM (all set until the first).
    snap: Bits,
    /// A migration's own view: written since its last take. `None` when no migration
    /// runs. Nothing else reads or clears it, and it clears nothing of the others.
    migration: Option<Bits>,
    source: Box<dyn DirtySource>,
    pub stats: LogStats,
}

impl GpaLog {
    /// `initially_dirty`: the history before the first clear is unknown (KVM bitmap with
    /// INITIALLY_SET), so every frame counts as written until cleared.
    pub fn new(mem_size: u64, source: Box<dyn DirtySource>, initially_dirty: bool) -> GpaLog {
        let pages = mem_size / 4096;
        let words = pages.div_ceil(64) as usize;
        let fill = if initially_dirty { u64::MAX } else { 0 };
        GpaLog {
            pages,
            accumulated: vec![fill; words],
            window: vec![0; words],
            snap: vec![u64::MAX; words],
            migration: None,
            source,
            stats: LogStats::default(),
        }
    }

    /// The mechanism's name (`vmm info`).
    pub fn mechanism(&self) -> &'static str {
        self.source.name()
    }

    /// Frames covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Adds `written` to every view of the log. Returns how many frames it held.
    fn record(&mut self, written: &FrameSet) -> u64 {
        let mut n = 0;
        let views = self.accumulated.iter_mut().zip(self.window.iter_mut()).zip(self.snap.iter_mut());
        for (((a, w), s), &b) in views.zip(written.words()) {
            *a |= b;
            *w |= b;
            *s |= b;
            n += u64::from(b.count_ones());
        }
        if let Some(m) = &mut self.migration {
            for (m, &b) in m.iter_mut().zip(written.words()) {
                *m |= b;
            }
        }
        n
    }

    /// Harvests after a ring-full exit.
    pub fn harvest_ring_full(&mut self, ram: &impl Ram) -> Result<(), Error> {
        self.harvest_for(Cause::RingFull, ram)
    }

    /// Pulls new writes from the source and from the VMM's own writes.
    pub fn harvest(&mut self, ram: &impl Ram) -> Result<(), Error> {
        self.harvest_for(Cause::Read, ram)
    }

    fn harvest_for(&mut self, cause: Cause, ram: &impl Ram) -> Result<(), Error> {
        let t0 = std::time::Instant::now();
        let mut written = FrameSet::new(self.pages);
        let h = self.source.harvest(cause, &mut written)?;
        if h.overflowed {
            // Entries may have been lost: never miss a write.
            written.fill();
            self.stats.ring_overflows += 1;
        }
        self.stats.ioctls += h.ioctls;
        self.stats.frames_harvested += self.record(&written);
        let mut vmm = FrameSet::new(self.pages);
        ram.take_vmm_writes(&mut vmm);
        self.stats.vmm_writes_harvested += self.record(&vmm);
        self.stats.harvests += 1;
        self.stats.harvest_ns += t0.elapsed().as_nanos() as u64;
        Ok(())
    }

    pub fn is_dirty(&self, pfn: u64) -> bool {
        self.dirty_bits().is_dirty(pfn)
    }

    /// Any of `[pfn, pfn + count)` written; frames past the end of RAM never are.
    pub fn any_dirty(&self, pfn: u64, count: u64) -> bool {
        self.dirty_bits().any_dirty(pfn, count)
    }

    /// The accumulated bits, to test many frames (a copyable view a loop keeps in
    /// registers).
    pub fn dirty_bits(&self) -> DirtyBits<'_> {
        DirtyBits { words: &self.accumulated, pages: self.pages }
    }

    /// The window's bits, one per frame from frame 0.
    pub fn window_words(&self) -> &[u64] {
        &self.window
    }

    pub fn in_window(&self, pfn: u64) -> bool {
        pfn < self.pages && test(&self.window, pfn)
    }

    /// Written since the last snapshot (call [`Self::harvest`] first).
    pub fn in_snapshot(&self, pfn: u64) -> bool {
        pfn < self.pages && test(&self.snap, pfn)
    }

    /// A snapshot was written: the next diff starts from here, and the source reports
    /// the next write of every frame.
    pub fn snapshot_start(&mut self) -> Result<(), Error> {
        self.stats.ioctls += self.source.rearm_all()?;
        self.snap.iter_mut().for_each(|w| *w = 0);
        Ok(())
    }

    /// A snapshot's moment is now, but it is not on disk yet (a live snapshot): the next
    /// diff starts from here, and the view as it was is returned, for
    /// [`Self::snapshot_undo_restart`] should the snapshot fail. Call after a harvest.
    pub fn snapshot_restart(&mut self) -> Result<FrameSet, Error> {
        let mut was = FrameSet::new(self.pages);
        was.insert_words(&self.snap);
        self.snapshot_start()?;
        Ok(was)
    }

    /// The snapshot that [`Self::snapshot_restart`] began failed: the view gets back
    /// what it held then (what was written since joins it).
    pub fn snapshot_undo_restart(&mut self, was: &FrameSet) {
        for (w, old) in self.snap.iter_mut().zip(was.words()) {
            *w |= old;
        }
    }

    /// The accumulated bits (for saving in a snapshot).
    pub fn accumulated(&self) -> &[u64] {
        &self.accumulated
    }

    /// Restores accumulated bits saved in a snapshot (lengths must match).
    pub fn set_accumulated(&mut self, bits: Vec<u64>) -> bool {
        if bits.len() != self.accumulated.len() {
            return false;
        }
        self.accumulated = bits;
        true
    }

    /// Frames written since the window started (all of guest memory).
    pub fn window_count(&self) -> u64 {
        self.window.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Clears the frames except those in `keep` (call [`Self::harvest`] first so nothing
    /// pending is lost) and makes sure the source reports the next write of every one of
    /// `frames`. With the KVM bitmap this is one `KVM_CLEAR_DIRTY_LOG`, which also makes
    /// KVM re-read the guest PTEs mapping them. `keep`: frames that someone else still
    /// reads from the log (another process maps them): re-armed, not forgotten.
    pub fn clear(&mut self, frames: &FrameSet, keep: &FrameSet) -> Result<(), Error> {
        if frames.is_empty() {
            return Ok(());
        }
        debug_assert_eq!(frames.ram_pages(), self.pages, "a frame set over this guest's RAM");
        debug_assert_eq!(keep.ram_pages(), self.pages, "a frame set over this guest's RAM");
        for ((acc, clear), keep) in self.accumulated.iter_mut().zip(frames.words()).zip(keep.words()) {
            *acc &= !(clear & !keep);
        }
        self.stats.ioctls += self.source.rearm(frames)?;
        Ok(())
    }

    /// A migration starts: from now on its own view collects every write (the guest's,
    /// through whichever source runs, and the VMM's), and every frame is re-armed so the
    /// source reports the next write of each. The other views are untouched.
    pub fn migration_begin(&mut self, ram: &impl Ram) -> Result<(), Error> {
        self.harvest(ram)?;
        self.stats.ioctls += self.source.rearm_all()?;
        self.migration = Some(vec![0; self.accumulated.len()]);
        Ok(())
    }

    /// The frames written since the migration's previous take (or its start), forgotten
    /// by its view and re-armed *before* they are sent, so that a write during the send
    /// shows in the next take. Call with the guest stopped.
    pub fn migration_take(&mut self, ram: &impl Ram) -> Result<FrameSet, Error> {
        self.harvest(ram)?;
        let mut taken = FrameSet::new(self.pages);
        if let Some(m) = &mut self.migration {
            taken.insert_words(m);
            m.iter_mut().for_each(|w| *w = 0);
        }
        self.stats.ioctls += self.source.rearm(&taken)?;
        Ok(taken)
    }

    /// Frames the migration's view holds now (after a harvest), without taking them.
    pub fn migration_pending(&mut self, ram: &impl Ram) -> Result<u64, Error> {
        self.harvest(ram)?;
        Ok(self.migration.as_ref().map_or(0, |m| m.iter().map(|w| u64::from(w.count_ones())).sum()))
    }

    /// The migration is over (done, failed or cancelled): its view goes away. Whatever
    /// it held stays in the other views, which it never consumed.
    pub fn migration_end(&mut self) {
        self.migration = None;
    }

    /// Starts a new dirty-rate window: everything written so far is harvested, then
    /// forgotten by the window (not by `accumulated`).
    pub fn window_start(&mut self, ram: &impl Ram) -> Result<(), Error> {
        self.harvest(ram)?;
        self.stats.ioctls += self.source.rearm_all()?;
        self.window.iter_mut().for_each(|w| *w = 0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_sees_every_write_and_disturbs_no_other_view() {
        let source = Manual::default();
        let mut d = GpaLog::new(1 << 20, Box::new(source.clone()), false);
        let ram = TestRam::new(1 << 20);
        source.write(1, 1);
        d.migration_begin(&ram).unwrap();
        assert_eq!(source.rearmed_all(), 1, "every frame re-armed at the start");
        source.write(5, 2);
        ram.vmm_wrote(9);
        assert_eq!(d.migration_pending(&ram).unwrap(), 3);
        let taken = d.migration_take(&ram).unwrap();
        assert_eq!(taken.runs().collect::<Vec<_>>(), vec![(5, 2), (9, 1)]);
        assert_eq!(source.rearmed(), 3, "re-armed before being sent");
        assert!(d.migration_take(&ram).unwrap().is_empty());
        d.migration_end();
        for pfn in [1, 5, 6, 9] {
            assert!(d.is_dirty(pfn) && d.in_window(pfn) && d.in_snapshot(pfn), "pfn {pfn} still in every other view");
        }
    }
    use crate::tracking::ram::testing::{Manual, TestRam};

    #[test]
    fn accumulated_bits_start_as_told_and_clear_per_frame() {
        let d = GpaLog::new(1 << 20, Box::new(Manual::default()), true);
        assert!(d.is_dirty(0) && d.is_dirty(255) && !d.is_dirty(256));
        let source = Manual::default();
        let mut d = GpaLog::new(1 << 20, Box::new(source.clone()), false);
        let ram = TestRam::new(1 << 20);
        assert!(!d.any_dirty(0, 256));
        source.write(3, 2);
        d.harvest(&ram).unwrap();
        assert!(d.is_dirty(3) && d.is_dirty(4) && !d.is_dirty(5));
        assert!(d.any_dirty(0, 4) && !d.any_dirty(5, 100));
        assert_eq!(d.window_count(), 2);
        source.write(250, 100);
        d.harvest(&ram).unwrap();
        assert_eq!(d.stats.frames_harvested, 8, "clipped to memory");
        let mut f = FrameSet::new(256);
        f.insert_range(3, 1);
        d.clear(&f, &FrameSet::new(f.ram_pages())).unwrap();
        assert!(!d.is_dirty(3) && d.is_dirty(4));
        assert_eq!(source.rearmed(), 1, "the source re-arms what was cleared");
    }

    #[test]
    fn vmm_writes_count_and_overflow_marks_everything() {
        let source = Manual::default();
        let mut d = GpaLog::new(1 << 20, Box::new(source.clone()), false);
        let ram = TestRam::new(1 << 20);
        ram.vmm_wrote(7);
        d.harvest(&ram).unwrap();
        assert!(d.is_dirty(7) && d.in_window(7) && d.in_snapshot(7));
        assert_eq!((d.stats.frames_harvested, d.stats.vmm_writes_harvested), (0, 1));
        source.overflow();
        d.harvest(&ram).unwrap();
        assert!((0..256).all(|p| d.is_dirty(p)), "a lost entry may be any frame");
        assert_eq!(d.stats.ring_overflows, 1);
    }
}
