//! The scavenger (Go's `mgcscavenge.go`, design 30333): gives free committed pages back to the source.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! Free pages stay committed after a free (so the next allocation is cheap). The scavenger decommits them
//! when the heap retains more than it needs:
//! - **Retained goal** (Go's `gcPercentGoal`, adapted): there is no GC cycle and no heap goal here, so the
//!   heap tracks its own recent peak in-use size: `peak = max(inuse peaks over the last PEAK_WINDOW_EPOCHS
//!   epochs)` and `gc_goal = peak * (100 + RETAINED_HEADROOM_PERCENT) / 100` (10% headroom, as Go's
//!   retainExtraPercent).
//! - **Epochs** end by allocation volume — once the heap has handed out `max(EPOCH_MIN_BYTES, window peak /
//!   PEAK_WINDOW_EPOCHS)` in spans since the epoch began (the window is about one peak's worth of
//!   allocation, as Go's GC cycles are) — or by time: [`EPOCH_NANOS`] with a clock hook
//!   ([`Heap::set_clock`]), else [`CALLS_PER_EPOCH`] calls of one caller ([`Tick`]): [`Heap::scavenge`]
//!   counts its own calls, `Malloc::background` those of each CPU separately, so the window does not
//!   shrink with the number of CPUs calling and an idle system forgets a peak in a few dozen ticks.
//! - **Concurrent steps** share the excess over the goal: each step claims (under the heap lock) a part
//!   the others have not claimed, so together they do not release below the goal.
//! - **Memory limit** (GOMEMLIMIT, spec section 7):
//!   `limit_goal = limit * (100 - LIMIT_HEADROOM_PERCENT) / 100 - nonheap_committed` (span descriptors and
//!   metadata count against the limit). The goal is
//!   `min(gc_goal, limit_goal)`; when the limit goal is the binding one the cycle is *aggressive*
//!   (every non-dense chunk, then dense ones too), otherwise *lazy* (dense chunks skipped).
//! - **Soft limit**: allocation never fails because of the limit. After an allocation that leaves the total
//!   above the limit, the allocating CPU releases free committed pages down to `limit_goal` (Go's
//!   allocation-triggered scavenging) if there are any; if the pages in use (with the metadata) already
//!   reach the limit goal, allocation proceeds without scavenging (*backoff*: releasing free pages then
//!   cannot meet the limit, and the next allocations would commit them again — the thrash Go's soft limit
//!   avoids). The allocator above adds its own reclaim for the limit (caches and central lists, paced by
//!   allocation volume, see `malloc/reclaim.rs`) and [`Heap::release_for_limit`].
//! - **Chunk choice**: chunks are scanned from the highest address down (allocation is lowest-address first,
//!   so high pages are the least likely to be reused), in passes: mostly free chunks first (at most
//!   [`SCAV_MOSTLY_FREE_PAGES`] pages allocated), then chunks that are not dense (fewer than
//!   [`SCAV_CHUNK_HI_OCC_PAGES`] allocated, Go's `scavChunkHiOccFrac` = 96.875%), then — only when aggressive or
//!   forced — any chunk. Within a chunk, free runs are released from the top down.
//! - [`Heap::release_all`] is Go's `debug.FreeOSMemory`: every free committed page not held by a page cache.
//!
//! The crate spawns no threads: a kernel calls [`Heap::scavenge`] (through `Malloc::background`, which
//! supplies the guard token) from its idle loop or a timer interrupt, a host from a thread it owns; `spawn_scavenger` (feature `std`) is such a thread. Each *cycle* (a run of steps that
//! released memory, ended by a step that finds nothing more to do) logs one scavtrace-like line through
//! `log::info!`, e.g. `scav: released 1.2 MiB in 3 steps, retained 4.0 MiB (goal 4.4 MiB) of 8.1 MiB
//! committed, limit 64 MiB (mode aggressive)`.
//!
//! # Invariants
//! - A page is decommitted only while free in the page allocator and not scavenged; it is then marked
//!   scavenged in the same critical section, so `committed_npages = grown - scav - cache_scav` holds.
//! - `window[..]` are inuse peaks (pages) of past epochs; `calls < CALLS_PER_EPOCH`;
//!   `claimed_bytes` = Σ bytes that steps running without the lock set out to release.
//!
//! # Locking
//! [`ScavState`] lives in `HeapInner`, under the heap lock. Every entry point takes a [`Guarded`] token: it
//! runs inside the CPU provider's guard, so no interrupt handler on the same CPU can wait for the heap lock
//! it holds (in a kernel, interrupts stay off for the whole step: callers bound it by its budget). The
//! background step and `release_all` call the source's `decommit` *without* the heap lock (still inside the
//! guard), as Go does: under the lock a run is picked and allocated in
//! the page allocator (`scav_inflight_npages` counts such runs), the lock is dropped for the decommit, and
//! the run is freed as scavenged under the lock again. Scavenging on the allocation path (memory limit
//! exceeded, or a commit failed) runs with the heap lock already held and decommits under it. The log line
//! is emitted with no lock held, and by `Malloc` after it left the CPU provider's guard.

