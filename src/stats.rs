//! Statistics: Go's `MemStats` and `runtime/metrics`-style named samples.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Counting is per CPU: each cache bumps its own [`Counter`]s with a plain relaxed load and store (no atomic
//! read-modify-write: only the cache's owner writes them), and a reader sums all caches. Nothing is stopped
//! while reading, so a snapshot taken while other CPUs allocate is a consistent-enough blend (each counter
//! is exact, their sum is not atomic); taken while the heap is quiescent it is exact:
//!
//! - `mallocs - frees == heap_objects`
//! - `heap_alloc == Σ_class live_objects(class) * size(class) + 16 * live_tiny_blocks + live_large_bytes`
//! - `heap_sys == heap_inuse + heap_idle`, `heap_idle >= heap_released`
//!
//! # Go's counting rules, and goheap's
//!
//! - **Tiny objects** (requests of 8 B and less packed into 16-byte blocks) are counted as Go counts them
//!   (`runtime/mstats.go`, `runtime/metrics.go`): a *block* is one heap object, one allocation of the 16-byte
//!   size class. `/gc/heap/allocs:objects`, `/gc/heap/frees:objects`, `/gc/heap/objects:objects`,
//!   `allocs-by-size` and `frees-by-size` count blocks, not the tiny objects in them; the tiny objects are
//!   counted by `/gc/heap/tiny/allocs:objects` only. `MemStats` adds them, "for historical reasons" (Go's
//!   comment), to *both* `mallocs` and `frees` at allocation, so `mallocs - frees == heap_objects` still
//!   holds and `heap_objects` counts live blocks. `by_size` counts blocks in the 16-byte class. A block is
//!   live from the moment a CPU takes it until all its objects are freed and the CPU has moved on to another
//!   block (or flushed its cache): a CPU's *current* block counts as one live object even when its objects
//!   were all freed, as in Go until the next GC. goheap, which sees every free, also reports the tiny
//!   objects' own frees (`tiny_frees`, `/goheap/tiny/frees:objects`) and the live objects as a program
//!   counts them (`MemStats::live_objects`, `/goheap/objects/live:objects`: tiny objects one each).
//! - **Bytes**: `heap_alloc` counts class sizes, 16 per live tiny block and large objects' page-rounded
//!   sizes; `total_alloc` the same, cumulative.
//! - **Freed-but-cached**: objects waiting in a CPU's stock of freed objects are free (they count in
//!   `frees`), though their span still holds them.
//! - **Sys** is the sum of the `*_sys` fields, released memory included (Go's `Sys`: address space the
//!   allocator obtained and still holds, resident or not); `/memory/classes/total:bytes` equals it and is
//!   the sum of the `/memory/classes/` leaves. The memory limit applies to `sys - heap_released` (Go's
//!   rule, spec section 7).
//! - The memory limit takes `NextGC`'s place (goheap has no GC goal).
//!
//! Go's equations, which hold exactly on a quiescent heap (`tests/go_equations.rs` checks each one):
//! `heap_sys == heap_inuse + heap_idle`; `heap_idle - heap_released` = free committed pages
//! (`/memory/classes/heap/free:bytes`); `sys` = Σ `*_sys`; `/memory/classes/total:bytes` = Σ leaves;
//! `mallocs - frees == heap_objects`; Σ `allocs-by-size` = `/gc/heap/allocs:objects` (and frees alike).
//!
//! goheap's own figures are under `/goheap/...`, never inside Go's namespace.

pub use crate::object::cpucache::Counter;

/// Per-size-class counts (Go's `MemStats.BySize`; tiny blocks count in the 16-byte class, as in Go).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BySize {
    /// Largest object size of the class.
    pub size: u32,
    /// Objects allocated from the class, cumulative.
    pub mallocs: u64,
    /// Objects freed, cumulative.
    pub frees: u64,
}

