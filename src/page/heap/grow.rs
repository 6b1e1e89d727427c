//! The page heap's growth: reserving the arena and metadata, growing the page allocator chunk by chunk,
//! committing the pages of a chosen run (releasing free committed pages first when a commit fails), and span
//! descriptors. Everything here runs with the heap lock held (`&mut HeapInner`).
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.

use crate::sync::atomic::{AtomicPtr, Ordering};
use core::ptr::NonNull;

use crate::cpu::Guarded;

use super::{page_align_up, Heap, HeapInner, InitState, MAP_ENTRY_BYTES};
use crate::page::pagealloc::{PageAllocLayout, META_PARTS, PALLOC_CHUNK_BYTES, PALLOC_CHUNK_PAGES};
use crate::page::span::Span;
use crate::source::PageSource;
use crate::PAGE_SIZE;

impl<S: PageSource> Heap<S> {
    // ---- Initialisation and growth (heap lock held) --------------------------------------------------------

    /// Takes the heap lock, initialising the heap if needed. `None` when the source cannot reserve.
    #[must_use]
    pub(crate) fn lock_ready<'a>(&'a self, guarded: Guarded<'a>) -> Option<crate::sync::SpinMutexGuard<'a, HeapInner>> {
        let mut g = self.inner.lock(guarded);
        if g.state != InitState::Ready && !self.init_locked(&mut g) {
            return None;
        }
        Some(g)
    }

    pub(super) fn init_locked(&self, inner: &mut HeapInner) -> bool {
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
    #[must_use]
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
        self.grown_words.store((want_chunks * PALLOC_CHUNK_BYTES) >> 3, Ordering::Release);
        true
    }

    /// Allocates `npages` pages aligned to `align` bytes in the page allocator, growing if needed. The
    /// pages are allocated but not yet committed.
    pub(super) fn alloc_pages_locked(&self, inner: &mut HeapInner, npages: usize, align: usize) -> Option<usize> {
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
                let idx = inner.pa.alloc(total)?;
                // Go scavenges when the heap grows past its goal (see `scavenger.rs`).
                self.note_growth_locked(inner, idx, total);
                idx
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
    #[must_use]
    pub(crate) fn commit_range_locked(&self, inner: &mut HeapInner, idx: usize, n: usize) -> bool {
        self.commit_range_attempts_locked(inner, idx, n, 2)
    }

    /// [`Heap::commit_range_locked`] without the release and retry: a caller that works in slices releases
    /// in a section of its own (a release and a commit together would take twice a slice's time) and then
    /// calls this again.
    #[must_use]
    pub(crate) fn commit_range_once_locked(&self, inner: &mut HeapInner, idx: usize, n: usize) -> bool {
        self.commit_range_attempts_locked(inner, idx, n, 1)
    }

    fn commit_range_attempts_locked(&self, inner: &mut HeapInner, idx: usize, n: usize, attempts: usize) -> bool {
        if inner.pa.count_scav(idx, n) == 0 {
            return true; // all committed already (word-level check; the common case on a warm heap)
        }
        for attempt in 0..attempts {
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
            if attempt + 1 < attempts {
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
    pub(crate) fn release_for_commit_locked(&self, inner: &mut HeapInner, need_bytes: usize) -> usize {
        let r = self.scavenge_locked(inner, need_bytes, super::scavenger::ScavMode::Forced);
        self.scav_alloc_bytes.fetch_add(r, Ordering::Relaxed);
        r
    }

    /// A span descriptor from the fixed-size allocator (heap lock held).
    pub(super) fn new_descriptor_locked(&self, inner: &mut HeapInner) -> Option<NonNull<Span>> {
        let p = inner.spans.alloc(&self.source)?;
        self.publish_span_stats(inner);
        Some(p.cast())
    }

    /// [`Heap::alloc_pages_locked`] for the unused descriptor `s`, which goes back to the span allocator if
    /// no pages are found (heap lock held).
    ///
    /// # Safety
    /// As for [`Heap::drop_unpublished_locked`].
    pub(super) unsafe fn alloc_pages_for_locked(
        &self,
        inner: &mut HeapInner,
        s: NonNull<Span>,
        npages: usize,
        align: usize,
    ) -> Option<usize> {
        let idx = self.alloc_pages_locked(inner, npages, align);
        if idx.is_none() {
            // SAFETY: forwarded contract.
            unsafe { self.drop_unpublished_locked(inner, s, None) };
        }
        idx
    }

    /// The undo of a span allocation that failed before publication (heap lock held): the pages `run =
    /// (idx, npages)` taken for it, if any, go back to the page allocator as they are (committed pages as
    /// free committed pages), and the descriptor `s` to the span allocator.
    ///
    /// # Safety
    /// `s` came from this heap's span allocator (directly or through a page cache's stash), was never
    /// published and is not used after this call; `run` was allocated in the page allocator for it.
    pub(super) unsafe fn drop_unpublished_locked(
        &self,
        inner: &mut HeapInner,
        s: NonNull<Span>,
        run: Option<(usize, usize)>,
    ) {
        if let Some((idx, npages)) = run {
            inner.pa.free_range(idx, npages);
        }
        // SAFETY: the caller's contract: an unused descriptor of this span allocator.
        unsafe { inner.spans.free(s.cast()) };
        self.publish_span_stats(inner);
    }
}
