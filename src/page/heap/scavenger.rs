//! The scavenger (Go's `mgcscavenge.go`, design 30333): gives free committed pages back to the source.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # What Go does
//! Go's background scavenger is one goroutine that releases free pages above a *retained goal*
//! (`gcPercentGoal`: the heap goal of the last GC cycle plus 10%, `retainExtraPercent`; with a memory limit
//! also `memoryLimitGoal`, 5% under the limit). It works in slices of about 1 ms and sleeps in between so
//! that it takes about 1% of one CPU (`scavengePercent`). It finds pages through a *scavenge index*
//! (`scavengeIndex`): per chunk, whether it has free unscavenged pages and how dense it is (`inUse`, and
//! `lastInUse` from the previous GC cycle, the index's *generation*), searched from the highest address
//! down with two cursors, one for the background and one for forced scavenging; the background skips
//! chunks that are dense (≥ 96.875% in use, `scavChunkHiOccFrac`) now or at the end of the previous
//! generation. Allocation scavenges *eagerly*: when the heap grows and retained memory plus the growth
//! exceeds the goal (`mheap.grow`), and when the memory limit is exceeded. `debug.FreeOSMemory` releases
//! everything (forced). `GODEBUG=scavtrace=1` prints one line per GC cycle and one per `FreeOSMemory`.
//!
//! # What goheap does, and why it differs
//! - **No GC cycle.** Frees are explicit, so there is no heap goal and no cycle. The heap tracks its own
//!   recent peak in-use size instead: `peak = max(inuse peaks over the last PEAK_WINDOW_EPOCHS epochs)`,
//!   `gc_goal = peak * (100 + RETAINED_HEADROOM_PERCENT) / 100` (10%, Go's `retainExtraPercent`). An
//!   **epoch** stands for Go's GC cycle everywhere: it is the peak window's unit, the scavenge index's
//!   generation (density history), and the `scavtrace` period. Epochs end by allocation volume — once the
//!   heap has handed out `max(EPOCH_MIN_BYTES, window peak / PEAK_WINDOW_EPOCHS)` in spans since the epoch
//!   began (about one peak's worth of allocation, as Go's GC cycles are) — or by time: [`EPOCH_NANOS`] with
//!   a clock ([`Heap::set_clock`]), else [`CALLS_PER_EPOCH`] calls of one caller ([`Tick`]): [`Heap::scavenge`]
//!   counts its own calls, `Malloc::background` those of each CPU separately, so the window does not
//!   shrink with the number of CPUs calling and an idle system forgets a peak in a few dozen ticks.
//! - **No goroutine.** The crate spawns no threads: a kernel calls `Malloc::background` (which supplies the
//!   guard token) from its idle loop or a timer interrupt, a host from a thread it owns
//!   (`spawn_scavenger`, feature `std`). A step cannot sleep, so **pacing** is a credit of CPU time: with
//!   a clock, every step earns [`SCAV_CPU_PERCENT`]% of the time elapsed since the previous one (at most
//!   [`SCAV_SLICE_NANOS`] banked), claims all of it, works until it is spent (checked after each decommit)
//!   and pays back any overrun; a step with no credit does nothing. Over time `scavenging time / elapsed ≈
//!   1%`, as Go. Without a clock (a kernel without a time source), a step releases at most its byte budget,
//!   as before. With a clock, scavenging time is counted in `HeapStats::scavenge_cpu_nanos` (all paths).
//! - **Scavenge index** (in the page allocator, see `pagealloc.rs`): exact per-chunk bits (`free`: has a
//!   free unscavenged page; `dense` now; dense in this or the previous generation) kept as bitmaps with a
//!   summary level, and two cursors. A step asks the index for the highest chunk it may take and releases
//!   the top free run of that chunk: it costs the chunks it releases from (plus one index word, and one
//!   summary word per 16 GiB between the cursor and that chunk), not the heap size. The index is kept
//!   exact (Go's `free` flag is a hint cleared lazily) because updating it is O(1) per chunk touched and it
//!   can then be checked against the bitmaps (`validate`). The density history is Go's idea with bitmaps:
//!   `dense_gen` marks chunks dense at any point of the generation by allocation or free (not by the
//!   scavenger's own runs), `dense_prev` the previous generation's; the generation change copies them
//!   (O(grown chunks / 64) words once per epoch, not per step).
//! - **Modes.** *Lazy* (below the memory limit): the background's chunks only, down to the goal.
//!   *Aggressive* (the memory limit's goal binds:
//!   `limit_goal = limit * (100 - LIMIT_HEADROOM_PERCENT) / 100 - nonheap_committed`, span descriptors and
//!   metadata counting against the limit; the goal is
//!   `min(gc_goal, limit_goal)`): the background's chunks first, then any. *Forced* (`release_all`,
//!   allocation over the limit, a failed commit): any chunk (Go's `force`). Chunks are taken from the
//!   highest address down (allocation is lowest-address first, so high pages are the least likely to be
//!   reused); within a chunk, free runs from the top down.
//! - **Concurrent steps** share the excess over the goal: each step claims (under the heap lock) a part
//!   the others have not claimed, so together they do not release below the goal.
//! - **Eager scavenging.** *Heap growth* (Go's `mheap.grow`): when an allocation grows the heap and
//!   `retained + growth > gc_goal` (the peak including this allocation), it records `min(growth, retained +
//!   growth - gc_goal)` and releases it after the allocation, without the heap lock, from the background's
//!   chunks. *Soft memory limit*: allocation never fails because of the limit. After an allocation that
//!   leaves the total above the limit, the allocating CPU releases free committed pages down to
//!   `limit_goal` if there are any; if the pages in use (with the metadata) already reach the limit goal,
//!   allocation proceeds without scavenging (*backoff*: releasing free pages then cannot meet the limit,
//!   and the next allocations would commit them again — the thrash Go's soft limit avoids). The allocator
//!   above adds its own reclaim for the limit (caches and central lists, paced by allocation volume, see
//!   `malloc/reclaim.rs`) and [`Heap::release_for_limit`].
//! - [`Heap::release_all`] is Go's `debug.FreeOSMemory`: every free committed page not held by a page cache.
//! - **`scavtrace`** is off by default ([`Heap::set_scavtrace`], `Malloc::set_scavtrace`, hosted
//!   `GODEBUG=scavtrace=1`). On, the end of each epoch in which memory was released logs Go's line
//!   ([`ScavTrace`]) through `log::info!`: `scav B KiB work (bg), E KiB work (eager), R KiB now, U% util`
//!   (B: background steps, E: eager scavenging since the previous line; R: heap bytes released now; U:
//!   in-use share of the committed heap pages), and each `release_all` logs one ending in ` (forced)` with
//!   its release as the eager figure, as Go's `FreeOSMemory` does. Go prints a line every GC cycle even with
//!   no work; epochs here end every few idle ticks, so epochs without work print nothing.
//!
//! # Invariants
//! - A page is decommitted only while free in the page allocator and not scavenged; it is then marked
//!   scavenged in the same critical section, so `committed_npages = grown - scav - cache_scav` holds.
//! - `window[..]` are inuse peaks (pages) of past epochs; `calls < CALLS_PER_EPOCH`;
//!   `claimed_bytes` = Σ bytes that steps running without the lock set out to release.
//! - Pacing: `credit_nanos <= SCAV_SLICE_NANOS`; a step works only with `credit_nanos > 0`, and on return
//!   `credit_nanos += claimed - spent`; so `Σ spent <= SCAV_CPU_PERCENT% * elapsed + SCAV_SLICE_NANOS + one
//!   run's overrun`.
//! - `gen_bg_bytes + gen_eager_bytes` = bytes released (background, eager) since the last epoch that ended
//!   with work (or since the start); `growth_todo_bytes` = growth work recorded and not yet released.
//! - The scavenge index's equations are in `pagealloc.rs` (checked by `PageAlloc::validate`).
//!
//! # Locking
//! [`ScavState`] (epochs, window, claims, pacing credit) and the scavenge index live in `HeapInner`, under
//! the heap lock. `ScavCounters` (chunks visited, CPU time, `scavtrace` switch and work figures, growth work,
//! the clock's mirror) and `Heap::scavenge_cpu_nanos` are atomics, read and updated without it. Every entry point takes a [`Guarded`]
//! token or a [`Sections`] (see `slice.rs`): it runs inside the CPU provider's guard, so no interrupt
//! handler on the same CPU can wait for the heap lock it holds. The background step, `release_all`, growth
//! and memory-limit scavenging call the source's `decommit` *without* the heap lock (still inside a guard),
//! as Go does: under the lock a run of at most [`DECOMMIT_SLICE_NPAGES`] pages is picked and taken in the
//! page allocator (`PageAlloc::scav_take`; `scav_inflight_npages` counts such runs), the lock is dropped
//! for the decommit, and the run is given back as scavenged under the lock again (`scav_return`). Each run
//! is one guarded section: given sections with windows (`Malloc` passes its provider's), the guard is
//! dropped between runs, so interrupts stay off for one run's decommit at most, whatever the step's budget
//! (a token instead runs every section in the caller's one guard). Only scavenging for a failed commit
//! runs with the heap lock held and decommits under it (at most the pages of the commit that failed). The `scavtrace` line is emitted with no lock held, and
//! by `Malloc` after it left the CPU provider's guard.