/// A snapshot of the allocator's state (Go's `runtime.MemStats`, the fields that apply, and a few of
/// goheap's own after them). See the module docs for the counting rules.
#[derive(Clone, Copy, Debug)]
pub struct MemStats {
    /// Same as `heap_alloc`.
    pub alloc: u64,
    /// Cumulative bytes allocated (objects' class sizes, tiny blocks, large objects).
    pub total_alloc: u64,
    /// Bytes obtained from the page source and still held, released heap pages included: the sum of the
    /// `*_sys` fields, `heap_sys + mspan_sys + mcache_sys + buck_hash_sys + other_sys` (Go's `Sys`).
    pub sys: u64,
    /// Cumulative heap objects allocated: small objects, tiny blocks and large objects, plus every tiny
    /// object (Go's rule: tiny objects count in both `mallocs` and `frees` at allocation).
    pub mallocs: u64,
    /// Cumulative heap objects freed: small objects, tiny blocks and large objects, plus every tiny object
    /// allocated. `mallocs - frees == heap_objects`.
    pub frees: u64,
    /// Bytes of live objects (class sizes; tiny blocks; large objects' page-rounded sizes).
    pub heap_alloc: u64,
    /// Bytes of heap pages obtained: `heap_inuse + heap_idle`.
    pub heap_sys: u64,
    /// Bytes in free pages (committed or released).
    pub heap_idle: u64,
    /// Bytes in pages of in-use spans.
    pub heap_inuse: u64,
    /// Bytes of free pages given back to the page source (decommitted), part of `heap_idle`.
    pub heap_released: u64,
    /// Live heap objects: small objects, large objects and live tiny blocks (`mallocs - frees`).
    pub heap_objects: u64,
    /// Bytes of span descriptors in use.
    pub mspan_inuse: u64,
    /// Bytes obtained for span descriptors.
    pub mspan_sys: u64,
    /// Bytes of per-CPU caches in use (caches that served at least once).
    pub mcache_inuse: u64,
    /// Bytes reserved for per-CPU caches (all of them, in the allocator's own storage).
    pub mcache_sys: u64,
    /// Other metadata bytes committed (page-allocator bitmaps and summaries, page map).
    pub other_sys: u64,
    /// Bytes committed for heap profiling (Go's `BuckHashSys`): the profile's bucket and record tables (the
    /// pages of live sampled objects in the profile's region count in `heap_inuse`, as heap objects).
    pub buck_hash_sys: u64,
    /// The soft memory limit (`usize::MAX` as u64: none), in `NextGC`'s place.
    pub memory_limit: u64,
    /// Tiny objects allocated (Go's `/gc/heap/tiny/allocs:objects`; also in `mallocs` and `frees`).
    pub tiny_allocs: u64,
    /// goheap: tiny objects freed by the program (Go cannot see these; not in `frees`).
    pub tiny_frees: u64,
    /// goheap: live tiny blocks (counted in `heap_objects`).
    pub tiny_blocks: u64,
    /// Large objects allocated (also counted in `mallocs`).
    pub large_allocs: u64,
    /// Large objects freed (also counted in `frees`).
    pub large_frees: u64,
    /// Objects freed into spans cached by another CPU than the freeing one.
    pub remote_frees: u64,
    /// Per size class counts; index = class (0 unused).
    pub by_size: [BySize; crate::object::sizeclass::NUM_SIZE_CLASSES],
    /// Efence mode (`DebugFlags::EFENCE`): bytes of heap pages of freed objects, decommitted and never handed
    /// out again (arena address space lost for good; not in `heap_sys`).
    pub efence_retired_bytes: u64,
}

impl MemStats {
    /// Live objects as the program counts them: `heap_objects` with each live tiny block replaced by the
    /// tiny objects in it (`tiny_allocs - tiny_frees`). goheap's figure (Go cannot know it); 0 after the
    /// program freed everything, whatever the CPUs' current tiny blocks.
    pub fn live_objects(&self) -> u64 {
        (self.heap_objects.saturating_sub(self.tiny_blocks))
            .saturating_add(self.tiny_allocs.saturating_sub(self.tiny_frees))
    }

