//! A host model of interrupts (issue 11): signals stand in for interrupts, and a CPU provider whose guard
//! blocks the signal stands in for a kernel's interrupts-off guard (`IrqCpus`). A signal handler allocates,
//! writes, reallocates across the tiers and frees (tiny, small, large; also in guard mode) while worker
//! threads run a mixed workload through every public entry point: `alloc`, `alloc_zeroed`, `dealloc`,
//! `realloc` (every tier, large in place both ways), `background`, `release_all`, `flush_cpu_cache`,
//! `set_memory_limit`, `validate` (feature `validate`) and guard mode (`DebugFlags::GUARD` over
//! `MmapSource::strict()`). Another thread fires the signal at the workers at a high rate.
//!
//! If some path took a goheap lock (or called the page source) outside the provider's guard, a signal
//! arriving while the lock is held runs a handler that spins on the same lock forever: the test would hang.
//! A watchdog turns a hang into a failure: if a worker makes no progress for `STALL_SECS`, it prints what
//! each worker was doing and exits the process with an error. No other timing is asserted.
#![cfg(feature = "std")]

mod common;

use common::layout;
use goheap::cpu::{CpuProvider, MAX_CPUS};
use goheap::source::mmap::MmapSource;
use goheap::source::PageSource;
use goheap::{DebugFlags, Malloc};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use testkit::pattern::{check_marked as check, fill_marked as fill, marked};

/// The signal standing in for an interrupt.
const IRQ: libc::c_int = libc::SIGUSR1;
/// A worker stalled this long fails the test (a deadlock; normal progress is many steps per second).
const STALL_SECS: u64 = 20;

// ---- Contents: a pattern on a sparse set of bytes (cheap enough for a handler, also in a debug build) -----

// `fill_marked` / `check_marked` (testkit): the first 64 bytes and one in 509.

// ---- The provider: the guard blocks the signal; one slot per thread ------------------------------------------

/// Slots handed out so far (one per thread that allocates, never reused: the tests start few threads).
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

const NO_SLOT: usize = usize::MAX;

thread_local! {
    // Const-initialised, no destructor: safe to touch from a signal handler.
    static SLOT: Cell<usize> = const { Cell::new(NO_SLOT) };
    static BUSY: Cell<bool> = const { Cell::new(false) };
}

/// Blocks `IRQ` on this thread; returns the previous mask.
fn block_irq() -> libc::sigset_t {
    // SAFETY: plain libc calls on local, initialised sigset_t values.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, IRQ);
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        assert_eq!(r, 0);
        old
    }
}

/// This thread's slot, claimed on first use; `None` beyond `MAX_CPUS` threads.
fn my_slot() -> Option<usize> {
    let mut s = SLOT.with(Cell::get);
    if s == NO_SLOT {
        s = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        SLOT.with(|c| c.set(s));
    }
    (s < MAX_CPUS).then_some(s)
}

/// The model of `IrqCpus`: "interrupts" (the signal) off while the guard lives.
#[derive(Debug, Default)]
struct SigCpus;

/// Restores the signal mask (and clears the busy mark, for `enter`) on drop.
struct SigGuard {
    old: libc::sigset_t,
    busy: bool,
}

impl Drop for SigGuard {
    fn drop(&mut self) {
        if self.busy {
            BUSY.with(|b| b.set(false));
        }
        // SAFETY: restores the mask saved by `block_irq` on this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
    }
}

// SAFETY: a slot index belongs to one thread (handed out once by `NEXT_SLOT`); it is returned only with the
// signal blocked on that thread (so no handler runs on it until the guard drops) and only while the
// thread's busy mark is clear; `enter` sets the mark, so a synchronous re-entry gets `None`. Another thread
// never gets the same index, and a thread's own sections are ordered by program order.
unsafe impl CpuProvider for SigCpus {
    type Guard<'a> = SigGuard;
    fn enter(&self) -> (SigGuard, Option<usize>) {
        let old = block_irq();
        match my_slot() {
            Some(i) if !BUSY.with(Cell::get) => {
                BUSY.with(|b| b.set(true));
                (SigGuard { old, busy: true }, Some(i))
            }
            _ => (SigGuard { old, busy: false }, None),
        }
    }
    type LeafGuard<'a> = SigGuard;
    fn enter_leaf(&self) -> (SigGuard, Option<usize>) {
        let old = block_irq();
        let idx = if BUSY.with(Cell::get) { None } else { my_slot() };
        (SigGuard { old, busy: false }, idx)
    }
}

