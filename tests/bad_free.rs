//! Each kind of bad free gives its report: address, reason, and the span and class where there is one.
#![cfg(feature = "std")]

use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;

fn heap() -> Box<Malloc<MmapSource, ThreadSlots>> {
    Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30))
}

fn l(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

#[test]
#[should_panic(expected = "not a live allocation of this heap")]
fn large_foreign_pointer() {
    let m = heap();
    let mut local = [0u64; 8];
    // SAFETY (test): deliberately bad; goheap must refuse before touching anything.
    unsafe { m.dealloc(local.as_mut_ptr() as *mut u8, l(100_000, 8)) };
}

#[test]
#[should_panic(expected = "not a live allocation of this heap")]
fn large_double_free() {
    let m = heap();
    let p = m.alloc(l(100_000, 8));
    // SAFETY (test): the second free is deliberately bad.
    unsafe {
        m.dealloc(p, l(100_000, 8));
        m.dealloc(p, l(100_000, 8));
    }
}

#[test]
#[should_panic(expected = "interior pointer")]
fn large_interior_pointer() {
    let m = heap();
    let p = m.alloc(l(100_000, 8));
    // SAFETY (test): deliberately bad.
    unsafe { m.dealloc(p.add(8192), l(100_000, 8)) };
}

#[cfg(feature = "checks")]
mod with_checks {
    use super::*;

    #[test]
    #[should_panic(expected = "double free")]
    fn small_double_free() {
        let m = heap();
        let p = m.alloc(l(64, 8));
        // SAFETY (test): the second free is deliberately bad.
        unsafe {
            m.dealloc(p, l(64, 8));
            m.dealloc(p, l(64, 8));
        }
    }

    #[test]
    #[should_panic(expected = "not a live allocation of this heap")]
    fn small_foreign_pointer() {
        let m = heap();
        let _warm = m.alloc(l(64, 8));
        let mut local = [0u64; 8];
        // SAFETY (test): deliberately bad.
        unsafe { m.dealloc(local.as_mut_ptr() as *mut u8, l(64, 8)) };
    }

    #[test]
    #[should_panic(expected = "interior pointer")]
    fn small_interior_pointer() {
        let m = heap();
        let p = m.alloc(l(64, 8));
        // SAFETY (test): deliberately bad.
        unsafe { m.dealloc(p.add(8), l(64, 8)) };
    }

    #[test]
    #[should_panic(expected = "misaligned pointer")]
    fn small_misaligned_pointer() {
        let m = heap();
        let p = m.alloc(l(64, 8));
        // SAFETY (test): deliberately bad.
        unsafe { m.dealloc(p.add(3), l(64, 8)) };
    }

    #[test]
    #[should_panic(expected = "does not match the object's size class")]
    fn layout_mismatch() {
        let m = heap();
        let p = m.alloc(l(64, 8));
        // SAFETY (test): deliberately bad: freed with another size class's layout.
        unsafe { m.dealloc(p, l(512, 8)) };
    }

    #[test]
    #[should_panic(expected = "span 0x")]
    fn report_names_the_span_and_class() {
        let m = heap();
        let p = m.alloc(l(48, 8));
        // SAFETY (test): the second free is deliberately bad.
        unsafe {
            m.dealloc(p, l(48, 8));
            m.dealloc(p, l(48, 8));
        }
    }
}

/// Without `checks`, a small double free is still caught when both frees reach the span (stock flush).
#[test]
#[should_panic(expected = "goheap: invalid free")]
fn small_double_free_caught_at_flush() {
    let m = heap();
    let p = m.alloc(l(4096, 8));
    // SAFETY (test): deliberately bad. Stocks of 4 KiB objects hold 8 and may grow to 256; freeing the same
    // pointer 600 times overflows even the grown stock and forces flushes that find it already free.
    unsafe {
        for _ in 0..600 {
            m.dealloc(p, l(4096, 8));
        }
    }
}

/// Without `checks`, two frees of one object that reach the central list in the same flush are caught
/// (the flush folds a bitmap word at a time and must not let the duplicate cancel out).
#[test]
#[should_panic(expected = "goheap: invalid free")]
fn small_double_free_in_one_flush() {
    let m = heap();
    let keep = m.alloc(l(64, 8));
    let p = m.alloc(l(64, 8));
    // SAFETY (test): deliberately bad: `p` freed twice, then the stock is flushed.
    unsafe {
        m.dealloc(p, l(64, 8));
        m.dealloc(p, l(64, 8));
    }
    m.flush_cpu_cache();
    let _ = keep;
}

/// A pointer into a span's tail, past its last object, is exact by the division magic (its index is
/// `nelems`) but is no object: caught when it reaches the span, also without `checks`.
#[test]
#[should_panic(expected = "goheap: invalid free")]
fn small_pointer_past_the_last_object() {
    let m = heap();
    // 48-byte objects in one 8 KiB page: 170 objects, 32 bytes of tail.
    let p = m.alloc(l(48, 8));
    let base = p as usize & !(8192 - 1);
    let tail = (base + 170 * 48) as *mut u8;
    // SAFETY (test): deliberately bad.
    unsafe { m.dealloc(tail, l(48, 8)) };
    m.flush_cpu_cache();
}

/// Guard mode: an allocation ends right before an inaccessible page, and frees are checked like large ones.
mod guard_mode {
    use super::*;
    use goheap::malloc::DebugFlags;

    fn guarded() -> Box<Malloc<MmapSource, ThreadSlots>> {
        Box::new(
            Malloc::with_max_bytes(MmapSource::strict(), ThreadSlots::new(), 1 << 30).with_debug(DebugFlags::GUARD),
        )
    }

    #[test]
    fn objects_end_at_a_guard_page_and_work() {
        let m = guarded();
        for (size, align) in [(1, 1), (24, 8), (100, 16), (5000, 64), (70_000, 8), (3, 4096)] {
            let p = m.alloc(l(size, align));
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            let end = p as usize + size;
            // The object ends within `align` bytes of a page boundary: the guard page.
            assert!(end.next_multiple_of(goheap::PAGE_SIZE) - end < align.max(1), "{size}/{align}: ends at {end:#x}");
            // SAFETY (test): the object is `size` bytes.
            unsafe { std::ptr::write_bytes(p, 0xAB, size) };
            // SAFETY (test): allocated above with this layout.
            unsafe { m.dealloc(p, l(size, align)) };
        }
        let st = m.mem_stats();
        assert_eq!(st.heap_objects, 0);
    }

    #[test]
    #[should_panic(expected = "not a live allocation of this heap")]
    fn double_free_is_caught() {
        let m = guarded();
        let p = m.alloc(l(32, 8));
        // SAFETY (test): the second free is deliberately bad.
        unsafe {
            m.dealloc(p, l(32, 8));
            m.dealloc(p, l(32, 8));
        }
    }

    /// An overrun faults: run in a child process so the test can see the SIGSEGV.
    #[test]
    fn overrun_faults() {
        overrun_of_faults("guard_mode::overrun_faults", 40);
    }

    /// The same for an object above `COMMIT_SLICE_NPAGES` pages, whose pages are committed in slices and
    /// whose guard page is decommitted in the allocation's last section.
    #[test]
    fn overrun_of_a_large_object_faults() {
        let size = (goheap::page::heap::slice::COMMIT_SLICE_NPAGES + 3) * goheap::PAGE_SIZE + 40;
        overrun_of_faults("guard_mode::overrun_of_a_large_object_faults", size);
    }

    /// Runs test `name` again in a child, which allocates `size` bytes and writes one byte past them.
    fn overrun_of_faults(name: &str, size: usize) {
        if std::env::var_os("GOHEAP_GUARD_CHILD").is_some() {
            let m = guarded();
            let p = m.alloc(l(size, 8));
            assert!(!p.is_null());
            // SAFETY (test): the object is `size` bytes; then deliberately writes one byte past it, into the
            // guard page.
            unsafe {
                std::ptr::write_bytes(p, 0x5a, size);
                std::ptr::write_volatile(p.add(size), 1);
            }
            std::process::exit(0); // not reached if the guard works
        }
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env("GOHEAP_GUARD_CHILD", "1")
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(libc_sigsegv()), "child did not fault: {:?}", out.status);
    }

    fn libc_sigsegv() -> i32 {
        11
    }
}
