//! The allocation paths: the inlined fast path (this CPU's stock or cached span, a leaf section), the
//! general path (tiny, small refills, sampling) and the large path.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! # Large allocations in slices (interrupt latency)
//! Above `COMMIT_SLICE_NPAGES` pages (not in guard mode) the large path does not enter the cache first:
//! the page heap takes the run, commits it and publishes it in guarded sections of a slice each
//! (`Heap::alloc_span_sliced`, see `page/heap/slice.rs`), then one short section does the bookkeeping on
//! the cache; the clear of a dirty span for `alloc_zeroed` runs after it, with interrupts on (the span is
//! the caller's alone by then).

use super::*;
use crate::object::class::{stock_key_slot, STOCK_KEY_MIN_SIZE};
use crate::page::heap::slice::{ProviderSections, COMMIT_SLICE_NPAGES};

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Allocates memory for `layout`; null when out of memory. `layout.size()` may be 0 (then 1 byte is used).
    #[inline]
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl::<false>(layout)
    }

    /// As [`Malloc::alloc`], with the memory zeroed (skipping memory known to be zero already).
    #[inline]
    pub fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl::<true>(layout)
    }

    /// Whether a request of `size` bytes aligned to `align` may take the fast paths: a size class (not tiny,
    /// not large) at the natural alignment, no debug knob. The knobs are folded into the size test
    /// (`fast_span` is 0 while one is set), so this is a load, two compares and two branches.
    #[inline(always)]
    pub(super) fn fast_eligible(&self, size: usize, align: usize) -> bool {
        size.wrapping_sub(TINY_REQUEST_LIMIT) < self.fast_span.load(Ordering::Relaxed) && align <= sizeclass::MIN_ALIGN
    }

    /// The fast path (kept small so that it inlines into callers without spilling): this CPU's stock or
    /// cached span, else the general path. A leaf section: it calls nothing while it holds the cache, so it
    /// needs no callee-saved registers and the provider need not mark the cache busy. An allocation that
    /// would end the sampling countdown goes to the general path, which draws the sample.
    #[inline(always)]
    pub(super) fn alloc_impl<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        self.alloc_or::<ZERO>(layout, |l| self.alloc_general::<ZERO>(l))
    }

    /// [`Malloc::alloc_impl`] with `general` in place of the general path, called (as the last thing, so in
    /// tail position) for every request the fast path does not finish and never on the fast path. The
    /// hosted allocator reads its environment and registers its `fork()` handlers there (the first
    /// allocation of an allocator always takes the general path: nothing is cached yet), the kernel heap
    /// reports a null result there; each passes one out-of-line function, so the fast path saves no
    /// registers and pays nothing for either.
    #[inline(always)]
    pub(crate) fn alloc_or<const ZERO: bool>(
        &self,
        layout: Layout,
        general: impl FnOnce(Layout) -> *mut u8,
    ) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if self.fast_eligible(size, align) {
            let c = sizeclass::class_of(size);
            let (guard, idx) = self.provider.enter_leaf();
            if let Some(i) = idx {
                // SAFETY: the leaf guard gave index `i`; the references do not outlive it, and nothing below
                // calls out (leaf section).
                let (cache, sh) = unsafe { self.cache_of(i) };
                let left = cache.next_sample - size as isize;
                if left >= 0 {
                    // Counted down before the attempt and given back if it fails (read again then, not kept):
                    // no register holds `left` across the attempt, which keeps the inlined fast path free of
                    // callee-saved registers even with a provider that keeps its saved flags in one.
                    cache.next_sample = left;
                    // SAFETY: `class_of` returns a size class, below `NUM_ALLOC_CLASSES`.
                    if let Some(p) = unsafe { cache.alloc_fast::<ZERO>(c, sh) } {
                        drop(guard);
                        if !ZERO {
                            // SAFETY: `p` is ours, of a class of at least 16 bytes (the fast path's: requests of
                            // `TINY_REQUEST_LIMIT` bytes and up round up to 16 or more): clear
                            // the stock key it may carry, so its free does not scan the stock.
                            unsafe { *stock_key_slot(p) = 0 };
                        }
                        #[cfg(feature = "checks")]
                        self.mark_live(p, ZERO);
                        return p;
                    }
                    // SAFETY: a plain field of our cache; volatile only so the compiler reloads it.
                    let now = unsafe { ptr::read_volatile(&cache.next_sample) };
                    cache.next_sample = now + size as isize;
                }
            }
            drop(guard);
        } else if self.tiny_eligible(size, align) {
            return self.alloc_tiny_or::<ZERO>(layout, general);
        }
        general(layout)
    }

    /// Whether a request of `size` bytes aligned to `align` may take the tiny fast paths: a tiny request
    /// (under [`TINY_REQUEST_LIMIT`], aligned to at most 8) with no debug knob set.
    #[inline(always)]
    pub(super) fn tiny_eligible(&self, size: usize, align: usize) -> bool {
        size < TINY_REQUEST_LIMIT && align <= sizeclass::MIN_ALIGN && self.fast_span.load(Ordering::Relaxed) != 0
    }

    /// The tiny fast path, out of line (the size classes' fast path inlines; this one keeps it out of their
    /// callers): a leaf section that takes the object from this CPU's tiny block, or a new block from the
    /// tiny class's stock or cached span ([`CpuCache::alloc_tiny_leaf`]); else `general`. As the size
    /// classes' fast path, it counts the sampling countdown down and leaves an allocation that would end it to
    /// the general path. A block the change of blocks found all freed that does not fit the stock is freed
    /// after the section, in one of its own ([`Malloc::tiny_rest`]).
    #[inline(never)]
    fn alloc_tiny_or<const ZERO: bool>(&self, layout: Layout, general: impl FnOnce(Layout) -> *mut u8) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let (guard, idx) = self.provider.enter_leaf();
        if let Some(i) = idx {
            // SAFETY: the leaf guard gave index `i`; the references do not outlive it (a leaf section).
            let (cache, sh) = unsafe { self.cache_of(i) };
            let left = cache.next_sample - size as isize;
            if left >= 0 {
                cache.next_sample = left;
                let (p, freed) = cache.alloc_tiny_leaf(size.max(1), align, sh);
                if !p.is_null() {
                    drop(guard);
                    if freed != 0 {
                        self.tiny_rest(false, freed);
                    }
                    if ZERO {
                        // SAFETY: `p` is a fresh allocation of at least `size` bytes.
                        unsafe { ptr::write_bytes(p, 0, size) };
                    }
                    return p;
                }
                cache.next_sample += size as isize;
            }
        }
        drop(guard);
        general(layout)
    }

    /// Every allocation the fast path does not finish.
    #[inline(never)]
    pub(crate) fn alloc_general<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let r = self.route(size, align);
        if r == LARGE || r == GUARDED {
            return self.alloc_large(size, align, ZERO, r == GUARDED);
        }
        let mut e = self.enter();
        // The sampling countdown is counted before allocating: a sampled allocation may be guarded (placed in
        // the guarded pool, see `guarded.rs`); otherwise a sampled small or tiny object lives in the profile's
        // region (see `profile/table.rs`). Either way it is tracked by address, so its free updates the
        // profile's in-use counts.
        let sampled = self.count_sample(e.cache, size);
        if sampled && !self.tables_made() {
            // The first sample: the profile's tables are made in sections of their own.
            drop(e);
            self.prepare_tables();
            e = self.enter();
        }
        let g = e.held.guarded();
        if sampled {
            let mut p = if self.guarded_pick() { self.alloc_guarded(size, align, ZERO, g) } else { ptr::null_mut() };
            if p.is_null() {
                p = self.alloc_sampled_small(size, r, ZERO, e.sh, g);
            }
            if !p.is_null() {
                let me = e.sh.index;
                drop(e);
                self.record_sample(p as usize, size, r, me, true);
                return p;
            }
        }
        let mut p = self.alloc_small::<ZERO>(e.cache, e.sh, g, size, align, r);
        if p.is_null() {
            // Out of memory: give back what the allocator holds free and retry once (see `reclaim.rs`), in
            // sections of their own; the retry enters again (possibly another CPU's cache, in a host).
            drop(e);
            self.reclaim_sliced();
            e = self.enter();
            p = self.alloc_small::<ZERO>(e.cache, e.sh, e.held.guarded(), size, align, r);
        }
        let me = e.sh.index;
        drop(e);
        if !p.is_null() {
            // After the section: the limit's reclaim works in sections of its own.
            self.after_alloc_limit();
        }
        #[cfg(feature = "checks")]
        if !p.is_null() && r != TINY_CLASS {
            // (Tiny objects need no marking: the block's starts mask, stored by the tiny path in every build,
            // is what a tiny free checks.)
            self.mark_live(p, ZERO);
        }
        if sampled && !p.is_null() {
            self.record_sample(p as usize, size, r, me, false);
        }
        p
    }

    /// A small or tiny object of route `r` (not large) from `cache`, its stock key cleared. Null when out of
    /// memory.
    #[inline(always)]
    fn alloc_small<const ZERO: bool>(
        &self,
        cache: &mut CpuCache,
        sh: &CpuShared,
        g: Guarded<'_>,
        size: usize,
        align: usize,
        r: usize,
    ) -> *mut u8 {
        let t = &self.t;
        if r == TINY_CLASS {
            let p = cache.alloc_tiny(t, size.max(1), align, sh, g);
            if ZERO && !p.is_null() {
                // SAFETY: `p` is a fresh allocation of `size` bytes.
                unsafe { ptr::write_bytes(p, 0, size) };
            }
            p
        } else {
            // SAFETY: `route` returns size classes below `NUM_SIZE_CLASSES` (or the tiny class, above).
            let p = unsafe { cache.alloc::<S, ZERO>(t, r, sh, g) };
            if !ZERO && !p.is_null() && class_shape(r).elemsize as usize >= STOCK_KEY_MIN_SIZE {
                // SAFETY: `p` is ours and has room for the stock key (cleared as in `alloc_or`).
                unsafe { *stock_key_slot(p) = 0 };
            }
            p
        }
    }

    /// The large path (and guard mode): a span of whole pages for one object. Above
    /// [`COMMIT_SLICE_NPAGES`] pages the span's pages are committed in slices, each in a guarded section of
    /// its own (see [`Malloc::alloc_large_sliced`]).
    ///
    /// Guard mode (`guarded`): the object ends right before a guard page, the span's last page, which is
    /// decommitted (see `guarded.rs`); the span has room to align the object below it.
    #[cold]
    pub(super) fn alloc_large(&self, size: usize, align: usize, zero: bool, guarded: bool) -> *mut u8 {
        // Guard mode: the object ends right before a guard page, so the body must leave room to align it.
        let npages = if guarded { npages_for(size + align - 1) + 1 } else { npages_for(size) };
        if npages > COMMIT_SLICE_NPAGES {
            return self.alloc_large_sliced(size, align, zero, npages, guarded);
        }
        let span = |cache: &mut CpuCache, g: Guarded<'_>| {
            if zero && !guarded && align <= PAGE_SIZE && size >= FRESH_ZERO_MIN_BYTES {
                // Fresh zero pages rather than clearing dirty ones (see `Heap::alloc_span_fresh_zero`).
                self.t.heap.alloc_span_fresh_zero(g, npages).or_else(|| self.t.heap.alloc_span(g, None, npages, 0))
            } else if align <= PAGE_SIZE || guarded {
                self.t.heap.alloc_span(g, Some(&mut cache.pcache), npages, 0)
            } else {
                self.t.heap.alloc_span_aligned(g, npages, align)
            }
        };
        let mut e = self.enter();
        let mut s = span(e.cache, e.held.guarded());
        if s.is_none() {
            // Out of memory: give back what the allocator holds free and retry once (see `reclaim.rs`), in
            // sections of their own.
            drop(e);
            self.reclaim_sliced();
            e = self.enter();
            s = span(e.cache, e.held.guarded());
        }
        let g = e.held.guarded();
        let Some(s) = s else { return ptr::null_mut() };
        let s = s.as_ptr();
        // SAFETY: a fresh large span is ours alone.
        let p = unsafe {
            Span::init_large(s);
            let base = (*s).base;
            let p = if guarded {
                let guard = base + (npages - 1) * PAGE_SIZE;
                // SAFETY: the guard page is committed, ours, and unused; it is committed again before the
                // span goes back to the heap (`free_large`).
                self.t.heap.src(g).decommit_guard(NonNull::new_unchecked(guard as *mut u8), PAGE_SIZE);
                ((guard - size) & !(align - 1)) as *mut u8
            } else {
                base as *mut u8
            };
            e.sh.stats.large_nmalloc.bump();
            e.sh.stats.large_bytes_alloc.add((npages * PAGE_SIZE) as u64);
            p
        };
        // SAFETY: the span is ours alone until we return `p`.
        let needzero = zero && unsafe { (*s).needzero };
        let sampled = self.count_sample(e.cache, size);
        let me = e.sh.index;
        drop(e);
        self.after_alloc_limit();
        if needzero {
            // SAFETY: `p` is the start of `size` bytes of the fresh span, ours alone. Outside the guard: a
            // clear of many pages does not keep interrupts off.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        if sampled {
            self.record_sample(p as usize, size, LARGE, me, true);
        }
        p
    }

    /// The large path for more than [`COMMIT_SLICE_NPAGES`] pages: the page heap takes the run, commits it
    /// in slices and publishes it (`Heap::alloc_span_sliced`), each slice in a guarded section of its own
    /// with interrupt windows between them; then one short section for the allocator's bookkeeping; the
    /// clear of a dirty span for `alloc_zeroed` runs outside the guard. In guard mode (`guarded`, see
    /// [`Malloc::alloc_large`]) the span is page-aligned and its guard page decommitted in that last section.
    #[cold]
    #[inline(never)]
    fn alloc_large_sliced(&self, size: usize, align: usize, zero: bool, npages: usize, guarded: bool) -> *mut u8 {
        let heap = &self.t.heap;
        let mut secs = ProviderSections(&self.provider);
        let fresh =
            zero && !guarded && align <= PAGE_SIZE && size >= FRESH_ZERO_MIN_BYTES && heap.source().commit_zeroes();
        let span_align = if guarded { PAGE_SIZE } else { align };
        let span = |secs: &mut ProviderSections<'_, P>| {
            // Fresh zero pages rather than clearing dirty ones (see `Heap::alloc_span_fresh_zero`).
            let s = if fresh { heap.alloc_span_sliced(secs, npages, PAGE_SIZE, true) } else { None };
            s.or_else(|| heap.alloc_span_sliced(secs, npages, span_align, false))
        };
        let mut s = span(&mut secs);
        if s.is_none() {
            // Out of memory: give back what the allocator holds free and retry once (see `reclaim.rs`).
            self.reclaim_sliced();
            s = span(&mut secs);
        }
        let Some(s) = s else { return ptr::null_mut() };
        let s = s.as_ptr();
        self.after_alloc_limit();
        let e = self.enter();
        // SAFETY: a fresh large span is ours alone.
        let (p, needzero) = unsafe {
            Span::init_large(s);
            let base = (*s).base;
            let p = if guarded {
                let guard = base + (npages - 1) * PAGE_SIZE;
                // SAFETY: the guard page is committed, ours, and unused; it is committed again before the
                // span goes back to the heap (`free_large`).
                heap.src(e.held.guarded()).decommit_guard(NonNull::new_unchecked(guard as *mut u8), PAGE_SIZE);
                ((guard - size) & !(align - 1)) as *mut u8
            } else {
                base as *mut u8
            };
            (p, zero && (*s).needzero)
        };
        e.sh.stats.large_nmalloc.bump();
        e.sh.stats.large_bytes_alloc.add((npages * PAGE_SIZE) as u64);
        let sampled = self.count_sample(e.cache, size);
        let me = e.sh.index;
        drop(e);
        if needzero {
            // SAFETY: `p` is the start of `size` bytes of the fresh span, ours alone.
            unsafe { ptr::write_bytes(p, 0, size) };
        }
        if sampled {
            self.record_sample(p as usize, size, LARGE, me, true);
        }
        p
    }
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// With `checks`: marks a freshly allocated small object live, and if it was freed by the user since it
    /// was last handed out, verifies the poison pattern its free left (unless `zeroed`: `alloc_zeroed` has
    /// cleared it already): a difference is reported as a write after free.
    #[cfg(feature = "checks")]
    #[inline]
    pub(super) fn mark_live(&self, p: *mut u8, zeroed: bool) {
        let Some(s) = self.t.heap.span_of(p as usize) else { return };
        let s = s.as_ptr();
        // SAFETY: live span; `live_bits` and `poisoned` are atomics; the object is ours (just handed out).
        unsafe {
            let (idx, _) = Span::object_index(s, p as usize);
            let bit = 1u64 << (idx % 64);
            let prev = (*s).live_bits[idx / 64].fetch_or(bit, Ordering::AcqRel);
            debug_assert_eq!(prev & bit, 0, "goheap: handed out a live object {p:p}");
            let was_poisoned = (*s).poisoned[idx / 64].fetch_and(!bit, Ordering::Acquire) & bit != 0;
            if was_poisoned && !zeroed {
                if let Some(offset) = check::poison_damage(p, (*s).elemsize as usize) {
                    self.report(p as usize, Reason::WriteAfterFree { offset });
                }
            }
        }
    }
}
