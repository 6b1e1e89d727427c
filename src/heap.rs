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
//!   `s.base <= addr(p) < s.base + s.npages * PAGE_SIZE`;
//! - `inuse_npages = Σ npages of InUse spans = #{p : map[p] != null}`;
//! - allocated pages in `pa` = `inuse_npages + cached_npages + scav_inflight_npages` (pages held free by
//!   page caches; pages the scavenger is decommitting without the lock);
//! - `committed_npages = grown_npages - pa.scav_npages - cache_scav_npages` (heap pages backed by memory);
//! - `scav ⊆ !alloc` in `pa` (allocated pages are committed; a cache carries its pages' scavenged bits);
//! - `needzero == false` only if every byte of the span is known to be zero (all its pages were committed
//!   fresh for it by a source with `commit_zeroes()`).
//!
//! # Locking
//! One heap lock, `inner: spin::Mutex<HeapInner>`, guards the page allocator, heap growth, the metadata
//! reservation, the span descriptor allocator and the scavenger state. The page map entries, the arena
//! bounds and all counters are atomics (`span_of` and `stats` take no lock). Page caches are per CPU and
//! need no lock (see `pagecache.rs`). Page-level span fields are written by the heap while the span is not
//! reachable through the page map (before publication, after removal), and by `resize_span_in_place` on
//! behalf of the span's owner. The source is called with the heap lock held (commit on the heap path and
//! for growth; decommit when scavenging on the allocation path) or without it (commit on the page-cache
//! path; decommit by the background scavenger and `release_all`, see `scavenger.rs`).
//!
//! # Adapted from Go
//! Go frees pages only from the GC sweeper; here spans are freed explicitly (`free_span`), so a free can go
//! straight into the freeing CPU's page cache. Go reserves 64 MiB heap arenas anywhere in the address space;
//! here one arena bounds the heap (a kernel gives goheap a fixed virtual window), which keeps the page map
//! flat (lookup = bounds check + one load).

use core::ptr::{addr_of_mut, NonNull};
use core::sync::atomic::{AtomicPtr, AtomicU8, AtomicUsize, Ordering};

use crate::fixalloc::FixAlloc;
use crate::pagealloc::{PageAlloc, PageAllocLayout, META_PARTS, PALLOC_CHUNK_BYTES, PALLOC_CHUNK_PAGES};
use crate::pagecache::{bit_mask, PageCache, PAGE_CACHE_MAX_NPAGES, SPAN_STASH_BATCH};
use crate::scavenger::ScavState;
use crate::source::PageSource;
use crate::span::{Span, SpanState};
use crate::{PAGE_SHIFT, PAGE_SIZE};

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
/// `reservation_bytes(m) = arena + PALLOC_CHUNK_BYTES + page_up(map + layout) + page_up(npages * size_of::<Span>()) + FIXALLOC_BLOCK_BYTES`
pub const fn reservation_bytes(max_heap_bytes: usize) -> usize {
    let chunks = max_heap_bytes.div_ceil(PALLOC_CHUNK_BYTES);
    let arena = chunks * PALLOC_CHUNK_BYTES;
    let map = page_align_up(chunks * PALLOC_CHUNK_PAGES * MAP_ENTRY_BYTES);
    let meta = page_align_up(map + PageAllocLayout::new(chunks).total_bytes);
    let spans = page_align_up(chunks * PALLOC_CHUNK_PAGES * core::mem::size_of::<Span>());
    arena + PALLOC_CHUNK_BYTES + meta + spans + crate::fixalloc::FIXALLOC_BLOCK_BYTES
}

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

/// A snapshot of the heap's accounting (read without the heap lock; fields may be mutually a little stale
/// while other CPUs allocate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapStats {
    /// Arena address space reserved.
    pub reserved_bytes: usize,
    /// Arena covered by the page allocator so far (`inuse + free + released`).
    pub grown_bytes: usize,
    /// Heap pages committed: `inuse_bytes + free_bytes`.
    pub committed_bytes: usize,
    /// Pages in `InUse` spans (Go's `HeapInuse`).
    pub inuse_bytes: usize,
    /// Committed pages not in use, including those held by page caches (Go's `HeapIdle - HeapReleased`).
    pub free_bytes: usize,
    /// Grown pages not committed (Go's `HeapReleased`).
    pub released_bytes: usize,
    /// Free pages held by page caches (committed or not).
    pub cached_bytes: usize,
    /// Live span descriptors, including those stashed in page caches (Go's `MSpanInuse`).
    pub span_inuse_bytes: usize,
    /// Memory taken from the source for span descriptors (Go's `MSpanSys`).
    pub span_sys_bytes: usize,
    /// Other metadata committed: page map, chunk bitmaps, summaries.
    pub metadata_bytes: usize,
    /// Metadata reservation (page map + page allocator), committed or not.
    pub metadata_reserved_bytes: usize,
    /// What the memory limit applies to: `committed_bytes + span_sys_bytes + metadata_bytes`.
    pub total_bytes: usize,
    /// Live spans.
    pub spans_inuse: usize,
    /// Highest `inuse_bytes` over the scavenger's recent window.
    pub peak_inuse_bytes: usize,
    /// The scavenger's current retained-heap goal.
    pub retained_goal_bytes: usize,
    /// Soft memory limit (`usize::MAX` = none).
    pub memory_limit: usize,
    /// Bytes released by the scavenger in total (background, allocation-triggered, `release_all`).
    pub scavenged_total_bytes: usize,
    /// Of those, released on the allocation path because the memory limit was exceeded.
    pub scavenged_alloc_bytes: usize,
    /// Scavenger cycles completed (one log line each).
    pub scav_cycles: usize,
}