use core::fmt;
use core::ptr::NonNull;
use core::sync::atomic::Ordering;

use crate::cpu::Guarded;
use crate::page::heap::{Heap, HeapInner};
use crate::page::pagealloc::{PALLOC_CHUNK_PAGES, PALLOC_CHUNK_WORDS};
use crate::source::PageSource;
use crate::PAGE_SIZE;

/// Headroom of the retained goal over the recent in-use peak, in percent (Go's `retainExtraPercent`).
pub const RETAINED_HEADROOM_PERCENT: usize = 10;
/// The memory-limit goal is this far below the limit, in percent (Go's `reduceExtraPercent` = 5).
pub const LIMIT_HEADROOM_PERCENT: usize = 5;
/// Epochs in the peak window.
pub const PEAK_WINDOW_EPOCHS: usize = 4;
/// Without a clock, an epoch also ends after this many calls of one caller: of [`Heap::scavenge`], or of
/// `Malloc::background` on one CPU (each CPU counts its own calls, so the window does not shrink with the
/// number of CPUs). At a 100 Hz idle tick: 80 ms epochs; a peak is forgotten 5 epochs (0.4 s) after it.
pub const CALLS_PER_EPOCH: usize = 8;
/// An epoch ends once the heap has handed out `max(EPOCH_MIN_BYTES, window peak / PEAK_WINDOW_EPOCHS)`
/// in spans since it began (allocation volume: the window is about one peak's worth of allocation).
pub const EPOCH_MIN_BYTES: usize = 4 << 20;
/// With a clock hook ([`Heap::set_clock`]), an epoch lasts this long instead of [`CALLS_PER_EPOCH`] calls:
/// 100 ms.
pub const EPOCH_NANOS: u64 = 100_000_000;
/// A chunk with at least this many allocated pages is dense: `512 * 31 / 32` = 496 (Go's 96.875%).
pub const SCAV_CHUNK_HI_OCC_PAGES: usize = PALLOC_CHUNK_PAGES * 31 / 32;
/// A chunk with at most this many allocated pages is mostly free: `512 / 4` = 128.
pub const SCAV_MOSTLY_FREE_PAGES: usize = PALLOC_CHUNK_PAGES / 4;
/// Bytes `release_all` releases per heap-lock hold: 16 MiB.
pub const RELEASE_ALL_STEP_BYTES: usize = 16 << 20;

/// How hard a scavenge looks for pages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ScavMode {
    /// Below the memory limit: retained goal from the recent peak; dense chunks skipped.
    Lazy,
    /// Near or over the memory limit: down to the limit goal; dense chunks too.
    Aggressive,
    /// `release_all`, allocation over the limit, or making room for a failed commit: every free page.
    Forced,
}

