//! A set of guest RAM frames, built from page-table leaves the guest controls.
//!
//! Leaves are untrusted: a 1 GiB leaf may claim frames far past the end of RAM, and a
//! guest can make thousands of leaves claim the same frames. A `FrameSet` therefore
//! - keeps only frames inside guest RAM (what lies past the end is not memory the host
//!   has: it is never handed to KVM or `mprotect`), and
//! - adds a large leaf's frames once per distinct large page: a second 2 MiB or 1 GiB
//!   leaf on the same block costs one bit test.
//!
//! So building a set from any number of leaves costs O(leaves + RAM frames / 64) and
//! O(RAM frames / 8) bytes, whatever the guest's tables claim.

/// Frames of one leaf as the guest claims them: first frame number and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeafFrames {
    pub pfn: u64,
    pub count: u64,
}

/// The part of `[pfn, pfn + count)` inside a RAM of `ram_pages` frames, if any.
pub fn clamp_to_ram(pfn: u64, count: u64, ram_pages: u64) -> Option<(u64, u64)> {
    if pfn >= ram_pages {
        return None;
    }
    Some((pfn, count.min(ram_pages - pfn)))
}

#[derive(Debug, Clone)]
pub struct FrameSet {
    pages: u64,
    bits: Vec<u64>,
    /// 2 MiB and 1 GiB blocks already added whole (deduplicates large leaves).
    blocks_2m: Vec<u64>,
    blocks_1g: Vec<u64>,
}

const FRAMES_2M: u64 = 512;
const FRAMES_1G: u64 = 512 * 512;

fn test_and_set(bits: &mut [u64], i: u64) -> bool {
    let (w, b) = ((i / 64) as usize, 1u64 << (i % 64));
    let was = bits[w] & b != 0;
    bits[w] |= b;
    was
}

impl FrameSet {
    /// An empty set over a RAM of `pages` frames.
    pub fn new(pages: u64) -> FrameSet {
        FrameSet {
            pages,
            bits: vec![0; pages.div_ceil(64) as usize],
            blocks_2m: vec![0; pages.div_ceil(FRAMES_2M).div_ceil(64) as usize],
            blocks_1g: vec![0; pages.div_ceil(FRAMES_1G).div_ceil(64) as usize],
        }
    }

    /// Frames of guest RAM this set ranges over.
    pub fn ram_pages(&self) -> u64 {
        self.pages
    }

    /// Adds the in-RAM frames of a leaf. A 2 MiB or 1 GiB leaf's frames are added once
    /// per block, however many leaves name it.
    pub fn insert_leaf(&mut self, leaf: LeafFrames) {
        let Some((pfn, count)) = clamp_to_ram(leaf.pfn, leaf.count, self.pages) else { return };
        let dedup = match leaf.count {
            FRAMES_2M if pfn % FRAMES_2M == 0 => Some((&mut self.blocks_2m, pfn / FRAMES_2M)),
            FRAMES_1G if pfn % FRAMES_1G == 0 => Some((&mut self.blocks_1g, pfn / FRAMES_1G)),
            _ => None,
        };
        if let Some((blocks, index)) = dedup {
            if test_and_set(blocks, index) {
                return;
            }
        }
        self.insert_range(pfn, count);
    }

