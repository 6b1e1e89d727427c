//! Statistics: MemStats identities against what the test itself allocated.
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use common::layout;
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::stats::{Sample, ALL_METRICS};
use goheap::Malloc;

#[test]
fn mallocs_minus_frees_and_heap_alloc() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let mut live = Vec::new();
    let mut expect_bytes = 0u64;
    let mut x = 12345u64;
    for i in 0..20_000 {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let size = match x >> 60 {
            0 => 40_000 + (x >> 20) as usize % 200_000,
            _ => 16 + (x >> 20) as usize % 4000,
        };
        let l = layout(size, 8);
        let p = m.alloc(l);
        assert!(!p.is_null());
        expect_bytes += m.usable_size(l) as u64;
        live.push((p, l));
        if i % 3 == 2 {
            let (p, l) = live.swap_remove((x >> 8) as usize % live.len());
            expect_bytes -= m.usable_size(l) as u64;
            // SAFETY (test): allocated above with `l`.
            unsafe { m.dealloc(p, l) };
        }
    }
    let st = m.mem_stats();
    assert_eq!(st.mallocs - st.frees, st.heap_objects);
    assert_eq!(st.heap_objects, live.len() as u64);
    assert_eq!(st.heap_alloc, expect_bytes, "HeapAlloc is not the sum of the live objects' class sizes");
    assert_eq!(st.alloc, st.heap_alloc);
    assert!(st.heap_inuse >= st.heap_alloc);
    assert_eq!(st.heap_sys, st.heap_inuse + st.heap_idle);
    let by_size_mallocs: u64 = st.by_size.iter().map(|b| b.mallocs).sum();
    assert_eq!(by_size_mallocs + st.large_allocs + st.tiny_allocs, st.mallocs);

    let mut samples: Vec<Sample> = ALL_METRICS.iter().map(|d| Sample::new(d.name)).collect();
    samples.push(Sample::new("/no/such:metric"));
    m.read_metrics(&mut samples);
    let get = |n: &str| samples.iter().find(|s| s.name == n).unwrap().value;
    assert_eq!(get("/memory/classes/heap/objects:bytes").uint64(), Some(st.heap_alloc));
    assert_eq!(get("/gc/heap/objects:objects").uint64(), Some(st.heap_objects));
    assert_eq!(get("/gc/heap/allocs:objects").uint64(), Some(st.mallocs));
    assert_eq!(get("/no/such:metric"), goheap::stats::Value::Bad);
    assert!(ALL_METRICS.iter().all(|d| get(d.name).kind() == d.kind), "a metric's value is not of its kind");

    for (p, l) in live {
        // SAFETY (test): allocated above with `l`.
        unsafe { m.dealloc(p, l) };
    }
    let st = m.mem_stats();
    assert_eq!(st.heap_objects, 0);
    assert_eq!(st.heap_alloc, 0);
}

/// Tiny objects share 16-byte blocks, and are counted as Go counts them: a block is one heap object (in
/// `heap_objects` and the 16-byte class of `by_size`); each tiny object counts in `tiny_allocs` and, at
/// allocation, in both `mallocs` and `frees`.
#[test]
fn tiny_objects_share_blocks() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let l = layout(4, 4);
    let ptrs: Vec<*mut u8> = (0..4000).map(|_| m.alloc(l)).collect();
    let st = m.mem_stats();
    assert_eq!(st.tiny_allocs, 4000);
    assert_eq!(st.heap_objects, 1000, "Go counts the 1000 blocks, not the 4000 tiny objects");
    assert_eq!(st.tiny_blocks, 1000);
    assert_eq!((st.mallocs, st.frees), (1000 + 4000, 4000));
    assert_eq!(st.live_objects(), 4000);
    let class16 = goheap::object::sizeclass::class_of(16);
    assert_eq!((st.by_size[class16].size, st.by_size[class16].mallocs), (16, 1000));
    // Four 4-byte objects per 16-byte block: 1000 blocks (the last one current).
    assert_eq!(st.heap_alloc, 1000 * 16, "{st:?}");
    let mut blocks: Vec<usize> = ptrs.iter().map(|&p| p as usize & !15).collect();
    blocks.dedup();
    assert_eq!(blocks.len(), 1000);
    for p in ptrs {
        // SAFETY (test): allocated above with `l`.
        unsafe { m.dealloc(p, l) };
    }
    let st = m.mem_stats();
    // Every block but the current one (not retired yet) is free again; the current one is a live object.
    assert_eq!(st.heap_objects, 1);
    assert_eq!((st.tiny_frees, st.live_objects()), (4000, 0));
    assert_eq!(st.heap_alloc, 16, "{st:?}");
    m.flush_cpu_cache();
    let st = m.mem_stats();
    assert_eq!((st.heap_alloc, st.heap_objects, st.mallocs - st.frees), (0, 0, 0));
    assert_eq!(st.by_size[class16].mallocs, st.by_size[class16].frees);
}

