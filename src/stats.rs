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
//! Accounting choices (Go's, adapted): tiny objects count one each in `mallocs`/`frees`/`heap_objects`,
//! while `heap_alloc` counts the 16-byte blocks they occupy (a block is live until all its objects are
//! freed); objects waiting in a CPU's stock of freed objects are free (they count in `frees`), though their
//! span still holds them. The memory limit takes `NextGC`'s place (goheap has no GC goal).

pub use crate::object::cpucache::Counter;

/// Per-size-class counts (Go's `MemStats.BySize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BySize {
    /// Largest object size of the class.
    pub size: u32,
    /// Objects allocated from the class, cumulative.
    pub mallocs: u64,
    /// Objects freed, cumulative.
    pub frees: u64,
}

/// A snapshot of the allocator's state (Go's `runtime.MemStats`, the fields that apply).
#[derive(Clone, Copy, Debug)]
pub struct MemStats {
    /// Same as `heap_alloc`.
    pub alloc: u64,
    /// Cumulative bytes allocated (objects' class sizes, tiny blocks, large objects).
    pub total_alloc: u64,
    /// Bytes obtained from the page source and still held: heap, span descriptors, caches, other metadata.
    pub sys: u64,
    /// Cumulative objects allocated (tiny objects counted one each).
    pub mallocs: u64,
    /// Cumulative objects freed.
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
    /// Live objects: `mallocs - frees`.
    pub heap_objects: u64,
    /// Bytes of span descriptors in use / obtained.
    pub mspan_inuse: u64,
    /// Bytes of span descriptors obtained (committed for the span pool).
    pub mspan_sys: u64,
    /// Bytes of per-CPU caches in use (caches that served at least once) / obtained.
    pub mcache_inuse: u64,
    /// Bytes of per-CPU caches obtained.
    pub mcache_sys: u64,
    /// Other metadata bytes committed (page-allocator bitmaps and summaries, page map).
    pub other_sys: u64,
    /// The soft memory limit (`usize::MAX` as u64: none), in `NextGC`'s place.
    pub memory_limit: u64,
    /// Tiny objects allocated (also counted in `mallocs`).
    pub tiny_allocs: u64,
    /// Large objects allocated / freed (also counted in `mallocs`/`frees`).
    pub large_allocs: u64,
    /// Large objects freed (also counted in `frees`).
    pub large_frees: u64,
    /// Objects freed into spans cached by another CPU than the freeing one.
    pub remote_frees: u64,
    /// Per size class counts; index = class (0 unused).
    pub by_size: [BySize; crate::object::sizeclass::NUM_SIZE_CLASSES],
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
            memory_limit: 0,
            tiny_allocs: 0,
            large_allocs: 0,
            large_frees: 0,
            remote_frees: 0,
            by_size: [BySize { size: 0, mallocs: 0, frees: 0 }; crate::object::sizeclass::NUM_SIZE_CLASSES],
        }
    }
}

/// A named sample, as Go's `runtime/metrics.Sample`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Metric name, e.g. `/memory/classes/heap/objects:bytes`.
    pub name: &'static str,
    /// Its value; `None` when the name is unknown.
    pub value: Option<u64>,
}

impl Sample {
    /// A sample to be filled by `read_metrics`.
    pub const fn new(name: &'static str) -> Self {
        Sample { name, value: None }
    }
}

/// A metric's description (Go's `metrics.Description`).
#[derive(Clone, Copy, Debug)]
pub struct Description {
    /// Name with unit, as in Go.
    pub name: &'static str,
    /// What it measures.
    pub description: &'static str,
    /// Monotonic counter (true) or gauge (false).
    pub cumulative: bool,
}

/// Every metric goheap reports (Go's `metrics.All()`).
pub const ALL_METRICS: &[Description] = &[
    Description {
        name: "/memory/classes/total:bytes",
        description: "All memory obtained from the page source and still held (MemStats.Sys).",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/heap/objects:bytes",
        description: "Live objects, including tiny blocks (MemStats.HeapAlloc).",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/heap/unused:bytes",
        description: "Bytes in in-use spans not occupied by live objects.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/heap/free:bytes",
        description: "Free pages still committed: reusable without asking the page source.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/heap/released:bytes",
        description: "Free pages given back to the page source.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/metadata/mspan/inuse:bytes",
        description: "Span descriptors in use.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/metadata/mspan/free:bytes",
        description: "Span descriptor memory obtained but unused.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/metadata/mcache/inuse:bytes",
        description: "Per-CPU caches that have served.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/metadata/mcache/free:bytes",
        description: "Per-CPU caches reserved but unused.",
        cumulative: false,
    },
    Description {
        name: "/memory/classes/metadata/other:bytes",
        description: "Page-allocator bitmaps, summaries and page map.",
        cumulative: false,
    },
    Description {
        name: "/gc/heap/allocs:bytes",
        description: "Cumulative bytes allocated (MemStats.TotalAlloc).",
        cumulative: true,
    },
    Description {
        name: "/gc/heap/allocs:objects",
        description: "Cumulative objects allocated (MemStats.Mallocs).",
        cumulative: true,
    },
    Description { name: "/gc/heap/frees:bytes", description: "Cumulative bytes freed.", cumulative: true },
    Description {
        name: "/gc/heap/frees:objects",
        description: "Cumulative objects freed (MemStats.Frees).",
        cumulative: true,
    },
    Description {
        name: "/gc/heap/objects:objects",
        description: "Live objects (MemStats.HeapObjects).",
        cumulative: false,
    },
    Description {
        name: "/gc/heap/tiny/allocs:objects",
        description: "Cumulative tiny objects allocated.",
        cumulative: true,
    },
    Description { name: "/gc/gomemlimit:bytes", description: "The soft memory limit.", cumulative: false },
    Description {
        name: "/gc/scavenge/released:bytes",
        description: "Cumulative bytes the scavenger gave back to the page source.",
        cumulative: true,
    },
    Description {
        name: "/goheap/remote-frees:objects",
        description: "Cumulative objects freed into spans cached by another CPU.",
        cumulative: true,
    },
];
