//! Go's documented accounting equations (runtime.MemStats, runtime/metrics; spec sections 5 and 8), checked
//! after each phase of a mixed workload: tiny, small and large objects, frees, a memory limit, `release_all`.
//!
//! Each equation is checked against figures the test knows independently where it can: the objects it holds
//! (and the tiny blocks they sit in), the sizes it allocated by size class, and the page source's own count
//! of committed bytes.
#![cfg(feature = "std")]

mod common;

use std::alloc::Layout;
use std::collections::{BTreeMap, BTreeSet};

use common::layout;
use goheap::cpu::ThreadSlots;
use goheap::object::sizeclass::{class_of, CLASSES, NUM_SIZE_CLASSES};
use goheap::source::mmap::MmapSource;
use goheap::stats::{MemStats, Sample, Value, ALL_METRICS, MEMORY_CLASS_LEAVES, SIZE_CLASS_BUCKETS};
use goheap::Malloc;
use testkit::Rng;

type M = Malloc<MmapSource, ThreadSlots>;

/// What the test knows about its own allocations.
#[derive(Default)]
struct Known {
    live: Vec<(*mut u8, Layout)>,
    /// Tiny objects allocated, cumulative.
    tiny_allocs: u64,
    /// Non-tiny objects allocated per histogram bucket (size class - 1; large objects last), cumulative.
    allocs_by_bucket: BTreeMap<usize, u64>,
    frees_by_bucket: BTreeMap<usize, u64>,
}

/// goheap's tiny path: requests of at most 8 bytes (Go's bound is 16; see `object/cpucache.rs`).
fn is_tiny(l: Layout) -> bool {
    l.size() <= 8 && l.align() <= 8
}

/// The histogram bucket a non-tiny request lands in: its size class minus one, or the last for large.
fn bucket_of(l: Layout) -> usize {
    match goheap::object::sizeclass::class_for(l.size(), l.align()) {
        Some(c) if l.size() <= goheap::MAX_SMALL_SIZE => c - 1,
        _ => NUM_SIZE_CLASSES - 1,
    }
}

impl Known {
    fn alloc(&mut self, m: &M, l: Layout) {
        let p = m.alloc(l);
        assert!(!p.is_null(), "alloc({l:?}) failed");
        if is_tiny(l) {
            self.tiny_allocs += 1;
        } else {
            *self.allocs_by_bucket.entry(bucket_of(l)).or_default() += 1;
        }
        self.live.push((p, l));
    }

    fn free(&mut self, m: &M, i: usize) {
        let (p, l) = self.live.swap_remove(i);
        if !is_tiny(l) {
            *self.frees_by_bucket.entry(bucket_of(l)).or_default() += 1;
        }
        // SAFETY (test): allocated by `alloc` above with `l`, freed once (removed from `live`).
        unsafe { m.dealloc(p, l) };
    }

    /// Live heap objects as Go counts them once the caches are flushed: non-tiny objects, plus one per
    /// 16-byte block holding a live tiny object.
    fn go_heap_objects(&self) -> u64 {
        let blocks: BTreeSet<usize> =
            self.live.iter().filter(|(_, l)| is_tiny(*l)).map(|(p, _)| *p as usize & !15).collect();
        self.live.iter().filter(|(_, l)| !is_tiny(*l)).count() as u64 + blocks.len() as u64
    }
}

fn read_all(m: &M) -> BTreeMap<&'static str, Value> {
    let mut samples: Vec<Sample> = ALL_METRICS.iter().map(|d| Sample::new(d.name)).collect();
    m.read_metrics(&mut samples);
    samples.into_iter().map(|s| (s.name, s.value)).collect()
}

