//! The heap's accounting read lock-free ([`HeapStats`], [`SpanInfo`]) and its consistency walk (feature
//! `validate`).
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.

use crate::sync::atomic::Ordering;
use core::ptr::NonNull;

use super::Heap;
use crate::page::span::{Span, SpanState};
use crate::source::PageSource;
use crate::PAGE_SIZE;
#[cfg(feature = "validate")]
use {super::InitState, crate::page::pagealloc::PALLOC_CHUNK_PAGES};

/// A snapshot of the heap's accounting (read without the heap lock; fields may be mutually a little stale
/// while other CPUs allocate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Arena address space reserved.
    pub reserved_bytes: usize,
    /// Arena covered by the page allocator so far (`inuse + free + released + retired`).
    pub grown_bytes: usize,
    /// Heap pages committed: `inuse_bytes + free_bytes`.
    pub committed_bytes: usize,
    /// Pages in `InUse` spans (Go's `HeapInuse`).
    pub inuse_bytes: usize,
    /// Committed pages not in use, including those held by page caches (Go's `HeapIdle - HeapReleased`).
    pub free_bytes: usize,
    /// Free grown pages not committed (Go's `HeapReleased`).
    pub released_bytes: usize,
    /// Pages of objects freed in efence mode (`DebugFlags::EFENCE`): decommitted and never handed out again,
    /// so address space the arena has lost for good (see `page/heap/retire.rs`).
    pub retired_bytes: usize,
    /// Free pages held by page caches (committed or not).
    pub cached_bytes: usize,
    /// Live span descriptors, including those stashed in page caches (Go's `MSpanInuse`).
    pub span_inuse_bytes: usize,
    /// Memory taken from the source for span descriptors (Go's `MSpanSys`).
    pub span_sys_bytes: usize,
    /// Other metadata committed: page map, chunk bitmaps, summaries.
    pub metadata_bytes: usize,
    /// Metadata reservation (page map + page allocator), committed or not.
    pub metadata_reserved_bytes: usize,
    /// What the memory limit applies to: `committed_bytes + span_sys_bytes + metadata_bytes`.
    pub total_bytes: usize,
    /// Live spans.
    pub spans_inuse: usize,
    /// Highest `inuse_bytes` over the scavenger's recent window.
    pub peak_inuse_bytes: usize,
    /// The scavenger's current retained-heap goal.
    pub retained_goal_bytes: usize,
    /// Bytes released because the heap grew past the retained goal (Go's scavenging on heap growth).
    pub scavenged_growth_bytes: usize,
    /// Soft memory limit (`usize::MAX` = none).
    pub memory_limit: usize,
    /// Bytes released by the scavenger in total (background, allocation-triggered, `release_all`).
    pub scavenged_total_bytes: usize,
    /// Of those, released on the allocation path because the memory limit was exceeded.
    pub scavenged_alloc_bytes: usize,
    /// Scavenger cycles completed (one log line each).
    pub scav_cycles: usize,
    /// Nanoseconds the scavenger spent, 0 without a clock (Go's `/cpu/classes/scavenge/total:cpu-seconds`).
    pub scavenge_cpu_nanos: u64,
}

/// The page-level fields of a span, for code outside the crate (tests, tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanInfo {
    /// First byte.
    pub base: usize,
    /// Length in pages.
    pub npages: usize,
    /// Size class (0 = large object).
    pub class: u8,
    /// The memory may hold non-zero bytes.
    pub needzero: bool,
    /// `SpanState::InUse`.
    pub in_use: bool,
}

/// Reads a span's page-level fields.
///
/// # Safety
/// `s` is a live descriptor of a heap (not concurrently resized or freed).
pub unsafe fn span_info(s: NonNull<Span>) -> SpanInfo {
    let p = s.as_ptr();
    // SAFETY: the caller guarantees a live descriptor; page-level fields are stable while it is in use.
    unsafe {
        SpanInfo {
            base: (*p).base,
            npages: (*p).npages,
            class: (*p).class,
            needzero: (*p).needzero,
            in_use: (*p).state.load(Ordering::Acquire) == SpanState::InUse as u8,
        }
    }
}

