use super::*;
use crate::memory::SliceMemory;

const P: u64 = 1;
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const PWU: u64 = P | W | U;

fn mem(pages: usize) -> SliceMemory {
    SliceMemory::new(vec![0; pages * 4096])
}

/// PML4 at 0x1000, PDPT 0x2000, PD 0x3000, PT 0x4000 covering va 0..2 MiB.
fn basic() -> SliceMemory {
    let mut m = mem(64);
    m.set(0x1000, 0x2000 | PWU);
    m.set(0x2000, 0x3000 | PWU);
    m.set(0x3000, 0x4000 | PWU);
    m
}

fn leaves(w: &Walker, m: &SliceMemory, root: u64, start: u64, pages: u64) -> (Vec<WalkItem>, WalkStats) {
    let mut out = Vec::new();
    let stats = w.walk_range(m, GuestPhysAddr(root), GuestVirtAddr(start), pages, &mut |i| out.push(i)).unwrap();
    (out, stats)
}

#[test]
fn translates_4k_2m_and_1g_pages() {
    let mut m = basic();
    m.set(0x4000 + 5 * 8, 0x9000 | PWU);
    m.set(0x3000 + 8, 0x20_0000 | PWU | PS); // PD[1]: 2 MiB page at va 2 MiB
    m.set(0x2000 + 8, 0x4000_0000 | P | PS); // PDPT[1]: 1 GiB page at va 1 GiB
    let w = Walker::new(PagingMode::Level4);
    let t = |va| w.translate(&m, GuestPhysAddr(0x1000), GuestVirtAddr(va)).unwrap();
    match t(0x5abc) {
        Translation::Mapped { frame, offset, leaf } => {
            assert_eq!((frame, offset, leaf.size, leaf.level), (GuestPhysAddr(0x9000), 0xabc, PageSize::Size4K, 1));
            assert!(leaf.user_writable());
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(t(0x20_1234), Translation::Mapped { frame: GuestPhysAddr(0x20_0000), offset: 0x1234, .. }));
    match t(0x4000_0000 + 0x12_3456) {
        Translation::Mapped { frame, offset, leaf } => {
            assert_eq!((frame, offset, leaf.size), (GuestPhysAddr(0x4000_0000), 0x12_3456, PageSize::Size1G));
            assert!(!leaf.user_writable());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(t(0x6000), Translation::NotMapped { level: 1 });
    assert_eq!(t(0x8000_0000), Translation::NotMapped { level: 3 });
    assert_eq!(t(0x80_0000_0000), Translation::NotMapped { level: 4 });
}

#[test]
fn kernel_half_addresses_are_sign_extended() {
    let mut m = mem(64);
    m.set(0x1000 + 511 * 8, 0x2000 | P | W);
    m.set(0x2000 + 510 * 8, 0x3000 | P | W);
    m.set(0x3000, 0x4000 | P | W);
    m.set(0x4000, 0x7000 | P | W);
    let w = Walker::new(PagingMode::Level4);
    let t = w.translate(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0xffff_ffff_8000_0010)).unwrap();
    assert!(matches!(t, Translation::Mapped { frame: GuestPhysAddr(0x7000), offset: 0x10, .. }));
    let (items, _) = leaves(&w, &m, 0x1000, 0xffff_ffff_8000_0000, 4);
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].unwrap().va, GuestVirtAddr(0xffff_ffff_8000_0000));
    let err = w.translate(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0x0000_8000_0000_0000)).unwrap_err();
    assert_eq!(err, WalkError::NonCanonical(GuestVirtAddr(0x0000_8000_0000_0000)));
}

#[test]
fn five_level_paging() {
    let mut m = mem(64);
    m.set(0x1000 + 8, 0x2000 | PWU); // PML5[1]: va 1 << 48
    m.set(0x2000, 0x3000 | PWU);
    m.set(0x3000, 0x4000 | PWU);
    m.set(0x4000, 0x5000 | PWU);
    m.set(0x5000, 0x8000 | PWU);
    let w = Walker::new(PagingMode::Level5);
    let t = w.translate(&m, GuestPhysAddr(0x1000), GuestVirtAddr(1 << 48)).unwrap();
    assert!(matches!(t, Translation::Mapped { frame: GuestPhysAddr(0x8000), .. }));
    assert_eq!(PagingMode::Level5.user_top(), 1 << 56);
}

#[test]
fn range_walk_reports_leaves_in_order_including_large_pages() {
    let mut m = basic();
    for i in [0u64, 1, 7, 511] {
        m.set(0x4000 + i * 8, (0x10_000 + i * 0x1000) | PWU);
    }
    m.set(0x3000 + 8, 0x20_0000 | PWU | PS);
    let w = Walker::new(PagingMode::Level4);
    let (items, stats) = leaves(&w, &m, 0x1000, 0x1000, 1024);
    let got: Vec<(u64, PageSize)> = items.iter().map(|i| (i.unwrap().va.0, i.unwrap().size)).collect();
    assert_eq!(got, [(0x1000, PageSize::Size4K), (0x7000, PageSize::Size4K), (0x1ff000, PageSize::Size4K),
        (0x20_0000, PageSize::Size2M)]);
    assert_eq!(stats.tables_visited, 4);
    // A range starting inside a large page still reports it.
    let (items, _) = leaves(&w, &m, 0x1000, 0x30_0000, 1);
    assert_eq!(items.len(), 1);
}

