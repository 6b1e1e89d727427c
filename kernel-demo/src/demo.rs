//! The demo workload and its report (issue 5), run on every CPU at once.
//!
//! Every CPU churns through `Box`/`Vec`/`String`/`BTreeMap` objects on goheap's three paths (tiny ≤ 8 B,
//! small up to 32 KiB, large above), keeps a window of them alive, frees them in random order, and hands
//! some to other CPUs through per-CPU inboxes (spin-locked `VecDeque`s) to be checked and freed there.
//! Every object carries a checksum of its fill pattern, verified when it is freed: a heap bug shows up as
//! a panic naming the object, not as a silent pass.
//!
//! Phases, separated by barriers (the BSP prints between them):
//! 1. the workload on goheap (timed with the TSC);
//! 2. the same workload with the global allocator routed to a `linked_list_allocator` heap of
//!    [`COMPARE_HEAP_BYTES`] (timed);
//! 3. the workload on goheap again, warm (timed);
//! 4. background steps on every CPU (sweep + budgeted scavenge, as an idle loop would run them);
//! 5. every CPU flushes its goheap cache; the BSP calls `release_all` and prints the report.
//!
//! The BSP calls [`run_bsp`]; each AP calls [`run_ap`] from its entry point.

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use kernel_demo::background;
use kernel_demo::frames;
use kernel_demo::heap::{self, HEAP};
use kernel_demo::serial_println;
use kernel_demo::testing;
use testkit::Rng;

/// The two CPU facts the demo needs.
mod cpuinfo {
    /// This CPU's APIC ID: from its per-CPU data, else CPUID leaf 1 (EBX bits 31:24, the initial ID).
    pub fn apic_id() -> u32 {
        if let Some(cpu) = kernel_demo::percpu::try_this() {
            return cpu.apic_id;
        }
        // SAFETY: CPUID leaf 1 exists on every x86_64 CPU and only reads identification registers.
        #[allow(unused_unsafe)]
        let r = unsafe { core::arch::x86_64::__cpuid(1) };
        r.ebx >> 24
    }

    /// The time-stamp counter.
    pub fn rdtsc() -> u64 {
        // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear; ring 0 anyway).
        #[allow(unused_unsafe)]
        unsafe {
            core::arch::x86_64::_rdtsc()
        }
    }
}

/// CPUs the demo can use (its inboxes and result slots).
pub const MAX_DEMO_CPUS: usize = 16;
/// Workload rounds per CPU per phase: fewer in a debug build (unoptimised code under QEMU's emulation is
/// some 50 times slower), so `cargo xtask run` stays quick; `--release` runs more for steadier timings.
pub const ROUNDS: usize = if cfg!(debug_assertions) { 1000 } else { 20_000 };
/// Objects each CPU keeps alive at once.
const LIVE_SLOTS: usize = 96;
/// A CPU stops sending to an inbox holding this many parcels (and frees the object itself).
const INBOX_MAX: usize = 256;
/// Size of the comparison heap: enough for the workload's peak on 16 CPUs.
pub const COMPARE_HEAP_BYTES: usize = 32 << 20;
/// Background steps each CPU runs in phase 4: enough for the scavenger's peak window (4 epochs of 64
/// calls) to move past the comparison phase's peak even on one CPU, so the goal drops and it releases.
const BACKGROUND_STEPS: usize = 600;