/// Every equation, on a quiescent heap whose calling cache was just flushed.
fn check_equations(m: &M, k: &Known, phase: &str) {
    m.flush_cpu_cache();
    let st: MemStats = m.mem_stats();
    let h = m.heap().stats();
    let ms = read_all(m);
    let u = |n: &str| ms[n].uint64().unwrap_or_else(|| panic!("{phase}: {n} is not a uint64"));

    // HeapSys = HeapInuse + HeapIdle.
    assert_eq!(st.heap_sys, st.heap_inuse + st.heap_idle, "{phase}: HeapSys != HeapInuse + HeapIdle");
    // HeapIdle - HeapReleased = free committed pages: against the heap's own count and the page source's
    // (everything the source has committed, less what is in use and the metadata).
    let free_committed = st.heap_idle - st.heap_released;
    assert_eq!(free_committed, h.free_bytes as u64, "{phase}: HeapIdle - HeapReleased != free committed pages");
    let source_committed = m.heap().source().committed_bytes() as u64;
    assert_eq!(
        source_committed,
        st.heap_inuse + free_committed + st.mspan_sys + st.other_sys + st.buck_hash_sys,
        "{phase}: the page source's committed bytes != HeapInuse + (HeapIdle - HeapReleased) + MSpanSys + OtherSys"
    );
    assert_eq!(u("/memory/classes/heap/free:bytes"), free_committed, "{phase}");
    assert_eq!(u("/memory/classes/heap/released:bytes"), st.heap_released, "{phase}");
    // Sys = the sum of the *Sys fields, released memory included.
    assert_eq!(
        st.sys,
        st.heap_sys + st.mspan_sys + st.mcache_sys + st.buck_hash_sys + st.other_sys,
        "{phase}: Sys != sum of *Sys"
    );
    assert!(st.sys >= st.heap_sys, "{phase}: Sys {} < HeapSys {}", st.sys, st.heap_sys);
    // /memory/classes/total:bytes = the sum of the leaves = Sys.
    let leaves: u64 = MEMORY_CLASS_LEAVES.iter().map(|n| u(n)).sum();
    assert_eq!(u("/memory/classes/total:bytes"), leaves, "{phase}: total != sum of the /memory/classes/ leaves");
    assert_eq!(u("/memory/classes/total:bytes"), st.sys, "{phase}: total != Sys");
    let listed: BTreeSet<&str> = ALL_METRICS
        .iter()
        .map(|d| d.name)
        .filter(|n| n.starts_with("/memory/classes/") && !n.ends_with("/total:bytes"))
        .collect();
    assert_eq!(listed, MEMORY_CLASS_LEAVES.iter().copied().collect(), "{phase}: the leaves list is not every class");
    // Mallocs - Frees = HeapObjects, with Go's rule for tiny objects (a block is one object).
    assert_eq!(st.mallocs - st.frees, st.heap_objects, "{phase}: Mallocs - Frees != HeapObjects");
    assert_eq!(st.heap_objects, k.go_heap_objects(), "{phase}: HeapObjects != live objects + live tiny blocks");
    assert_eq!(st.live_objects(), k.live.len() as u64, "{phase}: live_objects != the objects the test holds");
    assert_eq!(st.tiny_allocs, k.tiny_allocs, "{phase}: tiny allocs");
    let by_size_mallocs: u64 = st.by_size.iter().map(|b| b.mallocs).sum();
    let by_size_frees: u64 = st.by_size.iter().map(|b| b.frees).sum();
    assert_eq!(st.mallocs, by_size_mallocs + st.large_allocs + st.tiny_allocs, "{phase}: Mallocs vs BySize");
    assert_eq!(st.frees, by_size_frees + st.large_frees + st.tiny_allocs, "{phase}: Frees vs BySize");
    // Metrics agree with MemStats where both exist.
    assert_eq!(u("/memory/classes/heap/objects:bytes"), st.heap_alloc, "{phase}");
    assert_eq!(u("/memory/classes/heap/unused:bytes"), st.heap_inuse - st.heap_alloc, "{phase}");
    assert_eq!(u("/memory/classes/metadata/mspan/inuse:bytes"), st.mspan_inuse, "{phase}");
    assert_eq!(u("/gc/heap/allocs:bytes"), st.total_alloc, "{phase}");
    assert_eq!(u("/gc/heap/frees:bytes"), st.total_alloc - st.heap_alloc, "{phase}");
    assert_eq!(u("/gc/heap/allocs:objects"), st.mallocs - st.tiny_allocs, "{phase}: allocs:objects");
    assert_eq!(u("/gc/heap/frees:objects"), st.frees - st.tiny_allocs, "{phase}: frees:objects");
    assert_eq!(u("/gc/heap/objects:objects"), st.heap_objects, "{phase}");
    assert_eq!(u("/gc/heap/tiny/allocs:objects"), st.tiny_allocs, "{phase}");
    assert_eq!(u("/gc/heap/allocs:objects") - u("/gc/heap/frees:objects"), u("/gc/heap/objects:objects"), "{phase}");
    assert_eq!(u("/gc/gomemlimit:bytes"), st.memory_limit.min(i64::MAX as u64), "{phase}");
    assert_eq!(u("/goheap/objects/live:objects"), k.live.len() as u64, "{phase}");
    assert_eq!(u("/goheap/scavenge/released:bytes"), h.scavenged_total_bytes as u64, "{phase}");
    // allocs-by-size totals equal allocs:objects (frees alike), bucket by bucket against what the test did.
    let allocs = *ms["/gc/heap/allocs-by-size:bytes"].histogram().expect("allocs-by-size is a histogram");
    let frees = *ms["/gc/heap/frees-by-size:bytes"].histogram().expect("frees-by-size is a histogram");
    assert_eq!(allocs.total(), u("/gc/heap/allocs:objects"), "{phase}: allocs-by-size total != allocs:objects");
    assert_eq!(frees.total(), u("/gc/heap/frees:objects"), "{phase}: frees-by-size total != frees:objects");
    assert_eq!(allocs.buckets().len(), allocs.counts.len() + 1);
    let blocks_bucket = class_of(16) - 1;
    for (b, &lo) in SIZE_CLASS_BUCKETS.iter().enumerate().take(allocs.counts.len()) {
        let known_a = k.allocs_by_bucket.get(&b).copied().unwrap_or(0);
        let known_f = k.frees_by_bucket.get(&b).copied().unwrap_or(0);
        if b == blocks_bucket {
            // The 16-byte bucket also holds the tiny blocks.
            let blocks = st.by_size[class_of(16)].mallocs - known_a;
            assert!(blocks * 16 >= k.tiny_allocs, "{phase}: too few tiny blocks ({blocks}) for the tiny objects");
            assert!(allocs.counts[b] >= known_a && frees.counts[b] >= known_f, "{phase}: bucket {b}");
        } else {
            assert_eq!(allocs.counts[b], known_a, "{phase}: allocs-by-size bucket {b} ({lo} B..)");
            assert_eq!(frees.counts[b], known_f, "{phase}: frees-by-size bucket {b}");
        }
    }
}