    /// The `/gc/heap/allocs-by-size:bytes` histogram: objects allocated per size class, large objects in
    /// the last bucket (Go's layout, see [`SIZE_CLASS_BUCKETS`]).
    pub fn allocs_by_size(&self) -> SizeHistogram {
        let mut counts = [0; SIZE_HISTOGRAM_BUCKETS];
        for (c, b) in counts.iter_mut().zip(&self.by_size[1..]) {
            *c = b.mallocs;
        }
        counts[SIZE_HISTOGRAM_BUCKETS - 1] = self.large_allocs;
        SizeHistogram { counts }
    }

    /// The `/gc/heap/frees-by-size:bytes` histogram, as [`MemStats::allocs_by_size`].
    pub fn frees_by_size(&self) -> SizeHistogram {
        let mut counts = [0; SIZE_HISTOGRAM_BUCKETS];
        for (c, b) in counts.iter_mut().zip(&self.by_size[1..]) {
            *c = b.frees;
        }
        counts[SIZE_HISTOGRAM_BUCKETS - 1] = self.large_frees;
        SizeHistogram { counts }
    }
}

impl Default for MemStats {
    fn default() -> Self {
        MemStats {
            alloc: 0,
            total_alloc: 0,
            sys: 0,
            mallocs: 0,
            frees: 0,
            heap_alloc: 0,
            heap_sys: 0,
            heap_idle: 0,
            heap_inuse: 0,
            heap_released: 0,
            heap_objects: 0,
            mspan_inuse: 0,
            mspan_sys: 0,
            mcache_inuse: 0,
            mcache_sys: 0,
            other_sys: 0,
            buck_hash_sys: 0,
            memory_limit: 0,
            tiny_allocs: 0,
            tiny_frees: 0,
            tiny_blocks: 0,
            large_allocs: 0,
            large_frees: 0,
            remote_frees: 0,
            by_size: [BySize { size: 0, mallocs: 0, frees: 0 }; crate::object::sizeclass::NUM_SIZE_CLASSES],
            efence_retired_bytes: 0,
        }
    }
}

/// Buckets of the size histograms: one per size class, the last for large objects.
pub const SIZE_HISTOGRAM_BUCKETS: usize = crate::object::sizeclass::NUM_SIZE_CLASSES;

/// Bucket boundaries of `/gc/heap/allocs-by-size:bytes` and `frees-by-size:bytes`, as Go's
/// `sizeClassBuckets` (`runtime/metrics.go`): `[1, size(1) + 1, size(2) + 1, ..., 32769, +Inf]`. Bucket `i`
/// counts objects of sizes in `[boundary[i], boundary[i + 1])`: size class `i + 1` (Go shifts the classes'
/// inclusive upper bounds up by one to make them exclusive), and the last bucket large objects.
pub const SIZE_CLASS_BUCKETS: [f64; SIZE_HISTOGRAM_BUCKETS + 1] = {
    let classes = crate::object::sizeclass::CLASSES_CONST;
    let mut out = [0.0; SIZE_HISTOGRAM_BUCKETS + 1];
    out[0] = 1.0;
    let mut c = 1;
    while c < SIZE_HISTOGRAM_BUCKETS {
        out[c] = (classes[c].size + 1) as f64;
        c += 1;
    }
    out[SIZE_HISTOGRAM_BUCKETS] = f64::INFINITY;
    out
};

/// A size histogram (Go's `metrics.Float64Histogram` over [`SIZE_CLASS_BUCKETS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SizeHistogram {
    /// Objects per bucket.
    pub counts: [u64; SIZE_HISTOGRAM_BUCKETS],
}

