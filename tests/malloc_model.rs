//! Model test: random alloc / alloc_zeroed / realloc / free sequences over mixed sizes and alignments,
//! checked against a shadow map of live blocks.
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use common::{check, fill, layout};
use goheap::cpu::{NoCpuCache, ThreadSlots};
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use proptest::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Debug)]
enum Op {
    Alloc { size: usize, align: usize, zeroed: bool },
    Free(usize),
    Realloc(usize, usize),
}

fn size_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1usize..16,
        4 => 16usize..1024,
        2 => 1024usize..=32768,
        1 => 32769usize..300_000,
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (size_strategy(), prop_oneof![6 => 0u32..4, 2 => 4u32..13, 1 => 13u32..17], any::<bool>())
            .prop_map(|(size, a, zeroed)| Op::Alloc { size, align: 1 << a, zeroed }),
        4 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), size_strategy()).prop_map(|(i, s)| Op::Realloc(i, s)),
    ]
}

struct Live {
    size: usize,
    align: usize,
    seed: u64,
}

fn run<P: goheap::cpu::CpuProvider>(m: &Malloc<MmapSource, P>, ops: &[Op]) {
    let mut live: BTreeMap<usize, Live> = BTreeMap::new();
    let mut seed = 1u64;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc { size, align, zeroed } => {
                let l = layout(size, align);
                let p = if zeroed { m.alloc_zeroed(l) } else { m.alloc(l) };
                assert!(!p.is_null(), "step {step}: alloc {size}/{align} failed");
                let a = p as usize;
                assert_eq!(a % align, 0, "step {step}: {a:#x} not aligned to {align}");
                if let Some((&q, b)) = live.range(..=a).next_back() {
                    assert!(q + b.size <= a, "step {step}: {a:#x}+{size} overlaps {q:#x}+{}", b.size);
                }
                if let Some((&q, _)) = live.range(a..).next() {
                    assert!(a + size <= q, "step {step}: {a:#x}+{size} overlaps {q:#x}");
                }
                if zeroed {
                    // SAFETY (test): the block is `size` bytes.
                    let bytes = unsafe { std::slice::from_raw_parts(p, size) };
                    assert!(bytes.iter().all(|&b| b == 0), "step {step}: alloc_zeroed gave non-zero memory");
                }
                seed += 1;
                // SAFETY: `p` is a fresh block of `size` bytes.
                unsafe { fill(p, size, seed) };
                live.insert(a, Live { size, align, seed });
            }
            Op::Free(i) => {
                if live.is_empty() {
                    continue;
                }
                let a = *live.keys().nth(i % live.len()).unwrap();
                let b = live.remove(&a).unwrap();
                // SAFETY: `a` is a live block of `b.size` bytes (not freed yet).
                let contents = unsafe { check(a as *const u8, b.size, b.seed) };
                assert_eq!(contents, Ok(()), "step {step}: contents of {a:#x} changed");
                // SAFETY (test): allocated by `m` with this layout.
                unsafe { m.dealloc(a as *mut u8, layout(b.size, b.align)) };
            }
            Op::Realloc(i, new_size) => {
                if live.is_empty() {
                    continue;
                }
                let a = *live.keys().nth(i % live.len()).unwrap();
                let b = live.remove(&a).unwrap();
                // SAFETY (test): allocated by `m` with this layout.
                let p = unsafe { m.realloc(a as *mut u8, layout(b.size, b.align), new_size) };
                assert!(!p.is_null(), "step {step}: realloc failed");
                assert_eq!(p as usize % b.align, 0, "step {step}: realloc lost alignment");
                let kept = b.size.min(new_size);
                // SAFETY: `p` is the reallocated block of `new_size >= kept` bytes.
                let contents = unsafe { check(p, kept, b.seed) };
                assert_eq!(contents, Ok(()), "step {step}: realloc lost contents");
                seed += 1;
                // SAFETY: as above; nothing else uses the block.
                unsafe { fill(p, new_size, seed) };
                live.insert(p as usize, Live { size: new_size, align: b.align, seed });
            }
        }
        if step % 64 == 0 {
            m.validate();
        }
    }
    for (a, b) in std::mem::take(&mut live) {
        // SAFETY: `a` is a live block of `b.size` bytes.
        assert_eq!(unsafe { check(a as *const u8, b.size, b.seed) }, Ok(()));
        // SAFETY (test): allocated by `m` with this layout.
        unsafe { m.dealloc(a as *mut u8, layout(b.size, b.align)) };
    }
    m.validate();
    let st = m.mem_stats();
    assert_eq!(st.live_objects(), 0, "objects left after freeing everything: {st:?}");
    // Only the current tiny block may still count as live (one heap object, as in Go), until the cache is
    // flushed.
    assert!(st.heap_alloc <= 16 && st.heap_objects == st.heap_alloc / 16, "{st:?}");
    m.flush_cpu_cache();
    let st = m.mem_stats();
    assert_eq!((st.heap_alloc, st.heap_objects), (0, 0), "{st:?}");
    m.validate();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn model_per_cpu_caches(ops in proptest::collection::vec(op_strategy(), 1..600)) {
        let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
        run(&m, &ops);
    }

    #[test]
    fn model_shared_cache(ops in proptest::collection::vec(op_strategy(), 1..300)) {
        let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), NoCpuCache, 1 << 30));
        run(&m, &ops);
    }
}

/// Many allocations of every size class, all live at once, freed in a scrambled order, twice over: the
/// second round must reuse memory (the heap does not grow).
#[test]
fn every_class_reuses_memory() {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
    let mut sys_after_first = 0;
    for round in 0..3 {
        let mut blocks = Vec::new();
        for c in 1..goheap::object::sizeclass::NUM_SIZE_CLASSES {
            let size = goheap::object::sizeclass::CLASSES[c].size as usize;
            for k in 0..(64 * 1024 / size).max(2) {
                let l = layout(size, 8);
                let p = m.alloc(l);
                assert!(!p.is_null());
                // SAFETY: `p` is a fresh block of `size` bytes.
                unsafe { fill(p, size.min(64), (c * 1000 + k) as u64) };
                blocks.push((p, l, (c * 1000 + k) as u64));
            }
        }
        // Scramble deterministically.
        let n = blocks.len();
        for i in 0..n {
            blocks.swap(i, (i * 7919) % n);
        }
        for (p, l, seed) in blocks {
            // SAFETY: `p` is a live block of `l.size()` bytes.
            assert_eq!(unsafe { check(p, l.size().min(64), seed) }, Ok(()));
            // SAFETY (test): allocated above with `l`.
            unsafe { m.dealloc(p, l) };
        }
        m.validate();
        let hs = m.mem_stats().heap_sys;
        if round == 0 {
            sys_after_first = hs;
        } else {
            assert_eq!(hs, sys_after_first, "round {round}: the heap grew instead of reusing freed memory");
        }
    }
}
