//! The standard interfaces: `GlobalAlloc` and allocator-api2's `Allocator` (with `grow`/`shrink`).
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;

// SAFETY: `alloc` returns memory fit for `layout` or null and never unwinds on out-of-memory; `dealloc`
// frees only what `alloc` returned (caller's contract), and bad frees are reported through the report hook
// (`Hosted` makes it abort rather than unwind).
unsafe impl<S: PageSource, P: CpuProvider> GlobalAlloc for Malloc<S, P> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Malloc::alloc(self, layout)
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Malloc::alloc_zeroed(self, layout)
    }
    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { Malloc::dealloc(self, ptr, layout) }
    }
    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded contract.
        unsafe { Malloc::realloc(self, ptr, layout, new_size) }
    }
}

// SAFETY: blocks stay valid until deallocated through any copy of the reference (they all name the same
// allocator); zero-sized requests get a dangling, aligned pointer and are never passed to the heap.
unsafe impl<S: PageSource, P: CpuProvider> allocator_api2::alloc::Allocator for &Malloc<S, P> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            // SAFETY: `align` is non-zero, so the pointer is non-null.
            let p = unsafe { NonNull::new_unchecked(layout.align() as *mut u8) };
            return Ok(NonNull::slice_from_raw_parts(p, 0));
        }
        let p = NonNull::new(Malloc::alloc(self, layout)).ok_or(allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            return self.allocate(layout);
        }
        let p = NonNull::new(Malloc::alloc_zeroed(self, layout)).ok_or(allocator_api2::alloc::AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, layout.size()))
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: forwarded contract.
            unsafe { Malloc::dealloc(self, ptr.as_ptr(), layout) }
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.resize(ptr, old, new) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.resize(ptr, old, new) }
    }
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// `Allocator::grow`/`shrink`: `realloc` when both sizes are non-zero and the alignment stays, else a
    /// fresh block, a copy and a free.
    ///
    /// # Safety
    /// As for `Allocator::grow`/`shrink`: `ptr` is a block of this allocator fitting `old`.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        use allocator_api2::alloc::{AllocError, Allocator};
        let this: &Self = self;
        if old.size() == 0 || new.size() == 0 || new.align() != old.align() {
            let fresh = this.allocate(new)?;
            // SAFETY: both blocks are valid for the smaller size and distinct; the old block is given up.
            unsafe {
                ptr::copy_nonoverlapping(ptr.as_ptr(), fresh.as_ptr() as *mut u8, old.size().min(new.size()));
                this.deallocate(ptr, old);
            }
            return Ok(fresh);
        }
        // SAFETY: forwarded contract; same alignment, both sizes non-zero.
        let p = unsafe { self.realloc(ptr.as_ptr(), old, new.size()) };
        let p = NonNull::new(p).ok_or(AllocError)?;
        Ok(NonNull::slice_from_raw_parts(p, new.size()))
    }
}