impl ScavMode {
    fn name(self) -> &'static str {
        match self {
            ScavMode::Lazy => "lazy",
            ScavMode::Aggressive => "aggressive",
            ScavMode::Forced => "forced",
        }
    }
}

/// The pacing input of one scavenger step: what counts as the passing of time for the peak window.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Tick {
    /// The heap counts the calls itself ([`Heap::scavenge`]: one caller, e.g. one scavenger thread).
    Own,
    /// The caller counts its own calls (one CPU's `Malloc::background`): `Some(e)` when it has made
    /// [`CALLS_PER_EPOCH`] calls since it saw epoch `e` begin (ends epoch `e` if it is still current).
    Cpu(Option<usize>),
}

/// What one scavenger step did.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct ScavStep {
    /// Bytes given back to the source.
    pub released: usize,
    /// The heap still retains more than its goal (more steps, or page caches flushed, would release more).
    pub over_goal: bool,
}

/// Scavenger bookkeeping (guarded by the heap lock).
#[derive(Debug)]
pub struct ScavState {
    /// Calls of [`Heap::scavenge`] in the current epoch.
    calls: usize,
    /// The epoch number (also in `Heap::scav_epoch`), the heap's allocation volume (pages) and the clock
    /// reading when it began.
    epoch: usize,
    epoch_start_volume: usize,
    epoch_start_nanos: u64,
    /// A clock in nanoseconds ([`Heap::set_clock`]): epochs by time instead of calls.
    clock: Option<fn() -> u64>,
    /// Bytes steps running without the lock have set out to release (so concurrent steps share the work
    /// down to the goal instead of each doing all of it).
    claimed_bytes: usize,
    /// In-use peaks (pages) of past epochs, a ring.
    window: [usize; PEAK_WINDOW_EPOCHS],
    wpos: usize,
    /// Current cycle: steps that released something, bytes released, mode of the last step.
    cycle_steps: usize,
    cycle_released_bytes: usize,
    cycle_mode: ScavMode,
}

impl ScavState {
    /// Fresh state.
    pub const fn new() -> Self {
        Self {
            calls: 0,
            epoch: 0,
            epoch_start_volume: 0,
            epoch_start_nanos: 0,
            clock: None,
            claimed_bytes: 0,
            window: [0; PEAK_WINDOW_EPOCHS],
            wpos: 0,
            cycle_steps: 0,
            cycle_released_bytes: 0,
            cycle_mode: ScavMode::Lazy,
        }
    }
}

impl Default for ScavState {
    fn default() -> Self {
        Self::new()
    }
}

/// The retained-heap goal and mode for a recent in-use peak, a memory limit (`usize::MAX` = none), the
/// committed memory outside the heap pages (descriptors, metadata) and the heap's committed bytes.
pub fn retained_goal(
    peak_inuse_bytes: usize,
    limit: usize,
    nonheap_bytes: usize,
    committed_bytes: usize,
) -> (usize, ScavMode) {
    let gc_goal = peak_inuse_bytes.saturating_add(peak_inuse_bytes / 100 * RETAINED_HEADROOM_PERCENT);
    if limit == usize::MAX {
        return (gc_goal, ScavMode::Lazy);
    }
    let limit_goal = (limit - limit / 100 * LIMIT_HEADROOM_PERCENT).saturating_sub(nonheap_bytes);
    if limit_goal < gc_goal && committed_bytes > limit_goal {
        (limit_goal, ScavMode::Aggressive)
    } else {
        (gc_goal.min(limit_goal), ScavMode::Lazy)
    }
}

/// Byte counts printed as `512 B`, `12.0 KiB`, `1.2 MiB`, `3.0 GiB`, `none` for `usize::MAX`.
#[derive(Debug)]
pub struct Bytes(pub usize);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        if b == usize::MAX {
            return f.write_str("none");
        }
        let units = [("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (name, shift) in units {
            if b >= 1 << shift {
                let whole = b >> shift;
                let tenth = ((b & ((1 << shift) - 1)) * 10) >> shift;
                return write!(f, "{whole}.{tenth} {name}");
            }
        }
        write!(f, "{b} B")
    }
}

