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

use crate::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use core::ptr::{addr_of, addr_of_mut};

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

// The cache-line layout the struct's docs describe (not under loom, whose atomics are larger).
#[cfg(not(loom))]
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

/// The object-level state of one span, borrowed by its owner: the typed view through which every
/// transition of that state is written as safe code. The shape (`nelems`) is copied in (immutable while the
/// span is in use); `free_bits` are shared atomics.
///
/// Invariants (mimalloc-style equations; checked by [`SpanObjs::check`] under `validate`):
/// - `freeindex <= nelems`, and every `alloc_bits` bit at or above `nelems` is 1;
/// - materialised (`freeindex == 0`): `nalloc == popcount(alloc_bits) - tail`, `tail = 64 * words - nelems`;
/// - cached (`freeindex > 0` possible): objects below `freeindex` are allocated whatever `alloc_bits` says,
///   and `alloc_cache == !alloc_bits[freeindex / 64] >> (freeindex % 64)` unless `freeindex % 64 == 0`;
/// - `fresh_from <= nelems`.
pub(crate) struct SpanObjs<'a> {
    nelems: usize,
    alloc_cache: &'a mut u64,
    freeindex: &'a mut u16,
    nalloc: &'a mut u16,
    fresh_from: &'a mut u16,
    alloc_bits: &'a mut [u64; SPAN_BITMAP_WORDS],
    free_bits: &'a [AtomicU64; SPAN_BITMAP_WORDS],
}

impl Span {
    /// The object-level state of `s`, borrowed for `'a`. This is the one place that states the ownership
    /// rule of the object-level fields; every function below goes through it.
    ///
    /// # Safety
    /// `s` is a live span descriptor whose shape fields are set, and for all of `'a` the caller owns its
    /// object-level fields and no other `SpanObjs` of `s` is live: the caller caches the span on its CPU
    /// (holding that CPU's provider guard), or holds the class's `Central` lock while no CPU caches the span,
    /// or the span is fresh and not yet published to any cache or list.
    #[inline(always)]
    pub(crate) unsafe fn objs<'a>(s: *mut Span) -> SpanObjs<'a> {
        // SAFETY: by the caller's contract the object-level fields are ours alone for `'a`; each reference
        // covers one field (other owners' fields of the same descriptor are not aliased), and `free_bits`
        // are atomics, shared.
        unsafe {
            SpanObjs {
                nelems: (*s).nelems as usize,
                alloc_cache: &mut *addr_of_mut!((*s).alloc_cache),
                freeindex: &mut *addr_of_mut!((*s).freeindex),
                nalloc: &mut *addr_of_mut!((*s).nalloc),
                fresh_from: &mut *addr_of_mut!((*s).fresh_from),
                alloc_bits: &mut *addr_of_mut!((*s).alloc_bits),
                free_bits: &*addr_of!((*s).free_bits),
            }
        }
    }

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
            (*s).cached_by = NOT_CACHED;
            (*s).list = SpanList::None as u8;
            #[cfg(feature = "checks")]
            for (l, p) in (*s).live_bits.iter().zip(&(*s).poisoned) {
                l.store(0, Ordering::Relaxed);
                p.store(0, Ordering::Relaxed);
            }
        }
        // SAFETY: as above; the shape is set.
        unsafe { Span::objs(s) }.init();
        // SAFETY: as above.
        unsafe { Span::check(s) };
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
    /// As for [`Span::objs`]: the caller owns the object-level fields of `s`.
    #[inline(always)]
    pub(crate) unsafe fn next_free_fast(s: *mut Span) -> Option<usize> {
        // SAFETY: forwarded contract.
        unsafe { Span::objs(s) }.next_free_fast()
    }

    /// Go's `nextFreeIndex` plus the allocation; see [`SpanObjs::next_free`].
    ///
    /// # Safety
    /// As for [`Span::objs`].
    pub(crate) unsafe fn next_free(s: *mut Span) -> Option<usize> {
        // SAFETY: forwarded contract.
        let found = unsafe { Span::objs(s) }.next_free();
        // SAFETY: forwarded contract.
        unsafe { Span::check(s) };
        found
    }

    /// Folds the deferred frees; see [`SpanObjs::sweep`].
    ///
    /// # Safety
    /// As for [`Span::objs`].
    pub(crate) unsafe fn sweep(s: *mut Span) -> Swept {
        // SAFETY: forwarded contract.
        let (nfreed, bad) = unsafe { Span::objs(s) }.sweep();
        // SAFETY: forwarded contract.
        unsafe { Span::check(s) };
        // SAFETY: the shape fields are immutable while the span is in use.
        let bad = bad.map(|idx| unsafe { (*s).base + idx * (*s).elemsize as usize });
        Swept { nfreed, bad }
    }

    /// Whether frees wait in `free_bits` (a racy hint: a flusher may be adding one right now).
    ///
    /// # Safety
    /// `s` is a live descriptor.
    pub(crate) unsafe fn has_deferred_frees(s: *mut Span) -> bool {
        // SAFETY: only the immutable shape and atomic fields are read.
        let (n, free_bits) = unsafe { (words_for((*s).nelems as usize), &*addr_of!((*s).free_bits)) };
        free_bits[..n].iter().any(|w| w.load(Ordering::Relaxed) != 0)
    }

    /// Frees a batch of objects of an uncached span at once; see [`SpanObjs::free_uncached_mask`].
    ///
    /// # Safety
    /// As for [`Span::objs`] (the caller holds the class's Central lock and the span is uncached);
    /// `w < words_for(nelems)`, `mask != 0`, no bit at or above `nelems`.
    pub(crate) unsafe fn free_uncached_mask(s: *mut Span, w: usize, mask: u64) -> Result<(), u64> {
        // SAFETY: forwarded contract.
        let r = unsafe { Span::objs(s) }.free_uncached_mask(w, mask);
        // SAFETY: forwarded contract.
        unsafe { Span::check(s) };
        r
    }

    /// Records frees of the objects `mask` of bitmap word `w` of a span some CPU caches (a batch of frees,
    /// for that CPU to fold back). Returns the bits of `mask` that were already recorded (double frees).
    ///
    /// # Safety
    /// The caller holds the class's Central lock (so the span cannot change hands meanwhile);
    /// `w < words_for(nelems)`.
    pub(crate) unsafe fn defer_free_mask(s: *mut Span, w: usize, mask: u64) -> u64 {
        // SAFETY: `free_bits` are atomics; the descriptor is live while its span is in use.
        let free_bits = unsafe { &*addr_of!((*s).free_bits) };
        free_bits[w].fetch_or(mask, Ordering::Release) & mask
    }

    /// The index of the object containing `addr`, and whether `addr` is that object's first byte.
    ///
    /// # Safety
    /// `s` is a live small span and `base <= addr < base + npages * PAGE_SIZE`.
    #[inline]
    pub(crate) unsafe fn object_index(s: *mut Span, addr: usize) -> (usize, bool) {
        // SAFETY: page-level and shape fields are immutable while the span is in use.
        let (base, divmagic, elemsize) = unsafe { ((*s).base, (*s).divmagic, (*s).elemsize as usize) };
        let off = addr - base;
        let idx = obj_index(divmagic, off);
        (idx, idx * elemsize == off)
    }

    /// With `validate` (mimalloc's expensive check level): checks the object-level invariants of `s` (see
    /// [`SpanObjs`]); compiled out otherwise. Called after every transition of a span's object state but the
    /// inlined fast path: shaping, a slow-path allocation, a sweep (fold, uncache), a batch free into an
    /// uncached span, and when a central list hands the span to a CPU.
    ///
    /// # Safety
    /// As for [`Span::objs`].
    #[inline(always)]
    pub(crate) unsafe fn check(s: *mut Span) {
        #[cfg(feature = "validate")]
        // SAFETY: forwarded contract.
        unsafe { Span::objs(s) }.check(s);
        #[cfg(not(feature = "validate"))]
        let _ = s;
    }
}

