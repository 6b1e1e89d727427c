//! Per-CPU caches (Go's `mcache.go`): the fast path of every small allocation and free.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! A [`CpuCache`] belongs to one CPU cache index; whoever holds the [`crate::cpu::CpuProvider`] guard for
//! that index (or the lock of the shared cache) owns it entirely, so nothing here takes a lock or performs an
//! atomic read-modify-write on the fast path. For each allocation class it holds:
//!
//! - a **span** (Go's `mcache.alloc[spc]`), allocated from with Go's `nextFreeFast`: count the trailing
//!   zeros of the span's `alloc_cache` and advance `freeindex`;
//! - a **stock** of freed objects (tcmalloc's per-CPU free lists), a LIFO list threaded through the objects.
//!
//! # Adapted from Go
//!
//! Go never frees explicitly: the GC's sweep rebuilds a span's bitmap. goheap's `dealloc` pushes the object
//! on the freeing CPU's stock, whichever CPU's span it came from; the next allocation of that class on that
//! CPU pops it (warm in the data cache). A stock is bounded: past its bound `max` objects, half of it is
//! flushed to the class's [`Central`], which folds each object into its span (at once if no CPU caches the
//! span, else as a deferred free for the caching CPU, see `central.rs`). So a free on another CPU than the
//! allocating one never touches that CPU's cache nor takes its lock.
//!
//! The bound adapts, as tcmalloc's per-CPU caches do: it starts at `stock_max(class)` (32 KiB of objects),
//! and a class whose stock overflows doubles its bound instead of flushing, up to `stock_cap(class)`
//! (1 MiB of objects, at most 4096), while the cache's growth stays within [`STOCK_GROW_BYTES`], but only
//! if the class also ran out of objects and refilled from a span since it last grew: a CPU that frees
//! objects it then allocates again benefits, one that only frees (the consumer of a producer/consumer
//! pair) would merely hold the objects back longer. A program that frees batches of a thousand objects and
//! allocates them again then soon never reaches the central list.
//! The background step (`CpuCache::sweep_cached_classes`) halves grown bounds back towards the base and flushes
//! what no longer fits, and `flush_all` resets them, so an idle CPU does not keep a burst's worth of memory.
//!
//! **Held spans.** Go's `mcache` hands a used-up span back to its `mcentral` at once: the GC will find its
//! frees. With explicit frees from other CPUs, that puts every cross-CPU free through the class lock's list
//! work (fold the objects into the uncached span, move it between the central lists) and has the allocating
//! CPU take back, under the same lock, the very span the freeing CPU is folding into, its objects' cache
//! lines still being written on the other core. So a CPU *holds* the spans it used up: a span that runs out
//! (and has no deferred frees) joins the back of its class's held queue, still cached by this CPU
//! (`cached_by`), so frees from other CPUs reach it as deferred frees (`free_bits`, one `fetch_or` per
//! bitmap word under the class lock, as for the current span). At each such refill the CPU looks at the
//! queue's oldest span: if frees reached it, it sweeps it (no lock, the current span's sweep) and
//! allocates from it again; else, if the cache holds more than [`HELD_BYTES`], the oldest goes back to the
//! central list in the same hold of the class lock that takes a new span (`Central::swap_span`). A
//! producer/consumer pair thus recycles its spans in the order it used them, each coming back after the
//! consumer has freed it and moved on (snmalloc returns remote frees to the allocator that owns the slab
//! for the same reason). Held spans are given back by `flush_all` (thread exit, reclaim, `release_all`) and,
//! for a class that has not refilled since the previous background step, [`HELD_SLICE_SPANS`] per step.
//! Only the oldest span is looked at, so a held span other CPUs freed into waits for its turn; what a cache
//! holds back that way is bounded by [`HELD_BYTES`], of the order of what its stocks may grow by
//! ([`STOCK_GROW_BYTES`]). Reclaim before an allocation fails flushes the caches, held spans included.
//!
//! The **tiny path** (Go's `mcache.tiny`): requests of at most 8 bytes (under
//! [`TINY_REQUEST_LIMIT`](super::class::TINY_REQUEST_LIMIT)) with alignment at most 8 are packed into
//! 16-byte blocks. Go can recycle a block when the GC finds all its objects dead; with explicit frees,
//! goheap tracks each block in two 16-bit masks over its byte offsets, kept after the blocks at the end of
//! each tiny span (layout in `class.rs`): its *starts* `A` and its *done* mask `D`.
//!
//! *Adapted from Go: the bound.* Go packs every noscan request under 16 bytes ([`TINY_SIZE`]). goheap's
//! explicit free of a tiny object is dearer than a small object's: it looks the span up and checks the
//! block's masks, then performs a `fetch_or` (when the tiny path ran on the general path: 361 instructions
//! per alloc+free pair of 8 bytes in callgrind, `goheap-bench callgrind-pair8`, against 77 for a 64-byte
//! pair; with the tiny fast paths below, 194, and 165 once a block whose objects were all freed is
//! renewed). Packing buys nothing for a request of 9 to 15 bytes aligned to 8 (it fills a block alone, as
//! the 16-byte class would hold it), so requests of 9 bytes and up take the size classes and their fast
//! paths. Requests of 8 bytes and less stay tiny: several share a block, and the block's masks catch every
//! double free at the free in every build, which the 8-byte class could not do without `checks` (its
//! objects have no room for the stock key). What goheap gives up is packing a 9- to 15-byte object of
//! alignment under 8 with a smaller one in the rest of its block.
//!
//! *The tiny fast paths* (`Malloc::alloc_tiny_or`, `Malloc::dealloc_tiny`, out of line so the size
//! classes' inlined fast path stays as it was): `CpuCache::alloc_tiny_leaf` bumps the current block,
//! renews it if all its objects were freed, or takes a new block off the tiny class's stock or cached span
//! and retires the current one, in a leaf section; a free checks the pointer (arena, page map: a live tiny
//! span, in its blocks, aligned), updates the block's masks with `tiny_release` outside any section (it
//! touches only the block's atomics) and counts it in a leaf section, which also puts a block the free
//! completed on the stock (`CpuCache::free_tiny_leaf`). A block that does not fit the stock is freed in a
//! section of its own.
//! Whatever needs a span, a lock or a report goes to the general path, which does all of it in one section.
//!
//! # The tiny protocol
//!
//! - **Take** a block (`take_tiny_block`, the owning CPU): the block came off the tiny class's stock or a
//!   span, so its previous life is over; store `A = 1`, `D = 0` (plain `Relaxed` stores: the block is not
//!   handed out yet). Its first object is at offset 0.
//! - **Allocate** at offset `i` (the owner; `i <= 14`: an object that would start at 15 takes a new block):
//!   `tiny_starts |= 1 << i` in a private field, then a plain `Relaxed` store of it to `A`. No load of
//!   shared state, no read-modify-write, no lock.
//! - **Free** offset `i` (any CPU, `tiny_release`): load `A` (`Relaxed`); bit `i` clear ⇒ no object
//!   starts there (an interior pointer, or one never handed out): report, change nothing. Else
//!   `old = D.fetch_or(1 << i, AcqRel)`: bit `i` already in `old` ⇒ double free: report (the `fetch_or`
//!   changed nothing). Else if `old | 1 << i == 0xffff` the block is retired and this was its last live
//!   object: this free frees the block (into its own CPU's stock).
//! - **Renew** (the owner, when the next object does not fit its current block; `renew_tiny`): load `D`
//!   (`Acquire`); if `D == A` every object handed out from the block was freed, and no free can change `D`
//!   any more but a double free's (which finds its bit set and changes nothing): store `D = 0`, `A = 1` and
//!   hand out offset 0 again. The block is never retired nor handed on: Go's block would go back through the
//!   GC; here the same CPU starts it over, with no read-modify-write and no trip through the class's stock.
//! - **Retire** (the owner, when it moves to another block or flushes; `retire_tiny_masks`):
//!   `old = D.fetch_or(!A, AcqRel)` with its final `A`; if `old == A` every object was freed before the
//!   retirement (`D` becomes `0xffff`): the owner frees the block.
//!
//! Why it is exact. A legitimate free of offset `i` happens after the allocation that handed the object out
//! (the user's hand-over of the pointer), so its load of `A` sees bit `i` (later stores of the block's life
//! only add bits). Frees add only bits of `A` to `D`, and `A` never has bit 15, so before the retirement
//! `D ⊆ A ≠ 0xffff`; the retirement adds every other bit (bit 15 included), after which frees complete `D`
//! one start at a time. All changes to `D` are read-modify-writes, so they form one modification order, and
//! exactly one operation of it makes `D` reach `0xffff`: the retirement (every free came before it) or the
//! free of the last live object. `AcqRel` on both makes every earlier free's (and the retirement's) uses of
//! the block happen before that operation, which hands the block on. A second free of the same start finds
//! its bit in `D`, and an interior pointer finds no bit in `A` (offsets inside an object never become a start:
//! the owner's offset only grows), so neither changes `D`: a tiny double free or interior free is reported
//! at the free, in every build, and never makes a block with a live object look free. A renewal needs no
//! read-modify-write because it runs before the retirement: without bit 15 in `D` no free can complete the
//! block, and once `D == A` no legitimate free is left to come (its `Acquire` load makes all of them happen
//! before the reuse). What cannot be told apart is a stale free after the block was taken again or renewed
//! (its masks were reset): a double free after the block was handed out again, which no allocator can
//! detect (see `check.rs`).
//!
//! Costs: allocation is an `or` and a store more than Go's bump; a free is a load, one `fetch_or` (as the
//! old per-block count's `fetch_sub` was) and a compare; four metadata bytes per block instead of a count
//! byte (409 blocks per page instead of 481: 20% of a tiny span's page against 6% before), and a 1-byte
//! object that would start at offset 15 takes a new block. (With a separate retired bit next to the freed
//! starts, the word would need 17 bits: six bytes per block, 372 blocks per page, a third more memory for
//! tiny objects than the count byte.) In callgrind (`goheap-bench callgrind-pair8`) a tiny alloc+free pair
//! cost 393 instructions against 357 with the count (x86 has no fetch-or that returns the old value: the
//! `fetch_or`s are compare-exchange loops), when the fast paths were slower; the 64-byte pair was unchanged
//! (117). With `checks` the same
//! masks serve its reports (the reason comes from `A` and `D`; the span and class from the page map), so
//! there is no second per-block mechanism and the tiny allocation path performs no read-modify-write in that
//! build either.
//!
//! # Invariants (owner = the holder of this cache's guard)
//! - `stock` list length `== nstock <= max`, `stock_max(class) <= max <= stock_cap(class)`, and
//!   `grown_bytes == Σ (max - stock_max(class)) * size(class) <= STOCK_GROW_BYTES`; every object on a
//!   stock is allocated in its span's
//!   bitmap (`alloc_bits`/`freeindex`) and free for the user;
//! - every object on a stock of a class of at least 16 bytes holds `STOCK_KEY` in its second word (glibc
//!   tcache's key: a free that finds it scans the stock for a double free); objects leave the stock with
//!   it cleared (the allocation paths and `Central::flush` clear it);
//! - `span` is null or a span of `class` with `cached_by == index`; its object fields are the owner's;
//! - `held[class]` is a circular list of `nheld` spans of `class` with `cached_by == index`, other than
//!   `span`, linked through `Span::next`; `held_bytes == Σ npages * PAGE_SIZE` over every class's held
//!   spans, at most [`HELD_BYTES`] between calls;
//! - `tiny != 0` ⇒ `tiny` is a block of a tiny span this CPU took and has not retired, `tiny_offset <= 16`,
//!   `tiny_starts` has bit 0, not bit 15, and equals the block's starts mask; `tiny_starts_at` points at
//!   that mask.

