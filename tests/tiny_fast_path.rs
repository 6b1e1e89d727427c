//! The tiny fast paths (`Malloc::alloc_tiny_or`, `Malloc::dealloc_tiny`): once a CPU has a tiny block and a
//! few blocks in its tiny-class stock, allocating and freeing objects of 1 to 8 bytes takes leaf sections
//! only, never a full `enter` section (until 2026-12-01 every tiny allocation and free took the general
//! path: one `enter` section each). And what the leaf paths do is what the general path did: objects never
//! overlap, blocks come back once, double and interior frees are reported, the counts add up.
#![cfg(feature = "std")]

use core::alloc::Layout;
use std::cell::Cell;

use goheap::check::BadFree;
use goheap::cpu::{CpuProvider, ThreadSlots};
use goheap::source::mmap::MmapSource;
use goheap::{DebugFlags, Malloc};

thread_local! {
    static ENTERS: Cell<usize> = const { Cell::new(0) };
    static LEAVES: Cell<usize> = const { Cell::new(0) };
}

/// (full sections, leaf sections) this thread opened since the last call.
fn sections() -> (usize, usize) {
    (ENTERS.with(|c| c.replace(0)), LEAVES.with(|c| c.replace(0)))
}

/// The host's provider, counting the sections of each kind.
struct Counting(ThreadSlots);

// SAFETY: forwards to `ThreadSlots`, which upholds the contract; the guards are its own.
unsafe impl CpuProvider for Counting {
    type Guard<'a> = <ThreadSlots as CpuProvider>::Guard<'a>;
    fn enter(&self) -> (Self::Guard<'_>, Option<usize>) {
        ENTERS.with(|c| c.set(c.get() + 1));
        self.0.enter()
    }
    type LeafGuard<'a> = <ThreadSlots as CpuProvider>::LeafGuard<'a>;
    fn enter_leaf(&self) -> (Self::LeafGuard<'_>, Option<usize>) {
        LEAVES.with(|c| c.set(c.get() + 1));
        self.0.enter_leaf()
    }
    fn departures(&self, i: usize) -> u32 {
        self.0.departures(i)
    }
    fn adopt(&self, i: usize) -> bool {
        self.0.adopt(i)
    }
    unsafe fn release_adopted(&self, i: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.0.release_adopted(i) }
    }
}

fn hook(b: &BadFree) -> ! {
    panic!("{b}")
}

fn new_malloc() -> Box<Malloc<MmapSource, Counting>> {
    Box::new(Malloc::with_max_bytes(MmapSource::new(), Counting(ThreadSlots::new()), 1 << 30).with_report_hook(hook))
}

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Every tiny request shape: sizes 1 to 8, each alignment up to its size's power of two and 8.
fn shapes() -> Vec<Layout> {
    (1..=8usize)
        .flat_map(|s| [1usize, 2, 4, 8].into_iter().filter(move |&a| a <= s.next_power_of_two()).map(move |a| l(s, a)))
        .collect()
}

#[test]
fn tiny_pairs_take_leaf_sections_only() {
    std::thread::spawn(|| {
        let m = new_malloc();
        let shapes = shapes();
        // Warm up: the thread's slot, a tiny block, a cached tiny span and blocks on the stock.
        for &lay in shapes.iter().cycle().take(1000) {
            let p = m.alloc(lay);
            // SAFETY (test): allocated above with `lay`.
            unsafe { m.dealloc(p, lay) };
        }
        sections();
        let mut n = 0;
        for round in 0..2000 {
            let lay = shapes[round % shapes.len()];
            let p = m.alloc(lay);
            assert!(!p.is_null());
            assert_eq!(p as usize % lay.align(), 0, "{lay:?} at {p:?}");
            // SAFETY (test): `p` is a fresh allocation of `lay`; freed once with it.
            unsafe {
                std::ptr::write_bytes(p, 0xa5, lay.size());
                m.dealloc(p, lay);
            }
            n += 1;
        }
        let (enters, leaves) = sections();
        assert_eq!(enters, 0, "tiny pairs took full sections ({leaves} leaf sections for {n} pairs)");
        assert_eq!(leaves, 2 * n, "a leaf section per allocation and per free");
        #[cfg(feature = "validate")]
        m.validate();
    })
    .join()
    .unwrap();
}

/// A block whose objects were all freed is started over in place when the next object does not fit
/// (the tiny protocol's *renew*): alloc+free churn of tiny objects then takes no block from the 16-byte class
/// at all (before, every block that filled up went back to the stock and another came off it).
#[test]
fn a_freed_block_is_started_over_in_place() {
    std::thread::spawn(|| {
        let m = new_malloc();
        let lay = l(8, 8);
        let p0 = m.alloc(lay);
        // SAFETY (test): allocated above with `lay`.
        unsafe { m.dealloc(p0, lay) };
        let class16 = goheap::object::sizeclass::class_of(16);
        let blocks_before = m.mem_stats().by_size[class16].mallocs;
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let p = m.alloc(lay);
            assert!(!p.is_null());
            seen.insert(p as usize & !15);
            // SAFETY (test): allocated above with `lay`; freed once.
            unsafe { m.dealloc(p, lay) };
        }
        let st = m.mem_stats();
        assert_eq!(st.by_size[class16].mallocs, blocks_before, "the churn took blocks off the class");
        assert_eq!(seen.len(), 1, "the churn moved between blocks: {seen:x?}");
        assert_eq!(st.tiny_allocs, st.tiny_frees);
        // With a live object left in the block, the next block is a new one, and the live object stays intact.
        let keep = m.alloc(lay);
        // SAFETY (test): a fresh 8-byte allocation.
        unsafe { keep.cast::<u64>().write(0x1234_5678_9abc_def0) };
        let other = m.alloc(lay);
        let third = m.alloc(lay);
        assert_ne!(third as usize & !15, keep as usize & !15, "a block with a live object was started over");
        // SAFETY (test): `keep` is live and was written above.
        assert_eq!(unsafe { keep.cast::<u64>().read() }, 0x1234_5678_9abc_def0);
        for p in [keep, other, third] {
            // SAFETY (test): allocated above with `lay`; freed once.
            unsafe { m.dealloc(p, lay) };
        }
        #[cfg(feature = "validate")]
        m.validate();
    })
    .join()
    .unwrap();
}