use crate::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use core::fmt;
use core::ptr::NonNull;

use crate::cpu::Guarded;
use crate::page::heap::slice::{Sections, DECOMMIT_SLICE_NPAGES};
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
pub use crate::page::pagealloc::SCAV_CHUNK_HI_OCC_PAGES;
/// Share of one CPU the background scavenger aims at when a clock is set, in percent (Go's
/// `scavengePercent`).
pub const SCAV_CPU_PERCENT: u64 = 1;
/// The most CPU time one background step may take, and the most credit that idle time accumulates (Go's
/// scavenger works in slices of about 1 ms, then sleeps 99 ms at 1%): 1 ms.
pub const SCAV_SLICE_NANOS: u64 = 1_000_000;
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
    /// A clock in nanoseconds ([`Heap::set_clock`]): epochs by time instead of calls, and CPU-time pacing.
    clock: Option<fn() -> u64>,
    /// Bytes steps running without the lock have set out to release (so concurrent steps share the work
    /// down to the goal instead of each doing all of it).
    claimed_bytes: usize,
    /// In-use peaks (pages) of past epochs, a ring.
    window: [usize; PEAK_WINDOW_EPOCHS],
    wpos: usize,
    /// CPU-time pacing (with a clock): nanoseconds of scavenging the background may still spend
    /// (`<= SCAV_SLICE_NANOS`; negative after a step overran its slice), and the clock reading at which it
    /// was last credited.
    credit_nanos: i64,
    credit_at: u64,
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
            credit_nanos: 0,
            credit_at: 0,
        }
    }
}

