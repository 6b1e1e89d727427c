//! Interrupt latency, bounded: no guarded section (interrupts off in a kernel) commits or decommits more
//! than a slice of pages, whatever the size of the operation (see `src/page/heap/slice.rs`).
//!
//! The provider here counts, per outermost guarded section of the calling thread, the pages the page
//! source commits and decommits in it (and the source calls made outside every section, which must be
//! none). Before slicing, a 64 MiB allocation committed its 16 384 pages in one section, `release_all`
//! decommitted up to 16 MiB per section and a background step its whole budget in one.
#![cfg(feature = "std")]

use core::alloc::Layout;
use core::ptr::NonNull;
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use goheap::cpu::{CpuProvider, MAX_CPUS};
use goheap::page::heap::slice::{COMMIT_SLICE_NPAGES, DECOMMIT_SLICE_NPAGES};
use goheap::source::mmap::MmapSource;
use goheap::source::PageSource;
use goheap::{Malloc, PAGE_SIZE};

thread_local! {
    /// Depth of the guarded sections open on this thread.
    static DEPTH: Cell<usize> = const { Cell::new(0) };
    /// Whether this thread's cache index is in use by an open `enter` section.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    /// Pages committed or decommitted in the current outermost section.
    static PAGES: Cell<usize> = const { Cell::new(0) };
    /// Most pages in one section, and the number of sections, since the last `reset`.
    static MAX_PAGES: Cell<usize> = const { Cell::new(0) };
    static SECTIONS: Cell<usize> = const { Cell::new(0) };
    /// Source calls made outside every section.
    static UNGUARDED: Cell<usize> = const { Cell::new(0) };
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

fn my_slot() -> Option<usize> {
    let mut s = SLOT.with(Cell::get);
    if s == usize::MAX {
        s = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        SLOT.with(|c| c.set(s));
    }
    (s < MAX_CPUS).then_some(s)
}

fn reset() {
    MAX_PAGES.with(|c| c.set(0));
    SECTIONS.with(|c| c.set(0));
    UNGUARDED.with(|c| c.set(0));
}

/// (most pages in one section, sections, source calls outside every section) since the last `reset`.
fn figures() -> (usize, usize, usize) {
    (MAX_PAGES.with(Cell::get), SECTIONS.with(Cell::get), UNGUARDED.with(Cell::get))
}

/// A provider that counts the source's pages per outermost section (a thread is a "CPU").
#[derive(Debug, Default)]
struct SectionCpus;

struct SectionGuard {
    busy: bool,
}

fn open_section() {
    let d = DEPTH.with(Cell::get);
    if d == 0 {
        PAGES.with(|c| c.set(0));
    }
    DEPTH.with(|c| c.set(d + 1));
}

impl Drop for SectionGuard {
    fn drop(&mut self) {
        if self.busy {
            BUSY.with(|b| b.set(false));
        }
        let d = DEPTH.with(Cell::get) - 1;
        DEPTH.with(|c| c.set(d));
        if d == 0 {
            let p = PAGES.with(Cell::get);
            MAX_PAGES.with(|c| c.set(c.get().max(p)));
            SECTIONS.with(|c| c.set(c.get() + 1));
        }
    }
}

// SAFETY: a slot index belongs to one thread (handed out once by `NEXT_SLOT`), and `enter` marks it busy,
// so a re-entrant `enter` on the same thread gets `None`; leaf sections refuse a busy index.
unsafe impl CpuProvider for SectionCpus {
    type Guard<'a> = SectionGuard;
    fn enter(&self) -> (SectionGuard, Option<usize>) {
        open_section();
        match my_slot() {
            Some(i) if !BUSY.with(Cell::get) => {
                BUSY.with(|b| b.set(true));
                (SectionGuard { busy: true }, Some(i))
            }
            _ => (SectionGuard { busy: false }, None),
        }
    }
    type LeafGuard<'a> = SectionGuard;
    fn enter_leaf(&self) -> (SectionGuard, Option<usize>) {
        open_section();
        let idx = if BUSY.with(Cell::get) { None } else { my_slot() };
        (SectionGuard { busy: false }, idx)
    }
}

/// `MmapSource` counting the pages of each commit and decommit in the calling thread's section, with a
/// budget of committed bytes (a commit beyond it is refused, as a kernel's frame allocator runs dry; the
/// refused call is counted too: a kernel does its page-table work up to the failure).
#[derive(Debug)]
struct CountingSource(MmapSource, Budget);

#[derive(Debug)]
struct Budget {
    limit_bytes: AtomicUsize,
    committed_bytes: AtomicUsize,
}

impl CountingSource {
    const fn new() -> Self {
        CountingSource(
            MmapSource::new(),
            Budget { limit_bytes: AtomicUsize::new(usize::MAX), committed_bytes: AtomicUsize::new(0) },
        )
    }
}

fn count(nbytes: usize) {
    if DEPTH.with(Cell::get) == 0 {
        UNGUARDED.with(|c| c.set(c.get() + 1));
    }
    PAGES.with(|c| c.set(c.get() + nbytes.div_ceil(PAGE_SIZE)));
}

// SAFETY: forwards to `MmapSource`, which upholds the contract.
unsafe impl PageSource for CountingSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        self.0.reserve(nbytes, align)
    }
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        count(nbytes);
        let b = &self.1;
        let now = b.committed_bytes.fetch_add(nbytes, Ordering::Relaxed) + nbytes;
        if now > b.limit_bytes.load(Ordering::Relaxed) {
            b.committed_bytes.fetch_sub(nbytes, Ordering::Relaxed);
            return false;
        }
        // SAFETY: forwarded contract.
        let ok = unsafe { self.0.commit(addr, nbytes) };
        if !ok {
            b.committed_bytes.fetch_sub(nbytes, Ordering::Relaxed);
        }
        ok
    }
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        count(nbytes);
        self.1.committed_bytes.fetch_sub(nbytes, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { self.0.decommit(addr, nbytes) }
    }
    fn commit_zeroes(&self) -> bool {
        self.0.commit_zeroes()
    }
}

