//! Host soak (issue 13): many threads hammer one `goheap::Malloc<MmapSource, ThreadSlots>` for a while.
//!
//! `cargo xtask soak [--minutes N]` runs it (a release build); by hand:
//! `cargo run --release --example soak --features std,checks,validate -- --seconds 60`.
//!
//! # What runs
//! - Workers: `--threads` of them at once (default 80, more than goheap's `MAX_CPUS` = 64 cache slots, so
//!   some run on the shared cache), each living for a random number of operations and then replaced by a
//!   new thread (a thread's exit releases its cache slot for the next one). Each keeps up to [`LOCAL`]
//!   blocks and does a random mix: allocate (`alloc`, some `alloc_zeroed`), free, `realloc`, and hand
//!   blocks to other threads through a shared array of [`SHARED_SLOTS`] slots (swap a block in, take
//!   whatever was there). A leaving worker leaves some of its blocks in the shared array. Sizes are 1 B to
//!   4 MiB (most small), alignments 1 B to 2 MiB (most small). Every block is filled whole with a pattern
//!   of its own seed when allocated and verified whole before it is freed or reallocated (the kept prefix).
//! - Service threads beside them: `background` steps, `release_all`, `set_memory_limit` toggled between
//!   no limit and limits below and above the live heap, and statistics reads (`mem_stats`,
//!   `read_metrics`, the heap's own figures), which also track the peak committed memory.
//! - A watchdog: every thread beats a heartbeat; one that has not beaten for `--hang-secs` (default 300)
//!   fails the run (a hang: a lost wake-up, a lock never released). goheap's locks spin without yielding:
//!   on a host with many more runnable threads than cores one call can take a long time (seen: 109 s for
//!   one `alloc` with 96 workers on a 2-core machine at load 115), hence the generous default.
//!
//! At the end every block is verified and freed, the heap is checked (`validate`, no live objects left),
//! `release_all` runs, and one line of figures is printed: operations, peak and final committed memory,
//! the largest single-call latency (wall time of one `alloc`/`dealloc`/`realloc` call: on a loaded machine
//! it includes being descheduled).
//!
//! Exit status: 0 pass; 1 a pattern mismatch, a misaligned or null block, or a heap inconsistency at the
//! end; 3 a hang (watchdog); 4 a bad-free report from goheap (its report hook); 5 a panic; 2 usage. A fault
//! (SIGSEGV) ends the process by the signal.
//!
//! Why an example of the goheap package rather than a crate of its own: it needs nothing but goheap and
//! testkit (a dev-dependency), `cargo test` builds it and clippy `--all-targets` lints it with the rest,
//! and `cargo run --release --example soak` builds no other crate (the bench crate compiles C allocators).

use goheap::check::BadFree;
use goheap::cpu::{ThreadSlots, MAX_CPUS};
use goheap::source::mmap::MmapSource;
use goheap::stats::{Sample, ALL_METRICS};
use goheap::Malloc;
use std::alloc::Layout;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use testkit::pattern::{byte, check, fill};
use testkit::Rng;

type M = Malloc<MmapSource, ThreadSlots>;

/// The heap under test. Its report hook turns a bad-free report into a failure exit.
static HEAP: M = Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 16 << 30).with_report_hook(on_report);

/// Blocks a worker keeps at once.
const LOCAL: usize = 64;
/// Slots of the shared hand-off array.
const SHARED_SLOTS: usize = 4096;
/// Largest block.
const MAX_SIZE: usize = 4 << 20;

const EXIT_MISMATCH: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_HANG: i32 = 3;
const EXIT_REPORT: i32 = 4;
const EXIT_PANIC: i32 = 5;

fn on_report(b: &BadFree) -> ! {
    eprintln!("soak: FAIL: goheap reported a bad free: {b}");
    exit(EXIT_REPORT)
}

/// A live block: where, its layout, the seed of its pattern, the worker that made it.
#[derive(Clone, Copy, Debug)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    seed: u64,
    maker: u64,
}