use super::central::{Central, Flushed};
use super::class::{
    class_shape, stock_key_slot, tiny_done, tiny_release, tiny_starts, NUM_ALLOC_CLASSES, STOCK_KEY,
    STOCK_KEY_MIN_SIZE, TINY_CLASS, TINY_MAX_START, TINY_SIZE,
};
use crate::cpu::Guarded;
use crate::page::heap::pagecache::PageCache;
use crate::page::heap::Heap;
use crate::page::span::Span;
use crate::source::PageSource;
use crate::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use crate::PAGE_SIZE;
use core::ptr::{self, NonNull};

/// Bytes a class's stock may hold before half of it is flushed (with a floor and a cap in objects).
const STOCK_BYTES: usize = 32 << 10;
const STOCK_MIN_OBJS: usize = 4;
const STOCK_MAX_OBJS: usize = 256;
/// Bytes a class's stock may grow to when it keeps overflowing (with a cap in objects).
const STOCK_CAP_BYTES: usize = 1 << 20;
const STOCK_CAP_OBJS: usize = 4096;
/// Bytes by which one cache's stocks may grow beyond their base bounds, all classes together.
pub const STOCK_GROW_BYTES: usize = 2 << 20;
/// Objects one flush returns to a central list in one guarded section (interrupt latency, see
/// `page/heap/slice.rs`): a full stock's half, a shrinking bound's excess and a sliced flush's class step
/// each return at most this many per section. A flush costs up to about 160 instructions per object when
/// its objects lie in different spans (`Central::flush`), so 64 stays well under the bound, where the 128
/// of a full 64-byte stock's half measured 20 851 in the demo kernel (`-icount`).
pub const FLUSH_SLICE_OBJS: usize = 64;
/// Bytes of used-up spans one cache holds, all classes together (see "Held spans" in the module docs): a
/// span that runs out goes to the back of its class's queue, and the queue's oldest span goes back to the
/// central list once the cache holds more. 1 MiB is 128 spans of the 64-byte class: enough for a consumer
/// a ring of 4 096 objects behind (the host's prodcons-64) to have freed a span before its owner comes
/// back to it.
pub const HELD_BYTES: usize = 1 << 20;
/// Held spans a flush step or the background step gives back to the central lists per guarded section
/// (interrupt latency, see `page/heap/slice.rs`): each is a class-lock hold and a sweep of its bitmap.
pub const HELD_SLICE_SPANS: usize = 8;