impl<S: PageSource> Heap<S> {
    /// A snapshot of the accounting (no lock; see [`HeapStats`]).
    pub fn stats(&self) -> HeapStats {
        let grown = self.grown_bytes.load(Ordering::Acquire);
        let committed = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let inuse = self.inuse_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let span_sys = self.span_sys_bytes.load(Ordering::Relaxed);
        let meta = self.meta_committed_bytes.load(Ordering::Relaxed);
        let retired = self.retired_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        HeapStats {
            reserved_bytes: self.reserved_bytes.load(Ordering::Relaxed),
            grown_bytes: grown,
            committed_bytes: committed,
            inuse_bytes: inuse,
            free_bytes: committed.saturating_sub(inuse),
            released_bytes: grown.saturating_sub(committed + retired),
            retired_bytes: retired,
            cached_bytes: self.cached_npages.load(Ordering::Relaxed) * PAGE_SIZE,
            span_inuse_bytes: self.span_inuse_bytes.load(Ordering::Relaxed),
            span_sys_bytes: span_sys,
            metadata_bytes: meta,
            metadata_reserved_bytes: self.meta_reserved_bytes.load(Ordering::Relaxed),
            total_bytes: committed + span_sys + meta,
            spans_inuse: self.spans_inuse.load(Ordering::Relaxed),
            peak_inuse_bytes: self
                .window_peak_npages
                .load(Ordering::Relaxed)
                .max(self.epoch_peak_npages.load(Ordering::Relaxed))
                * PAGE_SIZE,
            retained_goal_bytes: self.retained_goal_bytes.load(Ordering::Relaxed),
            scavenged_growth_bytes: self.scav_ctr.growth_bytes.load(Ordering::Relaxed),
            memory_limit: self.memory_limit.load(Ordering::Relaxed),
            scavenged_total_bytes: self.scav_released_bytes.load(Ordering::Relaxed),
            scavenged_alloc_bytes: self.scav_alloc_bytes.load(Ordering::Relaxed),
            scav_cycles: self.scav_cycles.load(Ordering::Relaxed),
            scavenge_cpu_nanos: self.scavenge_cpu_nanos.load(Ordering::Relaxed),
        }
    }

    /// Total memory the limit applies to: heap committed + span descriptors + metadata.
    pub(crate) fn total_committed_bytes(&self) -> usize {
        self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE
            + self.span_sys_bytes.load(Ordering::Relaxed)
            + self.meta_committed_bytes.load(Ordering::Relaxed)
    }

