//! Spans for the object level: allocation (from the CPU's page cache, else under the heap lock), aligned
//! allocation for large objects, freeing, and resizing a large object's span in place.
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.
//!
//! These paths run in the caller's one guarded section; large runs committed in slices (each slice a
//! section of its own) are `slice.rs`'s `Heap::alloc_span_sliced`.

use crate::sync::atomic::Ordering;
use core::ptr::{addr_of_mut, NonNull};

use super::pagecache::{bit_mask, PageCache, PAGE_CACHE_MAX_NPAGES, SPAN_STASH_BATCH};
use super::slice::{Sections, COMMIT_SLICE_NPAGES, GROW_SLICE_CHUNKS};
use super::{Heap, HeapInner};
use crate::cpu::Guarded;
use crate::page::pagealloc::PALLOC_CHUNK_PAGES;
use crate::page::span::{Span, SpanState};
use crate::source::PageSource;
use crate::PAGE_SIZE;

/// Outcome of the page-cache path of [`Heap::alloc_span`].
#[must_use]
pub(super) enum FromCache {
    /// A span from the cache's pages.
    Span(NonNull<Span>),
    /// The cache cannot serve the run (no block, no run of `npages` free pages in it, or no heap to refill
    /// it from): take the heap path, which may grow the heap or reclaim.
    UseHeap,
    /// The cache had the pages, but committing them or finding a descriptor failed even after releasing
    /// free committed pages; the pages went back to the cache and the allocation fails.
    OutOfMemory,
}

impl<S: PageSource> Heap<S> {
    // ---- The API for the object level ------------------------------------------------------------------------

    /// A span of `npages` for size class `class` (0 = large object): page-level fields set, `InUse`,
    /// registered in the page map. Object-level fields are left as they are. Spans of fewer than 16 pages
    /// come from `pcache` when given (no heap lock in the common case). `None` when the source is out of
    /// memory or the arena is full; the heap stays consistent.
    #[must_use]
    pub fn alloc_span(
        &self,
        g: Guarded<'_>,
        pcache: Option<&mut PageCache>,
        npages: usize,
        class: u8,
    ) -> Option<NonNull<Span>> {
        if npages == 0 {
            return None;
        }
        let r = match pcache {
            Some(pc) if npages < PAGE_CACHE_MAX_NPAGES => match self.alloc_from_cache(g, pc, npages, class) {
                FromCache::Span(s) => Some(s),
                FromCache::OutOfMemory => None,
                FromCache::UseHeap => self.alloc_span_locked(g, Some(pc), npages, PAGE_SIZE, class),
            },
            pc => self.alloc_span_locked(g, pc, npages, PAGE_SIZE, class),
        };
        if r.is_some() {
            self.after_alloc(&mut { g });
        }
        r
    }

    /// A large-object span whose base is aligned to `align` bytes (a power of two; may exceed `PAGE_SIZE`,
    /// e.g. 2 MiB). Found by over-allocating `align / PAGE_SIZE - 1` extra pages and trimming them.
    #[must_use]
    pub fn alloc_span_aligned(&self, g: Guarded<'_>, npages: usize, align: usize) -> Option<NonNull<Span>> {
        if npages == 0 || !align.is_power_of_two() {
            return None;
        }
        let r = self.alloc_span_locked(g, None, npages, align.max(PAGE_SIZE), 0);
        if r.is_some() {
            self.after_alloc(&mut { g });
        }
        r
    }

