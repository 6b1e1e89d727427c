//! The scavenger as Go (issue 14): a step's work does not grow with the heap (scavenge index), CPU-time
//! pacing by a clock with the byte budget as fallback, scavenging on heap growth past the goal, dense chunks
//! left to forced scavenging, and `scavtrace` (off by default, Go's line when on).
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use goheap::cpu::Guarded;
use goheap::page::heap::scavenger::{ScavTrace, CALLS_PER_EPOCH, EPOCH_NANOS, PEAK_WINDOW_EPOCHS, SCAV_SLICE_NANOS};
use goheap::page::heap::slice::DECOMMIT_SLICE_NPAGES;
use goheap::page::heap::{span_info, Heap};
use goheap::page::pagealloc::{PALLOC_CHUNK_BYTES, PALLOC_CHUNK_PAGES};
use goheap::page::span::Span;
use goheap::source::bounded::BoundedSource;
use goheap::source::mmap::MmapSource;
use goheap::source::PageSource;
use goheap::PAGE_SIZE;

fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

const MIB: usize = 1 << 20;

/// A heap over the bounded source (it answers `is_committed`), with no bound on commits.
fn bheap(arena: usize) -> Heap<BoundedSource> {
    Heap::with_max_bytes(BoundedSource::with_mmap(arena + 32 * MIB, usize::MAX), arena)
}

fn base(s: NonNull<Span>) -> usize {
    // SAFETY: live span of the heap under test.
    unsafe { span_info(s).base }
}

/// Budget-0 steps until the peak window has forgotten everything but the present (and two generations
/// of the index's density history have passed). Releases nothing.
fn age<S: PageSource>(h: &Heap<S>) {
    for _ in 0..CALLS_PER_EPOCH * (PEAK_WINDOW_EPOCHS + 2) {
        assert_eq!(h.scavenge(g(), 0), 0);
    }
}

/// Chunks visited by the background steps that release 16 MiB of free committed pages low in a heap
/// grown to `size` whose other pages are all free and scavenged (the benchmark's setup, deterministic).
fn chunks_visited_per_round(size: usize) -> (usize, usize) {
    let h: &'static Heap<MmapSource> = Box::leak(Box::new(Heap::with_max_bytes(MmapSource::new(), size)));
    let all = h.alloc_span(g(), None, size / PAGE_SIZE, 0).unwrap();
    // SAFETY: live span, untouched.
    unsafe { h.free_span(g(), None, all) };
    h.release_all(g());
    let _hold = h.alloc_span(g(), None, 16 * MIB / PAGE_SIZE, 0).unwrap();
    let tmp = h.alloc_span(g(), None, 16 * MIB / PAGE_SIZE, 0).unwrap();
    // SAFETY: live span, untouched.
    unsafe { h.free_span(g(), None, tmp) };
    age(h);
    let before = h.scav_chunks_visited();
    let mut steps = 0;
    while h.scavenge(g(), 64 << 10) != 0 {
        steps += 1;
    }
    h.validate(g());
    (h.scav_chunks_visited() - before, steps)
}

/// A step's work does not grow with the heap: releasing the same 14.4 MiB from a 64 MiB, a 1 GiB and a
/// 16 GiB heap visits the same chunks, one per 64 KiB step (before the index, every step scanned every
/// chunk above the free memory: 4096 of them at 16 GiB).
#[test]
fn step_work_flat_as_the_heap_grows() {
    let small = chunks_visited_per_round(64 * MIB);
    let mid = chunks_visited_per_round(1 << 30);
    let big = chunks_visited_per_round(16 << 30);
    assert!(small.1 > 200, "the round must release in many steps: {small:?}");
    assert_eq!(small.0, small.1, "one chunk visited per step");
    assert_eq!(mid, small);
    assert_eq!(big, small);
}

/// A page source whose `decommit` advances a fake clock by `DECOMMIT_NANOS`: scavenging costs time.
struct TimedSource;
static PACE_NANOS: AtomicU64 = AtomicU64::new(1_000_000_000);
const DECOMMIT_NANOS: u64 = 250_000;
static SRC: MmapSource = MmapSource::new();
/// Bytes of one decommit of the scavenger (a run of at most `DECOMMIT_SLICE_NPAGES` pages).
const SLICE_BYTES: usize = DECOMMIT_SLICE_NPAGES * PAGE_SIZE;

fn pace_clock() -> u64 {
    PACE_NANOS.load(Ordering::Relaxed)
}

