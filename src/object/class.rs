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
//! `n = TINY_BLOCKS_PER_SPAN = PAGE_SIZE / (TINY_SIZE + 1)` = 481: each 16-byte block has a one-byte count at
//! `base + TINY_COUNTS_OFFSET + block`. See `cpucache.rs` for the count protocol.
//!
//! With the `checks` feature each block also has a 32-bit *live mask*, after the counts, 4-byte aligned: bit
//! `i < 16` says a live tiny object starts at byte `i` of the block, bit `16 + i` that byte `i` is inside
//! one (not its first byte). So a tiny free of an object that is not live is reported before it touches
//! the count, as an interior pointer when a live object covers the byte, else as a double free:
//! `[ blocks | counts | pad | mask 0 | ... | mask n-1 | slack ]`, `n = PAGE_SIZE / (TINY_SIZE + 5)` = 390.
//!
//! # Invariants
//! - `class_shape(c).nelems * class_shape(c).elemsize <= class_shape(c).npages * PAGE_SIZE` for every class;
//! - for the tiny class, `TINY_COUNTS_OFFSET + TINY_BLOCKS_PER_SPAN <= PAGE_SIZE` (checked below).

use super::sizeclass::{self, NUM_SIZE_CLASSES};
use crate::page::span::Span;
use crate::sync::atomic::AtomicI8;
#[cfg(feature = "checks")]
use crate::sync::atomic::AtomicU32;
use crate::PAGE_SIZE;
use core::ptr;

/// Requests smaller than this (and aligned to at most 8) take the tiny path: Go's `maxTinySize`.
pub const TINY_SIZE: usize = 16;
/// Allocation class of tiny blocks: one past the size classes.
pub const TINY_CLASS: usize = NUM_SIZE_CLASSES;
/// Allocation classes: the size classes (class 0 unused) plus the tiny class.
pub const NUM_ALLOC_CLASSES: usize = NUM_SIZE_CLASSES + 1;
/// Metadata bytes per tiny block: its count, and with `checks` its 32-bit live mask.
const TINY_META_BYTES: usize = if cfg!(feature = "checks") { 5 } else { 1 };
/// Tiny blocks per span: a one-page span holds `n` 16-byte blocks and their `n` one-byte counts,
/// `n = PAGE_SIZE / (TINY_SIZE + 1)` = 481 (with `checks`, also their live masks: 390).
pub const TINY_BLOCKS_PER_SPAN: usize = PAGE_SIZE / (TINY_SIZE + TINY_META_BYTES);
/// Offset of the count array in a tiny span: `TINY_BLOCKS_PER_SPAN * TINY_SIZE`. Bytes of the span at or
/// above it are no object's.
pub(crate) const TINY_COUNTS_OFFSET: usize = TINY_BLOCKS_PER_SPAN * TINY_SIZE;
/// End of the metadata a fresh tiny span must have zeroed.
const TINY_META_END: usize = if cfg!(feature = "checks") {
    TINY_LIVE_OFFSET + 4 * TINY_BLOCKS_PER_SPAN
} else {
    TINY_COUNTS_OFFSET + TINY_BLOCKS_PER_SPAN
};
/// Offset of the live masks (feature `checks`), 4-byte aligned after the counts.
const TINY_LIVE_OFFSET: usize = (TINY_COUNTS_OFFSET + TINY_BLOCKS_PER_SPAN + 3) & !3;

const _: () = assert!(TINY_META_END <= PAGE_SIZE);

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

/// Zeroes the block counts (and with `checks` the live masks) of a fresh tiny span.
///
/// # Safety
/// `s` is a fresh span of the tiny class that nobody else uses yet.
pub(crate) unsafe fn init_tiny_counts(s: *mut Span) {
    // SAFETY: the span's page is committed and ours; the counts lie inside it.
    unsafe {
        if (*s).needzero {
            ptr::write_bytes(((*s).base + TINY_COUNTS_OFFSET) as *mut u8, 0, TINY_META_END - TINY_COUNTS_OFFSET);
        }
        #[cfg(loom)]
        crate::sync::loom_forget_raw((*s).base + TINY_COUNTS_OFFSET, TINY_META_END - TINY_COUNTS_OFFSET);
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
    unsafe { crate::sync::raw_atomic::<AtomicI8>(page + TINY_COUNTS_OFFSET + block) }
}

/// Whether `addr`, in a tiny span, lies in its blocks (not in the counts or the slack after them).
#[inline]
pub(crate) fn in_tiny_blocks(addr: usize) -> bool {
    addr & (PAGE_SIZE - 1) < TINY_COUNTS_OFFSET
}

/// With `checks`: the live mask of the tiny block holding `addr` (see the module docs).
///
/// # Safety
/// `addr` lies in a block of a live tiny span (see [`in_tiny_blocks`]).
#[cfg(feature = "checks")]
#[inline]
pub(crate) unsafe fn tiny_live(addr: usize) -> &'static AtomicU32 {
    let page = addr & !(PAGE_SIZE - 1);
    let block = (addr - page) / TINY_SIZE;
    // SAFETY: the mask lies in the same live span, 4-byte aligned, and is only accessed atomically.
    unsafe { crate::sync::raw_atomic::<AtomicU32>(page + TINY_LIVE_OFFSET + 4 * block) }
}

/// With `checks`: the live-mask bits of a tiny object of `size` bytes at `addr`: `(start, inside)`, its
/// start bit and the bits of its other bytes (clamped to the block).
#[cfg(feature = "checks")]
#[inline]
pub(crate) fn tiny_live_bits(addr: usize, size: usize) -> (u32, u32) {
    let off = addr % TINY_SIZE;
    let end = (off + size.max(1)).min(TINY_SIZE);
    let bytes = |lo: usize, hi: usize| if hi > lo { ((1u32 << (hi - lo)) - 1) << lo } else { 0 };
    (1 << off, bytes(off + 1, end) << 16)
}

/// The key a CPU stock writes into the second word of every object it holds (glibc tcache's `key`): a free
/// whose object already holds it may be a double free into this CPU's stock, and only then is the stock
/// scanned. Objects leave a stock with the key cleared (allocation, flush), so user data holds it only if
/// the user wrote it (which costs a scan, never a false report). Used for objects of at least
/// [`STOCK_KEY_MIN_SIZE`] bytes (every size class but the 8-byte one).
pub(crate) const STOCK_KEY: usize = 0x9d1e_f7ee_c0de_5eb1_u64 as usize;
/// Smallest object that has room for the stock key after its link.
pub(crate) const STOCK_KEY_MIN_SIZE: usize = 2 * core::mem::size_of::<usize>();

/// The stock key's word in object `p` (its second word).
///
/// # Safety
/// `p` is an object of at least [`STOCK_KEY_MIN_SIZE`] bytes (only the address is computed here).
#[inline(always)]
pub(crate) unsafe fn stock_key_slot(p: *mut u8) -> *mut usize {
    // SAFETY: the object spans at least two words (the caller's contract).
    unsafe { (p as *mut usize).add(1) }
}
