//! Held spans (`cpucache.rs`, "Held spans"): a span a CPU used up stays cached by that CPU, behind the
//! others it used up, so that frees from other CPUs reach it as deferred frees and the CPU takes it back
//! (no central list, no class-lock list work) once they have; within `HELD_BYTES` per cache, given back by
//! the background step when the class goes idle (a slice per step) and by `flush_cpu_cache`.
#![cfg(feature = "std")]

use goheap::cpu::ThreadSlots;
use goheap::object::cpucache::{HELD_BYTES, HELD_SLICE_SPANS};
use goheap::object::sizeclass::{class_of, CLASSES};
use goheap::source::mmap::MmapSource;
use goheap::{Malloc, PAGE_SIZE};
use std::alloc::Layout;

type M = Malloc<MmapSource, ThreadSlots>;

fn heap() -> &'static M {
    let m: &'static M = Box::leak(Box::new(Malloc::new(MmapSource::new(), ThreadSlots::new())));
    // Sampled objects live outside the spans: keep every object in the span path.
    m.set_profile_rate(0);
    m
}

fn l64() -> Layout {
    Layout::from_size_align(64, 8).unwrap()
}

/// The per-CPU figures of the one cache that allocated.
fn allocator_stats(m: &M) -> goheap::malloc::CpuSummary {
    let v: Vec<_> = (0..=goheap::cpu::MAX_CPUS).map(|i| m.cpu_stats(i)).filter(|s| s.mallocs > 0).collect();
    assert_eq!(v.len(), 1, "one allocating thread: {v:?}");
    v[0]
}

fn free_all(m: &M, v: &[usize]) {
    for &p in v {
        // SAFETY: allocated by `m` with `l64()`, freed once.
        unsafe { m.dealloc(p as *mut u8, l64()) };
    }
}

#[test]
fn a_used_up_span_another_thread_freed_into_comes_back_without_the_central_list() {
    let m = heap();
    let c = class_of(64);
    let nelems = CLASSES[c].nelems as usize;
    // The first span, used up; one more object takes a second span and holds the first.
    let first: Vec<usize> = (0..nelems).map(|_| m.alloc(l64()) as usize).collect();
    assert!(first.iter().all(|&p| p != 0));
    let x = m.alloc(l64()) as usize;
    assert!(x != 0 && !first.contains(&x));
    assert_eq!(m.held_spans(c), 1, "the used-up span is held");
    let before = allocator_stats(m);
    assert_eq!((before.refills, before.held_reuses), (2, 0), "{before:?}");

    // Another thread frees the whole first span and flushes: deferred frees into the held span.
    let f = first.clone();
    std::thread::spawn(move || {
        free_all(m, &f);
        m.flush_cpu_cache();
    })
    .join()
    .unwrap();
    assert_eq!(m.held_spans(c), 1, "another thread's flush leaves the span held");

    // Use up the second span; the next object comes from the first span, taken back.
    let second: Vec<usize> = (0..nelems - 1).map(|_| m.alloc(l64()) as usize).collect();
    let y = m.alloc(l64()) as usize;
    assert!(first.contains(&y), "the next object came from a new span, not the held one the frees reached");
    let after = allocator_stats(m);
    assert_eq!(after.refills, before.refills, "a span was taken from the central list: {after:?}");
    assert_eq!(after.held_reuses, 1, "{after:?}");
    assert_eq!(m.held_spans(c), 1, "the second span is held in its turn");
    // The rest of the first span is handed out again, each object once.
    let rest: Vec<usize> = (0..nelems - 1).map(|_| m.alloc(l64()) as usize).collect();
    let mut again: Vec<usize> = rest.iter().copied().chain([y]).collect();
    again.sort_unstable();
    let mut want = first.clone();
    want.sort_unstable();
    assert_eq!(again, want, "the held span's objects, each handed out once");

    free_all(m, &[x, y]);
    free_all(m, &second);
    free_all(m, &rest);
    m.flush_cpu_cache();
    assert_eq!(m.held_spans(c), 0, "flush_cpu_cache gives the held spans back");
    let st = m.mem_stats();
    assert_eq!((st.heap_objects, st.heap_alloc), (0, 0));
    m.release_all();
    assert_eq!(m.mem_stats().heap_inuse, 0, "pages still in use after every object was freed");
}

#[test]
fn held_spans_stay_within_the_budget_and_an_idle_class_gives_them_back_in_slices() {
    let m = heap();
    let c = class_of(64);
    let (nelems, span_bytes) = (CLASSES[c].nelems as usize, CLASSES[c].npages as usize * PAGE_SIZE);
    let budget_spans = HELD_BYTES / span_bytes;
    // Twenty spans more than the budget holds, all live.
    let v: Vec<usize> = (0..(budget_spans + 20) * nelems + 1).map(|_| m.alloc(l64()) as usize).collect();
    assert!(v.iter().all(|&p| p != 0));
    assert_eq!(m.held_spans(c) as usize, budget_spans, "held spans beyond HELD_BYTES go back to the central list");
    assert_eq!(allocator_stats(m).held_reuses, 0, "nothing was freed into a held span");

    // The first background step marks the class idle; each later one gives a slice back.
    m.background(0, 0);
    assert_eq!(m.held_spans(c) as usize, budget_spans, "a class that just refilled keeps its spans");
    m.background(0, 0);
    assert_eq!(m.held_spans(c) as usize, budget_spans - HELD_SLICE_SPANS);
    m.background(0, 0);
    assert_eq!(m.held_spans(c) as usize, budget_spans - 2 * HELD_SLICE_SPANS);
    // A refill makes the class busy again: the next step only marks it idle.
    let more: Vec<usize> = (0..nelems).map(|_| m.alloc(l64()) as usize).collect();
    let held = m.held_spans(c);
    m.background(0, 0);
    assert_eq!(m.held_spans(c), held, "a class that refilled since the last step keeps its spans");

    free_all(m, &v);
    free_all(m, &more);
    m.flush_cpu_cache();
    assert_eq!(m.held_spans(c), 0);
    m.release_all();
    assert_eq!(m.mem_stats().heap_inuse, 0, "pages still in use after every object was freed");
}
