//! goheap-bench: allocator workloads (issue 7), one binary per allocator (see `alloc_sel.rs`).
//!
//! `goheap-bench GROUP [--scale F] [--cap SECS]` runs one group of workloads in this process and prints one
//! JSON line per workload on stdout: workload, allocator, threads, ops, ns_per_op (wall time per operation;
//! with several threads, wall time times threads over all operations, i.e. per-thread cost in the parallel
//! regime), whether the time cap cut it short, peak RSS (getrusage ru_maxrss) and per-workload extras.
//! `cargo xtask bench` builds one binary per allocator and runs the groups interleaved; see BENCHMARKS.md.
//!
//! `goheap-bench callgrind-pair64 N`: N 64-byte alloc+free pairs and nothing else, for instruction counts.
//! `goheap-bench callgrind-pair8 N`: the same with 8-byte objects (goheap's tiny path).
//! `goheap-bench callgrind-pair12 N`: the same with 12-byte objects (goheap's 16-byte class since the tiny
//! bound went from 16 to 8 bytes; the tiny path before).
//! `goheap-bench --list`: the groups.

mod alloc_sel;

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::Rng;

include!("groups.rs");

/// Run parameters: `scale` multiplies every operation count; `cap` bounds each workload's time.
#[derive(Clone, Copy)]
struct Cfg {
    scale: f64,
    cap: Duration,
}

impl Cfg {
    fn n(&self, base: u64) -> u64 {
        ((base as f64 * self.scale) as u64).max(1)
    }
}

/// Wall time and this process's CPU time (all threads), started together.
#[derive(Clone, Copy)]
struct Clock {
    wall: Instant,
    cpu: Duration,
}

/// What a [`Clock`] measured.
#[derive(Clone, Copy)]
struct Spent {
    wall: Duration,
    cpu: Duration,
}

fn process_cpu() -> Duration {
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe {
        let mut ts: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

impl Clock {
    fn now() -> Self {
        Clock { wall: Instant::now(), cpu: process_cpu() }
    }
    fn elapsed(&self) -> Spent {
        Spent { wall: self.wall.elapsed(), cpu: process_cpu().saturating_sub(self.cpu) }
    }
}

/// One result line, built as JSON by hand (no serde: this crate must stay quick to build).
struct Rec {
    fields: Vec<(String, String)>,
}

impl Rec {
    fn new(workload: &str, threads: usize) -> Self {
        let mut r = Rec { fields: Vec::new() };
        r.s("workload", workload);
        r.s("alloc", alloc_sel::NAME);
        r.u("threads", threads as u64);
        r
    }
    fn s(&mut self, k: &str, v: &str) -> &mut Self {
        self.fields.push((k.into(), format!("\"{v}\"")));
        self
    }
    fn u(&mut self, k: &str, v: u64) -> &mut Self {
        self.fields.push((k.into(), v.to_string()));
        self
    }
    fn f(&mut self, k: &str, v: f64) -> &mut Self {
        self.fields.push((k.into(), format!("{v:.4}")));
        self
    }
    fn b(&mut self, k: &str, v: bool) -> &mut Self {
        self.fields.push((k.into(), v.to_string()));
        self
    }
    /// Time per op (wall, and CPU time of the whole process per op), ops done, and whether the cap cut the
    /// run short.
    fn timing(&mut self, ops: u64, threads: usize, elapsed: Spent, partial: bool) -> &mut Self {
        self.u("ops", ops);
        self.f("ns_per_op", elapsed.wall.as_nanos() as f64 * threads as f64 / ops.max(1) as f64);
        self.f("cpu_ns_per_op", elapsed.cpu.as_nanos() as f64 / ops.max(1) as f64);
        self.b("partial", partial);
        self
    }
    /// goheap's own figures (nothing for peers).
    fn gh(&mut self, prefix: &str) -> &mut Self {
        for (k, v) in alloc_sel::stats() {
            self.u(&format!("{prefix}{k}"), v);
        }
        self
    }
    fn emit(&mut self) {
        self.u("peak_rss_kb", peak_rss_kb());
        let body: Vec<String> = self.fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
        println!("{{{}}}", body.join(","));
    }
}

/// Peak resident set of this process so far (KiB).
fn peak_rss_kb() -> u64 {
    // SAFETY: getrusage writes the struct we pass.
    unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru.ru_maxrss as u64
    }
}

/// Current resident set (KiB), from /proc/self/statm.
fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s.split_whitespace().nth(1).and_then(|x| x.parse().ok()).unwrap_or(0);
    pages * 4
}