// ---- The page source: mmap behind a spin lock, as a kernel's frame source takes its lock -------------------

/// [`MmapSource`] with a spin lock around every call, as `goheap::x86_64::FrameSource` locks its page
/// tables and frame allocator: a source call outside the guard can then deadlock with a handler too.
#[derive(Debug)]
struct LockedSource {
    inner: MmapSource,
    lock: AtomicBool,
}

impl LockedSource {
    fn new(inner: MmapSource) -> Self {
        LockedSource { inner, lock: AtomicBool::new(false) }
    }

    fn locked<R>(&self, f: impl FnOnce(&MmapSource) -> R) -> R {
        while self.lock.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            std::hint::spin_loop();
        }
        let r = f(&self.inner);
        self.lock.store(false, Ordering::Release);
        r
    }
}

// SAFETY: forwards to `MmapSource` (which upholds the contract) one call at a time.
unsafe impl PageSource for LockedSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        self.locked(|s| s.reserve(nbytes, align))
    }
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        self.locked(|s| unsafe { s.commit(addr, nbytes) })
    }
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: forwarded contract.
        self.locked(|s| unsafe { s.decommit(addr, nbytes) })
    }
    fn commit_zeroes(&self) -> bool {
        self.inner.commit_zeroes()
    }
}

type M = Malloc<LockedSource, SigCpus>;

// ---- The "interrupt handler" ------------------------------------------------------------------------------------

/// The allocators the handler on this thread uses (set by the worker before signals reach it).
#[derive(Clone, Copy)]
struct Target {
    m: &'static M,
    guard_mode: &'static M,
    progress: &'static Progress,
}

thread_local! {
    static TARGET: Cell<Option<Target>> = const { Cell::new(None) };
    /// An object the handler keeps from one run to the next (address, size, seed), freed by the next run.
    static KEPT: Cell<(usize, usize, u64)> = const { Cell::new((0, 0, 0)) };
    static RUNS: Cell<u64> = const { Cell::new(0) };
}

/// Handler runs, all threads.
static HANDLED: AtomicUsize = AtomicUsize::new(0);
/// Set by the handler when it finds a corrupted object (it must not panic).
static HANDLER_FAILED: AtomicBool = AtomicBool::new(false);

fn handler_check(p: *const u8, len: usize, seed: u64) {
    // SAFETY: a live block of at least that many bytes.
    if unsafe { check(p, len, seed) }.is_err() {
        HANDLER_FAILED.store(true, Ordering::Relaxed);
    }
}

/// Allocates `size` bytes with a pattern; null when out of memory.
fn h_alloc(m: &M, size: usize, seed: u64) -> *mut u8 {
    let p = m.alloc(layout(size, 8));
    if !p.is_null() {
        // SAFETY: a live block of at least that many bytes, which this code owns.
        unsafe { fill(p, size, seed) };
    }
    p
}

/// Walks an object through the tiers with `realloc`, checking its contents at each step, then frees it.
fn h_realloc_chain(m: &M, sizes: &[usize], seed: u64) {
    let mut size = sizes[0];
    let p = h_alloc(m, size, seed);
    if p.is_null() {
        return;
    }
    let mut p = p;
    for &next in &sizes[1..] {
        // SAFETY: `p` is a live allocation of `size` bytes, align 8, from `m`.
        let q = unsafe { m.realloc(p, layout(size, 8), next) };
        if q.is_null() {
            break;
        }
        handler_check(q, size.min(next), seed);
        // SAFETY: a live block of at least that many bytes, which this code owns.
        unsafe { fill(q, next, seed) };
        (p, size) = (q, next);
    }
    handler_check(p, size, seed);
    // SAFETY: as above.
    unsafe { m.dealloc(p, layout(size, 8)) };
}

