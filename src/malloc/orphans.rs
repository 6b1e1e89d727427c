//! Caches a departed holder left (host threads that exited; see `cpu.rs`), and `fork()` support.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! A kernel's CPUs never go away, but a host thread does: its slot is released when it exits, and what this
//! allocator cached under that slot (stocks, spans, the page cache) would wait for the next thread that
//! claims the slot. [`Malloc::flush_orphans`] flushes such caches: it *adopts* the index first (the
//! provider hands it out to nobody else meanwhile, so the cache is ours as under a guard), flushes it to the
//! central lists and the heap, and releases the adoption. `background` flushes a few per call, `release_all`
//! all of them.

use super::*;

/// `alloc_zeroed` of at least this many bytes takes fresh zero pages from the source (decommitting dirty
/// ones) instead of clearing them by hand, where the source zero-fills (see `Heap::alloc_span_fresh_zero`):
/// giving the pages back and faulting in zero pages on first touch costs about what clearing them does, and
/// pages the caller never touches cost nothing (`cargo run --release --features std --example
/// zeroed_large` measures it).
pub(super) const FRESH_ZERO_MIN_BYTES: usize = 4 << 20;

/// Orphaned caches one [`Malloc::background`] call flushes at most.
pub(super) const ORPHANS_PER_BACKGROUND: usize = 4;

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Flushes up to `max` orphaned caches: those whose index the provider reports more departures for than
    /// when this allocator last flushed them, and that nobody holds now. Each is adopted first (so it is
    /// ours alone, as under a guard), flushed to the central lists and the heap, and released. Runs inside
    /// the caller's guard (`g`). Returns the caches flushed.
    pub(super) fn flush_orphans(&self, g: Guarded<'_>, max: usize) -> usize {
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
                cache.flush_all(&self.t, &slot.shared, g);
            }
            slot.flushed_departures.store(departures, Ordering::Relaxed);
            // SAFETY: adopted above, not released since; the cache is no longer used.
            unsafe { self.provider.release_adopted(i) };
            n += 1;
        }
        n
    }

    /// Takes every lock of this allocator in lock order (the shared cache's, each central list's, the heap's,
    /// then the guarded pool's, a leaf) and keeps them until [`Malloc::unlock_all_after_fork`]: `fork()`'s prepare step (see
    /// `hosted.rs`), so the child never inherits a lock another thread held. Nothing may allocate from this
    /// allocator on this thread until then. The provider's guard is taken for the token only: on a host it
    /// masks nothing, and the locks outlive it until the fork handlers release them.
    #[cfg(feature = "std")]
    pub(crate) fn lock_all_for_fork(&self) {
        self.with_guard(|g| {
            self.shared_lock.lock_and_keep(g);
            for central in self.t.centrals.iter() {
                central.lock_for_fork(g);
            }
            self.t.heap.inner.lock_and_keep(g);
            self.guarded.lock_for_fork(g);
        });
    }

    /// Releases what [`Malloc::lock_all_for_fork`] took (in the parent after `fork()`, and in the child).
    ///
    /// # Safety
    /// This thread (or, in a `fork()` child, the thread that forked) called `lock_all_for_fork` and has not
    /// unlocked since: every lock is held, by it.
    #[cfg(feature = "std")]
    pub(crate) unsafe fn unlock_all_after_fork(&self) {
        // SAFETY: `lock_all_for_fork` kept each lock once; we release each once.
        unsafe {
            self.guarded.unlock_after_fork();
            self.t.heap.inner.force_unlock();
            for central in self.t.centrals.iter().rev() {
                central.unlock_after_fork();
            }
            self.shared_lock.force_unlock();
        }
    }
}
