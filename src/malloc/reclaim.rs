//! Reclaim before failing, the memory limit's reclaim, and the pacing of the background step.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! Slices: [`Malloc::limit_reclaim_sliced`] (after an allocation, outside its section; from
//! `set_memory_limit` and the background step) flushes the caches in one guarded section, then sweeps and
//! releases in sections of a slice each (see `maintenance.rs` and `page/heap/slice.rs`). The reclaim
//! before failing ([`Malloc::reclaim_sliced`], out of memory) leaves the allocation's section, reclaims in
//! sections of a slice each, and enters again for the retry.
//!
//! # Reclaim (Go's `mheap.alloc` reclaims before it fails)
//! When the page heap says no to a span (page allocator full, arena bound reached, source out of memory:
//! for a refill, a page-cache refill, heap growth or a large object), the allocation path calls
//! [`Malloc::reclaim_sliced`] and retries once before returning null. Reclaim, with no goheap lock held:
//! 1. asks every other cache to flush: `flush_epoch` is bumped, and each cache compares it with the epoch
//!    it last flushed at whenever its owner next enters the general path (`Malloc::enter`: two relaxed
//!    loads), and if they differ flushes everything it holds, a slice per entry (`Malloc::honour_flush`;
//!    the next `background` call finishes it at once, in sections of a slice). Other CPUs' caches are
//!    theirs alone (no lock guards them), so this request is the only safe way to reach them; a *later*
//!    retry then succeeds;
//! 2. flushes the caller's own cache: its stocks and tiny block go to the central lists, its spans back to
//!    their central lists, its page cache to the page heap;
//! 3. flushes the shared cache if its lock is free (`try_lock`: the caller may be its holder's interrupt);
//! 4. returns every empty span of every central list to the page heap (no [`KEEP_EMPTY_SPANS`] floor).
//!
//! The retry's commit path then releases free committed pages where the source needs room
//! (`commit_range_locked`). Lock order (shared cache → central → heap) holds: each step takes its locks
//! one at a time.
//!
//! # The memory limit's reclaim
//! After an allocation on the general path that leaves the total above the soft limit, and in the
//! background step, the same reclaim runs and then the heap releases free pages down to the limit's goal
//! (`Heap::release_for_limit`). On the allocation path it is paced by allocation volume: after a reclaim that
//! left the total above the limit (the live heap is above it), the next one waits for twice as much
//! allocation, up to `LIMIT_BACKOFF_MAX` times [`limit_reclaim_base_npages`]; one that meets the limit resets
//! the interval. So a live heap above the limit does not decommit and recommit on every allocation (the
//! limit is soft), and one below it is brought under it soon after.
//!
//! # Background pacing
//! Each cache slot counts its own `background` calls per scavenger epoch and ends the epoch after
//! [`CALLS_PER_EPOCH`] of them (`Tick::Cpu`), so the peak window lasts as many calls of the fastest caller
//! whatever the number of CPUs; allocation volume (and a clock, if set) ends epochs too (see
//! `scavenger.rs`). A call is *idle* when no span was allocated since the same slot's previous call: an
//! idle call sweeps all empty spans (no floor, up to `IDLE_BUDGET_FACTOR` times the scavenge budget in
//! pages), scavenges up to that much too, and flushes the caller's page cache while the heap is above its
//! goal, so a kernel's idle loop at 100 Hz returns a freed burst within about a second.

use super::*;
use crate::object::cpucache::FLUSH_STEPS;
use crate::page::heap::scavenger::{Tick, CALLS_PER_EPOCH};

/// Flush steps (the tiny block, one class each, the page cache: `CpuCache::flush_step`) per guarded section
/// of a sliced cache flush (and classes per section of the background fold): a class's step returns its
/// stock (up to a few hundred objects) to the central list and its cached span. Two per section measured
/// up to 21 878 instructions in the demo kernel (`set_memory_limit`'s flush, `-icount`): one per section
/// stays under the bound of `page/heap/slice.rs`.
pub const FLUSH_SLICE_STEPS: usize = 1;