impl SizeHistogram {
    /// The bucket boundaries ([`SIZE_CLASS_BUCKETS`]): `counts.len() + 1` of them.
    pub fn buckets(&self) -> &'static [f64] {
        &SIZE_CLASS_BUCKETS
    }

    /// Total count over all buckets.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// A metric's kind (Go's `metrics.ValueKind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueKind {
    /// An unknown name (Go's `KindBad`).
    Bad,
    /// `u64`.
    Uint64,
    /// `f64`.
    Float64,
    /// A histogram ([`SizeHistogram`]).
    Float64Histogram,
}

/// A metric's value (Go's `metrics.Value`).
// The histogram is held inline (about 550 bytes): the allocator cannot box it, and a sample array lives
// wherever the caller puts it.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Value {
    /// The name is unknown (Go's `KindBad`).
    Bad,
    /// A count or a byte figure.
    Uint64(u64),
    /// A floating-point figure (CPU seconds).
    Float64(f64),
    /// A histogram.
    Float64Histogram(SizeHistogram),
}

impl Value {
    /// Its kind.
    pub fn kind(&self) -> ValueKind {
        match self {
            Value::Bad => ValueKind::Bad,
            Value::Uint64(_) => ValueKind::Uint64,
            Value::Float64(_) => ValueKind::Float64,
            Value::Float64Histogram(_) => ValueKind::Float64Histogram,
        }
    }

    /// The value of a `Uint64` metric (`None` for other kinds; Go's `Value.Uint64` panics instead).
    pub fn uint64(&self) -> Option<u64> {
        match *self {
            Value::Uint64(v) => Some(v),
            _ => None,
        }
    }

    /// The value of a `Float64` metric.
    pub fn float64(&self) -> Option<f64> {
        match *self {
            Value::Float64(v) => Some(v),
            _ => None,
        }
    }

    /// The value of a histogram metric.
    pub fn histogram(&self) -> Option<&SizeHistogram> {
        match self {
            Value::Float64Histogram(h) => Some(h),
            _ => None,
        }
    }
}

/// A named sample, as Go's `runtime/metrics.Sample`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Metric name, e.g. `/memory/classes/heap/objects:bytes`.
    pub name: &'static str,
    /// Its value; [`Value::Bad`] when the name is unknown.
    pub value: Value,
}

impl Sample {
    /// A sample to be filled by `read_metrics`.
    pub const fn new(name: &'static str) -> Self {
        Sample { name, value: Value::Bad }
    }
}

/// A metric's description (Go's `metrics.Description`).
#[derive(Clone, Copy, Debug)]
pub struct Description {
    /// Name with unit, as in Go.
    pub name: &'static str,
    /// What it measures.
    pub description: &'static str,
    /// The kind of its value.
    pub kind: ValueKind,
    /// Monotonic counter (true) or gauge (false).
    pub cumulative: bool,
}

/// Shorthand for the table below.
const fn d(name: &'static str, description: &'static str, kind: ValueKind, cumulative: bool) -> Description {
    Description { name, description, kind, cumulative }
}
const U: ValueKind = ValueKind::Uint64;

/// The leaves of `/memory/classes/`: their sum is `/memory/classes/total:bytes` (Go's rule).
pub const MEMORY_CLASS_LEAVES: [&str; 10] = [
    "/memory/classes/heap/objects:bytes",
    "/memory/classes/heap/unused:bytes",
    "/memory/classes/heap/free:bytes",
    "/memory/classes/heap/released:bytes",
    "/memory/classes/metadata/mspan/inuse:bytes",
    "/memory/classes/metadata/mspan/free:bytes",
    "/memory/classes/metadata/mcache/inuse:bytes",
    "/memory/classes/metadata/mcache/free:bytes",
    "/memory/classes/metadata/other:bytes",
    "/memory/classes/profiling/buckets:bytes",
];

