//! Loom model (e): the CPU guard and the lock order. Three threads take goheap's locks along different
//! paths at once: CPU 0 refills a small class (its Central lock, then the heap lock for a fresh span); a
//! thread without a cache index uses the shared cache (the shared cache's lock, then a Central lock and
//! the heap lock); CPU 1 runs `release_all` (the shared cache's lock, the Central locks one at a time,
//! the heap lock, and the scavenger's decommit outside it). Loom must find no deadlock (a lock-order
//! cycle leaves every thread spinning: loom reports it when its branch limit is hit) and, through the
//! lock's holder cell (`sync::SpinMutex` under loom), that every holder of a lock happens after the
//! previous one.
//!
//! Explored: 94 iterations (1–2 s) with the preemption bound of 1 it sets (`LOOM_MAX_PREEMPTIONS`
//! overrides it): three threads through the whole allocator (every Central lock, the heap, the
//! scavenger) are too many interleavings to exhaust; at bound 2 the model ran over 5 minutes.
//! Weakening caught: the lock's release (`SpinMutexGuard::drop`, src/sync.rs) storing `false` with
//! `Relaxed` instead of `Release`: loom reports "Causality violation: Concurrent write accesses to
//! `UnsafeCell`" on the holder cell (created at src/sync.rs), at once.
#![cfg(loom)]

mod loom_common;

use loom_common::*;
use std::alloc::Layout;
use std::sync::Arc;

#[test]
fn lock_order_no_deadlock() {
    run("lock_order_no_deadlock", builder(Some(1)), || {
        let m: Arc<M> = Arc::from(new_malloc());
        let l = Layout::from_size_align(4096, 8).unwrap();
        warm_up(&m, &[Some(1), None, Some(0)], &[l]);
        let (m1, m2) = (m.clone(), m.clone());
        let shared = spawn(move || {
            set_cpu(None);
            let p = m1.alloc(l);
            assert!(!p.is_null());
            // SAFETY: `p` is ours.
            unsafe { m1.dealloc(p, l) };
        });
        let releaser = spawn(move || {
            set_cpu(Some(1));
            m2.release_all();
        });
        let p = m.alloc(l);
        assert!(!p.is_null());
        // SAFETY: `p` is ours.
        unsafe { m.dealloc(p, l) };
        shared.join().unwrap();
        releaser.join().unwrap();
        m.flush_cpu_cache();
        m.release_all();
        let s = m.mem_stats();
        assert_eq!(s.heap_objects, 0);
        #[cfg(feature = "validate")]
        m.validate();
    });
}
