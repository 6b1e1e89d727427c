//! Soak test kernel (issue 13): every CPU runs a random allocation mix on goheap for `--soak-secs=N`
//! seconds (kernel argument; 60 in `cargo xtask test`, longer through `cargo xtask soak --kernel`).
//!
//! Each CPU, with interrupts on and its LAPIC timer ticking every 10 ms:
//! - allocates blocks of 1 B..4 MiB (most small; log-uniform within bands) at alignments 1 B..2 MiB (most
//!   small), some through `alloc_zeroed` (checked zero), fills each whole with a pattern of its own seed,
//!   keeps up to [`LOCAL`] of them, frees and `realloc`s them (checking the kept prefix), and hands blocks
//!   to other CPUs through a shared array of [`SHARED_SLOTS`] slots; every block is verified whole before
//!   it is freed, wherever that happens;
//! - runs goheap's background step whenever its timer tick asked for one (`background::idle_step`, the
//!   idle loop's work), and CPU 0 also `release_all`, toggles the memory limit and reads the statistics.
//!
//! The timer tick is [`on_tick`]: today it marks background work due (`background::tick`); it is the place
//! for interrupt handlers that allocate (see that function).
//!
//! The run is cut into rounds of [`ROUND_SECS`] (one `testing::run_on_all` each, whose 150 s limit is a
//! watchdog for a CPU that stops finishing its round); between rounds CPU 0 prints a progress line, and
//! a CPU whose operation count did not move for [`STALL_SECS`] during a round fails the run (QEMU's
//! timeout is the last watchdog). At the end every block is verified and freed, every CPU flushes its
//! cache, `release_all` runs, and the kernel checks that the heap's live-object count is back at its start
//! value. One line gives the figures: operations, peak and final committed memory, the largest single-call
//! latency (TSC time of one `alloc`/`dealloc`/`realloc` call; under QEMU's emulation on a loaded host it
//! includes the vCPU being descheduled). A pattern mismatch, a null or misaligned block, a goheap report
//! (it panics), a fault or a stall fails the kernel.
//!
//! xtask: smp=4 mem=1G timeout=600 kernel-args=--soak-secs=60
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

use core::alloc::Layout;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use goheap::stats::{Sample, ALL_METRICS};
use kernel_demo::args::Args;
use kernel_demo::heap::{self, HEAP};
use kernel_demo::smp::{self, MAX_CPUS};
use kernel_demo::{apic, background, serial_println, testing, time};
use testkit::pattern::{byte, check, fill};
use testkit::Rng;

kernel_demo::test_kernel!(|boot_info| {
    let args = Args::from_boot_info(boot_info);
    let secs = args.iter().find_map(|a| a.strip_prefix("--soak-secs=")).and_then(|v| v.parse::<u64>().ok());
    SOAK_SECS.store(secs.unwrap_or(DEFAULT_SECS), Relaxed);
    testing::boot(boot_info);
});

/// Seconds of soak without `--soak-secs=N`.
const DEFAULT_SECS: u64 = 60;
/// Length of one round (one `run_on_all`).
const ROUND_SECS: u64 = 15;
/// A CPU whose operation count stays still this long in a round fails the run.
const STALL_SECS: u64 = 60;
/// Blocks each CPU keeps.
const LOCAL: usize = 48;
/// Slots of the shared hand-off array.
const SHARED_SLOTS: usize = 1024;
/// Largest block.
const MAX_SIZE: usize = 4 << 20;
/// Period of each CPU's LAPIC timer during the soak.
const TICK_US: u64 = 10_000;

static SOAK_SECS: AtomicU64 = AtomicU64::new(DEFAULT_SECS);
/// TSC value at which the current round ends.
static ROUND_END: AtomicU64 = AtomicU64::new(0);
/// Set for the final (drain) round.
static DRAIN: AtomicBool = AtomicBool::new(false);

/// A live block: where, its size and alignment, the seed of its pattern, the CPU that made it.
#[derive(Clone, Copy)]
struct Block {
    addr: usize,
    size: usize,
    align: usize,
    seed: u64,
    cpu: usize,
}

