//! The kernel benchmark (issue 7's in-QEMU half; kernel argument `--bench`, run by
//! `cargo xtask bench --kernel`): goheap against a `linked_list_allocator` heap and a talc heap of the same
//! size ([`PEER_HEAP_BYTES`]), all in the same boot, on every CPU at once.
//!
//! # How a measurement runs
//! Every workload runs on all `n` CPUs at once through the global allocator, which `heap.rs` routes to
//! goheap or to the comparison heap the BSP set up with `heap::compare_begin` (a fresh peer heap over one
//! goheap allocation of [`PEER_HEAP_BYTES`], given back after the run). The CPUs start together at a
//! barrier; each times its own part with the TSC; a run's time is the slowest CPU's. A CPU with nothing to
//! do (at a barrier, or in `prodcons-64` with its ring full and its input empty) halts until another CPU
//! pokes it with an IPI ([`park_until`]): under QEMU's TCG on a host with fewer cores than the bench has
//! CPUs, a spinning CPU would take a host core from the CPU it waits for. The repetitions are
//! interleaved: repetition `r` runs every workload on goheap, llalloc and talc in an order rotated by `r`
//! (rep 0: goheap llalloc talc, rep 1: llalloc talc goheap, ...), so drift of the host's load spreads over
//! all three. Each run has a time cap ([`CAP_MS`]): a CPU past it stops and the run is marked `capped`
//! (its cost is then over the operations done).
//!
//! Workloads (a subset of the host benchmark, `bench/src/main.rs`; operation counts per CPU):
//! - `pair-64`: alloc + free of one 64 B block, repeated (the fast path);
//! - `batch-fifo-64`, `batch-lifo-64`: 1000 × 64 B allocated, then freed first-in-first-out / last-in-
//!   first-out (glibc's bench-malloc-simple);
//! - `wset`: a random working set of [`WSET_SLOTS`] slots per CPU, sizes 8 B..4 KiB log-uniform and one in
//!   64 between 4 and 32 KiB: an empty slot is filled, a full one freed or replaced at random;
//! - `prodcons-64` (2 CPUs or more): CPU `k` allocates 64 B blocks, writes a token into each and hands them
//!   to CPU `k+1` (mod n) through a ring; that CPU checks the token and frees the block (every free remote).
//!
//! # Output
//! One line per measurement on the serial console, `KBENCH ` and a flat JSON object, which the xtask
//! collects (it never shows absolute times, only ratios of medians):
//!
//! ```text
//! KBENCH {"meta":true,"cpus":4,"checks":false,"reps":5,"heap_mib":64,"cap_ms":1500,"quick":false}
//! KBENCH {"cpus":4,"workload":"pair-64","alloc":"talc","rep":0,"cycles":123,"ops":456,"capped":false}
//! KBENCH {"done":true,"cpus":4,"reps":5}
//! ```
//!
//! `cycles`: TSC cycles of the slowest CPU; `ops`: operations done by all CPUs together (an alloc and its
//! free count as one). At the end a short human-readable summary of the ratios follows, then the kernel
//! exits with success.
//!
//! Kernel arguments besides `--bench`: `--bench-reps=N` (default [`DEFAULT_REPS`]), `--bench-quick` (a
//! tenth of the operations, a quarter of the cap: a smoke run).

use core::alloc::Layout;
use core::hint::black_box;
use core::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use kernel_demo::args::Args;
use kernel_demo::heap::{self, CompareKind, HEAP};
use kernel_demo::irqlat::{self, Kind};
use kernel_demo::{apic, background, serial_println, time};
use testkit::Rng;

/// Size of each peer heap (linked_list_allocator, talc): the same for both, carved out of goheap per run.
pub const PEER_HEAP_BYTES: usize = 64 << 20;
/// Repetitions of every (workload, allocator) run, interleaved.
pub const DEFAULT_REPS: usize = 5;
/// Most repetitions `--bench-reps` may ask for (the summary keeps every run's figure).
const MAX_REPS: usize = 31;
/// Time cap of one run on one CPU, in milliseconds of TSC time.
pub const CAP_MS: u64 = 1500;
/// No repetition starts after this much time has gone by (a safety net: the caps keep a full run well
/// below it); the end line says how many ran.
const BUDGET_MS: u64 = 300_000;
/// CPUs the bench can use.
const MAX_BENCH_CPUS: usize = 16;
/// Blocks per batch (`batch-*`).
const BATCH: usize = 1000;
/// Working-set slots per CPU (`wset`).
pub const WSET_SLOTS: usize = 1024;
/// Slots of each producer/consumer ring (`prodcons-64`): the host benchmark's ring (`bench/src/main.rs`). With
/// 1 024 slots the empty allocator's own run at 4 CPUs under TCG ranged over 1.6k to 3.7k TSC ticks per
/// operation in one boot (a 2-core host: the CPUs' turns were short), with 4 096 over 1.4k to 1.7k.
const RING_SLOTS: usize = 4096;
/// goheap's largest small object (larger ones are large objects: whole pages from the page heap).
const MAX_SMALL: usize = 32 << 10;

/// The allocators measured, in the order of repetition 0. `Empty` is the harness's own cost: the empty
/// allocator of `heap.rs` (a per-CPU bump pointer, frees do nothing) through the same loop and dispatch,
/// which the xtask subtracts from the others' instruction counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alloc {
    Goheap,
    Peer(CompareKind),
    Empty,
}