impl Default for ScavState {
    fn default() -> Self {
        Self::new()
    }
}

/// Scavenger counters and switches read without the heap lock (atomics in the [`Heap`]; its
/// `scavenge_cpu_nanos` counts the scavenger's time by the clock).
#[derive(Debug)]
pub(crate) struct ScavCounters {
    /// Chunks the scavenger took a run from (each visit of a chunk through the index releases pages).
    pub(crate) chunks_visited: AtomicUsize,
    /// `scavtrace` on: one line per scavenger generation with work, and per `release_all`.
    pub(crate) trace: AtomicBool,
    /// Bytes released by background steps / eagerly (allocation path, growth, limit) since the last
    /// generation ended with work (the `scavtrace` line's two work figures).
    pub(crate) gen_bg_bytes: AtomicUsize,
    pub(crate) gen_eager_bytes: AtomicUsize,
    /// Bytes to release after a heap growth past the goal, left by the growing allocation for its own
    /// `after_alloc` (which runs without the heap lock).
    pub(crate) growth_todo_bytes: AtomicUsize,
    /// Bytes released because the heap grew past the goal (Go's `heapGrowth` scavenging).
    pub(crate) growth_bytes: AtomicUsize,
    /// The clock, as a function pointer (null = none): readable without the heap lock.
    pub(crate) clock: AtomicPtr<()>,
    /// Where `scavtrace` lines go, a [`ScavTraceSink`] (null = the `log` facade).
    pub(crate) sink: AtomicPtr<()>,
}

/// A receiver of `scavtrace` lines, called outside the CPU provider's guard and every allocator lock
/// (the hosted allocator's `GODEBUG=scavtrace=1` writes them to standard error, as Go does).
pub type ScavTraceSink = fn(&ScavTrace);

impl ScavCounters {
    /// All zero, trace off, no clock.
    pub(crate) const fn new() -> Self {
        Self {
            chunks_visited: AtomicUsize::new(0),
            trace: AtomicBool::new(false),
            gen_bg_bytes: AtomicUsize::new(0),
            gen_eager_bytes: AtomicUsize::new(0),
            growth_todo_bytes: AtomicUsize::new(0),
            growth_bytes: AtomicUsize::new(0),
            clock: AtomicPtr::new(core::ptr::null_mut()),
            sink: AtomicPtr::new(core::ptr::null_mut()),
        }
    }

    fn clock(&self) -> Option<fn() -> u64> {
        let p = self.clock.load(Ordering::Acquire);
        if p.is_null() {
            return None;
        }
        // SAFETY: a non-null value was stored by `Heap::set_clock` from a `fn() -> u64`; function pointers
        // round-trip through `*mut ()`.
        Some(unsafe { core::mem::transmute::<*mut (), fn() -> u64>(p) })
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

/// A `scavtrace` line (Go's `printScavTrace`), kept until the caller has left the CPU provider's guard (a
/// logger may allocate, take its own locks or be slow: none of that belongs inside the guard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub struct ScavTrace {
    /// Bytes released by background steps since the previous line.
    pub bg_bytes: usize,
    /// Bytes released eagerly (allocation path: heap growth, memory limit, failed commit) since then.
    pub eager_bytes: usize,
    /// Heap bytes currently released (Go's `HeapReleased`: grown pages not committed).
    pub released_bytes: usize,
    /// `inuse * 100 / retained` (Go's "util": the share of committed heap memory in use).
    pub util_percent: usize,
    /// The line is for a `release_all` (Go's `debug.FreeOSMemory`): it ends in ` (forced)`.
    pub forced: bool,
}

impl fmt::Display for ScavTrace {
    /// Go's format: `scav 0 KiB work (bg), 186960 KiB work (eager), 208712 KiB now, 9% util (forced)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "scav {} KiB work (bg), {} KiB work (eager), {} KiB now, {}% util",
            self.bg_bytes >> 10,
            self.eager_bytes >> 10,
            self.released_bytes >> 10,
            self.util_percent
        )?;
        if self.forced {
            f.write_str(" (forced)")?;
        }
        Ok(())
    }
}

