//! Allocation classes: Go's size classes plus goheap's tiny class, and the shape of each class's spans.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! The object level works in *allocation classes*: `1..NUM_SIZE_CLASSES` are the size classes of
//! [`super::sizeclass`] (Go's table, row for row), and [`TINY_CLASS`] = `NUM_SIZE_CLASSES` is the
//! class of the 16-byte tiny blocks (Go's `tinySpanClass`). Class 0 means "no class" (large objects).
//! This module is the one home of the tiny class's layout, used by the central lists (a fresh tiny span's
//! metadata) and the CPU caches (the tiny path).
//!
//! # Tiny span layout (one page)
//! `[ block 0 | ... | block n-1 | done 0 | ... | done n-1 | starts 0 | ... | starts n-1 | slack ]` with
//! `n = TINY_BLOCKS_PER_SPAN = PAGE_SIZE / (TINY_SIZE + 4)` = 409, the same in every build. Each 16-byte
//! block has two 16-bit masks over its byte offsets (bit `i`: offset `i`):
//!
//! - its **starts** `A` (an `AtomicU16` at `base + TINY_STARTS_OFFSET + 2 * block`): the offsets at which the
//!   block's owning CPU handed out an object. Written only by that CPU, with a plain `Relaxed` store of a
//!   mask it keeps in a private field (so the allocation path never loads it, and performs no
//!   read-modify-write). The first object is always at offset 0, and offset 15 is never a start (a 1-byte
//!   object that would go there starts a new block), so `A` has bit 0 and not bit 15;
//! - its **done** mask `D` (an `AtomicU16` at `base + TINY_META_OFFSET + 2 * block`): the starts freed so
//!   far (one `fetch_or` per free, any CPU), and from the block's retirement on also every offset that is not
//!   a start (`!A`, or-ed in by the owner when it leaves the block; it includes bit 15). So `D = 0xffff`
//!   exactly when the block is retired and all its objects are freed.
//!
//! A free of offset `i` is refused as an interior pointer if `i` is not in `A`, and as a double free if `i`
//! is already in `D`. See `cpucache.rs` ("The tiny protocol") for the protocol and why it is exact.
//!
//! # Invariants
//! - `class_shape(c).nelems * class_shape(c).elemsize <= class_shape(c).npages * PAGE_SIZE` for every class;
//! - for the tiny class, the metadata of the `TINY_BLOCKS_PER_SPAN` blocks ends within the page (checked
//!   below); bytes of a tiny span at or above `TINY_META_OFFSET` are no object's.

use super::sizeclass::{self, NUM_SIZE_CLASSES};
use crate::check::Reason;
use crate::page::span::Span;
use crate::sync::atomic::{AtomicU16, Ordering};
use crate::PAGE_SIZE;
use core::ptr;

/// Size of a tiny block: Go's `maxTinySize`.
pub const TINY_SIZE: usize = 16;
/// Requests smaller than this, 8 bytes and under (and aligned to at most 8), take the tiny path; Go's
/// bound is [`TINY_SIZE`] (see `cpucache.rs`, "Adapted from Go: the bound", for why goheap's is lower).
pub const TINY_REQUEST_LIMIT: usize = 9;
const _: () = assert!(
    crate::object::sizeclass::CLASSES[2].size as usize == STOCK_KEY_MIN_SIZE,
    "the fast paths serve requests of TINY_REQUEST_LIMIT bytes and up: they must all have room for the stock key"
);
/// Allocation class of tiny blocks: one past the size classes.
pub const TINY_CLASS: usize = NUM_SIZE_CLASSES;
/// Allocation classes: the size classes (class 0 unused) plus the tiny class.
pub const NUM_ALLOC_CLASSES: usize = NUM_SIZE_CLASSES + 1;
/// The highest offset a tiny object may start at: offset 15 is never a start, so a retired block's done
/// mask always gains bit 15 (see the module docs).
pub(crate) const TINY_MAX_START: usize = TINY_SIZE - 2;
/// A tiny block's done mask once it is retired and all its objects are freed.
pub(crate) const TINY_DONE: u16 = u16::MAX;
/// Metadata bytes per tiny block: its done mask and its starts mask.
const TINY_META_BYTES: usize = 2 + 2;
/// Tiny blocks per span: a one-page span holds `n` 16-byte blocks and their `n` done and starts masks,
/// `n = PAGE_SIZE / (TINY_SIZE + 4)` = 409.
pub const TINY_BLOCKS_PER_SPAN: usize = PAGE_SIZE / (TINY_SIZE + TINY_META_BYTES);
/// Offset of the blocks' done masks in a tiny span: `TINY_BLOCKS_PER_SPAN * TINY_SIZE`. Bytes of the span
/// at or above it are no object's.
pub(crate) const TINY_META_OFFSET: usize = TINY_BLOCKS_PER_SPAN * TINY_SIZE;
/// Offset of the blocks' starts masks, after the done masks.
const TINY_STARTS_OFFSET: usize = TINY_META_OFFSET + 2 * TINY_BLOCKS_PER_SPAN;
/// End of the metadata a fresh tiny span must have zeroed.
const TINY_META_END: usize = TINY_STARTS_OFFSET + 2 * TINY_BLOCKS_PER_SPAN;

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