impl Block {
    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size, self.align).expect("valid layout")
    }
}

/// Verifies the first `len` bytes of `b`'s pattern; a mismatch ends the run.
fn verify(b: &Block, len: usize, when: &str) {
    // SAFETY: `b` is a live block of at least `len` bytes owned by the caller.
    if let Err(off) = unsafe { check(b.addr as *const u8, len, b.seed) } {
        // SAFETY: `off < len`, inside the live block.
        let found = unsafe { *(b.addr as *const u8).add(off) };
        fail(
            EXIT_MISMATCH,
            &format!(
                "pattern mismatch {when}: block {:#x} (size {}, align {}, seed {:#x}, made by worker {}) at offset \
                 {off}: found {found:#04x}, want {:#04x}",
                b.addr,
                b.size,
                b.align,
                b.seed,
                b.maker,
                byte(b.seed, off)
            ),
        );
    }
}

fn fail(code: i32, msg: &str) -> ! {
    eprintln!("soak: FAIL: {msg}");
    print_figures("FAILED");
    exit(code)
}

// ---------------------------------------------------------------------------------------------------------
// Counters, latency and heartbeats

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
static STOP: AtomicBool = AtomicBool::new(false);
/// Milliseconds since the start, advanced by the watchdog (cheap for every thread to copy).
static NOW_MS: AtomicU64 = AtomicU64::new(0);

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static HANDOFFS: AtomicU64 = AtomicU64::new(0);
static BYTES_VERIFIED: AtomicU64 = AtomicU64::new(0);
static WORKERS_SPAWNED: AtomicU64 = AtomicU64::new(0);
static MAX_LIVE_WORKERS: AtomicU64 = AtomicU64::new(0);
static BG_STEPS: AtomicU64 = AtomicU64::new(0);
static RELEASE_ALLS: AtomicU64 = AtomicU64::new(0);
static LIMIT_CHANGES: AtomicU64 = AtomicU64::new(0);
static STATS_READS: AtomicU64 = AtomicU64::new(0);
static PEAK_COMMITTED: AtomicUsize = AtomicUsize::new(0);

/// Largest single-call latency in ns, per kind: alloc, dealloc, realloc.
static MAX_NS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
/// The layout (size, align) of the call that set each maximum.
static MAX_AT: Mutex<[(usize, usize); 3]> = Mutex::new([(0, 0); 3]);
const KIND_NAMES: [&str; 3] = ["alloc", "dealloc", "realloc"];

/// Times `f`, one goheap call, and keeps the maximum per kind.
#[inline]
fn timed<R>(kind: usize, size: usize, align: usize, f: impl FnOnce() -> R) -> R {
    let t = Instant::now();
    let r = f();
    let ns = t.elapsed().as_nanos() as u64;
    if ns > MAX_NS[kind].load(Relaxed) && MAX_NS[kind].fetch_max(ns, Relaxed) < ns {
        if let Ok(mut at) = MAX_AT.lock() {
            at[kind] = (size, align);
        }
    }
    r
}

/// A thread's heartbeat: the `NOW_MS` of its last progress.
struct Beat {
    name: String,
    last_ms: AtomicU64,
    done: AtomicBool,
}

static BEATS: Mutex<Vec<Arc<Beat>>> = Mutex::new(Vec::new());

fn register(name: String) -> Arc<Beat> {
    let b = Arc::new(Beat { name, last_ms: AtomicU64::new(NOW_MS.load(Relaxed)), done: AtomicBool::new(false) });
    BEATS.lock().expect("beats lock").push(b.clone());
    b
}

impl Beat {
    #[inline]
    fn beat(&self) {
        self.last_ms.store(NOW_MS.load(Relaxed), Relaxed);
    }
}