extern "C" fn on_irq(_: libc::c_int) {
    let Some(t) = TARGET.with(Cell::get) else { return };
    let run = RUNS.with(|r| {
        r.set(r.get() + 1);
        r.get()
    });
    HANDLED.fetch_add(1, Ordering::Relaxed);
    t.progress.handled.fetch_add(1, Ordering::Release);
    let seed = run.wrapping_mul(0x1000_0001) ^ 0x5151;
    let m = t.m;
    // Tiny, small and large objects at once.
    let objs = [(8, seed), (200, seed + 1), (96 << 10, seed + 2)];
    let ps = objs.map(|(size, s)| h_alloc(m, size, s));
    // Across the tiers and back, and a large object grown and shrunk (in place when the pages allow).
    h_realloc_chain(m, &[12, 100, 3000, 40 << 10, 200 << 10, 72 << 10, 500, 4], seed + 3);
    for (p, (size, s)) in ps.into_iter().zip(objs) {
        if !p.is_null() {
            handler_check(p, size, s);
            // SAFETY: allocated above with this layout.
            unsafe { m.dealloc(p, layout(size, 8)) };
        }
    }
    // One object lives from this run to the next.
    let (addr, size, s) = KEPT.with(Cell::get);
    if addr != 0 {
        handler_check(addr as *const u8, size, s);
        // SAFETY: allocated by a previous run on this thread with this layout.
        unsafe { m.dealloc(addr as *mut u8, layout(size, 8)) };
    }
    let size = [24, 1000, 20 << 10, 64 << 10][run as usize % 4];
    let p = h_alloc(m, size, seed + 4);
    KEPT.with(|k| k.set((p as usize, if p.is_null() { 0 } else { size }, seed + 4)));
    // A timer interrupt's background step, now and then.
    if run % 16 == 0 {
        m.background(2, 256 << 10);
    }
    // Guard mode (every object gets pages of its own and a guard page).
    if run % 4 == 0 {
        let g = t.guard_mode;
        let p = h_alloc(g, 100, seed + 5);
        if !p.is_null() {
            // SAFETY: a live guard-mode allocation of 100 bytes.
            let q = unsafe { g.realloc(p, layout(100, 8), 5000) };
            let (q, n) = if q.is_null() { (p, 100) } else { (q, 5000) };
            handler_check(q, 100, seed + 5);
            // SAFETY: as above.
            unsafe { g.dealloc(q, layout(n, 8)) };
        }
    }
}

fn install_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installs a handler for IRQ with an initialised sigaction; SA_RESTART so the workers'
        // system calls restart.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_irq as extern "C" fn(libc::c_int) as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            assert_eq!(libc::sigaction(IRQ, &sa, std::ptr::null_mut()), 0);
        }
    });
}

// ---- The workload ------------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
struct Obj {
    addr: usize,
    size: usize,
    seed: u64,
}

/// A small xorshift generator (no allocation, deterministic per worker).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn random_size(r: &mut Rng) -> usize {
    match r.below(10) {
        0..=2 => 1 + r.below(15) as usize,             // tiny
        3..=6 => 16 + r.below(4000) as usize,          // small
        7 | 8 => 4000 + r.below(28 << 10) as usize,    // small, large classes
        _ => (32 << 10) + r.below(400 << 10) as usize, // large
    }
}

/// What each worker is doing, for the watchdog's report.
static STEP_NAMES: [&str; 12] = [
    "alloc",
    "alloc_zeroed",
    "dealloc",
    "realloc",
    "realloc large in place",
    "background",
    "release_all",
    "flush_cpu_cache",
    "set_memory_limit",
    "validate",
    "guard mode",
    "done",
];
const DONE: usize = 11;

struct Progress {
    steps: AtomicUsize,
    doing: AtomicUsize,
    /// Handler runs on this worker (the sender fires again only once the last signal was handled).
    handled: AtomicUsize,
}

fn free_obj(m: &M, o: Obj) {
    // SAFETY: a live block of at least that many bytes.
    assert_eq!(
        unsafe { check(o.addr as *const u8, o.size, o.seed) },
        Ok(()),
        "object {:#x} ({} B) overwritten",
        o.addr,
        o.size
    );
    // SAFETY: a live allocation of `o.size` bytes, align 8, from `m`.
    unsafe { m.dealloc(o.addr as *mut u8, layout(o.size, 8)) };
}

