//! Loom model (b): the objects of one tiny block freed from two CPUs at once. CPU 0 packs two 8-byte
//! tiny objects into one 16-byte block and retires the block (its count becomes 2); CPU 0 and CPU 1 each
//! free one object (`fetch_sub` AcqRel on the block's count) and then allocate a tiny object. Whichever
//! free brings the count to 0 frees the block into its own CPU's stock, so that CPU's next tiny object
//! may be the same block: a shadow cell per object (the two halves of the block) makes loom check that
//! the other CPU's last use of its half happens before the reuse.
//!
//! Explored: 36 iterations (exhaustive: no preemption bound), under a second.
//! Weakening caught: `free_tiny`'s `fetch_sub(1, AcqRel)` → `Relaxed` (src/object/cpucache.rs): loom
//! reports "Causality violation: Concurrent write accesses to `UnsafeCell`" on a shadow cell of the
//! block at once (in the first iterations).
#![cfg(loom)]

mod loom_common;

use loom_common::*;
use std::alloc::Layout;
use std::sync::Arc;

#[test]
fn tiny_block_freed_from_two_cpus() {
    run("tiny_block_freed_from_two_cpus", builder(None), || {
        set_cpu(Some(0));
        let m: Arc<M> = Arc::from(new_malloc());
        let l8 = Layout::from_size_align(8, 8).unwrap();
        let (a, b) = (m.alloc(l8) as usize, m.alloc(l8) as usize);
        assert!(a != 0 && b == a + 8, "two tiny objects packed in one block");
        // Retires the block: its count becomes 2 (two objects handed out, none freed).
        m.flush_cpu_cache();
        // Warm-up (see `loom_common::warm_up`): one tiny free on this thread first, so the atomics every free
        // reads (the guarded pool's bounds) exist before two threads read them; its block is retired too.
        let x = m.alloc(l8);
        assert!(!x.is_null());
        // SAFETY: `x` is ours.
        unsafe { m.dealloc(x, l8) };
        m.flush_cpu_cache();
        let shadow = Arc::new(Shadow::new(&[a, b]));
        shadow.write(a, 1);
        shadow.write(b, 1);
        // Uses the 12-byte tiny object at `p`: the halves of its block it covers.
        let use_obj = |s: &Shadow, p: usize, v: u64| {
            let block = p & !15;
            s.write(block, v);
            if p + 12 > block + 8 {
                s.write(block + 8, v);
            }
        };
        let (m1, s1) = (m.clone(), shadow.clone());
        let t = spawn(move || {
            set_cpu(Some(1));
            s1.write(b, 2);
            // SAFETY: `b` is live and ours (handed over by the spawn).
            unsafe { m1.dealloc(b as *mut u8, l8) };
            let l12 = Layout::from_size_align(12, 4).unwrap();
            let p = m1.alloc(l12) as usize;
            assert!(p != 0);
            use_obj(&s1, p, 3);
            // SAFETY: `p` is ours.
            unsafe { m1.dealloc(p as *mut u8, l12) };
            m1.flush_cpu_cache();
        });
        shadow.write(a, 4);
        // SAFETY: `a` is live and ours.
        unsafe { m.dealloc(a as *mut u8, l8) };
        let l12 = Layout::from_size_align(12, 4).unwrap();
        let p = m.alloc(l12) as usize;
        assert!(p != 0);
        use_obj(&shadow, p, 5);
        t.join().unwrap();
        // SAFETY: `p` is ours.
        unsafe { m.dealloc(p as *mut u8, l12) };
        m.flush_cpu_cache();
        let s = m.mem_stats();
        assert_eq!(s.heap_objects, 0, "every tiny block came back once");
        #[cfg(feature = "validate")]
        m.validate();
    });
}