/// The page-level fields of a span, for code outside the crate (tests, tools).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpanInfo {
    /// First byte.
    pub base: usize,
    /// Length in pages.
    pub npages: usize,
    /// Size class (0 = large object).
    pub class: u8,
    /// The memory may hold non-zero bytes.
    pub needzero: bool,
    /// `SpanState::InUse`.
    pub in_use: bool,
}

/// Reads a span's page-level fields.
///
/// # Safety
/// `s` is a live descriptor of a heap (not concurrently resized or freed).
pub unsafe fn span_info(s: NonNull<Span>) -> SpanInfo {
    let p = s.as_ptr();
    // SAFETY: the caller guarantees a live descriptor; page-level fields are stable while it is in use.
    unsafe {
        SpanInfo {
            base: (*p).base,
            npages: (*p).npages,
            class: (*p).class,
            needzero: (*p).needzero,
            in_use: (*p).state.load(Ordering::Acquire) == SpanState::InUse as u8,
        }
    }
}

/// The page heap (see the module docs). `Sync`; usable in a `static`.
pub struct Heap<S: PageSource> {
    pub(crate) source: S,
    pub(crate) max_heap_bytes: usize,
    /// The heap lock.
    pub(crate) inner: spin::Mutex<HeapInner>,
    // ---- Lock-free readable (written under the heap lock) ------------------------------------------------
    /// Arena base; set once at init, before `grown_bytes` becomes non-zero.
    pub(crate) arena_base: AtomicUsize,
    /// Page map base; set once at init, before `grown_bytes` becomes non-zero.
    pub(crate) map_base: AtomicPtr<AtomicPtr<Span>>,
    /// Arena bytes covered by the page allocator and a committed page map (Release after the map commit).
    pub(crate) grown_bytes: AtomicUsize,
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
    pub(crate) retained_goal_bytes: AtomicUsize,
    pub(crate) window_peak_npages: AtomicUsize,
    /// Pages the background scavenger holds allocated while it decommits them without the heap lock.
    pub(crate) scav_inflight_npages: AtomicUsize,
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
            inner: spin::Mutex::new(HeapInner {
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
            retained_goal_bytes: AtomicUsize::new(0),
            window_peak_npages: AtomicUsize::new(0),
            scav_inflight_npages: AtomicUsize::new(0),
            reserved_bytes: AtomicUsize::new(0),
            meta_reserved_bytes: AtomicUsize::new(0),
        }
    }

    /// The page source.
    pub fn source(&self) -> &S {
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

    // ---- Initialisation and growth (heap lock held) --------------------------------------------------------

    /// Takes the heap lock, initialising the heap if needed. `None` when the source cannot reserve.
    pub(crate) fn lock_ready(&self) -> Option<spin::MutexGuard<'_, HeapInner>> {
        let mut g = self.inner.lock();
        if g.state != InitState::Ready && !self.init_locked(&mut g) {
            return None;
        }
        Some(g)
    }

    fn init_locked(&self, inner: &mut HeapInner) -> bool {
        if inner.arena_base == 0 {
            let mut max_chunks = (self.max_heap_bytes / PALLOC_CHUNK_BYTES).max(1);
            loop {
                if let Some(p) = self.source.reserve(max_chunks * PALLOC_CHUNK_BYTES, PALLOC_CHUNK_BYTES) {
                    inner.arena_base = p.as_ptr() as usize;
                    inner.arena_bytes = max_chunks * PALLOC_CHUNK_BYTES;
                    break;
                }
                if max_chunks == 1 {
                    return false;
                }
                max_chunks /= 2;
            }
        }
        let max_chunks = inner.arena_bytes / PALLOC_CHUNK_BYTES;
        let layout = PageAllocLayout::new(max_chunks);
        let map_bytes = page_align_up(max_chunks * PALLOC_CHUNK_PAGES * MAP_ENTRY_BYTES);
        let meta_bytes = map_bytes + layout.total_bytes;
        let Some(meta) = self.source.reserve(meta_bytes, PAGE_SIZE) else {
            return false;
        };
        inner.meta_base = meta.as_ptr() as usize;
        inner.meta_bytes = meta_bytes;
        inner.map_bytes = map_bytes;
        // SAFETY: the metadata reservation is ours, sized by `layout`, page (so 8-byte) aligned; `grow_locked`
        // commits the parts before `PageAlloc::grow` uses them.
        unsafe { inner.pa.init(layout, (inner.meta_base + map_bytes) as *mut u8) };
        self.map_base.store(inner.meta_base as *mut AtomicPtr<Span>, Ordering::Relaxed);
        self.reserved_bytes.store(inner.arena_bytes, Ordering::Relaxed);
        self.meta_reserved_bytes.store(meta_bytes, Ordering::Relaxed);
        self.arena_base.store(inner.arena_base, Ordering::Release);
        inner.state = InitState::Ready;
        true
    }

