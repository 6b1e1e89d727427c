//! Loom model (a): a free into a span another CPU caches. CPU 1 frees an object of a span CPU 0 caches
//! and flushes its cache: the Central flush records the free in the span's `free_bits` (`defer_free_mask`,
//! `fetch_or` Release, under the class lock) while CPU 0, whose span is full, either folds the deferred
//! frees itself (`Span::sweep`: `swap` Acquire, no lock) and allocates the freed object again, or gives the
//! span back and takes another in one hold of the class lock (`Central::swap_span`: the span is swept under
//! the lock, filed, and a partial span, possibly the same one, or a fresh one is taken). A shadow cell per
//! object makes loom check that CPU 1's last use of the object happens before CPU 0's next one.
//!
//! Since used-up spans are *held* (`CpuCache::cycle_held`: a span that runs out stays cached by its CPU,
//! behind the others it used up, until it is taken back or given back), CPU 0's full span may also be held
//! and a third allocation take a fresh span; the free then stays deferred until `flush_cpu_cache` gives the
//! held span back (`Central::uncache_span`, swept under the lock). Model (b), `remote_free_into_held_span`,
//! has the free reach the *older* of two used-up spans while CPU 0 uses up the second: CPU 0 takes the held
//! one back with the same unlocked sweep when the free has reached it.
//!
//! Explored (exhaustive: no preemption bound), on an idle host: (a) 156 iterations in 0.7 s (62 before
//! spans were held, 306 before `swap_span`, when giving the span back and taking another were two holds of
//! the lock); (b) 62 iterations in 0.3 s.
//! Weakening caught: `defer_free_mask`'s `fetch_or` Release → Relaxed (src/page/span.rs) makes loom
//! report a causality violation on the object's shadow cell (CPU 0 reuses the object without
//! synchronising with CPU 1's use): "Causality violation: Concurrent write accesses to `UnsafeCell`",
//! found in 0.1 s by (a) and by (b) (in (b) only the held span's reuse hands `p` out again before the end).
#![cfg(loom)]

mod loom_common;

use loom_common::*;
use std::alloc::Layout;
use std::sync::Arc;

/// CPU 1's part of both models: a last use of object `p`, its free, and a flush of CPU 1's cache (the
/// Central flush that defers the free to the span's caching CPU).
fn free_on_cpu1(m: &Arc<M>, shadow: &Arc<Shadow>, p: usize, l: Layout) -> loom::thread::JoinHandle<()> {
    let (m1, s1) = (m.clone(), shadow.clone());
    spawn(move || {
        set_cpu(Some(1));
        s1.write(p, 2);
        // SAFETY: `p` is live and ours (handed over by the spawn).
        unsafe { m1.dealloc(p as *mut u8, l) };
        m1.flush_cpu_cache();
    })
}

/// CPU 0's end of both models: frees its live objects `live` (`p` was freed by CPU 1, or is one of them),
/// flushes its cache, and checks that every allocation was freed exactly once.
fn free_all_and_check(m: &M, live: &[usize], l: Layout) {
    for &x in live {
        // SAFETY: live, allocated by `m` with `l`, freed once.
        unsafe { m.dealloc(x as *mut u8, l) };
    }
    m.flush_cpu_cache();
    let s = m.mem_stats();
    assert_eq!(s.mallocs, s.frees, "every allocation freed exactly once");
    assert_eq!(s.heap_objects, 0);
    #[cfg(feature = "validate")]
    m.validate();
}

#[test]
fn remote_free_into_cached_span() {
    run("remote_free_into_cached_span", builder(None), || {
        set_cpu(Some(0));
        let m: Arc<M> = Arc::from(new_malloc());
        // Class 44: 4096-byte objects, two per one-page span: after two allocations CPU 0's span is full.
        let l = Layout::from_size_align(4096, 8).unwrap();
        let (p, q) = (m.alloc(l) as usize, m.alloc(l) as usize);
        assert!(p != 0 && q != 0 && p != q);
        let shadow = Arc::new(Shadow::new(&[p, q]));
        shadow.write(p, 1);
        let t = free_on_cpu1(&m, &shadow, p, l);
        let r = m.alloc(l) as usize;
        assert!(r != 0 && r != q, "object handed out twice");
        shadow.write(r, 3);
        t.join().unwrap();
        free_all_and_check(&m, &[q, r], l);
    });
}

/// The same free into a span CPU 0 *holds*: CPU 0 used up its first span (p, q) and allocates from a second
/// (u) when CPU 1 frees `p` and flushes; CPU 0's next allocations use up the second span, put it behind the
/// first on its held queue and take the first back if CPU 1's deferred free has reached it (`Span::sweep`
/// of a held span, no lock: `CpuCache::cycle_held`), else a third span. Either way the object comes back
/// to CPU 0 only after CPU 1's last use of it, and `flush_cpu_cache` gives every held span back.
#[test]
fn remote_free_into_held_span() {
    run("remote_free_into_held_span", builder(None), || {
        set_cpu(Some(0));
        let m: Arc<M> = Arc::from(new_malloc());
        let l = Layout::from_size_align(4096, 8).unwrap();
        let (p, q) = (m.alloc(l) as usize, m.alloc(l) as usize);
        let u = m.alloc(l) as usize;
        assert!(p != 0 && q != 0 && u != 0 && p != q && u != p && u != q);
        assert_eq!(m.held_spans(44), 1, "the used-up first span is held");
        let shadow = Arc::new(Shadow::new(&[p, q, u]));
        shadow.write(p, 1);
        let t = free_on_cpu1(&m, &shadow, p, l);
        // The second span's other object, then one more: the second span is used up and held.
        let v = m.alloc(l) as usize;
        let r = m.alloc(l) as usize;
        assert!(v != 0 && r != 0 && r != q && r != u && r != v && v != q && v != u, "object handed out twice");
        shadow.write(r, 3);
        t.join().unwrap();
        free_all_and_check(&m, &[q, u, v, r], l);
        assert_eq!(m.held_spans(44), 0, "flush_cpu_cache gives the held spans back");
    });
}
