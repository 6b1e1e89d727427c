//! The allocator (Go's `malloc.go`, `mallocgc`): routes each request to the tiny, small or large path.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! [`Malloc`] owns every tier: the page heap, one [`Central`] per allocation class, one [`CpuCache`] per
//! CPU index plus a shared cache behind a lock, and the [`CpuProvider`] that says which cache the caller may
//! use. It implements [`GlobalAlloc`] and allocator-api2's `Allocator`.
//!
//! # Routing (the same function decides for `alloc`, `dealloc` and `realloc`)
//! - `size < 16 && align <= 8`: tiny path (packed into 16-byte blocks);
//! - `size <= 32 KiB` and some class's size is a multiple of `align` (`align <= 8 KiB`): small path, class
//!   `class_for(size, align)`;
//! - otherwise: large path, whole pages from the page heap, any alignment.
//!
//! # Guards and locks
//! - `caches[i]`: only while holding the provider's guard for index `i` (interrupts off in a kernel);
//! - `shared`: its spin lock (used when the provider gives no index: early boot, out of slots, re-entry);
//! - `centrals[c]`: its own lock (see `central.rs`); the heap: the heap lock (see `heap.rs`).
//!
//! Lock order: shared cache → central(c) → heap. A CPU guard is held across all of them.

use crate::central::{Central, ClassShape, KEEP_EMPTY_SPANS};
use crate::check::{self, Reason};
use crate::cpu::{CpuProvider, MAX_CPUS};
use crate::cpucache::{class_shape, CpuCache, CpuShared, Tiers, NUM_ALLOC_CLASSES, TINY_CLASS, TINY_SIZE};
use crate::heap::Heap;
use crate::sizeclass::{self, NUM_SIZE_CLASSES};
use crate::source::PageSource;
use crate::span::Span;
use crate::stats::{BySize, MemStats, Sample};
use crate::{MAX_SMALL_SIZE, PAGE_SIZE};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ptr::{self, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Cache index of the shared cache (marks the spans it caches).
const SHARED_INDEX: u16 = MAX_CPUS as u16;

/// Where a request goes: [`LARGE`], [`GUARDED`], [`TINY_CLASS`], or a size class.
type Route = usize;
/// Route of large requests.
const LARGE: Route = 0;
/// Route of every request in guard mode ([`DebugFlags::GUARD`]).
const GUARDED: Route = usize::MAX;

bitflags::bitflags! {
    /// Debug knobs (Go's GODEBUG analogues). Fixed when the allocator is built ([`Malloc::with_debug`]):
    /// they change how requests are routed, so they cannot change while objects are live.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct DebugFlags: u32 {
        /// efence-style guard mode: every allocation gets pages of its own and ends right before a guard page
        /// that is decommitted, so an overrun faults at once; frees are checked like large frees. Needs a
        /// page source whose `decommit` makes memory inaccessible (`MmapSource::strict()`, a kernel source
        /// that unmaps); slow and page-hungry, for debugging only.
        const GUARD = 1 << 0;
        /// No tiny path: requests under 16 B take the size classes (to measure what the tiny path saves).
        const NO_TINY = 1 << 1;
    }
}

/// The route of a request of `size` bytes aligned to `align`, with no debug knobs.
#[inline(always)]
fn route(size: usize, align: usize) -> Route {
    if size <= MAX_SMALL_SIZE {
        if size < TINY_SIZE && align <= 8 {
            return TINY_CLASS;
        }
        if let Some(c) = sizeclass::class_for(size, align) {
            return c;
        }
    }
    LARGE
}

/// The route with debug knobs set.
#[cold]
fn route_debug(debug: DebugFlags, size: usize, align: usize) -> Route {
    if debug.contains(DebugFlags::GUARD) {
        return GUARDED;
    }
    if debug.contains(DebugFlags::NO_TINY) && size < TINY_SIZE {
        return sizeclass::class_for(size.max(1), align).unwrap_or(LARGE);
    }
    route(size, align)
}

/// A heap-profile sample (Go's `MemProfile` records, without stacks: a kernel's hook can walk its own).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileSample {
    /// Address of the sampled allocation.
    pub addr: usize,
    /// Requested size in bytes.
    pub size: usize,
    /// Size class (0: large, `NUM_SIZE_CLASSES`: tiny).
    pub class: usize,
    /// Cache index of the allocating CPU.
    pub cpu: u16,
}