const ALLOCS: [Alloc; 4] =
    [Alloc::Goheap, Alloc::Peer(CompareKind::LinkedList), Alloc::Peer(CompareKind::Talc), Alloc::Empty];

impl Alloc {
    fn name(self) -> &'static str {
        match self {
            Alloc::Goheap => "goheap",
            Alloc::Peer(k) => k.name(),
            Alloc::Empty => "empty",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Pair64,
    BatchFifo64,
    BatchLifo64,
    Wset,
    ProdCons64,
}

const WORKLOADS: [Workload; 5] =
    [Workload::Pair64, Workload::BatchFifo64, Workload::BatchLifo64, Workload::Wset, Workload::ProdCons64];

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Pair64 => "pair-64",
            Workload::BatchFifo64 => "batch-fifo-64",
            Workload::BatchLifo64 => "batch-lifo-64",
            Workload::Wset => "wset",
            Workload::ProdCons64 => "prodcons-64",
        }
    }

    /// Operations per CPU in a full (uncapped) run.
    fn ops_per_cpu(self) -> u64 {
        match self {
            Workload::Pair64 => 200_000,
            Workload::BatchFifo64 | Workload::BatchLifo64 => 100 * BATCH as u64,
            Workload::Wset => 100_000,
            Workload::ProdCons64 => 20_000,
        }
    }

    fn runs_on(self, n: usize) -> bool {
        self != Workload::ProdCons64 || n >= 2
    }
}

/// Settings of this boot, fixed by the BSP before the APs are released.
static NCPUS: AtomicUsize = AtomicUsize::new(1);
static QUICK: AtomicBool = AtomicBool::new(false);
/// `--bench-latency`: goheap alone (the kernel must be built with the `irq-latency` feature), then the
/// latency phase ([`latency_phase`]) and the `irqlat` histograms.
static LATENCY: AtomicBool = AtomicBool::new(false);
/// Set by the BSP before each repetition's barrier: whether that repetition runs.
static CONTINUE: AtomicBool = AtomicBool::new(true);
static GO: AtomicBool = AtomicBool::new(false);
/// Next rank (0 = BSP).
static NEXT_RANK: AtomicUsize = AtomicUsize::new(1);
static BARRIER: HaltBarrier = HaltBarrier::new();

/// A CPU of the bench that has nothing to do halts (`sti; hlt`) instead of spinning, until another CPU
/// pokes it with an IPI: at a barrier, and in `prodcons-64` when its ring is full and its input empty.
/// Under QEMU's TCG every virtual CPU is a host thread and this machine may have fewer cores than the
/// bench has CPUs: a spinning CPU would take a host core from the CPU it waits for (measured: the empty
/// allocator's `prodcons-64` at 4 CPUs on this project's 2-core machine took 84 to 622 million TSC ticks
/// across the repetitions of one boot when spinning, 32 to 74 million halting). A halted virtual CPU
/// sleeps on the host. Harness only: every allocator runs through the same waits.
struct Sleeper {
    /// Set (`SeqCst`) before the CPU checks its condition a last time and halts; cleared once it wakes.
    halted: AtomicBool,
    /// The CPU's APIC ID (stored before it first halts).
    apic_id: AtomicU32,
}

static SLEEPERS: [Sleeper; MAX_BENCH_CPUS] =
    [const { Sleeper { halted: AtomicBool::new(false), apic_id: AtomicU32::new(0) } }; MAX_BENCH_CPUS];

/// Halts CPU `me` until `ready()` holds. Interrupts stay as they were (off during the bench); a poke or
/// any other interrupt wakes the CPU, which then checks again.
fn park_until(me: usize, ready: impl Fn() -> bool) {
    let s = &SLEEPERS[me];
    while !ready() {
        x86_64::instructions::interrupts::without_interrupts(|| {
            // Announce, then check: a CPU that makes `ready()` true after our check sees `halted` (both
            // sides order their store before their load, `SeqCst`) and its IPI stays pending until `sti`,
            // whose one-instruction shadow makes `sti; hlt` wake on it.
            s.halted.store(true, Ordering::SeqCst);
            if !ready() {
                x86_64::instructions::interrupts::enable_and_hlt();
                x86_64::instructions::interrupts::disable();
            }
            s.halted.store(false, Ordering::Relaxed);
        });
    }
}

/// Wakes CPU `rank` if it halted in [`park_until`]: call after making its condition true.
fn poke(rank: usize) {
    fence(Ordering::SeqCst);
    let s = &SLEEPERS[rank];
    if s.halted.load(Ordering::Acquire) {
        apic::send_fixed(s.apic_id.load(Ordering::Relaxed), apic::TEST_IPI_VECTOR);
    }
}

