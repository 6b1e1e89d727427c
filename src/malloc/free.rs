//! The free paths (Go has none: its GC frees): the inlined fast path, the general path, the `checks`
//! validation of small and tiny frees, large frees, and `realloc`.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;
use crate::object::class::{in_tiny_blocks, tiny_check, tiny_release};
use crate::page::heap::slice::ProviderSections;

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Frees `ptr`, allocated by this allocator with `layout`.
    ///
    /// Bad input (a pointer this allocator did not hand out, a second free, an interior or misaligned
    /// pointer, a layout of another class) is reported through [`check::report`] when detected; see
    /// `check.rs` for what is detected with and without the `checks` feature.
    ///
    /// # Safety
    /// `ptr` was returned by this allocator for `layout` and is not used after this call.
    #[inline]
    pub unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let (size, align) = (layout.size(), layout.align());
        if !self.fast_eligible(size, align) {
            if self.tiny_eligible(size, align) {
                // SAFETY: forwarded contract.
                return unsafe { self.dealloc_tiny(ptr, layout) };
            }
            // SAFETY: forwarded contract.
            return unsafe { self.dealloc_general(ptr, layout, false) };
        }
        let c = sizeclass::class_of(size);
        #[cfg(feature = "checks")]
        self.check_small_free(ptr, layout, c);
        // A pointer outside the heap's arena, or misaligned, never enters a stock (the general path reports
        // it).
        if self.in_arena(ptr as usize) {
            let (guard, idx) = self.provider.enter_leaf();
            if let Some(i) = idx {
                // SAFETY: the leaf guard gave index `i`; the references do not outlive it (a leaf section).
                let (cache, sh) = unsafe { self.cache_of(i) };
                // SAFETY: forwarded contract: `ptr` is a class-`c` object of ours (at least 16 bytes: the fast
                // path serves no smaller class); `c` is a size class.
                if unsafe { cache.free_fast(c, ptr, sh) } {
                    drop(guard);
                    return;
                }
            }
            drop(guard);
        }
        // Two tail calls rather than one with a flag, so the fast path keeps no register for the flag.
        // SAFETY: forwarded contract; the fast path's checks ran.
        unsafe { self.dealloc_general(ptr, layout, true) }
    }

    /// Whether `addr` lies in the grown part of the heap's arena and is 8-byte aligned (as every object of a
    /// size class is): the check every small free makes before its object may enter a stock. Two loads, a
    /// rotate and a compare: with `off = addr - arena_base` and `grown` a multiple of 8 (the heap keeps
    /// `grown_words = grown >> 3`), `off.rotate_right(3) < grown >> 3` holds exactly when `off < grown` and
    /// `off % 8 == 0` (a misaligned offset rotates its low bits to the top, above any `grown >> 3`).
    #[inline(always)]
    pub(super) fn in_arena(&self, addr: usize) -> bool {
        let h = &self.t.heap;
        let off = addr.wrapping_sub(h.arena_base.load(Ordering::Relaxed));
        off.rotate_right(3) < h.grown_words.load(Ordering::Relaxed)
    }

    /// The tiny fast path of a free, out of line: `ptr` is checked as the general path checks a tiny free (in
    /// the heap's arena, aligned to `layout`, in the blocks of a live tiny span, at an object's start), its
    /// block's masks updated ([`tiny_release`]), and the free counted in a leaf section, which also puts a
    /// block the free completed on the tiny class's stock. A pointer that fails a check goes to the general
    /// path unchanged (which reports it), a double free is reported here; a completed block that does not
    /// fit the stock is freed in a section of its own.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`].
    #[inline(never)]
    unsafe fn dealloc_tiny(&self, ptr: *mut u8, layout: Layout) {
        let addr = ptr as usize;
        // Sampled objects (the profile's region, the guarded pool) lie outside the arena: no span.
        let tiny_span = match self.t.heap.span_of(addr) {
            // SAFETY: a live span's shape fields are immutable while it is in use.
            Some(s) => unsafe { (*s.as_ptr()).class as usize == TINY_CLASS },
            None => false,
        };
        if !tiny_span || addr & (layout.align() - 1) != 0 || !in_tiny_blocks(addr) {
            // SAFETY: forwarded contract.
            return unsafe { self.dealloc_general(ptr, layout, false) };
        }
        // SAFETY: in the blocks of a live tiny span (checked above).
        let freed = match unsafe { tiny_release(addr) } {
            Ok(freed) => freed,
            // SAFETY: forwarded contract; nothing changed (an interior pointer: the general path reports it).
            Err(Reason::Interior) => return unsafe { self.dealloc_general(ptr, layout, false) },
            Err(reason) => self.report(addr, reason),
        };
        let (guard, idx) = self.provider.enter_leaf();
        if let Some(i) = idx {
            // SAFETY: the leaf guard gave index `i`; the references do not outlive it (a leaf section).
            let (cache, sh) = unsafe { self.cache_of(i) };
            // SAFETY: `freed` is 0 or the block this free completed, which only we free.
            if unsafe { cache.free_tiny_leaf(freed, sh) } {
                return;
            }
            drop(guard);
            return self.tiny_rest(false, freed);
        }
        drop(guard);
        self.tiny_rest(true, freed);
    }

    /// What a tiny fast path could not finish in its leaf section, in a section of its own: counts a tiny
    /// free if `count_free` (the leaf section got no CPU index), and frees `block` (0: none), a tiny block
    /// all of whose objects were freed, which only the caller frees, when it did not fit the tiny class's
    /// stock.
    #[cold]
    pub(super) fn tiny_rest(&self, count_free: bool, block: usize) {
        self.with_cache(|cache, t, sh, g| {
            if count_free {
                sh.stats.tiny_nfree.bump();
            }
            if block != 0 {
                // SAFETY: a tiny block all of whose objects were freed, which only the caller frees: a free
                // tiny-class object.
                unsafe { cache.free(t, TINY_CLASS, block as *mut u8, sh, g) }
            }
        });
    }

    /// Every free the fast path does not finish. `checked`: the fast path already ran the `checks`.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`].
    #[inline(never)]
    pub(super) unsafe fn dealloc_general(&self, ptr: *mut u8, layout: Layout, checked: bool) {
        if self.guarded.owns(ptr as usize) {
            // A sampled guarded allocation (outside the arena, so never on the fast path).
            // SAFETY: forwarded contract; `ptr` lies in the pool.
            return unsafe { self.free_guarded(ptr, layout) };
        }
        let (size, align) = (layout.size(), layout.align());
        let r = self.route(size, align);
        if self.profiler.in_region(ptr as usize) {
            // A sampled object (the fast path's `in_arena` sent it here): see `profile/table.rs`.
            return self.free_sampled(ptr, layout);
        }
        if r == LARGE || r == GUARDED {
            // SAFETY: forwarded contract.
            return unsafe { self.free_large(ptr, layout, r == GUARDED) };
        }
        #[cfg(feature = "checks")]
        if !checked {
            self.check_small_free(ptr, layout, r);
        }
        #[cfg(not(feature = "checks"))]
        let _ = checked;
        // Without `checks`, the checks every build makes: a tiny free must lie in a tiny span's blocks
        // (`free_tiny` then checks the block's masks: an object's start, not freed yet), and a small object
        // must lie in the heap's arena before it enters a stock.
        #[cfg(not(feature = "checks"))]
        if r == TINY_CLASS {
            // `consume`: `free_tiny` checks the block's masks.
            self.validate_small(ptr, layout, r, true);
        } else if !self.in_arena(ptr as usize) {
            let addr = ptr as usize;
            if addr % sizeclass::MIN_ALIGN != 0 {
                self.report(addr, Reason::Misaligned { align: layout.align().max(sizeclass::MIN_ALIGN) });
            }
            self.report(addr, Reason::NotInHeap);
        }
        let e = self.enter();
        let g = e.held.guarded();
        if r == TINY_CLASS {
            // SAFETY: forwarded contract: in a tiny span's blocks (checked above).
            unsafe { e.cache.free_tiny(&self.t, ptr, e.sh, g) }
        } else {
            // SAFETY: forwarded contract: an object of class `r`.
            unsafe { e.cache.free(&self.t, r, ptr, e.sh, g) }
        }
    }

    /// With `checks`: validates a small or tiny free before it touches any state, and marks the object
    /// free (so a second free is caught).
    #[cfg(feature = "checks")]
    pub(super) fn check_small_free(&self, ptr: *mut u8, layout: Layout, r: Route) {
        if self.profiler.in_region(ptr as usize) {
            return; // A sampled object: `free_sampled` checks its record.
        }
        self.validate_small(ptr, layout, r, true)
    }

    /// Validates `ptr` as a small or tiny object of route `r` (a size class or [`TINY_CLASS`]) for `layout`:
    /// aligned, in a live span of that class, at an object's start (tiny: in the span's blocks, at a start
    /// in its block's masks, and not freed: in every build, unless `consume`, where `free_tiny` checks
    /// them). With `checks` also that a small object is live; `consume` then marks it free (a free; a
    /// `realloc` only looks). Reports and does not return on failure.
    pub(super) fn validate_small(&self, ptr: *mut u8, layout: Layout, r: Route, consume: bool) {
        let addr = ptr as usize;
        let bad = |reason| -> ! { self.report(addr, reason) };
        if addr % layout.align() != 0 {
            bad(Reason::Misaligned { align: layout.align() });
        }
        let Some(s) = self.t.heap.span_of(addr) else {
            if self.guarded.owns(addr) {
                // A sampled guarded allocation: every caller sends it to `free_guarded`/`realloc_guarded`,
                // which check it against its slot.
                return;
            }
            bad(Reason::NotInHeap)
        };
        let s = s.as_ptr();
        // SAFETY: live span; shape fields immutable while in use; live bits and masks are atomics.
        unsafe {
            if (*s).class as usize != r {
                bad(Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
            }
            if r == TINY_CLASS {
                if !in_tiny_blocks(addr) {
                    bad(Reason::Interior);
                }
                // Every build: an object of the block starts here and is not freed (the block's masks). A
                // free (`consume`) leaves this to `free_tiny`, which makes the same checks with its
                // `fetch_or` (exact when two frees race); `realloc` only looks.
                if !consume {
                    if let Err(reason) = tiny_check(addr) {
                        bad(reason);
                    }
                }
                return;
            }
            let (idx, exact) = Span::object_index(s, addr);
            if !exact || idx >= (*s).nelems as usize {
                bad(Reason::Interior);
            }
            #[cfg(feature = "checks")]
            {
                let bit = 1u64 << (idx % 64);
                let w = &(*s).live_bits[idx / 64];
                let was = if consume { w.fetch_and(!bit, Ordering::AcqRel) } else { w.load(Ordering::Acquire) };
                if was & bit == 0 {
                    bad(Reason::DoubleFree);
                }
                if consume {
                    // Clobber the freed object (Go's clobberfree); the allocation that hands it out again
                    // verifies the pattern (see `mark_live`).
                    check::poison(ptr, (*s).elemsize as usize);
                    (*s).poisoned[idx / 64].fetch_or(bit, Ordering::Release);
                }
            }
        }
    }

    /// The span of large object `ptr` freed (or reallocated) with `layout`, validated: in a live large span,
    /// at the object's start (in guard mode: where `alloc_large` put it). Reports and does not return on
    /// failure.
    fn large_span(&self, ptr: *mut u8, layout: Layout, guarded: bool) -> NonNull<Span> {
        let addr = ptr as usize;
        let Some(s) = self.t.heap.span_of(addr) else { self.report(addr, Reason::NotInHeap) };
        // SAFETY: live span; its shape fields are immutable while in use.
        let (base, class, npages) = unsafe { ((*s.as_ptr()).base, (*s.as_ptr()).class, (*s.as_ptr()).npages) };
        if class != 0 {
            self.report(addr, Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
        }
        let start = if guarded {
            let guard = base + (npages - 1) * PAGE_SIZE;
            (guard.wrapping_sub(layout.size())) & !(layout.align() - 1)
        } else {
            base
        };
        if addr != start {
            self.report(addr, Reason::Interior);
        }
        s
    }

    /// Frees a large object.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`].
    pub(super) unsafe fn free_large(&self, ptr: *mut u8, layout: Layout, guarded: bool) {
        let s = self.large_span(ptr, layout, guarded);
        self.untrack_large(ptr);
        // SAFETY: live span; its shape fields are immutable while in use.
        let (base, npages) = unsafe { ((*s.as_ptr()).base, (*s.as_ptr()).npages) };
        let guard_page = base + (npages - 1) * PAGE_SIZE;
        let efence = guarded && self.debug_flags().contains(DebugFlags::EFENCE);
        if efence {
            // Efence: the pages are decommitted and never handed out again (see `page/heap/retire.rs`), a
            // decommit slice per guarded section.
            self.with_cache(|_, _, sh, _| {
                sh.stats.large_nfree.bump();
                sh.stats.large_bytes_free.add((npages * PAGE_SIZE) as u64);
            });
            // SAFETY: the caller gives the object up; the span holds nothing else; its last page is the guard
            // page `alloc_large` decommitted.
            unsafe { self.t.heap.retire_span(&mut ProviderSections(&self.provider), s, 1) };
            return;
        }
        if guarded {
            // The guard page back first, in a section of its own.
            // SAFETY: the guard page was decommitted by `alloc_large`; the span is the caller's.
            let ok = self.with_cache(|_, t, _, g| unsafe {
                t.heap.src(g).commit_unguard(NonNull::new_unchecked(guard_page as *mut u8), PAGE_SIZE)
            });
            if !ok {
                // The heap believes every page of the span committed: without the guard page back, the span
                // cannot be reused. Keep it (leaked, still in use and mapped, so the heap's counts stay
                // exact) rather than hand out an inaccessible page later.
                return;
            }
        }
        // The page map's stores (one per page, no lock) before the guard: a big span's free keeps interrupts
        // off only for the page heap's part (see `page/heap/slice.rs`).
        // SAFETY: the caller gives the object up; the span is this large object's.
        unsafe { self.t.heap.unmap_span(s) };
        self.with_cache(|c, t, sh, g| {
            sh.stats.large_nfree.bump();
            sh.stats.large_bytes_free.add((npages * PAGE_SIZE) as u64);
            // SAFETY: the caller gives the object up; the span holds nothing else; unmapped above.
            unsafe { t.heap.free_span_unmapped(g, Some(&mut c.pcache), s) };
        });
    }

    /// Resizes the allocation at `ptr` (Go has no realloc; this is Rust's contract): in place when the new
    /// size maps to the same class, or for a large object when the heap can grow or shrink its span in place;
    /// otherwise allocate, copy, free. Null (and the old allocation intact) when out of memory.
    ///
    /// `ptr` is validated against `layout` first, in every build, as a `checks` free would validate it (a
    /// live span of `layout`'s class, the object's start; with `checks`, a live object): bad input is
    /// reported before anything is read, copied or resized.
    ///
    /// # Safety
    /// `ptr` was returned by this allocator for `layout`; `new_size` rounded up to `layout.align()` does not
    /// overflow `isize`.
    pub unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if self.guarded.owns(ptr as usize) {
            // SAFETY: forwarded contract; `ptr` lies in the guarded pool.
            return unsafe { self.realloc_guarded(ptr, layout, new_size) };
        }
        let align = layout.align();
        let (old_r, new_r) = (self.route(layout.size(), align), self.route(new_size, align));
        // Validate as a free would (before reading the object or resizing anything); the free at the end of
        // the copy path then checks again.
        let large = if self.profiler.in_region(ptr as usize) {
            self.check_sampled(ptr, layout);
            None
        } else if old_r == LARGE || old_r == GUARDED {
            Some(self.large_span(ptr, layout, old_r == GUARDED))
        } else {
            self.validate_small(ptr, layout, old_r, false);
            None
        };
        if old_r == new_r && old_r != TINY_CLASS && old_r != LARGE && old_r != GUARDED {
            return ptr;
        }
        if let (Some(s), LARGE, LARGE) = (large, old_r, new_r) {
            // SAFETY: live span.
            let old_npages = unsafe { (*s.as_ptr()).npages };
            let new_npages = npages_for(new_size);
            if old_npages == new_npages {
                return ptr;
            }
            // In guarded sections of a slice each (see `page/heap/slice.rs`), then the statistics in one.
            let secs = crate::page::heap::slice::ProviderSections(&self.provider);
            // SAFETY: the span is this large object's; the caller owns it.
            if unsafe { self.t.heap.resize_span_in_place(secs, s, new_npages) } {
                self.with_cache(|_, _, sh, _| {
                    sh.stats.large_bytes_free.add((old_npages * PAGE_SIZE) as u64);
                    sh.stats.large_bytes_alloc.add((new_npages * PAGE_SIZE) as u64);
                });
                return ptr;
            }
        }
        // SAFETY: the caller guarantees the size/alignment pair is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        let new = self.alloc(new_layout);
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap.
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}
