//! The allocator (Go's `malloc.go`, `mallocgc`): routes each request to the tiny, small or large path.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! [`Malloc`] owns every tier: the page heap, one [`Central`] per allocation class, one [`CpuCache`] per
//! CPU index plus a shared cache behind a lock, and the [`CpuProvider`] that says which cache the caller may
//! use. It implements [`GlobalAlloc`] and allocator-api2's `Allocator`.
//!
//! # Routing (the same function decides for `alloc`, `dealloc` and `realloc`)
//! - `size <= 8 && align <= 8`: tiny path (packed into 16-byte blocks; Go's bound is 16, see `cpucache.rs`);
//! - `size <= 32 KiB` and some class's size is a multiple of `align` (`align <= 8 KiB`): small path, class
//!   `class_for(size, align)`;
//! - otherwise: large path, whole pages from the page heap, any alignment.
//!
//! # Guards and locks
//! - `caches[i]`: only while holding the provider's guard for index `i` (interrupts off in a kernel);
//! - `shared`: its spin lock (used when the provider gives no index: early boot, out of slots, re-entry);
//! - `centrals[c]`: its own lock (see `central.rs`); the heap: the heap lock (see `page/heap/mod.rs`).
//!
//! Lock order: shared cache → central(c) → heap → guarded pool (`guarded.rs`). A CPU guard is held across
//! all of them: each lock is a [`GuardedMutex`] taken with the [`Guarded`] token of the guard
//! (`Entered::held`), and the page source is called only with one, so every path that locks or calls the
//! source is inside the guard by construction.
//! The fast paths (`alloc_or`, `dealloc`) take no lock and call nothing: they need no token.
//!
//! # Files, by concern
//! - this file: the type, its construction, routing, entering a cache;
//! - `alloc.rs`: the allocation paths (fast, general, large); `free.rs`: the free paths and `realloc`;
//! - `maintenance.rs`: the background step, cache flushes, `release_all`, the memory limit;
//! - `reclaim.rs`: reclaim before failing, flush requests to other caches, the memory limit's reclaim and
//!   the background step's pacing;
//! - `profile.rs`: heap-profile sampling; `guarded.rs`: sampled guarded allocations (KFENCE / GWP-ASan);
//!   `report.rs`: per-CPU figures, `MemStats`, metrics, validation;
//! - `api.rs`: `GlobalAlloc` and allocator-api2's `Allocator`.

use crate::check::{self, Reason};
use crate::cpu::{CpuProvider, Guarded, GuardedMutex, MAX_CPUS};
use crate::object::central::{Central, KEEP_EMPTY_SPANS};
use crate::object::class::{class_shape, ClassShape, NUM_ALLOC_CLASSES, TINY_CLASS, TINY_REQUEST_LIMIT, TINY_SIZE};
use crate::object::cpucache::{CpuCache, CpuShared, Tiers};
use crate::object::sizeclass::{self, NUM_SIZE_CLASSES};
use crate::page::heap::Heap;
use crate::page::span::Span;
use crate::source::PageSource;
use crate::stats::{BySize, MemStats, Sample};
use crate::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use crate::{MAX_SMALL_SIZE, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::{self, NonNull};

mod alloc;
mod api;
mod free;
mod guarded;
mod maintenance;
mod orphans;
mod profile;
mod reclaim;
mod report;

pub use guarded::{GuardedStats, GUARDED_CANARY, GUARDED_SLOTS, QUARANTINE_MIN};
pub use maintenance::BackgroundReport;
use orphans::{FRESH_ZERO_MIN_BYTES, ORPHANS_PER_BACKGROUND};
use profile::Profiler;
pub use profile::{
    exp_draw, sample_rng_next, sample_seed, wire_header, wire_rate, ProfileBucket, ProfileDropped, ProfileHook,
    ProfileRecord, ProfileSample, ScaledCounts, StackHook, DEFAULT_PROFILE_RATE, MAX_STACK_DEPTH, PROFILE_BUCKETS,
    PROFILE_MAX_BUCKETS, PROFILE_RESERVATION_BYTES, PROFILE_SPECIALS, REGION_SLOTS, SAMPLE_CHUNK_BYTES, WARM_MIN_BYTES,
    WIRE_MAGIC, WIRE_RECORD_MAX,
};
pub use reclaim::{limit_reclaim_base_npages, IDLE_BUDGET_FACTOR};
pub use report::CpuSummary;

/// Cache index of the shared cache (marks the spans it caches).
const SHARED_INDEX: u16 = MAX_CPUS as u16;

/// Where a request goes: [`LARGE`], [`GUARDED`], [`TINY_CLASS`], or a size class.
type Route = usize;
/// Route of large requests.
const LARGE: Route = 0;
/// Route of every request in guard and efence modes ([`DebugFlags::GUARD`], [`DebugFlags::EFENCE`]).
const GUARDED: Route = usize::MAX;

bitflags::bitflags! {
    /// Debug knobs (Go's GODEBUG analogues). Fixed when the allocator is built ([`Malloc::with_debug`]) or
    /// before its first allocation ([`Malloc::set_debug_before_use`]; the hosted allocator's
    /// `GODEBUG=efence=1`): they change how requests are routed, so they cannot change while objects are
    /// live.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DebugFlags: u32 {
        /// Guard mode: every allocation gets pages of its own and ends right before a guard page that is
        /// decommitted and made inaccessible (`PageSource::decommit_guard`: any `MmapSource`, a kernel
        /// source that unmaps), so an overrun faults at once; frees are checked like large frees. Freed
        /// pages are reused (a use after free is not caught: see [`DebugFlags::EFENCE`]). Slow and
        /// page-hungry, for debugging only.
        const GUARD = 1 << 0;
        /// No tiny path: requests of 8 B and less take the size classes (to measure what the tiny path saves).
        const NO_TINY = 1 << 1;
        /// Go's efence (`GODEBUG=efence=1`): every object on pages of its own, ending right before a
        /// decommitted guard page as in [`DebugFlags::GUARD`], and on free its pages are decommitted and
        /// *never handed out again*: a use after free faults at the access, an overrun at the guard page,
        /// and a second free is reported (the span is gone from the page map). The freed pages stay
        /// allocated in the page allocator forever (`MemStats::efence_retired_bytes` counts them), so the
        /// arena is used up at two or more pages per allocation: then allocation returns null, as at any
        /// out-of-memory. The pages are made inaccessible as `GUARD`'s guard page is. For debugging only.
        /// Implies `GUARD`'s placement whether or not `GUARD` is set.
        const EFENCE = 1 << 2;
    }
}

