//! Scavenger, memory limit and out-of-memory behaviour of the page heap, over the bounded source.
#![cfg(all(feature = "std", feature = "validate"))]

mod common;

use std::ptr::NonNull;

use goheap::cpu::Guarded;
use goheap::page::fixalloc::FIXALLOC_BLOCK_BYTES;
use goheap::page::heap::pagecache::PageCache;
use goheap::page::heap::scavenger::{CALLS_PER_EPOCH, PEAK_WINDOW_EPOCHS, SCAV_CHUNK_HI_OCC_PAGES};
use goheap::page::heap::{span_info, Heap};
use goheap::page::pagealloc::{level_len, PALLOC_CHUNK_BYTES, PALLOC_CHUNK_PAGES, SUMMARY_LEVELS};
use goheap::page::span::Span;
use goheap::source::bounded::BoundedSource;
use goheap::PAGE_SIZE;
use testkit::Rng;

/// The guard token the heap's locking methods ask for: these tests run no interrupt or signal handler that
/// calls goheap, so any thread may make one.
fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

const MIB: usize = 1 << 20;

fn page_up(n: usize) -> usize {
    n.div_ceil(PAGE_SIZE) * PAGE_SIZE
}

/// The metadata floor for `chunks` grown chunks, as the heap's module docs state it: the page map
/// (8 B per page), the chunk bitmaps (128 B per chunk), one array per summary level (8 B per entry) and the
/// scavenge index (40 B per 64 chunks, 16 B per 4096 chunks), each committed in whole pages.
fn metadata_floor(chunks: usize) -> usize {
    let mut b = page_up(chunks * PALLOC_CHUNK_PAGES * 8) + page_up(chunks * 128);
    for l in 0..SUMMARY_LEVELS {
        b += page_up(level_len(l, chunks) * 8);
    }
    b + page_up(chunks.div_ceil(64) * 40) + page_up(chunks.div_ceil(4096) * 16)
}

fn heap(arena: usize, budget: usize) -> Heap<BoundedSource> {
    Heap::with_max_bytes(BoundedSource::with_mmap(arena + 32 * MIB, budget), arena)
}

fn base(s: NonNull<Span>) -> usize {
    // SAFETY: live span of the heap under test.
    unsafe { span_info(s).base }
}

/// Scavenger lines logged by the calling thread so far.
fn my_scav_lines() -> Vec<String> {
    common::my_log_lines().into_iter().filter(|l| l.starts_with("scav ")).collect()
}