#[inline]
fn lay(size: usize) -> Layout {
    Layout::from_size_align(size.max(1), 8).unwrap()
}

#[inline]
unsafe fn touch(p: *mut u8, size: usize) {
    // SAFETY: `p` is valid for `size` bytes.
    unsafe {
        *p = size as u8;
        *p.add(size - 1) = 1;
    }
}

/// Alloc+free pairs of one size: the fast path.
fn pair(cfg: Cfg) {
    for size in [16usize, 64, 256, 1024, 4096] {
        let l = lay(size);
        let n = cfg.n(4_000_000);
        // Warm up the caches.
        for _ in 0..100_000 {
            // SAFETY: non-zero layout; freed right away.
            unsafe {
                let p = black_box(alloc(l));
                *p = 1;
                dealloc(black_box(p), l);
            }
        }
        let deadline = Instant::now() + cfg.cap / 5;
        let t = Clock::now();
        let mut done = 0u64;
        let mut partial = false;
        while done < n {
            for _ in 0..4096 {
                // SAFETY: as above.
                unsafe {
                    let p = black_box(alloc(l));
                    *p = done as u8;
                    dealloc(black_box(p), l);
                }
            }
            done += 4096;
            if Instant::now() > deadline {
                partial = done < n;
                break;
            }
        }
        Rec::new(&format!("pair-{size}"), 1).timing(done, 1, t.elapsed(), partial).emit();
    }
}

/// glibc bench-malloc-simple: allocate a batch, free it first-in-first-out or last-in-first-out.
fn batch(cfg: Cfg) {
    const N: usize = 1000;
    for size in [64usize, 1024] {
        for order in ["fifo", "lifo"] {
            let l = lay(size);
            let mut v: Vec<*mut u8> = Vec::with_capacity(N);
            let rounds = cfg.n(2000);
            let deadline = Instant::now() + cfg.cap / 4;
            let t = Clock::now();
            let mut done = 0u64;
            let mut partial = false;
            for r in 0..rounds {
                for _ in 0..N {
                    // SAFETY: non-zero layout.
                    let p = unsafe { alloc(l) };
                    // SAFETY: fresh block of `size` bytes.
                    unsafe { *p = r as u8 };
                    v.push(p);
                }
                if order == "fifo" {
                    for &p in &v {
                        // SAFETY: allocated above with `l`.
                        unsafe { dealloc(p, l) };
                    }
                } else {
                    for &p in v.iter().rev() {
                        // SAFETY: allocated above with `l`.
                        unsafe { dealloc(p, l) };
                    }
                }
                v.clear();
                done += N as u64;
                if Instant::now() > deadline {
                    partial = r + 1 < rounds;
                    break;
                }
            }
            Rec::new(&format!("batch-{order}-{size}"), 1).timing(done, 1, t.elapsed(), partial).emit();
        }
    }
}

/// Runs `f(thread_index, deadline)` on `threads` threads started together; returns (sum of ops, any
/// partial, wall time).
fn run_threads<F>(threads: usize, cap: Duration, f: F) -> (u64, bool, Spent)
where
    F: Fn(usize, Instant) -> (u64, bool) + Send + Sync + 'static,
{
    let f = Arc::new(f);
    let go = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..threads)
        .map(|i| {
            let (f, go, ready) = (f.clone(), go.clone(), ready.clone());
            std::thread::spawn(move || {
                ready.fetch_add(1, Ordering::SeqCst);
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                f(i, Instant::now() + cap)
            })
        })
        .collect();
    while ready.load(Ordering::SeqCst) < threads {
        std::thread::yield_now();
    }
    let t = Clock::now();
    go.store(true, Ordering::Release);
    let mut ops = 0;
    let mut partial = false;
    for h in hs {
        let (o, p) = h.join().unwrap();
        ops += o;
        partial |= p;
    }
    (ops, partial, t.elapsed())
}