/// An idle background call may sweep and scavenge this many times its budget.
pub const IDLE_BUDGET_FACTOR: usize = 8;
/// Smallest allocation volume between two memory-limit reclaims on the allocation path: 2 MiB in pages.
const LIMIT_RECLAIM_MIN_NPAGES: usize = (2 << 20) / PAGE_SIZE;
/// The interval between memory-limit reclaims grows to at most this many times its base.
const LIMIT_BACKOFF_MAX: usize = 64;

/// Base allocation volume (pages) between memory-limit reclaims on the allocation path for limit `limit`:
/// `max(limit / 8, 2 MiB)`.
pub fn limit_reclaim_base_npages(limit: usize) -> usize {
    (limit / 8 / PAGE_SIZE).max(LIMIT_RECLAIM_MIN_NPAGES)
}

/// What a background step does after its pacing section (see [`Malloc::background_pacing`]).
pub(super) struct BackgroundPlan {
    /// Whether the total was above the memory limit (the step then reclaims for it: at once when idle,
    /// else at the allocation path's pace), and whether the call is idle.
    pub(super) over_limit: bool,
    pub(super) idle: bool,
    /// Empty spans each class keeps, the most each returns, and the most pages all return together.
    pub(super) keep: usize,
    pub(super) max_spans: usize,
    pub(super) pages_left: usize,
    /// Whether the calling CPU's page cache goes back to the heap (an idle step, if above the goal).
    pub(super) flush_page_cache: bool,
    /// The scavenger's pacing tick and byte budget.
    pub(super) tick: Tick,
    pub(super) budget: usize,
}

/// One cache slot's pacing state; written only by the slot's owner (plain relaxed stores).
#[repr(align(64))]
struct CpuPacing {
    /// The flush epoch this cache last flushed at.
    flush_seen: AtomicUsize,
    /// A requested flush in progress (see [`Malloc::honour_flush`]): its next step (0: none in progress)
    /// and the flush epoch it started at.
    flush_next: AtomicUsize,
    flush_started: AtomicUsize,
    /// The scavenger epoch the slot's background calls are counted in, and their number.
    bg_epoch: AtomicUsize,
    bg_calls: AtomicUsize,
    /// The heap's allocation volume at the slot's previous background call.
    bg_volume: AtomicUsize,
}

/// Reclaim requests and pacing state of one allocator.
pub(super) struct Pacing {
    /// Bumped by every reclaim: caches that have not flushed since do so at their next general entry.
    flush_epoch: AtomicUsize,
    /// Per cache slot; index `MAX_CPUS` is the shared cache.
    cpus: [CpuPacing; MAX_CPUS + 1],
    /// Allocation volume (pages) below which the allocation path does not reclaim for the limit again,
    /// and the current interval.
    limit_next_npages: AtomicUsize,
    limit_every_npages: AtomicUsize,
}

impl Pacing {
    pub(super) const fn new() -> Self {
        Pacing {
            flush_epoch: AtomicUsize::new(0),
            cpus: [const {
                CpuPacing {
                    flush_seen: AtomicUsize::new(0),
                    flush_next: AtomicUsize::new(0),
                    flush_started: AtomicUsize::new(0),
                    bg_epoch: AtomicUsize::new(0),
                    bg_calls: AtomicUsize::new(0),
                    bg_volume: AtomicUsize::new(0),
                }
            }; MAX_CPUS + 1],
            limit_next_npages: AtomicUsize::new(0),
            limit_every_npages: AtomicUsize::new(0),
        }
    }

    /// Whether cache `index` has a flush request pending (two relaxed loads).
    #[inline(always)]
    pub(super) fn flush_due(&self, index: usize) -> bool {
        let seen = self.cpus.get(index).map_or(0, |c| c.flush_seen.load(Ordering::Relaxed));
        self.flush_epoch.load(Ordering::Relaxed) != seen
    }

    fn cpu(&self, index: u16) -> &CpuPacing {
        &self.cpus[(index as usize).min(MAX_CPUS)]
    }

