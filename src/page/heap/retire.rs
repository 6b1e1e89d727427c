//! Retired spans (the page level of `DebugFlags::EFENCE`, Go's `GODEBUG=efence=1`): a freed object's pages
//! are decommitted and never handed out again.
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.
//!
//! Go's efence mode maps every object on pages of its own and, on free, makes the pages inaccessible
//! without ever reusing the addresses (`sysFault`), so a use after free faults at the access. goheap's
//! arena is finite, so "never reused" is kept by the page allocator itself: a retired span's pages stay
//! *allocated* in the page allocator (no later span can take them) while their memory goes back to the
//! source. They are counted in `retired_npages` (`HeapStats::retired_bytes`, `MemStats::efence_retired_bytes`)
//! so the cost is visible; when the arena is used up, allocation fails cleanly (null), as at any other
//! out-of-memory.
//!
//! Invariants (extending `heap/mod.rs`'s): allocated pages in `pa` = `inuse_npages + cached_npages +
//! scav_inflight_npages + retired_npages`; `committed_npages + retired_npages = grown - scav - cache_scav`
//! (retired pages are neither committed nor marked scavenged: the scavenger only looks at free pages).

use crate::sync::atomic::Ordering;
use core::ptr::NonNull;

use super::slice::{Sections, DECOMMIT_SLICE_NPAGES};
use super::Heap;
use crate::page::span::{Span, SpanState};
use crate::source::PageSource;
use crate::PAGE_SIZE;

impl<S: PageSource> Heap<S> {
    /// Retires `span` for good: removes it from the page map (a later free of its address is reported as
    /// not in the heap), decommits its pages except the last `tail_decommitted` (which the caller decommitted
    /// itself, e.g. a guard page, while the heap still counts them committed), and leaves every page
    /// allocated in the page allocator, so no later allocation is ever placed there.
    ///
    /// In `secs`' sections (interrupt latency, see `slice.rs`): the page map is cleared before the first
    /// (lock-free stores), the pages are decommitted [`DECOMMIT_SLICE_NPAGES`] per section, and the counts
    /// and the descriptor are settled in the last. Until then the span is Dead, unmapped and still counted
    /// in use: the heap's equations (`validate`) hold again once the call returns.
    ///
    /// # Safety
    /// `span` came from this heap, is `InUse`, nothing uses it or its memory any more, and its last
    /// `tail_decommitted` pages (fewer than its page count) were decommitted through the source.
    pub unsafe fn retire_span(&self, secs: &mut impl Sections, span: NonNull<Span>, tail_decommitted: usize) {
        let (idx, npages) = self.span_idx(span);
        debug_assert!(tail_decommitted < npages);
        self.set_map(idx, npages, core::ptr::null_mut());
        self.check_map(idx, npages, core::ptr::null_mut());
        // SAFETY: the span is live (caller contract); `state` is an atomic field read lock-free elsewhere.
        let base = unsafe {
            (*span.as_ptr()).state.store(SpanState::Dead as u8, Ordering::Release);
            (*span.as_ptr()).base
        };
        let body = npages - tail_decommitted;
        let mut done = 0;
        while done < body {
            let n = DECOMMIT_SLICE_NPAGES.min(body - done);
            // SAFETY: the pages are the caller's (given up), committed (the span's pages are, except the tail
            // the caller decommitted), and nothing uses them.
            secs.section(|g| unsafe {
                self.src(g).decommit_guard(NonNull::new_unchecked((base + done * PAGE_SIZE) as *mut u8), n * PAGE_SIZE)
            });
            done += n;
        }
        secs.section(|g| {
            self.inuse_npages.fetch_sub(npages, Ordering::Relaxed);
            self.spans_inuse.fetch_sub(1, Ordering::Relaxed);
            self.committed_npages.fetch_sub(npages, Ordering::Relaxed);
            self.retired_npages.fetch_add(npages, Ordering::Relaxed);
            let mut lk = self.inner.lock(g);
            // SAFETY: the descriptor is Dead and unreachable now (the page map no longer names it).
            unsafe { lk.spans.free(span.cast()) };
            self.publish_span_stats(&lk);
        });
    }
}
