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
