//! Several threads allocating and freeing spans through per-thread page caches, frees crossing threads,
//! a scavenger thread decommitting free pages meanwhile: no page is ever handed out twice (shadow bitmap),
//! span memory is never clobbered, and the heap is consistent at the end.
#![cfg(all(feature = "std", feature = "validate"))]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use goheap::cpu::Guarded;
use goheap::page::heap::pagecache::PageCache;
use goheap::page::heap::{span_info, Heap};
use goheap::page::span::Span;
use goheap::source::bounded::BoundedSource;
use goheap::PAGE_SIZE;

/// The guard token the heap's locking methods ask for: these tests run no interrupt or signal handler that
/// calls goheap, so any thread may make one.
fn g() -> Guarded<'static> {
    // SAFETY: no handler that calls goheap runs on the test's threads.
    unsafe { Guarded::new_unchecked() }
}

const MIB: usize = 1 << 20;
const ARENA: usize = 256 * MIB;
const THREADS: usize = 4;
const OPS: usize = 12_000;

struct Shadow {
    base: usize,
    bits: Vec<AtomicU64>,
}

impl Shadow {
    fn claim(&self, addr: usize, npages: usize) {
        for p in (addr - self.base) / PAGE_SIZE..(addr - self.base) / PAGE_SIZE + npages {
            let old = self.bits[p / 64].fetch_or(1 << (p % 64), Ordering::SeqCst);
            assert_eq!(old & (1 << (p % 64)), 0, "page {p} handed out twice");
        }
    }
    fn release(&self, addr: usize, npages: usize) {
        for p in (addr - self.base) / PAGE_SIZE..(addr - self.base) / PAGE_SIZE + npages {
            let old = self.bits[p / 64].fetch_and(!(1 << (p % 64)), Ordering::SeqCst);
            assert_ne!(old & (1 << (p % 64)), 0, "page {p} freed but not allocated");
        }
    }
}

/// A span handed between threads (the pointer is only a token here).
#[derive(Clone, Copy)]
struct Token(usize);
impl Token {
    fn span(self) -> NonNull<Span> {
        NonNull::new(self.0 as *mut Span).unwrap()
    }
}

fn info(t: Token) -> (usize, usize) {
    // SAFETY: the token is a live span of the heap under test, owned by whoever holds the token.
    let i = unsafe { span_info(t.span()) };
    assert!(i.in_use);
    (i.base, i.npages)
}

fn stamp(t: Token) {
    let (base, npages) = info(t);
    // SAFETY: the span's memory belongs to the token holder.
    unsafe {
        *(base as *mut u64) = base as u64 ^ 0xA5A5;
        *((base + npages * PAGE_SIZE - 8) as *mut u64) = npages as u64;
    }
}

fn check(t: Token) {
    let (base, npages) = info(t);
    // SAFETY: as in `stamp`.
    unsafe {
        assert_eq!(*(base as *const u64), base as u64 ^ 0xA5A5, "span {base:#x} clobbered (head)");
        assert_eq!(*((base + npages * PAGE_SIZE - 8) as *const u64), npages as u64, "span {base:#x} clobbered (tail)");
    }
}

#[test]
fn page_threads_no_page_handed_out_twice() {
    let heap: &'static Heap<BoundedSource> =
        Box::leak(Box::new(Heap::with_max_bytes(BoundedSource::with_mmap(ARENA + 32 * MIB, usize::MAX), ARENA)));
    // Initialise so the arena base is known.
    let first = heap.alloc_span(g(), None, 1, 0).unwrap();
    // SAFETY: live span, unused.
    unsafe { heap.free_span(g(), None, first) };
    let shadow: &'static Shadow = Box::leak(Box::new(Shadow {
        base: heap.arena_base(),
        bits: (0..ARENA / PAGE_SIZE / 64).map(|_| AtomicU64::new(0)).collect(),
    }));
    let exchange: &'static Mutex<Vec<Token>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    let stop: &'static AtomicBool = Box::leak(Box::new(AtomicBool::new(false)));
    let cross_frees: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
    heap.set_memory_limit(48 * MIB); // aggressive scavenging meanwhile (the workload stays near it)
    let scav =
        goheap::page::heap::scavenger::spawn_scavenger(heap, std::time::Duration::from_micros(200), 256 << 10, stop);

    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            std::thread::spawn(move || {
                let mut pc = PageCache::new();
                let mut mine: Vec<Token> = Vec::new();
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let mut rnd = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                let free = |pc: &mut PageCache, tok: Token| {
                    check(tok);
                    let (base, npages) = info(tok);
                    shadow.release(base, npages);
                    // SAFETY: the span is live and nobody else holds its token.
                    unsafe { heap.free_span(g(), Some(pc), tok.span()) };
                };
                for i in 0..OPS {
                    let r = rnd();
                    match r % 8 {
                        0..=3 => {
                            let n = match (r >> 8) % 16 {
                                0 => 16 + ((r >> 16) % 100) as usize, // heap path
                                1 => 64,
                                _ => 1 + ((r >> 16) % 10) as usize, // page cache
                            };
                            let s = if (r >> 32) % 32 == 0 {
                                heap.alloc_span_aligned(g(), n, 64 << 10)
                            } else {
                                heap.alloc_span(g(), Some(&mut pc), n, 1)
                            };
                            let tok = Token(s.expect("unbounded source").as_ptr() as usize);
                            let (base, npages) = info(tok);
                            assert_eq!(npages, n);
                            shadow.claim(base, npages);
                            stamp(tok);
                            assert_eq!(heap.span_of(base + (n - 1) * PAGE_SIZE), Some(tok.span()));
                            mine.push(tok);
                        }
                        4 | 5 if !mine.is_empty() => {
                            let k = (r >> 8) as usize % mine.len();
                            free(&mut pc, mine.swap_remove(k));
                        }
                        6 if !mine.is_empty() => {
                            // Hand one to another thread.
                            let k = (r >> 8) as usize % mine.len();
                            exchange.lock().unwrap().push(mine.swap_remove(k));
                        }
                        7 => {
                            let got = exchange.lock().unwrap().pop();
                            if let Some(tok) = got {
                                free(&mut pc, tok);
                                cross_frees.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        _ => {}
                    }
                    if mine.len() > 200 || i == OPS - 1 {
                        while mine.len() > 50 || (i == OPS - 1 && !mine.is_empty()) {
                            let tok = mine.pop().unwrap();
                            free(&mut pc, tok);
                        }
                    }
                }
                heap.flush_page_cache(g(), &mut pc);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    scav.join().unwrap();
    let mut pc = PageCache::new();
    for tok in exchange.lock().unwrap().drain(..) {
        check(tok);
        let (base, npages) = info(tok);
        shadow.release(base, npages);
        // SAFETY: live span, unused.
        unsafe { heap.free_span(g(), Some(&mut pc), tok.span()) };
    }
    heap.flush_page_cache(g(), &mut pc);
    assert!(cross_frees.load(Ordering::Relaxed) > 100, "frees must have crossed threads");
    assert!(shadow.bits.iter().all(|w| w.load(Ordering::SeqCst) == 0));
    heap.validate(g());
    let st = heap.stats();
    assert_eq!(st.inuse_bytes, 0);
    assert_eq!(st.spans_inuse, 0);
    assert!(st.scavenged_total_bytes > 0, "the scavenger thread must have released memory meanwhile");
    heap.release_all(g());
    assert_eq!(heap.stats().committed_bytes, 0);
    heap.validate(g());
}