fn worker(m: &'static M, g: &'static M, seed: u64, iters: usize, validate: bool, prog: &'static Progress) {
    TARGET.with(|t| t.set(Some(Target { m, guard_mode: g, progress: prog })));
    let mut r = Rng(seed | 1);
    let mut live: Vec<Obj> = Vec::new();
    let mut guarded: Vec<Obj> = Vec::new();
    let mut limited = false;
    let doing = |s: usize| {
        prog.doing.store(s, Ordering::Relaxed);
        prog.steps.fetch_add(1, Ordering::Relaxed);
    };
    for i in 0..iters {
        let op = r.below(100);
        match op {
            0..=29 => {
                doing(0);
                let size = random_size(&mut r);
                let p = m.alloc(layout(size, 8));
                assert!(!p.is_null());
                let s = r.next();
                // SAFETY: a live block of at least that many bytes, which this code owns.
                unsafe { fill(p, size, s) };
                live.push(Obj { addr: p as usize, size, seed: s });
            }
            30..=37 => {
                doing(1);
                let size = random_size(&mut r);
                let p = m.alloc_zeroed(layout(size, 8));
                assert!(!p.is_null());
                // SAFETY: `p` is valid for `size` bytes.
                assert!(marked(size).all(|i| unsafe { *p.add(i) } == 0), "not zeroed");
                let s = r.next();
                // SAFETY: a live block of at least that many bytes, which this code owns.
                unsafe { fill(p, size, s) };
                live.push(Obj { addr: p as usize, size, seed: s });
            }
            38..=62 if !live.is_empty() => {
                doing(2);
                let o = live.swap_remove(r.below(live.len() as u64) as usize);
                free_obj(m, o);
            }
            63..=74 if !live.is_empty() => {
                doing(3);
                let k = r.below(live.len() as u64) as usize;
                let o = live[k];
                let new = random_size(&mut r);
                // SAFETY: a live allocation of `o.size` bytes, align 8.
                let p = unsafe { m.realloc(o.addr as *mut u8, layout(o.size, 8), new) };
                assert!(!p.is_null());
                // SAFETY: a live block of at least that many bytes.
                assert_eq!(unsafe { check(p, o.size.min(new), o.seed) }, Ok(()), "realloc lost contents");
                // SAFETY: a live block of at least that many bytes, which this code owns.
                unsafe { fill(p, new, o.seed) };
                live[k] = Obj { addr: p as usize, size: new, seed: o.seed };
            }
            75..=82 => {
                doing(4);
                // A large object grown and shrunk: in place whenever the following pages are free.
                let s = r.next();
                let mut o = Obj { addr: m.alloc(layout(48 << 10, 8)) as usize, size: 48 << 10, seed: s };
                assert_ne!(o.addr, 0);
                // SAFETY: a live block of at least that many bytes, which this code owns.
                unsafe { fill(o.addr as *mut u8, o.size, s) };
                for new in [160 << 10, 400 << 10, 64 << 10, 33 << 10] {
                    // SAFETY: a live allocation of `o.size` bytes, align 8.
                    let p = unsafe { m.realloc(o.addr as *mut u8, layout(o.size, 8), new) };
                    assert!(!p.is_null());
                    // SAFETY: a live block of at least that many bytes.
                    assert_eq!(unsafe { check(p, o.size.min(new), s) }, Ok(()), "large realloc lost contents");
                    // SAFETY: a live block of at least that many bytes, which this code owns.
                    unsafe { fill(p, new, s) };
                    o = Obj { addr: p as usize, size: new, seed: s };
                }
                free_obj(m, o);
            }
            83..=87 => {
                doing(5);
                // A burst, as an idle loop calls it.
                for _ in 0..8 {
                    m.background(4, 256 << 10);
                }
            }
            88..=90 => {
                doing(6);
                m.release_all();
            }
            91..=93 => {
                doing(7);
                m.flush_cpu_cache();
            }
            94 | 95 => {
                doing(8);
                limited = !limited;
                m.set_memory_limit(if limited { 8 << 20 } else { usize::MAX });
            }
            96 if validate => {
                doing(9);
                #[cfg(feature = "validate")]
                m.validate();
            }
            _ => {
                doing(10);
                if guarded.len() < 8 || r.below(2) == 0 {
                    let size = 1 + r.below(9000) as usize;
                    let p = g.alloc(layout(size, 8));
                    assert!(!p.is_null());
                    let s = r.next();
                    // SAFETY: a live block of at least that many bytes, which this code owns.
                    unsafe { fill(p, size, s) };
                    guarded.push(Obj { addr: p as usize, size, seed: s });
                } else {
                    let o = guarded.swap_remove(r.below(guarded.len() as u64) as usize);
                    free_obj(g, o);
                }
            }
        }
        if live.len() > 300 || i + 1 == iters {
            doing(2);
            while live.len() > if i + 1 == iters { 0 } else { 100 } {
                free_obj(m, live.pop().unwrap());
            }
        }
    }
    for o in guarded.drain(..) {
        free_obj(g, o);
    }
    m.set_memory_limit(usize::MAX);
    doing(DONE);
}

