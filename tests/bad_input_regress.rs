//! Regression tests for the bad-input defects of issue 12: each failed (no report, a panic elsewhere, or a
//! corrupted count) before the fix.
#![cfg(feature = "std")]

use goheap::check::BadFree;
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;
use std::panic::{catch_unwind, AssertUnwindSafe};

type M = Malloc<MmapSource, ThreadSlots>;

fn hook(b: &BadFree) -> ! {
    panic!("{b}")
}

fn heap() -> Box<M> {
    Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30).with_report_hook(hook))
}

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Runs `f`; the report's message if it panicked (the hook panics with the report), else `None`.
fn report_of(f: impl FnOnce()) -> Option<String> {
    catch_unwind(AssertUnwindSafe(f)).err().map(|e| {
        e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
    })
}

fn expect_report(msg: Option<String>, addr: usize, what: &str) {
    let msg = msg.unwrap_or_else(|| panic!("no report (expected {what} at {addr:#x})"));
    assert!(msg.starts_with("goheap: invalid free"), "not a goheap report: {msg}");
    assert!(msg.contains(&format!("{addr:#x}")), "report does not name {addr:#x}: {msg}");
    assert!(msg.contains(what), "report does not say {what:?}: {msg}");
}

/// A double free into a span the CPU caches, after the first free was folded by the span's sweep: the
/// second deferred free sets a `free_bits` bit whose object is not allocated. Before the fix the sweep only
/// `debug_assert`ed, and in release counted the bit off `nalloc`, so the span later looked emptier than it
/// was and a live object's memory was handed out again. Now it is reported (every build), and the span's
/// count stays exact: the live neighbour is never handed out again.
#[test]
fn double_free_after_fold_into_cached_span() {
    let m = heap();
    let lay = l(64, 8);
    // Both objects come from the span the main thread caches.
    let keep = m.alloc(lay) as usize;
    let x = m.alloc(lay) as usize;
    std::thread::scope(|s| {
        let m = &*m;
        // First free on another thread; its flush defers the free to the main thread's span.
        s.spawn(move || {
            // SAFETY (test): `x` is live; freed once here.
            unsafe { m.dealloc(x as *mut u8, lay) };
            m.flush_cpu_cache();
        })
        .join()
        .unwrap();
    });
    // The main thread folds it (the sweep of its cached span).
    assert_eq!(m.background(0, 0).nfolded, 1);
    // The second free, again through another thread's flush, is the double free.
    let msg = std::thread::scope(|s| {
        let m = &*m;
        s.spawn(move || {
            report_of(|| {
                // SAFETY (test): deliberately bad: `x` is already free.
                unsafe { m.dealloc(x as *mut u8, lay) };
                m.flush_cpu_cache();
            })
        })
        .join()
        .unwrap()
    });
    // With `checks` the free itself reports; without, the main thread's next sweep does.
    let msg = msg.or_else(|| {
        report_of(|| {
            m.background(0, 0);
        })
    });
    expect_report(msg, x, "double free");
    // The sweep dropped the bad free: the span still counts `keep` as allocated, so it is never handed out.
    let got: Vec<usize> = (0..400).map(|_| m.alloc(lay) as usize).collect();
    assert!(!got.contains(&keep), "live object {keep:#x} handed out again");
    let _ = keep;
}

/// Freeing a 16-byte (small, class 2) object with a tiny layout used to decrement a "count" byte that is
/// really user data of another object in the small span.
#[test]
fn tiny_free_of_a_small_object_is_refused() {
    let m = heap();
    let p = m.alloc(l(16, 8));
    let others: Vec<*mut u8> = (0..600).map(|_| m.alloc(l(16, 8))).collect();
    for &o in &others {
        // SAFETY (test): 16-byte objects.
        unsafe { std::ptr::write_bytes(o, 0x5A, 16) };
    }
    // SAFETY (test): deliberately bad: a small object freed with a tiny layout.
    let msg = report_of(|| unsafe { m.dealloc(p, l(8, 8)) });
    expect_report(msg, p as usize, "does not match the object's size class");
    for &o in &others {
        // SAFETY (test): still live.
        assert!(unsafe { std::slice::from_raw_parts(o, 16) }.iter().all(|&b| b == 0x5A), "object {o:p} changed");
    }
}

