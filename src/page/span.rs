//! Spans (Go's `mspan.go`): a run of pages serving one size class or one large object.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Access discipline
//!
//! Spans are handled through raw `NonNull<Span>` pointers: descriptors come from the heap's fixed-size
//! allocator and are recycled, and different fields are guarded by different owners. Code never forms a
//! `&mut Span`; it reads and writes fields through raw places and takes shared references only to the atomic
//! fields. Who may touch what:
//!
//! | fields | written by | while |
//! |---|---|---|
//! | page level (`base`, `npages`, `class`, `needzero`) | the heap | the span is not `InUse` (before publication through the page map, or after it left the page map) |
//! | `state` | the heap | atomically; read lock-free by pointer lookups |
//! | object level (`freeindex`, `alloc_cache`, `alloc_bits`, `nalloc`, ...) | the span's owner | owner = the CPU cache that caches it, else the holder of its class's `Central` lock |
//! | `free_bits` | anyone holding the class's `Central` lock | atomically (fetch_or); folded by the owner |

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Largest object count of any span: an 8 KiB page of 8 B objects.
pub const MAX_OBJS_PER_SPAN: usize = crate::PAGE_SIZE / 8;
/// Words in a per-span object bitmap: `MAX_OBJS_PER_SPAN / 64`.
pub const SPAN_BITMAP_WORDS: usize = MAX_OBJS_PER_SPAN / 64;

/// Life-cycle state of a span descriptor.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanState {
    /// Descriptor is free (in the fixed-size allocator) or describes no memory.
    Dead = 0,
    /// Pages belong to a live small-object span or a live large object.
    InUse = 1,
}

/// A span descriptor (Go's `mspan`).
///
/// Layout (`repr(C)`, 64-byte aligned, checked below): the first cache line holds what every CPU reads
/// (shape, owner, list links); the second starts with what the caching CPU writes on every allocation
/// (`alloc_cache`, `freeindex`, `nalloc`) followed by its bitmap; `free_bits`, which other CPUs' flushes
/// write, start on a line of their own. So a CPU allocating from its cached span and another CPU freeing
/// into it (a producer and its consumer) do not pull each other's lines away on every object.
#[repr(C, align(64))]
#[derive(Debug)]
pub struct Span {
    // ---- Page level: owned by the heap (see the module docs) -------------------------------------------
    /// Address of the first byte. Page aligned.
    pub(crate) base: usize,
    /// Length in pages. `npages >= 1`.
    pub(crate) npages: usize,
    /// Intrusive list links (heap free-descriptor lists, central span lists). Guarded by whoever owns the
    /// list the span is on.
    pub(crate) next: *mut Span,
    pub(crate) prev: *mut Span,

    // ---- Object level, shape: set when the span is shaped, immutable while it is in use ----------------
    /// Object size in bytes for a small span; 0 for a large span (its size is `npages * PAGE_SIZE`).
    pub(crate) elemsize: u32,
    /// `objindex(offset) = (offset * divmagic) >> 32` (Go's `divMagic`), exact for every offset in the span.
    pub(crate) divmagic: u32,
    /// Objects in the span: `nelems = npages * PAGE_SIZE / elemsize` (1 for a large span).
    pub(crate) nelems: u16,
    /// CPU cache index that caches this span, or [`NOT_CACHED`]. Written under the class's Central lock.
    pub(crate) cached_by: u16,
    /// [`SpanState`] as `u8`; read without locks. Page level.
    pub(crate) state: AtomicU8,
    /// Size class; 0 for a large-object span. Page level.
    pub(crate) class: u8,
    /// The memory may hold non-zero bytes (used before, or the source does not return zeroed pages).
    /// Page level.
    pub(crate) needzero: bool,
    /// Which Central list holds the span ([`SpanList`] as u8). Central lock.
    pub(crate) list: u8,
    _pad_shared: [u8; 16],

    // ---- Object level, state: owned by the caching CPU, else by the class's Central lock ---------------
    /// Go's `allocCache`: the complement of the `alloc_bits` word holding `freeindex`, shifted so bit 0 is
    /// object `freeindex`: `alloc_cache = !alloc_bits[freeindex / 64] >> (freeindex % 64)`.
    pub(crate) alloc_cache: u64,
    /// Go's `freeindex`: every object below it is allocated (whatever `alloc_bits` says, while the span is
    /// cached); the next free object is at or above it. `0 <= freeindex <= nelems`.
    pub(crate) freeindex: u16,
    /// Objects allocated: `nalloc = popcount(materialised alloc_bits below nelems)`; 0 means empty.
    pub(crate) nalloc: u16,
    /// Objects at index `>= fresh_from` were never handed out since the span's memory was zero (meaningful
    /// only when `!needzero`), so `alloc_zeroed` can skip clearing them.
    pub(crate) fresh_from: u16,
    /// 1 = allocated. Bits `>= nelems` are always 1. While the span is cached, bits below `freeindex` are
    /// stale (those objects are allocated); `materialise` makes the bitmap exact.
    pub(crate) alloc_bits: [u64; SPAN_BITMAP_WORDS],
    _pad_owner: [u8; 48],

