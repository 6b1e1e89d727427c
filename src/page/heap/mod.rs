//! The page heap (Go's `mheap.go`): spans out of the page allocator, the page map, heap growth.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! # Role
//! [`Heap`] hands out spans — runs of pages with a descriptor — to the object level: for size classes
//! (`class > 0`) and for large objects (`class == 0`, any alignment). It owns:
//! - the **arena**: one range of `max_heap_bytes` (default [`DEFAULT_MAX_HEAP_BYTES`]) reserved from the
//!   [`PageSource`] on first use, aligned to the 4 MiB chunk; halved until the source accepts it;
//! - the **page allocator** ([`PageAlloc`]) over the arena, grown chunk by chunk on demand;
//! - the **page map**: one `AtomicPtr<Span>` per arena page, `map[(addr - arena_base) >> PAGE_SHIFT]`, read
//!   lock-free by [`Heap::span_of`] (Go's `spans` array in `heapArena`);
//! - **span descriptors** from a [`FixAlloc`] fed directly by the source;
//! - the **scavenger** state and memory limit (see `scavenger.rs`).
//!
//! Metadata (page map + page allocator bitmaps and summaries) lives in one reservation sized for the whole
//! arena and committed as prefixes as the heap grows; nothing is ever allocated from the heap itself.
//!
//! # Heap memory life cycle
//! Grown pages start free and *scavenged* (not committed): growing commits only metadata. Allocation
//! commits the scavenged pages of the chosen run (one `commit` per scavenged run) and clears their scavenged
//! bits; free pages stay committed until the scavenger decommits them. If a commit fails, the heap first
//! releases free committed pages elsewhere (they make room in a bounded source) and retries once; if that
//! does not help the allocation returns `None` with every page back where it was.
//!
//! # Invariants (equations; counters are atomics read lock-free by `stats`)
//! - `grown_bytes = pa.grown_chunks * PALLOC_CHUNK_BYTES <= reserved_bytes`; the page map is committed for
//!   every grown page, and `map[p] != null` ⇔ page `p` belongs to an `InUse` span `s` with
//!   `s.base <= addr(p) < s.base + s.npages * PAGE_SIZE` (when quiescent: a large span's entries are
//!   stored just before the section that counts it in use, and cleared just before the section that frees
//!   it, outside the guard; only its owner knows its address meanwhile, see `slice.rs`);
//! - `inuse_npages = Σ npages of InUse spans = #{p : map[p] != null}`;
//! - allocated pages in `pa` = `inuse_npages + cached_npages + scav_inflight_npages + pending_npages +
//!   retired_npages` (pages held free by page caches; pages the scavenger is decommitting without the lock;
//!   large runs being committed in slices, see `slice.rs`; efence's retired pages, see `retire.rs`);
//! - `committed_npages + retired_npages = grown_npages - pa.scav_npages - cache_scav_npages` (heap pages
//!   backed by memory);
//! - `scav ⊆ !alloc` in `pa` (allocated pages are committed; a cache carries its pages' scavenged bits);
//! - `needzero == false` only if every byte of the span is known to be zero (all its pages were committed
//!   fresh for it by a source with `commit_zeroes()`).
//!
//! # Locking
//! One heap lock, `inner: GuardedMutex<HeapInner>` (taken only with a [`Guarded`] token, i.e. inside the CPU
//! provider's guard: see `cpu.rs`), guards the page allocator, heap growth, the metadata
//! reservation, the span descriptor allocator and the scavenger state. The page map entries, the arena
//! bounds and all counters are atomics (`span_of` and `stats` take no lock). Page caches are per CPU and
//! need no lock (see `pagecache.rs`). Page-level span fields are written by the heap while the span is not
//! reachable through the page map (before publication, after removal), and by `resize_span_in_place` on
//! behalf of the span's owner. Every method that takes the heap lock or calls the source takes a
//! [`Guarded`] token. The source is called with the heap lock held (commit on the heap path and
//! for growth; decommit when scavenging on the allocation path) or without it (commit on the page-cache
//! path; decommit by the background scavenger and `release_all`, see `scavenger.rs`).
//!
//! # Interrupt latency: long operations in slices
//! The CPU provider's guard keeps interrupts off in a kernel, so no guarded section may be long. Operations
//! whose work grows with a size — committing a large run, decommitting free pages (background step,
//! `release_all`, growth and memory-limit scavenging) — work in slices of at most 8 (commit) or 16 (decommit) pages, each in a
//! guarded section of its own, with the guard dropped between them; what they work on is allocated in the
//! page allocator meanwhile, so no one else touches it (see `slice.rs`, which states the bound and how the
//! slice sizes follow from it).
//!
//! # Adapted from Go
//! Go frees pages only from the GC sweeper; here spans are freed explicitly (`free_span`), so a free can go
//! straight into the freeing CPU's page cache. Go reserves 64 MiB heap arenas anywhere in the address space;
//! here one arena bounds the heap (a kernel gives goheap a fixed virtual window), which keeps the page map
//! flat (lookup = bounds check + one load).