    /// Grows the page allocator so that a run of `npages` fits at the end (Go's `mheap.grow`), or so that
    /// it covers at least `min_grown_npages` pages. Commits metadata only. `false` when the arena is full
    /// or the source refuses the metadata commit (the heap is unchanged apart from committed metadata).
    pub(crate) fn grow_locked(&self, inner: &mut HeapInner, npages: usize, min_grown_npages: usize) -> bool {
        let tail = inner.pa.free_tail_npages();
        let grown = inner.pa.grown_npages();
        let want = (grown + npages.saturating_sub(tail)).max(min_grown_npages);
        let Some(want_chunks) = want.checked_add(PALLOC_CHUNK_PAGES - 1).map(|w| w / PALLOC_CHUNK_PAGES) else {
            return false;
        };
        if want_chunks <= inner.pa.grown_chunks() {
            return true;
        }
        if want_chunks > inner.pa.layout().max_chunks {
            return false;
        }
        // Commit the page map and the page allocator parts for `want_chunks`.
        let layout = *inner.pa.layout();
        for k in 0..1 + META_PARTS {
            let (off, used) = if k == 0 {
                (0, want_chunks * PALLOC_CHUNK_PAGES * MAP_ENTRY_BYTES)
            } else {
                (inner.map_bytes + layout.part_off[k - 1], layout.part_used_bytes(k - 1, want_chunks))
            };
            let need = page_align_up(used);
            let have = inner.meta_committed[k];
            if need <= have {
                continue;
            }
            let addr = inner.meta_base + off + have;
            // SAFETY: `[addr, addr + need - have)` lies in the metadata reservation (within part `k`, whose
            // reserved size is at least `page_align_up` of its use for `max_chunks`) and is not committed.
            if !unsafe { self.source.commit(NonNull::new_unchecked(addr as *mut u8), need - have) } {
                return false;
            }
            if !self.source.commit_zeroes() {
                // SAFETY: just committed, ours, unused. The page map must read null.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, need - have) };
            }
            inner.meta_committed[k] = need;
            self.meta_committed_bytes.fetch_add(need - have, Ordering::Relaxed);
        }
        // SAFETY: `want_chunks <= max_chunks` and its metadata is committed (above).
        unsafe { inner.pa.grow(want_chunks) };
        self.grown_bytes.store(want_chunks * PALLOC_CHUNK_BYTES, Ordering::Release);
        true
    }

    /// Allocates `npages` pages aligned to `align` bytes in the page allocator, growing if needed. The
    /// pages are allocated but not yet committed.
    fn alloc_pages_locked(&self, inner: &mut HeapInner, npages: usize, align: usize) -> Option<usize> {
        let align_pages = (align / PAGE_SIZE).max(1);
        let extra = align_pages - 1;
        let total = npages.checked_add(extra)?;
        if total > inner.arena_bytes / PAGE_SIZE {
            return None;
        }
        let idx = match inner.pa.alloc(total) {
            Some(i) => i,
            None => {
                if !self.grow_locked(inner, total, 0) {
                    return None;
                }
                inner.pa.alloc(total)?
            }
        };
        if extra == 0 {
            return Some(idx);
        }
        let addr = inner.arena_base + idx * PAGE_SIZE;
        let aligned = (addr + align - 1) & !(align - 1);
        let head = (aligned - addr) / PAGE_SIZE;
        let tail = total - head - npages;
        if head != 0 {
            inner.pa.free_range(idx, head);
        }
        if tail != 0 {
            inner.pa.free_range(idx + head + npages, tail);
        }
        Some(idx + head)
    }

    /// Commits the scavenged pages of the allocated range `[idx, idx + n)`. On failure, releases free
    /// committed pages elsewhere and retries once. Returns `false` if some page is still uncommitted (those
    /// keep their scavenged bit; the committed ones are now committed and counted).
    pub(crate) fn commit_range_locked(&self, inner: &mut HeapInner, idx: usize, n: usize) -> bool {
        if inner.pa.count_scav(idx, n) == 0 {
            return true; // all committed already (word-level check; the common case on a warm heap)
        }
        for attempt in 0..2 {
            let base = inner.arena_base;
            let mut ok = true;
            let mut runs = [(0usize, 0usize); 8];
            // Collect a few runs at a time (the callback cannot mutate `pa`).
            loop {
                let mut nruns = 0;
                inner.pa.for_each_scav_run(idx, n, |i, k| {
                    runs[nruns] = (i, k);
                    nruns += 1;
                    nruns < runs.len()
                });
                if nruns == 0 {
                    break;
                }
                for &(i, k) in &runs[..nruns] {
                    // SAFETY: the run lies in the arena (grown pages), is allocated to us and not committed.
                    let committed = unsafe {
                        self.source.commit(NonNull::new_unchecked((base + i * PAGE_SIZE) as *mut u8), k * PAGE_SIZE)
                    };
                    if !committed {
                        ok = false;
                        break;
                    }
                    inner.pa.set_scav(i, k, false);
                    self.committed_npages.fetch_add(k, Ordering::Relaxed);
                }
                if !ok {
                    break;
                }
            }
            if ok {
                return true;
            }
            if attempt == 0 {
                // Out of memory in the source: give back free committed pages and try once more.
                let need = inner.pa.count_scav(idx, n) * PAGE_SIZE;
                if self.release_for_commit_locked(inner, need) < need {
                    return false;
                }
            }
        }
        false
    }