#[test]
fn tiny_batches_never_overlap_and_come_back() {
    std::thread::spawn(|| {
        let m = new_malloc();
        let shapes = shapes();
        for round in 0..4u8 {
            let mut live: Vec<(*mut u8, Layout, u8)> = Vec::new();
            for (i, &lay) in shapes.iter().cycle().take(6000).enumerate() {
                let p = m.alloc(lay);
                assert!(!p.is_null());
                assert_eq!(p as usize % lay.align(), 0);
                let v = (i as u8).wrapping_mul(31).wrapping_add(round);
                // SAFETY (test): a fresh allocation of `lay`.
                unsafe { std::ptr::write_bytes(p, v, lay.size()) };
                live.push((p, lay, v));
            }
            // Free every other object first (blocks with live neighbours), then the rest, checking that no
            // object was overwritten by another's allocation.
            for pass in 0..2 {
                for (i, &(p, lay, v)) in live.iter().enumerate() {
                    if i % 2 != pass {
                        continue;
                    }
                    // SAFETY (test): live, `lay.size()` bytes; freed once.
                    unsafe {
                        assert!(
                            std::slice::from_raw_parts(p, lay.size()).iter().all(|&b| b == v),
                            "object {p:?} overwritten"
                        );
                        m.dealloc(p, lay);
                    }
                }
            }
            let st = m.mem_stats();
            assert_eq!(st.tiny_allocs, st.tiny_frees, "{st:?}");
            // Every block but the current one is free again.
            assert!(st.heap_objects <= 1, "{st:?}");
        }
        m.flush_cpu_cache();
        let st = m.mem_stats();
        assert_eq!((st.heap_alloc, st.heap_objects, st.mallocs - st.frees), (0, 0, 0), "{st:?}");
        #[cfg(feature = "validate")]
        m.validate();
    })
    .join()
    .unwrap();
}

fn report_of(f: impl FnOnce()) -> Option<String> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    r.err().map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
}

#[test]
fn tiny_fast_free_reports_bad_frees() {
    std::thread::spawn(|| {
        let m = new_malloc();
        let lay = l(4, 4);
        // Warm up so the frees below take the leaf path.
        for _ in 0..100 {
            let p = m.alloc(lay);
            // SAFETY (test): allocated above with `lay`.
            unsafe { m.dealloc(p, lay) };
        }
        let a = m.alloc(lay);
        let b = m.alloc(lay);
        // SAFETY (test): `a` is live; freed once here.
        unsafe { m.dealloc(a, lay) };
        // SAFETY (test): a double free, which the allocator must refuse.
        let r = report_of(|| unsafe { m.dealloc(a, lay) }).expect("double free not reported");
        assert!(r.contains("double free") && r.contains(&format!("{:#x}", a as usize)), "{r}");
        // SAFETY (test): an interior pointer of live `b`, which the allocator must refuse.
        let inner = unsafe { b.add(1) };
        let r = report_of(|| unsafe { m.dealloc(inner, l(1, 1)) }).expect("interior free not reported");
        assert!(r.contains(&format!("{:#x}", inner as usize)), "{r}");
        // SAFETY (test): a misaligned pointer for the layout, which the allocator must refuse.
        let r = report_of(|| unsafe { m.dealloc(inner, lay) }).expect("misaligned free not reported");
        assert!(r.contains("align"), "{r}");
        // `b` is still live and frees normally; nothing was freed twice.
        // SAFETY (test): `b` is live; freed once.
        unsafe { m.dealloc(b, lay) };
        let st = m.mem_stats();
        assert_eq!(st.tiny_allocs, st.tiny_frees, "{st:?}");
        #[cfg(feature = "validate")]
        m.validate();
    })
    .join()
    .unwrap();
}

#[test]
fn a_debug_knob_closes_the_tiny_fast_paths() {
    std::thread::spawn(|| {
        let m = Box::new(
            Malloc::with_max_bytes(MmapSource::new(), Counting(ThreadSlots::new()), 1 << 30)
                .with_debug(DebugFlags::NO_TINY),
        );
        let lay = l(4, 4);
        for _ in 0..100 {
            let p = m.alloc(lay);
            // SAFETY (test): allocated above with `lay`.
            unsafe { m.dealloc(p, lay) };
        }
        let st = m.mem_stats();
        assert_eq!(st.tiny_allocs, 0, "notiny: no tiny object, {st:?}");
    })
    .join()
    .unwrap();
}
