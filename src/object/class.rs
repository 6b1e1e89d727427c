//! Allocation classes: Go's size classes plus goheap's tiny class, and the shape of each class's spans.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! The object level works in *allocation classes*: `1..NUM_SIZE_CLASSES` are the size classes of
//! [`super::sizeclass`] (Go's table, row for row), and [`TINY_CLASS`] = `NUM_SIZE_CLASSES` is the
//! class of the 16-byte tiny blocks (Go's `tinySpanClass`). Class 0 means "no class" (large objects).
//! This module is the one home of the tiny class's layout, used by the central lists (a fresh tiny span's
//! counts) and the CPU caches (the tiny path).
//!
//! # Tiny span layout (one page)
//! `[ block 0 | block 1 | ... | block n-1 | count 0 | ... | count n-1 | slack ]` with
//! `n = TINY_BLOCKS_PER_SPAN = PAGE_SIZE / (TINY_SIZE + 1)`: each 16-byte block has a one-byte count at
//! `base + TINY_COUNTS_OFFSET + block`. See `cpucache.rs` for the count protocol.
//!
//! # Invariants
//! - `class_shape(c).nelems * class_shape(c).elemsize <= class_shape(c).npages * PAGE_SIZE` for every class;
//! - for the tiny class, `TINY_COUNTS_OFFSET + TINY_BLOCKS_PER_SPAN <= PAGE_SIZE` (checked below).

use super::sizeclass::{self, NUM_SIZE_CLASSES};
use crate::page::span::Span;
use crate::PAGE_SIZE;
use core::ptr;
use core::sync::atomic::AtomicI8;

/// Requests smaller than this (and aligned to at most 8) take the tiny path: Go's `maxTinySize`.
pub const TINY_SIZE: usize = 16;
/// Allocation class of tiny blocks: one past the size classes.
pub const TINY_CLASS: usize = NUM_SIZE_CLASSES;
/// Allocation classes: the size classes (class 0 unused) plus the tiny class.
pub const NUM_ALLOC_CLASSES: usize = NUM_SIZE_CLASSES + 1;
/// Tiny blocks per span: a one-page span holds `n` 16-byte blocks and their `n` one-byte counts,
/// `n = PAGE_SIZE / (TINY_SIZE + 1)` = 481.
pub const TINY_BLOCKS_PER_SPAN: usize = PAGE_SIZE / (TINY_SIZE + 1);
/// Offset of the count array in a tiny span: `TINY_BLOCKS_PER_SPAN * TINY_SIZE`.
const TINY_COUNTS_OFFSET: usize = TINY_BLOCKS_PER_SPAN * TINY_SIZE;

const _: () = assert!(TINY_COUNTS_OFFSET + TINY_BLOCKS_PER_SPAN <= PAGE_SIZE);

/// The shape of the spans of one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassShape {
    /// Object size in bytes.
    pub elemsize: u32,
    /// Span length in pages.
    pub npages: u8,
    /// Objects per span.
    pub nelems: u16,
    /// Division magic (see [`crate::page::span::obj_index`]).
    pub divmagic: u32,
}

/// The shape of allocation class `c` (a size class, or the tiny class).
pub const fn class_shape(c: usize) -> ClassShape {
    if c == TINY_CLASS {
        ClassShape {
            elemsize: TINY_SIZE as u32,
            npages: 1,
            nelems: TINY_BLOCKS_PER_SPAN as u16,
            divmagic: (u32::MAX / TINY_SIZE as u32).wrapping_add(1),
        }
    } else {
        let sc = sizeclass::CLASSES_CONST[c];
        ClassShape { elemsize: sc.size, npages: sc.npages, nelems: sc.nelems, divmagic: sc.divmagic }
    }
}

/// Zeroes the block counts of a fresh tiny span.
///
/// # Safety
/// `s` is a fresh span of the tiny class that nobody else uses yet.
pub(crate) unsafe fn init_tiny_counts(s: *mut Span) {
    // SAFETY: the span's page is committed and ours; the counts lie inside it.
    unsafe {
        if (*s).needzero {
            ptr::write_bytes(((*s).base + TINY_COUNTS_OFFSET) as *mut u8, 0, TINY_BLOCKS_PER_SPAN);
        }
    }
}

/// The count of the tiny block holding `addr`.
///
/// # Safety
/// `addr` lies in a block of a live tiny span (tiny spans are one page, so the page is the span).
#[inline]
pub(crate) unsafe fn tiny_count(addr: usize) -> &'static AtomicI8 {
    let page = addr & !(PAGE_SIZE - 1);
    let block = (addr - page) / TINY_SIZE;
    // SAFETY: the count byte lies in the same live span, and is only accessed atomically.
    unsafe { &*((page + TINY_COUNTS_OFFSET + block) as *const AtomicI8) }
}
