//! The page map: publishing a span (its page-level fields, then the map entries with Release) and finding
//! the span of an address lock-free (Go's `spanOf`).
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.

use crate::sync::atomic::{AtomicU8, Ordering};
use core::ptr::{addr_of_mut, NonNull};

use super::{Heap, HeapInner};
use crate::page::span::{Span, SpanState};
use crate::source::PageSource;
use crate::{PAGE_SHIFT, PAGE_SIZE};

impl<S: PageSource> Heap<S> {
    pub(crate) fn publish_span_stats(&self, inner: &HeapInner) {
        self.span_sys_bytes.store(inner.spans.sys_bytes(), Ordering::Relaxed);
        self.span_inuse_bytes.store(inner.spans.inuse_bytes(), Ordering::Relaxed);
    }

    /// Fills in the page-level fields, marks the span `InUse` and publishes it in the page map.
    pub(super) fn publish_span(&self, s: NonNull<Span>, idx: usize, npages: usize, class: u8, needzero: bool) {
        self.write_span_fields(s, idx, npages, class, needzero);
        let sp = s.as_ptr();
        self.set_map(idx, npages, sp);
        self.check_map(idx, npages, sp);
        self.count_published(npages);
    }

    /// Counts a published span of `npages` in the heap's counters.
    pub(super) fn count_published(&self, npages: usize) {
        let n = self.inuse_npages.fetch_add(npages, Ordering::Relaxed) + npages;
        self.epoch_peak_npages.fetch_max(n, Ordering::Relaxed);
        self.alloc_volume_npages.fetch_add(npages, Ordering::Relaxed);
        self.spans_inuse.fetch_add(1, Ordering::Relaxed);
    }

    /// Fills in the page-level fields of a descriptor nobody else can reach yet, marking it `InUse`.
    pub(super) fn write_span_fields(&self, s: NonNull<Span>, idx: usize, npages: usize, class: u8, needzero: bool) {
        let sp = s.as_ptr();
        let base = self.arena_base.load(Ordering::Relaxed) + idx * PAGE_SIZE;
        // SAFETY: the descriptor is ours (fresh from the allocator or stash) and not reachable by anyone
        // else until the page map stores below; writing through raw places forms no reference.
        unsafe {
            addr_of_mut!((*sp).base).write(base);
            addr_of_mut!((*sp).npages).write(npages);
            addr_of_mut!((*sp).class).write(class);
            addr_of_mut!((*sp).needzero).write(needzero);
            addr_of_mut!((*sp).next).write(core::ptr::null_mut());
            addr_of_mut!((*sp).prev).write(core::ptr::null_mut());
            addr_of_mut!((*sp).state).write(AtomicU8::new(SpanState::InUse as u8));
        }
    }

    /// Stores `s` (Release) in the page map entries of pages `[idx, idx + n)`.
    pub(super) fn set_map(&self, idx: usize, n: usize, s: *mut Span) {
        let map = self.map_base.load(Ordering::Relaxed);
        for p in idx..idx + n {
            // SAFETY: `p` is a grown page, so its map entry is committed; entries are atomics.
            unsafe { (*map.add(p)).store(s, Ordering::Release) };
        }
    }

    /// With `validate` (the expensive check level): asserts that the page map entries of pages
    /// `[idx, idx + n)` hold `s` (after a publication) or null (after a free), and that a published span is
    /// `InUse` with the page-level fields the map implies. Compiled out otherwise.
    #[inline(always)]
    pub(super) fn check_map(&self, idx: usize, n: usize, s: *mut Span) {
        #[cfg(feature = "validate")]
        {
            let map = self.map_base.load(Ordering::Relaxed);
            for p in idx..idx + n {
                // SAFETY: as in `set_map`.
                let e = unsafe { (*map.add(p)).load(Ordering::Relaxed) };
                assert_eq!(e, s, "heap: page map entry {p} is {e:p}, expected {s:p}");
            }
            if !s.is_null() {
                let base = self.arena_base.load(Ordering::Relaxed) + idx * PAGE_SIZE;
                // SAFETY: `s` was just published by us; its page-level fields are stable while it is in use.
                let (b, np, st) = unsafe { ((*s).base, (*s).npages, (*s).state.load(Ordering::Relaxed)) };
                assert!(
                    b == base && np == n && st == SpanState::InUse as u8,
                    "heap: span {s:p} published inconsistently"
                );
            }
        }
        #[cfg(not(feature = "validate"))]
        let _ = (idx, n, s);
    }

    /// `(page index of the span's first page, npages)`.
    pub(super) fn span_idx(&self, s: NonNull<Span>) -> (usize, usize) {
        // SAFETY: the caller passes a live InUse span of this heap; page-level fields are stable.
        let (base, npages) = unsafe { ((*s.as_ptr()).base, (*s.as_ptr()).npages) };
        ((base - self.arena_base.load(Ordering::Relaxed)) >> PAGE_SHIFT, npages)
    }

    /// The `InUse` span containing `addr`, or `None` (outside the heap, or in free pages). Lock-free: a
    /// bounds check and one load.
    #[inline]
    pub fn span_of(&self, addr: usize) -> Option<NonNull<Span>> {
        let grown = self.grown_bytes.load(Ordering::Acquire);
        let off = addr.wrapping_sub(self.arena_base.load(Ordering::Relaxed));
        if off >= grown {
            return None;
        }
        let map = self.map_base.load(Ordering::Relaxed);
        // SAFETY: `off < grown_bytes`, whose page map entries were committed before `grown_bytes` was
        // published (Release/Acquire); the entry is an atomic.
        NonNull::new(unsafe { (*map.add(off >> PAGE_SHIFT)).load(Ordering::Acquire) })
    }
}