/// A reusable barrier for the bench's CPUs whose waiters halt ([`park_until`]); the last to arrive pokes
/// the others.
struct HaltBarrier {
    n: AtomicUsize,
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl HaltBarrier {
    const fn new() -> Self {
        HaltBarrier { n: AtomicUsize::new(1), count: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    /// Sets the number of parties (before anyone waits).
    fn set_parties(&self, n: usize) {
        self.n.store(n, Ordering::Release);
    }

    /// Waits, as CPU `me`, until every party arrived.
    fn wait(&self, me: usize) {
        let gen = self.generation.load(Ordering::Acquire);
        let n = self.n.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == n {
            // Reset before releasing: a fast CPU may arrive at the next barrier right after the bump.
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::SeqCst);
            for r in (0..n).filter(|&r| r != me) {
                poke(r);
            }
        } else {
            park_until(me, || self.generation.load(Ordering::Acquire) != gen);
        }
    }
}

/// What one CPU did in the current run; written by it, read by the BSP after the end barrier.
struct Slot {
    cycles: AtomicU64,
    ops: AtomicU64,
    capped: AtomicBool,
}

static SLOTS: [Slot; MAX_BENCH_CPUS] =
    [const { Slot { cycles: AtomicU64::new(0), ops: AtomicU64::new(0), capped: AtomicBool::new(false) } };
        MAX_BENCH_CPUS];

/// A single-producer single-consumer ring of block addresses (Lamport's queue): ring `k` carries CPU
/// `k`'s blocks to CPU `k+1`. Head and tail on their own cache lines.
#[repr(align(64))]
struct Padded(AtomicUsize);

struct Ring {
    /// Next slot the consumer reads (count of blocks taken).
    head: Padded,
    /// Next slot the producer writes (count of blocks put).
    tail: Padded,
    /// Blocks the producer made in this run, published when it stops producing; `usize::MAX` before.
    total: Padded,
    slots: [AtomicUsize; RING_SLOTS],
}

static RINGS: [Ring; MAX_BENCH_CPUS] = [const {
    Ring {
        head: Padded(AtomicUsize::new(0)),
        tail: Padded(AtomicUsize::new(0)),
        total: Padded(AtomicUsize::new(usize::MAX)),
        slots: [const { AtomicUsize::new(0) }; RING_SLOTS],
    }
}; MAX_BENCH_CPUS];

impl Ring {
    fn reset(&self) {
        self.head.0.store(0, Ordering::Relaxed);
        self.tail.0.store(0, Ordering::Relaxed);
        self.total.0.store(usize::MAX, Ordering::Relaxed);
    }

    /// Producer side: whether a push would succeed now.
    fn has_room(&self) -> bool {
        self.tail.0.load(Ordering::Relaxed) - self.head.0.load(Ordering::Acquire) < RING_SLOTS
    }

    /// Producer side: false when full.
    fn push(&self, v: usize) -> bool {
        let t = self.tail.0.load(Ordering::Relaxed);
        if t - self.head.0.load(Ordering::Acquire) == RING_SLOTS {
            return false;
        }
        self.slots[t % RING_SLOTS].store(v, Ordering::Relaxed);
        self.tail.0.store(t + 1, Ordering::Release);
        true
    }

    /// Consumer side: whether a pop would succeed now.
    fn has_items(&self) -> bool {
        self.head.0.load(Ordering::Relaxed) != self.tail.0.load(Ordering::Acquire)
    }

    /// Consumer side.
    fn pop(&self) -> Option<usize> {
        let h = self.head.0.load(Ordering::Relaxed);
        if h == self.tail.0.load(Ordering::Acquire) {
            return None;
        }
        let v = self.slots[h % RING_SLOTS].load(Ordering::Relaxed);
        self.head.0.store(h + 1, Ordering::Release);
        Some(v)
    }
}

/// 8 B..4 KiB log-uniform (a power-of-two octave, then uniform inside it), and one in 64 between 4 and
/// 32 KiB. The generator is seeded by CPU rank and workload, so every allocator sees the same sizes.
fn wset_size(rng: &mut Rng) -> usize {
    if rng.below(64) == 0 {
        return 4096 + rng.below(28 << 10) as usize;
    }
    let octave = 3 + rng.below(9);
    ((1u64 << octave) + rng.below(1 << octave)) as usize
}

/// Per-CPU bookkeeping, allocated from goheap once before the first run (never during one).
struct Scratch {
    batch: alloc::vec::Vec<*mut u8>,
    wset: alloc::vec::Vec<(*mut u8, usize)>,
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            batch: alloc::vec::Vec::with_capacity(BATCH),
            wset: alloc::vec![(core::ptr::null_mut(), 0); WSET_SLOTS],
        }
    }
}

#[inline]
fn layout(size: usize) -> Layout {
    Layout::from_size_align(size.max(1), 8).expect("valid layout")
}

/// Allocates `l` through the global allocator (whichever heap it routes to now); panics on failure (a
/// peer heap of [`PEER_HEAP_BYTES`] is far larger than any workload's peak).
#[inline]
fn alloc_block(l: Layout) -> *mut u8 {
    irqlat::set_kind(if l.size() <= MAX_SMALL { Kind::SmallAlloc } else { Kind::LargeAlloc });
    // SAFETY: `l` has a non-zero size.
    let p = unsafe { alloc::alloc::alloc(l) };
    if p.is_null() {
        panic!("kbench: allocation of {} B failed", l.size());
    }
    black_box(p)
}

/// Frees a block [`alloc_block`] returned with the same layout.
///
/// # Safety
/// `p` came from `alloc_block(l)` and is not used afterwards.
#[inline]
unsafe fn free_block(p: *mut u8, l: Layout) {
    irqlat::set_kind(if l.size() <= MAX_SMALL { Kind::SmallFree } else { Kind::LargeFree });
    // SAFETY: the caller's contract.
    unsafe { alloc::alloc::dealloc(black_box(p), l) }
}