/// The log line of a scavenging cycle that ended, kept until the caller has left the CPU provider's guard
/// (a logger may allocate, take its own locks or be slow: none of that belongs inside the guard).
#[derive(Clone, Copy, Debug)]
#[must_use]
pub(crate) struct CycleLog {
    released: usize,
    steps: usize,
    goal: usize,
    mode: ScavMode,
}

impl CycleLog {
    /// Emits the line (call it outside the guard).
    pub(crate) fn emit<S: PageSource>(self, heap: &Heap<S>) {
        heap.log_cycle(self.released, self.steps, self.goal, self.mode);
    }
}

impl<S: PageSource> Heap<S> {
    /// One background scavenger step: releases at most `budget_bytes` (rounded up to pages) of free
    /// committed pages if the heap retains more than its goal (see the module docs). Returns bytes released.
    /// Logs one line when a cycle ends (inside the caller's guard; `Malloc::background` logs after it). For
    /// a single caller: every [`CALLS_PER_EPOCH`] calls end an epoch (allocators with several CPUs use
    /// `Malloc::background`, which counts calls per CPU).
    pub fn scavenge(&self, guarded: Guarded<'_>, budget_bytes: usize) -> usize {
        let (step, log) = self.scavenge_paced(guarded, budget_bytes, Tick::Own);
        if let Some(log) = log {
            log.emit(self);
        }
        step.released
    }

    /// The current epoch number of the peak window (see [`Tick::Cpu`]).
    pub fn scav_epoch(&self) -> usize {
        self.scav_epoch.load(Ordering::Relaxed)
    }

    /// Pages handed out in spans since the heap was created (the allocation volume that paces the peak
    /// window).
    pub fn alloc_volume_npages(&self) -> usize {
        self.alloc_volume_npages.load(Ordering::Relaxed)
    }

    /// Sets a clock (monotonic nanoseconds) by which the peak window's epochs are timed ([`EPOCH_NANOS`]);
    /// `None` (the default): epochs end by calls and allocation volume. The clock is read with the heap
    /// lock held: it must not allocate or take a lock an allocating interrupt handler could hold (a TSC or
    /// tick-counter read is the intended kind).
    pub fn set_clock(&self, guarded: Guarded<'_>, clock: Option<fn() -> u64>) {
        let mut g = self.inner.lock(guarded);
        g.scav.clock = clock;
        g.scav.epoch_start_nanos = clock.map_or(0, |c| c());
    }

    /// One scavenger step with the caller's pacing input (see [`Tick`]), returning the log line of a cycle
    /// that ended instead of emitting it (the caller emits it outside its guard).
    pub(crate) fn scavenge_paced(
        &self,
        guarded: Guarded<'_>,
        budget_bytes: usize,
        tick: Tick,
    ) -> (ScavStep, Option<CycleLog>) {
        let mut g = self.inner.lock(guarded);
        if g.state != crate::page::heap::InitState::Ready {
            return (ScavStep::default(), None);
        }
        let inner = &mut *g;
        let inuse = self.inuse_npages.load(Ordering::Relaxed);
        let window_peak = self.advance_window_locked(&mut inner.scav, inuse, tick);
        self.window_peak_npages.store(window_peak, Ordering::Relaxed);
        let peak = window_peak.max(self.epoch_peak_npages.load(Ordering::Relaxed)).max(inuse) * PAGE_SIZE;
        let committed = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let nonheap = self.span_sys_bytes.load(Ordering::Relaxed) + self.meta_committed_bytes.load(Ordering::Relaxed);
        let limit = self.memory_limit.load(Ordering::Relaxed);
        let (goal, mode) = retained_goal(peak, limit, nonheap, committed);
        self.retained_goal_bytes.store(goal, Ordering::Relaxed);
        // Steps running concurrently share the excess: each claims what the others have not.
        let excess = committed.saturating_sub(goal).saturating_sub(inner.scav.claimed_bytes);
        let want = budget_bytes.min(excess).next_multiple_of(PAGE_SIZE);
        inner.scav.claimed_bytes += want;
        drop(g);
        let released = if want > 0 { self.scavenge_unlocked(guarded, want, mode) } else { 0 };
        let mut g = self.inner.lock(guarded);
        let st = &mut g.scav;
        st.claimed_bytes -= want;
        let mut log = None;
        if released != 0 {
            st.cycle_steps += 1;
            st.cycle_released_bytes += released;
            st.cycle_mode = mode;
        } else if st.cycle_steps != 0 && st.claimed_bytes == 0 {
            // Nothing more to do: the cycle ends.
            let (steps, bytes, mode) = (st.cycle_steps, st.cycle_released_bytes, st.cycle_mode);
            st.cycle_steps = 0;
            st.cycle_released_bytes = 0;
            log = Some(CycleLog { released: bytes, steps, goal, mode });
        }
        let over_goal = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE > goal;
        (ScavStep { released, over_goal }, log)
    }