    /// Whole-structure consistency walk (feature `validate`). Call it while no other CPU uses the heap.
    /// Panics with a description of the first violation.
    #[cfg(feature = "validate")]
    pub fn validate(&self, guarded: crate::cpu::Guarded<'_>) {
        let g = self.inner.lock(guarded);
        if g.state != InitState::Ready {
            assert_eq!(self.grown_bytes.load(Ordering::Relaxed), 0, "heap: grown before init");
            return;
        }
        g.pa.validate();
        g.spans.validate();
        let grown = g.pa.grown_npages();
        assert_eq!(self.grown_bytes.load(Ordering::Relaxed), grown * PAGE_SIZE, "heap: grown_bytes");
        assert_eq!(
            self.grown_words.load(Ordering::Relaxed),
            self.grown_bytes.load(Ordering::Relaxed) >> 3,
            "heap: grown_words"
        );
        let map = self.map_base.load(Ordering::Relaxed);
        let base = g.arena_base;
        let mut inuse = 0;
        let mut nspans = 0;
        let mut alloc_pages = 0;
        let mut p = 0;
        while p < grown {
            let c = g.pa.chunk(p / PALLOC_CHUNK_PAGES);
            let bit = p % PALLOC_CHUNK_PAGES;
            let allocated = c.alloc[bit / 64] & (1 << (bit % 64)) != 0;
            let scav = c.scav[bit / 64] & (1 << (bit % 64)) != 0;
            assert!(!(allocated && scav), "heap: page {p} ({:#x}) allocated but scavenged", base + p * PAGE_SIZE);
            alloc_pages += allocated as usize;
            // SAFETY: grown pages have committed map entries.
            let s = unsafe { (*map.add(p)).load(Ordering::Acquire) };
            if s.is_null() {
                p += 1;
                continue;
            }
            assert!(allocated, "heap: page {p} in span {s:p} is free in the page allocator");
            // SAFETY: a non-null entry points to a live descriptor (invariant being checked).
            let (sbase, snpages, state) = unsafe { ((*s).base, (*s).npages, (*s).state.load(Ordering::Relaxed)) };
            assert_eq!(state, SpanState::InUse as u8, "heap: page map entry {p} points to a non-InUse span {s:p}");
            assert_eq!(
                sbase,
                base + p * PAGE_SIZE,
                "heap: page {p} maps to span {s:p} based at {sbase:#x}, not at its start"
            );
            assert!(snpages >= 1 && p + snpages <= grown, "heap: span {s:p} npages {snpages} out of range");
            for q in p..p + snpages {
                // SAFETY: as above.
                let e = unsafe { (*map.add(q)).load(Ordering::Acquire) };
                assert_eq!(e, s, "heap: page {q} of span {s:p} maps to {e:p}");
                let c = g.pa.chunk(q / PALLOC_CHUNK_PAGES);
                let bit = q % PALLOC_CHUNK_PAGES;
                assert!(c.alloc[bit / 64] & (1 << (bit % 64)) != 0, "heap: page {q} of span {s:p} is free");
                assert!(c.scav[bit / 64] & (1 << (bit % 64)) == 0, "heap: page {q} of span {s:p} is scavenged");
            }
            alloc_pages += snpages - 1;
            inuse += snpages;
            nspans += 1;
            p += snpages;
        }
        assert_eq!(inuse, self.inuse_npages.load(Ordering::Relaxed), "heap: inuse_npages counter");
        assert_eq!(nspans, self.spans_inuse.load(Ordering::Relaxed), "heap: spans_inuse counter");
        let cached = self.cached_npages.load(Ordering::Relaxed);
        let inflight = self.scav_inflight_npages.load(Ordering::Relaxed);
        assert_eq!(inflight, 0, "heap: validate() while the scavenger is decommitting (call it when quiescent)");
        let pending = self.pending_npages.load(Ordering::Relaxed);
        assert_eq!(pending, 0, "heap: validate() while a large run is being committed (call it when quiescent)");
        let retired = self.retired_npages.load(Ordering::Relaxed);
        assert_eq!(
            alloc_pages,
            inuse + cached + retired,
            "heap: allocated pages ({alloc_pages}) != pages in spans ({inuse}) + pages in page caches ({cached}) + retired pages ({retired})"
        );
        let committed = self.committed_npages.load(Ordering::Relaxed) + retired;
        let cache_scav = self.cache_scav_npages.load(Ordering::Relaxed);
        assert_eq!(
            committed,
            grown - g.pa.scav_npages() - cache_scav,
            "heap: committed + retired pages != grown - scavenged - scavenged in caches"
        );
        let meta: usize = g.meta_committed.iter().sum();
        assert_eq!(meta, self.meta_committed_bytes.load(Ordering::Relaxed), "heap: metadata counter");
        let live_desc = nspans + self.stashed_spans.load(Ordering::Relaxed);
        assert_eq!(
            g.spans.inuse_bytes(),
            live_desc * g.spans.size(),
            "heap: span descriptors in use != live spans + stashed descriptors"
        );
    }
}

/// Prints the heap's accounting ([`Heap::stats`]) and bounds; takes no lock.
impl<S: PageSource> core::fmt::Debug for Heap<S> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Heap")
            .field("arena_base", &format_args!("{:#x}", self.arena_base()))
            .field("max_heap_bytes", &self.max_heap_bytes)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
