//! Maintenance: the background step (Go's sweeper and scavenger goroutines), flushing caches,
//! `release_all` (Go's `debug.FreeOSMemory`) and the memory limit.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;

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
    /// The whole step runs inside the CPU provider's guard (interrupts off in a kernel), so it is safe from an
    /// interrupt handler and its budget bounds the time interrupts stay off.
    ///
    /// Pacing (see `reclaim.rs`): `max_spans` and the budget hold while the heap allocates; an *idle* call
    /// (no span allocated since this CPU's previous call) sweeps every empty span, with no per-class floor,
    /// and sweeps and scavenges up to [`IDLE_BUDGET_FACTOR`] times the budget. Each CPU's calls count
    /// towards the end of the scavenger's epoch on their own, so the recent-peak window does not shrink
    /// with the number of CPUs calling. Above the memory limit, the step also reclaims (as before a failing
    /// allocation) and releases down to the limit.
    pub fn background(&self, max_spans: usize, scavenge_budget_bytes: usize) -> BackgroundReport {
        let mut rep = BackgroundReport::default();
        let log = self.with_cache(|c, t, sh, g| {
            self.flush_orphans(g, ORPHANS_PER_BACKGROUND);
            rep.nfolded = c.sweep_cached(t, sh, g);
            let (swept, tick, budget) = self.background_pacing(c, sh, g, max_spans, scavenge_budget_bytes);
            rep.npages_swept = swept;
            let (step, log) = t.heap.scavenge_paced(g, budget, tick);
            rep.nbytes_released = step.released;
            log
        });
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

    /// Gives everything the calling CPU's cache holds back to the central lists and the page heap. A kernel
    /// calls it on every CPU before [`Malloc::release_all`] (other CPUs' caches are theirs alone).
    pub fn flush_cpu_cache(&self) {
        self.with_cache(|c, t, sh, g| c.flush_all(t, sh, g));
    }

    /// Go's `debug.FreeOSMemory`: flushes the calling CPU's cache (and the shared one), returns every empty
    /// span to the page heap and every free page to the page source. Returns the bytes released. One section
    /// inside the CPU provider's guard: in a kernel, interrupts stay off until everything is released.
    ///
    /// The caches that departed holders left (host threads that exited, see `cpu.rs`) are flushed at once.
    /// Other CPUs' caches are asked to flush too: each does at its next entry into the allocator's general
    /// path (see `reclaim.rs`); a later `release_all` or background step then returns what they gave back.
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
        // This CPU's cache, the flush request to the others, every empty span of every central list.
        self.reclaim(e.cache, e.sh, g);
        let (released, log) = self.t.heap.release_all_step(g);
        drop(e);
        if let Some(log) = log {
            log.emit(&self.t.heap);
        }
        released
    }

    /// Sets the soft memory limit (GOMEMLIMIT); `usize::MAX` removes it. See `scavenger.rs`.
    /// If the total is above the new limit, reclaims at once (see `reclaim.rs`).
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.t.heap.set_memory_limit(nbytes);
        if self.t.heap.over_limit() {
            self.with_cache(|c, _, sh, g| {
                self.limit_reclaim(c, sh, g, true);
            });
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
