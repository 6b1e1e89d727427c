//! Memory cached by threads that exited goes back (issue 11): `background` and `release_all` flush the
//! caches that exited threads left in their slots (adopting each free slot first), so the heap's in-use
//! bytes drop back to about what is live. One test per binary: the slot table is process-wide.
#![cfg(feature = "std")]

use goheap::cpu::{ThreadSlots, MAX_CPUS};
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;

type M = Malloc<MmapSource, ThreadSlots>;

/// Allocates and frees a burst of objects over many size classes, twice per size so the stocks grow
/// (they grow for classes that both overflow and run dry), and a large object through the page cache.
fn churn(m: &M, seed: usize) {
    let sizes = [16, 24, 48, 64, 96, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
    for round in 0..6 {
        for (k, &size) in sizes.iter().enumerate() {
            let layout = Layout::from_size_align(size, 8).unwrap();
            let n = ((1 << 20) / size).clamp(64, 4096);
            let ptrs: Vec<*mut u8> = (0..n)
                .map(|i| {
                    let p = m.alloc(layout);
                    assert!(!p.is_null());
                    // SAFETY (test): `p` is a fresh allocation of `size` bytes.
                    unsafe { p.write((seed + i + k + round) as u8) };
                    p
                })
                .collect();
            for p in ptrs {
                // SAFETY (test): allocated above with `layout`, freed once.
                unsafe { m.dealloc(p, layout) };
            }
        }
    }
}

#[test]
fn release_all_reclaims_the_caches_of_exited_threads() {
    let m: &'static M = Box::leak(Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 8 << 30)));
    let live_layout = Layout::from_size_align(2048, 8).unwrap();
    let live = m.alloc(live_layout);
    let threads: Vec<_> = (0..MAX_CPUS).map(|t| std::thread::spawn(move || churn(m, t))).collect();
    for t in threads {
        t.join().unwrap();
    }
    let before = m.heap().stats();
    // The background step flushes a few orphaned caches per call (and returns empty spans to the heap).
    for _ in 0..MAX_CPUS {
        m.background(usize::MAX, 0);
    }
    let stepped = m.heap().stats();
    m.release_all();
    let after = m.heap().stats();
    println!(
        "exited threads: in use {} KiB, committed {} KiB at first; in use {} KiB after {} background steps; \
         {} KiB in use, {} KiB committed after release_all (2 KiB live)",
        before.inuse_bytes >> 10,
        before.committed_bytes >> 10,
        stepped.inuse_bytes >> 10,
        MAX_CPUS,
        after.inuse_bytes >> 10,
        after.committed_bytes >> 10
    );
    // The threads cached far more than this (stocks, spans and page caches of 64 threads).
    assert!(before.inuse_bytes > 64 << 20, "the workload cached too little to test anything: {before:?}");
    assert!(
        stepped.inuse_bytes < before.inuse_bytes / 8,
        "background steps left {} KiB in use",
        stepped.inuse_bytes >> 10
    );
    // Live: one 2 KiB object (one span of its class), plus spans the central lists keep partially used.
    assert!(after.inuse_bytes <= 1 << 20, "in use after release_all: {} KiB", after.inuse_bytes >> 10);
    assert!(after.committed_bytes <= 2 << 20, "committed after release_all: {} KiB", after.committed_bytes >> 10);
    // The adopted slots were given back: new threads can claim them.
    let owned = ThreadSlots::owned_count();
    assert!(owned <= 1, "slots still owned after every thread exited: {owned}");
    // SAFETY (test): allocated above with `live_layout`.
    unsafe { m.dealloc(live, live_layout) };
}