/// Every metric goheap reports (Go's `metrics.All()`): Go's names where goheap measures what Go's metric
/// measures, goheap's own under `/goheap/`.
pub const ALL_METRICS: &[Description] = &[
    d(
        "/memory/classes/total:bytes",
        "All memory obtained from the page source and still held, released pages included: the sum of the \
         /memory/classes/ leaves (MemStats.Sys).",
        U,
        false,
    ),
    d("/memory/classes/heap/objects:bytes", "Live objects, including tiny blocks (MemStats.HeapAlloc).", U, false),
    d("/memory/classes/heap/unused:bytes", "Bytes in in-use spans not occupied by live objects.", U, false),
    d(
        "/memory/classes/heap/free:bytes",
        "Free pages still committed: reusable without asking the page source (HeapIdle - HeapReleased).",
        U,
        false,
    ),
    d("/memory/classes/heap/released:bytes", "Free pages given back to the page source (HeapReleased).", U, false),
    d("/memory/classes/metadata/mspan/inuse:bytes", "Span descriptors in use.", U, false),
    d("/memory/classes/metadata/mspan/free:bytes", "Span descriptor memory obtained but unused.", U, false),
    d("/memory/classes/metadata/mcache/inuse:bytes", "Per-CPU caches that have served.", U, false),
    d("/memory/classes/metadata/mcache/free:bytes", "Per-CPU caches reserved but unused.", U, false),
    d("/memory/classes/metadata/other:bytes", "Page-allocator bitmaps, summaries and page map.", U, false),
    d(
        "/memory/classes/profiling/buckets:bytes",
        "Heap profiling: the bucket and record tables (BuckHashSys).",
        U,
        false,
    ),
    d("/gc/heap/allocs:bytes", "Cumulative bytes allocated (MemStats.TotalAlloc).", U, true),
    d(
        "/gc/heap/allocs:objects",
        "Cumulative heap objects allocated: small and large objects and tiny blocks, not tiny objects.",
        U,
        true,
    ),
    d(
        "/gc/heap/allocs-by-size:bytes",
        "Heap objects allocated, by size class (tiny blocks in the 16-byte class, large objects last).",
        ValueKind::Float64Histogram,
        true,
    ),
    d("/gc/heap/frees:bytes", "Cumulative bytes freed.", U, true),
    d(
        "/gc/heap/frees:objects",
        "Cumulative heap objects freed: small and large objects and tiny blocks, not tiny objects.",
        U,
        true,
    ),
    d(
        "/gc/heap/frees-by-size:bytes",
        "Heap objects freed, by size class (as allocs-by-size).",
        ValueKind::Float64Histogram,
        true,
    ),
    d("/gc/heap/objects:objects", "Live heap objects, tiny blocks counted one each (MemStats.HeapObjects).", U, false),
    d("/gc/heap/tiny/allocs:objects", "Cumulative tiny objects allocated (packed into 16-byte blocks).", U, true),
    d(
        "/gc/gomemlimit:bytes",
        "The soft memory limit (GOMEMLIMIT); 9223372036854775807 (math.MaxInt64, as Go) when none is set.",
        U,
        false,
    ),
    d(
        "/cpu/classes/scavenge/total:cpu-seconds",
        "CPU time the scavenger spent returning memory to the page source; 0 without a clock.",
        ValueKind::Float64,
        true,
    ),
    d("/goheap/scavenge/released:bytes", "Cumulative bytes the scavenger gave back to the page source.", U, true),
    d(
        "/goheap/scavenge/released-for-limit:bytes",
        "Of those, bytes released on the allocation path because the memory limit was exceeded.",
        U,
        true,
    ),
    d("/goheap/remote-frees:objects", "Cumulative objects freed into spans cached by another CPU.", U, true),
    d("/goheap/tiny/frees:objects", "Cumulative tiny objects freed by the program.", U, true),
    d(
        "/goheap/objects/live:objects",
        "Live objects as the program counts them: tiny objects one each (MemStats::live_objects).",
        U,
        false,
    ),
    d(
        "/goheap/efence/retired:bytes",
        "Efence mode: heap pages of freed objects, decommitted and never handed out again.",
        U,
        true,
    ),
];