/// Stock bound of class `c`: `clamp(STOCK_BYTES / size, STOCK_MIN_OBJS, STOCK_MAX_OBJS)`.
pub const fn stock_max(c: usize) -> u32 {
    let size = class_shape(c).elemsize as usize;
    if size == 0 {
        return 0;
    }
    let n = STOCK_BYTES / size;
    let n = if n < STOCK_MIN_OBJS { STOCK_MIN_OBJS } else { n };
    (if n > STOCK_MAX_OBJS { STOCK_MAX_OBJS } else { n }) as u32
}

/// Grown stock bound of class `c`: `clamp(STOCK_CAP_BYTES / size, stock_max(c), STOCK_CAP_OBJS)`.
pub const fn stock_cap(c: usize) -> u32 {
    let size = class_shape(c).elemsize as usize;
    if size == 0 {
        return 0;
    }
    let n = STOCK_CAP_BYTES / size;
    let n = if n > STOCK_CAP_OBJS { STOCK_CAP_OBJS } else { n };
    let base = stock_max(c);
    if (n as u32) < base {
        base
    } else {
        n as u32
    }
}

const STOCK_MAX: [u32; NUM_ALLOC_CLASSES] = {
    let mut t = [0; NUM_ALLOC_CLASSES];
    let mut c = 1;
    while c < NUM_ALLOC_CLASSES {
        t[c] = stock_max(c);
        c += 1;
    }
    t
};

/// One class's part of a CPU cache.
struct ClassCache {
    /// The span allocated from, or null. Owner only.
    span: *mut Span,
    /// Freed objects, linked through their first word. Owner only.
    stock: *mut u8,
    nstock: u32,
    /// The stock's current bound (adaptive, see the module docs). Owner only.
    max: u32,
    /// The class needed a span refill since its stock last grew: this CPU allocates the class faster than
    /// its stock supplies it, so a larger stock would be reused. Owner only.
    refilled: bool,
    /// Spans on the class's held queue (`CpuCache::held`). Owner only.
    nheld: u16,
    /// The background step found the class holding spans and has not seen a refill of it since. Owner
    /// only.
    held_idle: bool,
}

/// A class's held spans: a FIFO kept as a circular list through `Span::next` (free while a span is cached:
/// only the central lists use the links), known by its newest span, whose `next` is the oldest. Every span
/// on it has `cached_by ==` this cache's index and had no free object left in its bitmap when it joined;
/// other CPUs' frees reach it as deferred frees (`free_bits`). The length and the idle flag live in the
/// class's `ClassCache` (in what would be its padding), so the queue costs 8 bytes per class.
#[derive(Clone, Copy)]
struct HeldSpans {
    /// The newest held span, or null.
    tail: *mut Span,
}

impl HeldSpans {
    const EMPTY: HeldSpans = HeldSpans { tail: ptr::null_mut() };

    /// The oldest held span, or null.
    fn oldest(&self) -> *mut Span {
        if self.tail.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: the tail is a span on the queue, whose link is the queue's.
        unsafe { (*self.tail).next }
    }

    /// Appends `s`.
    ///
    /// # Safety
    /// `s` is a span this cache caches, on no queue; the caller owns the cache.
    unsafe fn push(&mut self, s: *mut Span) {
        // SAFETY: per the contract, the links of `s` and of the tail (a span on the queue) are ours.
        unsafe {
            if self.tail.is_null() {
                (*s).next = s;
            } else {
                (*s).next = (*self.tail).next;
                (*self.tail).next = s;
            }
        }
        self.tail = s;
    }

    /// Takes the oldest span off the queue.
    fn pop(&mut self) -> Option<*mut Span> {
        let s = self.oldest();
        if s.is_null() {
            return None;
        }
        // SAFETY: `s` and the tail are on the queue: spans this cache caches, whose links are the queue's.
        unsafe {
            if s == self.tail {
                self.tail = ptr::null_mut();
            } else {
                (*self.tail).next = (*s).next;
            }
            (*s).next = ptr::null_mut();
        }
        Some(s)
    }
}

/// What [`CpuCache::cycle_held`] decided.
enum Cycled {
    /// Allocate object `.1` from held span `.0`, which becomes the class's span.
    Reuse(*mut Span, usize),
    /// Give this span back to the central list and take another.
    GiveBack(*mut Span),
    /// Take another span; nothing to give back.
    Keep,
}

const fn class_caches() -> [ClassCache; NUM_ALLOC_CLASSES] {
    let mut arr = [const {
        ClassCache {
            span: ptr::null_mut(),
            stock: ptr::null_mut(),
            nstock: 0,
            max: 0,
            refilled: false,
            nheld: 0,
            held_idle: false,
        }
    }; NUM_ALLOC_CLASSES];
    let mut c = 0;
    while c < NUM_ALLOC_CLASSES {
        arr[c].max = STOCK_MAX[c];
        c += 1;
    }
    arr
}

/// A counter written by one owner at a time with plain stores and read by anyone.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// A zero counter.
    pub const fn new() -> Self {
        Counter(AtomicU64::new(0))
    }
    /// Adds one (owner only: a load and a store, not an atomic read-modify-write).
    #[inline(always)]
    pub fn bump(&self) {
        self.add(1)
    }
    /// Adds `n` (owner only).
    #[inline(always)]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed)
    }
    /// Sets the value (owner only).
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Ordering::Relaxed)
    }
    /// Reads the value (anyone).
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-CPU counters, written by the owner with plain (non-RMW) relaxed stores and merged by readers.
#[derive(Debug)]
pub struct CpuStats {
    /// Objects handed out, per allocation class (tiny class: blocks).
    pub nmalloc: [Counter; NUM_ALLOC_CLASSES],
    /// Objects freed, per allocation class (tiny class: blocks).
    pub nfree: [Counter; NUM_ALLOC_CLASSES],
    /// Tiny objects handed out / freed.
    pub tiny_nmalloc: Counter,
    /// Tiny objects freed.
    pub tiny_nfree: Counter,
    /// Large objects and their bytes.
    pub large_nmalloc: Counter,
    /// Large objects freed.
    pub large_nfree: Counter,
    /// Bytes of large objects handed out.
    pub large_bytes_alloc: Counter,
    /// Bytes of large objects freed.
    pub large_bytes_free: Counter,
    /// Objects flushed by this CPU into spans cached by another CPU (cross-CPU frees).
    pub remote_frees: Counter,
    /// Spans taken from / returned to the central lists.
    pub refills: Counter,
    /// Held spans taken back to allocate from (see "Held spans" in the module docs), no central list involved.
    pub held_reuses: Counter,
    /// Set once the cache has been used.
    pub used: Counter,
}

impl CpuStats {
    /// `nmalloc[c]` without a bounds check on the fast path (`c < NUM_ALLOC_CLASSES`, checked in debug).
    #[inline(always)]
    pub(crate) fn nmalloc(&self, c: usize) -> &Counter {
        debug_assert!(c < NUM_ALLOC_CLASSES);
        // SAFETY: every caller passes an allocation class, `c < NUM_ALLOC_CLASSES`.
        unsafe { self.nmalloc.get_unchecked(c) }
    }

