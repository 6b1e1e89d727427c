//! Per-CPU page caches (Go's `mpagecache.go`, plus a small stash of span descriptors like Go's
//! `mspancache`).
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! A [`PageCache`] owns one 64-page aligned block of the arena ([`PAGE_CACHE_PAGES`]), taken from the page
//! allocator under the heap lock in one go (`PageAlloc::alloc_to_cache`). Span allocations of fewer than
//! [`PAGE_CACHE_MAX_NPAGES`] = 16 pages are carved from the cache's free bitmap with no lock at all; the
//! cache also keeps up to [`SPAN_STASH`] span descriptors so those allocations need no lock for the
//! descriptor either. Frees of small spans whose pages lie in the cache's block go back into the cache
//! (an addition to Go, whose page cache only allocates: we have explicit frees, and a free/alloc pair of a
//! small span then costs no lock). Other frees go to the heap.
//!
//! # Invariants (for a cache holding a block, `held`)
//! - `base % 64 == 0`; `[base, base + 64)` are pages of the arena, all marked allocated in the page
//!   allocator; the cache's free pages are exactly the set bits of `cache`;
//! - `scav ⊆ cache`: a set bit of `scav` is a free page of the cache that is not committed;
//! - `spans[..nspans]` are `Dead` span descriptors from the heap's fixed-size allocator;
//! - the heap's `cached_npages = Σ popcount(cache)` and `cache_scav_npages = Σ popcount(scav)` over all
//!   caches (updated atomically next to every change here).
//!
//! # Locking
//! A cache is accessed exclusively by its owner (one CPU with interrupts off in a kernel, one thread on a
//! host); the caller guarantees this (`&mut PageCache`). Refill and flush take the heap lock. A cache is tied
//! to the heap that filled it: use it with one heap only.

use crate::sync::atomic::Ordering;
use core::ptr::NonNull;

use crate::cpu::Guarded;
use crate::page::heap::Heap;
use crate::page::span::Span;
use crate::source::PageSource;

/// log2 of the pages of a cache block.
pub const LOG_PAGE_CACHE_PAGES: usize = 6;
/// Pages per cache block: `PAGE_CACHE_PAGES = 1 << LOG_PAGE_CACHE_PAGES` = 64 (one bitmap word).
pub const PAGE_CACHE_PAGES: usize = 1 << LOG_PAGE_CACHE_PAGES;
/// Allocations of fewer pages than `PAGE_CACHE_MAX_NPAGES = PAGE_CACHE_PAGES / 4` = 16 use the cache
/// (Go's rule).
pub const PAGE_CACHE_MAX_NPAGES: usize = PAGE_CACHE_PAGES / 4;
/// Span descriptors a cache keeps at most.
pub const SPAN_STASH: usize = 16;
/// Descriptors moved per refill or drain of the stash: `SPAN_STASH / 2`.
pub const SPAN_STASH_BATCH: usize = SPAN_STASH / 2;

/// A per-CPU page cache (see the module docs).
#[derive(Debug)]
pub struct PageCache {
    /// First page index (from the arena base) of the held block; meaningful when `held`.
    pub(crate) base: usize,
    /// The cache owns a block (possibly with no free page left: frees can still come back into it).
    pub(crate) held: bool,
    /// 1 = free page owned by this cache.
    pub(crate) cache: u64,
    /// 1 = that free page is not committed (`scav ⊆ cache`).
    pub(crate) scav: u64,
    /// Stashed `Dead` span descriptors.
    pub(crate) spans: [*mut Span; SPAN_STASH],
    pub(crate) nspans: usize,
}

// SAFETY: a cache is plain data plus pointers to heap-owned descriptors that only the cache's owner uses;
// moving it to another thread moves that ownership with it.
unsafe impl Send for PageCache {}

impl Default for PageCache {
    fn default() -> Self {
        Self::new()
    }
}

/// First index `i` with bits `[i, i + n)` all set in `c` (Go's `findBitRange64`); `1 <= n <= 64`.
#[inline]
pub fn find_bit_range64(c: u64, n: usize) -> Option<usize> {
    // After each step, bit i of p is set iff bits [i, i + k) of c are all set.
    let mut p = c;
    let mut k = 1;
    while k < n && p != 0 {
        let s = k.min(n - k);
        p &= p >> s;
        k += s;
    }
    if p == 0 {
        None
    } else {
        Some(p.trailing_zeros() as usize)
    }
}

/// Mask of `n` bits starting at bit `i`; `i + n <= 64`.
#[inline]
pub(crate) fn bit_mask(i: usize, n: usize) -> u64 {
    (if n == 64 { !0 } else { (1u64 << n) - 1 }) << i
}

