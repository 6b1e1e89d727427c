//! Page heap against a naive first-fit model (proptest): same addresses, same `needzero`, `validate()` after
//! every step.
#![cfg(all(feature = "std", feature = "validate"))]

use std::ptr::NonNull;

use goheap::cpu::Guarded;
use goheap::page::heap::{span_info, Heap};
use goheap::page::pagealloc::PALLOC_CHUNK_PAGES;
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

/// Arena of the heap under test: 64 MiB = 8192 pages (16 chunks).
const ARENA_BYTES: usize = 64 << 20;
const ARENA_PAGES: usize = ARENA_BYTES / PAGE_SIZE;

#[derive(Clone, Debug)]
enum Op {
    Alloc(usize),
    AllocAligned(usize, u32),
    Free(usize),
    Resize(usize, usize),
    ReleaseAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1usize..=16).prop_map(Op::Alloc),
        3 => (1usize..=1500).prop_map(Op::Alloc),
        2 => ((1usize..=40), 14u32..=22).prop_map(|(n, s)| Op::AllocAligned(n, s)),
        6 => any::<usize>().prop_map(Op::Free),
        2 => (any::<usize>(), 1usize..=700).prop_map(|(k, n)| Op::Resize(k, n)),
        1 => Just(Op::ReleaseAll),
    ]
}

/// The naive model: a page array (beyond `used.len()` everything is free), first fit, growth in chunks.
struct Model {
    used: Vec<bool>,
    /// Page was committed and written since it was last released (so a span over it needs zeroing).
    dirty: Vec<bool>,
    grown: usize,
}

impl Model {
    fn is_free(&self, p: usize) -> bool {
        !self.used[p]
    }
    fn first_fit(&self, n: usize) -> usize {
        let mut run = 0;
        for p in 0..ARENA_PAGES + n {
            if p < ARENA_PAGES && !self.is_free(p) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    return p + 1 - n;
                }
            }
        }
        unreachable!()
    }
    fn take(&mut self, i: usize, n: usize) -> bool {
        let zero = !self.dirty[i..i + n].iter().any(|&d| d);
        for p in i..i + n {
            self.used[p] = true;
            self.dirty[p] = true;
        }
        zero
    }
    fn grow_to(&mut self, end: usize) {
        self.grown = self.grown.max(end.div_ceil(PALLOC_CHUNK_PAGES) * PALLOC_CHUNK_PAGES);
    }
}

struct Live {
    span: NonNull<Span>,
    idx: usize,
    npages: usize,
}

fn span_fields(s: NonNull<Span>) -> (usize, usize, bool) {
    // SAFETY: a live span of the heap under test.
    let i = unsafe { span_info(s) };
    assert!(i.in_use);
    (i.base, i.npages, i.needzero)
}