/// Random working set of 4 B..32 KiB objects with frees, reallocs and replacements.
fn wset(cfg: Cfg, threads: usize) {
    const SLOTS: usize = 4096;
    let n = cfg.n(1_000_000);
    let live_total = Arc::new(AtomicUsize::new(0));
    let snap = Arc::new(Mutex::new(None::<(u64, Vec<(&'static str, u64)>)>));
    let barrier = Arc::new(std::sync::Barrier::new(threads));
    let (lt, sn, bar) = (live_total.clone(), snap.clone(), barrier.clone());
    let (ops, partial, el) = run_threads(threads, cfg.cap, move |ti, deadline| {
        let mut rng = Rng::new(ti as u64 + 7);
        let mut slots: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); SLOTS];
        let mut done = 0u64;
        let mut partial = false;
        let mut live = 0usize;
        while done < n {
            for _ in 0..256 {
                let i = rng.below(SLOTS as u64) as usize;
                let (p, sz) = slots[i];
                // SAFETY: every block is used within its size and freed with its layout.
                unsafe {
                    if p.is_null() {
                        let s = rng.log_size(4, 32 << 10);
                        let q = alloc(lay(s));
                        touch(q, s);
                        slots[i] = (q, s);
                        live += s;
                    } else {
                        match rng.below(4) {
                            0 => {
                                dealloc(p, lay(sz));
                                slots[i] = (std::ptr::null_mut(), 0);
                                live -= sz;
                            }
                            1 => {
                                let s = rng.log_size(4, 32 << 10);
                                let q = realloc(p, lay(sz), s);
                                touch(q, s);
                                slots[i] = (q, s);
                                live = live - sz + s;
                            }
                            _ => {
                                dealloc(p, lay(sz));
                                let s = rng.log_size(4, 32 << 10);
                                let q = alloc(lay(s));
                                touch(q, s);
                                slots[i] = (q, s);
                                live = live - sz + s;
                            }
                        }
                    }
                }
            }
            done += 256;
            if Instant::now() > deadline {
                partial = done < n;
                break;
            }
        }
        // Live state: every thread still holds its working set here.
        lt.fetch_add(live, Ordering::SeqCst);
        bar.wait();
        if ti == 0 {
            *sn.lock().unwrap() = Some((rss_kb(), alloc_sel::stats()));
        }
        bar.wait();
        for (p, sz) in slots {
            if !p.is_null() {
                // SAFETY: allocated above with this size.
                unsafe { dealloc(p, lay(sz)) };
            }
        }
        (done, partial)
    });
    let mut r = Rec::new(&format!("wset-{threads}t"), threads);
    r.timing(ops, threads, el, partial).u("live_bytes", live_total.load(Ordering::SeqCst) as u64);
    if let Some((rss, gh)) = snap.lock().unwrap().take() {
        r.u("rss_live_kb", rss);
        for (k, v) in gh {
            r.u(k, v);
        }
    }
    r.emit();
}

/// Rust-shaped work: Vec and String growth, building and dropping a 1M-entry HashMap and BTreeMap.
fn rust(cfg: Cfg) {
    // Vec growth to lengths 1..64Ki (doubling reallocs, small and large).
    let deadline = Instant::now() + cfg.cap / 4;
    let t = Clock::now();
    let (mut done, mut partial) = (0u64, false);
    let rounds = cfg.n(4000);
    for r in 0..rounds {
        let len = 1usize << (r % 17);
        let mut v: Vec<u64> = Vec::new();
        for i in 0..len {
            v.push(i as u64);
        }
        black_box(&v);
        done += len as u64;
        if Instant::now() > deadline {
            partial = r + 1 < rounds;
            break;
        }
    }
    Rec::new("vec-grow", 1).timing(done, 1, t.elapsed(), partial).emit();

    // String growth by 8-byte pieces, plus many short strings (format!).
    let deadline = Instant::now() + cfg.cap / 4;
    let t = Clock::now();
    let (mut done, mut partial) = (0u64, false);
    let rounds = cfg.n(6000);
    for r in 0..rounds {
        let pieces = 1usize << (r % 15);
        let mut s = String::new();
        for _ in 0..pieces {
            s.push_str("abcdefgh");
        }
        black_box(&s);
        let mut short = Vec::with_capacity(64);
        for i in 0..64 {
            short.push(format!("k{i}-{r}"));
        }
        black_box(&short);
        done += pieces as u64 + 64;
        if Instant::now() > deadline {
            partial = r + 1 < rounds;
            break;
        }
    }
    Rec::new("string-grow", 1).timing(done, 1, t.elapsed(), partial).emit();

    // HashMap and BTreeMap of 1M entries (scaled), built by insertion and dropped.
    let n = cfg.n(1_000_000);
    let mut rng = Rng::new(3);
    let keys: Vec<u64> = (0..n).map(|_| rng.next()).collect();
    let t = Clock::now();
    {
        let mut m: HashMap<u64, u64> = HashMap::new();
        for &k in &keys {
            m.insert(k, k);
        }
        black_box(&m);
    }
    Rec::new("hashmap-1m", 1).timing(n, 1, t.elapsed(), false).emit();
    let t = Clock::now();
    let mut live_rec = None;
    {
        let mut m: BTreeMap<u64, u64> = BTreeMap::new();
        for &k in &keys {
            m.insert(k, k);
        }
        black_box(&m);
        live_rec = live_rec.or(Some((rss_kb(), alloc_sel::stats())));
    }
    let mut r = Rec::new("btreemap-1m", 1);
    r.timing(n, 1, t.elapsed(), false);
    if let Some((rss, gh)) = live_rec {
        r.u("rss_live_kb", rss);
        for (k, v) in gh {
            r.u(k, v);
        }
    }
    r.emit();
}

/// A pointer that may cross threads.
#[derive(Clone, Copy)]
struct P(*mut u8, usize);
// SAFETY: the benchmark hands blocks between threads; the allocator under test must cope.
unsafe impl Send for P {}

/// larson-style: threads replace random objects of their slot array; each generation of threads hands its
/// array to the next generation, whose frees are of objects another thread allocated.
fn larson(cfg: Cfg) {
    const THREADS: usize = 4;
    const SLOTS: usize = 1000;
    let gens = 10u64;
    let per_gen = cfg.n(100_000);
    let mut arrays: Vec<Vec<P>> = (0..THREADS)
        .map(|t| {
            let mut rng = Rng::new(t as u64 + 100);
            (0..SLOTS)
                .map(|_| {
                    let s = 16 + rng.below(1009) as usize;
                    // SAFETY: non-zero layout.
                    P(unsafe { alloc(lay(s)) }, s)
                })
                .collect()
        })
        .collect();
    let deadline = Instant::now() + cfg.cap;
    let t = Clock::now();
    let (mut ops, mut partial) = (0u64, false);
    for g in 0..gens {
        let hs: Vec<_> = arrays
            .drain(..)
            .enumerate()
            .map(|(ti, mut arr)| {
                std::thread::spawn(move || {
                    let mut rng = Rng::new(g * 31 + ti as u64);
                    for _ in 0..per_gen {
                        let i = rng.below(SLOTS as u64) as usize;
                        let s = 16 + rng.below(1009) as usize;
                        // SAFETY: each block is freed with its own layout; fresh blocks are `s` bytes.
                        unsafe {
                            dealloc(arr[i].0, lay(arr[i].1));
                            let q = alloc(lay(s));
                            touch(q, s);
                            arr[i] = P(q, s);
                        }
                    }
                    arr
                })
            })
            .collect();
        arrays = hs.into_iter().map(|h| h.join().unwrap()).collect();
        ops += per_gen * THREADS as u64;
        if Instant::now() > deadline {
            partial = g + 1 < gens;
            break;
        }
    }
    let el = t.elapsed();
    for arr in arrays {
        for p in arr {
            // SAFETY: allocated with this size.
            unsafe { dealloc(p.0, lay(p.1)) };
        }
    }
    Rec::new("larson", THREADS).timing(ops, THREADS, el, partial).emit();
}

/// A bounded single-producer single-consumer ring of pointers.
struct Ring {
    buf: Vec<AtomicUsize>,
    head: CachePadded, // next slot the consumer reads
    tail: CachePadded, // next slot the producer writes
    done: AtomicBool,
}
#[repr(align(128))]
struct CachePadded(AtomicUsize);

const RING: usize = 4096;

#[inline]
fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 64 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Producer/consumer: one thread allocates (64 B, or 8..2048 B), the other frees: every free is remote.
/// The record also carries the pipeline's floor: the same ring and the same writes and reads of each block,
/// with blocks cycled through a preallocated pool instead of allocated and freed (what no allocator can beat).
fn prodcons(cfg: Cfg, mixed: bool) {
    let n = cfg.n(4_000_000);
    let (fsent, _, fel) = prodcons_pipe(cfg, n / 4, mixed, true);
    let (sent, partial, el) = prodcons_pipe(cfg, n, mixed, false);
    // Per object, wall time: alloc on one core and free on the other, pipelined.
    let name = if mixed { "prodcons-8-2048" } else { "prodcons-64" };
    let mut r = Rec::new(name, 2);
    r.timing(sent, 1, el, partial);
    r.f("floor_ns_per_op", fel.wall.as_nanos() as f64 / fsent.max(1) as f64);
    r.emit();
}

/// One producer/consumer run of `n` blocks; with `floor`, blocks come from a pool and are not freed.
fn prodcons_pipe(cfg: Cfg, n: u64, mixed: bool, floor: bool) -> (u64, bool, Spent) {
    let ring = Arc::new(Ring {
        buf: (0..RING).map(|_| AtomicUsize::new(0)).collect(),
        head: CachePadded(AtomicUsize::new(0)),
        tail: CachePadded(AtomicUsize::new(0)),
        done: AtomicBool::new(false),
    });
    // The floor's pool: as many blocks as ring slots, so a block is reused only after the consumer read it.
    let pool_size = if mixed { 2048 } else { 64 };
    let pool: Vec<usize> = if floor {
        // SAFETY: non-zero layout; freed at the end.
        (0..RING).map(|_| unsafe { alloc(lay(pool_size)) } as usize).collect()
    } else {
        Vec::new()
    };
    let rc = ring.clone();
    let t = Clock::now();
    let deadline = t.wall + cfg.cap / if floor { 4 } else { 1 };
    let consumer = std::thread::spawn(move || {
        let mut head = 0usize;
        let mut freed = 0u64;
        let mut sum = 0usize;
        loop {
            let tail = rc.tail.0.load(Ordering::Acquire);
            if head == tail {
                if rc.done.load(Ordering::Acquire) && rc.tail.0.load(Ordering::Acquire) == head {
                    black_box(sum);
                    return freed;
                }
                let mut spins = 0;
                while rc.tail.0.load(Ordering::Acquire) == head && !rc.done.load(Ordering::Acquire) {
                    backoff(&mut spins);
                }
                continue;
            }
            while head != tail {
                let p = rc.buf[head % RING].load(Ordering::Relaxed) as *mut u8;
                // The producer stored the size in the block's first word.
                // SAFETY: a live block of at least 8 bytes from the producer, freed with its layout (or a pool
                // block, only read).
                unsafe {
                    let size = *(p as *const usize);
                    if floor {
                        sum = sum.wrapping_add(size);
                    } else {
                        dealloc(p, lay(size));
                    }
                }
                head += 1;
                freed += 1;
            }
            rc.head.0.store(head, Ordering::Release);
        }
    });
    let mut rng = Rng::new(5);
    let mut tail = 0usize;
    let mut sent = 0u64;
    let mut partial = false;
    let mut rounds = 0u64;
    while sent < n {
        rounds += 1;
        let mut spins = 0;
        while tail - ring.head.0.load(Ordering::Acquire) >= RING {
            backoff(&mut spins);
        }
        let room = RING - (tail - ring.head.0.load(Ordering::Acquire));
        for _ in 0..room.min(256) {
            let size = if mixed { rng.log_size(8, 2048) } else { 64 };
            // SAFETY: non-zero layout (or a pool block of `pool_size` >= 8 bytes the consumer is done with);
            // the size goes in the first word for the consumer.
            unsafe {
                let p = if floor { pool[tail % RING] as *mut u8 } else { alloc(lay(size)) };
                *(p as *mut usize) = size;
                ring.buf[tail % RING].store(p as usize, Ordering::Relaxed);
            }
            tail += 1;
            sent += 1;
        }
        ring.tail.0.store(tail, Ordering::Release);
        if rounds.is_multiple_of(256) && Instant::now() > deadline {
            partial = sent < n;
            break;
        }
    }
    ring.done.store(true, Ordering::Release);
    let freed = consumer.join().unwrap();
    let el = t.elapsed();
    assert_eq!(freed, sent);
    for p in pool {
        // SAFETY: allocated above with `pool_size`.
        unsafe { dealloc(p as *mut u8, lay(pool_size)) };
    }
    (sent, partial, el)
}

/// rptest-style: threads allocate batches of mixed sizes, keep a few batches live, free the oldest, and
/// hand every fourth batch to the next thread to free.
fn rptest(cfg: Cfg) {
    const THREADS: usize = 4;
    const BATCH: usize = 256;
    let iters = cfg.n(1000);
    let inbox: Arc<Vec<Mutex<Vec<Vec<P>>>>> = Arc::new((0..THREADS).map(|_| Mutex::new(Vec::new())).collect());
    let ib = inbox.clone();
    let (ops, partial, el) = run_threads(THREADS, cfg.cap, move |ti, deadline| {
        let mut rng = Rng::new(ti as u64 + 1000);
        let mut held: std::collections::VecDeque<Vec<P>> = std::collections::VecDeque::new();
        let mut ops = 0u64;
        let mut partial = false;
        for it in 0..iters {
            let mut b = Vec::with_capacity(BATCH);
            for _ in 0..BATCH {
                let s = rng.log_size(16, 16 << 10);
                // SAFETY: non-zero layout.
                let p = unsafe { alloc(lay(s)) };
                // SAFETY: fresh block of `s` bytes.
                unsafe { touch(p, s) };
                b.push(P(p, s));
            }
            held.push_back(b);
            if held.len() > 4 {
                let old = held.pop_front().unwrap();
                if it % 4 == 0 {
                    ib[(ti + 1) % THREADS].lock().unwrap().push(old);
                } else {
                    for p in old {
                        // SAFETY: allocated with this size.
                        unsafe { dealloc(p.0, lay(p.1)) };
                    }
                }
            }
            let foreign: Vec<Vec<P>> = std::mem::take(&mut *ib[ti].lock().unwrap());
            for b in foreign {
                for p in b {
                    // SAFETY: allocated by another thread with this size.
                    unsafe { dealloc(p.0, lay(p.1)) };
                }
            }
            ops += BATCH as u64;
            if it % 16 == 0 && Instant::now() > deadline {
                partial = it + 1 < iters;
                break;
            }
        }
        for b in held {
            for p in b {
                // SAFETY: allocated with this size.
                unsafe { dealloc(p.0, lay(p.1)) };
            }
        }
        (ops, partial)
    });
    for m in inbox.iter() {
        for b in m.lock().unwrap().drain(..) {
            for p in b {
                // SAFETY: allocated with this size.
                unsafe { dealloc(p.0, lay(p.1)) };
            }
        }
    }
    Rec::new("rptest", THREADS).timing(ops, THREADS, el, partial).emit();
}

/// Large blocks of 64 KiB..25 MiB in a working set of 8, each written once per 4 KiB page.
fn large(cfg: Cfg) {
    const SLOTS: usize = 8;
    let n = cfg.n(300);
    let mut rng = Rng::new(11);
    let mut slots: Vec<(*mut u8, usize)> = vec![(std::ptr::null_mut(), 0); SLOTS];
    let deadline = Instant::now() + cfg.cap;
    let t = Clock::now();
    let (mut done, mut partial) = (0u64, false);
    let mut live_max = 0usize;
    while done < n {
        let i = rng.below(SLOTS as u64) as usize;
        let s = rng.log_size(64 << 10, 25 << 20);
        // SAFETY: blocks are freed with their layout and written within their size.
        unsafe {
            if !slots[i].0.is_null() {
                dealloc(slots[i].0, lay(slots[i].1));
            }
            let p = alloc(lay(s));
            let mut off = 0;
            while off < s {
                *p.add(off) = 1;
                off += 4096;
            }
            slots[i] = (p, s);
        }
        live_max = live_max.max(slots.iter().map(|x| x.1).sum());
        done += 1;
        if Instant::now() > deadline {
            partial = done < n;
            break;
        }
    }
    let el = t.elapsed();
    let mut r = Rec::new("large", 1);
    r.timing(done, 1, el, partial).u("live_bytes", slots.iter().map(|x| x.1).sum::<usize>() as u64);
    r.u("rss_live_kb", rss_kb()).gh("");
    r.u("max_live_bytes", live_max as u64);
    for (p, s) in slots {
        if !p.is_null() {
            // SAFETY: allocated with this size.
            unsafe { dealloc(p, lay(s)) };
        }
    }
    r.emit();
}

/// Fragmentation then scavenge: fill with mixed small objects, free a random 90%, measure RSS against
/// live bytes right after, after goheap's background step (scavenger), and after the allocator's trim.
fn frag(cfg: Cfg) {
    let target = (cfg.n(256) as usize) << 20;
    let mut rng = Rng::new(13);
    let mut objs: Vec<P> = Vec::with_capacity(target / 100);
    // frag measures memory, not speed: the fill and the free each get the whole cap.
    let deadline = Instant::now() + cfg.cap;
    let t = Clock::now();
    let (mut filled, mut partial) = (0usize, false);
    while filled < target {
        for _ in 0..1024 {
            let s = rng.log_size(8, 1024);
            // SAFETY: non-zero layout.
            let p = unsafe { alloc(lay(s)) };
            // SAFETY: fresh block of `s` bytes; write it all, as a program filling its objects would.
            unsafe { std::ptr::write_bytes(p, 0x5a, s) };
            objs.push(P(p, s));
            filled += s;
        }
        if Instant::now() > deadline {
            partial = filled < target;
            break;
        }
    }
    let rss_full = rss_kb();
    let mut live = 0usize;
    let mut kept = Vec::with_capacity(objs.len() / 9);
    let deadline = Instant::now() + cfg.cap;
    for (k, p) in objs.drain(..).enumerate() {
        if k % 4096 == 0 && Instant::now() > deadline {
            // Too slow to finish (a first-fit list allocator): stop here, the rest stays allocated.
            partial = true;
            kept.push(p);
            continue;
        }
        if partial || rng.below(10) == 0 {
            live += p.1;
            kept.push(p);
        } else {
            // SAFETY: allocated with this size.
            unsafe { dealloc(p.0, lay(p.1)) };
        }
    }
    drop(objs);
    let el = t.elapsed();
    let nobj = kept.len() as u64 * 10;
    let mut r = Rec::new("frag", 1);
    r.timing(nobj, 1, el, partial).u("filled_bytes", filled as u64).u("live_bytes", live as u64);
    r.u("rss_full_kb", rss_full).u("rss_after_free_kb", rss_kb()).gh("after_free_");
    let t = Instant::now();
    if let Some(what) = alloc_sel::background() {
        r.s("background", what).f("background_ms", t.elapsed().as_secs_f64() * 1e3);
        r.u("rss_after_background_kb", rss_kb()).gh("after_background_");
        // Keep stepping, as the thread of `Hosted::start_background` would once per period, until the
        // scavenger's window of recent peaks no longer holds the pre-free peak.
        let steps = alloc_sel::scavenger_steps();
        let t = Instant::now();
        for _ in 1..steps {
            alloc_sel::background();
        }
        r.u("scavenger_steps", steps as u64).f("scavenger_ms", t.elapsed().as_secs_f64() * 1e3);
        r.u("rss_after_scavenger_kb", rss_kb()).gh("after_scavenger_");
    }
    let t = Instant::now();
    match alloc_sel::trim() {
        Some(what) => {
            r.s("trim", what).f("trim_ms", t.elapsed().as_secs_f64() * 1e3);
        }
        None => {
            r.s("trim", "none");
        }
    }
    r.u("rss_after_trim_kb", rss_kb()).gh("after_trim_");
    r.emit();
    for p in kept {
        // SAFETY: allocated with this size.
        unsafe { dealloc(p.0, lay(p.1)) };
    }
}

/// Cycles per nanosecond of the TSC, measured against the monotonic clock.
fn tsc_per_ns() -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no preconditions on x86_64.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        (c1 - c0) as f64 / t0.elapsed().as_nanos() as f64
    }
    #[cfg(not(target_arch = "x86_64"))]
    1.0
}