/// The route of a request of `size` bytes aligned to `align`, with no debug knobs.
#[inline(always)]
fn route(size: usize, align: usize) -> Route {
    if size <= MAX_SMALL_SIZE {
        if size < TINY_REQUEST_LIMIT && align <= 8 {
            return TINY_CLASS;
        }
        if let Some(c) = sizeclass::class_for(size, align) {
            return c;
        }
    }
    LARGE
}

/// The sizes the fast paths serve, as a span above `TINY_REQUEST_LIMIT`: `size - TINY_REQUEST_LIMIT <
/// FAST_SIZE_SPAN` (wrapping) exactly when `TINY_REQUEST_LIMIT <= size <= MAX_SMALL_SIZE`, the requests
/// the size classes serve.
const FAST_SIZE_SPAN: usize = MAX_SMALL_SIZE - TINY_REQUEST_LIMIT + 1;

/// `Malloc::fast_span` for debug knobs `flags`: every knob closes the fast paths (each changes the route
/// or what a free does), so one load and compare stands for "no knob and a small size class".
const fn fast_span_for(flags: DebugFlags) -> usize {
    if flags.is_empty() {
        FAST_SIZE_SPAN
    } else {
        0
    }
}

/// The route with debug knobs set.
#[cold]
fn route_debug(debug: DebugFlags, size: usize, align: usize) -> Route {
    if debug.intersects(DebugFlags::GUARD.union(DebugFlags::EFENCE)) {
        return GUARDED;
    }
    if debug.contains(DebugFlags::NO_TINY) && size < TINY_REQUEST_LIMIT {
        return sizeclass::class_for(size.max(1), align).unwrap_or(LARGE);
    }
    route(size, align)
}

/// Pages for a large object of `nbytes`.
#[inline]
fn npages_for(nbytes: usize) -> usize {
    nbytes.div_ceil(PAGE_SIZE).max(1)
}

/// One CPU's cache, and what other CPUs may read of it. Cache-line aligned, so neighbouring CPUs' slots
/// never share a line.
#[repr(align(64))]
struct CacheSlot {
    cache: UnsafeCell<CpuCache>,
    shared: CpuShared,
    /// The provider's `departures(i)` when this cache was last flushed as an orphan (see `orphans.rs`).
    flushed_departures: crate::sync::atomic::AtomicU32,
}

impl CacheSlot {
    const fn new(index: u16) -> Self {
        let mut cache = CpuCache::new();
        cache.sample_rng = profile::sample_seed(index);
        CacheSlot {
            cache: UnsafeCell::new(cache),
            shared: CpuShared::new(index),
            flushed_departures: crate::sync::atomic::AtomicU32::new(0),
        }
    }
}