#[test]
fn page_release_all_falls_to_metadata_floor() {
    let h = heap(256 * MIB, usize::MAX);
    let mut pc = PageCache::new();
    let mut rng = Rng::new(7);
    let mut live = Vec::new();
    for _ in 0..3000 {
        if live.len() < 400 && rng.index(3) != 0 {
            let n = if rng.index(4) == 0 { 16 + rng.index(300) } else { 1 + rng.index(12) };
            let s = h.alloc_span(g(), Some(&mut pc), n, 1).expect("unbounded source");
            // SAFETY: the span's memory is ours.
            unsafe { (base(s) as *mut u8).write_bytes(0x5A, n * PAGE_SIZE) };
            live.push(s);
        } else if !live.is_empty() {
            let s = live.swap_remove(rng.index(live.len()));
            // SAFETY: live span, unused.
            unsafe { h.free_span(g(), Some(&mut pc), s) };
        }
    }
    for s in live.drain(..) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), Some(&mut pc), s) };
    }
    h.flush_page_cache(g(), &mut pc);
    h.validate(g());
    let before = h.stats();
    assert!(before.committed_bytes > 8 * MIB, "the workload must have committed heap memory");
    let released = h.release_all(g());
    h.validate(g());
    let st = h.stats();
    assert_eq!(released, before.committed_bytes, "release_all releases every free committed page");
    assert_eq!(st.committed_bytes, 0);
    assert_eq!(st.released_bytes, st.grown_bytes);
    let chunks = st.grown_bytes / PALLOC_CHUNK_BYTES;
    // The floor: metadata for the grown chunks plus the span descriptor blocks (never returned).
    assert_eq!(st.metadata_bytes, metadata_floor(chunks), "metadata committed for {chunks} chunks");
    assert_eq!(st.span_sys_bytes % FIXALLOC_BLOCK_BYTES, 0);
    // At most 400 live descriptors + a 16-entry stash; blocks abandon a tail smaller than one descriptor,
    // so one more block at most.
    let max_desc_bytes = (400 + 16) * std::mem::size_of::<Span>();
    let max_blocks = max_desc_bytes.div_ceil(FIXALLOC_BLOCK_BYTES) + 1;
    assert!(st.span_sys_bytes <= max_blocks * FIXALLOC_BLOCK_BYTES, "span descriptor memory {}", st.span_sys_bytes);
    let src = h.source();
    assert_eq!(src.committed_bytes(), st.metadata_bytes + st.span_sys_bytes, "source committed = metadata floor");
    // No arena page is left committed.
    let a = h.arena_base();
    for p in 0..st.grown_bytes / PAGE_SIZE {
        assert_eq!(src.is_committed(a + p * PAGE_SIZE), Some(false), "arena page {p} still committed");
    }
    // And the heap still works.
    let s = h.alloc_span(g(), None, 3, 0).unwrap();
    // SAFETY: live span.
    assert!(!unsafe { span_info(s) }.needzero, "re-committed pages of a zeroing source are zero");
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, s) };
    h.validate(g());
}

/// The same churn with and without a limit: without (and without background scavenging), committed memory
/// climbs well past the limit, so the workload is a real test; with the limit (and background steps), the
/// total stays within limit + slack at every step.
#[test]
fn page_memory_limit_bounds_committed() {
    const LIMIT: usize = 24 * MIB;
    // Slack: one page cache's committed free pages (64 pages = 512 KiB), which the heap cannot release,
    // plus rounding. The allocation-triggered scavenge runs before `alloc_span` returns, so the allocation
    // itself needs no slack. Stated figure: 1 MiB.
    const SLACK: usize = MIB;
    let churn = |limit: Option<usize>| -> (usize, usize) {
        let h = heap(256 * MIB, usize::MAX);
        if let Some(l) = limit {
            h.set_memory_limit(l);
        }
        let mut pc = PageCache::new();
        let mut live: Vec<(NonNull<Span>, usize)> = Vec::new();
        let mut live_bytes = 0;
        let mut worst = 0;
        let mut step = 0;
        // Phases of growing span sizes: fill live data up to 12 MiB, then free every other span. The holes
        // left behind are too small for the next phase's spans, so without scavenging every phase commits
        // fresh memory while the holes stay committed.
        for n in [1usize, 3, 7, 15, 31, 63, 127] {
            while live_bytes + n * PAGE_SIZE <= 12 * MIB {
                let s = h.alloc_span(g(), Some(&mut pc), n, 0).unwrap();
                live.push((s, n));
                live_bytes += n * PAGE_SIZE;
                step += 1;
                if limit.is_some() && step % 50 == 0 {
                    h.scavenge(g(), 256 << 10);
                }
                let total = h.source().committed_bytes();
                assert_eq!(total, h.stats().total_bytes);
                worst = worst.max(total);
                if let Some(l) = limit {
                    assert!(total <= l + SLACK, "step {step}: committed {total} over limit {l} + slack {SLACK}");
                }
            }
            let mut keep = Vec::new();
            for (i, (s, k)) in live.drain(..).enumerate() {
                if i % 2 == 0 {
                    // SAFETY: live span, unused.
                    unsafe { h.free_span(g(), Some(&mut pc), s) };
                    live_bytes -= k * PAGE_SIZE;
                } else {
                    keep.push((s, k));
                }
            }
            live = keep;
        }
        for (s, _) in live {
            // SAFETY: live span, unused.
            unsafe { h.free_span(g(), Some(&mut pc), s) };
        }
        h.flush_page_cache(g(), &mut pc);
        h.validate(g());
        (worst, h.stats().scavenged_alloc_bytes)
    };
    let (unlimited_worst, _) = churn(None);
    assert!(unlimited_worst > LIMIT + SLACK, "control run committed only {unlimited_worst} bytes");
    let (limited_worst, alloc_scav) = churn(Some(LIMIT));
    eprintln!("page_memory_limit_bounds_committed: worst committed {unlimited_worst} bytes without the limit, {limited_worst} with a limit of {LIMIT}");
    assert!(limited_worst <= LIMIT + SLACK);
    assert!(alloc_scav > 0, "allocation-triggered scavenging must have run");
}

