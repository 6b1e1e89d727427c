//! Central lists (Go's `mcentral.go`): per size class, the spans no CPU caches.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! A CPU cache that has used up its span for a class hands it back here ([`Central::uncache_span`]) and
//! takes another ([`Central::cache_span`]); a CPU whose stock of freed objects overflows returns a batch
//! here ([`Central::flush`]). Each class has its own lock, so refills of different classes never contend.
//!
//! # Adapted from Go
//!
//! Go's central lists hold swept and unswept spans in two generations, because a GC cycle marks all
//! spans stale at once and sweeping is what discovers the frees. goheap frees explicitly, so a free is
//! folded back as soon as it reaches a span nobody caches (under this lock, into the span's bitmap), and
//! only a span that some CPU caches collects *deferred* frees (`free_bits`, folded by that CPU when it
//! runs out, or by [`Central::uncache_span`]). There is thus one generation and two lists:
//!
//! - `partial`: uncached spans with `0 < nalloc < nelems`;
//! - `full`: uncached spans with `nalloc == nelems`;
//! - `empty`: uncached spans with `nalloc == 0` (refills take partial spans first, so empty ones are the
//!   first to go back to the page heap, and the sweep finds them without walking the others).
//!
//! Empty spans are not handed back to the page heap the moment they empty (an alloc/free pattern around
//! one object would otherwise take the heap lock every time); the background sweep ([`Central::sweep`])
//! returns all but [`KEEP_EMPTY_SPANS`] of them, and [`crate::Malloc::release_all`] all of them.
//!
//! # Invariants (all under `lock`)
//! - every span on a list has `cached_by == NOT_CACHED`, `freeindex == 0` (materialised) and
//!   `list == classify(nalloc, nelems)` (Empty if `nalloc == 0`, Full if `nalloc == nelems`, else Partial);
//! - a span with `cached_by == i` (CPU cache `i`'s current span for its class, or one of the used-up spans
//!   it holds, see `cpucache.rs`) is on no list and its object-level fields belong to CPU cache `i`, except
//!   `free_bits`, which a flusher holding this lock may set.
//!
//! The lock is a [`GuardedMutex`]: every method that takes it (or reaches the page heap) takes a [`Guarded`]
//! token, so it runs inside the CPU provider's guard.
//!
//! Lock order: a Central lock may be held while taking the heap lock (to return empty spans), never the
//! other way round; no two Central locks are held at once.

use super::class::{init_tiny_counts, stock_key_slot, ClassShape, STOCK_KEY_MIN_SIZE, TINY_CLASS};
use crate::check::FlushError;
use crate::cpu::{Guarded, GuardedMutex};
use crate::page::heap::pagecache::PageCache;
use crate::page::heap::Heap;
use crate::page::span::{Span, SpanList, NOT_CACHED};
use crate::source::PageSource;
use core::ptr::{self, NonNull};

/// Empty spans a class keeps when the background sweep returns the rest to the page heap.
pub const KEEP_EMPTY_SPANS: usize = 1;

/// A doubly linked list of spans through `Span::next`/`prev`.
struct SpanQueue {
    head: *mut Span,
    len: usize,
}

impl SpanQueue {
    const fn new() -> Self {
        SpanQueue { head: ptr::null_mut(), len: 0 }
    }

    /// # Safety
    /// `s` is a live span on no list; the caller holds the lock guarding this queue.
    unsafe fn push(&mut self, s: *mut Span) {
        // SAFETY: per the contract, the links of `s` and of the head belong to this queue.
        unsafe {
            (*s).prev = ptr::null_mut();
            (*s).next = self.head;
            if !self.head.is_null() {
                (*self.head).prev = s;
            }
        }
        self.head = s;
        self.len += 1;
    }

    /// # Safety
    /// `s` is on this queue; the caller holds the lock guarding it.
    unsafe fn remove(&mut self, s: *mut Span) {
        // SAFETY: per the contract, `s` and its neighbours are on this queue.
        unsafe {
            let (prev, next) = ((*s).prev, (*s).next);
            if prev.is_null() {
                self.head = next;
            } else {
                (*prev).next = next;
            }
            if !next.is_null() {
                (*next).prev = prev;
            }
            (*s).next = ptr::null_mut();
            (*s).prev = ptr::null_mut();
        }
        self.len -= 1;
    }