/// A heap-profile hook, called outside every allocator lock and guard.
pub type ProfileHook = fn(&ProfileSample);

/// Allocation profile of one bucket (a size class, the tiny class, or large objects): sampled counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProfileBucket {
    /// Sampled allocations.
    pub samples: u64,
    /// Bytes of the sampled allocations.
    pub sampled_bytes: u64,
}

/// Go's default `MemProfileRate`: one sample per 512 KiB allocated on average.
pub const DEFAULT_PROFILE_RATE: usize = 512 << 10;
/// With profiling off, a CPU rechecks the rate after this many bytes.
const PROFILE_RECHECK_BYTES: isize = 64 << 20;

struct Profiler {
    /// Mean bytes between samples; 0 = off.
    rate: AtomicUsize,
    /// `ProfileHook` or null.
    hook: AtomicPtr<()>,
    /// Per route bucket: classes, tiny (`TINY_CLASS`), large (`NUM_ALLOC_CLASSES`).
    samples: [AtomicU64; NUM_ALLOC_CLASSES + 1],
    sampled_bytes: [AtomicU64; NUM_ALLOC_CLASSES + 1],
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
    /// The provider's `departures(i)` when this cache was last flushed as an orphan (`Malloc::flush_orphans`).
    flushed_departures: core::sync::atomic::AtomicU32,
}

impl CacheSlot {
    const fn new(index: u16) -> Self {
        CacheSlot {
            cache: UnsafeCell::new(CpuCache::new()),
            shared: CpuShared::new(index),
            flushed_departures: core::sync::atomic::AtomicU32::new(0),
        }
    }
}

/// What keeps an entered cache exclusive.
enum Held<'a, G> {
    /// The provider's guard for a per-CPU cache.
    Cpu(#[allow(dead_code)] G),
    /// The lock of the shared cache, then the provider's guard (dropped in that order: fields drop in
    /// declaration order, so a kernel re-enables interrupts only after the lock is released).
    Shared(#[allow(dead_code)] spin::MutexGuard<'a, ()>, #[allow(dead_code)] G),
}

/// An entered cache: exclusive to the holder until dropped.
struct Entered<'a, G> {
    cache: &'a mut CpuCache,
    sh: &'a CpuShared,
    _held: Held<'a, G>,
}

// SAFETY: slot `i` is only accessed by the holder of the provider's guard for index `i` (exclusive by the
// `CpuProvider` contract); readers of its counters only touch atomics.
unsafe impl Sync for CacheSlot {}

/// What one call of [`Malloc::background`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackgroundReport {
    /// Deferred frees folded into the calling CPU's cached spans.
    pub nfolded: usize,
    /// Pages of empty spans returned from the central lists to the page heap.
    pub npages_swept: usize,
    /// Bytes the scavenger gave back to the page source.
    pub nbytes_released: usize,
}

/// Per-CPU figures for reports (see [`Malloc::cpu_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSummary {
    /// Objects allocated through this cache (small, tiny objects and large).
    pub mallocs: u64,
    /// Objects freed through this cache.
    pub frees: u64,
    /// Objects this CPU freed into spans cached by another CPU.
    pub remote_frees: u64,
    /// Spans taken from the central lists.
    pub refills: u64,
}