    /// Ends the epoch if it is over (by clock, by the caller's calls, or by allocation volume) and returns
    /// the window's peak (pages). Heap lock held.
    fn advance_window_locked(&self, st: &mut ScavState, inuse: usize, tick: Tick) -> usize {
        let window_peak = st.window.iter().copied().max().unwrap_or(0);
        let volume = self.alloc_volume_npages.load(Ordering::Relaxed);
        let epoch_npages = (EPOCH_MIN_BYTES / PAGE_SIZE).max(window_peak / PEAK_WINDOW_EPOCHS);
        let by_volume = volume.wrapping_sub(st.epoch_start_volume) >= epoch_npages;
        let now = st.clock.map_or(0, |c| c());
        let by_time = match st.clock {
            Some(_) => now.wrapping_sub(st.epoch_start_nanos) >= EPOCH_NANOS,
            None => match tick {
                Tick::Own => {
                    st.calls += 1;
                    st.calls >= CALLS_PER_EPOCH
                }
                Tick::Cpu(Some(e)) => e == st.epoch,
                Tick::Cpu(None) => false,
            },
        };
        if !(by_volume || by_time) {
            return window_peak;
        }
        st.calls = 0;
        st.window[st.wpos] = self.epoch_peak_npages.swap(inuse, Ordering::Relaxed);
        st.wpos = (st.wpos + 1) % PEAK_WINDOW_EPOCHS;
        st.epoch += 1;
        st.epoch_start_volume = volume;
        st.epoch_start_nanos = now;
        self.scav_epoch.store(st.epoch, Ordering::Relaxed);
        st.window.iter().copied().max().unwrap_or(0)
    }

    /// Releases every free committed page not held by a page cache (Go's `debug.FreeOSMemory`; flush the
    /// page caches first to include theirs). Returns bytes released; logs one line (inside the caller's
    /// guard; `Malloc::release_all` logs after it).
    pub fn release_all(&self, guarded: Guarded<'_>) -> usize {
        let (total, log) = self.release_all_step(guarded);
        log.emit(self);
        total
    }

    /// [`Heap::release_all`], returning its log line instead of emitting it.
    pub(crate) fn release_all_step(&self, guarded: Guarded<'_>) -> (usize, CycleLog) {
        let mut total = 0;
        let mut steps = 0;
        loop {
            let r = self.scavenge_unlocked(guarded, RELEASE_ALL_STEP_BYTES, ScavMode::Forced);
            if r == 0 {
                break;
            }
            total += r;
            steps += 1;
        }
        (total, CycleLog { released: total, steps, goal: 0, mode: ScavMode::Forced })
    }