/// Soft limit: live data above the limit still allocates while the source has memory.
#[test]
fn page_memory_limit_is_soft() {
    let h = heap(64 * MIB, usize::MAX);
    h.set_memory_limit(4 * MIB);
    let spans: Vec<_> = (0..16).map(|_| h.alloc_span(g(), None, 64, 0).expect("soft limit")).collect();
    assert!(h.stats().total_bytes > 8 * MIB);
    for s in spans {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    // Over the limit with everything free: one background step releases down to the limit goal.
    h.scavenge(g(), usize::MAX);
    let st = h.stats();
    assert!(st.total_bytes <= 4 * MIB, "after an aggressive step total is {} > limit", st.total_bytes);
    h.validate(g());
}

#[test]
fn page_source_failure_leaves_heap_consistent() {
    // Budget: room for the metadata and descriptors plus 2 MiB of heap pages.
    let h = heap(64 * MIB, usize::MAX);
    let first = h.alloc_span(g(), None, 1, 0).unwrap(); // initialises and grows the heap
    let budget = h.source().committed_bytes() + 2 * MIB;
    h.source().set_budget(budget);
    let mut live = vec![first];
    while let Some(s) = h.alloc_span(g(), None, 16, 0) {
        live.push(s);
        assert!(live.len() < 1000, "budget must run out");
    }
    h.validate(g());
    assert!(h.source().committed_bytes() <= budget);
    assert!(h.source().failed_commits() > 0);
    let st = h.stats();
    assert_eq!(st.inuse_bytes, (1 + 16 * (live.len() - 1)) * PAGE_SIZE);
    // Smaller requests still fit in what is left (the failed one left its pages free, not leaked).
    let mut pc = PageCache::new();
    while let Some(s) = h.alloc_span(g(), Some(&mut pc), 1, 0) {
        live.push(s);
    }
    h.validate(g());
    // Free half: later allocations succeed again (reusing committed pages or releasing them to commit).
    let half: Vec<_> = live.drain(live.len() / 2..).collect();
    for s in half {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), Some(&mut pc), s) };
    }
    h.validate(g());
    let big = h.alloc_span(g(), None, 32, 0).expect("allocation after frees");
    h.validate(g());
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, big) };

    // Injected failure of the very next commit (fresh pages needed): None, nothing changes, then success.
    h.flush_page_cache(g(), &mut pc);
    h.release_all(g());
    h.source().set_budget(usize::MAX);
    let before = h.stats();
    h.source().fail_nth_commit(1);
    assert!(h.alloc_span(g(), None, 8, 0).is_none(), "the commit failed and there is nothing free to release");
    h.validate(g());
    let after = h.stats();
    assert_eq!((after.inuse_bytes, after.committed_bytes), (before.inuse_bytes, before.committed_bytes));
    let s = h.alloc_span(g(), None, 8, 0).expect("the next commit succeeds");
    h.validate(g());
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, s) };
    // The same through a page cache (commit outside the heap lock); release first so the cache's block
    // holds no committed free page.
    h.release_all(g());
    h.source().fail_all(true);
    assert!(h.alloc_span(g(), Some(&mut pc), 2, 0).is_none());
    h.validate(g());
    h.source().fail_all(false);
    let s = h.alloc_span(g(), Some(&mut pc), 2, 0).expect("cache path recovers");
    h.validate(g());
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), Some(&mut pc), s) };
    for s in live {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), Some(&mut pc), s) };
    }
    h.flush_page_cache(g(), &mut pc);
    h.validate(g());
    assert_eq!(h.stats().inuse_bytes, 0);
}

