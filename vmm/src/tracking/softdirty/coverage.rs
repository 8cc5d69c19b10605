//! Linux's VMA rule (VM_SOFTDIRTY) as the pieces of a mapping that the pid's last clear
//! covered: a page outside them is new since the clear and reads soft-dirty.

/// Linux's VMA rule over one mapping, for addresses met in increasing order: a page the
/// mapping's namesake at the pid's last clear did not cover reads soft-dirty.
pub struct Coverage {
    /// Covered spans, sorted and merged.
    spans: Vec<(u64, u64)>,
    next: usize,
}

impl Coverage {
    pub fn new(mut spans: Vec<(u64, u64)>) -> Coverage {
        spans.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
        for (s, e) in spans {
            match merged.last_mut() {
                Some(l) if s <= l.1 => l.1 = l.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        Coverage { spans: merged, next: 0 }
    }

    /// Is `va` new since the clear (not covered), and up to where that holds. `va` never
    /// goes down between calls.
    #[inline]
    pub fn at(&mut self, va: u64) -> (bool, u64) {
        while self.next < self.spans.len() && self.spans[self.next].1 <= va {
            self.next += 1;
        }
        match self.spans.get(self.next) {
            Some(&(s, e)) if s <= va => (false, e),
            Some(&(s, _)) => (true, s),
            None => (true, u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vma_rule_is_read_in_address_order_across_merged_spans() {
        let mut c = Coverage::new(vec![(0x5000, 0x8000), (0x1000, 0x3000), (0x2000, 0x4000)]);
        assert_eq!(c.at(0x0), (true, 0x1000));
        assert_eq!(c.at(0x1000), (false, 0x4000), "overlapping spans merge");
        assert_eq!(c.at(0x3fff), (false, 0x4000));
        assert_eq!(c.at(0x4000), (true, 0x5000));
        assert_eq!(c.at(0x7000), (false, 0x8000));
        assert_eq!(c.at(0x8000), (true, u64::MAX));
        assert_eq!(Coverage::new(Vec::new()).at(0x1000), (true, u64::MAX), "never cleared: all new");
    }
}