/// A wild tiny free into a tiny span's count area used to decrement a count byte of the next span (or
/// nothing's): now refused as an interior pointer in every build.
#[test]
fn tiny_free_into_the_count_area_is_refused() {
    let m = heap();
    let p = m.alloc(l(8, 8)) as usize;
    let wild = (p & !(goheap::PAGE_SIZE - 1)) + 8000; // past the blocks of any tiny span layout
                                                      // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(wild as *mut u8, l(8, 8)) });
    expect_report(msg, wild, "interior pointer");
}

/// A stack or static pointer freed as a tiny object is refused at the free, in every build.
#[test]
fn tiny_free_of_a_foreign_pointer_is_refused() {
    static STATIC: [u64; 2] = [0; 2];
    let m = heap();
    let _warm = m.alloc(l(8, 8));
    let a = STATIC.as_ptr() as usize;
    // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(a as *mut u8, l(8, 8)) });
    expect_report(msg, a, "not a live allocation");
}

/// The tiny path was not checked at all: a tiny double free drove the block's count down while a
/// sibling was live (the block was then reused under it). Now reported at the free in every build (the
/// block's done mask already has the object's bit).
#[test]
fn tiny_double_free() {
    let m = heap();
    let a = m.alloc(l(8, 8));
    let _sibling = m.alloc(l(8, 8));
    // SAFETY (test): the first free is good.
    unsafe { m.dealloc(a, l(8, 8)) };
    // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(a, l(8, 8)) });
    expect_report(msg, a as usize, "double free");
}

/// An interior tiny pointer (not the start of a tiny object) is refused at the free in every build (before:
/// without `checks`, counted as a free of the block).
#[test]
fn tiny_interior_pointer() {
    let m = heap();
    let a = m.alloc(l(8, 4));
    // SAFETY (test): deliberately bad.
    let q = unsafe { a.add(4) };
    let msg = report_of(|| unsafe { m.dealloc(q, l(8, 4)) });
    expect_report(msg, q as usize, "interior pointer");
}

/// `realloc` of a freed tiny object is refused before it reads the object (every build).
#[test]
fn realloc_of_a_freed_tiny_object() {
    let m = heap();
    let a = m.alloc(l(8, 8));
    let _sibling = m.alloc(l(8, 8));
    // SAFETY (test): the free is good; the realloc deliberately bad.
    unsafe { m.dealloc(a, l(8, 8)) };
    let msg = report_of(|| unsafe {
        m.realloc(a, l(8, 8), 100);
    });
    expect_report(msg, a as usize, "double free");
}

/// The corruption a tiny double free caused without `checks`: two objects in one retired block, the first
/// freed twice. The block's count reached zero with the sibling live, the block went back to the stock and
/// the next tiny allocations handed the live sibling's bytes out again (and wrote the stock's link into
/// them). Now the second free is refused and the block stays allocated until the sibling is freed.
#[test]
fn tiny_double_free_never_hands_out_a_live_sibling() {
    let m = heap();
    let lay = l(8, 8);
    let a = m.alloc(lay) as usize;
    let sibling = m.alloc(lay) as usize;
    assert_eq!(sibling, a + 8, "two tiny objects packed in one block");
    // SAFETY (test): the sibling is live.
    unsafe { std::ptr::write_bytes(sibling as *mut u8, 0xA5, 8) };
    // Retire the block: both objects were handed out.
    m.flush_cpu_cache();
    // SAFETY (test): the first free is good.
    unsafe { m.dealloc(a as *mut u8, lay) };
    // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(a as *mut u8, lay) });
    let again: Vec<usize> = (0..1000).map(|_| m.alloc(lay) as usize).collect();
    let block = a & !15;
    assert!(!again.iter().any(|&p| p & !15 == block), "the live sibling's block was handed out again");
    // SAFETY (test): the sibling is live.
    assert!(unsafe { std::slice::from_raw_parts(sibling as *const u8, 8) }.iter().all(|&b| b == 0xA5));
    expect_report(msg, a, "double free");
}