/// Writes the first and last byte of a fresh block, so every allocator's memory is touched alike.
///
/// # Safety
/// `p` is a live block of at least `size` (>= 1) bytes.
#[inline]
unsafe fn touch(p: *mut u8, size: usize, v: u8) {
    // SAFETY: the caller's contract.
    unsafe {
        p.write_volatile(v);
        p.add(size - 1).write_volatile(v);
    }
}

/// Result of one CPU's part of one run.
struct Part {
    ops: u64,
    capped: bool,
}

fn pair64(target: u64, deadline: u64) -> Part {
    let l = layout(64);
    let mut done = 0;
    while done < target {
        let k = (target - done).min(256);
        for _ in 0..k {
            let p = alloc_block(l);
            // SAFETY: allocated just above with `l` (64 B), and freed only after the write.
            unsafe {
                touch(p, 64, done as u8);
                free_block(p, l);
            }
        }
        done += k;
        if time::rdtsc() > deadline {
            return Part { ops: done, capped: done < target };
        }
    }
    Part { ops: done, capped: false }
}

fn batch64(target: u64, deadline: u64, lifo: bool, s: &mut Scratch) -> Part {
    let l = layout(64);
    let mut done = 0;
    while done < target {
        for i in 0..BATCH {
            let p = alloc_block(l);
            // SAFETY: a fresh 64 B block.
            unsafe { touch(p, 64, i as u8) };
            s.batch.push(p);
        }
        if lifo {
            while let Some(p) = s.batch.pop() {
                // SAFETY: allocated above with `l`, freed once (popped).
                unsafe { free_block(p, l) };
            }
        } else {
            for &p in &s.batch {
                // SAFETY: allocated above with `l`; the list is cleared right after.
                unsafe { free_block(p, l) };
            }
            s.batch.clear();
        }
        done += BATCH as u64;
        if time::rdtsc() > deadline {
            return Part { ops: done, capped: done < target };
        }
    }
    Part { ops: done, capped: false }
}

/// `wset`; returns with the working set still allocated (the caller times, then calls [`wset_clear`]).
fn wset(me: usize, target: u64, deadline: u64, s: &mut Scratch) -> Part {
    let mut rng = Rng::new(0x5EED_0000 + me as u64);
    let mut done = 0;
    while done < target {
        let k = (target - done).min(256);
        for _ in 0..k {
            let i = rng.below(WSET_SLOTS as u64) as usize;
            let (p, size) = s.wset[i];
            if p.is_null() {
                let size = wset_size(&mut rng);
                let q = alloc_block(layout(size));
                // SAFETY: a fresh block of `size` bytes.
                unsafe { touch(q, size, i as u8) };
                s.wset[i] = (q, size);
            } else {
                // SAFETY: the slot's block was allocated with `layout(size)` and is dropped from the slot.
                unsafe { free_block(p, layout(size)) };
                s.wset[i] = (core::ptr::null_mut(), 0);
                if rng.below(2) == 0 {
                    let size = wset_size(&mut rng);
                    let q = alloc_block(layout(size));
                    // SAFETY: a fresh block of `size` bytes.
                    unsafe { touch(q, size, i as u8) };
                    s.wset[i] = (q, size);
                }
            }
        }
        done += k;
        if time::rdtsc() > deadline {
            return Part { ops: done, capped: done < target };
        }
    }
    Part { ops: done, capped: false }
}

/// Frees what `wset` left allocated (untimed, before the run's end barrier).
fn wset_clear(s: &mut Scratch) {
    for slot in s.wset.iter_mut() {
        let (p, size) = *slot;
        if !p.is_null() {
            // SAFETY: allocated by `wset` with `layout(size)`; the slot is emptied.
            unsafe { free_block(p, layout(size)) };
            *slot = (core::ptr::null_mut(), 0);
        }
    }
}

/// `prodcons-64` on CPU `me` of `n`: produce into ring `me`, consume ring `me - 1`, until this CPU made its
/// blocks (or passed the deadline) and freed every block its predecessor made.
fn prodcons64(me: usize, n: usize, target: u64, deadline: u64) -> Part {
    let l = layout(64);
    let out = &RINGS[me];
    let pred = (me + n - 1) % n;
    let inp = &RINGS[pred];
    let mut made: u64 = 0;
    let mut producing = true;
    let mut capped = false;
    let mut taken: usize = 0;
    let succ = (me + 1) % n;
    loop {
        let mut progress = false;
        if producing {
            // Up to 16 blocks, as long as the ring has room (only we fill it, so a push after the check
            // cannot fail).
            for _ in 0..16 {
                if made == target || !out.has_room() {
                    break;
                }
                let p = alloc_block(l);
                let token = ((me as u64) << 48) | made;
                // SAFETY: a fresh 64 B block, 8-aligned.
                unsafe { (p as *mut u64).write(token) };
                let pushed = out.push(p as usize);
                debug_assert!(pushed);
                made += 1;
                progress = true;
            }
            if made == target || time::rdtsc() > deadline {
                capped = made < target;
                producing = false;
                out.total.0.store(made as usize, Ordering::Release);
                progress = true;
            }
            if progress {
                poke(succ);
            }
        }
        let taken_before = taken;
        for _ in 0..32 {
            let Some(v) = inp.pop() else { break };
            let p = v as *mut u8;
            // SAFETY: the predecessor published this 64 B block after writing its token; only we take it.
            let token = unsafe { (p as *const u64).read() };
            if (token >> 48) as usize != pred {
                panic!("kbench: prodcons block {p:p} from CPU {pred} carries token {token:#x}");
            }
            // SAFETY: allocated by the predecessor with `l` (same layout), handed over to us alone.
            unsafe { free_block(p, l) };
            taken += 1;
        }
        if taken != taken_before {
            poke(pred);
            progress = true;
        }
        let inp_done = |taken: usize| {
            let total = inp.total.0.load(Ordering::Acquire);
            total != usize::MAX && taken == total
        };
        if !producing && inp_done(taken) {
            break;
        }
        if !progress {
            // Nothing to make (ring full or done) and nothing to take: halt until a neighbour pokes.
            park_until(me, || (producing && out.has_room()) || inp.has_items() || inp_done(taken));
        }
    }
    Part { ops: made, capped }
}