    // ---- Written by other CPUs ------------------------------------------------------------------------
    /// Frees of objects in a span currently cached by a CPU, waiting to be folded back (swept) by that
    /// CPU. Set with `fetch_or` under the class's Central lock; taken with `swap` by the owner.
    pub(crate) free_bits: [AtomicU64; SPAN_BITMAP_WORDS],
    /// With `checks`: 1 = handed to the user and not yet freed (objects in CPU stocks are 0 here, unlike in
    /// `alloc_bits`). Set on allocation, cleared on free, both atomically, so a double free is caught at once.
    #[cfg(feature = "checks")]
    pub(crate) live_bits: [AtomicU64; SPAN_BITMAP_WORDS],
    /// With `checks`: 1 = freed by the user and filled with the poison pattern since (see `check.rs`); the
    /// allocation that hands the object out again verifies the pattern and clears the bit.
    #[cfg(feature = "checks")]
    pub(crate) poisoned: [AtomicU64; SPAN_BITMAP_WORDS],
}

// The cache-line layout the struct's docs describe.
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(Span, list) < 64);
    assert!(offset_of!(Span, alloc_cache) == 64);
    assert!(offset_of!(Span, free_bits) % 64 == 0);
    assert!(offset_of!(Span, free_bits) >= offset_of!(Span, alloc_bits) + 8 * SPAN_BITMAP_WORDS);
    assert!(offset_of!(Span, free_bits) < offset_of!(Span, alloc_bits) + 8 * SPAN_BITMAP_WORDS + 64);
};

/// What `Span::sweep` folded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct Swept {
    /// Objects freed (deferred frees of allocated objects).
    pub nfreed: usize,
    /// The address of an object whose deferred free found it not allocated (a double free), if any; such
    /// frees are dropped, not counted.
    pub bad: Option<usize>,
}

/// `cached_by` value of a span that no CPU cache holds.
pub const NOT_CACHED: u16 = u16::MAX;

/// The Central list a span is on.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanList {
    /// On no list: cached by a CPU, a large object, or in transit.
    None = 0,
    /// Some objects free, some allocated: `0 < nalloc < nelems`.
    Partial = 1,
    /// No free objects: `nalloc == nelems`.
    Full = 2,
    /// No allocated objects: `nalloc == 0` (a candidate to return to the page heap).
    Empty = 3,
}

// All functions below take `s: *mut Span` and follow the access discipline in the module docs: the caller
// owns the object-level fields (it caches the span on its CPU, or holds the class's Central lock).
impl Span {
    /// Sets up the object-level fields of a fresh small span for objects of `elemsize` bytes.
    ///
    /// # Safety
    /// `s` is a live descriptor whose page-level fields are set, and nothing else accesses it yet.
    pub(crate) unsafe fn init_objects(s: *mut Span, elemsize: u32, nelems: u16, divmagic: u32) {
        debug_assert!(nelems as usize <= MAX_OBJS_PER_SPAN && nelems > 0);
        // SAFETY: the caller owns `s` exclusively (fresh span, not yet published to any cache or list).
        unsafe {
            (*s).elemsize = elemsize;
            (*s).divmagic = divmagic;
            (*s).nelems = nelems;
            (*s).freeindex = 0;
            (*s).nalloc = 0;
            (*s).fresh_from = 0;
            (*s).cached_by = NOT_CACHED;
            (*s).list = SpanList::None as u8;
            for w in 0..SPAN_BITMAP_WORDS {
                (*s).alloc_bits[w] = tail_mask(nelems as usize, w);
                (*s).free_bits[w] = AtomicU64::new(0);
                #[cfg(feature = "checks")]
                {
                    (*s).live_bits[w] = AtomicU64::new(0);
                    (*s).poisoned[w] = AtomicU64::new(0);
                }
            }
            (*s).alloc_cache = !(*s).alloc_bits[0];
        }
    }