/// One-byte tiny objects: offset 15 of a block is never an object's start (the block's done mask reaches
/// `0xffff` only through its retirement), so a block whose objects are all freed before it is retired is
/// freed exactly once. If the owner handed out all 16 offsets, the sixteenth free would free the block while
/// it is current and the retirement would free it again (reported by the flush, and the block handed out
/// twice).
#[test]
fn tiny_block_freed_once_when_all_objects_die_before_retirement() {
    let m = heap();
    let one = l(1, 1);
    let v: Vec<usize> = (0..16).map(|_| m.alloc(one) as usize).collect();
    let block = v[0] & !15;
    assert!(v[..15].iter().all(|&p| p & !15 == block), "15 one-byte objects share a block");
    assert_ne!(v[15] & !15, block, "offset 15 is never a start");
    for &p in &v {
        // SAFETY (test): good frees.
        unsafe { m.dealloc(p as *mut u8, one) };
    }
    // Retires the blocks (the first one's objects all freed) and flushes the stocks to the central list.
    assert_eq!(report_of(|| m.flush_cpu_cache()), None);
    let again: Vec<usize> = (0..4000).map(|_| m.alloc(one) as usize).collect();
    let mut sorted = again.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), again.len(), "a tiny address was handed out twice");
}

/// Without `checks`, a small double free into this CPU's stock used to hand the same object out twice
/// (eight times in a row until the stock flushed): the stock key catches it at the second free.
#[test]
fn small_double_free_into_this_stock_is_caught_at_the_free() {
    let m = heap();
    let p = m.alloc(l(64, 8));
    // SAFETY (test): the first free is good.
    unsafe { m.dealloc(p, l(64, 8)) };
    // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(p, l(64, 8)) });
    expect_report(msg, p as usize, "double free");
}

/// An object whose second word happens to hold the stock key (user data) is freed normally: the key only
/// triggers a scan of the stock, never a false report.
#[test]
fn user_data_equal_to_the_stock_key_is_no_false_report() {
    let m = heap();
    let a = m.alloc(l(64, 8));
    let b = m.alloc(l(64, 8));
    // SAFETY (test): `b` is free; its second word then holds the stock key, which we copy into `a`.
    unsafe {
        m.dealloc(b, l(64, 8));
        let key = *(b as *const usize).add(1);
        *(a as *mut usize).add(1) = key;
        m.dealloc(a, l(64, 8));
    }
    let c = m.alloc(l(64, 8));
    assert_eq!(c, a, "the stock hands the last freed object out first");
}

/// Without `checks`, a stack pointer freed as a small object used to enter the stock and be handed out as
/// heap memory: the arena range check refuses it at the free.
#[test]
fn small_free_of_a_stack_pointer_is_refused_at_the_free() {
    let m = heap();
    let _warm = m.alloc(l(64, 8));
    let mut local = [0u64; 8];
    let a = local.as_mut_ptr() as usize;
    // SAFETY (test): deliberately bad.
    let msg = report_of(|| unsafe { m.dealloc(a as *mut u8, l(64, 8)) });
    expect_report(msg, a, "not a live allocation");
    // Nothing entered the stock: the next allocation is heap memory.
    let p = m.alloc(l(64, 8)) as usize;
    assert_ne!(p, a);
    std::hint::black_box(&mut local);
}

/// `realloc` of a small object with a large layout used to resize the small span in place (here: shrink
/// a 10-page span of 27264-byte objects to 5 pages, under its other objects).
#[test]
fn realloc_validates_the_layout() {
    let m = heap();
    let p = m.alloc(l(27264, 8));
    // SAFETY (test): deliberately bad: a small object described as a large one.
    let msg = report_of(|| unsafe {
        m.realloc(p, l(100_000, 8), 40_000);
    });
    expect_report(msg, p as usize, "does not match the object's size class");
    assert_eq!(m.mem_stats().heap_inuse, 10 * goheap::PAGE_SIZE as u64, "the small span was resized");
}

/// `realloc` used to accept an interior pointer of a large object (and shrink its span in place).
#[test]
fn realloc_refuses_interior_pointers() {
    let m = heap();
    let p = m.alloc(l(100_000, 8));
    // SAFETY (test): deliberately bad.
    let q = unsafe { p.add(8192) };
    let msg = report_of(|| unsafe {
        m.realloc(q, l(100_000, 8), 50_000);
    });
    expect_report(msg, q as usize, "interior pointer");
}