/// The log line a scavenger call left for its caller to emit outside the guard (only with `scavtrace` on).
pub(crate) type CycleLog = ScavTrace;

impl ScavTrace {
    /// Emits the line through the heap's sink ([`Heap::set_scavtrace_sink`]), or the `log` facade at level
    /// info without one (call it outside the guard).
    pub(crate) fn emit<S: PageSource>(self, heap: &Heap<S>) {
        let p = heap.scav_ctr.sink.load(Ordering::Acquire);
        if p.is_null() {
            log::info!("{self}");
        } else {
            // SAFETY: a non-null value was stored by `Heap::set_scavtrace_sink` from a `ScavTraceSink`;
            // function pointers round-trip through `*mut ()`.
            let sink = unsafe { core::mem::transmute::<*mut (), ScavTraceSink>(p) };
            sink(&self);
        }
    }
}

impl<S: PageSource> Heap<S> {
    /// One background scavenger step: releases free committed pages if the heap retains more than its goal
    /// (see the module docs), at most `budget_bytes` (rounded up to pages) without a clock, or for at most
    /// the CPU time its pacing allows with one ([`Heap::set_clock`]). Returns bytes released. Logs the
    /// `scavtrace` line of a generation that ended, if `scavtrace` is on (inside the caller's guard;
    /// `Malloc::background` logs after it). For a single caller: every [`CALLS_PER_EPOCH`] calls end an
    /// epoch (allocators with several CPUs use `Malloc::background`, which counts calls per CPU).
    pub fn scavenge(&self, mut guarded: impl Sections, budget_bytes: usize) -> usize {
        let (step, log) = self.scavenge_paced(&mut guarded, budget_bytes, Tick::Own);
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

    /// Chunks the scavenger has taken a run from since the heap was created: the work its steps did,
    /// counted per chunk visited through the scavenge index (a step visits no chunk it releases nothing
    /// from).
    pub fn scav_chunks_visited(&self) -> usize {
        self.scav_ctr.chunks_visited.load(Ordering::Relaxed)
    }

    /// Turns Go's `scavtrace` on or off (off by default): with it, one line in Go's format
    /// ([`ScavTrace`]) per scavenger generation in which memory was released, and one per `release_all`,
    /// through the `log` facade at level info.
    pub fn set_scavtrace(&self, on: bool) {
        self.scav_ctr.trace.store(on, Ordering::Relaxed);
    }

    /// Sends `scavtrace` lines to `sink` instead of the `log` facade (`None`: back to the facade).
    pub fn set_scavtrace_sink(&self, sink: Option<ScavTraceSink>) {
        let p = sink.map_or(core::ptr::null_mut(), |f| f as *mut ());
        self.scav_ctr.sink.store(p, Ordering::Release);
    }

    /// Whether `scavtrace` is on.
    pub fn scavtrace(&self) -> bool {
        self.scav_ctr.trace.load(Ordering::Relaxed)
    }

    /// Sets a clock (monotonic nanoseconds); `None` (the default) removes it. With a clock, the peak
    /// window's epochs are timed ([`EPOCH_NANOS`]), background steps are paced by CPU time
    /// ([`SCAV_CPU_PERCENT`] of one CPU, in slices of at most [`SCAV_SLICE_NANOS`]) instead of their byte
    /// budget, and scavenging time is counted (`HeapStats::scavenge_cpu_nanos`). The clock is read with
    /// the heap lock held and on the allocation path: it must not allocate or take a lock an allocating
    /// interrupt handler could hold (a TSC or tick-counter read is the intended kind).
    pub fn set_clock(&self, guarded: Guarded<'_>, clock: Option<fn() -> u64>) {
        let mut g = self.inner.lock(guarded);
        g.scav.clock = clock;
        let now = clock.map_or(0, |c| c());
        g.scav.epoch_start_nanos = now;
        // A first slice of credit: the first step may work at once (Go's scavenger starts by working).
        g.scav.credit_nanos = SCAV_SLICE_NANOS as i64;
        g.scav.credit_at = now;
        self.scav_ctr.clock.store(clock.map_or(core::ptr::null_mut(), |c| c as *mut ()), Ordering::Release);
    }

    /// Runs `f` and adds its duration by the clock (if any) to `scavenge_cpu_nanos`.
    fn timed<R>(&self, f: impl FnOnce() -> R) -> R {
        let Some(c) = self.scav_ctr.clock() else { return f() };
        let t0 = c();
        let r = f();
        self.scavenge_cpu_nanos.fetch_add(c().saturating_sub(t0), Ordering::Relaxed);
        r
    }

    /// One scavenger step with the caller's pacing input (see [`Tick`]), returning the `scavtrace` line of
    /// a generation that ended instead of emitting it (the caller emits it outside its guard).
    pub(crate) fn scavenge_paced(
        &self,
        secs: &mut impl Sections,
        budget_bytes: usize,
        tick: Tick,
    ) -> (ScavStep, Option<CycleLog>) {
        // Three kinds of section: the plan (heap lock), the decommits (`scavenge_unlocked`, one section per
        // run of at most `DECOMMIT_SLICE_NPAGES`), the pacing's settlement (heap lock).
        let planned = secs.section(|guarded| self.scavenge_plan(guarded, budget_bytes, tick));
        let Some((want, slice, mode, goal, step_start, log)) = planned else {
            return (ScavStep::default(), None);
        };
        let mut spent = 0;
        let released = match (want, slice) {
            (0, _) => 0,
            (_, Some((c, slice))) => {
                let t0 = c();
                let r = self.scavenge_unlocked(secs, want, mode, Some((c, t0 + slice)));
                spent = c().saturating_sub(t0);
                self.scavenge_cpu_nanos.fetch_add(spent, Ordering::Relaxed);
                r
            }
            (_, None) => self.scavenge_unlocked(secs, want, mode, None),
        };
        self.scav_ctr.gen_bg_bytes.fetch_add(released, Ordering::Relaxed);
        secs.section(|guarded| {
            let mut g = self.inner.lock(guarded);
            let st = &mut g.scav;
            st.claimed_bytes -= want;
            if let Some((_, slice)) = slice {
                // Return what the slice left, or owe what it overran. The step's own time earns nothing:
                // credit accrues from its end (so `spent ≈ 1%` of the time outside the scavenger).
                st.credit_nanos = st.credit_nanos.saturating_add(slice as i64 - spent.min(i64::MAX as u64) as i64);
                st.credit_nanos = st.credit_nanos.min(SCAV_SLICE_NANOS as i64);
                st.credit_at = st.credit_at.max(step_start.saturating_add(spent));
            }
        });
        let over_goal = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE > goal;
        (ScavStep { released, over_goal }, log)
    }

    /// The planning part of a scavenger step (heap lock held inside): advances the peak window, computes
    /// the goal and claims the step's share of the excess. `None` before the heap is initialised.
    #[allow(clippy::type_complexity)]
    fn scavenge_plan(
        &self,
        guarded: Guarded<'_>,
        budget_bytes: usize,
        tick: Tick,
    ) -> Option<(usize, Option<(fn() -> u64, u64)>, ScavMode, usize, u64, Option<CycleLog>)> {
        let mut g = self.inner.lock(guarded);
        if g.state != crate::page::heap::InitState::Ready {
            return None;
        }
        let inner = &mut *g;
        let inuse = self.inuse_npages.load(Ordering::Relaxed);
        let (window_peak, gen_ended) = self.advance_window_locked(&mut inner.scav, inuse, tick);
        let mut log = None;
        if gen_ended {
            // A new generation of the index's density history (Go: once per GC cycle).
            inner.pa.index_next_gen();
            log = self.end_generation_trace();
        }
        self.window_peak_npages.store(window_peak, Ordering::Relaxed);
        let peak = window_peak.max(self.epoch_peak_npages.load(Ordering::Relaxed)).max(inuse) * PAGE_SIZE;
        let committed = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let nonheap = self.span_sys_bytes.load(Ordering::Relaxed) + self.meta_committed_bytes.load(Ordering::Relaxed);
        let limit = self.memory_limit.load(Ordering::Relaxed);
        let (goal, mode) = retained_goal(peak, limit, nonheap, committed);
        self.retained_goal_bytes.store(goal, Ordering::Relaxed);
        // Steps running concurrently share the excess: each claims what the others have not.
        let excess = committed.saturating_sub(goal).saturating_sub(inner.scav.claimed_bytes);
        // Pacing: with a clock, by CPU time (the credit this step claims), else by the byte budget.
        let st = &mut inner.scav;
        let mut step_start = 0;
        let (want, slice) = match st.clock {
            Some(c) if excess > 0 => {
                let now = c();
                let earned = now.saturating_sub(st.credit_at).saturating_mul(SCAV_CPU_PERCENT) / 100;
                st.credit_at = now;
                st.credit_nanos =
                    (st.credit_nanos.saturating_add(earned.min(i64::MAX as u64) as i64)).min(SCAV_SLICE_NANOS as i64);
                step_start = now;
                if st.credit_nanos > 0 {
                    let slice = st.credit_nanos as u64;
                    st.credit_nanos = 0; // claimed: concurrent steps find none and skip
                    (excess.next_multiple_of(PAGE_SIZE), Some((c, slice)))
                } else {
                    (0, None)
                }
            }
            Some(_) => (0, None),
            None => (budget_bytes.min(excess).next_multiple_of(PAGE_SIZE), None),
        };
        st.claimed_bytes += want;
        drop(g);
        Some((want, slice, mode, goal, step_start, log))
    }

    /// A generation ended: if memory was released during it, counts a scavenger cycle and, with
    /// `scavtrace` on, returns its line (resetting the work figures).
    fn end_generation_trace(&self) -> Option<CycleLog> {
        let c = &self.scav_ctr;
        if c.gen_bg_bytes.load(Ordering::Relaxed) == 0 && c.gen_eager_bytes.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let bg = c.gen_bg_bytes.swap(0, Ordering::Relaxed);
        let eager = c.gen_eager_bytes.swap(0, Ordering::Relaxed);
        self.scav_cycles.fetch_add(1, Ordering::Relaxed);
        self.scavtrace().then(|| self.trace_line(bg, eager, false))
    }

    /// Go's `scavtrace` figures now.
    fn trace_line(&self, bg_bytes: usize, eager_bytes: usize, forced: bool) -> ScavTrace {
        let grown = self.grown_bytes.load(Ordering::Relaxed);
        let retained = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let inuse = self.inuse_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        ScavTrace {
            bg_bytes,
            eager_bytes,
            released_bytes: grown.saturating_sub(retained),
            util_percent: (inuse.min(retained) * 100).checked_div(retained).unwrap_or(0),
            forced,
        }
    }

    /// Ends the epoch if it is over (by clock, by the caller's calls, or by allocation volume); returns
    /// the window's peak (pages) and whether an epoch ended. Heap lock held.
    fn advance_window_locked(&self, st: &mut ScavState, inuse: usize, tick: Tick) -> (usize, bool) {
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
            return (window_peak, false);
        }
        st.calls = 0;
        st.window[st.wpos] = self.epoch_peak_npages.swap(inuse, Ordering::Relaxed);
        st.wpos = (st.wpos + 1) % PEAK_WINDOW_EPOCHS;
        st.epoch += 1;
        st.epoch_start_volume = volume;
        st.epoch_start_nanos = now;
        self.scav_epoch.store(st.epoch, Ordering::Relaxed);
        (st.window.iter().copied().max().unwrap_or(0), true)
    }