/// goheap's allocator over page source `S`, with per-CPU caches chosen by `P`.
pub struct Malloc<S: PageSource, P: CpuProvider> {
    /// The page heap, the central lists and the report hook.
    t: Tiers<S>,
    caches: [CacheSlot; MAX_CPUS],
    /// The shared cache, used under `shared_lock` by callers the provider gives no index.
    shared: CacheSlot,
    shared_lock: spin::Mutex<()>,
    provider: P,
    /// Debug knobs; immutable once built.
    debug: DebugFlags,
    profiler: Profiler,
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
            shared_lock: spin::Mutex::new(()),
            provider,
            debug: DebugFlags::empty(),
            profiler: Profiler {
                rate: AtomicUsize::new(0),
                hook: AtomicPtr::new(ptr::null_mut()),
                samples: [const { AtomicU64::new(0) }; NUM_ALLOC_CLASSES + 1],
                sampled_bytes: [const { AtomicU64::new(0) }; NUM_ALLOC_CLASSES + 1],
            },
        }
    }

    /// This allocator with debug knobs `flags` (see [`DebugFlags`]).
    pub const fn with_debug(mut self, flags: DebugFlags) -> Self {
        self.debug = flags;
        self
    }

    /// The route of a request, honouring the debug knobs.
    #[inline(always)]
    fn route(&self, size: usize, align: usize) -> Route {
        if self.debug.is_empty() {
            route(size, align)
        } else {
            route_debug(self.debug, size, align)
        }
    }

    /// Sets the heap-profile sampling rate (Go's `MemProfileRate`): on average one sample per `rate` bytes
    /// allocated; 0 turns sampling off. Each CPU picks a change up at its next sample (or within 64 MiB of
    /// allocation when sampling was off), so set it early for an exact rate.
    pub fn set_profile_rate(&self, rate: usize) {
        self.profiler.rate.store(rate, Ordering::Relaxed);
    }

    /// Calls `hook` for every sample (outside every allocator lock and guard; the hook may allocate).
    pub fn set_profile_hook(&self, hook: Option<ProfileHook>) {
        let p = hook.map_or(ptr::null_mut(), |h| h as *mut ());
        self.profiler.hook.store(p, Ordering::Release);
    }

    /// The allocation profile by bucket: index = size class, `NUM_SIZE_CLASSES` = tiny objects,
    /// `NUM_SIZE_CLASSES + 1` = large objects.
    pub fn profile(&self) -> [ProfileBucket; NUM_ALLOC_CLASSES + 1] {
        let mut out = [ProfileBucket::default(); NUM_ALLOC_CLASSES + 1];
        for (i, b) in out.iter_mut().enumerate() {
            b.samples = self.profiler.samples[i].load(Ordering::Relaxed);
            b.sampled_bytes = self.profiler.sampled_bytes[i].load(Ordering::Relaxed);
        }
        out
    }

    /// Counts `size` bytes against the cache's sampling countdown; true when this allocation is sampled.
    #[inline(always)]
    fn count_sample(&self, c: &mut CpuCache, size: usize) -> bool {
        c.next_sample -= size as isize;
        c.next_sample < 0 && self.resample(c)
    }

    /// Draws the next sampling distance; returns whether the allocation that ran out is sampled.
    #[cold]
    fn resample(&self, c: &mut CpuCache) -> bool {
        let rate = self.profiler.rate.load(Ordering::Relaxed);
        if rate == 0 {
            c.next_sample = PROFILE_RECHECK_BYTES;
            return false;
        }
        // Uniform in [0, 2*rate): mean `rate` (Go draws from an exponential distribution; without floating
        // point in a kernel a uniform draw keeps the mean and avoids bias towards any size).
        let mut x = c.sample_rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.sample_rng = x;
        c.next_sample = (x % (2 * rate as u64)) as isize;
        true
    }

    /// Records a sample (outside every guard and lock).
    #[cold]
    fn record_sample(&self, addr: usize, size: usize, r: Route, cpu: u16) {
        let bucket = if r == LARGE || r == GUARDED { NUM_ALLOC_CLASSES } else { r };
        self.profiler.samples[bucket].fetch_add(1, Ordering::Relaxed);
        self.profiler.sampled_bytes[bucket].fetch_add(size as u64, Ordering::Relaxed);
        let h = self.profiler.hook.load(Ordering::Acquire);
        if !h.is_null() {
            // SAFETY: `hook` only holds null or a `ProfileHook` stored by `set_profile_hook`.
            let hook: ProfileHook = unsafe { core::mem::transmute::<*mut (), ProfileHook>(h) };
            let class = if bucket == NUM_ALLOC_CLASSES { 0 } else { bucket };
            hook(&ProfileSample { addr, size, class, cpu });
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
    fn enter(&self) -> Entered<'_, P::Guard> {
        match self.provider.enter() {
            (guard, Some(i)) => {
                debug_assert!(i < MAX_CPUS);
                // SAFETY: the guard makes index `i` exclusive to us until it drops (CpuProvider contract),
                // and `Entered` keeps the guard alive as long as the reference; `i < MAX_CPUS` by the same
                // contract.
                let slot = unsafe { self.caches.get_unchecked(i) };
                // SAFETY: as above: the guard gives us slot `i`'s cache exclusively.
                let cache = unsafe { &mut *slot.cache.get() };
                Entered { cache, sh: &slot.shared, _held: Held::Cpu(guard) }
            }
            (guard, None) => self.enter_shared(guard),
        }
    }

    #[cold]
    fn enter_shared(&self, guard: P::Guard) -> Entered<'_, P::Guard> {
        let lock = self.shared_lock.lock();
        // SAFETY: the shared cache is only used under `shared_lock`, which `Entered` holds as long as the
        // reference lives.
        let cache = unsafe { &mut *self.shared.cache.get() };
        Entered { cache, sh: &self.shared.shared, _held: Held::Shared(lock, guard) }
    }

    /// Runs `f` on the caller's cache (for the paths where a closure costs nothing).
    #[inline]
    fn with_cache<R>(&self, f: impl FnOnce(&mut CpuCache, &Tiers<S>, &CpuShared) -> R) -> R {
        let e = self.enter();
        f(e.cache, &self.t, e.sh)
    }

    /// Allocates memory for `layout`; null when out of memory. `layout.size()` may be 0 (then 1 byte is used).
    #[inline]
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl::<false>(layout)
    }

    /// As [`Malloc::alloc`], with the memory zeroed (skipping memory known to be zero already).
    #[inline]
    pub fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.alloc_impl::<true>(layout)
    }

    /// Whether a request of `size` bytes aligned to `align` may take the fast paths: a size class (not tiny,
    /// not large) at the natural alignment, no debug knob.
    #[inline(always)]
    fn fast_eligible(&self, size: usize, align: usize) -> bool {
        self.debug.is_empty()
            && size.wrapping_sub(TINY_SIZE) <= MAX_SMALL_SIZE - TINY_SIZE
            && align <= sizeclass::MIN_ALIGN
    }

    /// The fast path (kept small so that it inlines into callers without spilling): this CPU's stock or
    /// cached span, else the general path. A leaf section: it calls nothing while it holds the cache, so it
    /// needs no callee-saved registers and the provider need not mark the cache busy. An allocation that
    /// would end the sampling countdown goes to the general path, which draws the sample.
    #[inline(always)]
    fn alloc_impl<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        if self.fast_eligible(size, align) {
            let c = sizeclass::class_of(size);
            let (guard, idx) = self.provider.enter_leaf();
            if let Some(i) = idx {
                debug_assert!(i < MAX_CPUS);
                // SAFETY: the guard makes index `i < MAX_CPUS` exclusive to us while it lives (CpuProvider
                // contract); the reference does not outlive it, and nothing below calls out (leaf section).
                let slot = unsafe { self.caches.get_unchecked(i) };
                // SAFETY: as above.
                let cache = unsafe { &mut *slot.cache.get() };
                let left = cache.next_sample - size as isize;
                if left >= 0 {
                    // SAFETY: `class_of` returns a size class, below `NUM_ALLOC_CLASSES`.
                    if let Some(p) = unsafe { cache.alloc_fast::<ZERO>(c, &slot.shared) } {
                        cache.next_sample = left;
                        drop(guard);
                        #[cfg(feature = "checks")]
                        mark_live(&self.t.heap, p);
                        return p;
                    }
                }
            }
            drop(guard);
        }
        self.alloc_general::<ZERO>(layout)
    }

    /// Every allocation the fast path does not finish.
    #[inline(never)]
    fn alloc_general<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let r = self.route(size, align);
        if r == LARGE || r == GUARDED {
            return self.alloc_large(size, align, ZERO, r == GUARDED);
        }
        let e = self.enter();
        let t = &self.t;
        let p = if r == TINY_CLASS {
            let p = e.cache.alloc_tiny(t, size.max(1), align, e.sh);
            if ZERO && !p.is_null() {
                // SAFETY: `p` is a fresh allocation of `size` bytes.
                unsafe { ptr::write_bytes(p, 0, size) };
            }
            p
        } else {
            // SAFETY: `route` returns size classes below `NUM_SIZE_CLASSES` (or the tiny class, handled above).
            unsafe { e.cache.alloc::<S, ZERO>(t, r, e.sh) }
        };
        let sampled = self.count_sample(e.cache, size);
        let me = e.sh.index;
        drop(e);
        #[cfg(feature = "checks")]
        if !p.is_null() && r != TINY_CLASS {
            mark_live(&self.t.heap, p);
        }
        if sampled && !p.is_null() {
            self.record_sample(p as usize, size, r, me);
        }
        p
    }

    /// The large path (and guard mode): a span of whole pages for one object.
    #[cold]
    fn alloc_large(&self, size: usize, align: usize, zero: bool, guarded: bool) -> *mut u8 {
        // Guard mode: the object ends right before a guard page, so the body must leave room to align it.
        let npages = if guarded { npages_for(size + align - 1) + 1 } else { npages_for(size) };
        let e = self.enter();
        let s = if zero && !guarded && align <= PAGE_SIZE && size >= FRESH_ZERO_MIN_BYTES {
            // Fresh zero pages rather than clearing dirty ones (see `Heap::alloc_span_fresh_zero`).
            self.t.heap.alloc_span_fresh_zero(npages).or_else(|| self.t.heap.alloc_span(None, npages, 0))
        } else if align <= PAGE_SIZE || guarded {
            self.t.heap.alloc_span(Some(&mut e.cache.pcache), npages, 0)
        } else {
            self.t.heap.alloc_span_aligned(npages, align)
        };
        let Some(s) = s else { return ptr::null_mut() };
        let s = s.as_ptr();
        // SAFETY: a fresh large span is ours alone.
        let p = unsafe {
            Span::init_large(s);
            let base = (*s).base;
            let p = if guarded {
                let guard = base + (npages - 1) * PAGE_SIZE;
                // SAFETY: the guard page is committed, ours, and unused; it is committed again before the
                // span goes back to the heap (`free_large`).
                self.t.heap.source().decommit(NonNull::new_unchecked(guard as *mut u8), PAGE_SIZE);
                ((guard - size) & !(align - 1)) as *mut u8
            } else {
                base as *mut u8
            };
            e.sh.stats.large_nmalloc.bump();
            e.sh.stats.large_bytes_alloc.add((npages * PAGE_SIZE) as u64);
            if zero && (*s).needzero {
                ptr::write_bytes(p, 0, size);
            }
            p
        };
        let sampled = self.count_sample(e.cache, size);
        let me = e.sh.index;
        drop(e);
        if sampled {
            self.record_sample(p as usize, size, LARGE, me);
        }
        p
    }

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
    unsafe fn dealloc_general(&self, ptr: *mut u8, layout: Layout, checked: bool) {
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
        if r == TINY_CLASS {
            // SAFETY: forwarded contract: a tiny-path object.
            unsafe { e.cache.free_tiny(&self.t, ptr, e.sh) }
        } else {
            // SAFETY: forwarded contract: an object of class `r`.
            unsafe { e.cache.free(&self.t, r, ptr, e.sh) }
        }
    }

    /// With `checks`: validates a small or tiny free before it touches any state.
    #[cfg(feature = "checks")]
    fn check_small_free(&self, ptr: *mut u8, layout: Layout, r: Route) {
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
    unsafe fn free_large(&self, ptr: *mut u8, layout: Layout, guarded: bool) {
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
        if guarded {
            let guard = base + (npages - 1) * PAGE_SIZE;
            if addr != (guard - layout.size()) & !(layout.align() - 1) {
                self.report(addr, Reason::Interior);
            }
            // SAFETY: the guard page was decommitted by `alloc_large`; the span is the caller's.
            let ok = unsafe { self.t.heap.source().commit(NonNull::new_unchecked(guard as *mut u8), PAGE_SIZE) };
            if !ok {
                // The heap believes every page of the span committed: without the guard page back, the span
                // cannot be reused. Keep it (leaked) rather than hand out an inaccessible page later.
                return;
            }
        } else if base != addr {
            self.report(addr, Reason::Interior);
        }
        self.with_cache(|c, t, sh| {
            sh.stats.large_nfree.bump();
            sh.stats.large_bytes_free.add((npages * PAGE_SIZE) as u64);
            // SAFETY: the caller gives the object up; the span holds nothing else.
            unsafe { t.heap.free_span(Some(&mut c.pcache), s) };
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
            // SAFETY: the span is this large object's; the caller owns it.
            if unsafe { self.t.heap.resize_span_in_place(s, new_npages) } {
                self.with_cache(|_, _, sh| {
                    sh.stats.large_bytes_free.add((old_npages * PAGE_SIZE) as u64);
                    sh.stats.large_bytes_alloc.add((new_npages * PAGE_SIZE) as u64);
                });
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

    /// Bytes actually usable at an allocation of `layout` (its class size, or its pages).
    pub fn usable_size(&self, layout: Layout) -> usize {
        match self.route(layout.size(), layout.align()) {
            LARGE => npages_for(layout.size()) * PAGE_SIZE,
            GUARDED => layout.size(),
            TINY_CLASS => layout.size(),
            c => sizeclass::CLASSES[c].size as usize,
        }
    }

    /// One step of background work, for a kernel's timer or idle loop or a host thread: folds deferred frees
    /// into the calling CPU's cached spans, returns up to `max_spans` empty spans per class from the central
    /// lists to the page heap, and lets the scavenger give back up to `scavenge_budget_bytes`.
    pub fn background(&self, max_spans: usize, scavenge_budget_bytes: usize) -> BackgroundReport {
        let mut rep = BackgroundReport::default();
        self.flush_orphans(ORPHANS_PER_BACKGROUND);
        self.with_cache(|c, t, sh| {
            rep.nfolded = c.sweep_cached(t, sh);
            for central in t.centrals.iter().skip(1) {
                rep.npages_swept += central.sweep(&t.heap, Some(&mut c.pcache), KEEP_EMPTY_SPANS, max_spans);
            }
        });
        rep.nbytes_released = self.t.heap.scavenge(scavenge_budget_bytes);
        rep
    }

    /// The calling CPU's current stock bound for allocation class `class` (objects it may keep freed before
    /// flushing to the central list): the base bound, or more after the class's stock kept overflowing
    /// (see `cpucache.rs`). For diagnostics and tests; 0 for class 0 and out-of-range classes.
    pub fn stock_bound(&self, class: usize) -> u32 {
        if class == 0 || class >= NUM_ALLOC_CLASSES {
            return 0;
        }
        self.with_cache(|c, _, _| c.stock_bound(class))
    }

    /// Gives everything the calling CPU's cache holds back to the central lists and the page heap. A kernel
    /// calls it on every CPU before [`Malloc::release_all`] (other CPUs' caches are theirs alone).
    pub fn flush_cpu_cache(&self) {
        self.with_cache(|c, t, sh| c.flush_all(t, sh));
    }

    /// Go's `debug.FreeOSMemory`: flushes the calling CPU's cache, the caches that departed holders left
    /// (host threads that exited, see `cpu.rs`) and the shared one, returns every empty
    /// span to the page heap and every free page to the page source. Returns the bytes released.
    pub fn release_all(&self) -> usize {
        self.flush_cpu_cache();
        self.flush_orphans(usize::MAX);
        {
            let _lock = self.shared_lock.lock();
            // SAFETY: the shared cache is only used under `shared_lock`, which we hold.
            let shared = unsafe { &mut *self.shared.cache.get() };
            shared.flush_all(&self.t, &self.shared.shared);
        }
        for central in self.t.centrals.iter().skip(1) {
            central.sweep(&self.t.heap, None, 0, usize::MAX);
        }
        self.t.heap.release_all()
    }

    /// Sets the soft memory limit (GOMEMLIMIT); `usize::MAX` removes it. See `scavenger.rs`.
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.t.heap.set_memory_limit(nbytes)
    }

    /// Per-CPU figures of cache index `index` (`MAX_CPUS` for the shared cache).
    pub fn cpu_stats(&self, index: usize) -> CpuSummary {
        let stats = self.stats_of(index);
        let mut s = CpuSummary::default();
        for c in 1..NUM_ALLOC_CLASSES {
            if c != TINY_CLASS {
                s.mallocs += stats.nmalloc[c].get();
                s.frees += stats.nfree[c].get();
            }
        }
        s.mallocs += stats.tiny_nmalloc.get() + stats.large_nmalloc.get();
        s.frees += stats.tiny_nfree.get() + stats.large_nfree.get();
        s.remote_frees = stats.remote_frees.get();
        s.refills = stats.refills.get();
        s
    }

    /// The counters of cache `index` (`MAX_CPUS`: the shared cache).
    fn stats_of(&self, index: usize) -> &crate::cpucache::CpuStats {
        let slot = if index == MAX_CPUS { &self.shared } else { &self.caches[index] };
        &slot.shared.stats
    }

    /// A [`MemStats`] snapshot, read without stopping other CPUs (see `stats.rs` for its consistency).
    pub fn mem_stats(&self) -> MemStats {
        let mut m = MemStats::default();
        let mut nmalloc = [0u64; NUM_ALLOC_CLASSES];
        let mut nfree = [0u64; NUM_ALLOC_CLASSES];
        let mut large_bytes_alloc = 0u64;
        let mut large_bytes_free = 0u64;
        let mut used_caches = 0u64;
        for st in (0..=MAX_CPUS).map(|i| self.stats_of(i)) {
            for c in 1..NUM_ALLOC_CLASSES {
                nmalloc[c] += st.nmalloc[c].get();
                nfree[c] += st.nfree[c].get();
            }
            m.tiny_allocs += st.tiny_nmalloc.get();
            m.frees += st.tiny_nfree.get();
            m.large_allocs += st.large_nmalloc.get();
            m.large_frees += st.large_nfree.get();
            large_bytes_alloc += st.large_bytes_alloc.get();
            large_bytes_free += st.large_bytes_free.get();
            m.remote_frees += st.remote_frees.get();
            used_caches += st.used.get();
        }
        for c in 1..NUM_ALLOC_CLASSES {
            let size = class_shape(c).elemsize as u64;
            m.total_alloc += nmalloc[c] * size;
            m.heap_alloc += nmalloc[c].saturating_sub(nfree[c]) * size;
            if c < NUM_SIZE_CLASSES {
                m.mallocs += nmalloc[c];
                m.frees += nfree[c];
                m.by_size[c] = BySize { size: size as u32, mallocs: nmalloc[c], frees: nfree[c] };
            }
        }
        m.mallocs += m.tiny_allocs + m.large_allocs;
        m.frees += m.large_frees;
        m.total_alloc += large_bytes_alloc;
        m.heap_alloc += large_bytes_alloc.saturating_sub(large_bytes_free);
        m.alloc = m.heap_alloc;
        m.heap_objects = m.mallocs.saturating_sub(m.frees);

        let h = self.t.heap.stats();
        m.heap_inuse = h.inuse_bytes as u64;
        m.heap_idle = (h.free_bytes + h.released_bytes) as u64;
        m.heap_released = h.released_bytes as u64;
        m.heap_sys = m.heap_inuse + m.heap_idle;
        m.mspan_inuse = h.span_inuse_bytes as u64;
        m.mspan_sys = h.span_sys_bytes as u64;
        let cache_bytes = core::mem::size_of::<CpuCache>() as u64;
        m.mcache_sys = cache_bytes * (MAX_CPUS as u64 + 1);
        m.mcache_inuse = cache_bytes * used_caches;
        m.other_sys = h.metadata_bytes as u64;
        m.sys = m.heap_sys - m.heap_released + m.mspan_sys + m.mcache_sys + m.other_sys;
        m.memory_limit = self.t.heap.memory_limit() as u64;
        m
    }

    /// Fills `samples` by name, as Go's `metrics.Read` (see [`crate::stats::ALL_METRICS`]); unknown names get
    /// `None`.
    pub fn read_metrics(&self, samples: &mut [Sample]) {
        let m = self.mem_stats();
        let h = self.t.heap.stats();
        for s in samples.iter_mut() {
            s.value = Some(match s.name {
                "/memory/classes/total:bytes" => m.sys,
                "/memory/classes/heap/objects:bytes" => m.heap_alloc,
                "/memory/classes/heap/unused:bytes" => m.heap_inuse.saturating_sub(m.heap_alloc),
                "/memory/classes/heap/free:bytes" => m.heap_idle - m.heap_released,
                "/memory/classes/heap/released:bytes" => m.heap_released,
                "/memory/classes/metadata/mspan/inuse:bytes" => m.mspan_inuse,
                "/memory/classes/metadata/mspan/free:bytes" => m.mspan_sys - m.mspan_inuse,
                "/memory/classes/metadata/mcache/inuse:bytes" => m.mcache_inuse,
                "/memory/classes/metadata/mcache/free:bytes" => m.mcache_sys - m.mcache_inuse,
                "/memory/classes/metadata/other:bytes" => m.other_sys,
                "/gc/heap/allocs:bytes" => m.total_alloc,
                "/gc/heap/allocs:objects" => m.mallocs,
                "/gc/heap/frees:bytes" => m.total_alloc - m.heap_alloc,
                "/gc/heap/frees:objects" => m.frees,
                "/gc/heap/objects:objects" => m.heap_objects,
                "/gc/heap/tiny/allocs:objects" => m.tiny_allocs,
                "/gc/gomemlimit:bytes" => m.memory_limit,
                "/gc/scavenge/released:bytes" => h.scavenged_total_bytes as u64,
                "/goheap/remote-frees:objects" => m.remote_frees,
                _ => {
                    s.value = None;
                    continue;
                }
            });
        }
    }

    /// Whole-allocator consistency walk (feature `validate`): the page heap, every central list.
    #[cfg(feature = "validate")]
    pub fn validate(&self) {
        self.t.heap.validate();
        for central in self.t.centrals.iter().skip(1) {
            central.validate();
        }
    }
}

/// With `checks`: marks a freshly allocated small object live.
#[cfg(feature = "checks")]
#[inline]
fn mark_live<S: PageSource>(heap: &Heap<S>, p: *mut u8) {
    if let Some(s) = heap.span_of(p as usize) {
        let s = s.as_ptr();
        // SAFETY: live span; `live_bits` are atomics.
        unsafe {
            let (idx, _) = Span::object_index(s, p as usize);
            let prev = (*s).live_bits[idx / 64].fetch_or(1 << (idx % 64), Ordering::AcqRel);
            debug_assert_eq!(prev & (1 << (idx % 64)), 0, "goheap: handed out a live object {p:p}");
        }
    }
}

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

/// `alloc_zeroed` of at least this many bytes takes fresh zero pages from the source (decommitting dirty
/// ones) instead of clearing them by hand, where the source zero-fills (see `Heap::alloc_span_fresh_zero`):
/// giving the pages back and faulting in zero pages on first touch costs about what clearing them does, and
/// pages the caller never touches cost nothing (`cargo run --release --features std --example
/// zeroed_large` measures it).
const FRESH_ZERO_MIN_BYTES: usize = 4 << 20;

/// Orphaned caches one [`Malloc::background`] call flushes at most.
const ORPHANS_PER_BACKGROUND: usize = 4;

/// Orphaned caches (see `cpu.rs`: caches a departed holder left) and `fork()` support.
impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Flushes up to `max` orphaned caches: those whose index the provider reports more departures for than
    /// when this allocator last flushed them, and that nobody holds now. Each is adopted first (so it is
    /// ours alone, as under a guard), flushed to the central lists and the heap, and released. Returns the
    /// caches flushed.
    fn flush_orphans(&self, max: usize) -> usize {
        // The caller's own section: a kernel's guard keeps interrupts off while we take locks; on a host it
        // turns an allocation from inside (a logger) into a shared-cache one.
        let (_guard, _) = self.provider.enter();
        let mut n = 0;
        for (i, slot) in self.caches.iter().enumerate() {
            if n == max {
                break;
            }
            if self.provider.departures(i) == slot.flushed_departures.load(Ordering::Relaxed) || !self.provider.adopt(i)
            {
                continue;
            }
            // Stable while we hold the adoption: only a holder's exit changes it.
            let departures = self.provider.departures(i);
            {
                // SAFETY: the adoption makes index `i` ours alone until `release_adopted` (CpuProvider
                // contract); the reference ends before that.
                let cache = unsafe { &mut *slot.cache.get() };
                cache.flush_all(&self.t, &slot.shared);
            }
            slot.flushed_departures.store(departures, Ordering::Relaxed);
            // SAFETY: adopted above, not released since; the cache is no longer used.
            unsafe { self.provider.release_adopted(i) };
            n += 1;
        }
        n
    }

    /// Takes every lock of this allocator in lock order (the shared cache's, each central list's, then the
    /// heap's) and keeps them until [`Malloc::unlock_all_after_fork`]: `fork()`'s prepare step (see
    /// `hosted.rs`), so the child never inherits a lock another thread held. Nothing may allocate from this
    /// allocator on this thread until then.
    #[cfg(feature = "std")]
    pub(crate) fn lock_all_for_fork(&self) {
        core::mem::forget(self.shared_lock.lock());
        for central in self.t.centrals.iter() {
            central.lock_for_fork();
        }
        core::mem::forget(self.t.heap.inner.lock());
    }

    /// Releases what [`Malloc::lock_all_for_fork`] took (in the parent after `fork()`, and in the child).
    ///
    /// # Safety
    /// This thread (or, in a `fork()` child, the thread that forked) called `lock_all_for_fork` and has not
    /// unlocked since: every lock is held, by it.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all_after_fork(&self) {
        // SAFETY: `lock_all_for_fork` forgot a guard of each lock; we release each once.
        unsafe {
            self.t.heap.inner.force_unlock();
            for central in self.t.centrals.iter().rev() {
                central.unlock_after_fork();
            }
            self.shared_lock.force_unlock();
        }
    }
}