    /// Sets up the object-level fields of a large-object span (one object filling the span).
    ///
    /// # Safety
    /// As for [`Span::init_objects`].
    pub(crate) unsafe fn init_large(s: *mut Span) {
        // SAFETY: the caller owns `s` exclusively.
        unsafe {
            (*s).elemsize = 0;
            (*s).divmagic = 0;
            (*s).nelems = 1;
            (*s).freeindex = 1;
            (*s).nalloc = 1;
            (*s).cached_by = NOT_CACHED;
            (*s).list = SpanList::None as u8;
        }
    }

    /// Go's `nextFreeFast`: the next free object from `alloc_cache`, or `None` when the cached word is used
    /// up (then [`Span::next_free`] refills it). Counts the object in `nalloc`.
    ///
    /// # Safety
    /// The caller owns the object-level fields of `s` (see the module docs).
    #[inline(always)]
    pub(crate) unsafe fn next_free_fast(s: *mut Span) -> Option<usize> {
        // SAFETY: the caller owns the object-level fields.
        unsafe {
            let cache = (*s).alloc_cache;
            let bit = cache.trailing_zeros() as u16; // 64 when no free object is cached
            if bit < 64 {
                let idx = (*s).freeindex + bit;
                if idx < (*s).nelems {
                    let next = idx + 1;
                    // At a word boundary the next word must be loaded: leave that to the slow path.
                    if next % 64 != 0 {
                        (*s).alloc_cache = (cache >> bit) >> 1;
                        (*s).freeindex = next;
                        (*s).nalloc += 1;
                        return Some(idx as usize);
                    }
                }
            }
            None
        }
    }

    /// Go's `nextFreeIndex` plus the allocation: the lowest free object at or above `freeindex`, scanning
    /// `alloc_bits` and reloading `alloc_cache`; `None` when the span is full (then `freeindex == nelems`).
    ///
    /// # Safety
    /// The caller owns the object-level fields of `s`.
    pub(crate) unsafe fn next_free(s: *mut Span) -> Option<usize> {
        // SAFETY: the caller owns the object-level fields.
        unsafe {
            let nelems = (*s).nelems as usize;
            let mut idx = (*s).freeindex as usize;
            while idx < nelems {
                let w = idx / 64;
                let used = (*s).alloc_bits[w] | low_mask(idx % 64);
                if used != !0 {
                    let found = w * 64 + (!used).trailing_zeros() as usize;
                    if found >= nelems {
                        break;
                    }
                    let next = found + 1;
                    (*s).freeindex = next as u16;
                    (*s).alloc_cache = if next % 64 == 0 { 0 } else { !(*s).alloc_bits[w] >> (next % 64) };
                    (*s).nalloc += 1;
                    return Some(found);
                }
                idx = (w + 1) * 64;
            }
            (*s).freeindex = nelems as u16;
            (*s).alloc_cache = 0;
            None
        }
    }

    /// Makes `alloc_bits` exact (sets the bits below `freeindex`, which the fast path left stale), remembers
    /// the high-water mark for `alloc_zeroed`, and rewinds `freeindex` to 0.
    ///
    /// # Safety
    /// The caller owns the object-level fields of `s`.
    pub(crate) unsafe fn materialise(s: *mut Span) {
        // SAFETY: the caller owns the object-level fields.
        unsafe {
            let fi = (*s).freeindex as usize;
            for w in 0..fi / 64 {
                (*s).alloc_bits[w] = !0;
            }
            if fi % 64 != 0 {
                (*s).alloc_bits[fi / 64] |= low_mask(fi % 64);
            }
            if (*s).freeindex > (*s).fresh_from {
                (*s).fresh_from = (*s).freeindex;
            }
            (*s).freeindex = 0;
            (*s).alloc_cache = !(*s).alloc_bits[0];
        }
    }

    /// Sweeps the span: folds the deferred frees in `free_bits` into the exact bitmap. Leaves the span
    /// materialised (`freeindex == 0`).
    ///
    /// Only frees of allocated objects are folded and counted, so `nalloc` stays exact whatever arrived in
    /// `free_bits`. A deferred free of an object that is not allocated (a double free whose first free was
    /// folded already) is returned in [`Swept::bad`] for the caller to report, in every build.
    ///
    /// # Safety
    /// The caller owns the object-level fields of `s`.
    pub(crate) unsafe fn sweep(s: *mut Span) -> Swept {
        // SAFETY: the caller owns the object-level fields; `free_bits` are atomics shared with flushers.
        unsafe {
            Span::materialise(s);
            let mut out = Swept { nfreed: 0, bad: None };
            for w in 0..words_for((*s).nelems as usize) {
                let fb = &(*s).free_bits[w];
                if fb.load(Ordering::Relaxed) != 0 {
                    let f = fb.swap(0, Ordering::Acquire);
                    let bad = f & !(*s).alloc_bits[w];
                    if bad != 0 && out.bad.is_none() {
                        let idx = w * 64 + bad.trailing_zeros() as usize;
                        out.bad = Some((*s).base + idx * (*s).elemsize as usize);
                    }
                    let real = f & (*s).alloc_bits[w];
                    (*s).alloc_bits[w] &= !real;
                    out.nfreed += real.count_ones() as usize;
                }
            }
            (*s).nalloc -= out.nfreed as u16;
            (*s).alloc_cache = !(*s).alloc_bits[0];
            out
        }
    }