impl Block {
    fn layout(&self) -> Layout {
        Layout::from_size_align(self.size, self.align).expect("valid layout")
    }
}

/// Each CPU's blocks (only that CPU touches its entry; the lock costs nothing uncontended).
static LOCALS: [spin::Mutex<([Option<Block>; LOCAL], u64)>; MAX_CPUS] =
    [const { spin::Mutex::new(([None; LOCAL], 0)) }; MAX_CPUS];
static SHARED: [spin::Mutex<Option<Block>>; SHARED_SLOTS] = [const { spin::Mutex::new(None) }; SHARED_SLOTS];

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static FREES: AtomicU64 = AtomicU64::new(0);
static REALLOCS: AtomicU64 = AtomicU64::new(0);
static HANDOFFS: AtomicU64 = AtomicU64::new(0);
static BG_STEPS: AtomicU64 = AtomicU64::new(0);
static RELEASE_ALLS: AtomicU64 = AtomicU64::new(0);
static LIMIT_CHANGES: AtomicU64 = AtomicU64::new(0);
static STATS_READS: AtomicU64 = AtomicU64::new(0);
static TICKS: AtomicU64 = AtomicU64::new(0);
static PEAK_COMMITTED: AtomicUsize = AtomicUsize::new(0);
static PEAK_FRAMES: AtomicUsize = AtomicUsize::new(0);
/// Operations per CPU (the stall check's progress counter).
static CPU_OPS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Largest single-call latency in TSC cycles, per kind (alloc, dealloc, realloc), and its size.
static MAX_CYCLES: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];
static MAX_SIZE_AT: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];
const KIND_NAMES: [&str; 3] = ["alloc", "dealloc", "realloc"];

/// The timer tick of every CPU during the soak, in interrupt context.
///
/// HOOK for interrupt handlers that allocate (issue "safe on every path"): once goheap may be called from
/// an interrupt handler that interrupted goheap itself, allocate, fill, verify and free a small block here
/// (and count it), so the soak runs that path on every CPU beside the mix.
fn on_tick() {
    TICKS.fetch_add(1, Relaxed);
    background::tick();
}

/// Verifies the first `len` bytes of `b`; a mismatch panics (fails the kernel) naming the block.
fn verify(b: &Block, len: usize, cpu: usize, when: &str) {
    let p = b.addr as *const u8;
    // SAFETY: `b` is a live block of at least `len` bytes owned by the caller.
    let bad = unsafe { check(p, len, b.seed) }.err();
    if let Some(off) = bad {
        // SAFETY: `off < len`.
        let found = unsafe { *p.add(off) };
        panic!(
            "soak: CPU {cpu}: pattern mismatch {when}: block {:#x} (size {}, align {}, made on CPU {}) at offset \
             {off}: found {found:#04x} near there, want {:#04x}",
            b.addr,
            b.size,
            b.align,
            b.cpu,
            byte(b.seed, off)
        );
    }
}

fn timed<R>(kind: usize, size: usize, f: impl FnOnce() -> R) -> R {
    let t = time::rdtsc();
    let r = f();
    let c = time::rdtsc().wrapping_sub(t);
    if c > MAX_CYCLES[kind].load(Relaxed) && MAX_CYCLES[kind].fetch_max(c, Relaxed) < c {
        MAX_SIZE_AT[kind].store(size, Relaxed);
    }
    r
}