    /// `nfree[c]`, as [`CpuStats::nmalloc`].
    #[inline(always)]
    pub(crate) fn nfree(&self, c: usize) -> &Counter {
        debug_assert!(c < NUM_ALLOC_CLASSES);
        // SAFETY: every caller passes an allocation class, `c < NUM_ALLOC_CLASSES`.
        unsafe { self.nfree.get_unchecked(c) }
    }

    const fn new() -> Self {
        CpuStats {
            nmalloc: [const { Counter::new() }; NUM_ALLOC_CLASSES],
            nfree: [const { Counter::new() }; NUM_ALLOC_CLASSES],
            tiny_nmalloc: Counter::new(),
            tiny_nfree: Counter::new(),
            large_nmalloc: Counter::new(),
            large_nfree: Counter::new(),
            large_bytes_alloc: Counter::new(),
            large_bytes_free: Counter::new(),
            remote_frees: Counter::new(),
            refills: Counter::new(),
            held_reuses: Counter::new(),
            used: Counter::new(),
        }
    }
}

/// A per-CPU cache (Go's `mcache`).
pub struct CpuCache {
    classes: [ClassCache; NUM_ALLOC_CLASSES],
    /// Per class, the used-up spans this cache still caches, oldest first (apart from `classes`, so the
    /// fast path's per-class entries stay small). Owner only.
    held: [HeldSpans; NUM_ALLOC_CLASSES],
    /// `Σ npages * PAGE_SIZE` over the held spans of all classes; at most [`HELD_BYTES`] between calls.
    held_bytes: usize,
    /// `Σ (max - stock_max(class)) * size(class)` over the classes: how far the stocks have grown.
    grown_bytes: usize,
    /// Current tiny block (0 if none), next free offset in it, the offsets of the objects handed out from it
    /// (the block's starts mask, kept here so the allocation path only stores it), and that mask's address.
    tiny: usize,
    tiny_offset: usize,
    tiny_starts: u16,
    tiny_starts_at: *const AtomicU16,
    /// Go's per-P page cache: small span allocations skip the heap lock.
    pub(crate) pcache: PageCache,
    /// Bytes left to allocate before the next heap-profile sample (Go's `mcache.nextSample`).
    pub(crate) next_sample: isize,
    /// State of the sampling interval's random draw (xorshift64*), seeded per cache slot.
    pub(crate) sample_rng: u64,
    /// The profiler's rate generation this countdown was drawn under (`u32::MAX`: never drawn).
    pub(crate) sample_gen: u32,
    /// Bytes of the current draw not yet loaded into `next_sample` (a long draw is counted down in chunks, so
    /// that a rate change is seen within one chunk).
    pub(crate) sample_carry: usize,
}

/// The part of a CPU's cache slot that other CPUs may read: its counters and its index. Kept outside the
/// `CpuCache` (which its owner holds by `&mut`) so readers never alias the owner's exclusive borrow.
#[derive(Debug)]
pub struct CpuShared {
    /// Counters: written by the owner only (plain relaxed stores), read by anyone.
    pub stats: CpuStats,
    /// The cache index (`MAX_CPUS` for the shared cache); marks the spans this cache caches.
    pub index: u16,
}

impl CpuShared {
    /// Counters for cache `index`.
    pub const fn new(index: u16) -> Self {
        CpuShared { stats: CpuStats::new(), index }
    }
}

// SAFETY: a CpuCache is only used by the holder of its index's guard (or its lock); the raw pointers it holds
// point into the heap, which is shared and `Sync`.
unsafe impl Send for CpuCache {}

/// The tiers below the caches, shared by all CPUs: what a refill or flush needs.
pub(crate) struct Tiers<S: PageSource> {
    pub heap: Heap<S>,
    pub centrals: [Central; NUM_ALLOC_CLASSES],
    /// Where bad frees are reported (`None`: the process-wide hook).
    pub report_hook: Option<crate::check::ReportHook>,
}

/// Prints the cache's scalar state (its stocks and spans belong to whoever holds its guard).
impl core::fmt::Debug for CpuCache {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CpuCache")
            .field("grown_bytes", &self.grown_bytes)
            .field("tiny", &format_args!("{:#x}", self.tiny))
            .field("next_sample", &self.next_sample)
            .finish_non_exhaustive()
    }
}

impl Default for CpuCache {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuCache {
    /// An empty cache.
    pub const fn new() -> Self {
        CpuCache {
            classes: class_caches(),
            held: [HeldSpans::EMPTY; NUM_ALLOC_CLASSES],
            held_bytes: 0,
            grown_bytes: 0,
            tiny: 0,
            tiny_offset: 0,
            tiny_starts: 0,
            tiny_starts_at: ptr::null(),
            pcache: PageCache::new(),
            next_sample: 0,
            sample_rng: 0x9E37_79B9_7F4A_7C15,
            sample_gen: u32::MAX,
            sample_carry: 0,
        }
    }

