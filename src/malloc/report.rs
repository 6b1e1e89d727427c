//! Reports: per-CPU figures, Go's `MemStats` and `runtime/metrics` samples, and the consistency walk.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.

use super::*;
use crate::page::heap::HeapStats;
use crate::stats::Value;

/// Per-CPU figures for reports (see [`Malloc::cpu_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSummary {
    /// Objects allocated through this cache (small, tiny objects and large).
    pub mallocs: u64,
    /// Objects freed through this cache.
    pub frees: u64,
    /// Objects this CPU freed into spans cached by another CPU.
    pub remote_frees: u64,
    /// Spans taken from the central lists.
    pub refills: u64,
    /// Spans this CPU had used up, held, and took back once other CPUs had freed into them (no central
    /// list involved; see [`Malloc::held_spans`]).
    pub held_reuses: u64,
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Per-CPU figures of cache index `index` (`MAX_CPUS` for the shared cache).
    pub fn cpu_stats(&self, index: usize) -> CpuSummary {
        let stats = self.stats_of(index);
        let mut s = CpuSummary::default();
        for c in 1..NUM_ALLOC_CLASSES {
            if c != TINY_CLASS {
                s.mallocs += stats.nmalloc[c].get();
                s.frees += stats.nfree[c].get();
            }
        }
        s.mallocs += stats.tiny_nmalloc.get() + stats.large_nmalloc.get();
        s.frees += stats.tiny_nfree.get() + stats.large_nfree.get();
        s.remote_frees = stats.remote_frees.get();
        s.refills = stats.refills.get();
        s.held_reuses = stats.held_reuses.get();
        s
    }

    /// The counters of cache `index` (`MAX_CPUS`: the shared cache).
    pub(super) fn stats_of(&self, index: usize) -> &crate::object::cpucache::CpuStats {
        let slot = if index == MAX_CPUS { &self.shared } else { &self.caches[index] };
        &slot.shared.stats
    }

    /// A [`MemStats`] snapshot, read without stopping other CPUs (see `stats.rs` for its consistency and
    /// Go's counting rules, which it follows).
    pub fn mem_stats(&self) -> MemStats {
        let mut m = MemStats::default();
        let mut nmalloc = [0u64; NUM_ALLOC_CLASSES];
        let mut nfree = [0u64; NUM_ALLOC_CLASSES];
        let mut large_bytes_alloc = 0u64;
        let mut large_bytes_free = 0u64;
        let mut used_caches = 0u64;
        for st in (0..=MAX_CPUS).map(|i| self.stats_of(i)) {
            for c in 1..NUM_ALLOC_CLASSES {
                nmalloc[c] += st.nmalloc[c].get();
                nfree[c] += st.nfree[c].get();
            }
            m.tiny_allocs += st.tiny_nmalloc.get();
            m.tiny_frees += st.tiny_nfree.get();
            m.large_allocs += st.large_nmalloc.get();
            m.large_frees += st.large_nfree.get();
            large_bytes_alloc += st.large_bytes_alloc.get();
            large_bytes_free += st.large_bytes_free.get();
            m.remote_frees += st.remote_frees.get();
            used_caches += st.used.get();
        }
        for c in 1..NUM_ALLOC_CLASSES {
            let size = class_shape(c).elemsize as u64;
            m.total_alloc += nmalloc[c] * size;
            m.heap_alloc += nmalloc[c].saturating_sub(nfree[c]) * size;
            m.mallocs += nmalloc[c];
            m.frees += nfree[c];
            // Go counts tiny blocks as objects of the 16-byte class.
            let row = if c == TINY_CLASS { sizeclass::class_of(TINY_SIZE) } else { c };
            debug_assert!(row < NUM_SIZE_CLASSES);
            let b = m.by_size[row];
            m.by_size[row] =
                BySize { size: class_shape(row).elemsize, mallocs: b.mallocs + nmalloc[c], frees: b.frees + nfree[c] };
        }
        m.tiny_blocks = nmalloc[TINY_CLASS].saturating_sub(nfree[TINY_CLASS]);
        // Go's rule (runtime/mstats.go): tiny objects count in both Mallocs and Frees.
        m.mallocs += m.large_allocs + m.tiny_allocs;
        m.frees += m.large_frees + m.tiny_allocs;
        m.total_alloc += large_bytes_alloc;
        m.heap_alloc += large_bytes_alloc.saturating_sub(large_bytes_free);
        m.alloc = m.heap_alloc;
        m.heap_objects = m.mallocs.saturating_sub(m.frees);

        let h = self.t.heap.stats();
        // Sampled objects in the profile's region are heap objects (counted in their class above): their
        // pages count as in use; the profile's tables are `buck_hash_sys`.
        let region_bytes = self.profile_region_bytes();
        m.heap_inuse = (h.inuse_bytes + region_bytes) as u64;
        m.heap_idle = (h.free_bytes + h.released_bytes) as u64;
        m.heap_released = h.released_bytes as u64;
        m.heap_sys = m.heap_inuse + m.heap_idle;
        m.mspan_inuse = h.span_inuse_bytes as u64;
        m.mspan_sys = h.span_sys_bytes as u64;
        let cache_bytes = core::mem::size_of::<CpuCache>() as u64;
        m.mcache_sys = cache_bytes * (MAX_CPUS as u64 + 1);
        m.mcache_inuse = cache_bytes * used_caches;
        m.other_sys = h.metadata_bytes as u64;
        // Go's Sys: the sum of the *Sys fields, released heap memory included.
        m.buck_hash_sys = self.profile_sys_bytes().saturating_sub(region_bytes) as u64;
        m.sys = m.heap_sys + m.mspan_sys + m.mcache_sys + m.buck_hash_sys + m.other_sys;
        m.memory_limit = self.t.heap.memory_limit() as u64;
        m.efence_retired_bytes = h.retired_bytes as u64;
        m
    }

    /// Fills `samples` by name, as Go's `metrics.Read` (see [`crate::stats::ALL_METRICS`]); unknown names get
    /// [`Value::Bad`].
    pub fn read_metrics(&self, samples: &mut [Sample]) {
        let m = self.mem_stats();
        let h = self.t.heap.stats();
        for s in samples.iter_mut() {
            s.value = metric_value(s.name, &m, &h);
        }
    }

    /// Whole-allocator consistency walk (feature `validate`): the page heap, every central list.
    #[cfg(feature = "validate")]
    pub fn validate(&self) {
        self.with_guard(|g| {
            self.t.heap.validate(g);
            for central in self.t.centrals.iter().skip(1) {
                central.validate(g);
            }
        });
    }
}

