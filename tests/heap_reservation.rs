//! `heap::reservation_bytes` bounds what a heap ever reserves from its source (a kernel sizes its virtual
//! window with it): fill a small heap with one-page spans (the most descriptors) and compare.
#![cfg(feature = "std")]

use goheap::page::heap::{reservation_bytes, Heap};
use goheap::source::mmap::MmapSource;

#[test]
fn reservation_covers_a_full_heap() {
    for max in [4usize << 20, 24 << 20, 64 << 20] {
        let heap = Heap::with_max_bytes(MmapSource::new(), max);
        let mut n = 0usize;
        while heap.alloc_span(None, 1, 1).is_some() {
            n += 1;
        }
        assert_eq!(n * goheap::PAGE_SIZE, max.next_multiple_of(4 << 20), "the arena should fill up exactly");
        let reserved = heap.source().reserved_bytes();
        let bound = reservation_bytes(max);
        assert!(reserved <= bound, "max {max}: reserved {reserved} > reservation_bytes {bound}");
        // Not absurdly loose: within arena + 2 chunks + 5% for metadata and descriptors.
        assert!(bound <= max + (8 << 20) + max / 20, "max {max}: bound {bound} too loose");
    }
}