    /// Allocates an object of class `c`. Null when out of memory.
    /// With `ZERO`, the object is zeroed (skipping objects known to be fresh from zeroed pages).
    ///
    /// # Safety
    /// `1 <= c < NUM_ALLOC_CLASSES` (the fast path skips the bounds checks).
    #[inline(always)]
    pub(crate) unsafe fn alloc<S: PageSource, const ZERO: bool>(
        &mut self,
        t: &Tiers<S>,
        c: usize,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> *mut u8 {
        // SAFETY: forwarded contract.
        match unsafe { self.alloc_fast::<ZERO>(c, sh) } {
            Some(p) => p,
            None => self.alloc_slow::<S, ZERO>(t, c, sh, g),
        }
    }

    /// The fast part of [`CpuCache::alloc`]: the stock, then the cached span's `alloc_cache`; `None` when
    /// both are empty (the caller then takes the general path, which refills).
    ///
    /// # Safety
    /// `1 <= c < NUM_ALLOC_CLASSES`.
    #[inline(always)]
    pub(crate) unsafe fn alloc_fast<const ZERO: bool>(&mut self, c: usize, sh: &CpuShared) -> Option<*mut u8> {
        // SAFETY: `c < NUM_ALLOC_CLASSES` (the caller's contract).
        let cc = unsafe { self.classes.get_unchecked_mut(c) };
        let obj = cc.stock;
        if !obj.is_null() {
            // SAFETY: stock objects are free, at least 8 bytes, and hold the next link in their first word.
            cc.stock = unsafe { *(obj as *mut *mut u8) };
            cc.nstock -= 1;
            sh.stats.nmalloc(c).bump();
            if ZERO {
                // SAFETY: the object is ours and `elemsize` bytes long.
                unsafe { ptr::write_bytes(obj, 0, class_shape(c).elemsize as usize) };
            }
            return Some(obj);
        }
        let s = cc.span;
        if !s.is_null() {
            // SAFETY: we own the cached span's object fields.
            if let Some(idx) = unsafe { Span::next_free_fast(s) } {
                sh.stats.nmalloc(c).bump();
                // SAFETY: as above; `idx < nelems`.
                return Some(unsafe { Self::object::<ZERO>(s, idx) });
            }
        }
        None
    }

    /// The fast part of [`CpuCache::free`]: pushes `p` on the stock unless it is full (then returns false
    /// and the caller takes the general path, which makes room).
    ///
    /// # Safety
    /// As for [`CpuCache::free`].
    #[inline(always)]
    pub(crate) unsafe fn free_fast(&mut self, c: usize, p: *mut u8, sh: &CpuShared) -> bool {
        // SAFETY: `c < NUM_ALLOC_CLASSES` (the caller's contract).
        let cc = unsafe { self.classes.get_unchecked_mut(c) };
        // SAFETY: the object is ours and has room for the key (the caller's contract).
        if cc.nstock >= cc.max || unsafe { *stock_key_slot(p) } == STOCK_KEY {
            return false;
        }
        // SAFETY: forwarded contract.
        unsafe { self.push(c, p, true, sh) };
        true
    }

    /// Pushes `p` on class `c`'s stock (below its bound), writing the stock key if `keyed`.
    ///
    /// # Safety
    /// `p` is a free object of class `c`, at least 8 bytes, and at least [`STOCK_KEY_MIN_SIZE`] if `keyed`;
    /// `c < NUM_ALLOC_CLASSES`.
    #[inline(always)]
    unsafe fn push(&mut self, c: usize, p: *mut u8, keyed: bool, sh: &CpuShared) {
        // SAFETY: `c < NUM_ALLOC_CLASSES` (the caller's contract).
        let cc = unsafe { self.classes.get_unchecked_mut(c) };
        // SAFETY: the object is free and at least 8 bytes (16 if keyed): it can hold the link and the key.
        unsafe {
            *(p as *mut *mut u8) = cc.stock;
            if keyed {
                *stock_key_slot(p) = STOCK_KEY;
            }
        }
        cc.stock = p;
        cc.nstock += 1;
        sh.stats.nfree(c).bump();
    }

    /// Whether `p` is on class `c`'s stock (a scan: only when `p` carries the stock key).
    fn stock_contains(&self, c: usize, p: *mut u8) -> bool {
        let cc = &self.classes[c];
        let mut q = cc.stock;
        for _ in 0..cc.nstock {
            if q == p {
                return true;
            }
            // SAFETY: the stock holds `nstock` well-formed links through its objects' first words.
            q = unsafe { *(q as *mut *mut u8) };
        }
        false
    }

    /// The address of object `idx` of owned span `s`, zeroed if asked and not known fresh.
    ///
    /// # Safety
    /// The caller owns `s`'s object fields and just allocated object `idx`.
    #[inline(always)]
    unsafe fn object<const ZERO: bool>(s: *mut Span, idx: usize) -> *mut u8 {
        // SAFETY: per the contract; shape fields are immutable while in use.
        unsafe {
            let size = (*s).elemsize as usize;
            let p = ((*s).base + idx * size) as *mut u8;
            if ZERO && ((*s).needzero || idx < (*s).fresh_from as usize) {
                ptr::write_bytes(p, 0, size);
            }
            p
        }
    }

    #[inline(never)]
    fn alloc_slow<S: PageSource, const ZERO: bool>(
        &mut self,
        t: &Tiers<S>,
        c: usize,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> *mut u8 {
        sh.stats.used.set(1);
        self.classes[c].refilled = true;
        self.classes[c].held_idle = false;
        let s = self.classes[c].span;
        let mut old = None;
        if !s.is_null() {
            // SAFETY: we own the cached span's object fields.
            unsafe {
                if let Some(idx) = Span::next_free(s) {
                    sh.stats.nmalloc[c].bump();
                    return Self::object::<ZERO>(s, idx);
                }
                // Full: fold frees other CPUs deferred to us (the sweep of a cached span), else give it back.
                if Span::has_deferred_frees(s) {
                    let swept = Span::sweep(s);
                    report_bad_sweep(t, swept.bad);
                    if swept.nfreed > 0 {
                        let idx = Span::next_free(s).expect("swept span has a free object");
                        sh.stats.nmalloc[c].bump();
                        return Self::object::<ZERO>(s, idx);
                    }
                }
                self.classes[c].span = ptr::null_mut();
                // Hold it, and take the oldest held span back if other CPUs freed into it since.
                match self.cycle_held(t, c, s) {
                    Cycled::Reuse(h, idx) => {
                        sh.stats.held_reuses.bump();
                        self.classes[c].span = h;
                        sh.stats.nmalloc[c].bump();
                        return Self::object::<ZERO>(h, idx);
                    }
                    Cycled::GiveBack(h) => old = Some(NonNull::new_unchecked(h)),
                    Cycled::Keep => {}
                }
            }
        }
        // Give the used-up span back (if any) and take another under one hold of the class lock.
        // SAFETY: we cached `old` (if any) and stop using it now.
        let (new, bad) = unsafe { t.centrals[c].swap_span(g, &t.heap, Some(&mut self.pcache), sh.index, old) };
        // The new span is recorded before a double free the sweep found is reported, and the object taken
        // after it (a report hook that returns or unwinds leaves the cache and its counts consistent).
        let s = new.map_or(ptr::null_mut(), |s| s.as_ptr());
        if !s.is_null() {
            sh.stats.refills.bump();
            self.classes[c].span = s;
        }
        report_bad_sweep(t, bad);
        if s.is_null() {
            return ptr::null_mut();
        }
        // SAFETY: `swap_span` made us the owner of `s`, which has a free object.
        unsafe {
            let idx = Span::next_free(s).expect("cached span has a free object");
            sh.stats.nmalloc[c].bump();
            Self::object::<ZERO>(s, idx)
        }
    }

    /// Puts used-up span `s` (no free object, no deferred free) at the back of class `c`'s held queue, then
    /// looks at the queue's oldest span: if other CPUs freed objects into it, they are folded and it becomes
    /// the class's span again (`Reuse`, with the object to hand out); else, if the cache holds more than
    /// [`HELD_BYTES`], the oldest goes back to the central list (`GiveBack`); else the caller takes a new
    /// span (`Keep`).
    ///
    /// # Safety
    /// `s` is a span of class `c` this cache caches, no longer its current span, on no queue.
    unsafe fn cycle_held<S: PageSource>(&mut self, t: &Tiers<S>, c: usize, s: *mut Span) -> Cycled {
        // SAFETY: forwarded contract.
        unsafe { self.hold(c, s) };
        // SAFETY: the oldest span is on our queue: we cache it and own its object fields.
        let reuse = unsafe { Span::has_deferred_frees(self.held[c].oldest()) };
        if !reuse && self.held_bytes <= HELD_BYTES {
            return Cycled::Keep;
        }
        let h = self.unhold_oldest(c).expect("the queue holds at least `s`");
        if reuse {
            // SAFETY: as above; `h` is off the queue and still ours.
            unsafe {
                let swept = Span::sweep(h);
                report_bad_sweep(t, swept.bad);
                if let Some(idx) = Span::next_free(h) {
                    return Cycled::Reuse(h, idx);
                }
            }
        }
        Cycled::GiveBack(h)
    }

    /// Appends span `s` to class `c`'s held queue, counting it in `nheld` and `held_bytes`.
    ///
    /// # Safety
    /// As for [`CpuCache::cycle_held`].
    unsafe fn hold(&mut self, c: usize, s: *mut Span) {
        // SAFETY: per the contract; the span's page count is immutable while it is in use.
        unsafe {
            self.held_bytes += (*s).npages * PAGE_SIZE;
            self.held[c].push(s);
        }
        self.classes[c].nheld += 1;
    }

    /// Takes class `c`'s oldest held span off its queue (and out of `nheld` and `held_bytes`): still cached
    /// by us, the caller's to reuse or give back.
    fn unhold_oldest(&mut self, c: usize) -> Option<*mut Span> {
        let h = self.held[c].pop()?;
        self.classes[c].nheld -= 1;
        // SAFETY: `h` was on our queue: a live span we cache; its page count is immutable while in use.
        self.held_bytes -= unsafe { (*h).npages } * PAGE_SIZE;
        Some(h)
    }

    /// Gives up to `max` of class `c`'s held spans, oldest first, back to the central list. Returns whether
    /// the queue is now empty.
    fn release_held<S: PageSource>(&mut self, t: &Tiers<S>, c: usize, max: usize, g: Guarded<'_>) -> bool {
        for _ in 0..max {
            let Some(h) = self.unhold_oldest(c) else { return true };
            // SAFETY: `h` came off our queue: a span of class `c` we cache; we stop using it now.
            report_bad_sweep(t, unsafe { t.centrals[c].uncache_span(g, NonNull::new_unchecked(h)) });
        }
        self.classes[c].nheld == 0
    }

    /// Spans class `c` holds (for tests and statistics).
    pub(crate) fn held_spans(&self, c: usize) -> u32 {
        u32::from(self.classes[c].nheld)
    }

    /// Frees object `p` of class `c` onto this CPU's stock; when the stock is full, first grows its bound
    /// or flushes half of it to the central list.
    ///
    /// # Safety
    /// `p` was allocated from class `c` of the allocator `t` belongs to and is not used any more;
    /// `1 <= c < NUM_ALLOC_CLASSES`.
    #[inline(always)]
    pub(crate) unsafe fn free<S: PageSource>(
        &mut self,
        t: &Tiers<S>,
        c: usize,
        p: *mut u8,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) {
        let keyed = class_shape(c).elemsize as usize >= STOCK_KEY_MIN_SIZE;
        if keyed {
            // SAFETY: forwarded contract; the class has room for the key.
            if unsafe { self.free_fast(c, p, sh) } {
                return;
            }
            // SAFETY: as above.
            if unsafe { *stock_key_slot(p) } == STOCK_KEY && self.stock_contains(c, p) {
                crate::check::report_with(&t.heap, t.report_hook, p as usize, crate::check::Reason::DoubleFree);
            }
        }
        if self.classes[c].nstock >= self.classes[c].max {
            self.make_room(t, c, sh, g);
        }
        // SAFETY: forwarded contract; `make_room` left the stock below its bound.
        unsafe { self.push(c, p, keyed, sh) };
    }

    /// Class `c`'s stock is at its bound: doubles the bound if the class refilled since it last grew and
    /// the class and the cache may still grow, else flushes half the stock, at most [`FLUSH_SLICE_OBJS`]
    /// objects (bounds are at least `STOCK_MIN_OBJS`, so either way the stock ends below its bound).
    #[inline(never)]
    fn make_room<S: PageSource>(&mut self, t: &Tiers<S>, c: usize, sh: &CpuShared, g: Guarded<'_>) {
        let size = class_shape(c).elemsize as usize;
        let cc = &mut self.classes[c];
        let grown = (cc.max.saturating_mul(2)).min(stock_cap(c));
        let extra = (grown - cc.max) as usize * size;
        if cc.refilled && grown > cc.max && self.grown_bytes + extra <= STOCK_GROW_BYTES {
            cc.max = grown;
            cc.refilled = false;
            self.grown_bytes += extra;
            return;
        }
        // Half the stock, at most a slice (the stock is at its bound here, so one object is always enough).
        let n = ((cc.nstock / 2).max(1) as usize).min(FLUSH_SLICE_OBJS);
        self.flush_stock(t, c, n, sh, g);
    }

    /// Sets class `c`'s stock bound to `max` (not below its base), flushing the objects beyond it: at most
    /// [`FLUSH_SLICE_OBJS`] of them, so a grown stock of thousands of objects comes down by a slice per
    /// call, its bound staying at or above it.
    fn set_stock_max<S: PageSource>(&mut self, t: &Tiers<S>, c: usize, max: u32, sh: &CpuShared, g: Guarded<'_>) {
        let size = class_shape(c).elemsize as usize;
        let cc = &mut self.classes[c];
        let max = max.max(STOCK_MAX[c]).max(cc.nstock.saturating_sub(FLUSH_SLICE_OBJS as u32));
        if max < cc.max {
            self.grown_bytes -= (cc.max - max) as usize * size;
            cc.max = max;
        }
        let excess = cc.nstock.saturating_sub(cc.max);
        if excess > 0 {
            self.flush_stock(t, c, excess as usize, sh, g);
        }
    }

    /// The stock bound of class `c` now (for tests and statistics).
    pub(crate) fn stock_bound(&self, c: usize) -> u32 {
        self.classes[c].max
    }

    /// Flushes the `n` most recently freed objects of class `c` to the central list. An invalid object
    /// among them (a bad free the `checks` feature was not there to catch) is reported, never returned.
    #[inline(never)]
    fn flush_stock<S: PageSource>(&mut self, t: &Tiers<S>, c: usize, n: usize, sh: &CpuShared, g: Guarded<'_>) {
        let cc = &mut self.classes[c];
        let n = n.min(cc.nstock as usize);
        if n == 0 {
            return;
        }
        // SAFETY: the stock list has `nstock >= n` well-formed entries: objects freed to us as class `c`
        // objects of this allocator.
        let r = unsafe { t.centrals[c].flush(g, &t.heap, cc.stock, n, sh.index) };
        match r {
            Ok((Flushed { nremote, .. }, rest)) => {
                cc.stock = rest;
                cc.nstock -= n as u32;
                sh.stats.remote_frees.add(nremote as u64)
            }
            Err(e) => {
                // The whole stock is dropped on the floor: it may be corrupt.
                cc.stock = ptr::null_mut();
                cc.nstock = 0;
                crate::check::report_flush_error(&t.heap, t.report_hook, e)
            }
        }
    }

    /// Allocates `size` bytes aligned to `align` (`size < TINY_REQUEST_LIMIT`, `align <= 8`) from the current tiny
    /// block, starting a new block when it does not fit.
    #[inline(always)]
    pub(crate) fn alloc_tiny<S: PageSource>(
        &mut self,
        t: &Tiers<S>,
        size: usize,
        align: usize,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> *mut u8 {
        match self.bump_tiny(size, align, sh) {
            Some(p) => p,
            None => match self.renew_tiny(size, sh) {
                Some(p) => p,
                None => self.alloc_tiny_block(t, size, sh, g),
            },
        }
    }

    /// The object of `size` bytes aligned to `align` at the current tiny block's next offset, if one is
    /// current and the object fits (a leaf step: no load of shared state, no read-modify-write).
    #[inline(always)]
    fn bump_tiny(&mut self, size: usize, align: usize, sh: &CpuShared) -> Option<*mut u8> {
        let off = (self.tiny_offset + align - 1) & !(align - 1);
        if self.tiny != 0 && off + size <= TINY_SIZE && off <= TINY_MAX_START {
            self.tiny_offset = off + size;
            self.tiny_starts |= 1 << off;
            // SAFETY: `tiny_starts_at` is the current block's starts mask (the invariant), in a live tiny span;
            // only this CPU stores to it while the block is current (the tiny protocol: a plain store).
            unsafe { &*self.tiny_starts_at }.store(self.tiny_starts, Ordering::Relaxed);
            sh.stats.tiny_nmalloc.bump();
            return Some((self.tiny + off) as *mut u8);
        }
        None
    }

    /// Starts the current tiny block over for an object of `size` bytes at its offset 0, if every object
    /// handed out from it was freed (its done mask equals its starts: the tiny protocol's *renew*). A leaf
    /// step: a load and three stores, no read-modify-write, and the block stays this CPU's (no trip
    /// through the tiny class's stock).
    #[inline(always)]
    fn renew_tiny(&mut self, size: usize, sh: &CpuShared) -> Option<*mut u8> {
        if self.tiny == 0 {
            return None;
        }
        // SAFETY: the current block is a block of a live tiny span (the invariant).
        let done = unsafe { tiny_done(self.tiny) };
        // Acquire: every free's `fetch_or` (AcqRel) is in the mask's release sequence, so the frees' uses
        // of the block happen before its reuse.
        if done.load(Ordering::Acquire) != self.tiny_starts {
            return None;
        }
        done.store(0, Ordering::Relaxed);
        self.tiny_starts = 1;
        // SAFETY: `tiny_starts_at` is the current block's starts mask (the invariant); only this CPU stores
        // to it.
        unsafe { &*self.tiny_starts_at }.store(1, Ordering::Relaxed);
        self.tiny_offset = size;
        sh.stats.tiny_nmalloc.bump();
        Some(self.tiny as *mut u8)
    }

    /// The tiny path's leaf part (`Malloc`'s tiny fast path: it calls nothing out): the current block's next
    /// offset, else the current block started over if all its objects were freed, else a new block off the
    /// tiny class's stock or cached span, retiring the current one.
    /// Returns the object (null if neither has room: the caller takes the general path, nothing changed)
    /// and a block the retirement found all freed that did not fit the tiny class's stock (0 if none): the
    /// caller frees it with [`CpuCache::free`] in a section of its own.
    #[inline(always)]
    pub(crate) fn alloc_tiny_leaf(&mut self, size: usize, align: usize, sh: &CpuShared) -> (*mut u8, usize) {
        if let Some(p) = self.bump_tiny(size, align, sh).or_else(|| self.renew_tiny(size, sh)) {
            return (p, 0);
        }
        // SAFETY: the tiny class is an allocation class.
        let Some(block) = (unsafe { self.alloc_fast::<false>(TINY_CLASS, sh) }) else {
            return (ptr::null_mut(), 0);
        };
        let freed = self.take_tiny_block(block, size, sh);
        // SAFETY: `freed` is a tiny block all of whose objects were freed: a free tiny-class object.
        if freed != 0 && unsafe { self.free_fast(TINY_CLASS, freed as *mut u8, sh) } {
            return (block, 0);
        }
        (block, freed)
    }

    #[inline(never)]
    fn alloc_tiny_block<S: PageSource>(
        &mut self,
        t: &Tiers<S>,
        size: usize,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> *mut u8 {
        // SAFETY: the tiny class is an allocation class.
        let block = unsafe { self.alloc::<S, false>(t, TINY_CLASS, sh, g) };
        if block.is_null() {
            return block;
        }
        let freed = self.take_tiny_block(block, size, sh);
        if freed != 0 {
            // SAFETY: every object of the retired block was freed; the block is a tiny-class object.
            unsafe { self.free(t, TINY_CLASS, freed as *mut u8, sh, g) };
        }
        block
    }

    /// Takes `block`, fresh off the tiny class, for an object of `size` bytes at its offset 0 (the tiny
    /// protocol's *take*), and makes it the current block unless the current one has more room left.
    /// Returns the block the retirement of the current one found all freed (0 if none): the caller frees it.
    #[inline(always)]
    fn take_tiny_block(&mut self, block: *mut u8, size: usize, sh: &CpuShared) -> usize {
        sh.stats.tiny_nmalloc.bump();
        // SAFETY: a fresh 16-byte block: its second word is ours (it may hold the stock key).
        unsafe { *stock_key_slot(block) = 0 };
        // Take the block (the tiny protocol): its previous life ended with the free that handed it to the
        // stock or span it came from, which happens before this allocation.
        // SAFETY: `block` is a block of a live tiny span.
        let (starts, done) = unsafe { (tiny_starts(block as usize), tiny_done(block as usize)) };
        starts.store(1, Ordering::Relaxed);
        if self.tiny != 0 && size >= self.tiny_offset {
            // As Go: keep whichever block has more room left. The current one does, so the new block holds
            // just this object and is retired at once (nobody else knows the block yet: a store of `!A`).
            done.store(!1, Ordering::Relaxed);
            return 0;
        }
        done.store(0, Ordering::Relaxed);
        let freed = self.retire_tiny_masks();
        self.tiny = block as usize;
        self.tiny_offset = size;
        self.tiny_starts = 1;
        self.tiny_starts_at = starts;
        freed
    }

    /// Retires the current tiny block: or-s the offsets that are not starts into its done mask, and frees
    /// the block if all of its objects were freed already (the tiny protocol in the module docs).
    fn retire_tiny<S: PageSource>(&mut self, t: &Tiers<S>, sh: &CpuShared, g: Guarded<'_>) {
        let freed = self.retire_tiny_masks();
        if freed != 0 {
            // SAFETY: every object of the block was freed; the block is a tiny-class object.
            unsafe { self.free(t, TINY_CLASS, freed as *mut u8, sh, g) };
        }
    }

    /// The retirement's masks: leaves the current tiny block (if any), or-ing the offsets that are not
    /// starts into its done mask. Returns the block if that found all of its objects freed (the caller
    /// then frees it), else 0.
    #[inline(always)]
    fn retire_tiny_masks(&mut self) -> usize {
        if self.tiny == 0 {
            return 0;
        }
        let block = self.tiny;
        let starts = self.tiny_starts;
        self.tiny = 0;
        self.tiny_offset = 0;
        self.tiny_starts = 0;
        self.tiny_starts_at = ptr::null();
        // SAFETY: `block` is a live tiny block.
        let done = unsafe { tiny_done(block) };
        if done.fetch_or(!starts, Ordering::AcqRel) == starts {
            block
        } else {
            0
        }
    }

    /// Frees a tiny object; frees its block when it was the last live object of a retired block. A pointer
    /// at no object's start, or an object freed already, is reported (every build) and changes nothing.
    ///
    /// # Safety
    /// `p` lies in the blocks of a live tiny span of the allocator `t` belongs to (see
    /// [`super::class::in_tiny_blocks`]), and if it is a tiny object it is not used any more.
    #[inline]
    pub(crate) unsafe fn free_tiny<S: PageSource>(&mut self, t: &Tiers<S>, p: *mut u8, sh: &CpuShared, g: Guarded<'_>) {
        let addr = p as usize;
        // SAFETY: the caller's contract.
        match unsafe { tiny_release(addr) } {
            Err(reason) => crate::check::report_with(&t.heap, t.report_hook, addr, reason),
            Ok(freed) => {
                sh.stats.tiny_nfree.bump();
                if freed != 0 {
                    // SAFETY: the block was retired and all its objects are now free.
                    unsafe { self.free(t, TINY_CLASS, freed as *mut u8, sh, g) };
                }
            }
        }
    }

    /// The leaf part of a tiny free whose masks [`tiny_release`] already updated: counts it, and puts
    /// `freed` (a block it completed, or 0) on the tiny class's stock if it fits. Returns false if `freed`
    /// did not fit: the caller frees it with [`CpuCache::free`] in a section of its own.
    ///
    /// # Safety
    /// `freed` is 0 or a tiny block all of whose objects were freed, which nothing else will free.
    #[inline(always)]
    pub(crate) unsafe fn free_tiny_leaf(&mut self, freed: usize, sh: &CpuShared) -> bool {
        sh.stats.tiny_nfree.bump();
        // SAFETY: the caller's contract: a free tiny-class object.
        freed == 0 || unsafe { self.free_fast(TINY_CLASS, freed as *mut u8, sh) }
    }

    /// Gives everything cached back: flushes every stock, retires the tiny block and returns every span to
    /// the central lists, and flushes the page cache to the heap. The cache stays usable.
    /// (Every step of [`CpuCache::flush_step`], in one section.)
    pub(crate) fn flush_all<S: PageSource>(&mut self, t: &Tiers<S>, sh: &CpuShared, g: Guarded<'_>) {
        for i in 0..FLUSH_STEPS {
            while !self.flush_step(t, i, sh, g) {}
        }
    }
}

/// Reports a double free a sweep found (a deferred free of an object that was not allocated); the sweep
/// has already dropped it, so the span's counts are exact whatever the report hook does.
#[inline]
fn report_bad_sweep<S: PageSource>(t: &Tiers<S>, bad: Option<usize>) {
    if let Some(addr) = bad {
        crate::check::report_with(&t.heap, t.report_hook, addr, crate::check::Reason::DoubleFree);
    }
}

/// Steps of a sliced flush (see [`CpuCache::flush_step`]): the tiny block, each allocation class, the
/// page cache.
pub(crate) const FLUSH_STEPS: usize = NUM_ALLOC_CLASSES + 1;

/// Flushing in slices (interrupt latency, see `page/heap/slice.rs`): [`CpuCache::flush_all`]'s steps one
/// at a time, so that `Malloc` can run a few in each guarded section with interrupt windows between them.
impl CpuCache {
    /// Step `i` (`< FLUSH_STEPS`) of a sliced flush: 0 retires the tiny block; `c` in
    /// `1..NUM_ALLOC_CLASSES` flushes class `c`'s stock (and its grown bound), gives its held spans back and
    /// then its cached span; the last gives the page cache back. All of them, in order, each until it
    /// returns true, are `flush_all`. Returns false while the class has more to give back than one call
    /// does: the caller runs the same step again (in a section of its own, if it slices). One call returns
    /// at most [`FLUSH_SLICE_OBJS`] objects of the stock, or else at most [`HELD_SLICE_SPANS`] held spans
    /// and the cached span, never both (a call that flushed objects leaves the held spans to the next).
    pub(crate) fn flush_step<S: PageSource>(&mut self, t: &Tiers<S>, i: usize, sh: &CpuShared, g: Guarded<'_>) -> bool {
        if i == 0 {
            self.retire_tiny(t, sh, g);
        } else if i < NUM_ALLOC_CLASSES {
            let c = i;
            let n = self.classes[c].nstock as usize;
            if n > FLUSH_SLICE_OBJS {
                self.flush_stock(t, c, FLUSH_SLICE_OBJS, sh, g);
                return false;
            }
            self.flush_stock(t, c, n, sh, g);
            self.set_stock_max(t, c, 0, sh, g);
            if self.classes[c].nheld != 0 && (n != 0 || !self.release_held(t, c, HELD_SLICE_SPANS, g)) {
                return false;
            }
            let s = self.classes[c].span;
            if !s.is_null() {
                self.classes[c].span = ptr::null_mut();
                // SAFETY: we cache `s` and stop using it now.
                report_bad_sweep(t, unsafe { t.centrals[c].uncache_span(g, NonNull::new_unchecked(s)) });
            }
        } else {
            t.heap.flush_page_cache(g, &mut self.pcache);
        }
        true
    }
}

/// The background fold in slices (interrupt latency, see `page/heap/slice.rs`).
impl CpuCache {
    /// The per-CPU part of the background sweep for classes `[from, to)` (`1 <= from`, `to <=
    /// NUM_ALLOC_CLASSES`; the background step covers `1..NUM_ALLOC_CLASSES` a few classes per guarded
    /// section): halves their grown stock bounds (flushing what no longer fits) and folds the deferred frees
    /// of their cached spans. Returns the objects folded.
    pub(crate) fn sweep_cached_classes<S: PageSource>(
        &mut self,
        t: &Tiers<S>,
        from: usize,
        to: usize,
        sh: &CpuShared,
        g: Guarded<'_>,
    ) -> usize {
        let mut n = 0;
        for (c, &base) in STOCK_MAX.iter().enumerate().take(to).skip(from) {
            let (max, nstock) = (self.classes[c].max, self.classes[c].nstock);
            if self.grown_bytes != 0 && max > base {
                self.set_stock_max(t, c, max / 2, sh, g);
            }
            // Held spans of a class that has not refilled since the previous step go back, a slice per step
            // (in a step that flushed no objects, so a section does one or the other, as in `flush_step`).
            if self.classes[c].nheld != 0 {
                if self.classes[c].held_idle {
                    if self.classes[c].nstock == nstock {
                        self.release_held(t, c, HELD_SLICE_SPANS, g);
                    }
                } else {
                    self.classes[c].held_idle = true;
                }
            }
            let s = self.classes[c].span;
            // SAFETY: we own the cached spans' object fields.
            if !s.is_null() && unsafe { Span::has_deferred_frees(s) } {
                // SAFETY: as above.
                let swept = unsafe { Span::sweep(s) };
                report_bad_sweep(t, swept.bad);
                n += swept.nfreed;
            }
        }
        n
    }
}
