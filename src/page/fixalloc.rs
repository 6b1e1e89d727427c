//! Fixed-size allocator for the heap's own records (Go's `mfixalloc.go`): span descriptors.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! Hands out objects of one size from blocks of [`FIXALLOC_BLOCK_BYTES`] that it reserves *and* commits
//! directly from the [`PageSource`] (never from the heap it serves: the heap needs a descriptor to allocate
//! anything). Freed objects go on an intrusive free list (the link lives in the object's first word, as in
//! Go) and are reused first. Blocks are never given back (Go's fixalloc does not either): span descriptors
//! are few (at most one per heap page) and their memory is reported as `span_sys_bytes`.
//!
//! # Invariants
//! - `sys_bytes = blocks * FIXALLOC_BLOCK_BYTES`; `inuse_bytes = live objects * size`;
//! - `inuse_bytes + size * len(free list) + (bump_end - bump) = sys_bytes`;
//! - every object is `size`-byte sized and `align`-aligned.
//!
//! # Locking
//! None inside (`&mut self`); the heap keeps its `FixAlloc` under the heap lock.

use core::ptr::NonNull;

use crate::source::PageSource;

/// Bytes of each block taken from the source: `FIXALLOC_BLOCK_BYTES = 8 * PAGE_SIZE` = 64 KiB.
pub const FIXALLOC_BLOCK_BYTES: usize = 8 * crate::PAGE_SIZE;

struct FreeObj {
    next: *mut FreeObj,
}

/// A fixed-size object allocator over a page source (see the module docs).
#[derive(Debug)]
pub struct FixAlloc {
    /// Object size: a multiple of `align`, at least a pointer.
    size: usize,
    align: usize,
    /// Free objects.
    free_list: *mut FreeObj,
    /// Unused tail of the current block: `[bump, bump_end)`.
    bump: usize,
    bump_end: usize,
    /// A reserved block whose commit failed, kept for the next attempt (0 = none).
    spare_block: usize,
    /// Bytes taken from the source (committed).
    sys_bytes: usize,
    /// Bytes in live objects.
    inuse_bytes: usize,
}

// SAFETY: the raw pointers refer to memory this allocator owns; whoever holds it (the heap, under its lock)
// has exclusive access.
unsafe impl Send for FixAlloc {}

impl FixAlloc {
    /// An allocator of objects of `size` bytes aligned to `align` (a power of two, at most a page).
    pub const fn new(size: usize, align: usize) -> Self {
        let align = if align < core::mem::align_of::<FreeObj>() { core::mem::align_of::<FreeObj>() } else { align };
        let size = if size < core::mem::size_of::<FreeObj>() { core::mem::size_of::<FreeObj>() } else { size };
        let size = (size + align - 1) & !(align - 1);
        Self {
            size,
            align,
            free_list: core::ptr::null_mut(),
            bump: 0,
            bump_end: 0,
            spare_block: 0,
            sys_bytes: 0,
            inuse_bytes: 0,
        }
    }

    /// Object size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
    /// Bytes taken from the source.
    pub fn sys_bytes(&self) -> usize {
        self.sys_bytes
    }
    /// Bytes in live objects.
    pub fn inuse_bytes(&self) -> usize {
        self.inuse_bytes
    }

    /// An object (contents unspecified but initialised: zero or a previous object's bytes), or `None` when
    /// the source has no memory.
    pub fn alloc<S: PageSource>(&mut self, source: &S) -> Option<NonNull<u8>> {
        if let Some(p) = NonNull::new(self.free_list) {
            // SAFETY: objects on the free list are ours, unused, and hold a valid link in their first word.
            self.free_list = unsafe { (*p.as_ptr()).next };
            self.inuse_bytes += self.size;
            return Some(p.cast());
        }
        if self.bump + self.size > self.bump_end {
            let block = if self.spare_block != 0 {
                self.spare_block
            } else {
                source.reserve(FIXALLOC_BLOCK_BYTES, crate::PAGE_SIZE)?.as_ptr() as usize
            };
            // SAFETY: `block` is a fresh reservation of FIXALLOC_BLOCK_BYTES, not committed.
            if !unsafe { source.commit(NonNull::new(block as *mut u8)?, FIXALLOC_BLOCK_BYTES) } {
                self.spare_block = block;
                return None;
            }
            self.spare_block = 0;
            if !source.commit_zeroes() {
                // SAFETY: the block was just committed and is ours; zero it so objects are initialised.
                unsafe { core::ptr::write_bytes(block as *mut u8, 0, FIXALLOC_BLOCK_BYTES) };
            }
            // The old tail (smaller than one object) is abandoned; it is counted in `sys_bytes`.
            self.bump = block;
            self.bump_end = block + FIXALLOC_BLOCK_BYTES;
            self.sys_bytes += FIXALLOC_BLOCK_BYTES;
        }
        let p = self.bump;
        debug_assert!(p % self.align == 0);
        self.bump += self.size;
        self.inuse_bytes += self.size;
        NonNull::new(p as *mut u8)
    }

    /// Returns an object.
    ///
    /// # Safety
    /// `p` came from `alloc` on this allocator, is not on the free list, and nothing uses it any more.
    pub unsafe fn free(&mut self, p: NonNull<u8>) {
        let o = p.as_ptr().cast::<FreeObj>();
        // SAFETY: the object is ours, at least a pointer in size and suitably aligned (see `new`).
        unsafe { (*o).next = self.free_list };
        self.free_list = o;
        self.inuse_bytes -= self.size;
    }

    /// Objects on the free list (for validation; O(free objects)).
    pub fn free_count(&self) -> usize {
        let mut n = 0;
        let mut p = self.free_list;
        while !p.is_null() {
            n += 1;
            // SAFETY: free-list links are valid (invariant).
            p = unsafe { (*p).next };
        }
        n
    }

    /// Checks the accounting invariant; panics with a description on violation.
    pub fn validate(&self) {
        let free = self.free_count() * self.size;
        let tail = self.bump_end - self.bump;
        // Each block may abandon a tail smaller than one object.
        let blocks = self.sys_bytes / FIXALLOC_BLOCK_BYTES;
        let slack = blocks * (FIXALLOC_BLOCK_BYTES % self.size);
        assert!(
            self.inuse_bytes + free + tail <= self.sys_bytes
                && self.inuse_bytes + free + tail + slack >= self.sys_bytes,
            "fixalloc: inuse {} + free {} + tail {} does not account for sys {}",
            self.inuse_bytes,
            free,
            tail,
            self.sys_bytes
        );
    }
}