    /// Gives up to `need_bytes` of free committed pages back to the source so a failed commit can be
    /// retried. Returns bytes released.
    fn release_for_commit_locked(&self, inner: &mut HeapInner, need_bytes: usize) -> usize {
        let r = self.scavenge_locked(inner, need_bytes, crate::scavenger::ScavMode::Forced);
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
        r
    }

    /// A span descriptor from the fixed-size allocator (heap lock held).
    fn new_descriptor_locked(&self, inner: &mut HeapInner) -> Option<NonNull<Span>> {
        let p = inner.spans.alloc(&self.source)?;
        self.publish_span_stats(inner);
        Some(p.cast())
    }

    pub(crate) fn publish_span_stats(&self, inner: &HeapInner) {
        self.span_sys_bytes.store(inner.spans.sys_bytes(), Ordering::Relaxed);
        self.span_inuse_bytes.store(inner.spans.inuse_bytes(), Ordering::Relaxed);
    }

    /// Fills in the page-level fields, marks the span `InUse` and publishes it in the page map.
    fn publish_span(&self, s: NonNull<Span>, idx: usize, npages: usize, class: u8, needzero: bool) {
        let sp = s.as_ptr();
        let base = self.arena_base.load(Ordering::Relaxed) + idx * PAGE_SIZE;
        // SAFETY: the descriptor is ours (fresh from the allocator or stash) and not reachable by anyone
        // else until the page map stores below; writing through raw places forms no reference.
        unsafe {
            addr_of_mut!((*sp).base).write(base);
            addr_of_mut!((*sp).npages).write(npages);
            addr_of_mut!((*sp).class).write(class);
            addr_of_mut!((*sp).needzero).write(needzero);
            addr_of_mut!((*sp).next).write(core::ptr::null_mut());
            addr_of_mut!((*sp).prev).write(core::ptr::null_mut());
            addr_of_mut!((*sp).state).write(AtomicU8::new(SpanState::InUse as u8));
        }
        self.set_map(idx, npages, sp);
        let n = self.inuse_npages.fetch_add(npages, Ordering::Relaxed) + npages;
        self.epoch_peak_npages.fetch_max(n, Ordering::Relaxed);
        self.spans_inuse.fetch_add(1, Ordering::Relaxed);
    }

    /// Stores `s` (Release) in the page map entries of pages `[idx, idx + n)`.
    fn set_map(&self, idx: usize, n: usize, s: *mut Span) {
        let map = self.map_base.load(Ordering::Relaxed);
        for p in idx..idx + n {
            // SAFETY: `p` is a grown page, so its map entry is committed; entries are atomics.
            unsafe { (*map.add(p)).store(s, Ordering::Release) };
        }
    }

    /// `(page index of the span's first page, npages)`.
    fn span_idx(&self, s: NonNull<Span>) -> (usize, usize) {
        // SAFETY: the caller passes a live InUse span of this heap; page-level fields are stable.
        let (base, npages) = unsafe { ((*s.as_ptr()).base, (*s.as_ptr()).npages) };
        ((base - self.arena_base.load(Ordering::Relaxed)) >> PAGE_SHIFT, npages)
    }

    // ---- The API for the object level ------------------------------------------------------------------------

    /// A span of `npages` for size class `class` (0 = large object): page-level fields set, `InUse`,
    /// registered in the page map. Object-level fields are left as they are. Spans of fewer than 16 pages
    /// come from `pcache` when given (no heap lock in the common case). `None` when the source is out of
    /// memory or the arena is full; the heap stays consistent.
    pub fn alloc_span(&self, pcache: Option<&mut PageCache>, npages: usize, class: u8) -> Option<NonNull<Span>> {
        if npages == 0 {
            return None;
        }
        let r = match pcache {
            Some(pc) if npages < PAGE_CACHE_MAX_NPAGES => match self.alloc_from_cache(pc, npages, class) {
                Ok(s) => s,
                Err(()) => self.alloc_span_locked(Some(pc), npages, PAGE_SIZE, class),
            },
            pc => self.alloc_span_locked(pc, npages, PAGE_SIZE, class),
        };
        if r.is_some() {
            self.after_alloc();
        }
        r
    }

    /// A large-object span whose base is aligned to `align` bytes (a power of two; may exceed `PAGE_SIZE`,
    /// e.g. 2 MiB). Found by over-allocating `align / PAGE_SIZE - 1` extra pages and trimming them.
    pub fn alloc_span_aligned(&self, npages: usize, align: usize) -> Option<NonNull<Span>> {
        if npages == 0 || !align.is_power_of_two() {
            return None;
        }
        let r = self.alloc_span_locked(None, npages, align.max(PAGE_SIZE), 0);
        if r.is_some() {
            self.after_alloc();
        }
        r
    }