type M = Malloc<CountingSource, SectionCpus>;

fn new_malloc() -> &'static M {
    new_malloc_with(goheap::malloc::DebugFlags::empty())
}

/// [`new_malloc`] with debug knobs `debug` set.
fn new_malloc_with(debug: goheap::malloc::DebugFlags) -> &'static M {
    let m: &'static M =
        Box::leak(Box::new(Malloc::with_max_bytes(CountingSource::new(), SectionCpus, 1 << 30).with_debug(debug)));
    // No heap-profile sampling: the profiler's first sample makes its tables in sections of its own
    // (`the_first_sample_makes_the_profile_tables_in_slices`), which would add to a random call's count.
    m.set_profile_rate(0);
    m
}

/// Grows the calling cache's stock of `layout`'s class to hold `n` objects: each batch that runs the stock
/// dry and overflows it doubles the bound once; the last leaves `n` objects in the stock. Returns the grown
/// bound (at least `n`).
fn grow_stock(m: &M, layout: Layout, n: usize) -> u32 {
    for _ in 0..6 {
        let v: Vec<*mut u8> = (0..n).map(|_| m.alloc(layout)).collect();
        for p in v {
            assert!(!p.is_null());
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { m.dealloc(p, layout) };
        }
    }
    let c = goheap::object::sizeclass::class_of(layout.size());
    let grown = m.stock_bound(c);
    assert!(grown as usize >= n, "the stock did not grow: bound {grown}");
    grown
}

/// The most pages one section may commit or decommit: a commit slice, or a release before a failed
/// commit's retry (in a section of its own since `a_refused_commit_releases_in_its_own_section`); the heap
/// growth's metadata stays below one slice.
const BOUND_PAGES: usize = 2 * COMMIT_SLICE_NPAGES;

const MIB64: usize = 64 << 20;

