//! Use-after-free and overflow detection (issue 12): efence mode (`DebugFlags::EFENCE`, Go's
//! `GODEBUG=efence=1`) and sampled guarded allocations (`Malloc::set_guarded_sample_rate`, KFENCE /
//! GWP-ASan). A fault is observed in a child process (this test binary re-run on one test), which must die of
//! SIGSEGV. (The third mode, `checks`' poisoning of freed objects, is tested in `bad_input_regress.rs`'s
//! `poisoning` module: a write after free is reported with its address.)
#![cfg(feature = "std")]

use goheap::cpu::ThreadSlots;
use goheap::malloc::{DebugFlags, GUARDED_CANARY, GUARDED_SLOTS, QUARANTINE_MIN};
use goheap::source::mmap::MmapSource;
use goheap::{Malloc, PAGE_SIZE};
use std::alloc::Layout;
use std::collections::HashMap;

type M = Malloc<MmapSource, ThreadSlots>;

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

fn efence(max: usize) -> Box<M> {
    Box::new(Malloc::with_max_bytes(MmapSource::strict(), ThreadSlots::new(), max).with_debug(DebugFlags::EFENCE))
}

/// A heap where every allocation is sampled (profile rate 1) and every `n`-th sample is guarded.
fn sampled(n: usize) -> Box<M> {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::strict(), ThreadSlots::new(), 1 << 30));
    m.set_profile_rate(1);
    m.set_guarded_sample_rate(n);
    m
}

