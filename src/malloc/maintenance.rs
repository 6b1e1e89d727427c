//! Maintenance: the background step (Go's sweeper and scavenger goroutines), flushing caches,
//! `release_all` (Go's `debug.FreeOSMemory`) and the memory limit.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! # Slices (interrupt latency)
//! `background`, `release_all` and `set_memory_limit` do not run in one guarded section: a first section
//! on the caller's entered cache does what needs the cache (fold, flushes, pacing), then the central
//! lists' sweep runs [`SWEEP_SLICE_SPANS`] spans per section (each section enters the cache again) and the
//! heap's decommits one run per section (`ProviderSections`, see `page/heap/slice.rs`). Safe because each
//! section leaves every structure consistent (a sweep returns whole spans under the central and heap
//! locks; a run being decommitted is taken in the page allocator), and nothing is carried from one
//! section to the next but counters.

use super::*;
use crate::page::heap::slice::ProviderSections;

/// Empty spans one guarded section of a sweep returns to the page heap at most (background step,
/// `release_all`): a span costs about a page-heap free (heap lock, page allocator, page map: well under
/// 1 000 instructions for the small classes' spans), so `SWEEP_SLICE_SPANS × 1 000 ≤ IRQ_OFF_BOUND_INSNS / 2`
/// (see `page/heap/slice.rs`).
pub const SWEEP_SLICE_SPANS: usize = 8;
/// Pages one guarded section of a sweep returns at most (a large-class span clears one page-map entry per
/// page: `SWEEP_SLICE_NPAGES` stores stay far below the bound).
pub const SWEEP_SLICE_NPAGES: usize = 256;

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

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// One step of background work, for a kernel's idle loop or timer interrupt or a host thread: folds
    /// deferred frees into the calling CPU's cached spans, returns up to `max_spans` empty spans per class from
    /// the central lists to the page heap, and lets the scavenger give back up to `scavenge_budget_bytes`.
    /// The step works in guarded sections (interrupts off in a kernel) with windows between them: the pacing
    /// in one, the fold two classes per section, the sweep `SWEEP_SLICE_SPANS` (8) spans per section, the scavenger one run of at
    /// most `DECOMMIT_SLICE_NPAGES` pages per section (see `page/heap/slice.rs`); so it is safe from an
    /// interrupt handler, and its budget bounds its whole time, not the time interrupts stay off.
    ///
    /// Pacing (see `reclaim.rs`): `max_spans` and the budget hold while the heap allocates; an *idle* call
    /// (no span allocated since this CPU's previous call) sweeps every empty span, with no per-class floor,
    /// and sweeps and scavenges up to [`IDLE_BUDGET_FACTOR`] times the budget. Each CPU's calls count
    /// towards the end of the scavenger's epoch on their own, so the recent-peak window does not shrink
    /// with the number of CPUs calling. Above the memory limit, the step also reclaims (as before a failing
    /// allocation) and releases down to the limit.
    pub fn background(&self, max_spans: usize, scavenge_budget_bytes: usize) -> BackgroundReport {
        let mut rep = BackgroundReport::default();
        // A flush another CPU's reclaim asked of this cache, if one is pending or in progress.
        self.finish_requested_flush();
        let plan = self.with_cache(|_, _, sh, g| {
            self.flush_orphans(g, ORPHANS_PER_BACKGROUND);
            self.background_pacing(sh, max_spans, scavenge_budget_bytes)
        });
        // The fold (and the halving of grown stock bounds), a few classes per section.
        let mut from = 1;
        while from < NUM_ALLOC_CLASSES {
            let to = (from + super::reclaim::FLUSH_SLICE_STEPS).min(NUM_ALLOC_CLASSES);
            rep.nfolded += self.with_cache(|c, t, sh, g| c.sweep_cached_classes(t, from, to, sh, g));
            from = to;
        }
        if plan.over_limit {
            // Idle: meet the limit now; busy: at the allocation path's pace.
            self.limit_reclaim_sliced(plan.idle);
        }
        rep.npages_swept = self.sweep_sliced(plan.keep, plan.max_spans, plan.pages_left);
        if plan.flush_page_cache {
            self.with_cache(|c, t, _, g| {
                // The scavenger cannot reach the page cache's free pages: give them to the heap (if the heap
                // is still above its goal after the sweep).
                if t.heap.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE
                    > t.heap.retained_goal_bytes.load(Ordering::Relaxed)
                {
                    t.heap.flush_page_cache(g, &mut c.pcache);
                }
            });
        }
        let (step, log) = self.t.heap.scavenge_paced(&mut ProviderSections(&self.provider), plan.budget, plan.tick);
        rep.nbytes_released = step.released;
        // The scavenger's log line, outside the guard (a logger may allocate or take locks).
        if let Some(log) = log {
            log.emit(&self.t.heap);
        }
        rep
    }

    /// The calling CPU's current stock bound for allocation class `class` (objects it may keep freed before
    /// flushing to the central list): the base bound, or more after the class's stock kept overflowing
    /// (see `cpucache.rs`). For diagnostics and tests; 0 for class 0 and out-of-range classes.
    pub fn stock_bound(&self, class: usize) -> u32 {
        if class == 0 || class >= NUM_ALLOC_CLASSES {
            return 0;
        }
        self.with_cache(|c, _, _, _| c.stock_bound(class))
    }

    /// Used-up spans of allocation class `class` the calling CPU's cache still holds (see "Held spans" in
    /// `cpucache.rs`): spans it allocated all objects of, kept so that frees from other CPUs come back to
    /// it without the class lock's list work. For diagnostics and tests; 0 for class 0 and out-of-range
    /// classes.
    pub fn held_spans(&self, class: usize) -> u32 {
        if class == 0 || class >= NUM_ALLOC_CLASSES {
            return 0;
        }
        self.with_cache(|c, _, _, _| c.held_spans(class))
    }

    /// Gives everything the calling CPU's cache holds back to the central lists and the page heap. A kernel
    /// calls it on every CPU before [`Malloc::release_all`] (other CPUs' caches are theirs alone).
    ///
    /// In guarded sections of a few classes each, with interrupt windows between them (see
    /// `page/heap/slice.rs`).
    pub fn flush_cpu_cache(&self) {
        self.flush_cache_sliced();
    }

    /// Go's `debug.FreeOSMemory`: flushes the calling CPU's cache (and the shared one), returns every empty
    /// span to the page heap and every free page to the page source. Returns the bytes released. Long (its
    /// time grows with the free memory), but in guarded sections with windows between them: flushing the
    /// caches, then `SWEEP_SLICE_SPANS` (8) spans per section, then one run of at most `DECOMMIT_SLICE_NPAGES`
    /// pages decommitted per section (see `page/heap/slice.rs`).
    ///
    /// The caches that departed holders left (host threads that exited, see `cpu.rs`) are flushed at once.
    /// Other CPUs' caches are asked to flush too: each does at its next entry into the allocator's general
    /// path (see `reclaim.rs`); a later `release_all` or background step then returns what they gave back.
    ///
    /// ```
    /// # #[cfg(feature = "std")] {
    /// use core::alloc::{GlobalAlloc, Layout};
    /// use goheap::cpu::ThreadSlots;
    /// use goheap::source::mmap::MmapSource;
    /// use goheap::Malloc;
    ///
    /// static HEAP: Malloc<MmapSource, ThreadSlots> = Malloc::new(MmapSource::new(), ThreadSlots::new());
    ///
    /// // A burst of 16 MiB in 1 MiB objects, then freed: the pages stay committed, free in the page heap.
    /// let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    /// // SAFETY: the layout's size is not zero.
    /// let burst: Vec<*mut u8> = (0..16).map(|_| unsafe { HEAP.alloc(layout) }).collect();
    /// assert!(burst.iter().all(|p| !p.is_null()));
    /// for p in burst {
    ///     // SAFETY: each `p` is a live allocation of `layout` from `HEAP`.
    ///     unsafe { HEAP.dealloc(p, layout) };
    /// }
    ///
    /// // Everything free goes back to the page source at once (the background step does it in budgeted steps).
    /// let released = HEAP.release_all();
    /// assert!(released >= 16 << 20, "released {released} bytes");
    /// assert!(HEAP.mem_stats().heap_released >= 16 << 20);
    /// # }
    /// ```
    pub fn release_all(&self) -> usize {
        let e = self.enter();
        let g = e.held.guarded();
        if !matches!(e.held, Held::Shared(..)) {
            let _lock = self.shared_lock.lock(g);
            // SAFETY: the shared cache is only used under `shared_lock`, which we hold.
            let shared = unsafe { &mut *self.shared.cache.get() };
            shared.flush_all(&self.t, &self.shared.shared, g);
        }
        // The caches departed holders left (host threads that exited, see `orphans.rs`).
        self.flush_orphans(g, usize::MAX);
        drop(e);
        // This CPU's cache and the flush request to the others, a few flush steps per section.
        self.reclaim_caches_sliced();
        // Every empty span of every central list, then every free page: in guarded sections with windows
        // between them (see `page/heap/slice.rs`).
        self.sweep_sliced(0, usize::MAX, usize::MAX);
        let (released, log) = self.t.heap.release_all_step(&mut ProviderSections(&self.provider));
        if let Some(log) = log {
            log.emit(&self.t.heap);
        }
        released
    }

    /// Returns empty spans from every central list to the page heap, beyond the first `keep` per class, at
    /// most `max_spans` per class and `max_pages` in all, [`SWEEP_SLICE_SPANS`] spans (and at most
    /// [`SWEEP_SLICE_NPAGES`] pages) per guarded section, each section on the caller's entered cache (its
    /// page cache takes the small spans' pages). Returns the pages returned.
    pub(super) fn sweep_sliced(&self, keep: usize, max_spans: usize, max_pages: usize) -> usize {
        let mut pages_left = max_pages;
        let mut swept = 0;
        for central in self.t.centrals.iter().skip(1) {
            let mut spans_left = max_spans;
            while pages_left != 0 && spans_left != 0 {
                let (nspans, npages) = (spans_left.min(SWEEP_SLICE_SPANS), pages_left.min(SWEEP_SLICE_NPAGES));
                let n = self.with_cache(|c, t, _, g| {
                    central.sweep_budget(g, &t.heap, Some(&mut c.pcache), keep, nspans, npages)
                });
                if n == 0 {
                    break;
                }
                pages_left = pages_left.saturating_sub(n);
                spans_left -= nspans;
                swept += n;
            }
            if pages_left == 0 {
                break;
            }
        }
        swept
    }

    /// Sets the soft memory limit (GOMEMLIMIT); `usize::MAX` removes it. See `scavenger.rs`.
    /// If the total is above the new limit, reclaims at once (see `reclaim.rs`).
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.t.heap.set_memory_limit(nbytes);
        if self.t.heap.over_limit() {
            self.limit_reclaim_sliced(true);
        }
    }

    /// Turns Go's `scavtrace` on or off (off by default; `GODEBUG=scavtrace=1` turns it on in the hosted
    /// allocator): one line in Go's format per scavenger generation in which memory was released, e.g.
    /// `scav 1024 KiB work (bg), 0 KiB work (eager), 4096 KiB now, 80% util`, and one ending in `(forced)`
    /// per [`Malloc::release_all`], through the `log` facade (emitted outside the CPU provider's guard).
    pub fn set_scavtrace(&self, on: bool) {
        self.t.heap.set_scavtrace(on);
    }

    /// Sends `scavtrace` lines to `sink` (called outside every allocator lock and guard) instead of the
    /// `log` facade; `None` goes back to the facade.
    pub fn set_scavtrace_sink(&self, sink: Option<crate::page::heap::scavenger::ScavTraceSink>) {
        self.t.heap.set_scavtrace_sink(sink);
    }

    /// Sets the clock (monotonic nanoseconds; `None` removes it) by which the scavenger paces itself to
    /// about 1% of one CPU, times its peak window and counts its CPU time (see `Heap::set_clock`). Without
    /// one, background steps release at most their byte budget.
    pub fn set_clock(&self, clock: Option<fn() -> u64>) {
        self.with_cache(|_, t, _, g| t.heap.set_clock(g, clock));
    }
}
