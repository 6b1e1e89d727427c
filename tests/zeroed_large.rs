//! Large `alloc_zeroed` over freed, dirty pages takes fresh zero pages from the source (decommit, then
//! commit) instead of clearing them by hand (issue 11, "Costs"), and stays consistent when the source fails.
#![cfg(feature = "std")]

use goheap::cpu::NoCpuCache;
use goheap::source::bounded::BoundedSource;
use goheap::Malloc;
use std::alloc::Layout;

const MIB: usize = 1 << 20;

fn is_zero(p: *const u8, len: usize) -> bool {
    // SAFETY (test): callers pass a live allocation of `len` bytes.
    unsafe { std::slice::from_raw_parts(p, len) }.iter().all(|&b| b == 0)
}

#[test]
fn large_alloc_zeroed_over_dirty_pages_gets_fresh_zero_pages() {
    let arena = 256 * MIB;
    let m = Box::new(Malloc::with_max_bytes(BoundedSource::with_mmap(arena + 32 * MIB, usize::MAX), NoCpuCache, arena));
    let layout = Layout::from_size_align(32 * MIB, 8).unwrap();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    // SAFETY (test): `p` is valid for `layout.size()` bytes.
    unsafe { p.write_bytes(0xA5, layout.size()) };
    // SAFETY (test): allocated above with `layout`.
    unsafe { m.dealloc(p, layout) };

    let decommits = m.heap().source().decommitted_bytes();
    let z = m.alloc_zeroed(layout);
    assert!(!z.is_null());
    assert!(is_zero(z, layout.size()), "alloc_zeroed over dirty pages returned non-zero bytes");
    assert!(
        m.heap().source().decommitted_bytes() >= decommits + 16 * MIB,
        "the dirty pages were cleared by hand, not replaced by fresh ones"
    );
    #[cfg(feature = "validate")]
    m.validate();
    // SAFETY (test): valid for `layout.size()` bytes, then freed with its layout.
    unsafe {
        z.write_bytes(0xA5, layout.size());
        m.dealloc(z, layout);
    }

    // The source fails: null, and the heap stays consistent (the pages it decommitted stay free, scavenged).
    m.heap().source().fail_all(true);
    assert!(m.alloc_zeroed(layout).is_null());
    m.heap().source().fail_all(false);
    #[cfg(feature = "validate")]
    m.validate();
    let z = m.alloc_zeroed(layout);
    assert!(!z.is_null());
    assert!(is_zero(z, layout.size()), "alloc_zeroed after a failed attempt returned non-zero bytes");
    // SAFETY (test): allocated above with `layout`.
    unsafe { m.dealloc(z, layout) };

    // Below the threshold the dirty pages are cleared by hand, and read as zero too.
    let small = Layout::from_size_align(MIB, 8).unwrap();
    let q = m.alloc(small);
    // SAFETY (test): valid for `small.size()` bytes, then freed with its layout.
    unsafe {
        q.write_bytes(0x5A, small.size());
        m.dealloc(q, small);
    }
    let q = m.alloc_zeroed(small);
    assert!(is_zero(q, small.size()));
    // SAFETY (test): allocated above with `small`.
    unsafe { m.dealloc(q, small) };
}