/// The tiny path packs small objects: for 1–4 byte objects it uses well under what the 8 B class would.
#[test]
fn tiny_path_saves_memory_over_classes() {
    use goheap::malloc::DebugFlags;
    let live = |flags| {
        let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30).with_debug(flags));
        let ptrs: Vec<_> = (0..20_000).map(|i| m.alloc(layout(1 + i % 4, 1))).collect();
        assert!(ptrs.iter().all(|p| !p.is_null()));
        m.mem_stats().heap_alloc
    };
    let (tiny, classes) = (live(DebugFlags::empty()), live(DebugFlags::NO_TINY));
    assert_eq!(classes, 20_000 * 8);
    assert!(tiny * 10 <= classes * 6, "tiny path used {tiny} B, classes {classes} B");
}

static HOOK_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn count_hook(s: &goheap::malloc::ProfileSample) {
    assert!(s.addr != 0 && s.size > 0);
    HOOK_CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Sampled heap profiling: about one sample per `rate` bytes, per bucket, and the hook sees each sample.
#[test]
fn heap_profile_samples_at_the_rate() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    m.set_profile_rate(4096);
    m.set_profile_hook(Some(count_hook));
    let mut keep = Vec::new();
    // Prime: the first allocation draws the first sampling distance.
    keep.push(m.alloc(layout(64, 8)));
    for _ in 0..16_384 {
        keep.push(m.alloc(layout(64, 8))); // 1 MiB of 64 B objects
    }
    for _ in 0..8 {
        keep.push(m.alloc(layout(128 << 10, 8))); // 1 MiB of large objects
    }
    let prof = m.profile();
    let class64 = goheap::object::sizeclass::class_of(64);
    let small = prof[class64].samples;
    let large = prof[goheap::object::sizeclass::NUM_SIZE_CLASSES + 1].samples;
    // 1 MiB / 4 KiB = 256 expected small samples; a large object (128 KiB) is always sampled.
    assert!((128..=512).contains(&small), "{small} samples of 64 B objects, expected about 256");
    assert_eq!(large, 8);
    let total: u64 = prof.iter().map(|b| b.samples).sum();
    assert_eq!(HOOK_CALLS.load(std::sync::atomic::Ordering::Relaxed) as u64, total, "the hook missed samples");
    m.set_profile_rate(0);
    for _ in 0..10_000 {
        keep.push(m.alloc(layout(64, 8)));
    }
    let after = m.profile()[class64].samples;
    assert!(after <= small + 1, "{after} samples after turning profiling off (was {small}): at most the pending one");
}

/// allocator-api2's `Allocator` on `&Malloc`: collections that take the allocator explicitly.
#[test]
fn allocator_api2_collections() {
    use allocator_api2::vec::Vec as AVec;
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let mut v: AVec<u64, _> = AVec::new_in(&*m);
    for i in 0..100_000u64 {
        v.push(i * 3); // grows through `Allocator::grow`, small then large
    }
    assert_eq!(v.iter().sum::<u64>(), 3 * (100_000 * 99_999 / 2));
    v.truncate(10);
    v.shrink_to_fit(); // `Allocator::shrink`, large to small
    assert_eq!(&v[..], &[0, 3, 6, 9, 12, 15, 18, 21, 24, 27]);
    let zst: AVec<(), _> = AVec::with_capacity_in(5, &*m); // zero-sized: never reaches the heap
    assert_eq!(zst.capacity(), usize::MAX);
    assert_eq!(m.mem_stats().heap_objects, 1);
    drop(v);
    assert_eq!(m.mem_stats().heap_objects, 0);
}

/// The sweep: empty spans go back to the page heap, the background loop keeping one per class and
/// `release_all` none.
#[test]
fn sweep_returns_empty_spans() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let l = layout(64, 8);
    let ptrs: Vec<_> = (0..20_000).map(|_| m.alloc(l)).collect();
    let inuse_full = m.mem_stats().heap_inuse;
    assert!(inuse_full >= 20_000 * 64);
    for p in ptrs {
        // SAFETY (test): allocated above with `l`.
        unsafe { m.dealloc(p, l) };
    }
    m.flush_cpu_cache();
    assert_eq!(m.mem_stats().heap_inuse, inuse_full, "spans go back only when swept");
    let rep = m.background(usize::MAX, 0);
    let span_bytes = goheap::object::sizeclass::CLASSES[goheap::object::sizeclass::class_of(64)].span_bytes() as u64;
    assert_eq!(m.mem_stats().heap_inuse, span_bytes, "the background sweep keeps exactly one empty span");
    assert_eq!(rep.npages_swept as u64 * goheap::PAGE_SIZE as u64, inuse_full - span_bytes);
    m.release_all();
    assert_eq!(m.mem_stats().heap_inuse, 0, "release_all keeps no empty span");
    m.validate();
}