fn run(ops: Vec<Op>) {
    let src = BoundedSource::with_mmap(ARENA_BYTES + (16 << 20), usize::MAX);
    let heap = Heap::with_max_bytes(src, ARENA_BYTES);
    let mut m = Model { used: vec![false; ARENA_PAGES], dirty: vec![false; ARENA_PAGES], grown: 0 };
    let mut live: Vec<Live> = Vec::new();
    let mut growth_seen = 0;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Alloc(n) | Op::AllocAligned(n, _) => {
                let align_pages = match op {
                    Op::AllocAligned(_, s) => (1usize << s) / PAGE_SIZE,
                    _ => 1,
                };
                let total = n + align_pages.max(1) - 1;
                let fit = m.first_fit(total);
                let s = match op {
                    Op::AllocAligned(_, sh) => heap.alloc_span_aligned(g(), n, 1 << sh),
                    _ => heap.alloc_span(g(), None, n, 0),
                };
                if fit + total > ARENA_PAGES {
                    assert!(s.is_none(), "step {step}: {op:?} must fail (arena full)");
                } else {
                    let s = s.unwrap_or_else(|| panic!("step {step}: {op:?} failed, model fits at {fit}"));
                    let base = heap.arena_base();
                    let idx = fit.div_ceil(align_pages) * align_pages;
                    let (sbase, snpages, needzero) = span_fields(s);
                    assert_eq!(sbase, base + idx * PAGE_SIZE, "step {step}: {op:?} address (model page {idx})");
                    assert_eq!(sbase % (align_pages * PAGE_SIZE), 0);
                    assert_eq!(snpages, n);
                    m.grow_to(fit + total);
                    let zero = m.take(idx, n);
                    assert_eq!(needzero, !zero, "step {step}: needzero");
                    // SAFETY: the span's memory is ours now.
                    unsafe {
                        let first = sbase as *mut u64;
                        let last = (sbase + n * PAGE_SIZE - 8) as *mut u64;
                        if !needzero {
                            assert_eq!((*first, *last), (0, 0), "step {step}: fresh span not zero");
                        }
                        *first = sbase as u64;
                        *last = !(sbase as u64);
                    }
                    assert_eq!(heap.span_of(sbase), Some(s));
                    assert_eq!(heap.span_of(sbase + n * PAGE_SIZE - 1), Some(s));
                    live.push(Live { span: s, idx, npages: n });
                    // An allocation that grew the heap past the retained goal released free committed pages
                    // (Go's scavenging on heap growth): the model learns which from the source, and they
                    // must be exactly that many free dirty pages.
                    let growth = heap.stats().scavenged_growth_bytes;
                    if growth != growth_seen {
                        let mut flipped = 0;
                        for p in 0..m.grown.min(ARENA_PAGES) {
                            if m.dirty[p] && heap.source().is_committed(base + p * PAGE_SIZE) == Some(false) {
                                assert!(!m.used[p], "step {step}: growth scavenging released a page in use");
                                m.dirty[p] = false;
                                flipped += 1;
                            }
                        }
                        assert_eq!(flipped * PAGE_SIZE, growth - growth_seen, "step {step}: growth scavenging");
                        growth_seen = growth;
                    }
                }
            }
            Op::Free(k) => {
                if live.is_empty() {
                    continue;
                }
                let l = live.swap_remove(k % live.len());
                let (sbase, _, _) = span_fields(l.span);
                // SAFETY: written at allocation; the span is live.
                unsafe { assert_eq!(*(sbase as *const u64), sbase as u64, "step {step}: span memory clobbered") };
                // SAFETY: live span of this heap, no longer used.
                unsafe { heap.free_span(g(), None, l.span) };
                for p in l.idx..l.idx + l.npages {
                    m.used[p] = false;
                }
                assert_eq!(heap.span_of(sbase), None);
            }
            Op::Resize(k, n) => {
                if live.is_empty() {
                    continue;
                }
                let k = k % live.len();
                let (idx, old) = (live[k].idx, live[k].npages);
                let expect =
                    if n <= old { true } else { idx + n <= ARENA_PAGES && (idx + old..idx + n).all(|p| m.is_free(p)) };
                let (_, _, nz_before) = span_fields(live[k].span);
                // SAFETY: live span, owned by the test.
                let ok = unsafe { heap.resize_span_in_place(g(), live[k].span, n) };
                assert_eq!(ok, expect, "step {step}: resize {old} -> {n} at page {idx}");
                if ok {
                    if n < old {
                        for p in idx + n..idx + old {
                            m.used[p] = false;
                        }
                    } else if n > old {
                        m.grow_to(idx + n);
                        let zero = m.take(idx + old, n - old);
                        let (_, snpages, nz) = span_fields(live[k].span);
                        assert_eq!(snpages, n);
                        assert_eq!(nz, nz_before || !zero, "step {step}: needzero after growing");
                    }
                    live[k].npages = n;
                    let base = heap.arena_base() + idx * PAGE_SIZE;
                    assert_eq!(heap.span_of(base + n * PAGE_SIZE - 1), Some(live[k].span));
                    assert_ne!(heap.span_of(base + n * PAGE_SIZE), Some(live[k].span));
                }
            }
            Op::ReleaseAll => {
                heap.release_all(g());
                for p in 0..ARENA_PAGES {
                    if !m.used[p] {
                        m.dirty[p] = false;
                    }
                }
                assert_eq!(heap.stats().free_bytes, 0);
            }
        }
        heap.validate(g());
        let st = heap.stats();
        assert_eq!(st.grown_bytes, m.grown * PAGE_SIZE, "step {step}: grown");
        let inuse: usize = live.iter().map(|l| l.npages).sum();
        assert_eq!(st.inuse_bytes, inuse * PAGE_SIZE);
        assert!(heap.source().committed_bytes() == st.total_bytes, "step {step}: source vs heap accounting");
    }
    for l in live {
        // SAFETY: live span of this heap.
        unsafe { heap.free_span(g(), None, l.span) };
    }
    heap.validate(g());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn page_heap_matches_first_fit_model(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops);
    }
}

/// A fixed sequence that exercises growth across chunk boundaries and the arena end.
#[test]
fn page_heap_fills_arena_exactly() {
    run(vec![
        Op::Alloc(3),
        Op::Alloc(ARENA_PAGES - 3),
        Op::Alloc(1),
        Op::Free(0),
        Op::Alloc(2),
        Op::Alloc(1),
        Op::Alloc(1),
        Op::Resize(0, 1),
        Op::ReleaseAll,
    ]);
}