    /// # Safety
    /// The caller holds the lock guarding this queue.
    unsafe fn pop(&mut self) -> Option<*mut Span> {
        let s = self.head;
        if s.is_null() {
            return None;
        }
        // SAFETY: `s` is the head of this queue.
        unsafe { self.remove(s) };
        Some(s)
    }
}

struct Lists {
    partial: SpanQueue,
    full: SpanQueue,
    empty: SpanQueue,
}

impl Lists {
    fn queue(&mut self, list: SpanList) -> &mut SpanQueue {
        match list {
            SpanList::Partial => &mut self.partial,
            SpanList::Full => &mut self.full,
            SpanList::Empty => &mut self.empty,
            SpanList::None => unreachable!("no queue for SpanList::None"),
        }
    }
}

/// The list an uncached span belongs on.
///
/// # Safety
/// The caller owns the span's object fields (holds the Central lock, the span is uncached).
unsafe fn classify(s: *mut Span) -> SpanList {
    // SAFETY: per the contract.
    let (nalloc, nelems) = unsafe { ((*s).nalloc, (*s).nelems) };
    if nalloc == 0 {
        SpanList::Empty
    } else if nalloc == nelems {
        SpanList::Full
    } else {
        SpanList::Partial
    }
}

fn list_of(v: u8) -> SpanList {
    match v {
        1 => SpanList::Partial,
        2 => SpanList::Full,
        3 => SpanList::Empty,
        _ => SpanList::None,
    }
}

// SAFETY: the raw span pointers are only dereferenced under the Central lock that owns the lists.
unsafe impl Send for Lists {}

/// The central list of one size class (Go's `mcentral`). Aligned to a cache line, as Go pads its `mcentral`s:
/// a producer refilling one class and a consumer flushing the next class would otherwise bounce the line
/// holding both classes' locks.
#[repr(align(64))]
pub struct Central {
    shape: ClassShape,
    class: u8,
    lock: GuardedMutex<Lists>,
}

/// Outcome of a flush.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Objects freed into spans some CPU caches (`cached_by != NOT_CACHED`), including the flusher's own.
    pub ndeferred: usize,
    /// Of those, objects in spans cached by a CPU other than the flusher's.
    pub nremote: usize,
}

/// Prints the class and its span shape; takes no lock (the lists are the lock holder's).
impl core::fmt::Debug for Central {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Central").field("class", &self.class).field("shape", &self.shape).finish_non_exhaustive()
    }
}

impl Central {
    /// The central list of class `class` with spans of `shape`.
    pub const fn new(class: u8, shape: ClassShape) -> Self {
        Central {
            shape,
            class,
            lock: GuardedMutex::new(Lists {
                partial: SpanQueue::new(),
                full: SpanQueue::new(),
                empty: SpanQueue::new(),
            }),
        }
    }

    /// The shape of this class's spans.
    pub fn shape(&self) -> ClassShape {
        self.shape
    }