    /// Adds `[pfn, pfn + count)`, clamped to RAM, word by word.
    pub fn insert_range(&mut self, pfn: u64, count: u64) {
        let Some((mut p, count)) = clamp_to_ram(pfn, count, self.pages) else { return };
        let end = p + count;
        while p < end {
            let (w, bit) = ((p / 64) as usize, p % 64);
            let n = (64 - bit).min(end - p);
            let mask = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << bit };
            self.bits[w] |= mask;
            p += n;
        }
    }

    /// Adds the frames set in `words` (one bit per frame from frame 0, KVM's layout);
    /// bits past the end of RAM are ignored.
    pub fn insert_words(&mut self, words: &[u64]) {
        for (mine, w) in self.bits.iter_mut().zip(words) {
            *mine |= w;
        }
        self.trim();
    }

    /// Every frame of RAM.
    pub fn fill(&mut self) {
        self.bits.iter_mut().for_each(|w| *w = u64::MAX);
        self.trim();
    }

    /// Clears the bits of the last word that lie past the end of RAM.
    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.bits.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }

    /// Takes `pfn` out of the set (nothing if it is past the end of RAM).
    pub fn remove(&mut self, pfn: u64) {
        if pfn < self.pages {
            self.bits[(pfn / 64) as usize] &= !(1 << (pfn % 64));
        }
    }

    pub fn contains(&self, pfn: u64) -> bool {
        pfn < self.pages && self.bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|&w| w == 0)
    }

    pub fn len(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// One bit per RAM frame, from frame 0 (KVM's dirty-bitmap layout).
    pub fn words(&self) -> &[u64] {
        &self.bits
    }

    /// How many frames of the set are also set in `other` (a bitmap of the same layout).
    pub fn count_in(&self, other: &[u64]) -> u64 {
        self.bits.iter().zip(other).map(|(a, b)| u64::from((a & b).count_ones())).sum()
    }

    /// Maximal runs of consecutive frames, as (first pfn, count), in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut p = 0u64;
        std::iter::from_fn(move || {
            // Skip clear frames a word at a time.
            while p < self.pages {
                let (w, bit) = ((p / 64) as usize, p % 64);
                let word = self.bits[w] >> bit;
                if word == 0 {
                    p += 64 - bit;
                    continue;
                }
                p += u64::from(word.trailing_zeros());
                break;
            }
            if p >= self.pages {
                return None;
            }
            let start = p;
            while p < self.pages {
                let (w, bit) = ((p / 64) as usize, p % 64);
                let ones = u64::from((!(self.bits[w] >> bit)).trailing_zeros()).min(64 - bit);
                p += ones;
                if bit + ones < 64 {
                    break;
                }
            }
            let end = p.min(self.pages);
            p = end;
            Some((start, end - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_clamped_to_ram() {
        let mut s = FrameSet::new(1000);
        s.insert_leaf(LeafFrames { pfn: 0, count: FRAMES_1G });
        assert_eq!(s.len(), 1000, "a 1 GiB leaf at frame 0 covers all of a smaller RAM, no more");
        let mut s = FrameSet::new(1000);
        s.insert_leaf(LeafFrames { pfn: 999, count: 2 });
        s.insert_leaf(LeafFrames { pfn: 1000, count: 1 });
        s.insert_leaf(LeafFrames { pfn: u64::MAX, count: u64::MAX });
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![(999, 1)]);
        assert_eq!(clamp_to_ram(5, u64::MAX, 10), Some((5, 5)));
        assert_eq!(clamp_to_ram(10, 1, 10), None);
    }

    #[test]
    fn repeated_large_leaves_cost_one_bit_test() {
        let mut s = FrameSet::new(4 * FRAMES_1G);
        for _ in 0..100_000 {
            s.insert_leaf(LeafFrames { pfn: FRAMES_1G, count: FRAMES_1G });
            s.insert_leaf(LeafFrames { pfn: 3 * FRAMES_2M, count: FRAMES_2M });
        }
        assert_eq!(s.len(), FRAMES_1G + FRAMES_2M);
        assert!(s.contains(FRAMES_1G) && s.contains(2 * FRAMES_1G - 1) && !s.contains(2 * FRAMES_1G));
    }

    #[test]
    fn runs_and_counts() {
        let mut s = FrameSet::new(300);
        for (p, n) in [(0, 1), (2, 3), (63, 2), (100, 64), (200, 100)] {
            s.insert_range(p, n);
        }
        assert_eq!(s.runs().collect::<Vec<_>>(), vec![(0, 1), (2, 3), (63, 2), (100, 64), (200, 100)]);
        assert_eq!(s.len(), 1 + 3 + 2 + 64 + 100);
        let mut other = vec![0u64; 5];
        other[0] = 0b101; // frames 0 and 2
        assert_eq!(s.count_in(&other), 2);
        assert!(FrameSet::new(10).runs().next().is_none());
        let mut full = FrameSet::new(130);
        full.insert_range(0, 130);
        assert_eq!(full.runs().collect::<Vec<_>>(), vec![(0, 130)]);
    }
}