mod grow;
pub mod pagecache;
mod pagemap;
mod retire;
pub mod scavenger;
pub mod slice;
mod spans;
mod stats;

pub use stats::{span_info, HeapStats, SpanInfo};

use crate::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};

use crate::cpu::{Guarded, GuardedMutex};
use crate::page::fixalloc::FixAlloc;
use crate::page::pagealloc::{PageAlloc, PageAllocLayout, META_PARTS, PALLOC_CHUNK_BYTES, PALLOC_CHUNK_PAGES};
use crate::page::span::Span;
use crate::source::PageSource;
use crate::PAGE_SIZE;
use scavenger::ScavState;

/// Default bound on the arena: 64 GiB on 64-bit targets (reserved, not committed), 1 GiB otherwise.
#[cfg(target_pointer_width = "64")]
pub const DEFAULT_MAX_HEAP_BYTES: usize = 64 << 30;
/// Default bound on the arena: 64 GiB on 64-bit targets (reserved, not committed), 1 GiB otherwise.
#[cfg(not(target_pointer_width = "64"))]
pub const DEFAULT_MAX_HEAP_BYTES: usize = 1 << 30;

/// Address space a heap bounded by `max_heap_bytes` may reserve from its source over its whole life: the
/// arena (`max_heap_bytes` rounded up to whole chunks, reserved chunk-aligned, so one chunk of alignment
/// slack), the metadata reservation (page map and page-allocator bitmaps and summaries), and the span
/// descriptor blocks (at most one descriptor per arena page, plus one block). A kernel sizes the virtual
/// window of its page source with it:
///
/// `reservation_bytes(m) = arena + PALLOC_CHUNK_BYTES + page_up(map + layout) + page_up(npages * size_of::<Span>()) + FIXALLOC_BLOCK_BYTES + GUARDED_POOL_BYTES`
///
/// (the last term is the allocator's pool of sampled guarded allocations, reserved only once they are
/// turned on: see [`GUARDED_POOL_BYTES`]).
pub const fn reservation_bytes(max_heap_bytes: usize) -> usize {
    let chunks = max_heap_bytes.div_ceil(PALLOC_CHUNK_BYTES);
    let arena = chunks * PALLOC_CHUNK_BYTES;
    let map = page_align_up(chunks * PALLOC_CHUNK_PAGES * MAP_ENTRY_BYTES);
    let meta = page_align_up(map + PageAllocLayout::new(chunks).total_bytes);
    let spans = page_align_up(chunks * PALLOC_CHUNK_PAGES * core::mem::size_of::<Span>());
    arena + PALLOC_CHUNK_BYTES + meta + spans + crate::page::fixalloc::FIXALLOC_BLOCK_BYTES + GUARDED_POOL_BYTES
}

/// Address space of the allocator's pool of sampled guarded allocations (KFENCE / GWP-ASan style, see
/// `Malloc::set_guarded_sample_rate` and `malloc/guarded.rs`): 255 slots (KFENCE's default object count)
/// of one data page and one guard page, reserved from the source in one piece at the first guarded
/// allocation, apart from the arena. Counted in [`reservation_bytes`]; committed a page per live object.
pub const GUARDED_POOL_BYTES: usize = 255 * 2 * PAGE_SIZE;

/// Bytes of page map per arena page: one pointer.
const MAP_ENTRY_BYTES: usize = core::mem::size_of::<AtomicPtr<Span>>();

const fn page_align_up(n: usize) -> usize {
    (n + PAGE_SIZE - 1) & !(PAGE_SIZE - 1)
}

/// Initialisation state of a heap.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum InitState {
    /// Nothing reserved yet (or the metadata reservation failed: retried on next use).
    Uninit,
    /// Arena and metadata reserved.
    Ready,
}

/// Everything the heap lock guards.
pub(crate) struct HeapInner {
    pub(crate) state: InitState,
    /// Arena base and size (reserved); 0 before init.
    pub(crate) arena_base: usize,
    pub(crate) arena_bytes: usize,
    /// Metadata reservation: `[page map | page allocator parts]`.
    pub(crate) meta_base: usize,
    pub(crate) meta_bytes: usize,
    /// Page map bytes reserved (page aligned): `page_align_up(max_pages * MAP_ENTRY_BYTES)`.
    pub(crate) map_bytes: usize,
    /// Bytes committed of each metadata part: `[page map, chunk bitmaps, summary levels 0..3]`.
    pub(crate) meta_committed: [usize; 1 + META_PARTS],
    pub(crate) pa: PageAlloc,
    pub(crate) spans: FixAlloc,
    pub(crate) scav: ScavState,
}