    /// Cache `index` has flushed everything it held at flush epoch `e` (a requested flush in progress is
    /// superseded).
    fn flushed_at(&self, index: u16, e: usize) {
        let p = self.cpu(index);
        p.flush_next.store(0, Ordering::Relaxed);
        p.flush_seen.store(e, Ordering::Relaxed);
    }
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Honours a flush request (see the module docs), a slice per call: the entered cache `cache` runs the
    /// next [`FLUSH_SLICE_STEPS`] steps of its flush (`CpuCache::flush_step`; a class's step returns at most
    /// `FLUSH_SLICE_OBJS` objects and is run again while its stock holds more), so a request costs each of
    /// the cache's next general-path entries a slice of interrupts-off time instead of costing one entry
    /// the whole flush (thousands of objects for grown stocks). The request counts as honoured when the last
    /// step is done: `flush_seen` becomes the epoch the flush started at, so a request made meanwhile asks
    /// for another. Maintenance calls finish a flush in progress at once ([`Malloc::finish_requested_flush`]).
    #[cold]
    #[inline(never)]
    pub(super) fn honour_flush(&self, cache: &mut CpuCache, sh: &CpuShared, g: Guarded<'_>) {
        let p = self.pacing.cpu(sh.index);
        let mut i = p.flush_next.load(Ordering::Relaxed);
        if i == 0 {
            p.flush_started.store(self.pacing.flush_epoch.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        let end = (i + FLUSH_SLICE_STEPS).min(FLUSH_STEPS);
        while i < end && cache.flush_step(&self.t, i, sh, g) {
            i += 1;
        }
        if i == FLUSH_STEPS {
            self.pacing.flushed_at(sh.index, p.flush_started.load(Ordering::Relaxed));
        } else {
            p.flush_next.store(i, Ordering::Relaxed);
        }
    }

    /// Completes a flush requested of the caller's cache, a slice per guarded section (each entry runs one,
    /// see [`Malloc::honour_flush`]). Bounded, so requests that keep coming cannot hold the caller here.
    pub(super) fn finish_requested_flush(&self) {
        for _ in 0..1 << 16 {
            if !self.with_cache(|_, _, sh, _| self.pacing.flush_due(sh.index as usize)) {
                break;
            }
        }
    }

    /// Reclaim before failing (see the module docs), with no guard held by the caller: flushes the caller's
    /// cache, asks the other caches to flush and flushes the shared one if it is free
    /// ([`Malloc::reclaim_caches_sliced`]), then returns every empty span to the page heap, each part in
    /// guarded sections of a slice (see `page/heap/slice.rs`).
    #[cold]
    #[inline(never)]
    pub(super) fn reclaim_sliced(&self) {
        self.reclaim_caches_sliced();
        self.sweep_sliced(0, usize::MAX, usize::MAX);
    }

    /// Steps 1–3 of the reclaim (the caches; not the central lists' empty spans), with no guard held by
    /// the caller, in guarded sections of
    /// [`FLUSH_SLICE_STEPS`] flush steps each (see `CpuCache::flush_step`), then the shared cache's flush
    /// in one (it is rarely used in a kernel: only without a CPU index).
    pub(super) fn reclaim_caches_sliced(&self) {
        // The caller's cache first, then the request to the others: a request made first would make the
        // first section's entry flush the whole cache at once (`Malloc::enter` honours pending requests).
        self.flush_cache_sliced();
        self.with_cache(|_, t, sh, g| {
            let e = self.pacing.flush_epoch.fetch_add(1, Ordering::Relaxed).wrapping_add(1);
            self.pacing.flushed_at(sh.index, e);
            if sh.index != SHARED_INDEX {
                if let Some(_lock) = self.shared_lock.try_lock(g) {
                    // SAFETY: the shared cache is only used under `shared_lock`, which we hold.
                    let shared = unsafe { &mut *self.shared.cache.get() };
                    shared.flush_all(t, &self.shared.shared, g);
                    self.pacing.flushed_at(SHARED_INDEX, e);
                }
            }
        });
    }

    /// Flushes the caller's cache as `CpuCache::flush_all` does, [`FLUSH_SLICE_STEPS`] steps per guarded
    /// section (each section enters the caller's cache again; a step leaves the cache consistent).
    pub(super) fn flush_cache_sliced(&self) {
        let mut i = 0;
        while i < FLUSH_STEPS {
            let end = (i + FLUSH_SLICE_STEPS).min(FLUSH_STEPS);
            // A step that returns false (a class with more than a slice of objects) ends the section and
            // runs again in the next.
            i = self.with_cache(|c, t, sh, g| {
                for k in i..end {
                    if !c.flush_step(t, k, sh, g) {
                        return k;
                    }
                }
                end
            });
        }
    }

    /// After an allocation, outside its guarded section: the memory limit's reclaim if the total is above
    /// the limit (a few atomic loads otherwise).
    #[inline]
    pub(super) fn after_alloc_limit(&self) {
        if self.t.heap.over_limit() {
            self.limit_reclaim_sliced(false);
        }
    }

    /// The memory limit's reclaim (see the module docs), with no guard held by the caller: unless `forced`,
    /// only once the allocation volume since the last one reaches the current interval. The caches in one
    /// guarded section, then the central lists' empty spans and the release of free pages in sections of a
    /// slice each (see `page/heap/slice.rs`). Returns bytes released.
    #[cold]
    #[inline(never)]
    pub(super) fn limit_reclaim_sliced(&self, forced: bool) -> usize {
        let heap = &self.t.heap;
        let volume = heap.alloc_volume_npages();
        if !forced && volume < self.pacing.limit_next_npages.load(Ordering::Relaxed) {
            return 0;
        }
        self.reclaim_caches_sliced();
        self.sweep_sliced(0, usize::MAX, usize::MAX);
        let released = heap.release_for_limit(crate::page::heap::slice::ProviderSections(&self.provider));
        self.limit_reclaim_paced(volume);
        released
    }

    /// Sets the interval to the next memory-limit reclaim after one at allocation volume `volume`.
    fn limit_reclaim_paced(&self, volume: usize) {
        let heap = &self.t.heap;
        let base = limit_reclaim_base_npages(heap.memory_limit());
        let every = if heap.over_limit() {
            let cur = self.pacing.limit_every_npages.load(Ordering::Relaxed).max(base);
            cur.saturating_mul(2).min(base.saturating_mul(LIMIT_BACKOFF_MAX))
        } else {
            base
        };
        self.pacing.limit_every_npages.store(every, Ordering::Relaxed);
        self.pacing.limit_next_npages.store(volume.saturating_add(every), Ordering::Relaxed);
    }

    /// The pacing and limit part of [`Malloc::background`] on the entered cache; returns the plan for the
    /// rest of the step (sweep bounds, page-cache flush, the scavenger's tick and budget), which the step
    /// carries out in sections of its own.
    pub(super) fn background_pacing(&self, sh: &CpuShared, max_spans: usize, budget_bytes: usize) -> BackgroundPlan {
        let heap = &self.t.heap;
        let cp = self.pacing.cpu(sh.index);
        let volume = heap.alloc_volume_npages();
        let idle = cp.bg_volume.load(Ordering::Relaxed) == volume;
        cp.bg_volume.store(volume, Ordering::Relaxed);
        let epoch = heap.scav_epoch();
        if cp.bg_epoch.load(Ordering::Relaxed) != epoch {
            cp.bg_epoch.store(epoch, Ordering::Relaxed);
            cp.bg_calls.store(0, Ordering::Relaxed);
        }
        let calls = cp.bg_calls.load(Ordering::Relaxed) + 1;
        cp.bg_calls.store(calls, Ordering::Relaxed);
        let tick = Tick::Cpu((calls >= CALLS_PER_EPOCH).then_some(epoch));
        let over_limit = heap.over_limit();
        let budget = if idle { budget_bytes.saturating_mul(IDLE_BUDGET_FACTOR) } else { budget_bytes };
        let (keep, max_spans, pages_left) = if idle || over_limit {
            (0, usize::MAX, (budget / PAGE_SIZE).max(max_spans))
        } else {
            (KEEP_EMPTY_SPANS, max_spans, usize::MAX)
        };
        BackgroundPlan { over_limit, idle, keep, max_spans, pages_left, flush_page_cache: idle, tick, budget }
    }
}