    /// Gives CPU `cpu` a span with at least one free object, taking it off the partial list or, failing
    /// that, from the page heap. `None` when the page heap is out of memory.
    pub fn cache_span<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        pcache: Option<&mut PageCache>,
        cpu: u16,
    ) -> Option<NonNull<Span>> {
        // SAFETY: no span to give back.
        unsafe { self.swap_span(g, heap, pcache, cpu, None) }.0
    }

    /// [`Central::uncache_span`] of `old` (if any) and [`Central::cache_span`] in one hold of the class lock:
    /// a CPU whose span ran out takes the lock once, not twice, per span. Returns the new span (`None` when
    /// the page heap is out of memory) and the double free the sweep of `old` found, if any.
    ///
    /// # Safety
    /// As for [`Central::uncache_span`] if `old` is `Some`.
    pub unsafe fn swap_span<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        pcache: Option<&mut PageCache>,
        cpu: u16,
        old: Option<NonNull<Span>>,
    ) -> (Option<NonNull<Span>>, Option<usize>) {
        let mut bad = None;
        {
            let mut lists = self.lock.lock(g);
            if let Some(old) = old {
                // SAFETY: forwarded contract; we hold the lock.
                bad = unsafe { self.uncache_locked(&mut lists, old.as_ptr()) };
            }
            // SAFETY: we hold the lock that guards the lists and the object fields of uncached spans.
            if let Some(s) = unsafe { lists.partial.pop().or_else(|| lists.empty.pop()) } {
                // SAFETY: `s` came off our list, so it is live, uncached and ours until `cached_by` is set.
                unsafe {
                    debug_assert!((*s).nalloc < (*s).nelems && (*s).freeindex == 0);
                    (*s).list = SpanList::None as u8;
                    Span::check(s);
                    (*s).cached_by = cpu;
                    return (Some(NonNull::new_unchecked(s)), bad);
                }
            }
        }
        // Grow without holding the class lock (Go's mcentral.grow): the heap may commit pages.
        let Some(s) = self.grow(g, heap, pcache) else { return (None, bad) };
        // SAFETY: the span is fresh and not yet visible to anyone else.
        unsafe { (*s.as_ptr()).cached_by = cpu };
        (Some(s), bad)
    }

    /// Allocates and shapes a new span for this class.
    fn grow<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        pcache: Option<&mut PageCache>,
    ) -> Option<NonNull<Span>> {
        let s = heap.alloc_span(g, pcache, self.shape.npages as usize, self.class)?;
        // SAFETY: `s` is fresh from the heap: page-level fields set, nobody else holds it.
        unsafe {
            Span::init_objects(s.as_ptr(), self.shape.elemsize, self.shape.nelems, self.shape.divmagic);
            if self.class as usize == TINY_CLASS {
                init_tiny_counts(s.as_ptr());
            }
        }
        Some(s)
    }

    /// Takes back span `s` from CPU cache `cpu`: folds its deferred frees and files it as partial or full.
    /// Returns the address of a deferred free of an object that was not allocated (a double free, dropped
    /// by the sweep; see `Span::sweep`) for the caller to report.
    ///
    /// # Safety
    /// `s` is a span of this class that CPU cache `cpu` caches, and the caller is that cache's owner and
    /// stops using `s` now.
    pub unsafe fn uncache_span(&self, g: Guarded<'_>, s: NonNull<Span>) -> Option<usize> {
        let mut lists = self.lock.lock(g);
        // SAFETY: forwarded contract; we hold the lock.
        unsafe { self.uncache_locked(&mut lists, s.as_ptr()) }
    }

    /// [`Central::uncache_span`] with the lock held (`lists` is its guard's data).
    ///
    /// # Safety
    /// As for [`Central::uncache_span`].
    unsafe fn uncache_locked(&self, lists: &mut Lists, s: *mut Span) -> Option<usize> {
        // SAFETY: under the lock no flusher can add deferred frees; the caller gives up the span, so the
        // object fields become the lock's.
        unsafe {
            debug_assert_ne!((*s).cached_by, NOT_CACHED);
            let swept = Span::sweep(s);
            (*s).cached_by = NOT_CACHED;
            self.file(lists, s);
            swept.bad
        }
    }

    /// Puts uncached span `s` on the list its fill level calls for.
    ///
    /// # Safety
    /// The lock is held (`lists` is its guard's data), `s` is uncached, materialised and on no list.
    unsafe fn file(&self, lists: &mut Lists, s: *mut Span) {
        // SAFETY: per the contract.
        unsafe {
            let list = classify(s);
            (*s).list = list as u8;
            lists.queue(list).push(s);
        }
    }

    /// Moves uncached span `s` to the list its fill level now calls for, if that changed.
    ///
    /// # Safety
    /// The lock is held (`lists` is its guard's data), `s` is uncached and on one of our lists.
    unsafe fn refile(&self, lists: &mut Lists, s: *mut Span) {
        // SAFETY: per the contract.
        unsafe {
            let (old, new) = (list_of((*s).list), classify(s));
            if old != new {
                lists.queue(old).remove(s);
                (*s).list = new as u8;
                lists.queue(new).push(s);
            }
        }
    }

    /// Returns `n` freed objects, linked through their first word from `head`, to their spans. Objects in
    /// spans no CPU caches are folded back at once; the others are deferred to their caching CPU.
    /// `cpu` is the flusher's cache index (`NOT_CACHED` for the shared cache). Also returns the link read
    /// from the `n`-th object: the rest of the caller's list, so the caller need not walk it to cut it.
    ///
    /// Consecutive objects of one span skip the page-map lookup, and those of one bitmap word are folded
    /// with a single update (one `fetch_or` for a cached span): a stock freed in allocation order, the
    /// common case, costs a few instructions per object.
    ///
    /// On an invalid object, stops and returns the error; objects of earlier words were freed, those of
    /// the word being gathered and the rest of the list were not touched.
    ///
    /// # Safety
    /// Every object on the list was allocated from this class of this heap's allocator and is no longer used.
    /// The list is well formed (`n` entries).
    pub unsafe fn flush<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        mut head: *mut u8,
        n: usize,
        cpu: u16,
    ) -> Result<(Flushed, *mut u8), FlushError> {
        let mut out = Flushed::default();
        let keyed = self.shape.elemsize as usize >= STOCK_KEY_MIN_SIZE;
        let mut lists = self.lock.lock(g);
        // The span being gathered and its object range `[lo, hi)`.
        let mut s: *mut Span = ptr::null_mut();
        let (mut lo, mut hi) = (0usize, 0usize);
        // The bitmap word being gathered and its bits.
        let (mut w, mut mask) = (0usize, 0u64);
        for _ in 0..n {
            let obj = head;
            // SAFETY: the list links run through the objects' first words, which the caller handed us.
            head = unsafe { *(obj as *mut *mut u8) };
            let addr = obj as usize;
            if !(lo..hi).contains(&addr) {
                // SAFETY: the lock is held; `s` (if any) is a live span of this class.
                unsafe { self.fold(&mut lists, s, w, mask, cpu, &mut out)? };
                mask = 0;
                s = heap.span_of(addr).ok_or(FlushError::NotInHeap(addr))?.as_ptr();
                // SAFETY: `span_of` returned a live span; class and shape are immutable while it is in use.
                unsafe {
                    if (*s).class != self.class {
                        return Err(FlushError::WrongClass { addr, span_class: (*s).class });
                    }
                    lo = (*s).base;
                    hi = lo + (*s).nelems as usize * (*s).elemsize as usize;
                }
                if addr >= hi {
                    // In the span's tail, past its last object.
                    return Err(FlushError::Interior(addr));
                }
            }
            // SAFETY: `s` is live and `addr` lies in it.
            let (idx, exact) = unsafe { Span::object_index(s, addr) };
            if !exact {
                return Err(FlushError::Interior(addr));
            }
            let (iw, bit) = (idx / 64, 1u64 << (idx % 64));
            if iw != w || mask == 0 {
                // SAFETY: as above.
                unsafe { self.fold(&mut lists, s, w, mask, cpu, &mut out)? };
                (w, mask) = (iw, 0);
            }
            if mask & bit != 0 {
                // The same object twice in this flush.
                return Err(FlushError::NotAllocated(addr));
            }
            if keyed {
                // SAFETY: `obj` is an object of this class (checked above), still ours until it is folded.
                // Objects of keyed classes carry the stock key in their second word; it leaves the stock here.
                unsafe { *stock_key_slot(obj) = 0 };
            }
            mask |= bit;
        }
        // SAFETY: as above.
        unsafe { self.fold(&mut lists, s, w, mask, cpu, &mut out)? };
        // Every link was read before its object was folded (after that, its span's owner may reuse it).
        Ok((out, head))
    }

    /// Folds the frees `mask` of bitmap word `w` of span `s` (nothing if `mask == 0`): deferred to the
    /// caching CPU, or into the bitmap of an uncached span, which is then refiled.
    ///
    /// # Safety
    /// The lock is held (`lists` is its guard's data); if `mask != 0`, `s` is a live span of this class and
    /// `mask` names objects of it (bits below `nelems`) that the caller frees.
    unsafe fn fold(
        &self,
        lists: &mut Lists,
        s: *mut Span,
        w: usize,
        mask: u64,
        cpu: u16,
        out: &mut Flushed,
    ) -> Result<(), FlushError> {
        if mask == 0 {
            return Ok(());
        }
        // SAFETY: per the contract; `cached_by` cannot change while we hold the lock.
        unsafe {
            let bad = |bits: u64| {
                let idx = w * 64 + bits.trailing_zeros() as usize;
                FlushError::NotAllocated((*s).base + idx * (*s).elemsize as usize)
            };
            let owner = (*s).cached_by;
            if owner != NOT_CACHED {
                let again = Span::defer_free_mask(s, w, mask);
                if again != 0 {
                    return Err(bad(again));
                }
                let k = mask.count_ones() as usize;
                out.ndeferred += k;
                if owner != cpu {
                    out.nremote += k;
                }
                return Ok(());
            }
            Span::free_uncached_mask(s, w, mask).map_err(bad)?;
            self.refile(lists, s);
        }
        Ok(())
    }

    /// The sweep: returns empty spans beyond the first `keep` to the page heap, at most `max_spans` of them.
    /// The background loop keeps [`KEEP_EMPTY_SPANS`]; `release_all` keeps none. Returns the pages released.
    pub fn sweep<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        pcache: Option<&mut PageCache>,
        keep: usize,
        max_spans: usize,
    ) -> usize {
        self.sweep_budget(g, heap, pcache, keep, max_spans, usize::MAX)
    }

    /// As [`Central::sweep`], stopping once `max_pages` pages have been returned (at least one span is
    /// returned if any is beyond `keep`). The background step paces its sweep in pages with it.
    pub fn sweep_budget<S: PageSource>(
        &self,
        g: Guarded<'_>,
        heap: &Heap<S>,
        mut pcache: Option<&mut PageCache>,
        keep: usize,
        max_spans: usize,
        max_pages: usize,
    ) -> usize {
        // Unlink the victims under the lock, free them to the heap after it (the heap lock is never taken
        // while a Central lock is held on this path, though the order would allow it).
        let mut victims: *mut Span = ptr::null_mut();
        let mut nvictims = 0;
        let mut nvictim_pages = 0;
        {
            let mut lists = self.lock.lock(g);
            while lists.empty.len > keep && nvictims < max_spans && nvictim_pages < max_pages {
                // SAFETY: we hold the lock; the empty list is non-empty.
                unsafe {
                    let Some(s) = lists.empty.pop() else { break };
                    (*s).list = SpanList::None as u8;
                    (*s).next = victims;
                    victims = s;
                    nvictim_pages += (*s).npages;
                }
                nvictims += 1;
            }
        }
        let mut npages = 0;
        while !victims.is_null() {
            let s = victims;
            // SAFETY: the span is empty and off every list: nothing references its memory any more.
            unsafe {
                victims = (*s).next;
                npages += (*s).npages;
                heap.free_span(g, pcache.as_deref_mut(), NonNull::new_unchecked(s));
            }
        }
        npages
    }

    /// Counts of spans on the lists: (partial, full, empty).
    pub fn span_counts(&self, g: Guarded<'_>) -> (usize, usize, usize) {
        let lists = self.lock.lock(g);
        (lists.partial.len, lists.full.len, lists.empty.len)
    }

    /// Whole-list consistency walk (feature `validate`): every span filed by its fill level, uncached,
    /// materialised, of this class, and its `nalloc` equal to the popcount of its bitmap.
    #[cfg(feature = "validate")]
    pub fn validate(&self, g: Guarded<'_>) {
        let lists = self.lock.lock(g);
        for (q, want) in
            [(&lists.partial, SpanList::Partial), (&lists.full, SpanList::Full), (&lists.empty, SpanList::Empty)]
        {
            let mut n = 0;
            let mut s = q.head;
            while !s.is_null() {
                // SAFETY: we hold the lock; `s` is on one of our lists.
                unsafe {
                    assert_eq!((*s).class, self.class, "span {:p} on the wrong class list", s);
                    assert_eq!((*s).list, want as u8, "span {:p} filed as {} but on {:?}", s, (*s).list, want);
                    assert_eq!((*s).cached_by, NOT_CACHED, "span {:p} on a list while cached", s);
                    assert_eq!((*s).freeindex, 0, "span {:p} on a list not materialised", s);
                    let words = crate::page::span::words_for((*s).nelems as usize);
                    let used: u32 = (&(*s).alloc_bits)[..words].iter().map(|w| w.count_ones()).sum();
                    let tail = (words * 64 - (*s).nelems as usize) as u32;
                    assert_eq!(used - tail, (*s).nalloc as u32, "span {:p}: nalloc disagrees with bitmap", s);
                    assert_eq!(classify(s), want, "span {:p} on the wrong list", s);
                    s = (*s).next;
                }
                n += 1;
            }
            assert_eq!(n, q.len, "list length out of step");
        }
    }
}

/// `fork()` support (see `Malloc::lock_all_for_fork`).
#[cfg(feature = "std")]
impl Central {
    /// Takes this class's lock and keeps it (the guard is forgotten) until [`Central::unlock_after_fork`].
    pub(crate) fn lock_for_fork(&self, g: Guarded<'_>) {
        self.lock.lock_and_keep(g);
    }

    /// Releases the lock [`Central::lock_for_fork`] kept.
    ///
    /// # Safety
    /// `lock_for_fork` was called and this is the one matching release.
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: the caller's contract: the lock is held by a forgotten guard of ours.
        unsafe { self.lock.force_unlock() }
    }
}