impl SpanObjs<'_> {
    /// A fresh span: no object allocated, `alloc_bits` set only past `nelems`, no deferred frees.
    fn init(self) {
        *self.freeindex = 0;
        *self.nalloc = 0;
        *self.fresh_from = 0;
        for (w, (a, f)) in self.alloc_bits.iter_mut().zip(self.free_bits).enumerate() {
            *a = tail_mask(self.nelems, w);
            f.store(0, Ordering::Relaxed);
        }
        *self.alloc_cache = !self.alloc_bits[0];
    }

    /// Go's `nextFreeFast` (see [`Span::next_free_fast`]).
    #[inline(always)]
    fn next_free_fast(self) -> Option<usize> {
        let cache = *self.alloc_cache;
        let bit = cache.trailing_zeros() as u16; // 64 when no free object is cached
        if bit < 64 {
            let idx = *self.freeindex + bit;
            if (idx as usize) < self.nelems {
                // Taking the word's last object leaves the cache 0 with `freeindex % 64 == 0`, the state
                // `next_free` leaves at a word boundary (the invariant exempts it): the next call finds no
                // bit and the slow path loads the next word. (Go's `nextFreeFast` instead refuses that last
                // object; the test costs a compare and, inlined, a register.)
                *self.alloc_cache = (cache >> bit) >> 1;
                *self.freeindex = idx + 1;
                *self.nalloc += 1;
                return Some(idx as usize);
            }
        }
        None
    }

    /// Go's `nextFreeIndex` plus the allocation: the lowest free object at or above `freeindex`, scanning
    /// `alloc_bits` and reloading `alloc_cache`; `None` when the span is full (then `freeindex == nelems`).
    fn next_free(self) -> Option<usize> {
        let nelems = self.nelems;
        let mut idx = *self.freeindex as usize;
        while idx < nelems {
            let w = idx / 64;
            let used = self.alloc_bits[w] | low_mask(idx % 64);
            if used != !0 {
                let found = w * 64 + (!used).trailing_zeros() as usize;
                if found >= nelems {
                    break;
                }
                let next = found + 1;
                *self.freeindex = next as u16;
                *self.alloc_cache = if next % 64 == 0 { 0 } else { !self.alloc_bits[w] >> (next % 64) };
                *self.nalloc += 1;
                return Some(found);
            }
            idx = (w + 1) * 64;
        }
        *self.freeindex = nelems as u16;
        *self.alloc_cache = 0;
        None
    }

    /// Makes `alloc_bits` exact (sets the bits below `freeindex`, which the fast path left stale), remembers
    /// the high-water mark for `alloc_zeroed`, and rewinds `freeindex` to 0.
    fn materialise(&mut self) {
        let fi = *self.freeindex as usize;
        for w in &mut self.alloc_bits[..fi / 64] {
            *w = !0;
        }
        if fi % 64 != 0 {
            self.alloc_bits[fi / 64] |= low_mask(fi % 64);
        }
        if *self.freeindex > *self.fresh_from {
            *self.fresh_from = *self.freeindex;
        }
        *self.freeindex = 0;
        *self.alloc_cache = !self.alloc_bits[0];
    }

    /// Sweeps the span: folds the deferred frees in `free_bits` into the exact bitmap. Returns how many
    /// objects were freed and the index of one deferred free of an object that was not allocated, if any.
    /// Leaves the span materialised (`freeindex == 0`).
    ///
    /// Only frees of allocated objects are folded and counted, so `nalloc` stays exact whatever arrived in
    /// `free_bits`; a free of an object that is not allocated (a double free whose first free was folded
    /// already) is dropped and returned for the caller to report, in every build.
    fn sweep(mut self) -> (usize, Option<usize>) {
        self.materialise();
        let (mut nfreed, mut bad) = (0, None);
        for (w, (a, fb)) in self.alloc_bits.iter_mut().zip(self.free_bits).take(words_for(self.nelems)).enumerate() {
            if fb.load(Ordering::Relaxed) != 0 {
                let f = fb.swap(0, Ordering::Acquire);
                let not_allocated = f & !*a;
                if not_allocated != 0 && bad.is_none() {
                    bad = Some(w * 64 + not_allocated.trailing_zeros() as usize);
                }
                let real = f & *a;
                *a &= !real;
                nfreed += real.count_ones() as usize;
            }
        }
        *self.nalloc -= nfreed as u16;
        *self.alloc_cache = !self.alloc_bits[0];
        (nfreed, bad)
    }

    /// Frees the objects `mask` of bitmap word `w` of an uncached span at once (a batch of frees under the
    /// class's Central lock). On error, frees nothing and returns the bits of `mask` that are not allocated.
    fn free_uncached_mask(self, w: usize, mask: u64) -> Result<(), u64> {
        debug_assert_eq!(*self.freeindex, 0);
        let word = self.alloc_bits[w];
        if word & mask != mask {
            return Err(mask & !word);
        }
        self.alloc_bits[w] = word & !mask;
        *self.nalloc -= mask.count_ones() as u16;
        if w == 0 {
            *self.alloc_cache = !self.alloc_bits[0];
        }
        Ok(())
    }

    /// Asserts the invariants in [`SpanObjs`]'s docs (`s` names the span in the message).
    #[cfg(feature = "validate")]
    fn check(&self, s: *mut Span) {
        let (n, fi) = (self.nelems, *self.freeindex as usize);
        let words = words_for(n);
        assert!(fi <= n, "span {s:p}: freeindex {fi} > nelems {n}");
        assert!(*self.fresh_from as usize <= n, "span {s:p}: fresh_from past nelems");
        for (w, a) in self.alloc_bits.iter().enumerate() {
            let tail = tail_mask(n, w);
            assert_eq!(a & tail, tail, "span {s:p}: alloc_bits word {w} clears a bit past nelems");
        }
        if fi == 0 {
            let used: u32 = self.alloc_bits[..words].iter().map(|w| w.count_ones()).sum();
            let tail = (words * 64 - n) as u32;
            assert_eq!(used - tail, *self.nalloc as u32, "span {s:p}: nalloc disagrees with the bitmap");
        } else {
            // Objects below `freeindex` count as allocated: the stale bits below it are not counted twice.
            let mut used = fi as u32;
            for (w, a) in self.alloc_bits[..words].iter().enumerate() {
                let lo = w * 64;
                let below = if fi >= lo + 64 {
                    !0
                } else if fi <= lo {
                    0
                } else {
                    low_mask(fi - lo)
                };
                used += (a & !below & !tail_mask(n, w)).count_ones();
            }
            assert_eq!(used, *self.nalloc as u32, "span {s:p}: nalloc disagrees with freeindex and the bitmap");
            if fi % 64 != 0 {
                assert_eq!(*self.alloc_cache, !self.alloc_bits[fi / 64] >> (fi % 64), "span {s:p}: stale alloc_cache");
            }
        }
    }
}

/// Index of the object that contains byte `offset` of its span (`offset` from the span base, at most the
/// span size), given the class's `divmagic` (Go's `mspan.divideByElemSize`): `offset / size` without a division.
#[inline]
pub fn obj_index(divmagic: u32, offset: usize) -> usize {
    ((offset as u64 * divmagic as u64) >> 32) as usize
}

/// Words of an object bitmap in use for `nelems` objects: `ceil(nelems / 64)`.
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