/// `realloc` of a small object at an interior pointer, within its class (the in-place path), is refused.
#[test]
fn realloc_in_place_refuses_interior_pointers() {
    let m = heap();
    let p = m.alloc(l(64, 8));
    // SAFETY (test): deliberately bad.
    let q = unsafe { p.add(16) };
    let msg = report_of(|| unsafe {
        m.realloc(q, l(64, 8), 60);
    });
    expect_report(msg, q as usize, "interior pointer");
}

/// `set_profile_rate(1 << 63)` made the next sampled allocation panic (remainder by zero, or an overflow in
/// debug builds); now the rate is clamped.
#[test]
fn huge_profile_rate_does_not_panic() {
    let m = heap();
    for rate in [1usize << 63, usize::MAX] {
        m.set_profile_rate(rate);
        for _ in 0..100 {
            let p = m.alloc(l(64, 8));
            assert!(!p.is_null());
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
    }
}

/// Rates above 2^62 gave a negative countdown (when the draw's random word had its top bit set): then
/// every allocation was sampled. Clamped, a rate that large samples at most the allocation that drew the
/// first distance. The draws before the switch (at rate 1, one per allocation) move the random sequence on,
/// so some of the sixteen runs draw from a word with its top bit set.
#[test]
fn rate_above_2_pow_62_does_not_sample_every_allocation() {
    for k in 0..16 {
        let m = heap();
        m.set_profile_rate(1);
        for _ in 0..k {
            let p = m.alloc(l(64, 8));
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        let before: u64 = m.profile().iter().map(|b| b.samples).sum();
        m.set_profile_rate(usize::MAX >> 1);
        for _ in 0..1000 {
            let p = m.alloc(l(64, 8));
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        let after: u64 = m.profile().iter().map(|b| b.samples).sum::<u64>() - before;
        assert!(after <= 2, "run {k}: {after} samples out of 1000 allocations");
    }
}

#[cfg(feature = "checks")]
mod with_checks {
    use super::*;

    /// `clobberfree`: a freed small object is filled with a pattern, verified when it is handed out again;
    /// a write after free is reported with its address (here: the object comes back from the stock).
    #[test]
    fn write_after_free_from_the_stock() {
        let m = heap();
        let p = m.alloc(l(64, 8));
        // SAFETY (test): deliberately bad: a write after free (the memory stays mapped: no fault).
        unsafe {
            m.dealloc(p, l(64, 8));
            p.add(40).write(7);
        }
        let msg = report_of(|| {
            std::hint::black_box(m.alloc(l(64, 8)));
        })
        .expect("write after free not reported");
        let at = format!("write after free at {:#x}", p as usize + 40);
        assert!(msg.contains(&at) && msg.contains("span 0x"), "{msg}");
    }

    /// The same when the object went back to its span and is handed out by the span's bitmap.
    #[test]
    fn write_after_free_from_the_span() {
        let m = heap();
        let lay = l(256, 8);
        let objs: Vec<*mut u8> = (0..8).map(|_| m.alloc(lay)).collect();
        let p = objs[3];
        // SAFETY (test): good frees, then a deliberately bad write after free.
        unsafe {
            for &o in &objs {
                m.dealloc(o, lay);
            }
            m.flush_cpu_cache();
            p.add(200).write(0);
        }
        let msg = report_of(|| {
            for _ in 0..64 {
                std::hint::black_box(m.alloc(lay));
            }
        })
        .expect("write after free not reported");
        assert!(msg.contains(&format!("write after free at {:#x}", p as usize + 200)), "{msg}");
    }

    /// Objects freed and handed out again untouched are not reported, whatever path they take.
    #[test]
    fn poison_has_no_false_reports() {
        let m = heap();
        for round in 0..20 {
            let objs: Vec<*mut u8> = (0..300).map(|i| m.alloc(l(16 + 48 * (i % 5), 8))).collect();
            for (i, &o) in objs.iter().enumerate() {
                // SAFETY (test): allocated above with this layout.
                unsafe { m.dealloc(o, l(16 + 48 * (i % 5), 8)) };
            }
            if round % 3 == 0 {
                m.flush_cpu_cache();
            }
        }
    }
}