#[test]
fn page_growth_failure_leaves_heap_consistent() {
    let h = heap(64 * MIB, usize::MAX);
    let s = h.alloc_span(g(), None, 1, 0).unwrap();
    let grown = h.stats().grown_bytes;
    // The next allocation must grow the heap (metadata commit) and then commit pages: fail either step.
    for nth in 1..=3 {
        h.source().fail_nth_commit(nth);
        let r = h.alloc_span(g(), None, PALLOC_CHUNK_PAGES * 2, 0);
        h.source().fail_nth_commit(0);
        h.validate(g());
        if let Some(r) = r {
            // SAFETY: live span, unused.
            unsafe { h.free_span(g(), None, r) };
        }
    }
    h.source().fail_all(true);
    assert!(h.alloc_span(g(), None, PALLOC_CHUNK_PAGES * 8, 0).is_none());
    h.source().fail_all(false);
    h.validate(g());
    let r = h.alloc_span(g(), None, PALLOC_CHUNK_PAGES * 8, 0).expect("growth works again");
    assert!(h.stats().grown_bytes > grown);
    // SAFETY: live spans, unused.
    unsafe {
        h.free_span(g(), None, r);
        h.free_span(g(), None, s);
    }
    h.validate(g());
    // The arena bound: more than 64 MiB can never be allocated.
    assert!(h.alloc_span(g(), None, 64 * MIB / PAGE_SIZE + 1, 0).is_none());
    let all = h.alloc_span(g(), None, 64 * MIB / PAGE_SIZE, 0).expect("exactly the arena");
    // SAFETY: live span, unused.
    unsafe { h.free_span(g(), None, all) };
    h.validate(g());
}

/// Lazy mode keeps the recent peak (plus 10%) and releases the rest only once the peak has left the
/// window, at most the budget per call.
#[test]
fn page_scavenger_retains_recent_peak() {
    let h = heap(128 * MIB, usize::MAX);
    // Peak: 32 MiB in 1 MiB spans.
    let mut spans: Vec<_> = (0..32).map(|_| h.alloc_span(g(), None, MIB / PAGE_SIZE, 0).unwrap()).collect();
    // Free down to 4 MiB in use.
    for s in spans.drain(4..) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    let committed = h.stats().committed_bytes;
    assert_eq!(committed, 32 * MIB);
    h.set_scavtrace(true);
    let lines_before = my_scav_lines().len();
    // The 32 MiB peak is recent: the goal is 35.2 MiB, nothing is released.
    assert_eq!(h.scavenge(g(), MIB), 0);
    assert_eq!(h.stats().committed_bytes, 32 * MIB);
    // After the window has passed, the goal is 4 MiB + 10%; each call releases at most its budget (the
    // 28 MiB above the goal take 28 calls of 1 MiB after the window).
    let mut calls = 0;
    while calls < CALLS_PER_EPOCH * (PEAK_WINDOW_EPOCHS + 1) + 32 {
        let r = h.scavenge(g(), MIB);
        assert!(r <= MIB, "released {r} with a budget of 1 MiB");
        calls += 1;
    }
    let st = h.stats();
    let goal = 4 * MIB + 4 * MIB / 100 * 10;
    assert!(st.committed_bytes <= goal, "committed {} above the goal {goal}", st.committed_bytes);
    assert!(st.committed_bytes >= 4 * MIB);
    // One more generation ends (calls alone end one), flushing the last generation's work into a line.
    for _ in 0..CALLS_PER_EPOCH {
        h.scavenge(g(), MIB);
    }
    let st = h.stats();
    let lines = my_scav_lines();
    let new = &lines[lines_before..];
    assert!(st.scav_cycles >= 1);
    assert_eq!(new.len(), st.scav_cycles, "one scavtrace line per generation with work: {new:?}");
    // Go's format; the background figures add up to what was released, nothing eager.
    let mut bg_kib = 0;
    for l in new {
        eprintln!("{l}");
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(f.len(), 14, "{l}");
        assert_eq!((f[0], f[2], f[3], f[4]), ("scav", "KiB", "work", "(bg),"), "{l}");
        assert_eq!((f[5], f[6], f[7], f[8]), ("0", "KiB", "work", "(eager),"), "{l}");
        assert_eq!((f[10], f[11], f[13]), ("KiB", "now,", "util"), "{l}");
        let util: usize = f[12].strip_suffix('%').expect("a percentage").parse().unwrap();
        assert!(util <= 100, "{l}");
        f[9].parse::<usize>().expect("KiB now");
        bg_kib += f[1].parse::<usize>().unwrap();
    }
    assert_eq!(bg_kib * 1024, 32 * MIB - st.committed_bytes, "bg work figures sum to the bytes released");
    h.validate(g());

    for s in spans.drain(..) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.release_all(g());
    h.validate(g());
}