/// The value of metric `name` from a [`MemStats`] snapshot and the heap's (the scavenger's totals),
/// [`Value::Bad`] for an unknown name. The snapshot's counters are read one by one while other CPUs run, so
/// two of them may disagree (a span counted in use before the descriptor total that includes it is
/// published): every difference saturates at 0 rather than underflow.
fn metric_value(name: &str, m: &MemStats, h: &HeapStats) -> Value {
    Value::Uint64(match name {
        "/memory/classes/total:bytes" => m.sys,
        "/memory/classes/heap/objects:bytes" => m.heap_alloc,
        "/memory/classes/heap/unused:bytes" => m.heap_inuse.saturating_sub(m.heap_alloc),
        "/memory/classes/heap/free:bytes" => m.heap_idle.saturating_sub(m.heap_released),
        "/memory/classes/heap/released:bytes" => m.heap_released,
        "/memory/classes/metadata/mspan/inuse:bytes" => m.mspan_inuse,
        "/memory/classes/metadata/mspan/free:bytes" => m.mspan_sys.saturating_sub(m.mspan_inuse),
        "/memory/classes/metadata/mcache/inuse:bytes" => m.mcache_inuse,
        "/memory/classes/metadata/mcache/free:bytes" => m.mcache_sys.saturating_sub(m.mcache_inuse),
        "/memory/classes/metadata/other:bytes" => m.other_sys,
        "/memory/classes/profiling/buckets:bytes" => m.buck_hash_sys,
        "/gc/heap/allocs:bytes" => m.total_alloc,
        "/gc/heap/allocs:objects" => m.mallocs.saturating_sub(m.tiny_allocs),
        "/gc/heap/allocs-by-size:bytes" => return Value::Float64Histogram(m.allocs_by_size()),
        "/gc/heap/frees:bytes" => m.total_alloc.saturating_sub(m.heap_alloc),
        "/gc/heap/frees:objects" => m.frees.saturating_sub(m.tiny_allocs),
        "/gc/heap/frees-by-size:bytes" => return Value::Float64Histogram(m.frees_by_size()),
        "/gc/heap/objects:objects" => m.heap_objects,
        "/gc/heap/tiny/allocs:objects" => m.tiny_allocs,
        // Go reports math.MaxInt64 when no limit is set.
        "/gc/gomemlimit:bytes" => m.memory_limit.min(i64::MAX as u64),
        "/cpu/classes/scavenge/total:cpu-seconds" => {
            return Value::Float64(h.scavenge_cpu_nanos as f64 / 1e9);
        }
        "/goheap/scavenge/released:bytes" => h.scavenged_total_bytes as u64,
        "/goheap/scavenge/released-for-limit:bytes" => h.scavenged_alloc_bytes as u64,
        "/goheap/remote-frees:objects" => m.remote_frees,
        "/goheap/tiny/frees:objects" => m.tiny_frees,
        "/goheap/objects/live:objects" => m.live_objects(),
        "/goheap/efence/retired:bytes" => m.efence_retired_bytes,
        _ => return Value::Bad,
    })
}