#[test]
fn large_alloc_64mib_commits_in_slices() {
    let m = new_malloc();
    for zeroed in [false, true] {
        reset();
        let layout = Layout::from_size_align(MIB64, 8).unwrap();
        let p = if zeroed { m.alloc_zeroed(layout) } else { m.alloc(layout) };
        assert!(!p.is_null());
        let (max, sections, unguarded) = figures();
        assert_eq!(unguarded, 0, "a source call outside the guard");
        assert!(max <= BOUND_PAGES, "zeroed={zeroed}: a section committed {max} pages (bound {BOUND_PAGES})");
        assert!(sections >= MIB64 / PAGE_SIZE / COMMIT_SLICE_NPAGES, "{sections} sections");
        // SAFETY: `p` is a live allocation of `layout`; it is ours.
        unsafe {
            p.write_bytes(0xa5, MIB64);
            m.dealloc(p, layout);
        }
    }
    // A fresh run again, after everything went back to the source.
    m.release_all();
    reset();
    let layout = Layout::from_size_align(MIB64, 2 << 20).unwrap();
    let p = m.alloc(layout);
    assert!(!p.is_null() && p as usize % (2 << 20) == 0);
    assert!(figures().0 <= BOUND_PAGES, "aligned: {:?}", figures());
    // SAFETY: as above.
    unsafe { m.dealloc(p, layout) };
    #[cfg(feature = "validate")]
    m.with_guard(|g| m.heap().validate(g));
}

#[test]
fn release_all_of_a_big_heap_decommits_in_slices() {
    let m = new_malloc();
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    let ps: Vec<_> = (0..96).map(|_| m.alloc(layout)).collect();
    let small = Layout::from_size_align(256, 8).unwrap();
    let qs: Vec<_> = (0..20_000).map(|_| m.alloc(small)).collect();
    assert!(ps.iter().chain(&qs).all(|p| !p.is_null()));
    for &p in ps.iter() {
        // SAFETY: live allocations of `layout`, ours.
        unsafe { m.dealloc(p, layout) };
    }
    for &q in qs.iter() {
        // SAFETY: live allocations of `small`, ours.
        unsafe { m.dealloc(q, small) };
    }
    reset();
    let released = m.release_all();
    assert!(released >= 96 << 20, "released {released}");
    let (max, _, unguarded) = figures();
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= DECOMMIT_SLICE_NPAGES, "a section of release_all decommitted {max} pages");
    assert_eq!(m.heap().stats().committed_bytes, 0);
}

#[test]
fn background_step_decommits_in_slices() {
    let m = new_malloc();
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    let ps: Vec<_> = (0..64).map(|_| m.alloc(layout)).collect();
    for &p in ps.iter() {
        // SAFETY: live allocations of `layout`, ours.
        unsafe { m.dealloc(p, layout) };
    }
    let mut released = 0;
    reset();
    for _ in 0..64 {
        released += m.background(usize::MAX, 32 << 20).nbytes_released;
    }
    assert!(released >= 32 << 20, "released {released}");
    let (max, _, unguarded) = figures();
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= DECOMMIT_SLICE_NPAGES, "a section of a background step decommitted {max} pages");
}

#[test]
fn memory_limit_scavenging_decommits_in_slices() {
    let m = new_malloc();
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    let ps: Vec<_> = (0..64).map(|_| m.alloc(layout)).collect();
    for &p in ps.iter().skip(8) {
        // SAFETY: live allocations of `layout`, ours.
        unsafe { m.dealloc(p, layout) };
    }
    reset();
    m.set_memory_limit(16 << 20);
    let (max, _, unguarded) = figures();
    assert!(m.heap().stats().committed_bytes <= 16 << 20, "{:?}", m.heap().stats());
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= DECOMMIT_SLICE_NPAGES, "a section of the limit's release decommitted {max} pages");
    for &p in ps.iter().take(8) {
        // SAFETY: as above.
        unsafe { m.dealloc(p, layout) };
    }
}

#[test]
fn realloc_growing_a_large_block_in_place_commits_in_slices() {
    let m = new_malloc();
    let layout = Layout::from_size_align(1 << 20, 8).unwrap();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    // SAFETY: `p` is ours, 1 MiB.
    unsafe { p.write_bytes(0x5a, 1 << 20) };
    reset();
    // SAFETY: `p` is a live allocation of `layout`; 64 MiB is a valid size.
    let q = unsafe { m.realloc(p, layout, MIB64) };
    let (max, _, unguarded) = figures();
    assert_eq!(q, p, "the block at the heap's end grows in place");
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= BOUND_PAGES, "a section of realloc committed {max} pages");
    // SAFETY: `q` is ours, 64 MiB, its first MiB copied or kept.
    unsafe {
        assert_eq!(*q.add((1 << 20) - 1), 0x5a);
        q.add(MIB64 - 1).write(1);
        m.dealloc(q, Layout::from_size_align(MIB64, 8).unwrap());
    }
    #[cfg(feature = "validate")]
    m.with_guard(|g| m.heap().validate(g));
}