fn make(rng: &mut Rng, cpu: usize) -> Block {
    let size = rng.soak_size(MAX_SIZE);
    let align = rng.soak_align();
    let layout = Layout::from_size_align(size, align).expect("valid layout");
    let zeroed = rng.below(16) == 0;
    let p = timed(0, size, || if zeroed { HEAP.alloc_zeroed(layout) } else { HEAP.alloc(layout) });
    assert!(!p.is_null(), "soak: CPU {cpu}: allocation of {size} B align {align} failed");
    assert!(p as usize % align == 0, "soak: CPU {cpu}: {size} B align {align}: misaligned {p:p}");
    if zeroed {
        for i in 0..size {
            // SAFETY: `p` is a fresh block of `size` bytes.
            let v = unsafe { *p.add(i) };
            assert!(v == 0, "soak: CPU {cpu}: alloc_zeroed({size} B, align {align}) = {p:p}: byte {i} is {v:#x}");
        }
    }
    let seed = rng.next();
    // SAFETY: `p` is a fresh block of `size` bytes that only this CPU uses.
    unsafe { fill(p, size, seed) };
    ALLOCS.fetch_add(1, Relaxed);
    Block { addr: p as usize, size, align, seed, cpu }
}

fn free(b: Block, cpu: usize, when: &str) {
    verify(&b, b.size, cpu, when);
    // SAFETY: `b` is a live block of HEAP with this layout, freed once (it left every list).
    timed(1, b.size, || unsafe { HEAP.dealloc(b.addr as *mut u8, b.layout()) });
    FREES.fetch_add(1, Relaxed);
}

fn realloc(rng: &mut Rng, b: Block, cpu: usize) -> Block {
    verify(&b, b.size, cpu, "before realloc");
    let new_size = rng.soak_size(MAX_SIZE);
    // SAFETY: `b` is a live block of HEAP with this layout; `new_size` is non-zero and small.
    let p = timed(2, new_size, || unsafe { HEAP.realloc(b.addr as *mut u8, b.layout(), new_size) });
    assert!(!p.is_null(), "soak: CPU {cpu}: realloc of {:#x} ({} B) to {new_size} B failed", b.addr, b.size);
    assert!(p as usize % b.align == 0, "soak: CPU {cpu}: realloc to {new_size} B align {}: misaligned {p:p}", b.align);
    let kept = Block { addr: p as usize, size: b.size.min(new_size), ..b };
    verify(&kept, kept.size, cpu, "after realloc (the kept prefix)");
    let seed = rng.next();
    // SAFETY: `p` is the reallocated block of `new_size` bytes, only this CPU's.
    unsafe { fill(p, new_size, seed) };
    REALLOCS.fetch_add(1, Relaxed);
    Block { addr: p as usize, size: new_size, align: b.align, seed, cpu }
}

fn committed() -> usize {
    HEAP.heap().stats().committed_bytes
}

fn secs(cycles: u64) -> u64 {
    time::tsc_per_ms().map_or(0, |per_ms| cycles / per_ms / 1000)
}

/// CPU 0's extra duties, every ~100 ms: `release_all`, the memory limit, statistics, the stall check.
struct Duties {
    next: u64,
    rng: Rng,
    seen: [(u64, u64); MAX_CPUS],
}

impl Duties {
    fn run(&mut self, n: usize) {
        let now = time::rdtsc();
        if now < self.next {
            return;
        }
        let per_ms = time::tsc_per_ms().unwrap_or(1);
        self.next = now + 100 * per_ms;
        match self.rng.below(4) {
            0 => {
                HEAP.release_all();
                RELEASE_ALLS.fetch_add(1, Relaxed);
            }
            1 => {
                const LIMITS: [usize; 4] = [usize::MAX, 16 << 20, 64 << 20, 256 << 20];
                HEAP.set_memory_limit(LIMITS[self.rng.index(LIMITS.len())]);
                LIMIT_CHANGES.fetch_add(1, Relaxed);
            }
            _ => {
                let m = HEAP.mem_stats();
                let mut samples: [Sample; 4] = core::array::from_fn(|i| Sample::new(ALL_METRICS[i].name));
                HEAP.read_metrics(&mut samples);
                core::hint::black_box((m, samples));
                STATS_READS.fetch_add(1, Relaxed);
            }
        }
        PEAK_COMMITTED.fetch_max(committed(), Relaxed);
        PEAK_FRAMES.fetch_max(heap::committed_frames(), Relaxed);
        for (i, seen) in self.seen.iter_mut().enumerate().take(n) {
            let ops = CPU_OPS[i].load(Relaxed);
            if ops != seen.0 {
                *seen = (ops, now);
            } else if !DRAIN.load(Relaxed) && secs(now - seen.1) >= STALL_SECS {
                panic!("soak: CPU {i} made no progress for {STALL_SECS} s (stall: a hang in goheap?)");
            }
        }
    }
}