    /// Sets the soft memory limit in bytes (GOMEMLIMIT semantics, see the module docs); `usize::MAX` = none.
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.memory_limit.store(nbytes, Ordering::Relaxed);
    }

    /// The soft memory limit (`usize::MAX` = none).
    pub fn memory_limit(&self) -> usize {
        self.memory_limit.load(Ordering::Relaxed)
    }

    fn log_cycle(&self, released: usize, steps: usize, goal: usize, mode: ScavMode) {
        self.scav_cycles.fetch_add(1, Ordering::Relaxed);
        let retained = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        log::info!(
            "scav: released {} in {} steps, retained {} (goal {}) of {} committed, limit {} (mode {})",
            Bytes(released),
            steps,
            Bytes(retained),
            Bytes(goal),
            Bytes(self.total_committed_bytes()),
            Bytes(self.memory_limit.load(Ordering::Relaxed)),
            mode.name()
        );
    }

    /// Allocation-triggered scavenging (Go's, when the memory limit is exceeded): called after every
    /// successful allocation; cheap (a few atomic loads) unless the total is over the limit. Logs nothing.
    #[inline]
    pub(crate) fn after_alloc(&self, guarded: Guarded<'_>) {
        let limit = self.memory_limit.load(Ordering::Relaxed);
        if limit == usize::MAX {
            return;
        }
        let total = self.total_committed_bytes();
        if total <= limit {
            return;
        }
        self.scavenge_for_limit(guarded, limit, total);
    }

    #[cold]
    fn scavenge_for_limit(&self, guarded: Guarded<'_>, limit: usize, total: usize) {
        // Free committed pages the heap can release (page caches' committed pages are not reachable).
        let committed = self.committed_npages.load(Ordering::Relaxed);
        let busy = self.inuse_npages.load(Ordering::Relaxed)
            + self.cached_npages.load(Ordering::Relaxed).saturating_sub(self.cache_scav_npages.load(Ordering::Relaxed));
        if committed <= busy {
            return; // live data alone is over the limit: soft limit, carry on
        }
        let target = limit - limit / 100 * LIMIT_HEADROOM_PERCENT;
        let nonheap = self.span_sys_bytes.load(Ordering::Relaxed) + self.meta_committed_bytes.load(Ordering::Relaxed);
        if busy * PAGE_SIZE + nonheap >= target {
            // Backoff: what is in use already reaches the limit goal, so releasing the free pages cannot
            // meet the limit, and the next allocations would only commit them again (decommit/recommit on
            // every allocation). The limit is soft: leave them to the background step.
            return;
        }
        let want = total.saturating_sub(target).min((committed - busy) * PAGE_SIZE);
        let mut g = self.inner.lock(guarded);
        let r = self.scavenge_locked(&mut g, want, ScavMode::Forced);
        drop(g);
        // No log line here: this runs inside an allocation, and a logger that allocates would re-enter it.
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
    }

    /// Whether the total committed memory is above the memory limit (a few atomic loads).
    #[inline]
    pub fn over_limit(&self) -> bool {
        let limit = self.memory_limit.load(Ordering::Relaxed);
        limit != usize::MAX && self.total_committed_bytes() > limit
    }

    /// Releases free committed pages (not held by page caches) until the total is at the memory limit's
    /// goal (`limit - 5%`), decommitting without the heap lock. Used by the allocator's reclaim for the
    /// limit; the caller paces it. Returns bytes released (0 without a limit).
    pub fn release_for_limit(&self, guarded: Guarded<'_>) -> usize {
        let limit = self.memory_limit.load(Ordering::Relaxed);
        if limit == usize::MAX {
            return 0;
        }
        let target = limit - limit / 100 * LIMIT_HEADROOM_PERCENT;
        let want = self.total_committed_bytes().saturating_sub(target);
        if want == 0 {
            return 0;
        }
        let r = self.scavenge_unlocked(guarded, want, ScavMode::Forced);
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
        r
    }

    /// Releases up to `want_bytes` (rounded up to pages) of free committed pages, choosing chunks as the
    /// module docs say for `mode`, with the heap lock held throughout (the allocation path uses this: it
    /// holds the lock already). Returns bytes released.
    pub(crate) fn scavenge_locked(&self, inner: &mut HeapInner, want_bytes: usize, mode: ScavMode) -> usize {
        let want = want_bytes.div_ceil(PAGE_SIZE);
        let mut cur = ScavCursor::new(mode, inner.pa.grown_chunks());
        let mut released = 0;
        while released < want {
            let Some((idx, n)) = cur.next_run(inner, want - released) else { break };
            let addr = inner.arena_base + idx * PAGE_SIZE;
            // SAFETY: the pages are grown, free in the page allocator (nobody uses them) and committed; the
            // heap lock keeps them free until they are marked scavenged below.
            unsafe { self.source.decommit(NonNull::new_unchecked(addr as *mut u8), n * PAGE_SIZE) };
            inner.pa.set_scav(idx, n, true);
            self.committed_npages.fetch_sub(n, Ordering::Relaxed);
            released += n;
        }
        let bytes = released * PAGE_SIZE;
        self.scav_released_bytes.fetch_add(bytes, Ordering::Relaxed);
        bytes
    }

    /// As [`Heap::scavenge_locked`], but the source's `decommit` runs without the heap lock (Go's way): each
    /// run is first allocated in the page allocator (so nobody else takes it), the lock dropped, the run
    /// decommitted, and the run freed as scavenged under the lock again. Used by the background step and
    /// `release_all`. Returns bytes released.
    pub(crate) fn scavenge_unlocked(&self, guarded: Guarded<'_>, want_bytes: usize, mode: ScavMode) -> usize {
        let want = want_bytes.div_ceil(PAGE_SIZE);
        let mut released = 0;
        let mut pending: Option<(usize, usize)> = None;
        let mut cur = None;
        loop {
            let mut g = self.inner.lock(guarded);
            let inner = &mut *g;
            if inner.state != crate::page::heap::InitState::Ready {
                return 0;
            }
            if let Some((idx, n)) = pending.take() {
                inner.pa.free_range(idx, n);
                inner.pa.set_scav(idx, n, true);
                self.committed_npages.fetch_sub(n, Ordering::Relaxed);
                self.scav_inflight_npages.fetch_sub(n, Ordering::Relaxed);
                released += n;
            }
            if released >= want {
                break;
            }
            let cur = cur.get_or_insert_with(|| ScavCursor::new(mode, inner.pa.grown_chunks()));
            let Some((idx, n)) = cur.next_run(inner, want - released) else { break };
            inner.pa.alloc_range(idx, n);
            self.scav_inflight_npages.fetch_add(n, Ordering::Relaxed);
            let addr = inner.arena_base + idx * PAGE_SIZE;
            drop(g);
            // SAFETY: the run is grown and committed, and allocated to the scavenger above, so nothing else
            // uses or allocates it until it is freed (as scavenged) on the next iteration.
            unsafe { self.src(guarded).decommit(NonNull::new_unchecked(addr as *mut u8), n * PAGE_SIZE) };
            pending = Some((idx, n));
        }
        let bytes = released * PAGE_SIZE;
        self.scav_released_bytes.fetch_add(bytes, Ordering::Relaxed);
        bytes
    }
}