/// While large runs are committed in slices (and realloc'd in place), other threads run `release_all` and
/// background steps without pause: they must never take a half-committed run for free pages (a live
/// block's pages decommitted would read zero here), and the heap's accounting must balance at the end.
#[test]
fn release_all_and_background_leave_half_committed_runs_alone() {
    use goheap::cpu::ThreadSlots;
    use std::sync::atomic::AtomicBool;
    static M: Malloc<MmapSource, ThreadSlots> = Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 30);
    static STOP: AtomicBool = AtomicBool::new(false);
    let others: Vec<_> = (0..2)
        .map(|k| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !STOP.load(Ordering::Relaxed) {
                    if k == 0 {
                        M.release_all();
                    } else {
                        M.background(usize::MAX, 1 << 20);
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let page = 4096;
    for i in 0..24usize {
        let size = (8 << 20) + i * (1 << 20);
        let layout = Layout::from_size_align(size, 8).unwrap();
        let p = M.alloc(layout);
        assert!(!p.is_null());
        // SAFETY: `p` is ours, `size` bytes; one byte per 4 KiB page is written, then checked.
        unsafe {
            for off in (0..size).step_by(page) {
                *p.add(off) = (off / page) as u8 | 1;
            }
            let bigger = size + (4 << 20);
            let q = M.realloc(p, layout, bigger);
            assert!(!q.is_null());
            for off in (0..size).step_by(page) {
                assert_eq!(*q.add(off), (off / page) as u8 | 1, "block {i}: byte at {off} lost");
            }
            *q.add(bigger - 1) = 7;
            M.dealloc(q, Layout::from_size_align(bigger, 8).unwrap());
        }
    }
    STOP.store(true, Ordering::Relaxed);
    for t in others {
        assert!(t.join().unwrap() > 0);
    }
    M.flush_cpu_cache();
    M.release_all();
    #[cfg(feature = "validate")]
    M.validate();
    assert_eq!(M.heap().stats().inuse_bytes, 0);
}

/// A stock grown to thousands of objects (a class that keeps overflowing, `cpucache.rs`) is flushed a slice
/// of `FLUSH_SLICE_OBJS` objects per section, not in one: before, a class's whole stock went back to its
/// central list in one section (about 160 instructions per object), so a 4 000-object stock kept interrupts
/// off for over half a million instructions.
#[test]
fn a_grown_stock_flushes_in_slices() {
    use goheap::object::cpucache::{stock_cap, FLUSH_SLICE_OBJS};
    use goheap::object::sizeclass::class_of;
    let m = new_malloc();
    let layout = Layout::from_size_align(64, 8).unwrap();
    let n = 4000;
    assert!(stock_cap(class_of(64)) as usize >= n);
    grow_stock(m, layout, n);
    reset();
    m.flush_cpu_cache();
    let (_, sections, unguarded) = figures();
    assert_eq!(unguarded, 0);
    assert_eq!(m.mem_stats().heap_objects, 0, "the flush left objects in the cache");
    // The same flush with nothing cached: the difference is the grown class's extra sections.
    reset();
    m.flush_cpu_cache();
    let (_, empty_sections, _) = figures();
    assert!(
        sections - empty_sections >= n / FLUSH_SLICE_OBJS - 1,
        "{n} stocked objects flushed in {} extra sections (a slice is {FLUSH_SLICE_OBJS} objects)",
        sections - empty_sections
    );
}

/// The used-up spans a cache holds (up to `HELD_BYTES`: 128 spans of the 64-byte class) go back to the
/// central list `HELD_SLICE_SPANS` per section when the cache is flushed, in sections apart from the
/// stock's objects (each is a class-lock hold and a sweep).
#[test]
fn held_spans_go_back_in_slices() {
    use goheap::object::cpucache::{HELD_BYTES, HELD_SLICE_SPANS};
    use goheap::object::sizeclass::{class_of, CLASSES};
    let m = new_malloc();
    let layout = Layout::from_size_align(64, 8).unwrap();
    let c = class_of(64);
    let (nelems, span_bytes) = (CLASSES[c].nelems as usize, CLASSES[c].npages as usize * PAGE_SIZE);
    let held = HELD_BYTES / span_bytes;
    let v: Vec<*mut u8> = (0..(held + 1) * nelems + 1).map(|_| m.alloc(layout)).collect();
    assert_eq!(m.held_spans(c) as usize, held);
    // A few frees, so the class's step also has a stock to flush.
    for &p in &v[..8] {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { m.dealloc(p, layout) };
    }
    reset();
    m.flush_cpu_cache();
    let (_, sections, unguarded) = figures();
    assert_eq!(unguarded, 0);
    assert_eq!(m.held_spans(c), 0);
    reset();
    m.flush_cpu_cache();
    let (_, empty_sections, _) = figures();
    // The class's step runs once in the empty flush too: here the stock takes a section of its own, then
    // each slice of held spans one, the last with the cached span (where the empty flush's one was).
    assert_eq!(
        sections - empty_sections,
        held / HELD_SLICE_SPANS,
        "{held} held spans and a stock given back in {} extra sections (a slice is {HELD_SLICE_SPANS} spans)",
        sections - empty_sections
    );
    for &p in &v[8..] {
        // SAFETY: as above.
        unsafe { m.dealloc(p, layout) };
    }
    m.flush_cpu_cache();
    assert_eq!(m.mem_stats().heap_objects, 0);
}

/// A large allocation whose commits the source refuses (its frames ran out) releases free committed pages
/// elsewhere in a section of its own and retries the slice in another: before, the failed commit, the
/// release and the retry shared one section (24 pages of source work, the 28 146-instruction sections of
/// the demo kernel's large allocations).
#[test]
fn a_refused_commit_releases_in_its_own_section() {
    let m = new_malloc();
    let big = Layout::from_size_align(32 << 20, 8).unwrap();
    let fence = Layout::from_size_align(256 << 10, 8).unwrap();
    let bigger = Layout::from_size_align(40 << 20, 8).unwrap();
    // A 32 MiB hole of free committed pages, kept apart from the arena's tail by a live block.
    let a = m.alloc(big);
    let c = m.alloc(fence);
    assert!(!a.is_null() && !c.is_null());
    // SAFETY: live allocation of `big`, ours.
    unsafe { m.dealloc(a, big) };
    let src = m.heap().source();
    let committed = src.1.committed_bytes.load(Ordering::Relaxed);
    // 40 MiB do not fit the hole: the block goes past the fence, and only 9 MiB more may be committed (8
    // MiB beyond the hole, plus room for the growth's metadata).
    let limit = committed + (9 << 20);
    src.1.limit_bytes.store(limit, Ordering::Relaxed);
    reset();
    let b = m.alloc(bigger);
    let (max, sections, unguarded) = figures();
    src.1.limit_bytes.store(usize::MAX, Ordering::Relaxed);
    assert!(!b.is_null(), "the allocation failed although the hole could be released");
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(src.1.committed_bytes.load(Ordering::Relaxed) <= limit);
    assert!(sections >= (40 << 20) / PAGE_SIZE / COMMIT_SLICE_NPAGES, "{sections} sections");
    let bound = COMMIT_SLICE_NPAGES.max(DECOMMIT_SLICE_NPAGES);
    assert!(max <= bound, "a section did {max} pages of source work (bound {bound})");
    // SAFETY: `b` is a live allocation of `bigger`; `c` of `fence`; both ours.
    unsafe {
        b.write_bytes(0x5a, 40 << 20);
        m.dealloc(b, bigger);
        m.dealloc(c, fence);
    }
    #[cfg(feature = "validate")]
    m.with_guard(|g| m.heap().validate(g));
}

/// A flush another CPU asks of a cache (`release_all` and the reclaim before failing ask every other cache)
/// runs a slice per general-path entry of that cache, not all in the first: before, the first entry after
/// the request flushed a grown stock of thousands of objects in one section. A `background` call finishes
/// it, in sections of a slice.
#[test]
fn a_requested_flush_runs_a_slice_per_entry() {
    use goheap::object::cpucache::{stock_max, FLUSH_SLICE_OBJS};
    use goheap::object::sizeclass::class_of;
    let m = new_malloc();
    let c = class_of(64);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let n = 4000;
    let grown = grow_stock(m, layout, n);
    // Another thread (another cache slot) asks every other cache to flush.
    std::thread::scope(|s| {
        s.spawn(|| m.release_all());
    });
    // One general-path entry of ours (`stock_bound` enters the cache) runs one slice of the flush: the
    // grown class is not reached yet. A class's bound goes back to its base when its whole stock is flushed.
    assert_eq!(m.stock_bound(c), grown, "the first entry after the request flushed the whole cache");
    // The next background call finishes the flush, a slice per section.
    reset();
    m.background(0, 0);
    let (_, sections, unguarded) = figures();
    assert_eq!(unguarded, 0);
    assert_eq!(m.stock_bound(c), stock_max(c), "background did not finish the requested flush");
    assert!(sections >= n / FLUSH_SLICE_OBJS, "{sections} sections");
}

/// A large allocation that reuses a free run with a few scavenged pages commits them in the section that
/// takes the run; it then publishes the span (one page-map store per page, up to 1 024 pages) in a section
/// of its own, not in that one: the two together measured up to 28 146 instructions in the demo kernel.
/// Seen here as one more section than the same allocation needs when nothing is left to commit.
#[test]
fn a_commit_and_a_publication_take_separate_sections() {
    use goheap::page::heap::slice::PUBLISH_IN_SECTION_NPAGES;
    let m = new_malloc();
    let nbytes = PUBLISH_IN_SECTION_NPAGES * PAGE_SIZE;
    let layout = Layout::from_size_align(nbytes, 8).unwrap();
    // A free committed run of all but 4 pages at the arena's start (the heap grew by whole chunks, so the
    // 4 pages after it are grown and scavenged).
    let short = Layout::from_size_align(nbytes - 4 * PAGE_SIZE, 8).unwrap();
    let a = m.alloc(short);
    assert!(!a.is_null());
    // SAFETY: live allocation of `short`, ours.
    unsafe { m.dealloc(a, short) };
    let sections_of = |m: &'static M| {
        reset();
        let p = m.alloc(layout);
        assert!(!p.is_null());
        let (max, sections, unguarded) = figures();
        assert_eq!(unguarded, 0);
        assert!(max <= COMMIT_SLICE_NPAGES, "{max} pages in a section");
        // SAFETY: live allocation of `layout`, ours.
        unsafe { m.dealloc(p, layout) };
        (sections, max)
    };
    // The run with its 4 scavenged pages: committed in the section that takes the run.
    let (partly, commit_npages) = sections_of(m);
    assert_eq!(commit_npages, 4, "the allocation did not reuse the free run");
    // The same run again, all committed now: nothing to commit.
    let (committed, _) = sections_of(m);
    assert!(partly > committed, "{partly} sections with a commit, {committed} without: published with the commit");
}

/// The reclaim before failing (a small allocation the source cannot commit for) flushes the caller's cache
/// and sweeps the central lists in sections of a slice each, and retries in a section of its own: before,
/// all of it ran inside the failing allocation's one section (a grown stock of thousands of objects
/// flushed with interrupts off).
#[test]
fn the_reclaim_before_failing_runs_in_slices() {
    use goheap::object::cpucache::{stock_max, FLUSH_SLICE_OBJS};
    use goheap::object::sizeclass::class_of;
    let m = new_malloc();
    let c = class_of(64);
    let small = Layout::from_size_align(64, 8).unwrap();
    let n = 4000;
    let grown = grow_stock(m, small, n);
    // No more frames: objects of another class fill what is committed, until one needs the reclaim (it
    // flushes our stock, which resets the grown bound) to succeed.
    let src = m.heap().source();
    src.1.limit_bytes.store(src.1.committed_bytes.load(Ordering::Relaxed), Ordering::Relaxed);
    let other = Layout::from_size_align(1024, 8).unwrap();
    let mut kept = Vec::new();
    let (sections, max, unguarded) = loop {
        reset();
        let p = m.alloc(other);
        let (max, sections, unguarded) = figures();
        assert!(!p.is_null(), "the allocation failed although the reclaim could free {n} objects' spans");
        kept.push(p);
        if m.stock_bound(c) != grown {
            break (sections, max, unguarded);
        }
        assert!(kept.len() < 1 << 20, "no allocation needed the reclaim");
    };
    src.1.limit_bytes.store(usize::MAX, Ordering::Relaxed);
    assert_eq!(m.stock_bound(c), stock_max(c));
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= BOUND_PAGES, "a section did {max} pages of source work");
    assert!(
        sections >= n / FLUSH_SLICE_OBJS,
        "the reclaim flushed {n} stocked objects in {sections} sections (a slice is {FLUSH_SLICE_OBJS} objects)"
    );
    for p in kept {
        // SAFETY: live allocations of `other`, ours.
        unsafe { m.dealloc(p, other) };
    }
    #[cfg(feature = "validate")]
    m.with_guard(|g| m.heap().validate(g));
}