    /// Releases every free committed page not held by a page cache (Go's `debug.FreeOSMemory`; flush the
    /// page caches first to include theirs). Returns bytes released; with `scavtrace` on, logs a
    /// `(forced)` line (inside the caller's guard; `Malloc::release_all` logs after it).
    ///
    /// Given a token, everything runs inside the caller's one guard; given sections
    /// ([`ProviderSections`](crate::page::heap::slice::ProviderSections), as `Malloc::release_all` does),
    /// each run of at most [`DECOMMIT_SLICE_NPAGES`] pages is decommitted in a section of its own, with
    /// interrupt windows between them (see `slice.rs`).
    pub fn release_all(&self, mut guarded: impl Sections) -> usize {
        let (total, log) = self.release_all_step(&mut guarded);
        if let Some(log) = log {
            log.emit(self);
        }
        total
    }

    /// [`Heap::release_all`], returning its `scavtrace` line instead of emitting it.
    pub(crate) fn release_all_step(&self, secs: &mut impl Sections) -> (usize, Option<CycleLog>) {
        let total = self.timed(|| {
            let mut total = 0;
            loop {
                let r = self.scavenge_unlocked(secs, RELEASE_ALL_STEP_BYTES, ScavMode::Forced, None);
                if r == 0 {
                    break;
                }
                total += r;
            }
            total
        });
        self.scav_cycles.fetch_add(1, Ordering::Relaxed);
        // Go prints `printScavTrace(0, released, true)`: the forced release as the eager figure.
        (total, self.scavtrace().then(|| self.trace_line(0, total, true)))
    }