/// Where a scavenge is in its passes over the chunks (see the module docs: passes by density, chunks from
/// the highest down).
struct ScavCursor {
    /// Per pass, the most allocated pages a chunk may have to be visited.
    passes: &'static [usize],
    pass: usize,
    /// Chunks below `ci` remain to be visited in this pass.
    ci: usize,
    grown_chunks: usize,
}

impl ScavCursor {
    fn new(mode: ScavMode, grown_chunks: usize) -> Self {
        let passes: &'static [usize] = match mode {
            ScavMode::Lazy => &[SCAV_MOSTLY_FREE_PAGES, SCAV_CHUNK_HI_OCC_PAGES - 1],
            ScavMode::Aggressive | ScavMode::Forced => {
                &[SCAV_MOSTLY_FREE_PAGES, SCAV_CHUNK_HI_OCC_PAGES - 1, PALLOC_CHUNK_PAGES]
            }
        };
        Self { passes, pass: 0, ci: grown_chunks, grown_chunks }
    }

    /// The next run of free committed pages to release, at most `max_npages` long: the highest such run
    /// of the current chunk (the top part of it if it is longer).
    fn next_run(&mut self, inner: &HeapInner, max_npages: usize) -> Option<(usize, usize)> {
        while self.pass < self.passes.len() {
            let max_alloc = self.passes[self.pass];
            while self.ci > 0 {
                let ci = self.ci - 1;
                let c = inner.pa.chunk(ci);
                let nalloc: usize = c.alloc.iter().map(|w| w.count_ones() as usize).sum();
                let mut cand = [0u64; PALLOC_CHUNK_WORDS];
                let mut any = 0;
                for ((cw, a), sc) in cand.iter_mut().zip(&c.alloc).zip(&c.scav) {
                    *cw = !a & !sc;
                    any |= *cw;
                }
                if nalloc > max_alloc || any == 0 {
                    self.ci -= 1;
                    continue;
                }
                let is_set = |i: usize| cand[i / 64] & (1 << (i % 64)) != 0;
                // Highest candidate page: the top set bit of the highest non-zero word.
                let w = (0..PALLOC_CHUNK_WORDS).rev().find(|&w| cand[w] != 0)?;
                let top = w * 64 + 63 - cand[w].leading_zeros() as usize;
                let mut lo = top;
                while lo > 0 && top - lo + 1 < max_npages && is_set(lo - 1) {
                    lo -= 1;
                }
                // The chunk stays current: it may hold more runs.
                return Some((ci * PALLOC_CHUNK_PAGES + lo, top - lo + 1));
            }
            self.pass += 1;
            self.ci = self.grown_chunks;
        }
        None
    }
}