/// Guard mode (`DebugFlags::GUARD`): a 64 MiB object's pages are committed in slices as without the knob
/// (before, guard mode's large objects committed every page in one section), and its free's page-map clear
/// runs before the guard.
#[test]
fn a_guard_mode_large_object_commits_in_slices() {
    use goheap::malloc::DebugFlags;
    let m = new_malloc_with(DebugFlags::GUARD);
    let layout = Layout::from_size_align(MIB64, 64).unwrap();
    reset();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    let (max, sections, unguarded) = figures();
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= BOUND_PAGES, "a section committed {max} pages (bound {BOUND_PAGES})");
    assert!(sections >= MIB64 / PAGE_SIZE / COMMIT_SLICE_NPAGES, "{sections} sections");
    // The object ends right before its guard page.
    assert_eq!((p as usize + MIB64) % PAGE_SIZE, 0);
    // SAFETY: `p` is a live allocation of `layout`, ours; written, then freed once.
    unsafe {
        p.write_bytes(0x5a, MIB64);
        reset();
        m.dealloc(p, layout);
    }
    let (max, _, unguarded) = figures();
    assert_eq!(unguarded, 0);
    assert!(max <= BOUND_PAGES, "the free did {max} pages of source work in a section");
    assert_eq!(m.mem_stats().heap_objects, 0);
}