    /// Whether frees wait in `free_bits` (a racy hint: a flusher may be adding one right now).
    ///
    /// # Safety
    /// `s` is a live descriptor.
    pub(crate) unsafe fn has_deferred_frees(s: *mut Span) -> bool {
        // SAFETY: only atomic fields are read.
        unsafe {
            let n = words_for((*s).nelems as usize);
            (&(*s).free_bits)[..n].iter().any(|w| w.load(Ordering::Relaxed) != 0)
        }
    }

    /// Frees the objects `mask` of bitmap word `w` of an uncached span at once (a batch of frees under the
    /// class's Central lock). On error, frees nothing and returns the bits of `mask` that are not allocated.
    ///
    /// # Safety
    /// The caller holds the class's Central lock and the span is uncached; `w < words_for(nelems)`,
    /// `mask != 0`, no bit at or above `nelems`.
    pub(crate) unsafe fn free_uncached_mask(s: *mut Span, w: usize, mask: u64) -> Result<(), u64> {
        // SAFETY: the Central lock gives the caller the object-level fields of an uncached span.
        unsafe {
            debug_assert_eq!((*s).freeindex, 0);
            let word = (*s).alloc_bits[w];
            if word & mask != mask {
                return Err(mask & !word);
            }
            (*s).alloc_bits[w] = word & !mask;
            (*s).nalloc -= mask.count_ones() as u16;
            if w == 0 {
                (*s).alloc_cache = !(*s).alloc_bits[0];
            }
            Ok(())
        }
    }

    /// Records frees of the objects `mask` of bitmap word `w` of a span some CPU caches (a batch of frees,
    /// for that CPU to fold back). Returns the bits of `mask` that were already recorded (double frees).
    ///
    /// # Safety
    /// The caller holds the class's Central lock (so the span cannot change hands meanwhile);
    /// `w < words_for(nelems)`.
    pub(crate) unsafe fn defer_free_mask(s: *mut Span, w: usize, mask: u64) -> u64 {
        // SAFETY: `free_bits` are atomics; the descriptor is live while its span is in use.
        let prev = unsafe { (*s).free_bits[w].fetch_or(mask, Ordering::Release) };
        prev & mask
    }

    /// The index of the object containing `addr`, and whether `addr` is that object's first byte.
    ///
    /// # Safety
    /// `s` is a live small span and `base <= addr < base + npages * PAGE_SIZE`.
    #[inline]
    pub(crate) unsafe fn object_index(s: *mut Span, addr: usize) -> (usize, bool) {
        // SAFETY: page-level and shape fields are immutable while the span is in use.
        unsafe {
            let off = addr - (*s).base;
            let idx = obj_index((*s).divmagic, off);
            (idx, idx * (*s).elemsize as usize == off)
        }
    }
}

/// Words of an object bitmap in use for `nelems` objects: `ceil(nelems / 64)`.
/// Index of the object that contains byte `offset` of its span (`offset` from the span base, at most the
/// span size), given the class's `divmagic` (Go's `mspan.divideByElemSize`): `offset / size` without a division.
#[inline]
pub fn obj_index(divmagic: u32, offset: usize) -> usize {
    ((offset as u64 * divmagic as u64) >> 32) as usize
}

#[inline]
pub(crate) const fn words_for(nelems: usize) -> usize {
    nelems.div_ceil(64)
}

/// Bits `0..n` set (`n < 64`).
#[inline]
const fn low_mask(n: usize) -> u64 {
    (1u64 << n) - 1
}

/// The initial `alloc_bits` word `w` for `nelems` objects: bits at and above `nelems` set.
const fn tail_mask(nelems: usize, w: usize) -> u64 {
    let lo = w * 64;
    if nelems >= lo + 64 {
        0
    } else if nelems <= lo {
        !0
    } else {
        !low_mask(nelems - lo)
    }
}
