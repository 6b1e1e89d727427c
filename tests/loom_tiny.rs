//! Loom models of the tiny protocol (`src/object/cpucache.rs`, "The tiny protocol"), on the real code.
//!
//! (a) `tiny_block_freed_from_two_cpus_while_retired`: CPU 0 packs two 7-byte tiny objects into one 16-byte
//! block (offsets 0 and 7); CPU 1 and CPU 2 each free one of them (a `fetch_or` of its start into the
//! block's done mask) while CPU 0 retires the block (its next tiny allocation does not fit: a `fetch_or` of
//! the block's non-starts into the done mask). Whichever of the three operations completes the block frees it
//! into its own CPU's stock, and each CPU then takes a tiny block and uses two 7-byte objects in it (offsets
//! 0 and 7 again), so the completing CPU reuses the block: a shadow cell per object makes loom check that
//! every other CPU's last use of that part of the block happens before the reuse. At the end every block
//! must have come back exactly once.
//!
//! (b) `tiny_double_and_interior_free`: the block retired, CPU 0 and CPU 1 free the same object at once
//! (one of the two frees is a double free) and CPU 1 also frees an interior pointer of the sibling. Exactly
//! one of the racing frees is reported as a double free, the interior free is reported, the live sibling's
//! block is not handed out again, and after the sibling's free every block came back once. (The report hook
//! panics and the model catches it: the default panic hook prints each expected report.)
//!
//! Tiny objects are requests of at most 8 bytes (`object::class::TINY_REQUEST_LIMIT`); until 2026-12-01 they
//! were those under 16, and the models packed two 8-byte objects per block, reused by one 12-byte object
//! (now a size class's).
//!
//! In (a), when both frees come before CPU 0's next allocation, CPU 0 renews the block in place (its done
//! mask equals its starts: no retirement, no trip through the stock) and reuses both objects' bytes at
//! once; otherwise it retires the block as above.
//!
//! Explored (exhaustive: no preemption bound, release build): (a) 465 iterations (94 before the renewal
//! existed), (b) 4; a few seconds together. The CPUs are primed (each has a current block with no room for a 7-byte object, and a cached
//! tiny span) so the threads take blocks from their own stock or span: the central lists are
//! `loom_remote_free`'s model. Since 2026-12-01 these allocations and frees run on the tiny fast paths
//! (leaf sections: `Malloc::alloc_tiny_or`, `Malloc::dealloc_tiny`), and the models exercise them.
//! Weakenings caught (each tried on the source, then restored; the first two again on 2026-12-01):
//! - `tiny_release`'s (`src/object/class.rs`) `fetch_or(bit, AcqRel)` → `Relaxed`: (a) fails with
//!   "Causality violation: Concurrent write accesses to `UnsafeCell`" on a shadow cell of the block;
//! - `retire_tiny_masks`'s (`src/object/cpucache.rs`) `fetch_or(!starts, AcqRel)` → `Relaxed`: (a) fails
//!   with the same causality violation (CPU 0 reuses the block without acquiring the frees of CPUs 1 and 2);
//! - `renew_tiny`'s (`src/object/cpucache.rs`) `load(Acquire)` of the done mask → `Relaxed`: (a) fails with
//!   the same causality violation (CPU 0 renews the block without acquiring the other CPUs' frees);
//! - `tiny_release`'s completion check on `old` instead of `old | bit`: the last free never frees its block,
//!   and (a) fails its "every tiny block came back once" assertion.
#![cfg(loom)]

mod loom_common;

use goheap::check::BadFree;
use loom_common::*;
use std::alloc::Layout;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

/// A 7-byte tiny object: two fill a block's first 14 bytes, and a block at offset 10 or more has no room
/// for one.
fn l7() -> Layout {
    Layout::from_size_align(7, 1).unwrap()
}

/// A 3-byte tiny object: after a 7-byte one (offset 7) it leaves the block with no room for a 7-byte one.
fn l3() -> Layout {
    Layout::from_size_align(3, 1).unwrap()
}

/// One CPU's part after its free: two 7-byte tiny objects (its current block has no room for them, so it
/// takes a block: the one just freed if this CPU's free or retirement completed it, whose objects sat at
/// the same offsets), used and freed.
fn alloc_use_free(m: &M, s: &Shadow, v: u64) {
    let p = m.alloc(l7()) as usize;
    let p2 = m.alloc(l7()) as usize;
    assert!(p != 0 && p2 == p + 7, "two 7-byte objects at the start of a fresh block");
    s.write(p, v);
    s.write(p2, v);
    // SAFETY: `p` and `p2` are ours.
    unsafe {
        m.dealloc(p as *mut u8, l7());
        m.dealloc(p2 as *mut u8, l7());
    }
}

/// Gives CPU `cpu` a current tiny block with no room for a 7-byte object (and a cached tiny span with free
/// blocks), so the model's threads take blocks from their stock or span, never from the central list: the
/// model explores the tiny protocol, not the central lists (`loom_remote_free` does those). Returns the
/// two objects that hold the block.
fn prime(m: &M, cpu: usize) -> (usize, usize) {
    set_cpu(Some(cpu));
    let (x, y) = (m.alloc(l7()) as usize, m.alloc(l3()) as usize);
    assert!(x != 0 && y == x + 7);
    (x, y)
}

/// Frees the two objects `prime` returned.
fn unprime(m: &M, (x, y): (usize, usize)) {
    // SAFETY: `prime`'s objects, ours.
    unsafe {
        m.dealloc(x as *mut u8, l7());
        m.dealloc(y as *mut u8, l3());
    }
}

