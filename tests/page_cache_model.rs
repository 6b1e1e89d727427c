//! Page caches, scavenging and injected commit failures, in random sequences (proptest): no overlap with
//! live spans (shadow), span memory intact, `validate()` and the source's accounting after every step, and
//! an allocation fails only when a commit failed.
#![cfg(all(feature = "std", feature = "validate"))]

use std::ptr::NonNull;

use goheap::cpu::Guarded;
use goheap::page::heap::pagecache::PageCache;
use goheap::page::heap::{span_info, Heap};
use goheap::page::span::Span;
use goheap::source::bounded::BoundedSource;
use goheap::PAGE_SIZE;
use proptest::prelude::*;

/// The guard token the heap's locking methods ask for: these tests run no interrupt or signal handler that
/// calls goheap, so any thread may make one.
fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

const ARENA_BYTES: usize = 32 << 20;
const ARENA_PAGES: usize = ARENA_BYTES / PAGE_SIZE;

#[derive(Clone, Debug)]
enum Op {
    Alloc {
        npages: usize,
        cache: usize,
    },
    Free {
        k: usize,
        cache: usize,
    },
    Flush(usize),
    Scavenge(usize),
    ReleaseAll,
    FailNextCommit,
    /// Budget = committed now + this many pages (`None` = unbounded).
    Budget(Option<usize>),
    Limit(Option<usize>),
}

/// Caches 0 and 1 are two "CPUs"; 2 means no cache.
fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => ((1usize..=20), 0usize..3).prop_map(|(npages, cache)| Op::Alloc { npages, cache }),
        1 => ((40usize..=600), Just(2usize)).prop_map(|(npages, cache)| Op::Alloc { npages, cache }),
        7 => (any::<usize>(), 0usize..3).prop_map(|(k, cache)| Op::Free { k, cache }),
        1 => (0usize..2).prop_map(Op::Flush),
        1 => (0usize..(1 << 20)).prop_map(Op::Scavenge),
        1 => Just(Op::ReleaseAll),
        1 => Just(Op::FailNextCommit),
        1 => proptest::option::of(0usize..64).prop_map(Op::Budget),
        1 => proptest::option::of((1usize..=16).prop_map(|m| m << 20)).prop_map(Op::Limit),
    ]
}

struct Live {
    span: NonNull<Span>,
    base: usize,
    npages: usize,
}

fn run(ops: Vec<Op>) {
    let heap = Heap::with_max_bytes(BoundedSource::with_mmap(ARENA_BYTES + (16 << 20), usize::MAX), ARENA_BYTES);
    let mut caches = [PageCache::new(), PageCache::new()];
    let mut shadow = vec![false; ARENA_PAGES];
    let mut live: Vec<Live> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc { npages, cache } => {
                let failed_before = heap.source().failed_commits();
                let pc = caches.get_mut(cache);
                match heap.alloc_span(g(), pc, npages, 3) {
                    Some(s) => {
                        // SAFETY: live span of this heap.
                        let i = unsafe { span_info(s) };
                        assert_eq!((i.npages, i.class, i.in_use), (npages, 3, true));
                        let first = (i.base - heap.arena_base()) / PAGE_SIZE;
                        for (p, used) in shadow.iter_mut().enumerate().skip(first).take(npages) {
                            assert!(!*used, "step {step}: page {p} handed out twice");
                            *used = true;
                        }
                        // SAFETY: the span's memory is ours.
                        unsafe {
                            if !i.needzero {
                                assert_eq!(*(i.base as *const u64), 0, "step {step}: fresh span not zero");
                            }
                            *(i.base as *mut u64) = i.base as u64;
                            *((i.base + npages * PAGE_SIZE - 8) as *mut u64) = !(i.base as u64);
                        }
                        assert_eq!(heap.span_of(i.base + npages * PAGE_SIZE - 1), Some(s));
                        live.push(Live { span: s, base: i.base, npages });
                    }
                    None => {
                        let live_pages: usize = live.iter().map(|l| l.npages).sum();
                        assert!(
                            heap.source().failed_commits() > failed_before || live_pages + npages > ARENA_PAGES / 2,
                            "step {step}: allocation of {npages} failed with no failed commit"
                        );
                    }
                }
            }
            Op::Free { k, cache } => {
                if live.is_empty() {
                    continue;
                }
                let l = live.swap_remove(k % live.len());
                // SAFETY: written at allocation, span live.
                unsafe {
                    assert_eq!(*(l.base as *const u64), l.base as u64, "step {step}: head clobbered");
                    assert_eq!(*((l.base + l.npages * PAGE_SIZE - 8) as *const u64), !(l.base as u64));
                }
                let first = (l.base - heap.arena_base()) / PAGE_SIZE;
                shadow[first..first + l.npages].iter_mut().for_each(|u| *u = false);
                // SAFETY: live span of this heap, unused from now on.
                unsafe { heap.free_span(g(), caches.get_mut(cache), l.span) };
                assert_eq!(heap.span_of(l.base), None);
            }
            Op::Flush(c) => heap.flush_page_cache(g(), &mut caches[c]),
            Op::Scavenge(b) => {
                heap.scavenge(g(), b);
            }
            Op::ReleaseAll => {
                heap.release_all(g());
            }
            Op::FailNextCommit => heap.source().fail_nth_commit(1),
            Op::Budget(p) => {
                let b = p.map_or(usize::MAX, |p| heap.source().committed_bytes() + p * PAGE_SIZE);
                heap.source().set_budget(b);
            }
            Op::Limit(l) => heap.set_memory_limit(l.unwrap_or(usize::MAX)),
        }
        heap.validate(g());
        let st = heap.stats();
        assert_eq!(heap.source().committed_bytes(), st.total_bytes, "step {step}: source vs heap accounting");
        let inuse: usize = live.iter().map(|l| l.npages).sum();
        assert_eq!(st.inuse_bytes, inuse * PAGE_SIZE, "step {step}");
        assert_eq!(st.cached_bytes, (caches[0].free_npages() + caches[1].free_npages()) * PAGE_SIZE);
    }
    heap.source().fail_nth_commit(0);
    heap.source().set_budget(usize::MAX);
    for l in live {
        // SAFETY: live span of this heap.
        unsafe { heap.free_span(g(), None, l.span) };
    }
    for c in caches.iter_mut() {
        heap.flush_page_cache(g(), c);
    }
    heap.validate(g());
    heap.release_all(g());
    let st = heap.stats();
    assert_eq!((st.inuse_bytes, st.committed_bytes, st.cached_bytes), (0, 0, 0));
    assert_eq!(heap.source().committed_bytes(), st.metadata_bytes + st.span_sys_bytes);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn page_caches_scavenger_and_failures(ops in proptest::collection::vec(op(), 1..150)) {
        run(ops);
    }
}