    /// Sets the soft memory limit in bytes (GOMEMLIMIT semantics, see the module docs); `usize::MAX` = none.
    pub fn set_memory_limit(&self, nbytes: usize) {
        self.memory_limit.store(nbytes, Ordering::Relaxed);
    }

    /// The soft memory limit (`usize::MAX` = none).
    pub fn memory_limit(&self) -> usize {
        self.memory_limit.load(Ordering::Relaxed)
    }

    /// Allocation-triggered scavenging (Go's, when the memory limit is exceeded or the heap grew past the
    /// goal): called after every successful allocation without the heap lock; cheap (a few atomic loads)
    /// unless the total is over the limit or a growth left work. Logs nothing.
    #[inline]
    pub(crate) fn after_alloc(&self, guarded: &mut impl Sections) {
        if self.scav_ctr.growth_todo_bytes.load(Ordering::Relaxed) != 0 {
            self.scavenge_for_growth(guarded);
        }
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

    /// Go's scavenging on heap growth (`mheap.grow`): the heap just grew by `[idx, idx + npages)` (allocated,
    /// about to be committed); if the retained memory plus that growth exceeds the retained goal (recent peak,
    /// including this allocation, plus 10%), leaves `min(growth, overage)` for the allocating caller's
    /// `after_alloc` to release without the heap lock, from the chunks the background would take (Go's
    /// `force = false`). The goal here is the peak goal only: the memory limit has its own path. Heap lock
    /// held.
    pub(crate) fn note_growth_locked(&self, inner: &HeapInner, idx: usize, npages: usize) {
        let growth = inner.pa.count_scav(idx, npages) * PAGE_SIZE;
        let inuse = self.inuse_npages.load(Ordering::Relaxed) + npages;
        let peak = self
            .window_peak_npages
            .load(Ordering::Relaxed)
            .max(self.epoch_peak_npages.load(Ordering::Relaxed))
            .max(inuse)
            * PAGE_SIZE;
        let (goal, _) = retained_goal(peak, usize::MAX, 0, 0);
        let retained = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        if growth == 0 || retained + growth <= goal {
            return;
        }
        // Free committed pages the heap itself holds (nothing to do without them).
        let busy = inuse
            + self.cached_npages.load(Ordering::Relaxed).saturating_sub(self.cache_scav_npages.load(Ordering::Relaxed))
            + self.scav_inflight_npages.load(Ordering::Relaxed)
            + self.pending_npages.load(Ordering::Relaxed);
        if retained / PAGE_SIZE <= busy.saturating_sub(npages) {
            return;
        }
        let todo = growth.min(retained + growth - goal);
        self.scav_ctr.growth_todo_bytes.fetch_add(todo, Ordering::Relaxed);
    }

    #[cold]
    fn scavenge_for_growth(&self, guarded: &mut impl Sections) {
        let todo = self.scav_ctr.growth_todo_bytes.swap(0, Ordering::Relaxed);
        if todo == 0 {
            return;
        }
        let r = self.timed(|| self.scavenge_unlocked(guarded, todo, ScavMode::Lazy, None));
        self.scav_ctr.growth_bytes.fetch_add(r, Ordering::Relaxed);
        self.scav_ctr.gen_eager_bytes.fetch_add(r, Ordering::Relaxed);
    }

    #[cold]
    fn scavenge_for_limit(&self, guarded: &mut impl Sections, limit: usize, total: usize) {
        // Free committed pages the heap can release (page caches' committed pages are not reachable).
        let committed = self.committed_npages.load(Ordering::Relaxed);
        let busy = self.inuse_npages.load(Ordering::Relaxed)
            + self.cached_npages.load(Ordering::Relaxed).saturating_sub(self.cache_scav_npages.load(Ordering::Relaxed))
            + self.pending_npages.load(Ordering::Relaxed);
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
        // Decommits without the heap lock, a run of at most `DECOMMIT_SLICE_NPAGES` per section.
        let r = self.timed(|| self.scavenge_unlocked(guarded, want, ScavMode::Forced, None));
        // No log line here: this runs inside an allocation, and a logger that allocates would re-enter it.
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
        self.scav_ctr.gen_eager_bytes.fetch_add(r, Ordering::Relaxed);
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
    pub fn release_for_limit(&self, mut guarded: impl Sections) -> usize {
        let limit = self.memory_limit.load(Ordering::Relaxed);
        if limit == usize::MAX {
            return 0;
        }
        let target = limit - limit / 100 * LIMIT_HEADROOM_PERCENT;
        let want = self.total_committed_bytes().saturating_sub(target);
        if want == 0 {
            return 0;
        }
        let r = self.timed(|| self.scavenge_unlocked(&mut guarded, want, ScavMode::Forced, None));
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
        self.scav_ctr.gen_eager_bytes.fetch_add(r, Ordering::Relaxed);
        r
    }

    /// Releases up to `want_bytes` (rounded up to pages) of free committed pages, choosing chunks as the
    /// module docs say for `mode`, with the heap lock held throughout (the allocation path uses this: it
    /// holds the lock already). Returns bytes released.
    pub(crate) fn scavenge_locked(&self, inner: &mut HeapInner, want_bytes: usize, mode: ScavMode) -> usize {
        let want = want_bytes.div_ceil(PAGE_SIZE);
        let mut released = 0;
        while released < want {
            let Some((idx, n)) = self.next_run(inner, mode, want - released) else { break };
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
    /// run is first taken in the page allocator (so nobody else allocates it), the lock dropped, the run
    /// decommitted, and the run given back as scavenged under the lock again. Used by the background step,
    /// `release_all`, growth and the limit's reclaim. With `deadline = Some((clock, t))`, stops after the
    /// first run that ends at or after `t` (the CPU-time slice). Returns bytes released.
    pub(crate) fn scavenge_unlocked(
        &self,
        secs: &mut impl Sections,
        want_bytes: usize,
        mode: ScavMode,
        deadline: Option<(fn() -> u64, u64)>,
    ) -> usize {
        let want = want_bytes.div_ceil(PAGE_SIZE);
        let mut released = 0;
        let mut pending: Option<(usize, usize)> = None;
        // One guarded section per run: give back the previous run, take the next (at most
        // `DECOMMIT_SLICE_NPAGES`), decommit it. Between sections the taken run is allocated in the page
        // allocator and counted in `scav_inflight_npages`, so nobody else touches it (see `slice.rs`).
        loop {
            let next = secs.section(|guarded| {
                let mut g = self.inner.lock(guarded);
                let inner = &mut *g;
                if inner.state != crate::page::heap::InitState::Ready {
                    return None;
                }
                if let Some((idx, n)) = pending.take() {
                    inner.pa.scav_return(idx, n);
                    self.committed_npages.fetch_sub(n, Ordering::Relaxed);
                    self.scav_inflight_npages.fetch_sub(n, Ordering::Relaxed);
                    released += n;
                    if deadline.is_some_and(|(c, t)| c() >= t) {
                        return None; // the slice is used up
                    }
                }
                if released >= want {
                    return None;
                }
                let (idx, n) = self.next_run(inner, mode, (want - released).min(DECOMMIT_SLICE_NPAGES))?;
                inner.pa.scav_take(idx, n);
                self.scav_inflight_npages.fetch_add(n, Ordering::Relaxed);
                let addr = inner.arena_base + idx * PAGE_SIZE;
                drop(g);
                // SAFETY: the run is grown and committed, and taken by the scavenger above, so nothing else
                // uses or allocates it until it is given back (as scavenged) in the next section.
                unsafe { self.src(guarded).decommit(NonNull::new_unchecked(addr as *mut u8), n * PAGE_SIZE) };
                Some((idx, n))
            });
            match next {
                Some(run) => pending = Some(run),
                None => break,
            }
        }
        let bytes = released * PAGE_SIZE;
        self.scav_released_bytes.fetch_add(bytes, Ordering::Relaxed);
        bytes
    }

    /// The next run of free committed pages to release, at most `max_npages` long: the highest such run of
    /// the chunk the scavenge index gives for `mode` (the top part of the run if it is longer). Lazy: the
    /// background's chunks only (not dense); aggressive: those first, then any; forced: any chunk, from the
    /// top. Heap lock held.
    fn next_run(&self, inner: &mut HeapInner, mode: ScavMode, max_npages: usize) -> Option<(usize, usize)> {
        let ci = match mode {
            ScavMode::Lazy => inner.pa.index_find(false)?,
            ScavMode::Aggressive => match inner.pa.index_find(false) {
                Some(ci) => ci,
                None => inner.pa.index_find(true)?,
            },
            ScavMode::Forced => inner.pa.index_find(true)?,
        };
        self.scav_ctr.chunks_visited.fetch_add(1, Ordering::Relaxed);
        let c = inner.pa.chunk(ci);
        let mut cand = [0u64; PALLOC_CHUNK_WORDS];
        for ((cw, a), sc) in cand.iter_mut().zip(&c.alloc).zip(&c.scav) {
            *cw = !a & !sc;
        }
        let is_set = |i: usize| cand[i / 64] & (1 << (i % 64)) != 0;
        // Highest candidate page: the top set bit of the highest non-zero word (the index's `free` bit is
        // exact, so there is one).
        let w = (0..PALLOC_CHUNK_WORDS).rev().find(|&w| cand[w] != 0);
        debug_assert!(w.is_some(), "scavenger: the index gave chunk {ci} with nothing to release");
        let w = w?;
        let top = w * 64 + 63 - cand[w].leading_zeros() as usize;
        let mut lo = top;
        while lo > 0 && top - lo + 1 < max_npages && is_set(lo - 1) {
            lo -= 1;
        }
        Some((ci * PALLOC_CHUNK_PAGES + lo, top - lo + 1))
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
