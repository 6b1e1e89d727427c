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
    assert_eq!(get("/memory/classes/heap/objects:bytes"), Some(st.heap_alloc));
    assert_eq!(get("/gc/heap/objects:objects"), Some(st.heap_objects));
    assert_eq!(get("/gc/heap/allocs:objects"), Some(st.mallocs));
    assert_eq!(get("/no/such:metric"), None);
    assert!(ALL_METRICS.iter().all(|d| get(d.name).is_some()));

    for (p, l) in live {
        // SAFETY (test): allocated above with `l`.
        unsafe { m.dealloc(p, l) };
    }
    let st = m.mem_stats();
    assert_eq!(st.heap_objects, 0);
    assert_eq!(st.heap_alloc, 0);
}

#[test]
fn tiny_objects_share_blocks() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let l = layout(4, 4);
    let ptrs: Vec<*mut u8> = (0..4000).map(|_| m.alloc(l)).collect();
    let st = m.mem_stats();
    assert_eq!(st.tiny_allocs, 4000);
    assert_eq!(st.heap_objects, 4000);
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
    assert_eq!(st.heap_objects, 0);
    // Every block but the current one (not retired yet) is free again.
    assert_eq!(st.heap_alloc, 16, "{st:?}");
    m.flush_cpu_cache();
    assert_eq!(m.mem_stats().heap_alloc, 0);
}