/// Prints the allocator's [`MemStats`] (read without stopping other CPUs), its debug knobs and its heap.
impl<S: PageSource, P: CpuProvider> core::fmt::Debug for Malloc<S, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Malloc")
            .field("debug", &self.debug_flags())
            .field("mem_stats", &self.mem_stats())
            .field("heap", &self.t.heap)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters read at different moments may disagree: each metric that is a difference stays at 0 instead
    /// of underflowing (a panic in debug builds, a huge value in release).
    #[test]
    fn metrics_do_not_underflow_on_inconsistent_snapshots() {
        let m = MemStats {
            heap_inuse: 1,
            heap_alloc: 2,
            heap_idle: 3,
            heap_released: 4,
            mspan_inuse: 5,
            mspan_sys: 4,
            mcache_inuse: 7,
            mcache_sys: 6,
            total_alloc: 1,
            mallocs: 1,
            frees: 1,
            tiny_allocs: 2,
            tiny_frees: 3,
            heap_objects: 1,
            tiny_blocks: 2,
            ..MemStats::default()
        };
        let h = HeapStats::default();
        for name in [
            "/memory/classes/heap/unused:bytes",
            "/memory/classes/heap/free:bytes",
            "/memory/classes/metadata/mspan/free:bytes",
            "/memory/classes/metadata/mcache/free:bytes",
            "/gc/heap/frees:bytes",
            "/gc/heap/allocs:objects",
            "/gc/heap/frees:objects",
            "/goheap/objects/live:objects",
        ] {
            assert_eq!(metric_value(name, &m, &h), Value::Uint64(0), "{name}");
        }
        assert_eq!(metric_value("/memory/classes/metadata/mspan/inuse:bytes", &m, &h), Value::Uint64(5));
        assert_eq!(metric_value("/no/such:metric", &m, &h), Value::Bad);
    }

    /// The scavenger's CPU time is reported in seconds, Go's unit, from the heap's nanosecond counter; the
    /// limit as math.MaxInt64 when none is set; goheap's own figures from the heap's totals.
    #[test]
    fn metric_units_and_sources() {
        let h = HeapStats {
            scavenge_cpu_nanos: 1_500_000_000,
            scavenged_total_bytes: 7 << 20,
            scavenged_alloc_bytes: 3 << 20,
            ..HeapStats::default()
        };
        let m = MemStats { memory_limit: usize::MAX as u64, ..MemStats::default() };
        assert_eq!(metric_value("/cpu/classes/scavenge/total:cpu-seconds", &m, &h), Value::Float64(1.5));
        assert_eq!(metric_value("/gc/gomemlimit:bytes", &m, &h), Value::Uint64(i64::MAX as u64));
        let m = MemStats { memory_limit: 512 << 20, ..m };
        assert_eq!(metric_value("/gc/gomemlimit:bytes", &m, &h), Value::Uint64(512 << 20));
        assert_eq!(metric_value("/goheap/scavenge/released:bytes", &m, &h), Value::Uint64(7 << 20));
        assert_eq!(metric_value("/goheap/scavenge/released-for-limit:bytes", &m, &h), Value::Uint64(3 << 20));
        // Every listed metric has a value of its listed kind, and the made-up name inside Go's namespace is gone.
        for d in crate::stats::ALL_METRICS {
            assert_eq!(metric_value(d.name, &m, &h).kind(), d.kind, "{}", d.name);
        }
        assert_eq!(metric_value("/gc/scavenge/released:bytes", &m, &h), Value::Bad);
    }
}