    /// The page-cache path (see [`FromCache`] for its outcomes).
    pub(super) fn alloc_from_cache(&self, g: Guarded<'_>, pc: &mut PageCache, npages: usize, class: u8) -> FromCache {
        if pc.is_empty() {
            let Some(mut lk) = self.lock_ready(g) else { return FromCache::UseHeap };
            let inner = &mut *lk;
            // The old block (fully handed out) stays allocated in `pa`; drop it and take a new one.
            pc.held = false;
            let taken = match inner.pa.alloc_to_cache() {
                Some(t) => Some(t),
                None if self.grow_locked(inner, 1, 0) => inner.pa.alloc_to_cache(),
                None => None,
            };
            let Some((base, free, scav)) = taken else { return FromCache::UseHeap };
            pc.base = base;
            pc.held = true;
            pc.cache = free;
            pc.scav = scav;
            self.cached_npages.fetch_add(free.count_ones() as usize, Ordering::Relaxed);
            self.cache_scav_npages.fetch_add(scav.count_ones() as usize, Ordering::Relaxed);
            self.refill_stash_locked(inner, pc);
        }
        let Some((idx, scav, mask)) = pc.take(npages) else {
            return FromCache::UseHeap;
        };
        let nscav = scav.count_ones() as usize;
        self.cached_npages.fetch_sub(npages, Ordering::Relaxed);
        self.cache_scav_npages.fetch_sub(nscav, Ordering::Relaxed);
        // Commit the scavenged pages outside the heap lock.
        let mut left = scav;
        let mut retried = false;
        while left != 0 {
            let i = left.trailing_zeros() as usize;
            let k = (!(left >> i)).trailing_zeros() as usize;
            let addr = self.arena_base.load(Ordering::Relaxed) + (pc.base + i) * PAGE_SIZE;
            // SAFETY: the run is in a grown part of the arena, owned by this cache, and not committed.
            if unsafe { self.src(g).commit(NonNull::new_unchecked(addr as *mut u8), k * PAGE_SIZE) } {
                left &= !bit_mask(i, k);
                self.committed_npages.fetch_add(k, Ordering::Relaxed);
                continue;
            }
            let need = left.count_ones() as usize * PAGE_SIZE;
            if !retried {
                retried = true;
                if let Some(mut lk) = self.lock_ready(g) {
                    if self.release_for_commit_locked(&mut lk, need) >= need {
                        continue;
                    }
                }
            }
            // Give the pages back to the cache; the committed ones are now plain free committed pages.
            pc.put_back(mask, left);
            self.cached_npages.fetch_add(npages, Ordering::Relaxed);
            self.cache_scav_npages.fetch_add(left.count_ones() as usize, Ordering::Relaxed);
            return FromCache::OutOfMemory;
        }
        let s = match pc.pop_span() {
            Some(s) => s,
            None => {
                let got = self.lock_ready(g).and_then(|mut lk| {
                    self.refill_stash_locked(&mut lk, pc);
                    drop(lk);
                    pc.pop_span()
                });
                match got {
                    Some(s) => s,
                    None => {
                        pc.put_back(mask, 0);
                        self.cached_npages.fetch_add(npages, Ordering::Relaxed);
                        return FromCache::OutOfMemory;
                    }
                }
            }
        };
        self.stashed_spans.fetch_sub(1, Ordering::Relaxed);
        let needzero = !(nscav == npages && self.source.commit_zeroes());
        self.publish_span(s, idx, npages, class, needzero);
        FromCache::Span(s)
    }