// SAFETY: forwards to `MmapSource`, adding only a clock advance to `decommit`.
unsafe impl PageSource for TimedSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        SRC.reserve(nbytes, align)
    }
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { SRC.commit(addr, nbytes) }
    }
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        PACE_NANOS.fetch_add(DECOMMIT_NANOS, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { SRC.decommit(addr, nbytes) }
    }
    fn commit_zeroes(&self) -> bool {
        SRC.commit_zeroes()
    }
}

/// With a clock, a background step works for the CPU time its pacing allows (1% of the time elapsed, at
/// most a 1 ms slice) and stops when it is used, whatever its byte budget; a step with no credit left does
/// nothing; the time is counted in `scavenge_cpu_nanos`. Each decommit (one run of `DECOMMIT_SLICE_NPAGES`
/// pages here: the scavenger's slice, see `page/heap/slice.rs`) costs 250 µs.
#[test]
fn pacing_by_cpu_time() {
    let h = Heap::with_max_bytes(TimedSource, 512 * MIB);
    h.set_clock(g(), Some(pace_clock));
    let spans: Vec<_> = (0..100).map(|_| h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap()).collect();
    for &s in &spans[4..] {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    // Time passes (100 ms per step) until the 400 MiB peak leaves the window: nothing to release until
    // then. The first step that releases has a full slice of credit (1 ms): four decommits of a run of
    // `DECOMMIT_SLICE_NPAGES` pages, then the slice is used up (whatever its 1-page byte budget).
    let mut first = 0;
    for i in 0..PEAK_WINDOW_EPOCHS + 3 {
        PACE_NANOS.fetch_add(EPOCH_NANOS, Ordering::Relaxed);
        let t0 = pace_clock();
        first = h.scavenge(g(), PAGE_SIZE);
        if first != 0 {
            assert!(i >= PEAK_WINDOW_EPOCHS - 1, "released at step {i}, with the peak in the window");
            assert_eq!(pace_clock() - t0, SCAV_SLICE_NANOS);
            break;
        }
        assert_eq!(h.stats().scavenge_cpu_nanos, 0);
    }
    assert_eq!(first, 4 * SLICE_BYTES, "a 1 ms slice");
    assert_eq!(h.stats().scavenge_cpu_nanos, SCAV_SLICE_NANOS);
    // No time has passed since: no credit, the step does nothing although the heap is over its goal.
    assert_eq!(h.scavenge(g(), usize::MAX), 0, "no CPU time left");
    // 50 ms later: 1% of it is 500 µs, two decommits.
    PACE_NANOS.fetch_add(50_000_000, Ordering::Relaxed);
    assert_eq!(h.scavenge(g(), usize::MAX), 2 * SLICE_BYTES);
    assert_eq!(h.stats().scavenge_cpu_nanos, SCAV_SLICE_NANOS + 500_000);
    // Over a long run the scavenger's time stays at 1% of the time elapsed (within one slice).
    let (c0, t0) = (h.stats().scavenge_cpu_nanos, pace_clock());
    for _ in 0..20 {
        PACE_NANOS.fetch_add(10_000_000, Ordering::Relaxed);
        h.scavenge(g(), usize::MAX);
    }
    let (spent, elapsed) = (h.stats().scavenge_cpu_nanos - c0, pace_clock() - t0);
    let target = (elapsed - spent) / 100; // 1% of the time outside the scavenger
    assert!(spent.abs_diff(target) <= SCAV_SLICE_NANOS, "spent {spent} ns of {elapsed} ns, target 1%");
    assert!(spent > 0);
    h.set_clock(g(), None);
    for s in spans.into_iter().take(4) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.validate(g());
}

/// Without a clock, a step releases at most its byte budget and no CPU time is counted.
#[test]
fn pacing_falls_back_to_the_byte_budget() {
    let h = Heap::with_max_bytes(MmapSource::new(), 256 * MIB);
    let spans: Vec<_> = (0..16).map(|_| h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap()).collect();
    for &s in &spans[4..] {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    age(&h);
    assert_eq!(h.scavenge(g(), MIB + 1), MIB + PAGE_SIZE, "the budget, rounded up to pages");
    assert_eq!(h.scavenge(g(), 3 * PAGE_SIZE), 3 * PAGE_SIZE);
    assert_eq!(h.stats().scavenge_cpu_nanos, 0);
    for s in spans.into_iter().take(4) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.validate(g());
}

/// Go scavenges when the heap grows past its goal: the free committed chunks left between live ones
/// (1, 3, 5, 7) cannot hold a 2-chunk span, so it takes chunk 7 and one new chunk: the heap grows by
/// 4 MiB while it retains 32 MiB against a goal of (16 + 8) MiB + 10%, and the growing allocation
/// releases `min(growth, overage)` = 4 MiB of the free chunks (the highest left: chunk 5). An allocation
/// that fits does not.
#[test]
fn scavenges_on_growth_past_the_goal() {
    let h = bheap(256 * MIB);
    let spans: Vec<_> = (0..8).map(|_| h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap()).collect();
    for &s in spans.iter().skip(1).step_by(2) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    age(&h);
    assert_eq!(h.stats().committed_bytes, 32 * MIB);
    // Fits in a free chunk: no growth, nothing released.
    let fits = h.alloc_span(g(), None, 16, 0).unwrap();
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, fits) };
    assert_eq!(h.stats().scavenged_growth_bytes, 0);
    let big = h.alloc_span(g(), None, 2 * PALLOC_CHUNK_PAGES, 0).unwrap();
    assert_eq!(base(big), h.arena_base() + 7 * PALLOC_CHUNK_BYTES, "chunk 7 and a new one");
    assert_eq!(h.stats().grown_bytes, 9 * PALLOC_CHUNK_BYTES, "the heap grew");
    let st = h.stats();
    assert_eq!(st.scavenged_growth_bytes, 4 * MIB);
    assert_eq!(st.committed_bytes, 32 * MIB, "32 MiB retained + 4 MiB grown - 4 MiB released");
    let src = h.source();
    let chunk = |i: usize| h.arena_base() + i * PALLOC_CHUNK_BYTES;
    for p in 0..PALLOC_CHUNK_PAGES {
        assert_eq!(src.is_committed(chunk(5) + p * PAGE_SIZE), Some(false), "chunk 5, the highest free one, went");
        assert_eq!(src.is_committed(chunk(3) + p * PAGE_SIZE), Some(true), "chunk 3 was not needed");
    }
    // SAFETY: live spans, unused.
    unsafe { h.free_span(g(), None, big) };
    for s in spans.into_iter().step_by(2) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.validate(g());
}