#[inline]
fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: rdtsc has no preconditions on x86_64.
    unsafe {
        core::arch::x86_64::_rdtsc()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        T0.get_or_init(Instant::now).elapsed().as_nanos() as u64
    }
}

/// 8 threads on however many cores: each replaces random objects (16..1024 B) of a 64-slot working set;
/// every replacement (free + alloc) is timed with the TSC. Preemption inside the allocator (a lock held by
/// a descheduled thread) shows in the tail.
fn latency(cfg: Cfg) {
    const THREADS: usize = 8;
    const SLOTS: usize = 64;
    let per_thread = cfg.n(200_000) as usize;
    let tpn = tsc_per_ns();
    let all = Arc::new(Mutex::new(Vec::<u32>::with_capacity(per_thread * THREADS)));
    let a2 = all.clone();
    let (ops, partial, el) = run_threads(THREADS, cfg.cap, move |ti, deadline| {
        let mut rng = Rng::new(ti as u64 + 77);
        let mut lat: Vec<u32> = Vec::with_capacity(per_thread);
        let mut slots: Vec<(*mut u8, usize)> = (0..SLOTS)
            .map(|_| {
                let s = 16 + rng.below(1009) as usize;
                // SAFETY: non-zero layout.
                (unsafe { alloc(lay(s)) }, s)
            })
            .collect();
        let mut partial = false;
        for k in 0..per_thread {
            let i = rng.below(SLOTS as u64) as usize;
            let s = 16 + rng.below(1009) as usize;
            let t0 = ticks();
            // SAFETY: freed with its layout; fresh block of `s` bytes.
            unsafe {
                dealloc(slots[i].0, lay(slots[i].1));
                let p = alloc(lay(s));
                *p = 1;
                slots[i] = (p, s);
            }
            let d = ticks().saturating_sub(t0);
            lat.push(d.min(u32::MAX as u64) as u32);
            if k % 4096 == 0 && Instant::now() > deadline {
                partial = k + 1 < per_thread;
                break;
            }
        }
        for (p, s) in slots {
            // SAFETY: allocated with this size.
            unsafe { dealloc(p, lay(s)) };
        }
        let n = lat.len() as u64;
        a2.lock().unwrap().extend_from_slice(&lat);
        (n, partial)
    });
    let mut v = std::mem::take(&mut *all.lock().unwrap());
    v.sort_unstable();
    let pct = |q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
        v[i] as f64 / tpn
    };
    let mut r = Rec::new("latency-8t", THREADS);
    r.timing(ops, THREADS, el, partial);
    r.f("p50_ns", pct(0.50)).f("p99_ns", pct(0.99)).f("p999_ns", pct(0.999)).f("max_ns", pct(1.0));
    r.emit();
}