// Chunk 1 below (504 of 512 pages allocated) counts as dense.
const _: () = assert!(PALLOC_CHUNK_PAGES - 8 >= SCAV_CHUNK_HI_OCC_PAGES);

/// Chunk choice: a chunk that is not dense is scavenged before a dense one, even though the dense one has
/// the higher address (which the index's search visits first).
#[test]
fn page_scavenger_prefers_chunks_that_are_not_dense() {
    let h = heap(64 * MIB, usize::MAX);
    let a = h.alloc_span(g(), None, PALLOC_CHUNK_PAGES, 0).unwrap(); // chunk 0
    let b = h.alloc_span(g(), None, PALLOC_CHUNK_PAGES - 8, 0).unwrap(); // chunk 1: 504 pages, dense
    let hole = h.alloc_span(g(), None, 8, 0).unwrap(); // chunk 1's last 8 pages
    let hole_base = base(hole);
    // SAFETY: live spans, unused (a's tail).
    unsafe {
        h.free_span(g(), None, hole);
        assert!(h.resize_span_in_place(g(), a, 100)); // chunk 0: 100 pages allocated, 412 free and committed
    }
    // Chunk 0 was dense (fully allocated) in this generation: let two generations pass so that only its
    // present density counts (budget 0: nothing released).
    for _ in 0..2 * CALLS_PER_EPOCH {
        assert_eq!(h.scavenge(g(), 0), 0);
    }
    // A memory limit well below the heap makes the next step aggressive; give it a budget of 8 pages.
    h.set_memory_limit(MIB);
    assert_eq!(h.scavenge(g(), 8 * PAGE_SIZE), 8 * PAGE_SIZE);
    let src = h.source();
    for p in 0..8 {
        assert_eq!(src.is_committed(hole_base + p * PAGE_SIZE), Some(true), "dense chunk scavenged first");
    }
    // The 8 pages came from the top of chunk 0's free run.
    let top0 = h.arena_base() + PALLOC_CHUNK_BYTES - PAGE_SIZE;
    assert_eq!(src.is_committed(top0), Some(false));
    // With no limit and a forced release, the dense chunk's free pages go too.
    h.set_memory_limit(usize::MAX);
    assert_eq!(h.release_all(g()), (412 - 8 + 8) * PAGE_SIZE);
    assert_eq!(src.is_committed(hole_base), Some(false));
    // SAFETY: live spans, unused.
    unsafe {
        h.free_span(g(), None, a);
        h.free_span(g(), None, b);
    }
    h.validate(g());
}

/// A page source whose `decommit` is slow, so that concurrent scavenger steps overlap.
struct SlowDecommit(goheap::source::mmap::MmapSource);