    /// Moves up to `SPAN_STASH_BATCH` descriptors into the cache's stash.
    pub(super) fn refill_stash_locked(&self, inner: &mut HeapInner, pc: &mut PageCache) {
        for _ in 0..SPAN_STASH_BATCH {
            if pc.nspans >= SPAN_STASH_BATCH {
                break;
            }
            let Some(p) = inner.spans.alloc(&self.source) else { break };
            // `nspans < SPAN_STASH_BATCH < SPAN_STASH`: there is room.
            let pushed = pc.push_span(p.cast());
            debug_assert!(pushed);
            self.stashed_spans.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_span_stats(inner);
    }

    /// The heap path (heap lock held throughout).
    pub(super) fn alloc_span_locked(
        &self,
        g: Guarded<'_>,
        pc: Option<&mut PageCache>,
        npages: usize,
        align: usize,
        class: u8,
    ) -> Option<NonNull<Span>> {
        let mut lk = self.lock_ready(g)?;
        let inner = &mut *lk;
        let s = match pc.and_then(|pc| pc.pop_span()) {
            Some(s) => {
                self.stashed_spans.fetch_sub(1, Ordering::Relaxed);
                s
            }
            None => self.new_descriptor_locked(inner)?,
        };
        // SAFETY: `s` was just taken from this allocator (or a stash of it) and is unused.
        let idx = unsafe { self.alloc_pages_for_locked(inner, s, npages, align) }?;
        let nscav = inner.pa.count_scav(idx, npages);
        if !self.commit_range_locked(inner, idx, npages) {
            // SAFETY: as above; the run was taken for `s` just now.
            unsafe { self.drop_unpublished_locked(inner, s, Some((idx, npages))) };
            return None;
        }
        let needzero = !(nscav == npages && self.source.commit_zeroes());
        self.publish_span(s, idx, npages, class, needzero);
        drop(lk);
        Some(s)
    }

    /// Frees a span: pages go back to `pcache` (if small and from its block) or to the page allocator.
    ///
    /// # Safety
    /// `span` came from this heap, is `InUse`, and nothing uses it or its memory any more.
    pub unsafe fn free_span(&self, g: Guarded<'_>, pcache: Option<&mut PageCache>, span: NonNull<Span>) {
        // SAFETY: forwarded contract.
        unsafe {
            self.unmap_span(span);
            self.free_span_unmapped(g, pcache, span);
        }
    }

    /// The first part of [`Heap::free_span`]: removes the span from the page map (one atomic store per
    /// page, no lock, so no guard needed: a large free does it with interrupts on). Finish with
    /// [`Heap::free_span_unmapped`].
    ///
    /// # Safety
    /// As for [`Heap::free_span`].
    pub unsafe fn unmap_span(&self, span: NonNull<Span>) {
        let (idx, npages) = self.span_idx(span);
        self.set_map(idx, npages, core::ptr::null_mut());
    }

    /// The rest of [`Heap::free_span`], after [`Heap::unmap_span`].
    ///
    /// # Safety
    /// As for [`Heap::free_span`], and [`Heap::unmap_span`] was called on `span` since it was allocated.
    pub unsafe fn free_span_unmapped(&self, g: Guarded<'_>, pcache: Option<&mut PageCache>, span: NonNull<Span>) {
        let (idx, npages) = self.span_idx(span);
        self.check_map(idx, npages, core::ptr::null_mut());
        // SAFETY: the span is live (caller contract); `state` is an atomic field read lock-free elsewhere.
        unsafe { (*span.as_ptr()).state.store(SpanState::Dead as u8, Ordering::Release) };
        self.inuse_npages.fetch_sub(npages, Ordering::Relaxed);
        self.spans_inuse.fetch_sub(1, Ordering::Relaxed);
        if let Some(pc) = pcache {
            if npages < PAGE_CACHE_MAX_NPAGES && pc.owns(idx, npages) {
                pc.put_back(bit_mask(idx - pc.base, npages), 0);
                self.cached_npages.fetch_add(npages, Ordering::Relaxed);
                if pc.push_span(span) {
                    self.stashed_spans.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut lk = self.inner.lock(g);
                // SAFETY: the descriptor is Dead and unreachable now.
                unsafe { lk.spans.free(span.cast()) };
                self.publish_span_stats(&lk);
                return;
            }
            let mut lk = self.inner.lock(g);
            lk.pa.free_range(idx, npages);
            if pc.push_span(span) {
                self.stashed_spans.fetch_add(1, Ordering::Relaxed);
            } else {
                // SAFETY: as above.
                unsafe { lk.spans.free(span.cast()) };
                self.publish_span_stats(&lk);
            }
            return;
        }
        let mut lk = self.inner.lock(g);
        lk.pa.free_range(idx, npages);
        // SAFETY: as above.
        unsafe { lk.spans.free(span.cast()) };
        self.publish_span_stats(&lk);
    }

    /// Resizes a large object's span in place: grows into the following pages if they are free (growing the
    /// heap if the span ends at its end), or shrinks by freeing the tail. `true` on success.
    ///
    /// Given a token, one guarded section; given sections with windows (`Malloc::realloc` passes its
    /// provider's), a growth that must commit more than `COMMIT_SLICE_NPAGES` pages takes the pages under
    /// the heap lock (counted in `pending_npages`), commits them a slice per section and only then extends
    /// the span, and the page map's stores (no lock) run outside every section (see `slice.rs`).
    ///
    /// # Safety
    /// `span` came from this heap, is `InUse`, and the caller owns it (no concurrent free or resize); on
    /// shrink, nothing uses the dropped tail any more.
    #[must_use]
    pub unsafe fn resize_span_in_place(&self, mut secs: impl Sections, span: NonNull<Span>, new_npages: usize) -> bool {
        let (idx, npages) = self.span_idx(span);
        if new_npages == npages {
            return true;
        }
        if new_npages == 0 {
            return false;
        }
        let sp = span.as_ptr();
        if new_npages < npages {
            let cut = npages - new_npages;
            self.set_map(idx + new_npages, cut, core::ptr::null_mut());
            // SAFETY: the caller owns the span; its page-level fields are ours to update (see Locking).
            unsafe { addr_of_mut!((*sp).npages).write(new_npages) };
            secs.section(|g| {
                let mut lk = self.inner.lock(g);
                lk.pa.free_range(idx + new_npages, cut);
                self.inuse_npages.fetch_sub(cut, Ordering::Relaxed);
            });
            return true;
        }
        let extra = new_npages - npages;
        let from = idx + npages;
        let windows = secs.windows();
        // Take the pages (growing the heap first if the span ends at its end: at most `GROW_SLICE_CHUNKS`
        // per section when there are windows).
        let taken = loop {
            let step = secs.section(|g| {
                let Some(mut lk) = self.lock_ready(g) else { return Some(None) };
                let inner = &mut *lk;
                match from.checked_add(extra) {
                    Some(end) if end <= inner.arena_bytes / PAGE_SIZE => {}
                    _ => return Some(None),
                }
                let grown = inner.pa.grown_npages();
                let in_grown = grown.saturating_sub(from).min(extra);
                if inner.pa.count_alloc(from, in_grown) != 0 {
                    return Some(None);
                }
                if from + extra > grown {
                    let have = inner.pa.grown_chunks() * PALLOC_CHUNK_PAGES;
                    let step_to = have + GROW_SLICE_CHUNKS * PALLOC_CHUNK_PAGES;
                    if windows && from + extra > step_to {
                        // Grow one step and come back in a new section.
                        return if self.grow_locked(inner, 0, step_to) { None } else { Some(None) };
                    }
                    if !self.grow_locked(inner, 0, from + extra) {
                        return Some(None);
                    }
                }
                inner.pa.alloc_range(from, extra);
                let nscav = inner.pa.count_scav(from, extra);
                let needzero = nscav != extra || !self.source.commit_zeroes();
                if windows && nscav > COMMIT_SLICE_NPAGES {
                    self.pending_npages.fetch_add(extra, Ordering::Relaxed);
                    return Some(Some((needzero, false)));
                }
                if !self.commit_range_locked(inner, from, extra) {
                    inner.pa.free_range(from, extra);
                    return Some(None);
                }
                Some(Some((needzero, true)))
            });
            if let Some(t) = step {
                break t;
            }
        };
        let Some((needzero, committed)) = taken else { return false };
        if !committed {
            let mut off = 0;
            while off < extra {
                let k = COMMIT_SLICE_NPAGES.min(extra - off);
                if !self.commit_in_sections(&mut secs, from + off, k) {
                    secs.section(|g| {
                        self.inner.lock(g).pa.free_range(from, extra);
                        self.pending_npages.fetch_sub(extra, Ordering::Relaxed);
                    });
                    return false;
                }
                off += k;
            }
        }
        // SAFETY: as above.
        unsafe {
            addr_of_mut!((*sp).npages).write(new_npages);
            if needzero {
                addr_of_mut!((*sp).needzero).write(true);
            }
        }
        self.set_map(from, extra, sp);
        secs.section(|g| {
            if !committed {
                let _lk = self.inner.lock(g);
                self.pending_npages.fetch_sub(extra, Ordering::Relaxed);
            }
            let n = self.inuse_npages.fetch_add(extra, Ordering::Relaxed) + extra;
            self.epoch_peak_npages.fetch_max(n, Ordering::Relaxed);
            self.alloc_volume_npages.fetch_add(extra, Ordering::Relaxed);
        });
        self.after_alloc(&mut secs);
        true
    }
}

/// Large zeroed allocations: fresh zero pages instead of clearing dirty ones by hand.
impl<S: PageSource> Heap<S> {
    /// As [`Heap::alloc_span`] for a large object (class 0) that must read as zero, for a source whose
    /// committed memory reads as zero ([`PageSource::commit_zeroes`]): the committed pages of the run found
    /// are decommitted (marked scavenged) before the run is committed again, so the span comes back with
    /// `needzero == false` and the caller skips the clear. Above some size that beats clearing: the source
    /// drops the dirty pages at once (`MADV_DONTNEED` on a host) and the memory is zeroed page by page
    /// when first touched, if ever. `None` as for `alloc_span` (the heap stays consistent).
    pub fn alloc_span_fresh_zero(&self, g: Guarded<'_>, npages: usize) -> Option<NonNull<Span>> {
        if npages == 0 || !self.source.commit_zeroes() {
            return None;
        }
        let mut lock = self.lock_ready(g)?;
        let inner = &mut *lock;
        let s = self.new_descriptor_locked(inner)?;
        // SAFETY: `s` was just taken from this allocator and is unused.
        let idx = unsafe { self.alloc_pages_for_locked(inner, s, npages, PAGE_SIZE) }?;
        self.decommit_committed_locked(inner, idx, npages);
        if !self.commit_range_locked(inner, idx, npages) {
            // SAFETY: as above; the run was taken for `s` just now.
            unsafe { self.drop_unpublished_locked(inner, s, Some((idx, npages))) };
            return None;
        }
        self.publish_span(s, idx, npages, 0, false);
        drop(lock);
        self.after_alloc(&mut { g });
        Some(s)
    }

    /// Decommits every committed run of the allocated range `[idx, idx + npages)` (the gaps between its
    /// scavenged runs) and marks it scavenged. Heap lock held.
    pub(super) fn decommit_committed_locked(&self, inner: &mut HeapInner, idx: usize, npages: usize) {
        let (end, mut pos) = (idx + npages, idx);
        while pos < end {
            let mut next = None;
            inner.pa.for_each_scav_run(pos, end - pos, |i, k| {
                next = Some((i, k));
                false
            });
            let (gap_end, resume) = next.map_or((end, end), |(i, k)| (i, i + k));
            if gap_end > pos {
                let n = gap_end - pos;
                // SAFETY: the pages are grown, committed (not scavenged) and allocated to us; nothing uses them.
                // The heap lock is held (the page level's rule for source calls).
                unsafe {
                    self.source.decommit(
                        NonNull::new_unchecked((inner.arena_base + pos * PAGE_SIZE) as *mut u8),
                        n * PAGE_SIZE,
                    )
                };
                inner.pa.set_scav(pos, n, true);
                self.committed_npages.fetch_sub(n, Ordering::Relaxed);
            }
            pos = resume;
        }
    }
}