/// The heap profiler's first sample makes its tables (408 KiB) a commit slice per guarded section and
/// clears them with interrupts on: before, the sampled allocation's one section committed (and, where the
/// source does not hand out zeroed pages, cleared) all of them.
#[test]
fn the_first_sample_makes_the_profile_tables_in_slices() {
    let m = new_malloc();
    // Every allocation sampled.
    m.set_profile_rate(1);
    let layout = Layout::from_size_align(64, 8).unwrap();
    assert_eq!(m.profile_sys_bytes(), 0);
    reset();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    let (max, sections, unguarded) = figures();
    let tables_npages = m.profile_sys_bytes() / PAGE_SIZE;
    assert!(tables_npages > BOUND_PAGES, "the tables were not made ({tables_npages} pages committed)");
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= BOUND_PAGES, "a section committed {max} pages (bound {BOUND_PAGES})");
    assert!(sections >= tables_npages / COMMIT_SLICE_NPAGES, "{tables_npages} pages in {sections} sections");
    let mut records = 0;
    m.heap_profile(|_| records += 1);
    assert_eq!(records, 1, "the first sample was not recorded");
    // SAFETY: live allocation of `layout`, ours.
    unsafe { m.dealloc(p, layout) };
}

/// Efence mode (`DebugFlags::EFENCE`): a freed 64 MiB object's pages are decommitted a slice per section
/// (before, its retirement decommitted all of them in one), and never handed out again.
#[test]
fn an_efence_free_decommits_in_slices() {
    use goheap::malloc::DebugFlags;
    let m = new_malloc_with(DebugFlags::EFENCE);
    let layout = Layout::from_size_align(MIB64, 8).unwrap();
    let p = m.alloc(layout);
    assert!(!p.is_null());
    reset();
    // SAFETY: `p` is a live allocation of `layout`, ours; freed once.
    unsafe { m.dealloc(p, layout) };
    let (max, sections, unguarded) = figures();
    assert_eq!(unguarded, 0, "a source call outside the guard");
    assert!(max <= BOUND_PAGES, "a section decommitted {max} pages (bound {BOUND_PAGES})");
    assert!(sections >= MIB64 / PAGE_SIZE / DECOMMIT_SLICE_NPAGES, "{sections} sections");
    let st = m.mem_stats();
    assert_eq!(st.heap_objects, 0);
    assert!(st.efence_retired_bytes >= MIB64 as u64, "retired {} bytes", st.efence_retired_bytes);
    #[cfg(feature = "validate")]
    m.with_guard(|g| m.heap().validate(g));
}