struct Done(Arc<Beat>);
impl Drop for Done {
    fn drop(&mut self) {
        self.0.done.store(true, Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------------------
// The workload

#[derive(Clone, Copy)]
struct Config {
    seconds: f64,
    threads: usize,
    hang_secs: u64,
    seed: u64,
}

static SHARED: [Mutex<Option<Block>>; SHARED_SLOTS] = [const { Mutex::new(None) }; SHARED_SLOTS];

fn make(rng: &mut Rng, me: u64) -> Block {
    let size = rng.soak_size(MAX_SIZE);
    let align = rng.soak_align();
    let layout = Layout::from_size_align(size, align).expect("valid layout");
    let zeroed = rng.below(16) == 0;
    let p = timed(0, size, align, || if zeroed { HEAP.alloc_zeroed(layout) } else { HEAP.alloc(layout) });
    if p.is_null() {
        fail(EXIT_MISMATCH, &format!("allocation of {size} B align {align} returned null (no memory limit is hard)"));
    }
    if p as usize % align != 0 {
        fail(EXIT_MISMATCH, &format!("allocation of {size} B align {align} returned misaligned {p:p}"));
    }
    if zeroed {
        // SAFETY: `p` is a fresh block of `size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
        if let Some(i) = bytes.iter().position(|&b| b != 0) {
            fail(EXIT_MISMATCH, &format!("alloc_zeroed({size} B, align {align}) = {p:p}: byte {i} is not zero"));
        }
    }
    let seed = rng.next();
    // SAFETY: `p` is a fresh block of `size` bytes that only this thread knows.
    unsafe { fill(p, size, seed) };
    ALLOCS.fetch_add(1, Relaxed);
    Block { addr: p as usize, size, align, seed, maker: me }
}

fn free(b: Block, when: &str) {
    verify(&b, b.size, when);
    BYTES_VERIFIED.fetch_add(b.size as u64, Relaxed);
    // SAFETY: `b` is a live block allocated from HEAP with this layout, freed once (it left every list).
    timed(1, b.size, b.align, || unsafe { HEAP.dealloc(b.addr as *mut u8, b.layout()) });
    FREES.fetch_add(1, Relaxed);
}

fn realloc(rng: &mut Rng, b: Block, me: u64) -> Block {
    verify(&b, b.size, "before realloc");
    let new_size = rng.soak_size(MAX_SIZE);
    // SAFETY: `b` is a live block of HEAP with this layout; `new_size` is non-zero and, rounded up to the
    // alignment, far below isize::MAX.
    let p = timed(2, new_size, b.align, || unsafe { HEAP.realloc(b.addr as *mut u8, b.layout(), new_size) });
    if p.is_null() {
        fail(EXIT_MISMATCH, &format!("realloc of {:#x} ({} B) to {new_size} B returned null", b.addr, b.size));
    }
    if p as usize % b.align != 0 {
        fail(EXIT_MISMATCH, &format!("realloc to {new_size} B align {} returned misaligned {p:p}", b.align));
    }
    let kept = Block { addr: p as usize, size: b.size.min(new_size), align: b.align, seed: b.seed, maker: b.maker };
    verify(&kept, kept.size, "after realloc (the kept prefix)");
    let seed = rng.next();
    // SAFETY: `p` is the live block of `new_size` bytes that realloc returned, ours alone.
    unsafe { fill(p, new_size, seed) };
    REALLOCS.fetch_add(1, Relaxed);
    Block { addr: p as usize, size: new_size, align: b.align, seed, maker: me }
}

fn worker(me: u64, ops: u64, seed: u64, beat: Arc<Beat>) {
    let _done = Done(beat.clone());
    let mut rng = Rng::new(seed);
    let mut local: Vec<Block> = Vec::with_capacity(LOCAL);
    for _ in 0..ops {
        if STOP.load(Relaxed) {
            break;
        }
        beat.beat();
        match rng.below(100) {
            0..45 => {
                if local.len() == LOCAL {
                    let victim = local.swap_remove(rng.index(LOCAL));
                    free(victim, "before free (local, full)");
                }
                local.push(make(&mut rng, me));
            }
            45..70 => {
                if !local.is_empty() {
                    let b = local.swap_remove(rng.index(local.len()));
                    free(b, "before free (local)");
                }
            }
            70..85 => {
                // Swap one of ours (or nothing) into a random shared slot; keep what was there.
                let give = if local.is_empty() { None } else { Some(local.swap_remove(rng.index(local.len()))) };
                let got = std::mem::replace(&mut *SHARED[rng.index(SHARED_SLOTS)].lock().expect("slot"), give);
                if let Some(b) = got {
                    verify(&b, b.size, "on receipt from another thread");
                    HANDOFFS.fetch_add(1, Relaxed);
                    if local.len() < LOCAL {
                        local.push(b);
                    } else {
                        free(b, "before free (received)");
                    }
                }
            }
            85..93 => {
                let got = SHARED[rng.index(SHARED_SLOTS)].lock().expect("slot").take();
                if let Some(b) = got {
                    HANDOFFS.fetch_add(1, Relaxed);
                    free(b, "before free (taken from the shared array)");
                }
            }
            _ => {
                if !local.is_empty() {
                    let i = rng.index(local.len());
                    local[i] = realloc(&mut rng, local[i], me);
                }
            }
        }
    }
    // Leaving: some blocks stay in the shared array for other threads (freed after this thread is gone),
    // the rest are freed here.
    for b in local {
        if rng.below(2) == 0 {
            let mut slot = SHARED[rng.index(SHARED_SLOTS)].lock().expect("slot");
            if slot.is_none() {
                *slot = Some(b);
                continue;
            }
        }
        free(b, "before free (leaving worker)");
    }
}

/// Runs `step` every `period` until STOP, beating.
fn service(name: &str, period: Duration, mut step: impl FnMut() + Send + 'static) -> JoinHandle<()> {
    let beat = register(name.to_string());
    thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _done = Done(beat.clone());
            while !STOP.load(Relaxed) {
                step();
                beat.beat();
                thread::sleep(period);
            }
        })
        .expect("spawn service thread")
}

fn committed() -> usize {
    HEAP.heap().stats().committed_bytes
}

fn print_figures(verdict: &str) {
    let start = START.get().copied().unwrap_or_else(Instant::now);
    let at = MAX_AT.lock().map(|a| *a).unwrap_or_default();
    let (mut worst, mut worst_kind) = (0, 0);
    for (k, max) in MAX_NS.iter().enumerate() {
        let ns = max.load(Relaxed);
        if ns > worst {
            (worst, worst_kind) = (ns, k);
        }
    }
    let ops = ALLOCS.load(Relaxed) + FREES.load(Relaxed) + REALLOCS.load(Relaxed);
    println!(
        "soak host: {verdict} after {:.1} s: {ops} operations ({} allocs, {} frees, {} reallocs, {} hand-offs, {} MiB \
         verified); {} workers spawned (up to {} at once, cache slots {MAX_CPUS}); service: {} background steps, {} \
         release_all, {} limit changes, {} stats reads",
        start.elapsed().as_secs_f64(),
        ALLOCS.load(Relaxed),
        FREES.load(Relaxed),
        REALLOCS.load(Relaxed),
        HANDOFFS.load(Relaxed),
        BYTES_VERIFIED.load(Relaxed) >> 20,
        WORKERS_SPAWNED.load(Relaxed),
        MAX_LIVE_WORKERS.load(Relaxed),
        BG_STEPS.load(Relaxed),
        RELEASE_ALLS.load(Relaxed),
        LIMIT_CHANGES.load(Relaxed),
        STATS_READS.load(Relaxed),
    );
    println!(
        "soak host: committed memory: peak {:.1} MiB, now {:.1} MiB",
        PEAK_COMMITTED.load(Relaxed) as f64 / (1 << 20) as f64,
        committed() as f64 / (1 << 20) as f64
    );
    println!(
        "soak host: largest single-call latency {:.3} ms ({} of {} B align {}); per kind: {}",
        worst as f64 / 1e6,
        KIND_NAMES[worst_kind],
        at[worst_kind].0,
        at[worst_kind].1,
        (0..3)
            .map(|k| format!("{} {:.3} ms", KIND_NAMES[k], MAX_NS[k].load(Relaxed) as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn parse(args: &[String]) -> Result<Config, String> {
    let mut c = Config { seconds: 60.0, threads: 80, hang_secs: 300, seed: 0x50A6 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| -> Result<f64, String> {
            let v = it.next().ok_or(format!("{name} needs a value"))?;
            v.parse::<f64>().ok().filter(|x| *x >= 0.0).ok_or(format!("{name} {v}: not a number"))
        };
        match a.as_str() {
            "--seconds" => c.seconds = val("--seconds")?,
            "--minutes" => c.seconds = val("--minutes")? * 60.0,
            "--threads" => c.threads = (val("--threads")? as usize).max(1),
            "--hang-secs" => c.hang_secs = (val("--hang-secs")? as u64).max(1),
            "--seed" => c.seed = val("--seed")? as u64,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(c)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "{e}\nusage: soak [--seconds S | --minutes M] [--threads N] [--hang-secs S] [--seed N]\n\
                 exit: 0 pass, 1 mismatch/inconsistency, 3 hang, 4 bad-free report, 5 panic, 2 usage"
            );
            exit(EXIT_USAGE);
        }
    };
    let start = *START.get_or_init(Instant::now);
    std::panic::set_hook(Box::new(|info| {
        eprintln!("soak: FAIL: panic: {info}");
        exit(EXIT_PANIC);
    }));
    println!(
        "soak host: {:.0} s, {} workers at once (cache slots: {MAX_CPUS}), sizes 1 B..4 MiB, alignments 1 B..2 MiB, \
         hang after {} s without progress, seed {:#x}",
        cfg.seconds, cfg.threads, cfg.hang_secs, cfg.seed
    );

    // The watchdog: advances NOW_MS and fails the run when a live thread stopped beating.
    let hang_ms = cfg.hang_secs * 1000;
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || loop {
            thread::sleep(Duration::from_millis(100));
            let now = start.elapsed().as_millis() as u64;
            NOW_MS.store(now, Relaxed);
            let beats = BEATS.lock().expect("beats lock");
            if let Some(b) =
                beats.iter().find(|b| !b.done.load(Relaxed) && now.saturating_sub(b.last_ms.load(Relaxed)) > hang_ms)
            {
                let msg = format!(
                    "hang: thread {} made no progress for {} s (watchdog)",
                    b.name,
                    (now - b.last_ms.load(Relaxed)) / 1000
                );
                drop(beats);
                fail(EXIT_HANG, &msg);
            }
        })
        .expect("spawn watchdog");

    // Service threads.
    let mut services = vec![
        service("background", Duration::from_millis(2), || {
            HEAP.background(16, 1 << 20);
            BG_STEPS.fetch_add(1, Relaxed);
        }),
        service("release_all", Duration::from_millis(100), || {
            HEAP.release_all();
            RELEASE_ALLS.fetch_add(1, Relaxed);
        }),
    ];
    let mut lrng = Rng::new(cfg.seed ^ 0x1111);
    services.push(service("memory-limit", Duration::from_millis(250), move || {
        const LIMITS: [usize; 5] = [usize::MAX, 64 << 20, 256 << 20, 1 << 30, usize::MAX];
        HEAP.set_memory_limit(LIMITS[lrng.index(LIMITS.len())]);
        LIMIT_CHANGES.fetch_add(1, Relaxed);
    }));
    let mut samples: Vec<Sample> = ALL_METRICS.iter().map(|d| Sample::new(d.name)).collect();
    services.push(service("stats", Duration::from_millis(5), move || {
        let m = HEAP.mem_stats();
        HEAP.read_metrics(&mut samples);
        let h = HEAP.heap().stats();
        PEAK_COMMITTED.fetch_max(h.committed_bytes, Relaxed);
        std::hint::black_box((m, &samples));
        STATS_READS.fetch_add(1, Relaxed);
    }));
    let mut next_line = 30.0;
    services.push(service("progress", Duration::from_millis(500), move || {
        let t = START.get().map_or(0.0, |s| s.elapsed().as_secs_f64());
        if t >= next_line {
            next_line += 30.0;
            println!(
                "soak host: {t:.0} s: {} allocs, {} frees, {} reallocs, {} hand-offs, {} workers spawned; committed \
                 {} MiB (peak {} MiB)",
                ALLOCS.load(Relaxed),
                FREES.load(Relaxed),
                REALLOCS.load(Relaxed),
                HANDOFFS.load(Relaxed),
                WORKERS_SPAWNED.load(Relaxed),
                committed() >> 20,
                PEAK_COMMITTED.load(Relaxed) >> 20
            );
        }
    }));

    // Workers: keep `threads` alive, replacing each that finishes, until the time is up.
    let main_beat = register("main (spawner)".into());
    let mut rng = Rng::new(cfg.seed);
    let mut workers: Vec<JoinHandle<()>> = Vec::new();
    let deadline = Duration::from_secs_f64(cfg.seconds);
    while start.elapsed() < deadline {
        main_beat.beat();
        workers.retain(|h| !h.is_finished());
        while workers.len() < cfg.threads {
            let me = WORKERS_SPAWNED.fetch_add(1, Relaxed);
            let ops = 2_000 + rng.below(40_000);
            let seed = rng.next();
            let beat = register(format!("worker {me}"));
            let h = thread::Builder::new()
                .name(format!("worker-{me}"))
                .spawn(move || worker(me, ops, seed, beat))
                .expect("spawn worker");
            workers.push(h);
        }
        MAX_LIVE_WORKERS.fetch_max(workers.len() as u64, Relaxed);
        // Forget finished threads' heartbeats.
        BEATS.lock().expect("beats lock").retain(|b| !b.done.load(Relaxed));
        thread::sleep(Duration::from_millis(20));
    }

    // Wind down: every thread stops and frees what it holds; then the shared array is emptied here.
    STOP.store(true, Relaxed);
    for h in workers.into_iter().chain(services) {
        main_beat.beat();
        if h.join().is_err() {
            fail(EXIT_PANIC, "a thread panicked");
        }
    }
    for slot in SHARED.iter() {
        if let Some(b) = slot.lock().expect("slot").take() {
            free(b, "before free (shared array, at the end)");
        }
    }
    HEAP.set_memory_limit(usize::MAX);
    let before_release = committed();
    HEAP.validate();
    let m = HEAP.mem_stats();
    // Each cache slot (and the shared cache) may still hold its current 16-byte tiny block, which counts
    // as allocated (as in Go) but is no object of ours.
    let tiny_blocks_max = 16 * (MAX_CPUS as u64 + 1);
    if m.live_objects() != 0 || m.heap_alloc > tiny_blocks_max {
        fail(
            EXIT_MISMATCH,
            &format!(
                "every block was freed, but mem_stats says {} live objects, {} B allocated (at most {} B of \
                 current tiny blocks expected)",
                m.live_objects(),
                m.heap_alloc,
                tiny_blocks_max
            ),
        );
    }
    let released = HEAP.release_all();
    PEAK_COMMITTED.fetch_max(before_release, Relaxed);
    println!(
        "soak host: end: heap validated, no live objects ({} B in current tiny blocks); committed {:.1} MiB before the final release_all, which \
         released {:.1} MiB",
        m.heap_alloc,
        before_release as f64 / (1 << 20) as f64,
        released as f64 / (1 << 20) as f64
    );
    print_figures("PASSED");
}