#[test]
fn malformed_entries_are_reported_and_skipped() {
    let mut m = basic();
    m.set(0x4000, 0x9000 | PWU);
    m.set(0x3000 + 8, 0x1_0000_0000 | PWU); // PD[1] -> table past the end of memory
    m.set(0x3000 + 16, 0x20_0000 | (1 << 13) | PWU | PS); // misaligned 2 MiB page
    m.set(0x1000 + 8, 0x2000 | PWU | PS); // PS in a PML4E
    m.set(0x2000 + 8, (1 << 50) | PWU); // reserved with 46-bit MAXPHYADDR
    let w = Walker::new(PagingMode::Level4).with_max_phys_bits(46);
    let (items, stats) = leaves(&w, &m, 0x1000, 0x10000, (1 << 40) / 4096);
    let bad: Vec<BadEntry> = items.iter().filter_map(|i| i.err().map(|e| e.2)).collect();
    assert_eq!(bad, [BadEntry::TableOutsideMemory, BadEntry::MisalignedLargePage, BadEntry::ReservedBits,
        BadEntry::LargePageAtTopLevel]);
    assert_eq!(stats.bad_entries, 4);
    assert_eq!(items.iter().filter(|i| i.is_ok()).count(), 0, "the leaf at va 0 is outside the range");
    let (items, _) = leaves(&w, &m, 0x1000, 0, 1);
    assert_eq!(items.len(), 1);
    assert!(items[0].is_ok());
    // Translate reports the bad entry on the path.
    let err = w.translate(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0x20_0000)).unwrap_err();
    assert!(matches!(err, WalkError::Bad { level: 2, reason: BadEntry::TableOutsideMemory, .. }));
}

#[test]
fn root_outside_memory_is_an_error_not_a_panic() {
    let m = mem(4);
    let w = Walker::new(PagingMode::Level4);
    assert!(matches!(w.translate(&m, GuestPhysAddr(1 << 40), GuestVirtAddr(0)), Err(WalkError::Memory(_))));
    let r = w.walk_range(&m, GuestPhysAddr(1 << 40), GuestVirtAddr(0), 1, &mut |_| {});
    assert!(matches!(r, Err(WalkError::Memory(_))));
}

#[test]
fn aliasing_and_loops_cost_one_visit_per_table_page() {
    // Every PML4 entry of the lower half points at one PDPT whose entries all point at one
    // PD whose entries all point at one PT that is full: 256*512*512*512 leaves naively.
    let mut m = mem(8);
    for i in 0..512u64 {
        m.set(0x1000 + i * 8, if i < 256 { 0x2000 | PWU } else { 0x1000 | PWU }); // upper half loops to root
        m.set(0x2000 + i * 8, 0x3000 | PWU);
        m.set(0x3000 + i * 8, 0x4000 | PWU);
        m.set(0x4000 + i * 8, 0x5000 | PWU);
    }
    let w = Walker::new(PagingMode::Level4);
    let (items, stats) = leaves(&w, &m, 0x1000, 0, (1 << 47) / 4096);
    assert_eq!(stats.tables_visited, 4);
    assert_eq!(items.len(), 512, "only the first path through the shared PT is reported");
    assert_eq!(stats.aliased_tables_skipped, 255 + 511 + 511);
    let (items, stats) = leaves(&w, &m, 0x1000, 0xffff_8000_0000_0000, (1 << 47) / 4096);
    assert_eq!((stats.tables_visited, stats.aliased_tables_skipped), (1, 256), "the root reached through itself is not walked again");
    assert!(items.is_empty());
}

#[test]
fn ranges_crossing_the_hole_or_overflowing_are_refused() {
    let m = basic();
    let w = Walker::new(PagingMode::Level4);
    let cross = w.walk_range(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0x7fff_ffff_f000), 2, &mut |_| {});
    assert!(matches!(cross, Err(WalkError::NonCanonical(_))));
    let huge = w.walk_range(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0), u64::MAX, &mut |_| {});
    assert!(matches!(huge, Err(WalkError::NonCanonical(_))));
    let empty = w.walk_range(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0), 0, &mut |_| {}).unwrap();
    assert_eq!(empty, WalkStats::default());
}