/// One run of `w` on this CPU (rank `me` of `n`), between the run's barriers. Records the CPU's figures in
/// its slot.
fn run_part(w: Workload, me: usize, n: usize, s: &mut Scratch) {
    let quick = QUICK.load(Ordering::Relaxed);
    let target = if quick { w.ops_per_cpu() / 10 } else { w.ops_per_cpu() };
    let cap_ms = if quick { CAP_MS / 4 } else { CAP_MS };
    let cap = time::tsc_per_ms().map_or(u64::MAX, |per_ms| per_ms.saturating_mul(cap_ms));
    let t0 = time::rdtsc();
    let deadline = t0.saturating_add(cap);
    let part = match w {
        Workload::Pair64 => pair64(target, deadline),
        Workload::BatchFifo64 => batch64(target, deadline, false, s),
        Workload::BatchLifo64 => batch64(target, deadline, true, s),
        Workload::Wset => wset(me, target, deadline, s),
        Workload::ProdCons64 => prodcons64(me, n, target, deadline),
    };
    let cycles = time::rdtsc() - t0;
    if w == Workload::Wset {
        wset_clear(s);
    }
    let slot = &SLOTS[me];
    slot.cycles.store(cycles, Ordering::Relaxed);
    slot.ops.store(part.ops, Ordering::Relaxed);
    slot.capped.store(part.capped, Ordering::Relaxed);
}

/// The schedule every CPU follows in lockstep: per repetition (if the BSP lets it run), every workload on
/// every allocator, the allocators rotated by the repetition. The BSP does its part in `on_bsp` between
/// the barriers: `Rep` (whether repetition `r` runs), `Before` (set the heap up) and `After` (take it
/// down, print).
enum Step {
    Rep(usize),
    Before(Workload, Alloc),
    After(usize, Workload, Alloc),
}

fn schedule(me: usize, n: usize, reps: usize, mut on_bsp: impl FnMut(Step) -> bool) {
    SLEEPERS[me].apic_id.store(apic::id(), Ordering::Relaxed);
    let mut scratch = Scratch::new();
    for rep in 0..reps {
        if me == 0 {
            CONTINUE.store(on_bsp(Step::Rep(rep)), Ordering::Release);
        }
        BARRIER.wait(me);
        if !CONTINUE.load(Ordering::Acquire) {
            break;
        }
        let latency = LATENCY.load(Ordering::Relaxed);
        for w in WORKLOADS.iter().copied().filter(|w| w.runs_on(n)) {
            for k in 0..ALLOCS.len() {
                let a = ALLOCS[(k + rep) % ALLOCS.len()];
                if latency && a != Alloc::Goheap {
                    continue;
                }
                if me == 0 {
                    on_bsp(Step::Before(w, a));
                }
                BARRIER.wait(me);
                run_part(w, me, n, &mut scratch);
                BARRIER.wait(me);
                if me == 0 {
                    on_bsp(Step::After(rep, w, a));
                }
            }
        }
    }
    // Scratch goes back to goheap (the BSP restored it after the last run) before the end barrier.
    drop(scratch);
    BARRIER.wait(me);
}

/// An AP's part: waits for the BSP's go, follows the schedule, then idles.
pub fn run_ap() -> ! {
    while !GO.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let me = NEXT_RANK.fetch_add(1, Ordering::AcqRel);
    let n = NCPUS.load(Ordering::Acquire);
    if me < n {
        let reps = REPS.load(Ordering::Acquire);
        schedule(me, n, reps, |_| true);
    }
    background::idle_loop()
}

static REPS: AtomicUsize = AtomicUsize::new(DEFAULT_REPS);

/// Per (workload, allocator, repetition): the run's cycles per operation × 1000 (for the summary).
static COST: [[[AtomicU64; MAX_REPS]; ALLOCS.len()]; WORKLOADS.len()] =
    [const { [const { [const { AtomicU64::new(0) }; MAX_REPS] }; ALLOCS.len()] }; WORKLOADS.len()];

fn parse_reps(args: &Args) -> usize {
    args.iter()
        .find_map(|a| a.strip_prefix("--bench-reps="))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(DEFAULT_REPS)
        .clamp(1, MAX_REPS)
}