static DUTIES: spin::Mutex<Option<Duties>> = spin::Mutex::new(None);

/// One round on CPU `cpu`: the mix until ROUND_END (or, when draining, free everything).
fn round(cpu: usize, n: usize) {
    let mut local = LOCALS[cpu].lock();
    let (blocks, rng_state) = &mut *local;
    let mut rng = Rng::new(*rng_state ^ (cpu as u64) << 48);
    if DRAIN.load(Relaxed) {
        for b in blocks.iter_mut().filter_map(Option::take) {
            free(b, cpu, "before free (draining)");
        }
        testing::barrier();
        if cpu == 0 {
            for slot in SHARED.iter() {
                let got = slot.lock().take();
                if let Some(b) = got {
                    free(b, cpu, "before free (shared array, draining)");
                }
            }
        }
        return;
    }
    if apic::timer_ticks_per_ms().is_some() {
        apic::start_timer(TICK_US);
    }
    x86_64::instructions::interrupts::enable();
    let mut duties = if cpu == 0 { DUTIES.lock().take() } else { None };
    let end = ROUND_END.load(Relaxed);
    while time::rdtsc() < end {
        CPU_OPS[cpu].fetch_add(1, Relaxed);
        if background::idle_step().is_some() {
            BG_STEPS.fetch_add(1, Relaxed);
        }
        if let Some(d) = duties.as_mut() {
            d.run(n);
        }
        let slot = rng.index(LOCAL);
        match rng.below(100) {
            0..45 => {
                if let Some(old) = blocks[slot].take() {
                    free(old, cpu, "before free (replaced)");
                }
                blocks[slot] = Some(make(&mut rng, cpu));
            }
            45..70 => {
                if let Some(b) = blocks[slot].take() {
                    free(b, cpu, "before free");
                }
            }
            70..85 => {
                let give = blocks[slot].take();
                let got = core::mem::replace(&mut *SHARED[rng.index(SHARED_SLOTS)].lock(), give);
                if let Some(b) = got {
                    verify(&b, b.size, cpu, "on receipt from the shared array");
                    HANDOFFS.fetch_add(1, Relaxed);
                    blocks[slot] = Some(b);
                }
            }
            85..93 => {
                let got = SHARED[rng.index(SHARED_SLOTS)].lock().take();
                if let Some(b) = got {
                    HANDOFFS.fetch_add(1, Relaxed);
                    free(b, cpu, "before free (taken from the shared array)");
                }
            }
            _ => {
                if let Some(b) = blocks[slot].take() {
                    blocks[slot] = Some(realloc(&mut rng, b, cpu));
                }
            }
        }
    }
    x86_64::instructions::interrupts::disable();
    apic::stop_timer();
    *rng_state = rng.next();
    if let Some(d) = duties {
        *DUTIES.lock() = Some(d);
    }
}

fn ms(cycles: u64) -> u64 {
    time::tsc_per_ms().map_or(0, |per_ms| cycles / per_ms)
}

fn us(cycles: u64) -> u64 {
    time::tsc_per_ms().map_or(0, |per_ms| cycles * 1000 / per_ms)
}

fn mib(bytes: usize) -> usize {
    bytes >> 20
}