#[test]
fn upper_levels_limit_effective_rights() {
    let mut m = mem(64);
    m.set(0x1000, 0x2000 | P | U); // PML4 not writable
    m.set(0x2000, 0x3000 | PWU);
    m.set(0x3000, 0x4000 | PWU);
    m.set(0x4000, 0x9000 | PWU);
    let w = Walker::new(PagingMode::Level4);
    let (items, _) = leaves(&w, &m, 0x1000, 0, 1);
    let leaf = items[0].unwrap();
    assert!(leaf.entry.contains(PteFlags::WRITABLE));
    assert!(!leaf.user_writable());
}

/// Random bytes as page tables: never a panic, never more table visits than pages.
#[test]
fn random_memory_never_panics_and_stays_bounded() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..200 {
        let pages = 16usize;
        let mut bytes = vec![0u8; pages * 4096];
        for chunk in bytes.chunks_mut(8) {
            // Mostly small frame numbers so that walks go deep; some garbage.
            let v = next();
            let entry = if v % 4 == 0 { v } else { ((v >> 8) % (pages as u64 + 2)) << 12 | (v & 0x1ff) };
            chunk.copy_from_slice(&entry.to_le_bytes());
        }
        let m = SliceMemory::new(bytes);
        let mode = if round % 2 == 0 { PagingMode::Level4 } else { PagingMode::Level5 };
        let w = Walker::new(mode).with_max_phys_bits(40);
        let root = GuestPhysAddr((next() % pages as u64) << 12);
        let mut n = 0u64;
        let stats = w.walk_range(&m, root, GuestVirtAddr(0), mode.user_top() / 4096, &mut |_| n += 1).unwrap();
        assert!(stats.tables_visited <= pages as u64);
        assert!(n <= stats.tables_visited * 512);
        let _ = w.translate(&m, root, GuestVirtAddr(next() & (mode.user_top() - 1)));
    }
}

#[test]
fn a_shared_budget_bounds_table_reads_across_walks() {
    // Two "processes" share one root: the second walk re-reads the same tables.
    let mut m = basic();
    m.set(0x4000, 0x5000 | PWU);
    let w = Walker::new(PagingMode::Level4);
    let mut budget = TableBudget::new(6);
    let mut n = 0;
    let stats = w
        .walk_range_within(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0), 512, &mut budget, &mut |_| n += 1)
        .unwrap();
    assert_eq!((stats.tables_visited, budget.used(), n), (4, 4, 1));
    let err = w
        .walk_range_within(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0), 512, &mut budget, &mut |_| n += 1)
        .unwrap_err();
    assert_eq!(err, WalkError::TooManyTables { limit: 6 });
    assert_eq!(budget.used(), 6, "the walk stopped when the budget ran out");
    assert!(err.to_string().contains("more than 6 table pages"), "{err}");
    // An exhausted budget refuses even a walk that needs a single table.
    let mut none = TableBudget::new(0);
    assert!(w.walk_range_within(&m, GuestPhysAddr(0x1000), GuestVirtAddr(0), 1, &mut none, &mut |_| ()).is_err());
}

#[test]
fn chunked_walks_hand_over_exactly_the_range_of_each_last_level_table() {
    let mut m = basic();
    m.set(0x4000 + 3 * 8, 0x9000 | PWU);
    m.set(0x4000 + 7 * 8, 0xa000 | P | U);
    m.set(0x4000 + 9 * 8, (1 << 45) | PWU); // reserved bits under a 40-bit MAXPHYADDR
    m.set(0x3000 + 8, 0x20_0000 | PWU | PS); // a 2 MiB page at va 2 MiB
    let w = Walker::new(PagingMode::Level4).with_max_phys_bits(40);
    // Pages 2..=9 of the table, then the large page.
    let (start, pages) = (2 * 4096, 512 - 2 + 1);
    let mut blocks = Vec::new();
    let mut large = Vec::new();
    w.walk_chunks_within(&m, GuestPhysAddr(0x1000), GuestVirtAddr(start), pages, &mut TableBudget::unlimited(), &mut |c| {
        match c.unwrap() {
            Chunk::Ptes(b) => blocks.push((b.va, b.entries.len(), b.entry_addr, (0..b.entries.len()).filter_map(|i| b.leaf(i)).collect::<Vec<_>>())),
            Chunk::Large(l) => large.push(l.va),
        }
    })
    .unwrap();
    assert_eq!(blocks.len(), 1);
    let (va, n, entry_addr, in_block) = &blocks[0];
    assert_eq!((*va, *n, *entry_addr), (GuestVirtAddr(0x2000), 510, GuestPhysAddr(0x4000 + 2 * 8)));
    assert_eq!(large, vec![GuestVirtAddr(0x20_0000)]);
    // The block's leaves are the per-leaf walk's, malformed entry included.
    let (items, _) = leaves(&w, &m, 0x1000, start, pages);
    let from_block: Vec<WalkItem> = in_block.iter().map(|r| r.map_err(|e| (GuestVirtAddr(0x9000), 1, e))).collect();
    assert_eq!(from_block, items[..3].to_vec());
    assert!(blocks[0].3[0].unwrap().entry_addr == GuestPhysAddr(0x4000 + 3 * 8));
}
