//! Interrupt latency inside goheap: how long each goheap call keeps interrupts off (issue 16).
//!
//! goheap's kernel provider (`goheap::x86_64::IrqCpus`) turns interrupts off when a call enters its CPU
//! cache and back on when the guard drops. With the cargo feature `irq-latency`, `heap.rs` wraps that
//! provider in [`MeasuredCpus`], whose guards read the TSC right before the inner guard is taken (before
//! `cli`) and right before it drops (before interrupts come back on): the difference is the stretch with
//! interrupts off, plus a few instructions of the guard itself. Under QEMU's `-icount shift=0` the TSC
//! advances by one per instruction executed, so at one CPU the stretch is an instruction count; under TCG it
//! is host time. At several CPUs under `-icount` the virtual CPUs take turns on one host thread and share the
//! one instruction clock, so a stretch then also counts what the other CPUs ran meanwhile (an upper bound).
//!
//! Each stretch is recorded per CPU in a log2 histogram and a maximum, by *call kind* ([`Kind`], set by the
//! caller before each goheap call with [`set_kind`]) and by section type: a *leaf* section (goheap's fast
//! path: `CpuProvider::enter_leaf`) or a *full* one (`enter`: refills, the general path, large objects,
//! maintenance). Only the outermost section of a CPU is recorded: a nested section (goheap entering again
//! while its CPU is inside a section) lies inside the recorded one. A section entered with interrupts already
//! off (the kernel bench's CPUs run with interrupts off) is recorded all the same: it is what goheap would
//! keep them off for.
//!
//! Recording writes only the running CPU's counters, with interrupts still off: plain loads and stores,
//! no lock, no allocation. Without the feature nothing here is on goheap's path ([`set_kind`] is empty), so
//! the kernel bench's instruction counts are not disturbed; a `--bench-latency` boot needs a kernel built with it.

use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Whether this kernel measures goheap's interrupts-off stretches (cargo feature `irq-latency`).
pub const ENABLED: bool = cfg!(feature = "irq-latency");

/// CPUs with their own counters (others are not recorded).
pub const MAX_CPUS: usize = 16;
/// Histogram buckets: bucket `b` counts stretches of `[2^(b-1), 2^b)` ticks (bucket 0: 0 ticks).
pub const BUCKETS: usize = 48;

/// What the code calling goheap is doing (the caller sets it with [`set_kind`] before the call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Untagged: any goheap call the caller did not tag.
    Other = 0,
    /// A small allocation (8 B to 32 KiB): the fast path (leaf) or the refill / general path (full).
    SmallAlloc = 1,
    /// A small free: the fast path (leaf) or the general path (full: a stock overflowing to the central list).
    SmallFree = 2,
    /// A large allocation (over 32 KiB): pages from the page heap, committed from the page source as needed.
    LargeAlloc = 3,
    /// A large free: the pages go back to the page heap.
    LargeFree = 4,
    /// `realloc` (in place or moving).
    Realloc = 5,
    /// `Malloc::background`: fold deferred frees, return empty spans, one budgeted scavenger step.
    Background = 6,
    /// `Malloc::release_all`: everything free given back to the page source.
    ReleaseAll = 7,
    /// `Malloc::set_memory_limit` lowering the limit, and the background steps that then scavenge toward it
    /// (goheap's `set_memory_limit` only sets the goal).
    Limit = 8,
}

/// Number of kinds.
pub const KINDS: usize = 9;

impl Kind {
    /// All kinds, in their numeric order.
    pub const ALL: [Kind; KINDS] = [
        Kind::Other,
        Kind::SmallAlloc,
        Kind::SmallFree,
        Kind::LargeAlloc,
        Kind::LargeFree,
        Kind::Realloc,
        Kind::Background,
        Kind::ReleaseAll,
        Kind::Limit,
    ];

    /// Short name, as the `KBENCH` lines print it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Other => "other",
            Kind::SmallAlloc => "small-alloc",
            Kind::SmallFree => "small-free",
            Kind::LargeAlloc => "large-alloc",
            Kind::LargeFree => "large-free",
            Kind::Realloc => "realloc",
            Kind::Background => "background",
            Kind::ReleaseAll => "release-all",
            Kind::Limit => "set-memory-limit",
        }
    }
}

/// The log2 bucket of a stretch of `ticks`.
#[inline]
pub fn bucket(ticks: u64) -> usize {
    ((64 - ticks.leading_zeros()) as usize).min(BUCKETS - 1)
}

/// One CPU's figures for one (kind, section type).
struct Cell {
    count: AtomicU64,
    sum: AtomicU64,
    max: AtomicU64,
    hist: [AtomicU64; BUCKETS],
}

impl Cell {
    const fn new() -> Self {
        Cell {
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            max: AtomicU64::new(0),
            hist: [const { AtomicU64::new(0) }; BUCKETS],
        }
    }