/// Checks, before measuring, that each peer heap reports live objects at `heap::compare_end` (and keeps
/// its area registered, so their frees still reach it by address) and reports 0 once they are freed: the
/// bench relies on that check after every peer run.
fn self_check() {
    for kind in [CompareKind::LinkedList, CompareKind::Talc] {
        assert!(heap::compare_begin(kind, 1 << 20), "kbench: no {} heap for the self-check", kind.name());
        let sizes = [64usize, 4096, 100 << 10];
        let blocks = sizes.map(|s| alloc_block(layout(s)));
        let left = heap::compare_end();
        assert!(left >= 64, "kbench: the {} heap reported {left} bytes in use with 3 blocks live", kind.name());
        for (p, s) in blocks.into_iter().zip(sizes) {
            // SAFETY: allocated above with `layout(s)`; the area is still registered, so the free goes to the
            // peer heap that made it.
            unsafe { free_block(p, layout(s)) };
        }
        let left = heap::compare_end();
        assert_eq!(left, 0, "kbench: the {} heap reported {left} bytes in use after every free", kind.name());
    }
}

/// The BSP's part: runs the bench on `ncpus` CPUs (the APs must be in [`run_ap`]), prints the lines and
/// the summary, and exits QEMU (success, or failure if a peer heap could not be set up or was left
/// non-empty).
pub fn run_bsp(ncpus: usize, args: &Args) -> ! {
    let n = ncpus.clamp(1, MAX_BENCH_CPUS);
    let reps = parse_reps(args);
    let quick = args.has("--bench-quick");
    let latency = args.has("--bench-latency");
    if latency && !irqlat::ENABLED {
        serial_println!("kbench: --bench-latency needs a kernel built with the `irq-latency` feature");
        kernel_demo::exit_qemu(kernel_demo::ExitCode::Failed)
    }
    LATENCY.store(latency, Ordering::Release);
    NCPUS.store(n, Ordering::Release);
    REPS.store(reps, Ordering::Release);
    QUICK.store(quick, Ordering::Release);
    BARRIER.set_parties(n);
    background::set_verbose(false);
    // Before the APs are released: it routes the global allocator to peer heaps for a moment.
    self_check();
    irqlat::reset();
    GO.store(true, Ordering::Release);
    let checks = cfg!(feature = "checks");
    serial_println!(
        "kbench: {n} CPU(s), {reps} interleaved repetitions, goheap (checks {}) against linked_list_allocator and talc heaps of {} MiB",
        if checks { "on" } else { "off" },
        PEER_HEAP_BYTES >> 20
    );
    serial_println!(
        "KBENCH {{\"meta\":true,\"cpus\":{n},\"checks\":{checks},\"reps\":{reps},\"heap_mib\":{},\"cap_ms\":{},\"quick\":{quick},\"wset_slots\":{WSET_SLOTS},\"latency\":{latency},\"tsc_per_ms\":{}}}",
        PEER_HEAP_BYTES >> 20,
        if quick { CAP_MS / 4 } else { CAP_MS },
        time::tsc_per_ms().unwrap_or(0)
    );

    let t_start = time::rdtsc();
    let budget = time::tsc_per_ms().map_or(u64::MAX, |per_ms| per_ms.saturating_mul(BUDGET_MS));
    let mut failed = false;
    let mut reps_done = 0;
    schedule(0, n, reps, |step| match step {
        Step::Rep(rep) => {
            // Does this repetition fit the budget, judging by the ones before? (None after a failure.)
            let spent = time::rdtsc() - t_start;
            let fits = !failed && (rep == 0 || spent / rep as u64 * (rep as u64 + 1) <= budget);
            if fits {
                reps_done = rep + 1;
            } else if !failed {
                serial_println!("kbench: time budget reached, stopping after {rep} of {reps} repetitions");
            }
            fits
        }
        Step::Before(w, a) => {
            for ring in RINGS.iter().take(n) {
                ring.reset();
            }
            let ok = match a {
                Alloc::Goheap => true,
                Alloc::Peer(kind) => heap::compare_begin(kind, PEER_HEAP_BYTES),
                // SAFETY: until `compare_end` (Step::After) only the workloads allocate, on the bench's CPUs
                // (interrupt handlers do not allocate); they write their blocks and read back only the
                // prodcons token, of blocks still in a ring: at most RING_SLOTS × 64 B = 256 KiB per CPU
                // allocated since, far below the empty allocator's wrap-around (PEER_HEAP_BYTES / 16).
                Alloc::Empty => unsafe { heap::compare_begin_empty(PEER_HEAP_BYTES) },
            };
            if !ok {
                panic!(
                    "kbench: could not set up the {} heap of {} MiB for {}",
                    a.name(),
                    PEER_HEAP_BYTES >> 20,
                    w.name()
                );
            }
            true
        }
        Step::After(rep, w, a) => {
            if a == Alloc::Empty {
                heap::compare_end();
            }
            if let Alloc::Peer(kind) = a {
                let left = heap::compare_end();
                if left != 0 {
                    serial_println!("kbench: FAIL: {left} bytes left on the {} heap after {}", kind.name(), w.name());
                    failed = true;
                }
            }
            let (mut cycles, mut ops, mut capped) = (0u64, 0u64, false);
            for s in SLOTS.iter().take(n) {
                cycles = cycles.max(s.cycles.load(Ordering::Relaxed));
                ops += s.ops.load(Ordering::Relaxed);
                capped |= s.capped.load(Ordering::Relaxed);
            }
            serial_println!(
                "KBENCH {{\"cpus\":{n},\"workload\":\"{}\",\"alloc\":\"{}\",\"rep\":{rep},\"cycles\":{cycles},\"ops\":{ops},\"capped\":{capped}}}",
                w.name(),
                a.name()
            );
            let (wi, ai) = (WORKLOADS.iter().position(|x| *x == w), ALLOCS.iter().position(|x| *x == a));
            if let (Some(wi), Some(ai)) = (wi, ai) {
                let cost = (cycles as u128 * 1000 / ops.max(1) as u128).min(u64::MAX as u128) as u64;
                COST[wi][ai][rep].store(cost, Ordering::Relaxed);
            }
            true
        }
    });
    if latency {
        latency_phase();
        print_latency(n);
    }
    serial_println!("KBENCH {{\"done\":true,\"cpus\":{n},\"reps\":{reps_done}}}");
    if !latency {
        summary(n, reps_done);
    }
    if failed {
        serial_println!("kbench: FAILED (see above)");
        kernel_demo::exit_qemu(kernel_demo::ExitCode::Failed)
    }
    serial_println!("kbench: done");
    kernel_demo::exit_qemu(kernel_demo::ExitCode::Success)
}

