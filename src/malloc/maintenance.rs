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
    pub fn background(&self, max_spans: usize, scavenge_budget_bytes: usize) -> BackgroundReport {
        let mut rep = BackgroundReport::default();
        let log = self.with_cache(|c, t, sh, g| {
            rep.nfolded = c.sweep_cached(t, sh, g);
            for central in t.centrals.iter().skip(1) {
                rep.npages_swept += central.sweep(g, &t.heap, Some(&mut c.pcache), KEEP_EMPTY_SPANS, max_spans);
            }
            let (released, log) = t.heap.scavenge_step(g, scavenge_budget_bytes);
            rep.nbytes_released = released;
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
    pub fn release_all(&self) -> usize {
        let e = self.enter();
        let g = e.held.guarded();
        e.cache.flush_all(&self.t, e.sh, g);
        if !matches!(e.held, Held::Shared(..)) {
            let _lock = self.shared_lock.lock(g);
            // SAFETY: the shared cache is only used under `shared_lock`, which we hold.
            let shared = unsafe { &mut *self.shared.cache.get() };
            shared.flush_all(&self.t, &self.shared.shared, g);
        }
        for central in self.t.centrals.iter().skip(1) {
            central.sweep(g, &self.t.heap, None, 0, usize::MAX);
        }
        let (released, log) = self.t.heap.release_all_step(g);
        drop(e);
        log.emit(&self.t.heap);
        released
    }

    /// Sets the soft memory limit (GOMEMLIMIT); `usize::MAX` removes it. See `scavenger.rs`.
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.t.heap.set_memory_limit(nbytes)
    }
}