/// The background leaves a dense chunk's free pages alone even where its top-down order would reach them
/// first; `release_all` (forced) takes them.
#[test]
fn dense_chunks_skipped_by_background_taken_by_forced() {
    let h = bheap(256 * MIB);
    let low: Vec<_> = (0..4).map(|_| h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap()).collect();
    let dense = h.alloc_span(g(), None, 500, 0).unwrap(); // chunk 4: 500 of 512 pages
    let hole = h.alloc_span(g(), None, 12, 0).unwrap();
    let hole_base = base(hole);
    assert_eq!(hole_base, h.arena_base() + 4 * PALLOC_CHUNK_BYTES + 500 * PAGE_SIZE);
    // SAFETY: live spans, unused.
    unsafe {
        h.free_span(g(), None, hole);
        for &s in &low {
            h.free_span(g(), None, s);
        }
    }
    age(&h);
    // In use 500 pages, goal 550, committed 2560: the background takes 12 pages, from chunk 3's top.
    assert_eq!(h.scavenge(g(), 12 * PAGE_SIZE), 12 * PAGE_SIZE);
    let src = h.source();
    for p in 0..12 {
        assert_eq!(src.is_committed(hole_base + p * PAGE_SIZE), Some(true), "dense chunk left alone");
    }
    assert_eq!(src.is_committed(h.arena_base() + 4 * PALLOC_CHUNK_BYTES - PAGE_SIZE), Some(false));
    // Down to the goal: still not the dense chunk.
    while h.scavenge(g(), 64 * MIB) != 0 {}
    assert_eq!(src.is_committed(hole_base), Some(true));
    assert!(h.release_all(g()) > 0);
    for p in 0..12 {
        assert_eq!(src.is_committed(hole_base + p * PAGE_SIZE), Some(false), "forced: the dense chunk too");
    }
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, dense) };
    h.validate(g());
}