/// Runs `nworkers` workers of `iters` steps over fresh allocators while a thread fires the signal at them,
/// under a watchdog.
fn run(nworkers: usize, iters: usize, validate: bool) {
    install_handler();
    let m: &'static M =
        Box::leak(Box::new(Malloc::with_max_bytes(LockedSource::new(MmapSource::new()), SigCpus, 1 << 30)));
    let g: &'static M = Box::leak(Box::new(
        Malloc::with_max_bytes(LockedSource::new(MmapSource::strict()), SigCpus, 1 << 30).with_debug(DebugFlags::GUARD),
    ));
    // Reserve both heaps before any handler runs (the first use reads a /proc file).
    for a in [m, g] {
        let p = a.alloc(layout(64, 8));
        // SAFETY: allocated just above.
        unsafe { a.dealloc(p, layout(64, 8)) };
    }
    let progress: &'static [Progress] = Box::leak(
        (0..nworkers)
            .map(|_| Progress { steps: AtomicUsize::new(0), doing: AtomicUsize::new(0), handled: AtomicUsize::new(0) })
            .collect(),
    );
    let stop = &*Box::leak(Box::new(AtomicBool::new(false)));
    let targets: &'static Mutex<Vec<(usize, libc::pthread_t)>> = Box::leak(Box::new(Mutex::new(Vec::new())));
    let finished = &*Box::leak(Box::new(AtomicBool::new(false)));

    // The watchdog: a stalled worker is a deadlock.
    let watchdog = std::thread::spawn(move || {
        let mut last: Vec<(usize, Instant)> = progress.iter().map(|_| (0, Instant::now())).collect();
        while !finished.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            for (w, p) in progress.iter().enumerate() {
                let (steps, doing) = (p.steps.load(Ordering::Relaxed), p.doing.load(Ordering::Relaxed));
                if steps != last[w].0 || doing == DONE {
                    last[w] = (steps, Instant::now());
                } else if last[w].1.elapsed() > Duration::from_secs(STALL_SECS) {
                    eprintln!(
                        "irq_model: worker {w} made no progress for {STALL_SECS} s in `{}` (step {steps}, {} \
                         handler runs): a goheap lock taken outside the CPU provider's guard?",
                        STEP_NAMES[doing],
                        HANDLED.load(Ordering::Relaxed)
                    );
                    // SAFETY: ends the process at once; the stuck threads cannot be unwound.
                    unsafe { libc::_exit(3) };
                }
            }
        }
    });

    let workers: Vec<_> = (0..nworkers)
        .map(|w| {
            let prog = &progress[w];
            std::thread::spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                targets.lock().unwrap().push((w, unsafe { libc::pthread_self() }));
                worker(m, g, 0x1234_5678 + w as u64 * 7919, iters, validate, prog);
                // Stay alive (signals may still target this thread) until the sender stops.
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        })
        .collect();

    // The "interrupt controller": the signal to every worker, again as soon as it handled the last one
    // (after a short pause, so that the worker runs between handlers).
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut fired = vec![usize::MAX; nworkers];
        while progress.iter().any(|p| p.doing.load(Ordering::Relaxed) != DONE) {
            for &(w, t) in targets.lock().unwrap().iter() {
                let handled = progress[w].handled.load(Ordering::Acquire);
                if fired[w] == handled {
                    continue; // the last signal is still pending
                }
                fired[w] = handled;
                // SAFETY: `t` is a live thread: workers do not exit before `stop` is set, after this loop.
                unsafe { libc::pthread_kill(t, IRQ) };
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        stop.store(true, Ordering::Relaxed);
        sent
    });

    let sent = sender.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    finished.store(true, Ordering::Relaxed);
    watchdog.join().unwrap();
    let handled: usize = progress.iter().map(|p| p.handled.load(Ordering::Relaxed)).sum();
    eprintln!("irq_model: {nworkers} workers x {iters} steps, {sent} signals sent, {handled} handled");
    assert!(!HANDLER_FAILED.load(Ordering::Relaxed), "the handler found a corrupted object");
    assert!(handled > 0, "no signal was handled ({sent} sent)");
    #[cfg(feature = "validate")]
    if validate {
        m.validate();
        g.validate();
    }
}

/// One "CPU": a worker whose handler interrupts every entry point, `validate` included.
#[test]
fn one_cpu_every_entry_point_under_interrupts() {
    run(1, 6000, true);
}

/// Three "CPUs", each interrupted by its own handler, sharing the allocators.
#[test]
fn smp_every_entry_point_under_interrupts() {
    run(3, 4000, false);
}