/// Median of the first `k` values of `v` (sorts them).
fn median(v: &mut [u64], k: usize) -> u64 {
    let v = &mut v[..k];
    v.sort_unstable();
    if k == 0 {
        0
    } else if k % 2 == 1 {
        v[k / 2]
    } else {
        (v[k / 2 - 1] + v[k / 2]) / 2
    }
}

/// A human-readable summary on the console: goheap/peer ratios of the median cost per operation.
fn summary(n: usize, reps: usize) {
    serial_println!(
        "kbench summary, {n} CPU(s), {reps} repetitions: goheap / peer, median time per operation (< 1: goheap faster)"
    );
    for (wi, w) in WORKLOADS.iter().enumerate().filter(|(_, w)| w.runs_on(n)) {
        let mut med = [0u64; ALLOCS.len()];
        for (ai, m) in med.iter_mut().enumerate() {
            let mut v = [0u64; MAX_REPS];
            for (r, x) in v.iter_mut().enumerate().take(reps) {
                *x = COST[wi][ai][r].load(Ordering::Relaxed);
            }
            *m = median(&mut v, reps);
        }
        let ratio = |peer: u64| {
            let x100 = med[0] as u128 * 100 / peer.max(1) as u128;
            (x100 / 100, x100 % 100)
        };
        let (l1, l2) = ratio(med[1]);
        let (t1, t2) = ratio(med[2]);
        serial_println!("  {:<14} goheap/llalloc {l1}.{l2:02}   goheap/talc {t1}.{t2:02}", w.name());
    }
}

/// Longest whole call per kind in the latency phase (TSC ticks), guard or not: for calls that do part of
/// their work outside goheap's guard, the bound the interrupts-off stretch would reach if all of it ran
/// inside.
static CALL_MAX: [AtomicU64; irqlat::KINDS] = [const { AtomicU64::new(0) }; irqlat::KINDS];

/// Runs `f` tagged `kind` and keeps its whole duration's maximum.
fn timed_call<R>(kind: Kind, f: impl FnOnce() -> R) -> R {
    irqlat::set_kind(kind);
    let t0 = time::rdtsc();
    let r = f();
    let dt = time::rdtsc() - t0;
    let m = &CALL_MAX[kind as usize];
    m.store(m.load(Ordering::Relaxed).max(dt), Ordering::Relaxed);
    irqlat::set_kind(Kind::Other);
    r
}