// SAFETY: `HeapInner` holds raw pointers (inside `PageAlloc`, `FixAlloc`) to memory the heap owns; it is
// only reached through the heap lock, which serialises all access.
unsafe impl Send for HeapInner {}

/// The page heap (see the module docs). `Sync`; usable in a `static`.
pub struct Heap<S: PageSource> {
    pub(crate) source: S,
    pub(crate) max_heap_bytes: usize,
    /// The heap lock.
    pub(crate) inner: GuardedMutex<HeapInner>,
    // ---- Lock-free readable (written under the heap lock) ------------------------------------------------
    /// Arena base; set once at init, before `grown_bytes` becomes non-zero.
    pub(crate) arena_base: AtomicUsize,
    /// Page map base; set once at init, before `grown_bytes` becomes non-zero.
    pub(crate) map_base: AtomicPtr<AtomicPtr<Span>>,
    /// Arena bytes covered by the page allocator and a committed page map (Release after the map commit).
    pub(crate) grown_bytes: AtomicUsize,
    /// `grown_bytes >> 3`, stored with it (Release, after it): the small free's arena test compares a
    /// rotated offset with this (`Malloc::in_arena`), one shift fewer on the fast path. Invariant (when
    /// quiescent): `grown_words == grown_bytes >> 3`; a racing reader sees at most the older, smaller value.
    pub(crate) grown_words: AtomicUsize,
    // ---- Counters (atomics; see the invariants) -----------------------------------------------------------
    pub(crate) inuse_npages: AtomicUsize,
    pub(crate) spans_inuse: AtomicUsize,
    pub(crate) cached_npages: AtomicUsize,
    pub(crate) cache_scav_npages: AtomicUsize,
    pub(crate) committed_npages: AtomicUsize,
    pub(crate) meta_committed_bytes: AtomicUsize,
    pub(crate) span_sys_bytes: AtomicUsize,
    pub(crate) span_inuse_bytes: AtomicUsize,
    /// Descriptors in page-cache stashes (counted in `span_inuse_bytes`).
    pub(crate) stashed_spans: AtomicUsize,
    /// Highest `inuse_npages` in the scavenger's current epoch.
    pub(crate) epoch_peak_npages: AtomicUsize,
    pub(crate) memory_limit: AtomicUsize,
    pub(crate) scav_released_bytes: AtomicUsize,
    pub(crate) scav_alloc_bytes: AtomicUsize,
    pub(crate) scav_cycles: AtomicUsize,
    /// Nanoseconds the scavenger spent, 0 without a clock (read by `Heap::stats`).
    pub(crate) scavenge_cpu_nanos: crate::sync::atomic::AtomicU64,
    pub(crate) retained_goal_bytes: AtomicUsize,
    pub(crate) window_peak_npages: AtomicUsize,
    /// Pages the background scavenger holds allocated while it decommits them without the heap lock.
    pub(crate) scav_inflight_npages: AtomicUsize,
    /// Pages of large runs taken in the page allocator and being committed in slices, not yet published
    /// as a span (see `slice.rs`).
    pub(crate) pending_npages: AtomicUsize,
    /// Pages of retired spans (efence mode: allocated in `pa` forever, decommitted; see `retire.rs`).
    pub(crate) retired_npages: AtomicUsize,
    /// Pages handed out in spans since the heap was created (allocation volume: paces the scavenger's
    /// peak window and the memory limit's reclaim, see `scavenger.rs`).
    pub(crate) alloc_volume_npages: AtomicUsize,
    /// The scavenger's epoch number (mirrors `ScavState::epoch`, readable without the heap lock).
    pub(crate) scav_epoch: AtomicUsize,
    /// Scavenger counters and switches (chunks visited, `scavtrace`, growth work, the clock; see
    /// `scavenger.rs`).
    pub(crate) scav_ctr: scavenger::ScavCounters,
    /// Arena and metadata reservations (set once at init).
    pub(crate) reserved_bytes: AtomicUsize,
    pub(crate) meta_reserved_bytes: AtomicUsize,
}

impl<S: PageSource> Heap<S> {
    /// A heap over `source` with the default arena bound. Allocates nothing; reserves on first use.
    pub const fn new(source: S) -> Self {
        Self::with_max_bytes(source, DEFAULT_MAX_HEAP_BYTES)
    }