    /// Adds a stretch. Called only by the cell's own CPU with interrupts off, so load-then-store is
    /// enough (no read-modify-write instruction needed).
    #[inline]
    #[cfg_attr(not(feature = "irq-latency"), allow(dead_code))]
    fn add(&self, ticks: u64) {
        let bump = |a: &AtomicU64, by: u64| a.store(a.load(Ordering::Relaxed).wrapping_add(by), Ordering::Relaxed);
        bump(&self.count, 1);
        bump(&self.sum, ticks);
        if ticks > self.max.load(Ordering::Relaxed) {
            self.max.store(ticks, Ordering::Relaxed);
        }
        bump(&self.hist[bucket(ticks)], 1);
    }

    fn clear(&self) {
        self.count.store(0, Ordering::Relaxed);
        self.sum.store(0, Ordering::Relaxed);
        self.max.store(0, Ordering::Relaxed);
        for h in &self.hist {
            h.store(0, Ordering::Relaxed);
        }
    }
}

/// Section types: index 0 leaf (`enter_leaf`), 1 full (`enter`).
const SECTIONS: usize = 2;

static CELLS: [[[Cell; SECTIONS]; KINDS]; MAX_CPUS] =
    [const { [const { [const { Cell::new() }; SECTIONS] }; KINDS] }; MAX_CPUS];
/// The call kind each CPU's caller set.
static KIND: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];
/// Sections not recorded because nested in another (per CPU).
static SKIPPED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
/// Sections each CPU is in now (written only by that CPU, inside its sections).
#[cfg_attr(not(feature = "irq-latency"), allow(dead_code))]
static DEPTH: [AtomicU8; MAX_CPUS] = [const { AtomicU8::new(0) }; MAX_CPUS];

/// This CPU's dense index, if it has counters.
#[inline]
fn cpu() -> Option<usize> {
    crate::percpu::current_index().filter(|&i| i < MAX_CPUS)
}

/// The running CPU's current tag ([`Kind::Other`] without the feature or per-CPU data).
#[inline]
pub fn kind() -> Kind {
    if !ENABLED {
        return Kind::Other;
    }
    let k = cpu().map_or(0, |i| KIND[i].load(Ordering::Relaxed) as usize);
    Kind::ALL[k.min(KINDS - 1)]
}

/// Tags the running CPU's next goheap calls with `kind` (until the next `set_kind`). Empty without the
/// `irq-latency` feature.
#[inline(always)]
pub fn set_kind(kind: Kind) {
    if ENABLED {
        if let Some(i) = cpu() {
            KIND[i].store(kind as u8, Ordering::Relaxed);
        }
    }
}

/// Clears every CPU's figures (call while no CPU is inside goheap, e.g. between bench phases).
pub fn reset() {
    for cpu in &CELLS {
        for kind in cpu {
            for cell in kind {
                cell.clear();
            }
        }
    }
    for s in &SKIPPED {
        s.store(0, Ordering::Relaxed);
    }
}

/// The figures of one (kind, section type) summed over CPUs (maximum: the largest of any CPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    pub count: u64,
    pub sum: u64,
    pub max: u64,
    /// Per bucket, see [`BUCKETS`].
    pub hist: [u64; BUCKETS],
}

impl Default for Summary {
    fn default() -> Self {
        Summary { count: 0, sum: 0, max: 0, hist: [0; BUCKETS] }
    }
}

impl Summary {
    /// The stretch at quantile `permille`/1000 as the upper edge of its bucket (`2^b - 1`; 0 for bucket 0).
    pub fn quantile_upper(&self, permille: u64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let want = (self.count * permille).div_ceil(1000).max(1);
        let mut seen = 0;
        for (b, &n) in self.hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return if b == 0 { 0 } else { (1u64 << b) - 1 };
            }
        }
        self.max
    }
}

/// The figures for `kind` and section type (`leaf`), over the first `ncpus` CPUs; and each CPU's maximum.
pub fn summary(kind: Kind, leaf: bool, ncpus: usize) -> (Summary, [u64; MAX_CPUS]) {
    let mut s = Summary::default();
    let mut per_cpu = [0u64; MAX_CPUS];
    for (i, cpu) in CELLS.iter().enumerate().take(ncpus.min(MAX_CPUS)) {
        let c = &cpu[kind as usize][usize::from(!leaf)];
        s.count += c.count.load(Ordering::Relaxed);
        s.sum += c.sum.load(Ordering::Relaxed);
        let m = c.max.load(Ordering::Relaxed);
        s.max = s.max.max(m);
        per_cpu[i] = m;
        for (b, h) in c.hist.iter().enumerate() {
            s.hist[b] += h.load(Ordering::Relaxed);
        }
    }
    (s, per_cpu)
}