// SAFETY: forwards to `MmapSource`, adding only a sleep before `decommit`.
unsafe impl goheap::source::PageSource for SlowDecommit {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        self.0.reserve(nbytes, align)
    }
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { self.0.commit(addr, nbytes) }
    }
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        // SAFETY: forwarded contract.
        unsafe { self.0.decommit(addr, nbytes) }
    }
    fn commit_zeroes(&self) -> bool {
        self.0.commit_zeroes()
    }
}

/// Concurrent scavenger steps share the excess over the retained goal instead of each releasing its whole
/// budget of it: 8 steps of 8 MiB at once, 27.6 MiB above the goal, leave committed memory at the goal
/// (before: each step computed the same excess and together they released every free page, 4 MiB below
/// the 4.4 MiB goal).
#[test]
fn page_scavenger_concurrent_steps_do_not_overshoot() {
    let h: &'static Heap<SlowDecommit> =
        Box::leak(Box::new(Heap::with_max_bytes(SlowDecommit(goheap::source::mmap::MmapSource::new()), 256 * MIB)));
    let mut spans: Vec<_> = (0..32).map(|_| h.alloc_span(g(), None, MIB / PAGE_SIZE, 0).unwrap()).collect();
    for s in spans.drain(4..) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    // Let the 32 MiB peak leave the window without releasing anything (budget 0).
    for _ in 0..CALLS_PER_EPOCH * (PEAK_WINDOW_EPOCHS + 2) {
        assert_eq!(h.scavenge(g(), 0), 0);
    }
    let goal = h.stats().retained_goal_bytes;
    assert_eq!(goal, 4 * MIB + 4 * MIB / 100 * 10);
    let start = std::sync::Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                h.scavenge(g(), 8 * MIB)
            })
        })
        .collect();
    let released: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let committed = h.stats().committed_bytes;
    assert!(
        committed + PAGE_SIZE > goal,
        "concurrent steps released {released} bytes, leaving {committed} committed below the goal {goal}"
    );
    assert!(committed <= goal + PAGE_SIZE, "the steps' budgets (64 MiB) covered the excess: {committed} left");
    for s in spans {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
}

/// Nanoseconds of the fake clock below.
static FAKE_NANOS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn fake_clock() -> u64 {
    FAKE_NANOS.load(std::sync::atomic::Ordering::Relaxed)
}

/// With a clock hook, the peak window is timed: calls alone (however many) do not end an epoch, and the
/// peak leaves the window once `PEAK_WINDOW_EPOCHS` epochs have passed since the one holding it (here
/// ended by allocation volume at the first step: 8 MiB handed out), each `EPOCH_NANOS` long.
#[test]
fn page_scavenger_window_by_clock() {
    use goheap::page::heap::scavenger::EPOCH_NANOS;
    let h = heap(64 * MIB, usize::MAX);
    h.set_clock(g(), Some(fake_clock));
    let mut spans: Vec<_> = (0..8).map(|_| h.alloc_span(g(), None, MIB / PAGE_SIZE, 0).unwrap()).collect();
    for s in spans.drain(1..) {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    for _ in 0..10 * CALLS_PER_EPOCH {
        assert_eq!(h.scavenge(g(), MIB), 0, "the clock stands still: the 8 MiB peak stays in the window");
    }
    for _ in 0..PEAK_WINDOW_EPOCHS - 1 {
        FAKE_NANOS.fetch_add(EPOCH_NANOS, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(h.scavenge(g(), MIB), 0, "the peak is still in the window");
    }
    FAKE_NANOS.fetch_add(EPOCH_NANOS, std::sync::atomic::Ordering::Relaxed);
    // With a clock the step is paced by CPU time, not by its byte budget: the fake clock stands still during
    // the step, so its slice never runs out and it releases everything above the goal (1 MiB + 10%).
    let goal = MIB + MIB / 100 * 10;
    let committed = h.stats().committed_bytes;
    assert_eq!(h.scavenge(g(), MIB), (committed - goal).next_multiple_of(PAGE_SIZE), "the peak left the window");
    for s in spans {
        // SAFETY: live span, unused.
        unsafe { h.free_span(g(), None, s) };
    }
    h.validate(g());
}