/// `scavtrace` is off by default: background generations with work and `release_all` log nothing. On, a
/// `release_all` logs Go's forced line with the released bytes as eager work, and the end of a generation
/// with background work logs its line.
#[test]
fn scavtrace_off_by_default_and_go_format_when_on() {
    let h = Heap::with_max_bytes(MmapSource::new(), 256 * MIB);
    assert!(!h.scavtrace());
    let n0 = common::my_log_lines().len();
    let spans: Vec<_> = (0..8).map(|_| h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap()).collect();
    for &s in &spans[2..] {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    age(&h);
    assert!(h.scavenge(g(), 4 * MIB) > 0);
    age(&h);
    h.release_all(g());
    assert_eq!(common::my_log_lines().len(), n0, "scavtrace off: no line");
    assert!(h.stats().scav_cycles >= 2, "the cycles still count");

    h.set_scavtrace(true);
    let keep = h.alloc_span(g(), None, 6 * PALLOC_CHUNK_PAGES, 0).unwrap();
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, keep) };
    age(&h); // 24 MiB committed again, 8 MiB in use: the goal is 8.8 MiB
    let released = h.scavenge(g(), 4 * MIB);
    assert_eq!(released, 4 * MIB);
    age(&h); // the generation with work ends: one line
    let lines = common::my_log_lines();
    let st = h.stats();
    let released_now = st.grown_bytes - st.committed_bytes;
    let util = st.inuse_bytes * 100 / st.committed_bytes;
    assert_eq!(
        lines[n0..],
        [format!("scav 4096 KiB work (bg), 0 KiB work (eager), {} KiB now, {util}% util", released_now >> 10)]
    );
    let rel = h.release_all(g());
    let st = h.stats();
    let util = st.inuse_bytes * 100 / st.committed_bytes;
    let last = common::my_log_lines().pop().unwrap();
    assert_eq!(
        last,
        format!(
            "scav 0 KiB work (bg), {} KiB work (eager), {} KiB now, {util}% util (forced)",
            rel >> 10,
            (st.grown_bytes - st.committed_bytes) >> 10
        )
    );
    for s in spans.into_iter().take(2) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.validate(g());
}

/// The line's format on its own, as Go's `printScavTrace` prints it.
#[test]
fn scavtrace_line_format() {
    let t =
        ScavTrace { bg_bytes: 50 << 10, eager_bytes: 0, released_bytes: 256 << 10, util_percent: 12, forced: false };
    assert_eq!(t.to_string(), "scav 50 KiB work (bg), 0 KiB work (eager), 256 KiB now, 12% util");
    let t = ScavTrace {
        bg_bytes: 0,
        eager_bytes: 186_960 << 10,
        released_bytes: 208_712 << 10,
        util_percent: 9,
        forced: true,
    };
    assert_eq!(t.to_string(), "scav 0 KiB work (bg), 186960 KiB work (eager), 208712 KiB now, 9% util (forced)");
}

static MALLOC_NANOS: AtomicU64 = AtomicU64::new(0);

fn malloc_clock() -> u64 {
    MALLOC_NANOS.load(Ordering::Relaxed)
}

/// As [`TimedSource`], on its own clock (tests run in parallel).
struct MallocTimedSource;

// SAFETY: forwards to `MmapSource`, adding only a clock advance to `decommit`.
unsafe impl PageSource for MallocTimedSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        SRC.reserve(nbytes, align)
    }
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { SRC.commit(addr, nbytes) }
    }
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        MALLOC_NANOS.fetch_add(DECOMMIT_NANOS, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { SRC.decommit(addr, nbytes) }
    }
    fn commit_zeroes(&self) -> bool {
        SRC.commit_zeroes()
    }
}

/// The allocator's switches: `Malloc::set_scavtrace` (what `GODEBUG=scavtrace=1` calls) turns the trace
/// on and off (`release_all`'s forced line); `Malloc::set_clock` sets the heap's clock, by which
/// `release_all`'s time is counted in `scavenge_cpu_nanos` (the fake clock advances in each decommit).
#[test]
fn malloc_scavtrace_and_clock() {
    let m = Box::new(goheap::Malloc::with_max_bytes(MallocTimedSource, goheap::cpu::ThreadSlots::new(), 1 << 30));
    assert!(!m.heap().scavtrace(), "off by default");
    m.set_scavtrace(true);
    assert!(m.heap().scavtrace());
    m.set_clock(Some(malloc_clock));
    let n0 = common::my_log_lines().len();
    let layout = std::alloc::Layout::from_size_align(8 << 20, 8).unwrap();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    // SAFETY: allocated above with this layout.
    unsafe { m.dealloc(p, layout) };
    let t0 = malloc_clock();
    let released = m.release_all();
    assert!(released >= 8 << 20);
    assert!(malloc_clock() > t0, "decommits advanced the clock");
    assert_eq!(m.heap().stats().scavenge_cpu_nanos, malloc_clock() - t0, "release_all's time counted");
    let lines = common::my_log_lines();
    assert_eq!(lines.len(), n0 + 1, "{:?}", &lines[n0..]);
    let head = format!("scav 0 KiB work (bg), {} KiB work (eager), ", released >> 10);
    assert!(lines[n0].starts_with(&head) && lines[n0].ends_with("% util (forced)"), "{}", lines[n0]);
    m.set_scavtrace(false);
    m.release_all();
    assert_eq!(common::my_log_lines().len(), n0 + 1, "off again: no line");
}