/// What keeps an entered cache exclusive.
enum Held<'a, G> {
    /// The provider's guard for a per-CPU cache.
    Cpu(#[allow(dead_code)] G),
    /// The lock of the shared cache, then the provider's guard (dropped in that order: fields drop in
    /// declaration order, so a kernel re-enables interrupts only after the lock is released).
    Shared(#[allow(dead_code)] crate::sync::SpinMutexGuard<'a, ()>, #[allow(dead_code)] G),
}

impl<G> Held<'_, G> {
    /// The token of the provider's guard held here, for as long as it is borrowed.
    #[inline(always)]
    fn guarded(&self) -> Guarded<'_> {
        // SAFETY: both variants hold the provider's guard, and the token cannot outlive this borrow of it.
        unsafe { Guarded::new_unchecked() }
    }
}

/// An entered cache: exclusive to the holder until dropped.
struct Entered<'a, G> {
    cache: &'a mut CpuCache,
    sh: &'a CpuShared,
    /// Borrow it (`e.held.guarded()`) for the token that the locks and the page source ask for.
    held: Held<'a, G>,
}

// SAFETY: slot `i` is only accessed by the holder of the provider's guard for index `i` (exclusive by the
// `CpuProvider` contract); readers of its counters only touch atomics.
unsafe impl Sync for CacheSlot {}

/// goheap's allocator over page source `S`, with per-CPU caches chosen by `P`.
///
/// Build it in a `static` (its constructors are `const` and reserve nothing) and use it as the
/// `#[global_allocator]`, or through [`GlobalAlloc`] and allocator-api2's `Allocator` (implemented for
/// `&Malloc`) beside another global allocator. Which `S` and `P`: `goheap::Hosted` bundles the hosted pair
/// (feature `std`); a kernel takes `goheap::x86_64`'s adapters (feature `x86_64`) or its own
/// [`PageSource`] (see the example there) and [`CpuProvider`].
///
/// ```
/// # #[cfg(feature = "std")] {
/// use allocator_api2::vec::Vec;
/// use core::alloc::{GlobalAlloc, Layout};
/// use goheap::cpu::ThreadSlots;
/// use goheap::source::mmap::MmapSource;
/// use goheap::Malloc;
///
/// // A heap of its own beside the program's global allocator, bounded to 64 MiB.
/// static HEAP: Malloc<MmapSource, ThreadSlots> =
///     Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 64 << 20);
///
/// // Collections through allocator-api2's `Allocator` for `&Malloc`.
/// let mut v = Vec::new_in(&HEAP);
/// v.extend(0..1000u32);
///
/// // Or raw, through `GlobalAlloc`.
/// let layout = Layout::new::<[u64; 5]>();
/// assert_eq!(HEAP.usable_size(layout), 48, "40 bytes round up to the 48-byte size class");
/// // SAFETY: the layout's size is not zero.
/// let p = unsafe { HEAP.alloc(layout) };
/// assert!(!p.is_null());
/// // SAFETY: `p` is a live allocation of `layout` from `HEAP`.
/// unsafe { HEAP.dealloc(p, layout) };
///
/// drop(v);
/// let stats = HEAP.mem_stats();
/// assert_eq!((stats.mallocs, stats.frees), (2, 2));
/// # }
/// ```
pub struct Malloc<S: PageSource, P: CpuProvider> {
    /// The page heap, the central lists and the report hook.
    t: Tiers<S>,
    caches: [CacheSlot; MAX_CPUS],
    /// The shared cache, used under `shared_lock` by callers the provider gives no index.
    shared: CacheSlot,
    shared_lock: GuardedMutex<()>,
    provider: P,
    /// Debug knobs (`DebugFlags` bits); fixed once anything was allocated (see `set_debug_before_use`).
    debug: AtomicU32,
    /// The fast paths' gate (see `fast_eligible`): `FAST_SIZE_SPAN` while no debug knob is set, 0 once one
    /// is. Invariant: `fast_span == if debug == 0 { FAST_SIZE_SPAN } else { 0 }`; written with `debug` only,
    /// so it too is fixed once anything was allocated.
    fast_span: AtomicUsize,
    profiler: Profiler,
    /// Sampled guarded allocations (see `guarded.rs`).
    guarded: guarded::GuardedPool,
    /// Flush requests and background pacing (see `reclaim.rs`).
    pacing: reclaim::Pacing,
}