    /// The page-cache path: `Err` means "use the heap path" (cache cannot hold the run).
    fn alloc_from_cache(&self, pc: &mut PageCache, npages: usize, class: u8) -> Result<Option<NonNull<Span>>, ()> {
        if pc.is_empty() {
            let mut g = self.lock_ready().ok_or(())?;
            let inner = &mut *g;
            // The old block (fully handed out) stays allocated in `pa`; drop it and take a new one.
            pc.held = false;
            let taken = match inner.pa.alloc_to_cache() {
                Some(t) => Some(t),
                None if self.grow_locked(inner, 1, 0) => inner.pa.alloc_to_cache(),
                None => None,
            };
            let (base, free, scav) = taken.ok_or(())?;
            pc.base = base;
            pc.held = true;
            pc.cache = free;
            pc.scav = scav;
            self.cached_npages.fetch_add(free.count_ones() as usize, Ordering::Relaxed);
            self.cache_scav_npages.fetch_add(scav.count_ones() as usize, Ordering::Relaxed);
            self.refill_stash_locked(inner, pc);
        }
        let Some((idx, scav, mask)) = pc.take(npages) else {
            return Err(());
        };
        let nscav = scav.count_ones() as usize;
        self.cached_npages.fetch_sub(npages, Ordering::Relaxed);
        self.cache_scav_npages.fetch_sub(nscav, Ordering::Relaxed);
        // Commit the scavenged pages outside the heap lock.
        let mut left = scav;
        let mut retried = false;
        while left != 0 {
            let i = left.trailing_zeros() as usize;
            let k = (!(left >> i)).trailing_zeros() as usize;
            let addr = self.arena_base.load(Ordering::Relaxed) + (pc.base + i) * PAGE_SIZE;
            // SAFETY: the run is in a grown part of the arena, owned by this cache, and not committed.
            if unsafe { self.source.commit(NonNull::new_unchecked(addr as *mut u8), k * PAGE_SIZE) } {
                left &= !bit_mask(i, k);
                self.committed_npages.fetch_add(k, Ordering::Relaxed);
                continue;
            }
            let need = left.count_ones() as usize * PAGE_SIZE;
            if !retried {
                retried = true;
                if let Some(mut g) = self.lock_ready() {
                    if self.release_for_commit_locked(&mut g, need) >= need {
                        continue;
                    }
                }
            }
            // Give the pages back to the cache; the committed ones are now plain free committed pages.
            pc.put_back(mask, left);
            self.cached_npages.fetch_add(npages, Ordering::Relaxed);
            self.cache_scav_npages.fetch_add(left.count_ones() as usize, Ordering::Relaxed);
            return Ok(None);
        }
        let s = match pc.pop_span() {
            Some(s) => s,
            None => {
                let got = self.lock_ready().and_then(|mut g| {
                    self.refill_stash_locked(&mut g, pc);
                    drop(g);
                    pc.pop_span()
                });
                match got {
                    Some(s) => s,
                    None => {
                        pc.put_back(mask, 0);
                        self.cached_npages.fetch_add(npages, Ordering::Relaxed);
                        return Ok(None);
                    }
                }
            }
        };
        self.stashed_spans.fetch_sub(1, Ordering::Relaxed);
        let needzero = !(nscav == npages && self.source.commit_zeroes());
        self.publish_span(s, idx, npages, class, needzero);
        Ok(Some(s))
    }

    /// Moves up to `SPAN_STASH_BATCH` descriptors into the cache's stash.
    fn refill_stash_locked(&self, inner: &mut HeapInner, pc: &mut PageCache) {
        for _ in 0..SPAN_STASH_BATCH {
            if pc.nspans >= SPAN_STASH_BATCH {
                break;
            }
            let Some(p) = inner.spans.alloc(&self.source) else { break };
            pc.push_span(p.cast());
            self.stashed_spans.fetch_add(1, Ordering::Relaxed);
        }
        self.publish_span_stats(inner);
    }

    /// The heap path (heap lock held throughout).
    fn alloc_span_locked(
        &self,
        pc: Option<&mut PageCache>,
        npages: usize,
        align: usize,
        class: u8,
    ) -> Option<NonNull<Span>> {
        let mut g = self.lock_ready()?;
        let inner = &mut *g;
        let s = match pc.and_then(|pc| pc.pop_span()) {
            Some(s) => {
                self.stashed_spans.fetch_sub(1, Ordering::Relaxed);
                s
            }
            None => self.new_descriptor_locked(inner)?,
        };
        let Some(idx) = self.alloc_pages_locked(inner, npages, align) else {
            // SAFETY: `s` was just taken from this allocator (or a stash of it) and is unused.
            unsafe { inner.spans.free(s.cast()) };
            self.publish_span_stats(inner);
            return None;
        };
        let nscav = inner.pa.count_scav(idx, npages);
        if !self.commit_range_locked(inner, idx, npages) {
            inner.pa.free_range(idx, npages);
            // SAFETY: as above.
            unsafe { inner.spans.free(s.cast()) };
            self.publish_span_stats(inner);
            return None;
        }
        let needzero = !(nscav == npages && self.source.commit_zeroes());
        self.publish_span(s, idx, npages, class, needzero);
        drop(g);
        Some(s)
    }