/// For callgrind: `n` pairs of `SIZE`-byte objects after a short warm-up, nothing else. `SIZE` is a constant
/// (one function per size), as a layout is at most call sites: with a size read at run time the count grew
/// by 29 instructions per pair (the size class computed instead of folded, and the free not inlined).
#[inline(never)]
fn callgrind_pair<const SIZE: usize>(n: u64) {
    // goheap's sampling knobs, for measuring their fast-path cost (issue 12): GOHEAP_BENCH_PROFILE_RATE
    // (bytes, `set_profile_rate`) and GOHEAP_BENCH_GUARDED_RATE (`set_guarded_sample_rate`).
    #[cfg(feature = "alloc-goheap")]
    {
        let knob = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<usize>().ok());
        if let Some(r) = knob("GOHEAP_BENCH_PROFILE_RATE") {
            alloc_sel::GLOBAL.set_profile_rate(r);
        }
        if let Some(r) = knob("GOHEAP_BENCH_GUARDED_RATE") {
            alloc_sel::GLOBAL.set_guarded_sample_rate(r);
        }
        // A CPU whose sampling was off rechecks the rate only after 64 MiB of allocation (`profile.rs`): one
        // large block of that size makes this thread pick the new rate up before the measured loop.
        let big = lay(65 << 20);
        // SAFETY: non-zero layout; freed right away.
        unsafe { dealloc(black_box(alloc(big)), big) };
    }
    let l = lay(SIZE);
    for _ in 0..(1000 + n) {
        // SAFETY: non-zero layout; freed right away.
        unsafe {
            let p = black_box(alloc(l));
            *p = 1;
            dealloc(black_box(p), l);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = Cfg { scale: 1.0, cap: Duration::from_secs(4) };
    let mut group = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--scale" => cfg.scale = it.next().and_then(|s| s.parse().ok()).expect("--scale F"),
            "--cap" => cfg.cap = Duration::from_secs_f64(it.next().and_then(|s| s.parse().ok()).expect("--cap SECS")),
            "--list" => {
                println!("{}", GROUPS.join(" "));
                return;
            }
            "--name" => {
                println!("{}", alloc_sel::NAME);
                return;
            }
            "callgrind-pair64" => {
                let n = it.next().and_then(|s| s.parse().ok()).expect("callgrind-pair64 N");
                callgrind_pair::<64>(n);
                return;
            }
            "callgrind-pair8" => {
                let n = it.next().and_then(|s| s.parse().ok()).expect("callgrind-pair8 N");
                callgrind_pair::<8>(n);
                return;
            }
            "callgrind-pair12" => {
                let n = it.next().and_then(|s| s.parse().ok()).expect("callgrind-pair12 N");
                callgrind_pair::<12>(n);
                return;
            }
            g => group = Some(g.to_string()),
        }
    }
    let Some(group) = group else {
        eprintln!(
            "usage: goheap-bench GROUP [--scale F] [--cap SECS] | --list | callgrind-pair64 N | callgrind-pair8 N | \
             callgrind-pair12 N"
        );
        std::process::exit(2);
    };
    match group.as_str() {
        "pair" => pair(cfg),
        "batch" => batch(cfg),
        "wset1" => wset(cfg, 1),
        "wset2" => wset(cfg, 2),
        "rust" => rust(cfg),
        "larson" => larson(cfg),
        "prodcons64" => prodcons(cfg, false),
        "prodcons-mixed" => prodcons(cfg, true),
        "rptest" => rptest(cfg),
        "large" => large(cfg),
        "latency" => latency(cfg),
        "frag" => frag(cfg),
        other => {
            eprintln!("unknown group {other:?}; groups: {}", GROUPS.join(" "));
            std::process::exit(2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every group runs to completion at a tiny scale with the default allocator.
    #[test]
    fn every_group_runs_small() {
        let cfg = Cfg { scale: 0.001, cap: Duration::from_millis(200) };
        pair(cfg);
        batch(cfg);
        wset(cfg, 2);
        rust(cfg);
        larson(cfg);
        prodcons(cfg, false);
        prodcons(cfg, true);
        rptest(cfg);
        large(cfg);
        latency(cfg);
        frag(cfg);
    }

    #[test]
    fn log_sizes_stay_in_range() {
        let mut r = Rng::new(1);
        for _ in 0..10_000 {
            let s = r.log_size(4, 32 << 10);
            assert!((4..=32 << 10).contains(&s));
        }
    }
}