fn figures(n: usize, elapsed_ms: u64) {
    let ops = ALLOCS.load(Relaxed) + FREES.load(Relaxed) + REALLOCS.load(Relaxed);
    serial_println!(
        "soak kernel: {n} CPUs, {} s: {ops} operations ({} allocs, {} frees, {} reallocs, {} hand-offs); {} timer \
         ticks, {} background steps, {} release_all, {} limit changes, {} stats reads",
        elapsed_ms / 1000,
        ALLOCS.load(Relaxed),
        FREES.load(Relaxed),
        REALLOCS.load(Relaxed),
        HANDOFFS.load(Relaxed),
        TICKS.load(Relaxed),
        BG_STEPS.load(Relaxed),
        RELEASE_ALLS.load(Relaxed),
        LIMIT_CHANGES.load(Relaxed),
        STATS_READS.load(Relaxed)
    );
    let (mut worst, mut wk) = (0, 0);
    for (k, max) in MAX_CYCLES.iter().enumerate() {
        if max.load(Relaxed) > worst {
            (worst, wk) = (max.load(Relaxed), k);
        }
    }
    serial_println!(
        "soak kernel: committed memory peak {} MiB ({} frames mapped at most), now {} MiB; largest single-call \
         latency {} us ({} of {} B); per kind: alloc {} us, dealloc {} us, realloc {} us",
        mib(PEAK_COMMITTED.load(Relaxed)),
        PEAK_FRAMES.load(Relaxed),
        mib(committed()),
        us(worst),
        KIND_NAMES[wk],
        MAX_SIZE_AT[wk].load(Relaxed),
        us(MAX_CYCLES[0].load(Relaxed)),
        us(MAX_CYCLES[1].load(Relaxed)),
        us(MAX_CYCLES[2].load(Relaxed))
    );
}

#[test_case]
fn soak_every_cpu() {
    let n = smp::online();
    let total = SOAK_SECS.load(Relaxed);
    let per_ms = time::tsc_per_ms().expect("TSC calibrated by smp::init_bsp");
    serial_println!(
        "soak kernel: {total} s on {n} CPUs in rounds of {ROUND_SECS} s; sizes 1 B..4 MiB, alignments 1 B..2 MiB; \
         timer every {} ms",
        TICK_US / 1000
    );
    let before = HEAP.mem_stats();
    *DUTIES.lock() = Some(Duties { next: 0, rng: Rng::new(0xD07), seen: [(0, time::rdtsc()); MAX_CPUS] });
    for (i, l) in LOCALS.iter().enumerate() {
        l.lock().1 = 0x50A6_0000 + i as u64;
    }
    apic::set_tick_handler(Some(on_tick));
    let t0 = time::rdtsc();
    let end = t0 + total * 1000 * per_ms;
    while time::rdtsc() < end {
        ROUND_END.store((time::rdtsc() + ROUND_SECS * 1000 * per_ms).min(end), Relaxed);
        testing::run_on_all(round);
        let done = ms(time::rdtsc() - t0);
        serial_println!(
            "soak kernel: {} s: {} allocs, {} frees, {} reallocs, {} hand-offs; committed {} MiB (peak {} MiB)",
            done / 1000,
            ALLOCS.load(Relaxed),
            FREES.load(Relaxed),
            REALLOCS.load(Relaxed),
            HANDOFFS.load(Relaxed),
            mib(committed()),
            mib(PEAK_COMMITTED.load(Relaxed))
        );
    }
    DRAIN.store(true, Relaxed);
    testing::run_on_all(round);
    apic::set_tick_handler(Some(background::tick));
    testing::flush_all_caches();
    HEAP.set_memory_limit(usize::MAX);
    PEAK_COMMITTED.fetch_max(committed(), Relaxed);
    let released = HEAP.release_all();
    let after = HEAP.mem_stats();
    figures(n, ms(time::rdtsc() - t0));
    serial_println!(
        "soak kernel: end: every block verified and freed; release_all released {} MiB; live objects {} (at the \
         start {})",
        mib(released),
        after.live_objects(),
        before.live_objects()
    );
    assert_eq!(ALLOCS.load(Relaxed), FREES.load(Relaxed), "every block allocated was freed once");
    assert_eq!(after.live_objects(), before.live_objects(), "live objects not back at the start value");
    assert!(ALLOCS.load(Relaxed) > 0 && HANDOFFS.load(Relaxed) > 0, "the mix ran and handed blocks over");
}