/// A barrier for the CPUs taking part (a generation counter; reusable).
struct Barrier {
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    const fn new() -> Self {
        Barrier { arrived: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    fn wait(&self, n: usize) {
        let gen = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == n {
            // Reset before releasing: a fast CPU may arrive at the next barrier right after the bump.
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
        } else {
            while self.generation.load(Ordering::Acquire) == gen {
                core::hint::spin_loop();
            }
        }
    }
}

static BARRIER: Barrier = Barrier::new();
/// CPUs taking part; set by the BSP before [`GO`].
static NCPUS: AtomicUsize = AtomicUsize::new(1);
static GO: AtomicBool = AtomicBool::new(false);
/// Next demo rank (0 = BSP).
static NEXT_RANK: AtomicUsize = AtomicUsize::new(1);

/// An object in flight, checked and freed by the CPU that receives it.
struct Parcel {
    from: usize,
    obj: Obj,
}

static INBOX: [spin::Mutex<VecDeque<Parcel>>; MAX_DEMO_CPUS] =
    [const { spin::Mutex::new(VecDeque::new()) }; MAX_DEMO_CPUS];

/// What one CPU did in one phase.
#[derive(Clone, Copy, Default)]
struct WorkStats {
    allocs: u64,
    verified: u64,
    sent: u64,
    received_cross: u64,
    cycles: u64,
}

/// Per rank, per phase: the CPU's figures, written by it, read by the BSP after a barrier.
struct Slot {
    apic_id: AtomicU64,
    cache_index: AtomicU64,
    stats: [spin::Mutex<WorkStats>; 3],
}

static SLOTS: [Slot; MAX_DEMO_CPUS] = [const {
    Slot {
        apic_id: AtomicU64::new(u64::MAX),
        cache_index: AtomicU64::new(u64::MAX),
        stats: [const { spin::Mutex::new(WorkStats { allocs: 0, verified: 0, sent: 0, received_cross: 0, cycles: 0 }) };
            3],
    }
}; MAX_DEMO_CPUS];

/// The objects of the workload, covering the tiny, small and large paths.
enum Payload {
    /// Tiny: an 8-byte box.
    Word(Box<u64>),
    /// Tiny (< 16 B), small or large (> 32 KiB): a byte buffer of exactly its length, written (and
    /// checked) only at every `STRIDE` bytes and at its last byte.
    Bytes(Box<[MaybeUninit<u8>]>),
    /// Small: a string.
    Text(String),
    /// Small: tree nodes.
    Map(BTreeMap<u32, u64>),
}

/// A payload with the checksum of its contents taken when it was made.
struct Obj {
    payload: Payload,
    sum: u64,
    tag: u64,
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(23).wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

/// Buffers are stamped and checked at this stride (and at their last byte) instead of filled, so the
/// timing measures the allocator rather than memset.
const STRIDE: usize = 64;

const TEXT: &str = "goheap: size classes, per-CPU caches, central lists, a radix-tree page heap and a scavenger \
                    with a soft memory limit, after Go's runtime allocator, in a kernel on every CPU at once.";

/// The offsets of a buffer of `n` bytes that are stamped: every `STRIDE`-th and the last.
fn stamp_offsets(n: usize) -> impl Iterator<Item = usize> {
    (0..n).step_by(STRIDE).chain(core::iter::once(n - 1))
}

/// A buffer of `n` bytes (`n > 0`) stamped with a pattern derived from `tag`.
fn stamped(n: usize, tag: u64) -> Box<[MaybeUninit<u8>]> {
    let mut b = Box::new_uninit_slice(n);
    for i in stamp_offsets(n) {
        b[i].write((mix(tag, i as u64) >> 56) as u8);
    }
    b
}

impl Obj {
    fn make(rng: &mut Rng, tag: u64) -> Obj {
        let kind = rng.below(100);
        let payload = match kind {
            // Tiny path: sizes 1..15 with alignment <= 8.
            0..=19 => Payload::Word(Box::new(tag)),
            20..=39 => Payload::Bytes(stamped(1 + rng.below(15) as usize, tag)),
            // Small path: 16 B ..= 32 KiB.
            40..=64 => Payload::Bytes(stamped(16 + rng.below(2048) as usize, tag)),
            65..=74 => Payload::Bytes(stamped(2048 + rng.below(30 << 10) as usize, tag)),
            75..=86 => {
                let len = 1 + rng.below(TEXT.len() as u64 - 1) as usize;
                let mut s = String::with_capacity(len);
                s.push_str(&TEXT[..len]);
                Payload::Text(s)
            }
            87..=95 => {
                let n = 4 + rng.below(24) as u32;
                Payload::Map((0..n).map(|k| (k.wrapping_mul(7919) ^ tag as u32, mix(tag, k as u64))).collect())
            }
            // Large path: above 32 KiB.
            _ => Payload::Bytes(stamped((32 << 10) + 1 + rng.below(96 << 10) as usize, tag)),
        };
        let mut o = Obj { payload, sum: 0, tag };
        o.sum = o.checksum();
        o
    }

    fn checksum(&self) -> u64 {
        let mut h = self.tag;
        match &self.payload {
            Payload::Word(w) => h = mix(h, **w),
            Payload::Bytes(b) => {
                for i in stamp_offsets(b.len()) {
                    // SAFETY: `stamped` wrote every offset `stamp_offsets` yields.
                    h = mix(h, unsafe { b[i].assume_init() } as u64 ^ (i as u64) << 8);
                }
            }
            Payload::Text(s) => {
                for i in stamp_offsets(s.len()) {
                    h = mix(h, s.as_bytes()[i] as u64);
                }
            }
            Payload::Map(m) => {
                for (&k, &v) in m {
                    h = mix(h, k as u64 ^ v);
                }
            }
        }
        h
    }

    /// Checks the contents against the checksum taken at creation, then frees the object.
    fn verify_and_free(self, by: usize) {
        let now = self.checksum();
        if now != self.sum {
            panic!(
                "heap corruption: object {:#x} changed (checksum {:#x} != {:#x}), freed on rank {by}",
                self.tag, now, self.sum
            );
        }
    }
}

/// Drains this CPU's inbox, verifying and freeing every parcel; returns how many came from other CPUs.
fn drain_inbox(me: usize, st: &mut WorkStats) {
    // Take the parcels out under the lock, free them outside it (a free may take goheap's locks).
    let parcels = core::mem::take(&mut *INBOX[me].lock());
    for p in parcels {
        if p.from != me {
            st.received_cross += 1;
        }
        st.verified += 1;
        p.obj.verify_and_free(me);
    }
}

/// The workload of one CPU (`me` of `n`). The seed depends on the rank only, so every phase makes the
/// same requests (which objects cross CPUs depends on timing: a full inbox is skipped).
fn workload(me: usize, n: usize) -> WorkStats {
    let mut st = WorkStats::default();
    // Deterministic per CPU, so every heap sees the same request sequence.
    let mut rng = Rng::new(0x1234_5678_9ABC_DEF1 ^ (me as u64 + 1));
    let mut live: Vec<Option<Obj>> = Vec::with_capacity(LIVE_SLOTS);
    live.resize_with(LIVE_SLOTS, || None);
    for round in 0..ROUNDS {
        let tag = ((me as u64) << 48) | round as u64;
        let obj = Obj::make(&mut rng, tag);
        st.allocs += 1;
        let r = rng.next();
        if n > 1 && r % 4 == 0 {
            let to = (me + 1 + (r >> 8) as usize % (n - 1)) % n;
            let mut inbox = INBOX[to].lock();
            if inbox.len() < INBOX_MAX {
                inbox.push_back(Parcel { from: me, obj });
                st.sent += 1;
                continue;
            }
            drop(inbox);
            st.verified += 1;
            obj.verify_and_free(me);
        } else {
            let slot = (r >> 16) as usize % LIVE_SLOTS;
            if let Some(old) = live[slot].replace(obj) {
                st.verified += 1;
                old.verify_and_free(me);
            }
        }
        if round % 16 == 15 {
            drain_inbox(me, &mut st);
        }
    }
    for o in live.drain(..).flatten() {
        st.verified += 1;
        o.verify_and_free(me);
    }
    st
}

/// One timed phase on every CPU: start together, run, drain what others sent, free the inbox buffers.
fn phase(me: usize, n: usize, idx: usize) {
    BARRIER.wait(n);
    let t0 = cpuinfo::rdtsc();
    let mut st = workload(me, n);
    BARRIER.wait(n);
    // Every sender is done: what is left in the inbox is ours to check and free.
    drain_inbox(me, &mut st);
    // Drop the queue's buffer now, so it returns to the heap that made it (the comparison heap must be
    // empty when its run ends).
    *INBOX[me].lock() = VecDeque::new();
    st.cycles = cpuinfo::rdtsc() - t0;
    *SLOTS[me].stats[idx].lock() = st;
    BARRIER.wait(n);
}

/// The part of the demo every CPU runs (`me` is the rank, 0 = BSP); the BSP does the set-up between the
/// barriers.
fn participate(me: usize) {
    let n = NCPUS.load(Ordering::Acquire);
    SLOTS[me].apic_id.store(cpuinfo::apic_id() as u64, Ordering::Relaxed);
    SLOTS[me].cache_index.store(heap::current_cpu_index().map_or(u64::MAX, |i| i as u64), Ordering::Relaxed);

    // Phase 1: goheap, cold.
    phase(me, n, 0);
    // Phase 2: linked_list_allocator (the BSP switched the heap before this barrier).
    BARRIER.wait(n);
    phase(me, n, 1);
    BARRIER.wait(n);
    // Phase 3: goheap, warm.
    phase(me, n, 2);
    // Phase 4: background steps, as idle loops would run them.
    BARRIER.wait(n);
    for _ in 0..BACKGROUND_STEPS {
        background::step();
    }
    BARRIER.wait(n);
    // Phase 5: every CPU's cache back to the central lists (only the owning CPU can do that).
    HEAP.flush_cpu_cache();
    BARRIER.wait(n);
}

/// An AP's part: waits for the BSP's go, takes part, then idles (background work on timer ticks).
pub fn run_ap() -> ! {
    while !GO.load(Ordering::Acquire) {
        core::hint::spin_loop();
    }
    let me = NEXT_RANK.fetch_add(1, Ordering::AcqRel);
    if me < NCPUS.load(Ordering::Acquire) {
        participate(me);
    }
    background::idle_loop()
}

fn print_mem_stats(title: &str, m: &goheap::stats::MemStats) {
    serial_println!("MemStats {title}:");
    serial_println!(
        "  heap: alloc {} KiB, inuse {} KiB, idle {} KiB, released {} KiB, sys {} KiB; total sys {} KiB",
        m.heap_alloc >> 10,
        m.heap_inuse >> 10,
        m.heap_idle >> 10,
        m.heap_released >> 10,
        m.heap_sys >> 10,
        m.sys >> 10
    );
    serial_println!(
        "  objects: mallocs {}, frees {}, live {}; tiny {}; large {} / {} freed; remote frees {}",
        m.mallocs,
        m.frees,
        m.heap_objects,
        m.tiny_allocs,
        m.large_allocs,
        m.large_frees,
        m.remote_frees
    );
    serial_println!(
        "  metadata: mspan {} / {} KiB, mcache {} / {} KiB, other {} KiB; total allocated {} KiB",
        m.mspan_inuse >> 10,
        m.mspan_sys >> 10,
        m.mcache_inuse >> 10,
        m.mcache_sys >> 10,
        m.other_sys >> 10,
        m.total_alloc >> 10
    );
}

fn print_frames(title: &str) {
    let c = frames::counts();
    serial_println!(
        "frames {title}: heap holds {} ({} KiB); frame allocator: {} free of {} ({} in use)",
        heap::committed_frames(),
        heap::committed_frames() * 4,
        c.free,
        c.total,
        c.in_use
    );
}

/// Milliseconds for `cycles` TSC cycles (0 if the TSC was not calibrated).
fn ms(cycles: u64) -> u64 {
    kernel_demo::time::tsc_per_ms().map_or(0, |per_ms| cycles / per_ms)
}

fn sum_phase(n: usize, idx: usize) -> WorkStats {
    let mut t = WorkStats::default();
    for s in SLOTS.iter().take(n) {
        let s = *s.stats[idx].lock();
        t.allocs += s.allocs;
        t.verified += s.verified;
        t.sent += s.sent;
        t.received_cross += s.received_cross;
        t.cycles = t.cycles.max(s.cycles);
    }
    t
}

/// The BSP's part: starts the phases on `ncpus` CPUs (the APs must be running [`run_ap`]), prints the
/// report. Returns true when everything checked out.
pub fn run_bsp(ncpus: usize) -> bool {
    let n = ncpus.clamp(1, MAX_DEMO_CPUS);
    NCPUS.store(n, Ordering::Release);
    GO.store(true, Ordering::Release);
    serial_println!("demo: {} CPU(s), {} rounds each, {} objects kept alive per CPU", n, ROUNDS, LIVE_SLOTS);
    print_frames("at start");
    let start = HEAP.mem_stats();
    background::set_verbose(false);

    let me = 0;
    SLOTS[me].apic_id.store(cpuinfo::apic_id() as u64, Ordering::Relaxed);
    SLOTS[me].cache_index.store(heap::current_cpu_index().map_or(u64::MAX, |i| i as u64), Ordering::Relaxed);
    let g1 = phase_goheap_cold(me, n);
    let after1 = HEAP.mem_stats();
    print_frames("after phase 1");
    let compare = phase_linked_list(me, n);
    let g3 = phase_goheap_warm(me, n);
    if compare.ran {
        print_tsc_ratios(&compare.totals, &g1, &g3, n);
    }
    phase_background(n);
    let release = phase_release(n);
    print_report(n, &start, &after1, &release);
    verdict(&release, compare.leftover)
}

/// Phase 1: the workload on goheap, cold; its totals over every CPU.
fn phase_goheap_cold(me: usize, n: usize) -> WorkStats {
    phase(me, n, 0);
    let g1 = sum_phase(n, 0);
    serial_println!(
        "phase 1 (goheap, cold): {} objects made, {} verified and freed, {} sent to other CPUs ({} freed there); {} Mcycles ({} ms)",
        g1.allocs,
        g1.verified,
        g1.sent,
        g1.received_cross,
        g1.cycles / 1_000_000,
        ms(g1.cycles)
    );
    g1
}

/// What phase 2 did: whether the comparison heap could be set up, its totals, and the bytes left on it.
struct Comparison {
    ran: bool,
    totals: WorkStats,
    leftover: usize,
}

/// Phase 2: the workload with the global allocator routed to a linked_list_allocator heap.
fn phase_linked_list(me: usize, n: usize) -> Comparison {
    let ran = heap::compare_begin(heap::CompareKind::LinkedList, COMPARE_HEAP_BYTES);
    if !ran {
        serial_println!(
            "phase 2 skipped: goheap could not supply the {} MiB comparison area",
            COMPARE_HEAP_BYTES >> 20
        );
    }
    BARRIER.wait(n);
    phase(me, n, 1);
    let l = sum_phase(n, 1);
    let mut leftover = 0;
    if ran {
        leftover = heap::compare_end();
    }
    BARRIER.wait(n);
    serial_println!(
        "phase 2 (linked_list_allocator, {} MiB): {} objects, {} verified; {} Mcycles ({} ms){}",
        COMPARE_HEAP_BYTES >> 20,
        l.allocs,
        l.verified,
        l.cycles / 1_000_000,
        ms(l.cycles),
        if leftover != 0 { " (WARNING: bytes left on the comparison heap)" } else { "" }
    );
    Comparison { ran, totals: l, leftover }
}

/// Phase 3: the workload on goheap again, warm.
fn phase_goheap_warm(me: usize, n: usize) -> WorkStats {
    phase(me, n, 2);
    let g3 = sum_phase(n, 2);
    serial_println!(
        "phase 3 (goheap, warm): {} objects, {} verified; {} Mcycles ({} ms)",
        g3.allocs,
        g3.verified,
        g3.cycles / 1_000_000,
        ms(g3.cycles)
    );
    g3
}

/// The TSC ratios of phase 2 (linked_list_allocator) against phases 1 and 3 (goheap cold and warm).
fn print_tsc_ratios(l: &WorkStats, g1: &WorkStats, g3: &WorkStats, n: usize) {
    let ratio = |g: u64| {
        let x100 = l.cycles * 100 / g.max(1);
        (x100 / 100, x100 % 100)
    };
    let (c1, c2) = ratio(g1.cycles);
    let (w1, w2) = ratio(g3.cycles);
    serial_println!(
        "TSC: linked_list_allocator / goheap = {c1}.{c2:02}x (goheap cold), {w1}.{w2:02}x (goheap warm), {n} CPU(s)"
    );
}

/// Phase 4: background steps on every CPU.
fn phase_background(n: usize) {
    background::set_verbose(true);
    let frames_before_bg = heap::committed_frames();
    let t_bg = cpuinfo::rdtsc();
    BARRIER.wait(n);
    for _ in 0..BACKGROUND_STEPS {
        background::step();
    }
    BARRIER.wait(n);
    let (steps, released) = background::totals();
    serial_println!(
        "phase 4 (background): {} steps on {} CPU(s) in {} ms, {} KiB released; heap frames {} -> {}",
        steps,
        n,
        ms(cpuinfo::rdtsc() - t_bg),
        released >> 10,
        frames_before_bg,
        heap::committed_frames()
    );
}

/// goheap's statistics and the frame counts (heap-held, frame allocator's free) around `release_all`.
struct Release {
    before: goheap::stats::MemStats,
    after: goheap::stats::MemStats,
    frames_before: (usize, usize),
    frames_after: (usize, usize),
}

/// Phase 5: flush every cache, then release everything.
fn phase_release(n: usize) -> Release {
    HEAP.flush_cpu_cache();
    BARRIER.wait(n);
    let before = HEAP.mem_stats();
    let frames_before = (heap::committed_frames(), frames::free_count());
    print_frames("before release_all");
    let released = HEAP.release_all();
    let after = HEAP.mem_stats();
    let frames_after = (heap::committed_frames(), frames::free_count());
    print_frames("after release_all");
    serial_println!("release_all released {} KiB", released >> 10);
    Release { before, after, frames_before, frames_after }
}

/// The report after the phases: goheap's statistics at each point, per-CPU counters, cross-CPU frees and
/// frames.
fn print_report(n: usize, start: &goheap::stats::MemStats, after1: &goheap::stats::MemStats, r: &Release) {
    let (before, after, frames_before, frames_after) = (&r.before, &r.after, r.frames_before, r.frames_after);
    serial_println!();
    serial_println!("=== report ===");
    print_mem_stats("at start", start);
    print_mem_stats("after phase 1 (goheap, all objects freed, caches not flushed)", after1);
    print_mem_stats("before release_all (all phases done, every CPU's cache flushed)", before);
    print_mem_stats("after release_all", after);
    serial_println!("per CPU (goheap cache counters over the whole run; demo counts over phases 1+3):");
    let mut handed = 0;
    for (rank, slot) in SLOTS.iter().enumerate().take(n) {
        let apic = slot.apic_id.load(Ordering::Relaxed);
        let idx = slot.cache_index.load(Ordering::Relaxed);
        let (s1, s3) = (*slot.stats[0].lock(), *slot.stats[2].lock());
        handed += s1.received_cross + s3.received_cross;
        let cs = if (idx as usize) < goheap::cpu::MAX_CPUS { HEAP.cpu_stats(idx as usize) } else { Default::default() };
        serial_println!(
            "  CPU {rank}: APIC ID {apic}, cache index {idx}: mallocs {}, frees {}, remote frees {}, refills {}; sent {}, received from other CPUs {}",
            cs.mallocs,
            cs.frees,
            cs.remote_frees,
            cs.refills,
            s1.sent + s3.sent,
            s1.received_cross + s3.received_cross
        );
    }
    let shared = HEAP.cpu_stats(goheap::cpu::MAX_CPUS);
    serial_println!("  shared cache (no CPU index): mallocs {}, frees {}", shared.mallocs, shared.frees);
    serial_println!(
        "cross-CPU: {} objects handed to another CPU and freed there by the demo (goheap phases); goheap remote_frees {}",
        handed,
        after.remote_frees
    );
    serial_println!(
        "frames: heap held {} before release_all, {} after; frame allocator free {} -> {} (+{})",
        frames_before.0,
        frames_after.0,
        frames_before.1,
        frames_after.1,
        frames_after.1.saturating_sub(frames_before.1)
    );

    let hs = HEAP.heap().stats();
    serial_println!(
        "after release_all: {} spans ({} KiB) still in use with no live object: the central lists keep {} empty span per class even through release_all",
        hs.spans_inuse,
        hs.inuse_bytes >> 10,
        goheap::object::central::KEEP_EMPTY_SPANS
    );
    kernel_demo::irqlat::print_report(n);
}

/// The demo's verdict: `release_all` shrank the heap and the comparison heap was left empty.
fn verdict(r: &Release, leftover: usize) -> bool {
    let mut ok = true;
    if r.before.heap_objects != 0 || r.after.heap_objects != 0 {
        // Objects alive outside the demo (none expected: the demo allocates nothing it keeps).
        serial_println!("note: {} objects still live on goheap", r.after.heap_objects);
    }
    if r.after.heap_inuse > r.before.heap_inuse || r.frames_after.0 > r.frames_before.0 {
        serial_println!("FAIL: release_all did not shrink the heap");
        ok = false;
    }
    if leftover != 0 {
        ok = false;
    }
    ok
}

// ---- Out of memory (`cargo xtask run -- --oom`) ---------------------------------------------------------

/// Frames the `--oom` run may use beyond what is in use when it starts: a small machine's worth, so the
/// heap runs dry in seconds rather than after filling all of QEMU's memory.
pub const OOM_BUDGET_BYTES: usize = 48 << 20;

/// Set right before the deliberate infallible allocation that must fail: the alloc error handler then
/// ends the run with success (the path was shown) instead of failure.
pub static EXPECT_OOM: AtomicBool = AtomicBool::new(false);

/// Exhausts the heap through fallible allocations, frees everything, shows the heap recovers, then makes an
/// infallible allocation fail so the allocation-error path runs (it never returns).
pub fn run_oom() -> ! {
    use core::alloc::Layout;

    let budget = OOM_BUDGET_BYTES / 4096;
    frames::set_limit(frames::counts().in_use + budget);
    serial_println!("oom: frame budget {} MiB above current use; exhausting the heap", OOM_BUDGET_BYTES >> 20);
    print_frames("before");

    // Bookkeeping first, so it is not what fails.
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(1024);
    let small = Layout::from_size_align(2048, 8).expect("valid layout");
    let mut smalls: Vec<*mut u8> = Vec::with_capacity(64 << 10);

    // 1 MiB blocks (large path) through `try_reserve_exact` until it fails.
    testing::reserve_mib_blocks(&mut blocks);
    // Then 2 KiB objects (small path) through the raw global-allocator interface until it returns null.
    while smalls.len() < smalls.capacity() {
        // SAFETY: a non-zero-size layout.
        let p = unsafe { alloc::alloc::alloc(small) };
        if p.is_null() {
            break;
        }
        // SAFETY: `p` is a fresh 2 KiB allocation.
        unsafe { p.write_bytes(0xA5, small.size()) };
        smalls.push(p);
    }
    let got = blocks.len() * (1 << 20) + smalls.len() * small.size();
    serial_println!(
        "oom: got {} MiB before the heap ran dry: {} blocks of 1 MiB (try_reserve_exact failed), {} objects of 2 KiB (alloc returned null)",
        got >> 20,
        blocks.len(),
        smalls.len()
    );
    print_frames("exhausted");
    let full = HEAP.mem_stats();
    serial_println!(
        "oom: heap_alloc {} KiB, heap_inuse {} KiB, live objects {}",
        full.heap_alloc >> 10,
        full.heap_inuse >> 10,
        full.heap_objects
    );

    // Free it all and give it back.
    for (i, b) in blocks.iter().enumerate() {
        assert_eq!(b[0], i as u8, "block {i} corrupted");
    }
    drop(blocks);
    for &p in &smalls {
        // SAFETY: allocated above with `small`, written with 0xA5, not freed yet.
        unsafe {
            assert_eq!(*p.add(small.size() - 1), 0xA5, "small object corrupted");
            alloc::alloc::dealloc(p, small);
        }
    }
    drop(smalls);
    HEAP.flush_cpu_cache();
    let released = HEAP.release_all();
    serial_println!("oom: everything freed; release_all gave back {} KiB", released >> 10);
    print_frames("after release_all");

    // The heap works again.
    let mut v: Vec<u8> = alloc::vec![7; 16 << 20];
    v[12345] = 8;
    let sum: u64 = v.iter().map(|&x| x as u64).sum();
    assert_eq!(sum, 7 * (16 << 20) + 1);
    drop(v);
    let strings: Vec<String> = (0..1000).map(|i| alloc::format!("string {i}")).collect();
    assert!(strings.iter().enumerate().all(|(i, s)| *s == alloc::format!("string {i}")));
    drop(strings);
    let m = HEAP.mem_stats();
    serial_println!(
        "oom: recovered: 16 MiB vector and 1000 strings allocated, checked and freed; live objects {}, mallocs - frees = {}",
        m.heap_objects,
        m.mallocs - m.frees
    );
    assert_eq!(m.heap_objects, m.mallocs - m.frees);

    // The allocation-error path: an infallible allocation larger than what is left.
    let too_big = OOM_BUDGET_BYTES * 2;
    serial_println!("oom: now an infallible Vec::with_capacity({} MiB): expect the alloc error handler", too_big >> 20);
    EXPECT_OOM.store(true, Ordering::SeqCst);
    let v: Vec<u8> = Vec::with_capacity(too_big);
    // Not reached when the allocation fails as it should.
    serial_println!(
        "oom: FAIL: a {} MiB allocation succeeded under a {} MiB budget ({:p})",
        too_big >> 20,
        OOM_BUDGET_BYTES >> 20,
        v.as_ptr()
    );
    kernel_demo::exit_qemu(kernel_demo::ExitCode::Failed)
}
