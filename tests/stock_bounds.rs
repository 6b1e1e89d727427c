//! The adaptive stock bounds of the per-CPU caches (`cpucache.rs`): a class whose stock overflows, and
//! which also had to refill from a span, grows its bound (so batches of frees stay in the cache), within
//! the per-cache growth budget; a cache that only frees a class does not grow it; the background step
//! shrinks grown bounds and `flush_cpu_cache` resets them, handing the objects back.
#![cfg(feature = "std")]

use goheap::cpu::ThreadSlots;
use goheap::object::cpucache::{stock_cap, stock_max, FLUSH_SLICE_OBJS, STOCK_GROW_BYTES};
use goheap::object::sizeclass::{class_of, CLASSES};
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;

fn heap() -> Box<Malloc<MmapSource, ThreadSlots>> {
    Box::new(Malloc::new(MmapSource::new(), ThreadSlots::new()))
}

/// Allocates `n` objects of `size` bytes, then frees them all.
fn batch(m: &Malloc<MmapSource, ThreadSlots>, size: usize, n: usize) {
    let l = Layout::from_size_align(size, 8).unwrap();
    let v: Vec<*mut u8> = (0..n).map(|_| m.alloc(l)).collect();
    assert!(v.iter().all(|p| !p.is_null()));
    for p in v {
        // SAFETY: allocated above with `l`, freed once.
        unsafe { m.dealloc(p, l) };
    }
}

#[test]
fn overflowing_stock_grows_then_shrinks_and_resets() {
    let m = heap();
    let c = class_of(64);
    let base = stock_max(c);
    assert_eq!(m.stock_bound(c), base);
    // Each batch that runs its stock dry and overflows it again doubles the bound once.
    batch(&m, 64, 1000);
    assert_eq!(m.stock_bound(c), 2 * base, "one doubling per batch");
    for _ in 0..4 {
        batch(&m, 64, 1000);
    }
    let grown = m.stock_bound(c);
    assert!(grown >= 1000 && grown <= stock_cap(c), "bound {grown} after 1000-object batches (base {base})");
    // The batch again: every allocation comes from the stock, so no span is taken from the central lists.
    let refills = || -> u64 { (0..=goheap::cpu::MAX_CPUS).map(|i| m.cpu_stats(i).refills).sum() };
    let before = refills();
    batch(&m, 64, 1000);
    assert_eq!(refills(), before, "the second batch took spans from the central lists");
    assert_eq!(m.stock_bound(c), grown, "a batch that fits does not grow the bound further");

    // Background steps halve the grown bound down to the base, flushing what no longer fits: at most a
    // slice of objects per step (interrupt latency), the bound staying at or above the stock of 1000.
    m.background(0, 0);
    let slice = FLUSH_SLICE_OBJS as u32;
    assert_eq!(m.stock_bound(c), (grown / 2).max(base).max(1000 - slice), "one step flushes one slice");
    m.background(0, 0);
    assert_eq!(m.stock_bound(c), (grown / 4).max(base).max(1000 - 2 * slice), "and the next one more");
    for _ in 0..1000 / FLUSH_SLICE_OBJS {
        m.background(0, 0);
    }
    assert_eq!(m.stock_bound(c), base);

    batch(&m, 64, 1000);
    batch(&m, 64, 1000);
    assert!(m.stock_bound(c) > base);
    m.flush_cpu_cache();
    assert_eq!(m.stock_bound(c), base, "flush_cpu_cache resets the bounds");
    assert_eq!(m.mem_stats().heap_objects, 0);
}

#[test]
fn growth_stays_within_the_cache_budget() {
    let m = heap();
    // Overflow the stocks of many classes: their growth together must stay within the budget.
    let classes: Vec<usize> = (1..CLASSES.len()).filter(|&c| CLASSES[c].size >= 512).collect();
    for &c in &classes {
        let size = CLASSES[c].size as usize;
        for _ in 0..12 {
            batch(&m, size, stock_cap(c) as usize + 8);
        }
    }
    let grown: usize =
        classes.iter().map(|&c| (m.stock_bound(c) - stock_max(c)) as usize * CLASSES[c].size as usize).sum();
    assert!(grown > 0, "no stock grew");
    assert!(grown <= STOCK_GROW_BYTES, "stocks grew by {grown} bytes, budget {STOCK_GROW_BYTES}");
    // Some class hit the budget before its cap.
    assert!(classes.iter().any(|&c| m.stock_bound(c) < stock_cap(c)), "budget never limited growth");
    m.flush_cpu_cache();
    assert_eq!(m.mem_stats().heap_objects, 0);
}

#[test]
fn a_cache_that_only_frees_does_not_grow() {
    let m = heap();
    let c = class_of(64);
    let l = Layout::from_size_align(64, 8).unwrap();
    // The producer (this thread) allocates, the consumer frees: every free is of another cache's object.
    let ptrs: Vec<usize> = (0..5000).map(|_| m.alloc(l) as usize).collect();
    let bound = std::thread::scope(|s| {
        s.spawn(|| {
            for &p in &ptrs {
                // SAFETY: allocated above with `l`, freed once.
                unsafe { m.dealloc(p as *mut u8, l) };
            }
            m.stock_bound(c)
        })
        .join()
        .unwrap()
    });
    assert_eq!(bound, stock_max(c), "the consumer's stock grew though it never allocates the class");
    assert_eq!(m.mem_stats().heap_objects, 0);
}
