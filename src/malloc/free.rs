//! The free paths (Go has none: its GC frees): the inlined fast path, the general path, the `checks`
//! validation of small and tiny frees, large frees, and `realloc`.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;

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
        let fast = self.fast_eligible(size, align);
        if fast {
            let c = sizeclass::class_of(size);
            #[cfg(feature = "checks")]
            self.check_small_free(ptr, layout, c);
            let (guard, idx) = self.provider.enter_leaf();
            if let Some(i) = idx {
                // SAFETY: as in `alloc_impl`: index `i` is ours while the guard lives (a leaf section).
                let slot = unsafe { self.caches.get_unchecked(i) };
                // SAFETY: as above.
                let cache = unsafe { &mut *slot.cache.get() };
                // SAFETY: forwarded contract: `ptr` is a class-`c` object of ours; `c` is a size class.
                if unsafe { cache.free_fast(c, ptr, &slot.shared) } {
                    drop(guard);
                    return;
                }
            }
            drop(guard);
        }
        // SAFETY: forwarded contract.
        unsafe { self.dealloc_general(ptr, layout, fast) }
    }

    /// Every free the fast path does not finish. `checked`: the fast path already ran the `checks`.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`].
    #[inline(never)]
    pub(super) unsafe fn dealloc_general(&self, ptr: *mut u8, layout: Layout, checked: bool) {
        let (size, align) = (layout.size(), layout.align());
        let r = self.route(size, align);
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
        let e = self.enter();
        let g = e.held.guarded();
        if r == TINY_CLASS {
            // SAFETY: forwarded contract: a tiny-path object.
            unsafe { e.cache.free_tiny(&self.t, ptr, e.sh, g) }
        } else {
            // SAFETY: forwarded contract: an object of class `r`.
            unsafe { e.cache.free(&self.t, r, ptr, e.sh, g) }
        }
    }

    /// With `checks`: validates a small or tiny free before it touches any state.
    #[cfg(feature = "checks")]
    pub(super) fn check_small_free(&self, ptr: *mut u8, layout: Layout, r: Route) {
        let addr = ptr as usize;
        let bad = |reason| -> ! { self.report(addr, reason) };
        if addr % layout.align() != 0 {
            bad(Reason::Misaligned { align: layout.align() });
        }
        let Some(s) = self.t.heap.span_of(addr) else { bad(Reason::NotInHeap) };
        let s = s.as_ptr();
        // SAFETY: live span; shape fields immutable while in use; `live_bits` are atomics.
        unsafe {
            if (*s).class as usize != r {
                bad(Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
            }
            if r == TINY_CLASS {
                return; // tiny objects share blocks: only the block's count knows them (see cpucache.rs)
            }
            let (idx, exact) = Span::object_index(s, addr);
            if !exact {
                bad(Reason::Interior);
            }
            let bit = 1u64 << (idx % 64);
            if (*s).live_bits[idx / 64].fetch_and(!bit, Ordering::AcqRel) & bit == 0 {
                bad(Reason::DoubleFree);
            }
        }
    }

    /// Frees a large object.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`].
    pub(super) unsafe fn free_large(&self, ptr: *mut u8, layout: Layout, guarded: bool) {
        let addr = ptr as usize;
        let s = match self.t.heap.span_of(addr) {
            Some(s) => s,
            None => self.report(addr, Reason::NotInHeap),
        };
        // SAFETY: live span; its shape fields are immutable while in use.
        let (base, class, npages) = unsafe { ((*s.as_ptr()).base, (*s.as_ptr()).class, (*s.as_ptr()).npages) };
        if class != 0 {
            self.report(addr, Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
        }
        let guard_page = base + (npages - 1) * PAGE_SIZE;
        if guarded {
            if addr != (guard_page - layout.size()) & !(layout.align() - 1) {
                self.report(addr, Reason::Interior);
            }
        } else if base != addr {
            self.report(addr, Reason::Interior);
        }
        self.with_cache(|c, t, sh, g| {
            if guarded {
                // SAFETY: the guard page was decommitted by `alloc_large`; the span is the caller's.
                let ok = unsafe { t.heap.src(g).commit(NonNull::new_unchecked(guard_page as *mut u8), PAGE_SIZE) };
                if !ok {
                    // The heap believes every page of the span committed: without the guard page back, the
                    // span cannot be reused. Keep it (leaked) rather than hand out an inaccessible page later.
                    return;
                }
            }
            sh.stats.large_nfree.bump();
            sh.stats.large_bytes_free.add((npages * PAGE_SIZE) as u64);
            // SAFETY: the caller gives the object up; the span holds nothing else.
            unsafe { t.heap.free_span(g, Some(&mut c.pcache), s) };
        });
    }

    /// Resizes the allocation at `ptr` (Go has no realloc; this is Rust's contract): in place when the new
    /// size maps to the same class, or for a large object when the heap can grow or shrink its span in place;
    /// otherwise allocate, copy, free. Null (and the old allocation intact) when out of memory.
    ///
    /// # Safety
    /// `ptr` was returned by this allocator for `layout`; `new_size` rounded up to `layout.align()` does not
    /// overflow `isize`.
    pub unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        let (old_r, new_r) = (self.route(layout.size(), align), self.route(new_size, align));
        if old_r == new_r && old_r != TINY_CLASS && old_r != LARGE && old_r != GUARDED {
            return ptr;
        }
        if old_r == LARGE && new_r == LARGE {
            let Some(s) = self.t.heap.span_of(ptr as usize) else { self.report(ptr as usize, Reason::NotInHeap) };
            // SAFETY: live span.
            let old_npages = unsafe { (*s.as_ptr()).npages };
            let new_npages = npages_for(new_size);
            if old_npages == new_npages {
                return ptr;
            }
            let resized = self.with_cache(|_, t, sh, g| {
                // SAFETY: the span is this large object's; the caller owns it.
                if !unsafe { t.heap.resize_span_in_place(g, s, new_npages) } {
                    return false;
                }
                sh.stats.large_bytes_free.add((old_npages * PAGE_SIZE) as u64);
                sh.stats.large_bytes_alloc.add((new_npages * PAGE_SIZE) as u64);
                true
            });
            if resized {
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