    /// A heap whose arena (reserved address range) is at most `max_heap_bytes` (rounded down to the 4 MiB
    /// chunk, at least one chunk). A kernel passes the size of its heap window.
    pub const fn with_max_bytes(source: S, max_heap_bytes: usize) -> Self {
        Self {
            source,
            max_heap_bytes,
            inner: GuardedMutex::new(HeapInner {
                state: InitState::Uninit,
                arena_base: 0,
                arena_bytes: 0,
                meta_base: 0,
                meta_bytes: 0,
                map_bytes: 0,
                meta_committed: [0; 1 + META_PARTS],
                pa: PageAlloc::empty(),
                spans: FixAlloc::new(core::mem::size_of::<Span>(), core::mem::align_of::<Span>()),
                scav: ScavState::new(),
            }),
            arena_base: AtomicUsize::new(0),
            map_base: AtomicPtr::new(core::ptr::null_mut()),
            grown_bytes: AtomicUsize::new(0),
            grown_words: AtomicUsize::new(0),
            inuse_npages: AtomicUsize::new(0),
            spans_inuse: AtomicUsize::new(0),
            cached_npages: AtomicUsize::new(0),
            cache_scav_npages: AtomicUsize::new(0),
            committed_npages: AtomicUsize::new(0),
            meta_committed_bytes: AtomicUsize::new(0),
            span_sys_bytes: AtomicUsize::new(0),
            span_inuse_bytes: AtomicUsize::new(0),
            stashed_spans: AtomicUsize::new(0),
            epoch_peak_npages: AtomicUsize::new(0),
            memory_limit: AtomicUsize::new(usize::MAX),
            scav_released_bytes: AtomicUsize::new(0),
            scav_alloc_bytes: AtomicUsize::new(0),
            scav_cycles: AtomicUsize::new(0),
            scavenge_cpu_nanos: crate::sync::atomic::AtomicU64::new(0),
            retained_goal_bytes: AtomicUsize::new(0),
            window_peak_npages: AtomicUsize::new(0),
            scav_inflight_npages: AtomicUsize::new(0),
            pending_npages: AtomicUsize::new(0),
            retired_npages: AtomicUsize::new(0),
            alloc_volume_npages: AtomicUsize::new(0),
            scav_epoch: AtomicUsize::new(0),
            scav_ctr: scavenger::ScavCounters::new(),
            reserved_bytes: AtomicUsize::new(0),
            meta_reserved_bytes: AtomicUsize::new(0),
        }
    }

    /// The page source, for its own statistics. goheap itself calls it only through `Heap::src` (crate-private) or with
    /// the heap lock held (both need a [`Guarded`] token).
    pub fn source(&self) -> &S {
        &self.source
    }

    /// The page source for a call (`commit`, `decommit`): only inside the CPU provider's guard.
    #[inline]
    pub(crate) fn src(&self, _guarded: Guarded<'_>) -> &S {
        &self.source
    }

    /// Arena base address (0 before first use).
    pub fn arena_base(&self) -> usize {
        self.arena_base.load(Ordering::Acquire)
    }

    /// Arena bytes reserved (0 before first use).
    pub fn arena_bytes(&self) -> usize {
        self.reserved_bytes.load(Ordering::Relaxed)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::pagecache::PageCache;
    use super::*;
    use crate::source::mmap::MmapSource;

    /// A heap in a `static`, with the default arena bound (64 GiB reserved, nothing committed up front).
    static HEAP: Heap<MmapSource> = Heap::new(MmapSource::new());

    #[test]
    fn static_heap_default_bound() {
        // SAFETY: a test thread; no signal handler calls goheap.
        let g = unsafe { Guarded::new_unchecked() };
        assert_eq!(HEAP.span_of(0x1000), None, "lookups before first use");
        let mut pc = PageCache::new();
        let s = HEAP.alloc_span(g, Some(&mut pc), 2, 5).unwrap();
        // SAFETY: live span of HEAP.
        let i = unsafe { span_info(s) };
        assert_eq!((i.npages, i.class, i.needzero, i.in_use), (2, 5, false, true));
        assert_eq!(HEAP.stats().reserved_bytes, DEFAULT_MAX_HEAP_BYTES);
        assert_eq!(HEAP.span_of(i.base + PAGE_SIZE + 17), Some(s));
        let big = HEAP.alloc_span_aligned(g, 300, 2 << 20).unwrap();
        // SAFETY: live span of HEAP.
        assert_eq!(unsafe { span_info(big) }.base % (2 << 20), 0);
        // SAFETY: live spans, unused.
        unsafe {
            HEAP.free_span(g, Some(&mut pc), s);
            HEAP.free_span(g, None, big);
        }
        HEAP.flush_page_cache(g, &mut pc);
        assert_eq!(HEAP.stats().inuse_bytes, 0);
        assert!(HEAP.source().committed_bytes() > 0);
        HEAP.release_all(g);
        assert_eq!(HEAP.stats().committed_bytes, 0);
    }
}