/// Sections not recorded (nested in another), over the first `ncpus` CPUs.
pub fn skipped(ncpus: usize) -> u64 {
    SKIPPED.iter().take(ncpus.min(MAX_CPUS)).map(|s| s.load(Ordering::Relaxed)).sum()
}

/// A short report on the serial console (the demo's report): per call kind and section type with any
/// sections, their number, mean and longest stretch in TSC ticks; one line saying how to get it when the
/// kernel was built without the feature.
pub fn print_report(ncpus: usize) {
    if !ENABLED {
        crate::serial_println!(
            "interrupts-off stretches inside goheap: not measured in this build (kernel-demo feature `irq-latency`; \
             `cargo xtask bench --kernel` measures them)"
        );
        return;
    }
    crate::serial_println!("interrupts-off stretches inside goheap, by call kind (TSC ticks; leaf = fast path):");
    for kind in Kind::ALL {
        for leaf in [true, false] {
            let (s, _) = summary(kind, leaf, ncpus);
            if s.count > 0 {
                crate::serial_println!(
                    "  {:<17} {:<4} {:>9} sections, mean {:>8}, max {:>10}",
                    kind.name(),
                    if leaf { "leaf" } else { "full" },
                    s.count,
                    s.sum / s.count,
                    s.max
                );
            }
        }
    }
}

#[cfg(feature = "irq-latency")]
pub use measured::{MeasuredCpus, MeasuredGuard};

#[cfg(feature = "irq-latency")]
mod measured {
    use super::{cpu, Ordering, CELLS, DEPTH, KIND, SKIPPED};
    use crate::percpu::GsIndex;
    use crate::time::rdtsc;
    use goheap::cpu::CpuProvider;
    use goheap::x86_64::{IrqCpus, IrqGuard};

    /// goheap's kernel provider with every interrupts-off section timed (see the module docs).
    pub struct MeasuredCpus {
        inner: &'static IrqCpus<GsIndex>,
    }

    impl MeasuredCpus {
        /// Measures the sections of `inner`.
        pub const fn new(inner: &'static IrqCpus<GsIndex>) -> Self {
            MeasuredCpus { inner }
        }
    }

    /// The inner guard, timed: records the stretch when dropped, then drops the inner guard (which turns
    /// interrupts back on if they were on).
    pub struct MeasuredGuard {
        // Dropped after `drop` below ran: the recording happens with interrupts still off.
        _inner: IrqGuard<'static>,
        t0: u64,
        /// CPU index and section type (0 leaf, 1 full) to record into; `None`: no per-CPU data yet.
        rec: Option<(usize, usize)>,
    }

    impl Drop for MeasuredGuard {
        #[inline]
        fn drop(&mut self) {
            let t1 = rdtsc();
            if let Some((i, sec)) = self.rec {
                // Still inside the section (interrupts off): this CPU's counters are ours alone.
                let depth = DEPTH[i].load(Ordering::Relaxed) - 1;
                DEPTH[i].store(depth, Ordering::Relaxed);
                if depth == 0 {
                    let kind = KIND[i].load(Ordering::Relaxed) as usize;
                    CELLS[i][kind.min(super::KINDS - 1)][sec].add(t1.wrapping_sub(self.t0));
                } else {
                    SKIPPED[i].store(SKIPPED[i].load(Ordering::Relaxed) + 1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Takes a timed section: `inner` is `IrqCpus::enter` or `enter_leaf`.
    #[inline]
    fn timed(sec: usize, inner: impl FnOnce() -> (IrqGuard<'static>, Option<usize>)) -> (MeasuredGuard, Option<usize>) {
        let t0 = rdtsc();
        let (g, idx) = inner();
        let rec = cpu().map(|i| {
            // Interrupts are off now: this CPU's depth is ours alone.
            DEPTH[i].store(DEPTH[i].load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            (i, sec)
        });
        (MeasuredGuard { _inner: g, t0, rec }, idx)
    }

    // SAFETY: every index comes from the inner provider's `enter`/`enter_leaf`, whose guard this guard owns
    // and drops last (after recording), so the inner provider's exclusivity holds for exactly as long as
    // it did without the wrapper; nothing here returns an index of its own.
    unsafe impl CpuProvider for MeasuredCpus {
        type Guard<'a>
            = MeasuredGuard
        where
            Self: 'a;

        #[inline]
        fn enter(&self) -> (MeasuredGuard, Option<usize>) {
            let inner = self.inner;
            timed(1, || inner.enter())
        }

        type LeafGuard<'a>
            = MeasuredGuard
        where
            Self: 'a;

        #[inline]
        fn enter_leaf(&self) -> (MeasuredGuard, Option<usize>) {
            let inner = self.inner;
            timed(0, || inner.enter_leaf())
        }
    }
}