impl PageCache {
    /// An empty cache (no block, no descriptors).
    pub const fn new() -> Self {
        Self { base: 0, held: false, cache: 0, scav: 0, spans: [core::ptr::null_mut(); SPAN_STASH], nspans: 0 }
    }

    /// No free page in the cache.
    pub fn is_empty(&self) -> bool {
        self.cache == 0
    }

    /// Free pages held.
    pub fn free_npages(&self) -> usize {
        self.cache.count_ones() as usize
    }

    /// Takes `npages` contiguous free pages: `(first page index, scavenged mask of those pages within the
    /// block word, allocated mask)`.
    pub(crate) fn take(&mut self, npages: usize) -> Option<(usize, u64, u64)> {
        let i = find_bit_range64(self.cache, npages)?;
        let mask = bit_mask(i, npages);
        let scav = self.scav & mask;
        self.cache &= !mask;
        self.scav &= !mask;
        self.check();
        Some((self.base + i, scav, mask))
    }

    /// Gives pages back (`mask` of the block word; `scav` those still uncommitted).
    pub(crate) fn put_back(&mut self, mask: u64, scav: u64) {
        debug_assert!(self.cache & mask == 0 && scav & !mask == 0);
        self.cache |= mask;
        self.scav |= scav;
        self.check();
    }

    /// With `validate` (the expensive check level): `scav ⊆ cache`, no free page without a held block, the
    /// stash within bounds. Compiled out otherwise.
    #[inline(always)]
    fn check(&self) {
        #[cfg(feature = "validate")]
        {
            assert_eq!(self.scav & !self.cache, 0, "page cache: scavenged pages that are not free");
            assert!(self.held || self.cache == 0, "page cache: free pages without a block");
            assert!(self.nspans <= SPAN_STASH, "page cache: stash overflow");
        }
    }

    /// Whether the pages `[idx, idx + npages)` lie in the held block.
    pub(crate) fn owns(&self, idx: usize, npages: usize) -> bool {
        self.held && idx >= self.base && idx + npages <= self.base + PAGE_CACHE_PAGES
    }

    pub(crate) fn pop_span(&mut self) -> Option<NonNull<Span>> {
        if self.nspans == 0 {
            return None;
        }
        self.nspans -= 1;
        NonNull::new(self.spans[self.nspans])
    }

    #[must_use]
    pub(crate) fn push_span(&mut self, s: NonNull<Span>) -> bool {
        if self.nspans == SPAN_STASH {
            return false;
        }
        self.spans[self.nspans] = s.as_ptr();
        self.nspans += 1;
        true
    }
}

impl<S: PageSource> Heap<S> {
    /// Gives a page cache's block and stashed descriptors back to the heap (Go's `pageCache.flush`). The
    /// cache stays usable (it refills on its next use). Call it before `release_all` or `validate` to count
    /// the cached pages as free heap pages.
    pub fn flush_page_cache(&self, guarded: Guarded<'_>, pc: &mut PageCache) {
        if !pc.held && pc.nspans == 0 {
            return;
        }
        let mut g = self.inner.lock(guarded);
        let inner = &mut *g;
        if pc.held {
            inner.pa.free_from_cache(pc.base, pc.cache, pc.scav);
            self.cached_npages.fetch_sub(pc.cache.count_ones() as usize, Ordering::Relaxed);
            self.cache_scav_npages.fetch_sub(pc.scav.count_ones() as usize, Ordering::Relaxed);
            pc.held = false;
            pc.cache = 0;
            pc.scav = 0;
        }
        while let Some(s) = pc.pop_span() {
            // SAFETY: stashed descriptors came from this heap's span allocator and are Dead (invariant).
            unsafe { inner.spans.free(s.cast()) };
            self.stashed_spans.fetch_sub(1, Ordering::Relaxed);
        }
        self.publish_span_stats(inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_range() {
        assert_eq!(find_bit_range64(0, 1), None);
        assert_eq!(find_bit_range64(!0, 64), Some(0));
        assert_eq!(find_bit_range64(0b1011_0110, 2), Some(1));
        assert_eq!(find_bit_range64(0b1011_0110, 3), None);
        assert_eq!(find_bit_range64(0xF0F0_0000_0000_0000 | 0xFF00, 8), Some(8));
        assert_eq!(find_bit_range64(!0 << 1, 63), Some(1));
        for n in 1..=64 {
            for i in 0..=(64 - n) {
                assert_eq!(find_bit_range64(bit_mask(i, n), n), Some(i));
                if n > 1 {
                    assert_eq!(find_bit_range64(bit_mask(i, n) & !(1 << (i + n / 2)), n), None);
                }
            }
        }
    }
}