/// The latency phase of `--bench-latency`, on the BSP while the other CPUs idle (their background steps
/// are recorded too): the goheap calls the workloads do not make, so that every kind's longest
/// interrupts-off stretch is measured: large objects of 64 KiB to 64 MiB (fresh ones commit their frames,
/// then reused), realloc growing a block from 8 B to 16 MiB and back, background steps after many frees,
/// `release_all`, and a memory limit far below the heap's retained memory (`set_memory_limit`, then the 16
/// background steps that scavenge toward it, all tagged [`Kind::Limit`]).
fn latency_phase() {
    for round in 0..3u8 {
        // Large objects; round 0 and 2 after a release_all: their frames are committed inside the call.
        for shift in [16, 18, 20, 22, 24, 26] {
            let size = 1usize << shift;
            let l = layout(size);
            let p = timed_call(Kind::LargeAlloc, || alloc_block(l));
            // SAFETY: a fresh block of `size` bytes, freed once right after.
            unsafe {
                touch(p, size, round);
                timed_call(Kind::LargeFree, || free_block(p, l));
            }
        }
        // realloc: 8 B doubling to 16 MiB (small in place or moved, then large), then halving back.
        let mut size = 8usize;
        let mut p = alloc_block(layout(size));
        while size < 16 << 20 {
            // SAFETY: `p` is live with `layout(size)`; the new size is non-zero.
            p = timed_call(Kind::Realloc, || unsafe { alloc::alloc::realloc(p, layout(size), size * 2) });
            assert!(!p.is_null(), "kbench: realloc to {} B failed", size * 2);
            size *= 2;
            // SAFETY: live block of `size` bytes.
            unsafe { touch(p, size, round) };
        }
        while size > 8 {
            // SAFETY: as above.
            p = timed_call(Kind::Realloc, || unsafe { alloc::alloc::realloc(p, layout(size), size / 2) });
            assert!(!p.is_null(), "kbench: realloc to {} B failed", size / 2);
            size /= 2;
        }
        // SAFETY: `p` is live with `layout(8)`.
        unsafe { free_block(p, layout(8)) };
        // Many small objects freed at once, then background steps (sweeping the emptied spans, scavenging).
        let mut blocks = alloc::vec::Vec::with_capacity(20_000);
        let mut rng = Rng::new(0x1A7E_0000 + round as u64);
        for _ in 0..20_000 {
            let size = wset_size(&mut rng);
            blocks.push((alloc_block(layout(size)), size));
        }
        for (p, size) in blocks.drain(..) {
            // SAFETY: allocated above with `layout(size)`, freed once.
            unsafe { free_block(p, layout(size)) };
        }
        drop(blocks);
        for _ in 0..64 {
            timed_call(Kind::Background, background::step);
        }
        // A memory limit far below what the heap retains, then none again.
        let big = layout(64 << 20);
        let p = alloc_block(big);
        // SAFETY: a fresh 64 MiB block, freed once.
        unsafe {
            touch(p, 64 << 20, round);
            free_block(p, big);
        }
        // goheap's set_memory_limit only sets the goal; the scavenger reaches it in the background steps
        // that follow, which are tagged as limit scavenging here.
        let in_use = HEAP.mem_stats().heap_alloc as usize;
        timed_call(Kind::Limit, || HEAP.set_memory_limit(in_use + (4 << 20)));
        for _ in 0..16 {
            timed_call(Kind::Limit, || HEAP.background(background::MAX_SPANS, background::SCAVENGE_BUDGET));
        }
        timed_call(Kind::Limit, || HEAP.set_memory_limit(usize::MAX));
        if round != 1 {
            timed_call(Kind::ReleaseAll, || HEAP.release_all());
        }
    }
}

/// Prints the `irqlat` figures: per call kind and section type, one `KBENCH {"lat":true,...}` line with
/// count, sum, max, each CPU's max and the log2 histogram as comma-separated strings (the xtask's reader
/// takes flat objects) (bucket b: stretches of 2^(b-1) to 2^b - 1
/// ticks, bucket 0: 0), and one `{"call":true,...}` line per kind with the longest whole call of the
/// latency phase. Also a short table for people.
fn print_latency(n: usize) {
    use core::fmt::Write as _;
    serial_println!("kbench latency: longest interrupts-off stretch inside goheap per call kind (TSC ticks)");
    for kind in Kind::ALL {
        for leaf in [true, false] {
            let (s, per_cpu) = irqlat::summary(kind, leaf, n);
            if s.count == 0 {
                continue;
            }
            let mut hist = heapless_string();
            let last = s.hist.iter().rposition(|&h| h != 0).unwrap_or(0);
            for (b, h) in s.hist.iter().enumerate().take(last + 1) {
                let _ = write!(hist, "{}{h}", if b == 0 { "" } else { "," });
            }
            let mut cpus = heapless_string();
            for (i, m) in per_cpu.iter().enumerate().take(n.min(irqlat::MAX_CPUS)) {
                let _ = write!(cpus, "{}{m}", if i == 0 { "" } else { "," });
            }
            serial_println!(
                "KBENCH {{\"lat\":true,\"cpus\":{n},\"kind\":\"{}\",\"section\":\"{}\",\"count\":{},\"sum\":{},\"max\":{},\"cpu_max\":\"{}\",\"hist\":\"{}\"}}",
                kind.name(),
                if leaf { "leaf" } else { "full" },
                s.count,
                s.sum,
                s.max,
                cpus.as_str(),
                hist.as_str()
            );
            serial_println!(
                "  {:<17} {:<4} {:>9} sections, mean {:>7}, p99 < {:>9}, max {:>10}",
                kind.name(),
                if leaf { "leaf" } else { "full" },
                s.count,
                s.sum / s.count,
                s.quantile_upper(990) + 1,
                s.max
            );
        }
    }
    for kind in Kind::ALL {
        let m = CALL_MAX[kind as usize].load(Ordering::Relaxed);
        if m != 0 {
            serial_println!("KBENCH {{\"call\":true,\"cpus\":{n},\"kind\":\"{}\",\"max\":{m}}}", kind.name());
        }
    }
    serial_println!("KBENCH {{\"lat_skipped\":true,\"cpus\":{n},\"nested\":{}}}", irqlat::skipped(n));
}

/// A small fixed-capacity string for building a line without allocating (the histogram lines are printed
/// after the runs, but the measured heap should not see the printing).
fn heapless_string() -> FixedStr {
    FixedStr { buf: [0; 1024], len: 0 }
}

struct FixedStr {
    buf: [u8; 1024],
    len: usize,
}

impl FixedStr {
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

impl core::fmt::Write for FixedStr {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len + s.len();
        if end > self.buf.len() {
            return Err(core::fmt::Error);
        }
        self.buf[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}
