//! `heap::reservation_bytes` bounds what a heap ever reserves from its source (a kernel sizes its virtual
//! window with it): fill a small heap with one-page spans (the most descriptors) and compare.
#![cfg(feature = "std")]

use goheap::cpu::Guarded;
use goheap::page::heap::{reservation_bytes, Heap};
use goheap::source::mmap::MmapSource;

/// The guard token the heap's locking methods ask for: these tests run no interrupt or signal handler that
/// calls goheap, so any thread may make one.
fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

#[test]
fn reservation_covers_a_full_heap() {
    for max in [4usize << 20, 24 << 20, 64 << 20] {
        let heap = Heap::with_max_bytes(MmapSource::new(), max);
        let mut n = 0usize;
        while heap.alloc_span(g(), None, 1, 1).is_some() {
            n += 1;
        }
        assert_eq!(n * goheap::PAGE_SIZE, max.next_multiple_of(4 << 20), "the arena should fill up exactly");
        let reserved = heap.source().reserved_bytes();
        let bound = reservation_bytes(max);
        assert!(reserved <= bound, "max {max}: reserved {reserved} > reservation_bytes {bound}");
        // Not absurdly loose: within arena + 2 chunks + 5% for metadata and descriptors (+ the sampled guarded
        // pool, which the allocator reserves apart from the heap).
        let pool = goheap::page::heap::GUARDED_POOL_BYTES;
        assert!(bound <= max + (8 << 20) + max / 20 + pool, "max {max}: bound {bound} too loose");
    }
}