/// Zeroes the tiny-block metadata (done and starts masks) of a fresh tiny span: a free into a block that was
/// never handed out finds no start there and is refused.
///
/// # Safety
/// `s` is a fresh span of the tiny class that nobody else uses yet.
pub(crate) unsafe fn init_tiny_counts(s: *mut Span) {
    // SAFETY: the span's page is committed and ours; the metadata lies inside it.
    unsafe {
        if (*s).needzero {
            ptr::write_bytes(((*s).base + TINY_META_OFFSET) as *mut u8, 0, TINY_META_END - TINY_META_OFFSET);
        }
        #[cfg(loom)]
        crate::sync::loom_forget_raw((*s).base + TINY_META_OFFSET, TINY_META_END - TINY_META_OFFSET);
    }
}

/// The page (the span) and the block index of `addr`, in a tiny span.
#[inline(always)]
fn tiny_page_block(addr: usize) -> (usize, usize) {
    let page = addr & !(PAGE_SIZE - 1);
    (page, (addr - page) / TINY_SIZE)
}

/// The bit of `addr`'s byte offset in its tiny block's masks.
#[inline(always)]
pub(crate) fn tiny_bit(addr: usize) -> u16 {
    1 << (addr % TINY_SIZE)
}

/// The starts mask of the tiny block holding `addr` (see the module docs).
///
/// # Safety
/// `addr` lies in the blocks of a live tiny span (see [`in_tiny_blocks`]).
#[inline]
pub(crate) unsafe fn tiny_starts(addr: usize) -> &'static AtomicU16 {
    let (page, block) = tiny_page_block(addr);
    // SAFETY: the mask lies in the same live span, 2-byte aligned, and is only accessed atomically.
    unsafe { crate::sync::raw_atomic::<AtomicU16>(page + TINY_STARTS_OFFSET + 2 * block) }
}

/// The done mask (freed starts, and after retirement the non-starts) of the tiny block holding `addr` (see
/// the module docs).
///
/// # Safety
/// `addr` lies in the blocks of a live tiny span (see [`in_tiny_blocks`]).
#[inline]
pub(crate) unsafe fn tiny_done(addr: usize) -> &'static AtomicU16 {
    let (page, block) = tiny_page_block(addr);
    // SAFETY: the mask lies in the same live span, 2-byte aligned, and is only accessed atomically.
    unsafe { crate::sync::raw_atomic::<AtomicU16>(page + TINY_META_OFFSET + 2 * block) }
}

/// Whether `addr`, in a tiny span, lies in its blocks (not in their masks or the slack after them).
#[inline]
pub(crate) fn in_tiny_blocks(addr: usize) -> bool {
    addr & (PAGE_SIZE - 1) < TINY_META_OFFSET
}

/// Checks a tiny free (or `realloc`) of `addr` against its block's masks, changing nothing: no object of the
/// block starts at `addr` ([`Reason::Interior`]: inside an object, or never handed out), or the object
/// there was freed already ([`Reason::DoubleFree`]). Loads only; the free's own `fetch_or` on the done mask
/// (`CpuCache::free_tiny`) is what makes a double free exact when two frees race.
///
/// # Safety
/// `addr` lies in the blocks of a live tiny span (see [`in_tiny_blocks`]).
#[inline]
pub(crate) unsafe fn tiny_check(addr: usize) -> Result<(), Reason> {
    let bit = tiny_bit(addr);
    // SAFETY: the caller's contract.
    let (starts, done) = unsafe { (tiny_starts(addr), tiny_done(addr)) };
    if starts.load(Ordering::Relaxed) & bit == 0 {
        return Err(Reason::Interior);
    }
    if done.load(Ordering::Relaxed) & bit != 0 {
        return Err(Reason::DoubleFree);
    }
    Ok(())
}

/// A tiny free's masks (the tiny protocol's *free*, see `cpucache.rs`): refuses `addr` if no object of its
/// block starts there ([`Reason::Interior`], nothing changed), or-s its bit into the block's done mask and
/// refuses it if the bit was set already ([`Reason::DoubleFree`]: the `fetch_or` changed nothing). Returns
/// the block if this free completed a retired block (its last live object: the caller frees the block),
/// else 0. Any CPU, in or out of a section: it touches only the block's atomics.
///
/// # Safety
/// `addr` lies in the blocks of a live tiny span (see [`in_tiny_blocks`]).
#[inline(always)]
pub(crate) unsafe fn tiny_release(addr: usize) -> Result<usize, Reason> {
    let bit = tiny_bit(addr);
    // SAFETY: the caller's contract.
    let (starts, done) = unsafe { (tiny_starts(addr), tiny_done(addr)) };
    if starts.load(Ordering::Relaxed) & bit == 0 {
        return Err(Reason::Interior);
    }
    let old = done.fetch_or(bit, Ordering::AcqRel);
    if old & bit != 0 {
        return Err(Reason::DoubleFree);
    }
    Ok(if old | bit == TINY_DONE { addr & !(TINY_SIZE - 1) } else { 0 })
}

/// The key a CPU stock writes into the second word of every object it holds (glibc tcache's `key`): a free
/// whose object already holds it may be a double free into this CPU's stock, and only then is the stock
/// scanned. Objects leave a stock with the key cleared (allocation, flush), so user data holds it only if
/// the user wrote it (which costs a scan, never a false report). Used for objects of at least
/// [`STOCK_KEY_MIN_SIZE`] bytes (every size class but the 8-byte one).
///
/// Its value is the sign extension of a 32-bit immediate (`0xc0de_5eb1`), so on x86-64 the fast paths
/// compare and store it with an immediate operand instead of loading it into a register first.
pub(crate) const STOCK_KEY: usize = 0xffff_ffff_c0de_5eb1_u64 as usize;
const _: () = assert!(STOCK_KEY as u64 == (0xc0de_5eb1_u32 as i32 as i64) as u64);
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