const fn cache_slots() -> [CacheSlot; MAX_CPUS] {
    let mut arr: [MaybeUninit<CacheSlot>; MAX_CPUS] = [const { MaybeUninit::uninit() }; MAX_CPUS];
    let mut i = 0;
    while i < MAX_CPUS {
        arr[i] = MaybeUninit::new(CacheSlot::new(i as u16));
        i += 1;
    }
    // SAFETY: every element was initialised by the loop; MaybeUninit<T> has T's layout.
    unsafe { core::mem::transmute::<[MaybeUninit<CacheSlot>; MAX_CPUS], [CacheSlot; MAX_CPUS]>(arr) }
}

const fn centrals() -> [Central; NUM_ALLOC_CLASSES] {
    let mut arr: [MaybeUninit<Central>; NUM_ALLOC_CLASSES] = [const { MaybeUninit::uninit() }; NUM_ALLOC_CLASSES];
    let mut c = 0;
    while c < NUM_ALLOC_CLASSES {
        let shape = if c == 0 { ClassShape { elemsize: 0, npages: 0, nelems: 0, divmagic: 0 } } else { class_shape(c) };
        arr[c] = MaybeUninit::new(Central::new(c as u8, shape));
        c += 1;
    }
    // SAFETY: every element was initialised by the loop; MaybeUninit<T> has T's layout.
    unsafe { core::mem::transmute::<[MaybeUninit<Central>; NUM_ALLOC_CLASSES], [Central; NUM_ALLOC_CLASSES]>(arr) }
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// An allocator over `source`; nothing is reserved until the first allocation. Usable in a `static`.
    pub const fn new(source: S, provider: P) -> Self {
        Self::from_heap(Heap::new(source), provider)
    }

    /// As [`Malloc::new`], with the heap's reserved range bounded to `max_heap_bytes` (a kernel's heap window).
    pub const fn with_max_bytes(source: S, provider: P, max_heap_bytes: usize) -> Self {
        Self::from_heap(Heap::with_max_bytes(source, max_heap_bytes), provider)
    }

    const fn from_heap(heap: Heap<S>, provider: P) -> Self {
        Malloc {
            t: Tiers { heap, centrals: centrals(), report_hook: None },
            caches: cache_slots(),
            shared: CacheSlot::new(SHARED_INDEX),
            shared_lock: GuardedMutex::new(()),
            provider,
            debug: AtomicU32::new(0),
            fast_span: AtomicUsize::new(FAST_SIZE_SPAN),
            profiler: Profiler::new(),
            guarded: guarded::GuardedPool::new(),
            pacing: reclaim::Pacing::new(),
        }
    }

    /// This allocator with debug knobs `flags` (see [`DebugFlags`]).
    pub const fn with_debug(mut self, flags: DebugFlags) -> Self {
        self.debug = AtomicU32::new(flags.bits());
        self.fast_span = AtomicUsize::new(fast_span_for(flags));
        self
    }

    /// The debug knobs.
    #[inline(always)]
    pub fn debug_flags(&self) -> DebugFlags {
        DebugFlags::from_bits_retain(self.debug.load(Ordering::Relaxed))
    }

    /// Sets the debug knobs of an allocator that has never allocated (the hosted allocator's `GODEBUG`, read
    /// at its first allocation). Routes depend on the knobs, so they cannot change once objects may be
    /// live: returns false, changing nothing, if the heap has ever grown.
    ///
    /// # Safety
    /// No allocation or free through this allocator runs concurrently with this call.
    pub unsafe fn set_debug_before_use(&self, flags: DebugFlags) -> bool {
        if self.t.heap.stats().grown_bytes != 0 {
            return false;
        }
        self.debug.store(flags.bits(), Ordering::Relaxed);
        self.fast_span.store(fast_span_for(flags), Ordering::Relaxed);
        true
    }

    /// The route of a request, honouring the debug knobs.
    #[inline(always)]
    fn route(&self, size: usize, align: usize) -> Route {
        let debug = self.debug_flags();
        if debug.is_empty() {
            route(size, align)
        } else {
            route_debug(debug, size, align)
        }
    }

    /// This allocator reports bad frees to `hook` instead of the process-wide hook (a `#[global_allocator]`
    /// must not unwind, so it wants a hook that aborts).
    pub const fn with_report_hook(mut self, hook: check::ReportHook) -> Self {
        self.t.report_hook = Some(hook);
        self
    }

    #[cold]
    fn report(&self, addr: usize, reason: Reason) -> ! {
        check::report_with(&self.t.heap, self.t.report_hook, addr, reason)
    }

    /// The page heap (for its statistics, the scavenger and the memory limit).
    pub fn heap(&self) -> &Heap<S> {
        &self.t.heap
    }

    /// The CPU provider.
    pub fn provider(&self) -> &P {
        &self.provider
    }

    /// Enters the caller's cache: its CPU's under the provider's guard, else the shared one under its lock.
    /// The cache is the caller's until the returned [`Entered`] drops.
    #[inline(always)]
    fn enter(&self) -> Entered<'_, P::Guard<'_>> {
        match self.provider.enter() {
            (guard, Some(i)) => {
                debug_assert!(i < MAX_CPUS);
                // SAFETY: the guard gave index `i`, and `Entered` keeps it alive as long as the references.
                let (cache, sh) = unsafe { self.cache_of(i) };
                let e = Entered { cache, sh, held: Held::Cpu(guard) };
                if self.pacing.flush_due(i) {
                    self.honour_flush(e.cache, e.sh, e.held.guarded());
                }
                e
            }
            (guard, None) => self.enter_shared(guard),
        }
    }

    /// Cache `i` and what other CPUs may read of it, for the holder of a guard of the provider (leaf or
    /// full) that gave index `i`.
    ///
    /// # Safety
    /// The caller holds a guard of `self.provider` that returned index `i` (which makes `i < MAX_CPUS` and the
    /// index exclusive to it: the `CpuProvider` contract), and drops both references before the guard.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)] // The exclusivity comes from the guard, not from `&self`.
    unsafe fn cache_of(&self, i: usize) -> (&mut CpuCache, &CpuShared) {
        debug_assert!(i < MAX_CPUS);
        // SAFETY: `i < MAX_CPUS` (the caller's contract).
        let slot = unsafe { self.caches.get_unchecked(i) };
        // SAFETY: the caller's guard makes slot `i`'s cache exclusive to it while the guard lives.
        (unsafe { &mut *slot.cache.get() }, &slot.shared)
    }

    #[cold]
    fn enter_shared<'a>(&'a self, guard: P::Guard<'a>) -> Entered<'a, P::Guard<'a>> {
        // SAFETY: `guard` is the provider's guard; it goes into `Held::Shared` with the lock, which drops the
        // lock first, so the token is not used after the guard ends.
        let lock = self.shared_lock.lock(unsafe { Guarded::new_unchecked() });
        // SAFETY: the shared cache is only used under `shared_lock`, which `Entered` holds as long as the
        // reference lives.
        let cache = unsafe { &mut *self.shared.cache.get() };
        let e = Entered { cache, sh: &self.shared.shared, held: Held::Shared(lock, guard) };
        if self.pacing.flush_due(MAX_CPUS) {
            self.honour_flush(e.cache, e.sh, e.held.guarded());
        }
        e
    }

    /// Runs `f` on the caller's cache (for the paths where a closure costs nothing), with the token of
    /// the guard held.
    #[inline]
    fn with_cache<R>(&self, f: impl FnOnce(&mut CpuCache, &Tiers<S>, &CpuShared, Guarded<'_>) -> R) -> R {
        let e = self.enter();
        f(e.cache, &self.t, e.sh, e.held.guarded())
    }

    /// Runs `f` inside the CPU provider's guard (interrupts off in a kernel) with its token, for code that
    /// calls the page heap or the central lists directly (see [`Malloc::heap`]), e.g.
    /// `m.with_guard(|g| m.heap().scavenge(g, 1 << 20))`. `f` may allocate from this allocator: its requests
    /// take the shared cache while the guard marks this CPU's cache busy.
    pub fn with_guard<R>(&self, f: impl FnOnce(Guarded<'_>) -> R) -> R {
        let (guard, _) = self.provider.enter();
        // SAFETY: `guard` is the provider's guard and lives until after `f` returns; the token's lifetime is
        // bounded by this call (`f` is generic over it).
        let r = f(unsafe { Guarded::new_unchecked() });
        drop(guard);
        r
    }

    /// Bytes actually usable at an allocation of `layout` (its class size, or its pages). With sampled
    /// guarded allocations on ([`Malloc::set_guarded_sample_rate`]) a sampled object has only
    /// `layout.size()` bytes before its guard page: use this only where they are off.
    pub fn usable_size(&self, layout: Layout) -> usize {
        match self.route(layout.size(), layout.align()) {
            LARGE => npages_for(layout.size()) * PAGE_SIZE,
            GUARDED => layout.size(),
            TINY_CLASS => layout.size(),
            c => sizeclass::CLASSES[c].size as usize,
        }
    }
}
