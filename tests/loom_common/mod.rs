//! Shared set-up of the loom models (`tests/loom_*.rs`, built only with `--cfg loom`): a CPU provider
//! whose cache index is fixed per loom thread, a tiny allocator over a bounded mmap source, and shadow
//! cells that let loom check the hand-over of an object between the threads that use it.
#![allow(dead_code)]

use goheap::cpu::CpuProvider;
use goheap::page::heap::reservation_bytes;
use goheap::source::bounded::BoundedSource;
use goheap::Malloc;
use loom::cell::UnsafeCell;
use std::cell::Cell;
use std::collections::HashMap;

loom::thread_local! {
    static CPU: Cell<Option<usize>> = Cell::new(None);
}

/// The calling loom thread's cache index from now on (`None`: the shared, locked cache).
pub fn set_cpu(i: Option<usize>) {
    CPU.with(|c| c.set(i));
}

/// One cache index per loom thread, set with [`set_cpu`]. Each thread sets its own, distinct index and
/// no goheap call re-enters the provider, so indices are exclusive.
#[derive(Debug, Default)]
pub struct LoomCpus;

// SAFETY: every loom thread of a model sets a distinct index (or none) and keeps it; goheap does not
// re-enter `enter` while a section is open in these models (no hooks, no logger).
unsafe impl CpuProvider for LoomCpus {
    type Guard<'a> = ();
    fn enter(&self) -> ((), Option<usize>) {
        ((), CPU.with(|c| c.get()))
    }
    type LeafGuard<'a> = ();
    fn enter_leaf(&self) -> ((), Option<usize>) {
        ((), CPU.with(|c| c.get()))
    }
}

/// The models' allocator: one 4 MiB chunk of arena.
pub type M = Malloc<BoundedSource, LoomCpus>;

/// Arena bytes of the models' heaps: one page-allocator chunk.
pub const ARENA: usize = 4 << 20;

/// A fresh allocator over its own small mapping (unmapped when dropped).
pub fn new_malloc() -> Box<M> {
    let src = BoundedSource::with_mmap(reservation_bytes(ARENA), usize::MAX);
    Box::new(Malloc::with_max_bytes(src, LoomCpus, ARENA))
}

/// An allocator over a heap region (not a mapping): the source zeroes on commit and fills decommitted
/// pages with `POISON_BYTE`, so a page decommitted under a user shows as changed contents (not a fault).
pub struct RegionMalloc {
    pub m: std::mem::ManuallyDrop<std::sync::Arc<M>>,
    region: *mut u8,
    layout: std::alloc::Layout,
}

// SAFETY: the region is only the source's; `m` is shareable.
unsafe impl Send for RegionMalloc {}
// SAFETY: as above.
unsafe impl Sync for RegionMalloc {}

impl RegionMalloc {
    /// A fresh allocator over a fresh region.
    pub fn new() -> Self {
        let len = reservation_bytes(ARENA);
        // Chunk-aligned, so the heap's layout in the region (and so the explored count) is the same every run.
        let align = goheap::page::pagealloc::PALLOC_CHUNK_BYTES.max(goheap::source::SOURCE_GRANULE);
        let layout = std::alloc::Layout::from_size_align(len, align).unwrap();
        // SAFETY: a non-zero size.
        let region = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!region.is_null());
        // SAFETY: the region is fresh, ours, readable and writable, and granule-aligned.
        let src = unsafe { BoundedSource::over_region(region, len, usize::MAX) };
        let m = std::sync::Arc::new(Malloc::with_max_bytes(src, LoomCpus, ARENA));
        RegionMalloc { m: std::mem::ManuallyDrop::new(m), region, layout }
    }
}

impl Drop for RegionMalloc {
    fn drop(&mut self) {
        // SAFETY: dropped once, here; the region outlives the allocator.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.m);
            std::alloc::dealloc(self.region, self.layout);
        }
    }
}

/// Runs each path of a model once, one after the other on the calling thread, before the model's threads
/// start: for each cache index in `cpus`, allocates and frees one object of each layout and flushes that
/// cache and calls `release_all`. Leaves the calling thread on the last index of `cpus`.
///
/// Why: under loom each goheap atomic is created on first use (see `goheap::sync`), and loom counts the
/// creation as a non-atomic write that every later access must happen after. In the real code every atomic
/// is initialised before the structure is shared, so a first use by two threads at once would be a false
/// report. Touching the paths' atomics here, before the spawns, makes their creation happen before every
/// thread of the model, as the real initialisation does.
pub fn warm_up(m: &M, cpus: &[Option<usize>], layouts: &[std::alloc::Layout]) {
    for &cpu in cpus {
        set_cpu(cpu);
        for &l in layouts {
            let p = m.alloc(l);
            assert!(!p.is_null());
            // SAFETY: `p` is ours.
            unsafe { m.dealloc(p, l) };
        }
        m.flush_cpu_cache();
        m.release_all();
    }
    set_cpu(*cpus.last().unwrap());
}

/// Shadow cells for some objects: a thread that uses an object writes its cell, so loom reports a
/// causality violation when two uses of one object are not ordered by happens-before (the allocator
/// handed an object over without synchronising).
pub struct Shadow(HashMap<usize, UnsafeCell<u64>>);

// SAFETY: the cells are loom's, which check every access; the map is not changed after `new`.
unsafe impl Sync for Shadow {}
// SAFETY: as above.
unsafe impl Send for Shadow {}

impl Shadow {
    /// Cells for `addrs` (created by the calling thread, before it hands the shadow to others).
    pub fn new(addrs: &[usize]) -> Self {
        Shadow(addrs.iter().map(|&a| (a, UnsafeCell::new(0))).collect())
    }

    /// A use (write) of the object at `addr`, if it has a cell.
    pub fn write(&self, addr: usize, v: u64) {
        if let Some(c) = self.0.get(&addr) {
            // SAFETY: a loom cell; loom checks the access.
            c.with_mut(|p| unsafe { *p = v });
        }
    }
}

/// Stack of the models' loom threads: goheap's structures are larger under loom (each atomic is a wrapper).
pub const STACK: usize = 16 << 20;

/// Spawns a loom thread with a stack large enough for goheap's calls.
pub fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> loom::thread::JoinHandle<T> {
    loom::thread::Builder::new().stack_size(STACK).spawn(f).unwrap()
}

/// Runs a model and prints its explored count (the figure in each model's doc comment).
pub fn run(name: &str, b: loom::model::Builder, f: impl Fn() + Sync + Send + 'static) -> u64 {
    let t = std::time::Instant::now();
    let f = std::sync::Arc::new(f);
    // The model's own first thread has a small stack: run the body on a large one.
    let n = goheap::sync::loom_builder_check(b, move || {
        let f = f.clone();
        spawn(move || f()).join().unwrap()
    });
    eprintln!("loom model {name}: {n} iterations explored in {:.1} s", t.elapsed().as_secs_f64());
    n
}

/// A builder with the environment's settings and `bound` preemptions unless `LOOM_MAX_PREEMPTIONS` says
/// otherwise.
pub fn builder(bound: Option<usize>) -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    // Every atomic access of the real code is a scheduling point, setup included: far more than loom's
    // default of 1000 per execution.
    if std::env::var_os("LOOM_MAX_BRANCHES").is_none() {
        b.max_branches = 1 << 20;
    }
    if b.preemption_bound.is_none() {
        b.preemption_bound = bound;
    }
    b
}
