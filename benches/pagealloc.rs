//! Page-level benchmark: cost of one span allocation + free of 1, 8 and 64 pages, through a page cache and
//! through the heap lock, on an empty heap and on a fragmented one.
//!
//! Run: `cargo bench --bench pagealloc --features std`
//!
//! Method: every scenario runs `PAIRS` alloc+free pairs per sample; the scenarios are interleaved round by
//! round (so drift in machine load spreads over all of them) and each prints the median over `ROUNDS`
//! rounds, in ns per pair. Memory comes from the mmap source; pages stay committed after the first round
//! (free pages are not scavenged here), so this measures the allocator, not the kernel's page faults.
//! 64 pages is above the page cache's limit (< 16 pages), so "page cache" for 64 pages takes the heap path.

use std::hint::black_box;
use std::time::Instant;

use goheap::cpu::Guarded;
use goheap::page::heap::pagecache::PageCache;
use goheap::page::heap::Heap;
use goheap::source::mmap::MmapSource;

/// The guard token the heap's locking methods ask for: these tests run no interrupt or signal handler that
/// calls goheap, so any thread may make one.
fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

const PAIRS: usize = 20_000;
const ROUNDS: usize = 21;

struct Scenario {
    name: String,
    heap: &'static Heap<MmapSource>,
    npages: usize,
    cache: Option<PageCache>,
    samples: Vec<f64>,
}

fn fragmented_heap() -> &'static Heap<MmapSource> {
    // 32 MiB of 1-page spans with every other one freed: 2048 one-page holes before any larger fit, so a
    // first-fit search for 8 or 64 pages must skip them (the summaries do it in O(levels)).
    let h: &'static Heap<MmapSource> = Box::leak(Box::new(Heap::with_max_bytes(MmapSource::new(), 1 << 30)));
    let spans: Vec<_> = (0..4096).map(|_| h.alloc_span(g(), None, 1, 0).unwrap()).collect();
    for (i, s) in spans.into_iter().enumerate() {
        if i % 2 == 0 {
            // SAFETY: live span, unused.
            unsafe { h.free_span(g(), None, s) };
        }
    }
    h
}

fn run(sc: &mut Scenario) -> f64 {
    let h = sc.heap;
    let n = sc.npages;
    let t = Instant::now();
    for _ in 0..PAIRS {
        let s = h.alloc_span(g(), sc.cache.as_mut(), n, 0).unwrap();
        black_box(s);
        // SAFETY: the span was just allocated and nothing uses it.
        unsafe { h.free_span(g(), sc.cache.as_mut(), s) };
    }
    t.elapsed().as_nanos() as f64 / PAIRS as f64
}

fn main() {
    let empty: &'static Heap<MmapSource> = Box::leak(Box::new(Heap::with_max_bytes(MmapSource::new(), 1 << 30)));
    let frag = fragmented_heap();
    let mut scs = Vec::new();
    for (hname, h) in [("empty heap", empty), ("fragmented heap", frag)] {
        for n in [1usize, 8, 64] {
            for cached in [true, false] {
                scs.push(Scenario {
                    name: format!("{hname:16} {n:3} pages, {}", if cached { "page cache " } else { "heap lock  " }),
                    heap: h,
                    npages: n,
                    cache: cached.then(PageCache::new),
                    samples: Vec::new(),
                });
            }
        }
    }
    // Warm-up round (commits the pages once).
    for sc in scs.iter_mut() {
        run(sc);
    }
    for _ in 0..ROUNDS {
        for sc in scs.iter_mut() {
            let v = run(sc);
            sc.samples.push(v);
        }
    }
    println!("goheap page level: ns per alloc+free pair, median of {ROUNDS} interleaved rounds of {PAIRS} pairs");
    for sc in scs.iter_mut() {
        sc.samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = sc.samples[sc.samples.len() / 2];
        let (lo, hi) = (sc.samples[0], sc.samples[sc.samples.len() - 1]);
        println!("  {}  {med:8.1} ns   (min {lo:.1}, max {hi:.1})", sc.name);
    }
    println!("Go, design 35112 (for comparison; different machine and workload): treap 4.0 us, radix tree ~680 ns, radix tree + page cache ~20 ns");
}