/// Runs test `name` of this binary in a child with `GOHEAP_DETECT_CHILD` set, and asserts that it died of
/// SIGSEGV (the child's body must fault before it exits).
fn child_must_segfault(name: &str) {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("GOHEAP_DETECT_CHILD", "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(11),
        "child {name} did not die of SIGSEGV: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

fn in_child() -> bool {
    std::env::var_os("GOHEAP_DETECT_CHILD").is_some()
}

/// The message of the report a bad free or a canary check makes (the default hook panics with it).
fn report_of(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let e = std::panic::catch_unwind(f).expect_err("no report");
    e.downcast_ref::<String>().cloned().unwrap_or_default()
}

mod efence {
    use super::*;

    /// Addresses are never reused: no page of a freed object is handed out again, in any tier's sizes;
    /// the retired pages are counted and the heap's invariants hold.
    #[test]
    fn addresses_are_never_reused() {
        let m = efence(1 << 30);
        let mut pages: HashMap<usize, usize> = HashMap::new();
        let sizes = [1usize, 8, 24, 64, 100, 4096, 8192, 20_000, 70_000];
        let mut pages_used = 0;
        for round in 0..40 {
            for (k, &size) in sizes.iter().enumerate() {
                let align = if k % 3 == 0 { 64 } else { 8 };
                let p = m.alloc(l(size, align));
                assert!(!p.is_null());
                let (first, last) = (p as usize / PAGE_SIZE, (p as usize + size - 1) / PAGE_SIZE);
                for page in first..=last + 1 {
                    // The object's pages and its guard page: none seen before.
                    if let Some(r) = pages.insert(page, round) {
                        panic!("page {page:#x} of a {size} B object (round {round}) reused from round {r}");
                    }
                }
                pages_used += last - first + 2;
                // SAFETY (test): the object is `size` bytes; freed once with its layout.
                unsafe {
                    std::ptr::write_bytes(p, 0x5a, size);
                    m.dealloc(p, l(size, align));
                }
            }
        }
        let st = m.mem_stats();
        assert_eq!(st.heap_objects, 0);
        assert!(st.efence_retired_bytes as usize >= pages_used * PAGE_SIZE, "{st:?}");
        assert_eq!(st.heap_inuse, 0);
        let mut s = [goheap::stats::Sample::new("/goheap/efence/retired:bytes")];
        m.read_metrics(&mut s);
        assert_eq!(s[0].value.uint64(), Some(st.efence_retired_bytes));
        #[cfg(feature = "validate")]
        m.validate();
    }

    /// A read of a freed object faults.
    #[test]
    fn use_after_free_faults() {
        if in_child() {
            let m = efence(1 << 30);
            let p = m.alloc(l(64, 8));
            // SAFETY (test): written while live, then read after free, deliberately.
            unsafe {
                p.write_bytes(1, 64);
                m.dealloc(p, l(64, 8));
                std::hint::black_box(std::ptr::read_volatile(p));
            }
            std::process::exit(0); // not reached if efence works
        }
        child_must_segfault("efence::use_after_free_faults");
    }

    /// With the production page source (`MmapSource::new()`) too.
    #[test]
    fn use_after_free_faults_with_the_default_mmap_source() {
        if in_child() {
            let m = Box::new(
                Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30).with_debug(DebugFlags::EFENCE),
            );
            let p = m.alloc(l(5000, 8));
            // SAFETY (test): freed, then deliberately written after free.
            unsafe {
                m.dealloc(p, l(5000, 8));
                std::ptr::write_volatile(p, 1);
            }
            std::process::exit(0);
        }
        child_must_segfault("efence::use_after_free_faults_with_the_default_mmap_source");
    }

    /// A write past the end faults (the guard page).
    #[test]
    fn overflow_faults() {
        if in_child() {
            let m = efence(1 << 30);
            let p = m.alloc(l(48, 8));
            // SAFETY (test): deliberately writes one byte past the object.
            unsafe { std::ptr::write_volatile(p.add(48), 1) };
            std::process::exit(0);
        }
        child_must_segfault("efence::overflow_faults");
    }

    #[test]
    #[should_panic(expected = "not a live allocation of this heap")]
    fn double_free_is_reported() {
        let m = efence(1 << 30);
        let p = m.alloc(l(64, 8));
        // SAFETY (test): the second free is deliberately bad.
        unsafe {
            m.dealloc(p, l(64, 8));
            m.dealloc(p, l(64, 8));
        }
    }

    /// The arena runs out (addresses are never reused): allocation returns null, never panics, the counts
    /// stay consistent, and live objects stay usable.
    #[test]
    fn exhausted_arena_returns_null() {
        let m = efence(4 << 20); // one 4 MiB chunk: 512 pages, two per 64 B object
        let keep = m.alloc(l(64, 8));
        assert!(!keep.is_null());
        // SAFETY (test): `keep` is 64 bytes, live until the end.
        unsafe { keep.write_bytes(0x77, 64) };
        let mut n = 0;
        loop {
            let p = m.alloc(l(64, 8));
            if p.is_null() {
                break;
            }
            n += 1;
            assert!(n <= 512, "more objects than pages: addresses reused");
            // SAFETY (test): allocated just above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        assert!(n >= 200, "only {n} allocations before null");
        assert!(m.alloc(l(64, 8)).is_null(), "still null");
        assert!(m.alloc(l(100_000, 8)).is_null(), "large too");
        let st = m.mem_stats();
        assert_eq!(st.heap_objects, 1);
        assert_eq!(st.efence_retired_bytes as usize, n * 2 * PAGE_SIZE);
        // SAFETY (test): `keep` is live.
        assert!(unsafe { std::slice::from_raw_parts(keep, 64) }.iter().all(|&b| b == 0x77));
        #[cfg(feature = "validate")]
        m.validate();
        // SAFETY (test): allocated above.
        unsafe { m.dealloc(keep, l(64, 8)) };
    }
}

mod sampled {
    use super::*;

    /// With the production page source (`MmapSource::new()`, `Hosted`'s, which maps its reservations
    /// read-write where the kernel overcommits), a guarded object still faults: the pool's pages are
    /// `mprotect`ed through the source's guard operations.
    #[test]
    fn faults_with_the_default_mmap_source() {
        if in_child() {
            let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30));
            m.set_profile_rate(1);
            m.set_guarded_sample_rate(1);
            let p = m.alloc(l(64, 8));
            assert_eq!(m.guarded_stats().allocs, 1);
            // SAFETY (test): freed, then deliberately read after free.
            unsafe {
                m.dealloc(p, l(64, 8));
                std::hint::black_box(std::ptr::read_volatile(p));
            }
            std::process::exit(0);
        }
        child_must_segfault("sampled::faults_with_the_default_mmap_source");
    }

    /// Off by default: with every allocation sampled and no guarded rate, nothing goes to the pool.
    #[test]
    fn off_by_default() {
        let m = Box::new(Malloc::with_max_bytes(MmapSource::strict(), ThreadSlots::new(), 1 << 30));
        m.set_profile_rate(1);
        for _ in 0..100 {
            let p = m.alloc(l(64, 8));
            // SAFETY (test): allocated just above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        let g = m.guarded_stats();
        assert_eq!((g.allocs, g.reserved_bytes), (0, 0));
        assert!(m.profile().iter().map(|b| b.samples).sum::<u64>() >= 100);
    }

    /// A guarded object ends at its page's end, outside the heap's arena; its canary fills the page before
    /// it; every `n`-th sample is guarded; tiny, small and zeroed requests work, and realloc moves the data.
    #[test]
    fn placement_rate_and_realloc() {
        let m = sampled(1);
        for (size, align) in [(8usize, 8usize), (13, 1), (64, 8), (100, 4), (4096, 64), (8192, 8)] {
            let p = m.alloc(l(size, align));
            assert!(!p.is_null());
            let a = p as usize;
            assert_eq!(a % align, 0);
            let end = (a + size).next_multiple_of(PAGE_SIZE);
            assert!(end - (a + size) < align, "{size}/{align}: object at {a:#x} does not end at its page's end");
            let arena = m.heap().arena_base();
            assert!(a < arena || a >= arena + m.heap().arena_bytes(), "{a:#x} in the arena");
            let page = a & !(PAGE_SIZE - 1);
            // SAFETY (test): the page before the object is the slot's canary (committed with the object).
            assert!(unsafe { std::slice::from_raw_parts(page as *const u8, a - page) }
                .iter()
                .all(|&b| b == GUARDED_CANARY));
            // SAFETY (test): `size` bytes of ours.
            unsafe { p.write_bytes(0x3c, size) };
            // SAFETY (test): realloc to a bigger small size; the data moves (a new sample: guarded again).
            let q = unsafe { m.realloc(p, l(size, align), size + 100) };
            assert!(!q.is_null());
            // SAFETY (test): `q` holds the old `size` bytes.
            assert!(unsafe { std::slice::from_raw_parts(q, size) }.iter().all(|&b| b == 0x3c));
            // SAFETY (test): allocated with this layout.
            unsafe { m.dealloc(q, l(size + 100, align)) };
        }
        let z = m.alloc_zeroed(l(512, 8));
        // SAFETY (test): 512 bytes of ours.
        assert!(unsafe { std::slice::from_raw_parts(z, 512) }.iter().all(|&b| b == 0));
        // SAFETY (test): allocated above.
        unsafe { m.dealloc(z, l(512, 8)) };
        // Larger than a page: the ordinary path, counted as skipped.
        let big = m.alloc(l(20_000, 8));
        assert!(m.heap().span_of(big as usize).is_some());
        // SAFETY (test): allocated above.
        unsafe { m.dealloc(big, l(20_000, 8)) };
        // Six objects, five of their reallocs (8192 + 100 bytes is more than a page), the zeroed one; skipped:
        // that realloc and the 20 000 B object.
        let g = m.guarded_stats();
        assert_eq!((g.allocs, g.frees, g.skipped), (12, 12, 2), "{g:?}");
        assert_eq!(m.mem_stats().live_objects(), 0);

        // Every third sample only.
        let m = sampled(3);
        let ps: Vec<_> = (0..30).map(|_| m.alloc(l(64, 8))).collect();
        assert_eq!(m.guarded_stats().allocs, 10);
        for p in ps {
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        assert_eq!(m.guarded_stats().frees, 10);
        assert_eq!(m.mem_stats().live_objects(), 0);
    }

    /// A freed slot is not reused until at least `QUARANTINE_MIN` other slots were freed after it; when no
    /// slot may be used the allocation takes the ordinary path.
    #[test]
    fn quarantine_delays_reuse() {
        let m = sampled(1);
        let mut freed_at: HashMap<usize, usize> = HashMap::new();
        let mut frees = 0;
        for i in 0..GUARDED_SLOTS * 4 {
            let p = m.alloc(l(64, 8));
            let a = p as usize;
            if let Some(&t) = freed_at.get(&a) {
                assert!(frees - t > QUARANTINE_MIN, "alloc {i}: slot {a:#x} freed {} frees ago", frees - t);
            }
            // SAFETY (test): allocated just above.
            unsafe { m.dealloc(p, l(64, 8)) };
            frees += 1;
            freed_at.insert(a, frees);
        }
        let g = m.guarded_stats();
        assert_eq!(g.allocs, (GUARDED_SLOTS * 4) as u64);
        // Live guarded objects use slots up: the rest of the sampled allocations take the ordinary path.
        let live: Vec<_> = (0..GUARDED_SLOTS).map(|_| m.alloc(l(64, 8))).collect();
        let g2 = m.guarded_stats();
        assert!(g2.skipped > g.skipped, "{g2:?}");
        assert!(g2.allocs - g.allocs <= (GUARDED_SLOTS - QUARANTINE_MIN) as u64, "{g2:?}");
        for p in live {
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(p, l(64, 8)) };
        }
        assert_eq!(m.mem_stats().live_objects(), 0);
    }

    #[test]
    fn use_after_free_faults() {
        if in_child() {
            let m = sampled(1);
            let p = m.alloc(l(64, 8));
            // SAFETY (test): written while live, then deliberately written after free.
            unsafe {
                p.write_bytes(1, 64);
                m.dealloc(p, l(64, 8));
                std::ptr::write_volatile(p, 2);
            }
            std::process::exit(0);
        }
        child_must_segfault("sampled::use_after_free_faults");
    }

    #[test]
    fn overflow_faults() {
        if in_child() {
            let m = sampled(1);
            let p = m.alloc(l(24, 8));
            // SAFETY (test): deliberately writes one byte past the object.
            unsafe { std::ptr::write_volatile(p.add(24), 1) };
            std::process::exit(0);
        }
        child_must_segfault("sampled::overflow_faults");
    }

    /// Bad frees of guarded objects are reported with the address and the reason: double, interior, wrong
    /// layout, and a write before the object (its canary).
    #[test]
    fn bad_frees_are_reported() {
        let m = sampled(1);
        let p = m.alloc(l(64, 8));
        let a = p as usize;
        let msg = report_of(std::panic::AssertUnwindSafe(|| {
            // SAFETY (test): deliberately bad.
            unsafe { m.dealloc(p.add(8), l(56, 8)) }
        }));
        assert!(msg.contains(&format!("{:#x}", a + 8)) && msg.contains("interior pointer"), "{msg}");
        let msg = report_of(std::panic::AssertUnwindSafe(|| {
            // SAFETY (test): deliberately bad.
            unsafe { m.dealloc(p, l(128, 8)) }
        }));
        assert!(msg.contains("does not match"), "{msg}");
        // SAFETY (test): a good free, then a deliberately bad second one.
        unsafe { m.dealloc(p, l(64, 8)) };
        let msg = report_of(std::panic::AssertUnwindSafe(|| {
            // SAFETY (test): deliberately bad.
            unsafe { m.dealloc(p, l(64, 8)) }
        }));
        assert!(msg.contains(&format!("{a:#x}")) && msg.contains("double free"), "{msg}");
        let msg = report_of(std::panic::AssertUnwindSafe(|| {
            // SAFETY (test): deliberately bad.
            unsafe { m.realloc(p, l(64, 8), 100) };
        }));
        assert!(msg.contains("double free"), "{msg}");

        let q = m.alloc(l(40, 8));
        // SAFETY (test): deliberately writes 3 bytes before the object (inside its page: no fault).
        unsafe { q.sub(3).write(0) };
        let msg = report_of(std::panic::AssertUnwindSafe(|| {
            // SAFETY (test): the free finds the canary changed.
            unsafe { m.dealloc(q, l(40, 8)) }
        }));
        assert!(msg.contains(&format!("write out of bounds at {:#x}", q as usize - 3)), "{msg}");
    }

    /// Several threads allocate, fill, hand over and free guarded and ordinary objects at once: every
    /// object keeps its contents, every guarded one is freed exactly once, and the counts balance.
    #[test]
    fn threads_share_the_pool() {
        let m: &'static M = Box::leak(sampled(2));
        let (tx, rx) = std::sync::mpsc::channel::<(usize, usize, u8)>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let workers: Vec<_> = (0..4u8)
            .map(|t| {
                let tx = tx.clone();
                let rx = rx.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..3000usize {
                        let size = [8usize, 24, 64, 200, 1000, 5000][i % 6];
                        let p = m.alloc(l(size, 8));
                        assert!(!p.is_null());
                        let tag = t.wrapping_mul(31).wrapping_add(i as u8);
                        // SAFETY (test): `size` bytes of ours.
                        unsafe { p.write_bytes(tag, size) };
                        if i % 3 == 0 {
                            tx.send((p as usize, size, tag)).unwrap();
                        } else {
                            mine.push((p as usize, size, tag));
                        }
                        if i % 4 == 0 {
                            if let Ok((q, sz, tg)) = rx.lock().unwrap().try_recv() {
                                mine.push((q, sz, tg));
                            }
                        }
                        if mine.len() > 50 {
                            for (q, sz, tg) in mine.drain(..25) {
                                // SAFETY (test): a live object of `sz` bytes, freed once.
                                unsafe {
                                    assert!(std::slice::from_raw_parts(q as *const u8, sz).iter().all(|&b| b == tg));
                                    m.dealloc(q as *mut u8, l(sz, 8));
                                }
                            }
                        }
                    }
                    mine
                })
            })
            .collect();
        drop(tx);
        let mut left: Vec<(usize, usize, u8)> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        left.extend(rx.lock().unwrap().try_iter());
        for (q, sz, tg) in left {
            // SAFETY (test): a live object of `sz` bytes, freed once.
            unsafe {
                assert!(std::slice::from_raw_parts(q as *const u8, sz).iter().all(|&b| b == tg));
                m.dealloc(q as *mut u8, l(sz, 8));
            }
        }
        let g = m.guarded_stats();
        assert!(g.allocs > 1000, "{g:?}");
        assert_eq!(g.allocs, g.frees, "{g:?}");
        m.flush_cpu_cache();
        assert_eq!(m.mem_stats().live_objects(), 0);
    }

    /// The fast free never takes a guarded object into a stock: after a guarded object is freed, ordinary
    /// allocations of its class never hand its address out.
    #[test]
    fn guarded_addresses_never_enter_a_stock() {
        let m = sampled(1);
        let p = m.alloc(l(64, 8));
        // SAFETY (test): allocated above.
        unsafe { m.dealloc(p, l(64, 8)) };
        m.set_guarded_sample_rate(0);
        let ps: Vec<_> = (0..1000).map(|_| m.alloc(l(64, 8))).collect();
        assert!(!ps.contains(&p));
        for q in ps {
            // SAFETY (test): allocated above.
            unsafe { m.dealloc(q, l(64, 8)) };
        }
    }
}