    /// Frees a span: pages go back to `pcache` (if small and from its block) or to the page allocator.
    ///
    /// # Safety
    /// `span` came from this heap, is `InUse`, and nothing uses it or its memory any more.
    pub unsafe fn free_span(&self, pcache: Option<&mut PageCache>, span: NonNull<Span>) {
        let (idx, npages) = self.span_idx(span);
        self.set_map(idx, npages, core::ptr::null_mut());
        // SAFETY: the span is live (caller contract); `state` is an atomic field read lock-free elsewhere.
        unsafe { (*span.as_ptr()).state.store(SpanState::Dead as u8, Ordering::Release) };
        self.inuse_npages.fetch_sub(npages, Ordering::Relaxed);
        self.spans_inuse.fetch_sub(1, Ordering::Relaxed);
        if let Some(pc) = pcache {
            if npages < PAGE_CACHE_MAX_NPAGES && pc.owns(idx, npages) {
                pc.put_back(bit_mask(idx - pc.base, npages), 0);
                self.cached_npages.fetch_add(npages, Ordering::Relaxed);
                if pc.push_span(span) {
                    self.stashed_spans.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut g = self.inner.lock();
                // SAFETY: the descriptor is Dead and unreachable now.
                unsafe { g.spans.free(span.cast()) };
                self.publish_span_stats(&g);
                return;
            }
            let mut g = self.inner.lock();
            g.pa.free_range(idx, npages);
            if pc.push_span(span) {
                self.stashed_spans.fetch_add(1, Ordering::Relaxed);
            } else {
                // SAFETY: as above.
                unsafe { g.spans.free(span.cast()) };
                self.publish_span_stats(&g);
            }
            return;
        }
        let mut g = self.inner.lock();
        g.pa.free_range(idx, npages);
        // SAFETY: as above.
        unsafe { g.spans.free(span.cast()) };
        self.publish_span_stats(&g);
    }

    /// The `InUse` span containing `addr`, or `None` (outside the heap, or in free pages). Lock-free: a
    /// bounds check and one load.
    #[inline]
    pub fn span_of(&self, addr: usize) -> Option<NonNull<Span>> {
        let grown = self.grown_bytes.load(Ordering::Acquire);
        let off = addr.wrapping_sub(self.arena_base.load(Ordering::Relaxed));
        if off >= grown {
            return None;
        }
        let map = self.map_base.load(Ordering::Relaxed);
        // SAFETY: `off < grown_bytes`, whose page map entries were committed before `grown_bytes` was
        // published (Release/Acquire); the entry is an atomic.
        NonNull::new(unsafe { (*map.add(off >> PAGE_SHIFT)).load(Ordering::Acquire) })
    }

    /// Resizes a large object's span in place: grows into the following pages if they are free (growing the
    /// heap if the span ends at its end), or shrinks by freeing the tail. `true` on success.
    ///
    /// # Safety
    /// `span` came from this heap, is `InUse`, and the caller owns it (no concurrent free or resize); on
    /// shrink, nothing uses the dropped tail any more.
    pub unsafe fn resize_span_in_place(&self, span: NonNull<Span>, new_npages: usize) -> bool {
        let (idx, npages) = self.span_idx(span);
        if new_npages == npages {
            return true;
        }
        if new_npages == 0 {
            return false;
        }
        let sp = span.as_ptr();
        if new_npages < npages {
            let cut = npages - new_npages;
            self.set_map(idx + new_npages, cut, core::ptr::null_mut());
            // SAFETY: the caller owns the span; its page-level fields are ours to update (see Locking).
            unsafe { addr_of_mut!((*sp).npages).write(new_npages) };
            let mut g = self.inner.lock();
            g.pa.free_range(idx + new_npages, cut);
            self.inuse_npages.fetch_sub(cut, Ordering::Relaxed);
            return true;
        }
        let extra = new_npages - npages;
        let Some(mut g) = self.lock_ready() else { return false };
        let inner = &mut *g;
        let from = idx + npages;
        match from.checked_add(extra) {
            Some(end) if end <= inner.arena_bytes / PAGE_SIZE => {}
            _ => return false,
        }
        let grown = inner.pa.grown_npages();
        let in_grown = grown.saturating_sub(from).min(extra);
        if inner.pa.count_alloc(from, in_grown) != 0 {
            return false;
        }
        if from + extra > grown && !self.grow_locked(inner, 0, from + extra) {
            return false;
        }
        inner.pa.alloc_range(from, extra);
        let nscav = inner.pa.count_scav(from, extra);
        if !self.commit_range_locked(inner, from, extra) {
            inner.pa.free_range(from, extra);
            return false;
        }
        // SAFETY: as above.
        unsafe {
            addr_of_mut!((*sp).npages).write(new_npages);
            if nscav != extra || !self.source.commit_zeroes() {
                addr_of_mut!((*sp).needzero).write(true);
            }
        }
        drop(g);
        self.set_map(from, extra, sp);
        let n = self.inuse_npages.fetch_add(extra, Ordering::Relaxed) + extra;
        self.epoch_peak_npages.fetch_max(n, Ordering::Relaxed);
        self.after_alloc();
        true
    }

    /// A snapshot of the accounting (no lock; see [`HeapStats`]).
    pub fn stats(&self) -> HeapStats {
        let grown = self.grown_bytes.load(Ordering::Acquire);
        let committed = self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let inuse = self.inuse_npages.load(Ordering::Relaxed) * PAGE_SIZE;
        let span_sys = self.span_sys_bytes.load(Ordering::Relaxed);
        let meta = self.meta_committed_bytes.load(Ordering::Relaxed);
        HeapStats {
            reserved_bytes: self.reserved_bytes.load(Ordering::Relaxed),
            grown_bytes: grown,
            committed_bytes: committed,
            inuse_bytes: inuse,
            free_bytes: committed.saturating_sub(inuse),
            released_bytes: grown.saturating_sub(committed),
            cached_bytes: self.cached_npages.load(Ordering::Relaxed) * PAGE_SIZE,
            span_inuse_bytes: self.span_inuse_bytes.load(Ordering::Relaxed),
            span_sys_bytes: span_sys,
            metadata_bytes: meta,
            metadata_reserved_bytes: self.meta_reserved_bytes.load(Ordering::Relaxed),
            total_bytes: committed + span_sys + meta,
            spans_inuse: self.spans_inuse.load(Ordering::Relaxed),
            peak_inuse_bytes: self
                .window_peak_npages
                .load(Ordering::Relaxed)
                .max(self.epoch_peak_npages.load(Ordering::Relaxed))
                * PAGE_SIZE,
            retained_goal_bytes: self.retained_goal_bytes.load(Ordering::Relaxed),
            memory_limit: self.memory_limit.load(Ordering::Relaxed),
            scavenged_total_bytes: self.scav_released_bytes.load(Ordering::Relaxed),
            scavenged_alloc_bytes: self.scav_alloc_bytes.load(Ordering::Relaxed),
            scav_cycles: self.scav_cycles.load(Ordering::Relaxed),
        }
    }

    /// Total memory the limit applies to: heap committed + span descriptors + metadata.
    pub(crate) fn total_committed_bytes(&self) -> usize {
        self.committed_npages.load(Ordering::Relaxed) * PAGE_SIZE
            + self.span_sys_bytes.load(Ordering::Relaxed)
            + self.meta_committed_bytes.load(Ordering::Relaxed)
    }

    /// Whole-structure consistency walk (feature `validate`). Call it while no other CPU uses the heap.
    /// Panics with a description of the first violation.
    #[cfg(feature = "validate")]
    pub fn validate(&self) {
        let g = self.inner.lock();
        if g.state != InitState::Ready {
            assert_eq!(self.grown_bytes.load(Ordering::Relaxed), 0, "heap: grown before init");
            return;
        }
        g.pa.validate();
        g.spans.validate();
        let grown = g.pa.grown_npages();
        assert_eq!(self.grown_bytes.load(Ordering::Relaxed), grown * PAGE_SIZE, "heap: grown_bytes");
        let map = self.map_base.load(Ordering::Relaxed);
        let base = g.arena_base;
        let mut inuse = 0;
        let mut nspans = 0;
        let mut alloc_pages = 0;
        let mut p = 0;
        while p < grown {
            let c = g.pa.chunk(p / PALLOC_CHUNK_PAGES);
            let bit = p % PALLOC_CHUNK_PAGES;
            let allocated = c.alloc[bit / 64] & (1 << (bit % 64)) != 0;
            let scav = c.scav[bit / 64] & (1 << (bit % 64)) != 0;
            assert!(!(allocated && scav), "heap: page {p} ({:#x}) allocated but scavenged", base + p * PAGE_SIZE);
            alloc_pages += allocated as usize;
            // SAFETY: grown pages have committed map entries.
            let s = unsafe { (*map.add(p)).load(Ordering::Acquire) };
            if s.is_null() {
                p += 1;
                continue;
            }
            assert!(allocated, "heap: page {p} in span {s:p} is free in the page allocator");
            // SAFETY: a non-null entry points to a live descriptor (invariant being checked).
            let (sbase, snpages, state) = unsafe { ((*s).base, (*s).npages, (*s).state.load(Ordering::Relaxed)) };
            assert_eq!(state, SpanState::InUse as u8, "heap: page map entry {p} points to a non-InUse span {s:p}");
            assert_eq!(
                sbase,
                base + p * PAGE_SIZE,
                "heap: page {p} maps to span {s:p} based at {sbase:#x}, not at its start"
            );
            assert!(snpages >= 1 && p + snpages <= grown, "heap: span {s:p} npages {snpages} out of range");
            for q in p..p + snpages {
                // SAFETY: as above.
                let e = unsafe { (*map.add(q)).load(Ordering::Acquire) };
                assert_eq!(e, s, "heap: page {q} of span {s:p} maps to {e:p}");
                let c = g.pa.chunk(q / PALLOC_CHUNK_PAGES);
                let bit = q % PALLOC_CHUNK_PAGES;
                assert!(c.alloc[bit / 64] & (1 << (bit % 64)) != 0, "heap: page {q} of span {s:p} is free");
                assert!(c.scav[bit / 64] & (1 << (bit % 64)) == 0, "heap: page {q} of span {s:p} is scavenged");
            }
            alloc_pages += snpages - 1;
            inuse += snpages;
            nspans += 1;
            p += snpages;
        }
        assert_eq!(inuse, self.inuse_npages.load(Ordering::Relaxed), "heap: inuse_npages counter");
        assert_eq!(nspans, self.spans_inuse.load(Ordering::Relaxed), "heap: spans_inuse counter");
        let cached = self.cached_npages.load(Ordering::Relaxed);
        let inflight = self.scav_inflight_npages.load(Ordering::Relaxed);
        assert_eq!(inflight, 0, "heap: validate() while the scavenger is decommitting (call it when quiescent)");
        assert_eq!(
            alloc_pages,
            inuse + cached,
            "heap: allocated pages ({alloc_pages}) != pages in spans ({inuse}) + pages in page caches ({cached})"
        );
        let committed = self.committed_npages.load(Ordering::Relaxed);
        let cache_scav = self.cache_scav_npages.load(Ordering::Relaxed);
        assert_eq!(
            committed,
            grown - g.pa.scav_npages() - cache_scav,
            "heap: committed pages counter != grown - scavenged - scavenged in caches"
        );
        let meta: usize = g.meta_committed.iter().sum();
        assert_eq!(meta, self.meta_committed_bytes.load(Ordering::Relaxed), "heap: metadata counter");
        let live_desc = nspans + self.stashed_spans.load(Ordering::Relaxed);
        assert_eq!(
            g.spans.inuse_bytes(),
            live_desc * g.spans.size(),
            "heap: span descriptors in use != live spans + stashed descriptors"
        );
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::pagecache::PageCache;
    use crate::source::mmap::MmapSource;

    /// A heap in a `static`, with the default arena bound (64 GiB reserved, nothing committed up front).
    static HEAP: Heap<MmapSource> = Heap::new(MmapSource::new());

    #[test]
    fn static_heap_default_bound() {
        assert_eq!(HEAP.span_of(0x1000), None, "lookups before first use");
        let mut pc = PageCache::new();
        let s = HEAP.alloc_span(Some(&mut pc), 2, 5).unwrap();
        // SAFETY: live span of HEAP.
        let i = unsafe { span_info(s) };
        assert_eq!((i.npages, i.class, i.needzero, i.in_use), (2, 5, false, true));
        assert_eq!(HEAP.stats().reserved_bytes, DEFAULT_MAX_HEAP_BYTES);
        assert_eq!(HEAP.span_of(i.base + PAGE_SIZE + 17), Some(s));
        let big = HEAP.alloc_span_aligned(300, 2 << 20).unwrap();
        // SAFETY: live span of HEAP.
        assert_eq!(unsafe { span_info(big) }.base % (2 << 20), 0);
        // SAFETY: live spans, unused.
        unsafe {
            HEAP.free_span(Some(&mut pc), s);
            HEAP.free_span(None, big);
        }
        HEAP.flush_page_cache(&mut pc);
        assert_eq!(HEAP.stats().inuse_bytes, 0);
        assert!(HEAP.source().committed_bytes() > 0);
        HEAP.release_all();
        assert_eq!(HEAP.stats().committed_bytes, 0);
    }
}

/// Large zeroed allocations (issue 11): fresh zero pages instead of clearing dirty ones by hand.
impl<S: PageSource> Heap<S> {
    /// As [`Heap::alloc_span`] for a large object (class 0) that must read as zero, for a source whose
    /// committed memory reads as zero ([`PageSource::commit_zeroes`]): the committed pages of the run found
    /// are decommitted (marked scavenged) before the run is committed again, so the span comes back with
    /// `needzero == false` and the caller skips the clear. Above some size that beats clearing: the source
    /// drops the dirty pages at once (`MADV_DONTNEED` on a host) and the memory is zeroed page by page
    /// when first touched, if ever. `None` as for `alloc_span` (the heap stays consistent).
    pub fn alloc_span_fresh_zero(&self, npages: usize) -> Option<NonNull<Span>> {
        if npages == 0 || !self.source.commit_zeroes() {
            return None;
        }
        let mut g = self.lock_ready()?;
        let inner = &mut *g;
        let s = self.new_descriptor_locked(inner)?;
        let Some(idx) = self.alloc_pages_locked(inner, npages, PAGE_SIZE) else {
            // SAFETY: `s` was just taken from this allocator and is unused.
            unsafe { inner.spans.free(s.cast()) };
            self.publish_span_stats(inner);
            return None;
        };
        // Decommit every committed run of the range: the gaps between its scavenged runs.
        let (end, mut pos) = (idx + npages, idx);
        while pos < end {
            let mut next = None;
            inner.pa.for_each_scav_run(pos, end - pos, |i, k| {
                next = Some((i, k));
                false
            });
            let (gap_end, resume) = next.map_or((end, end), |(i, k)| (i, i + k));
            if gap_end > pos {
                let n = gap_end - pos;
                // SAFETY: the pages are grown, committed (not scavenged) and allocated to us; nothing uses them.
                unsafe {
                    self.source.decommit(
                        NonNull::new_unchecked((inner.arena_base + pos * PAGE_SIZE) as *mut u8),
                        n * PAGE_SIZE,
                    )
                };
                inner.pa.set_scav(pos, n, true);
                self.committed_npages.fetch_sub(n, Ordering::Relaxed);
            }
            pos = resume;
        }
        if !self.commit_range_locked(inner, idx, npages) {
            inner.pa.free_range(idx, npages);
            // SAFETY: as above.
            unsafe { inner.spans.free(s.cast()) };
            self.publish_span_stats(inner);
            return None;
        }
        self.publish_span(s, idx, npages, 0, false);
        drop(g);
        self.after_alloc();
        Some(s)
    }
}