/// Both models, one after the other: loom's iteration generation and goheap's raw-atomic table are
/// process-wide, so two models must not run at once (one `#[test]` per file, as in the other models).
#[test]
fn tiny_protocol() {
    tiny_block_freed_from_two_cpus_while_retired();
    tiny_double_and_interior_free();
}

fn tiny_block_freed_from_two_cpus_while_retired() {
    run("tiny_block_freed_from_two_cpus_while_retired", builder(None), || {
        let m: Arc<M> = Arc::from(new_malloc());
        // Warm-up (see `loom_common::warm_up`): the atomics every tiny path touches exist before the threads.
        warm_up(&m, &[Some(1), Some(2), Some(0)], &[l7(), l3()]);
        let (x1, x2) = (prime(&m, 1), prime(&m, 2));
        set_cpu(Some(0));
        let (a, b) = (m.alloc(l7()) as usize, m.alloc(l7()) as usize);
        assert!(a != 0 && b == a + 7, "two tiny objects packed in one block");
        let shadow = Arc::new(Shadow::new(&[a, b]));
        shadow.write(a, 1);
        shadow.write(b, 1);
        let cpu = |i: usize, p: usize| {
            let (m, s) = (m.clone(), shadow.clone());
            spawn(move || {
                set_cpu(Some(i));
                s.write(p, 10 + i as u64);
                // SAFETY: `p` is live and ours (handed over by the spawn).
                unsafe { m.dealloc(p as *mut u8, l7()) };
                alloc_use_free(&m, &s, 20 + i as u64);
            })
        };
        let (t1, t2) = (cpu(1, a), cpu(2, b));
        // CPU 0: the block has no room, so this allocation renews it (if both frees came first) or takes a
        // new block and retires the old one (the 3-byte filler leaves the block with no room either); the
        // next ones take another block (the old one, if the retirement completed it).
        let (q, q3) = (m.alloc(l7()) as usize, m.alloc(l3()) as usize);
        assert!(q != 0 && q3 == q + 7);
        shadow.write(q, 30);
        alloc_use_free(&m, &shadow, 31);
        t1.join().unwrap();
        t2.join().unwrap();
        // `q`, `x1` and `x2` are ours (the last two handed back by the joins).
        unprime(&m, (q, q3));
        unprime(&m, x1);
        unprime(&m, x2);
        for cpu in [1, 2, 0] {
            set_cpu(Some(cpu));
            m.flush_cpu_cache();
        }
        assert_eq!(m.mem_stats().heap_objects, 0, "every tiny block came back once");
        #[cfg(feature = "validate")]
        m.validate();
    });
}

fn hook(b: &BadFree) -> ! {
    panic!("{b}")
}

/// Runs `f`; the report's message if it panicked (the hook panics with the report).
fn report_of(f: impl FnOnce()) -> Option<String> {
    catch_unwind(AssertUnwindSafe(f)).err().map(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
    })
}

fn tiny_double_and_interior_free() {
    run("tiny_double_and_interior_free", builder(None), || {
        // The models' allocator, with a report hook that panics (each bad free below is caught).
        let m: Arc<M> = Arc::new((*new_malloc()).with_report_hook(hook));
        warm_up(&m, &[Some(1), Some(0)], &[l7(), l3()]);
        let (a, b) = (m.alloc(l7()) as usize, m.alloc(l7()) as usize);
        assert!(a != 0 && b == a + 7, "two tiny objects packed in one block");
        // Retire the block: it has no room, so this takes a new one (kept live to the end).
        let q = m.alloc(l7()) as usize;
        assert!(q != 0 && q & !15 != a & !15);
        let m1 = m.clone();
        let t = spawn(move || {
            set_cpu(Some(1));
            // SAFETY (test): one of the two frees of `a` is deliberately bad; so is the interior free.
            let first = report_of(|| unsafe { m1.dealloc(a as *mut u8, l7()) });
            let interior = report_of(|| unsafe { m1.dealloc((b + 4) as *mut u8, l3()) });
            let p = m1.alloc(l7()) as usize;
            (first, interior, p)
        });
        // SAFETY (test): as above.
        let here = report_of(|| unsafe { m.dealloc(a as *mut u8, l7()) });
        let p0 = m.alloc(l7()) as usize;
        let (there, interior, p1) = t.join().unwrap();
        let reports: Vec<&String> = [&here, &there].into_iter().flatten().collect();
        assert_eq!(reports.len(), 1, "exactly one of two racing frees is a double free: {here:?} {there:?}");
        let want = format!("invalid free of {a:#x}: double free");
        assert!(reports[0].contains(&want), "{}", reports[0]);
        let interior = interior.expect("interior free reported");
        assert!(interior.contains(&format!("invalid free of {:#x}: interior pointer", b + 4)), "{interior}");
        // The sibling `b` is live: its block is not handed out again.
        for p in [p0, p1] {
            assert!(p != 0 && p & !15 != b & !15, "the live sibling's block was handed out again");
        }
        // SAFETY (test): good frees; `p1` was handed over by the join.
        unsafe {
            m.dealloc(b as *mut u8, l7());
            m.dealloc(p0 as *mut u8, l7());
            m.dealloc(p1 as *mut u8, l7());
            m.dealloc(q as *mut u8, l7());
        }
        m.flush_cpu_cache();
        set_cpu(Some(1));
        m.flush_cpu_cache();
        assert_eq!(m.mem_stats().heap_objects, 0, "every tiny block came back once");
        #[cfg(feature = "validate")]
        m.validate();
    });
}