#[test]
fn go_equations_hold_after_mixed_workloads() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let mut k = Known::default();
    let mut rng = Rng::new(0x90e9_0a11);
    let size = |rng: &mut Rng| match rng.below(10) {
        0..=2 => 1 + rng.below(15) as usize,           // tiny
        3..=7 => 16 + rng.below(4000) as usize,        // small
        8 => 4000 + rng.below(28 << 10) as usize,      // larger small classes
        _ => (33 << 10) + rng.below(1 << 20) as usize, // large
    };
    let align = |rng: &mut Rng| [1usize, 8, 8, 16, 64][rng.index(5)];

    check_equations(&m, &k, "empty");
    // Phase 1: mixed allocations and frees.
    for _ in 0..20_000 {
        let l = layout(size(&mut rng), align(&mut rng));
        k.alloc(&m, l);
        if rng.below(3) == 0 {
            let i = rng.index(k.live.len());
            k.free(&m, i);
        }
    }
    check_equations(&m, &k, "mixed");
    // Phase 2: free most of it and let the background step sweep and scavenge.
    while k.live.len() > 2000 {
        let i = rng.index(k.live.len());
        k.free(&m, i);
    }
    m.background(usize::MAX, 1 << 20);
    check_equations(&m, &k, "after frees and a background step");
    // Phase 3: release_all: HeapReleased grows, Sys keeps counting it (Go's Sys includes released memory).
    let sys_before = m.mem_stats().sys;
    let released = m.release_all();
    assert!(released > 0, "release_all released nothing");
    let st = m.mem_stats();
    assert!(st.heap_released >= released as u64);
    assert_eq!(st.sys, sys_before, "release_all changed Sys: released memory is still part of Sys");
    check_equations(&m, &k, "after release_all");
    // Phase 4: a tight memory limit while allocating more.
    m.set_memory_limit((m.mem_stats().heap_inuse as usize) + (8 << 20));
    for _ in 0..5000 {
        let l = layout(size(&mut rng), align(&mut rng));
        k.alloc(&m, l);
        if rng.below(2) == 0 {
            let i = rng.index(k.live.len());
            k.free(&m, i);
        }
    }
    check_equations(&m, &k, "under a memory limit");
    m.set_memory_limit(usize::MAX);
    // Phase 5: everything freed.
    while !k.live.is_empty() {
        k.free(&m, 0);
    }
    m.release_all();
    check_equations(&m, &k, "all freed");
    let st = m.mem_stats();
    assert_eq!((st.heap_objects, st.heap_alloc, st.heap_inuse), (0, 0, 0), "{st:?}");
    assert_eq!(st.heap_released, st.heap_idle, "release_all left free committed pages");
}

/// The size histograms' boundaries are Go's `sizeClassBuckets`: 1, then each class size plus one, then +Inf.
#[test]
fn size_histogram_buckets_are_gos() {
    assert_eq!(SIZE_CLASS_BUCKETS.len(), NUM_SIZE_CLASSES + 1);
    assert_eq!(&SIZE_CLASS_BUCKETS[..4], &[1.0, 9.0, 17.0, 25.0]);
    assert_eq!(SIZE_CLASS_BUCKETS[NUM_SIZE_CLASSES - 1], 32769.0);
    assert_eq!(SIZE_CLASS_BUCKETS[NUM_SIZE_CLASSES], f64::INFINITY);
    for c in 1..NUM_SIZE_CLASSES {
        assert_eq!(SIZE_CLASS_BUCKETS[c], (CLASSES[c].size + 1) as f64);
    }
    // An object of a class's exact size falls in bucket `class - 1`: [boundary[c-1], boundary[c]).
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let mut keep = Vec::new();
    for (n, size) in [(3u64, 48usize), (5, 49), (2, 32 << 10), (4, (32 << 10) + 1)] {
        for _ in 0..n {
            keep.push(m.alloc(layout(size, 8)));
        }
        let h = m.mem_stats().allocs_by_size();
        let b = SIZE_CLASS_BUCKETS.iter().rposition(|&lo| lo <= size as f64).unwrap();
        assert!(size as f64 >= SIZE_CLASS_BUCKETS[b] && (size as f64) < SIZE_CLASS_BUCKETS[b + 1]);
        assert_eq!(h.counts[b], n, "{size} B objects not in bucket {b}");
    }
}