/// Runs [`Heap::scavenge`] every `period` on a thread of its own until `stop` becomes `true` (feature
/// `std`; a kernel calls `scavenge` from its timer or idle path instead). Spawning the thread allocates
/// through the process's global allocator.
#[cfg(feature = "std")]
pub fn spawn_scavenger<S: PageSource + 'static>(
    heap: &'static Heap<S>,
    period: std::time::Duration,
    budget_bytes: usize,
    stop: &'static core::sync::atomic::AtomicBool,
) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("goheap-scavenger".into())
        .spawn(move || {
            // SAFETY: a thread of our own that runs nothing but this loop; an allocating signal handler on it
            // would be outside the host contract (see `cpu.rs`).
            let guarded = unsafe { Guarded::new_unchecked() };
            while !stop.load(Ordering::Relaxed) {
                heap.scavenge(guarded, budget_bytes);
                std::thread::sleep(period);
            }
        })
        .expect("spawn_scavenger: cannot spawn the thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::format;

    #[test]
    fn goals() {
        let mib = 1 << 20;
        // No limit: peak + 10%.
        assert_eq!(retained_goal(100 * mib, usize::MAX, 0, 500 * mib), (110 * mib, ScavMode::Lazy));
        // Limit far above: the peak goal binds, lazy.
        assert_eq!(retained_goal(100 * mib, 1000 * mib, 2 * mib, 500 * mib), (110 * mib, ScavMode::Lazy));
        // Limit below the peak goal and committed above the limit goal: aggressive, limit - 5% - nonheap.
        let (g, m) = retained_goal(100 * mib, 100 * mib, 2 * mib, 101 * mib);
        assert_eq!(m, ScavMode::Aggressive);
        assert_eq!(g, 100 * mib - 100 * mib / 100 * 5 - 2 * mib);
    }

    #[test]
    fn bytes_display() {
        assert_eq!(format!("{}", Bytes(512)), "512 B");
        assert_eq!(format!("{}", Bytes(1536)), "1.5 KiB");
        assert_eq!(format!("{}", Bytes(5 << 20 | 1 << 19)), "5.5 MiB");
        assert_eq!(format!("{}", Bytes(usize::MAX)), "none");
    }
}
