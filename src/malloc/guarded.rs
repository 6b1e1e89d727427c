//! Sampled guarded allocations (Linux KFENCE, GWP-ASan): a few allocations, chosen by the heap-profile
//! sampler, are placed against a guard page in a pool of their own, and their slot is quarantined after free,
//! so an overflow or a use after free of one of them faults at the access, in production builds.
//!
//! See `lib.rs` for an overview of the allocator and `malloc/mod.rs` for the guards and locks.
//!
//! # How it works
//! - **The pool.** [`GUARDED_POOL_BYTES`] of address space (255 slots of one data page and one guard page:
//!   KFENCE's default object count), reserved from the page source in one piece at the first guarded
//!   allocation, apart from the heap's arena. A slot's data page is committed while it holds an object; its
//!   guard page never is. The pool is outside the arena, so the fast free's arena check already sends its
//!   objects to the general free path: the fast paths pay nothing for this mode, on or off.
//! - **Which allocations.** The heap-profile sampler (`profile.rs`) already diverts one allocation per
//!   `rate` bytes on average (Go's `MemProfileRate`) from the fast path to the general path. With
//!   [`Malloc::set_guarded_sample_rate`]`(n)`, every `n`-th of those sampled allocations (a tiny or small
//!   request of at most a page, alignment at most a page) is served from the pool instead (tcmalloc's
//!   guarded sampling does the same: a fraction of the profile's samples). Off by default (`n = 0`). The
//!   mean distance between guarded allocations is `n` × the profile rate in bytes allocated; profiling
//!   must be on ([`Malloc::set_profile_rate`]) for any allocation to be sampled.
//! - **Placement.** The object ends at its data page's end, right before the guard page (rounded down to
//!   its alignment, so when the size is a multiple of the alignment the first byte past the object faults).
//!   The bytes of the data page before the object are filled with a canary pattern, checked at the free: a
//!   write before the object (or into the few bytes between an unaligned end and the guard page) is
//!   reported as [`Reason::GuardedCanary`] with the address.
//! - **Free.** Checked against the slot's record (the object's start, live, the same layout), reported
//!   through the report hook as any bad free otherwise; then the data page is decommitted and the slot joins
//!   the quarantine, a FIFO of freed slots: a slot is reused only when at least [`QUARANTINE_MIN`] other
//!   slots were freed after it (never-used slots first). Until then a use of the freed object faults. When
//!   no slot may be used, the sampled allocation takes the ordinary path (counted as `skipped`).
//!
//! The pool's pages are made inaccessible through the page source's guard operations
//! (`PageSource::guard`, `decommit_guard`, `commit_unguard`): a kernel source that unmaps needs nothing
//! more, and `MmapSource` (also the default one `Hosted` uses, which otherwise maps its reservations
//! read-write) `mprotect`s them, so guarded objects fault in production on a host too.
//!
//! # What was adapted, and why
//! KFENCE samples by time (one allocation per 100 ms, a static branch) and GWP-ASan by count (a
//! thread-local countdown on every allocation); both would add a countdown to goheap's fast path. goheap's
//! fast path already counts bytes for the profile sampler, so guarded sampling rides on it: no instruction
//! is added to the fast paths (measured with callgrind, see the module's report in issue 12). KFENCE's pool
//! is fixed at boot; goheap reserves it at first use, as it reserves everything else. Both place objects
//! against a guard page, keep canaries in the rest of the page and delay reuse; goheap's quarantine is the
//! FIFO of freed slots with a minimum length, which bounds how long a freed slot stays inaccessible
//! from below as well as above (by the pool's size).
//!
//! # Locks
//! `inner`: a spin lock taken inside the CPU provider's guard, after the caller's cache is entered (the
//! allocation) or with no cache entered (the free); no other lock is taken while it is held (a leaf, last
//! in the lock order: `fork()`'s prepare step takes it after the heap's). The source is called under it. `base`/`len` are written once (under the lock) and read lock-free by [`Malloc::dealloc`].

use super::*;
use crate::page::heap::GUARDED_POOL_BYTES;

/// Pages per slot: the data page and its guard page.
const SLOT_PAGES: usize = 2;
/// Bytes per slot.
const SLOT_BYTES: usize = SLOT_PAGES * PAGE_SIZE;
/// Slots in the pool.
pub const GUARDED_SLOTS: usize = GUARDED_POOL_BYTES / SLOT_BYTES;
/// A freed slot is reused only after at least this many other slots were freed after it.
pub const QUARANTINE_MIN: usize = 64;
/// The canary byte filling a slot's data page before its object.
pub const GUARDED_CANARY: u8 = 0xcb;

const _: () = assert!(QUARANTINE_MIN < GUARDED_SLOTS && GUARDED_SLOTS <= u16::MAX as usize);

/// A slot's state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotState {
    /// Never used.
    Fresh,
    /// Holds a live object.
    Live,
    /// Freed: in the quarantine, its data page decommitted.
    Quarantined,
}

/// What the pool knows of a slot's object (its last one, once freed).
#[derive(Clone, Copy)]
struct Slot {
    state: SlotState,
    addr: usize,
    size: usize,
    align: usize,
}

/// The pool's state under its lock.
struct PoolInner {
    /// Whether the pool's reservation was attempted (and `base` is valid if it succeeded).
    tried: bool,
    base: usize,
    /// Next never-used slot.
    fresh: usize,
    slots: [Slot; GUARDED_SLOTS],
    /// FIFO of quarantined slots: `queue[(head + i) % GUARDED_SLOTS]` for `i < qlen`.
    queue: [u16; GUARDED_SLOTS],
    head: usize,
    qlen: usize,
}

/// Counters of the sampled guarded allocations ([`Malloc::guarded_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardedStats {
    /// The sampling rate: every `rate`-th sampled allocation is guarded (0: off).
    pub rate: usize,
    /// Guarded allocations made, cumulative.
    pub allocs: u64,
    /// Guarded allocations freed, cumulative.
    pub frees: u64,
    /// Sampled allocations picked for guarding that took the ordinary path (no slot out of quarantine, too
    /// large or too aligned for a slot, or the pool could not be reserved or committed), cumulative.
    pub skipped: u64,
    /// Address space reserved for the pool (0 until the first guarded allocation).
    pub reserved_bytes: usize,
}

/// The pool of sampled guarded allocations (see the module docs).
pub(super) struct GuardedPool {
    /// Every `rate`-th sampled allocation is guarded; 0 = off.
    rate: AtomicUsize,
    /// Sampled allocations seen while on (picks every `rate`-th).
    seen: AtomicUsize,
    /// Pool base and length once reserved (`len == 0` before: no address matches).
    base: AtomicUsize,
    len: AtomicUsize,
    allocs: AtomicU64,
    frees: AtomicU64,
    skipped: AtomicU64,
    inner: GuardedMutex<PoolInner>,
}

impl GuardedPool {
    pub(super) const fn new() -> Self {
        GuardedPool {
            rate: AtomicUsize::new(0),
            seen: AtomicUsize::new(0),
            base: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            allocs: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            inner: GuardedMutex::new(PoolInner {
                tried: false,
                base: 0,
                fresh: 0,
                slots: [Slot { state: SlotState::Fresh, addr: 0, size: 0, align: 0 }; GUARDED_SLOTS],
                queue: [0; GUARDED_SLOTS],
                head: 0,
                qlen: 0,
            }),
        }
    }

    /// Takes the pool's lock and keeps it, for `fork()`'s prepare step (see `orphans.rs`).
    #[cfg(feature = "std")]
    pub(super) fn lock_for_fork(&self, g: Guarded<'_>) {
        self.inner.lock_and_keep(g);
    }

    /// Releases the lock [`GuardedPool::lock_for_fork`] kept.
    ///
    /// # Safety
    /// `lock_for_fork` was called and this is its one matching release.
    #[cfg(feature = "std")]
    pub(super) unsafe fn unlock_after_fork(&self) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.force_unlock() }
    }

    /// Whether `addr` lies in the pool (two loads and a compare).
    #[inline(always)]
    pub(super) fn owns(&self, addr: usize) -> bool {
        addr.wrapping_sub(self.base.load(Ordering::Acquire)) < self.len.load(Ordering::Acquire)
    }
}

/// The verdict on a free or realloc of a pool address, taken under the lock and acted on after it.
enum Verdict {
    Ok {
        slot: usize,
        data: usize,
    },
    Bad(Reason),
    /// The canary before the object changed: the address of the first changed byte.
    Canary(usize),
}

/// The address of the first byte of `[data, end)` that no longer holds [`GUARDED_CANARY`], if any; compared a
/// word at a time (up to a page of canary is checked at every free of a guarded object).
///
/// # Safety
/// `data` is 8-byte aligned and `[data, end)` is readable.
unsafe fn canary_damage(data: usize, end: usize) -> Option<usize> {
    const WORD: u64 = u64::from_ne_bytes([GUARDED_CANARY; 8]);
    let words = (end - data) / 8;
    let first_bad = (0..words).find(|&i| {
        // SAFETY: `data + 8 * i + 8 <= end`, aligned (the caller's contract).
        unsafe { ((data + 8 * i) as *const u64).read() != WORD }
    });
    let from = data + 8 * first_bad.unwrap_or(words);
    (from..end).find(|&a| {
        // SAFETY: `a < end` (the caller's contract).
        unsafe { (a as *const u8).read() != GUARDED_CANARY }
    })
}

impl<S: PageSource, P: CpuProvider> Malloc<S, P> {
    /// Turns sampled guarded allocations on: every `n`-th allocation the heap-profile sampler picks (see
    /// [`Malloc::set_profile_rate`], which must be on) is placed in the guarded pool, ending right before an
    /// inaccessible page, and its slot is quarantined after free, so an overflow past its end or a use after
    /// its free faults (KFENCE / GWP-ASan; see `malloc/guarded.rs`). `n = 0` turns it off (the default);
    /// `n = 1` guards every sampled allocation of at most a page. The mean distance between guarded
    /// allocations is `n` × the profile rate, in bytes allocated. Objects already in the pool stay there
    /// until freed. The fast paths cost the same with it on or off.
    pub fn set_guarded_sample_rate(&self, n: usize) {
        self.guarded.rate.store(n, Ordering::Relaxed);
    }

    /// The sampled guarded allocations' counters.
    pub fn guarded_stats(&self) -> GuardedStats {
        let p = &self.guarded;
        GuardedStats {
            rate: p.rate.load(Ordering::Relaxed),
            allocs: p.allocs.load(Ordering::Relaxed),
            frees: p.frees.load(Ordering::Relaxed),
            skipped: p.skipped.load(Ordering::Relaxed),
            reserved_bytes: p.len.load(Ordering::Relaxed),
        }
    }

    /// Whether this sampled allocation is one to guard (every `rate`-th; called on the sampling path only).
    #[inline]
    pub(super) fn guarded_pick(&self) -> bool {
        let rate = self.guarded.rate.load(Ordering::Relaxed);
        rate != 0 && (self.guarded.seen.fetch_add(1, Ordering::Relaxed) + 1) % rate == 0
    }

    /// Places an object of `size` bytes aligned to `align` in a pool slot against its guard page; null when
    /// it does not fit a slot or no slot may be used (the caller then takes the ordinary path).
    #[cold]
    pub(super) fn alloc_guarded(&self, size: usize, align: usize, zero: bool, g: Guarded<'_>) -> *mut u8 {
        let p = self.alloc_guarded_inner(size.max(1), align, zero, g);
        if p.is_null() {
            self.guarded.skipped.fetch_add(1, Ordering::Relaxed);
        } else {
            self.guarded.allocs.fetch_add(1, Ordering::Relaxed);
        }
        p
    }

    fn alloc_guarded_inner(&self, size: usize, align: usize, zero: bool, g: Guarded<'_>) -> *mut u8 {
        if size > PAGE_SIZE || align > PAGE_SIZE {
            return ptr::null_mut();
        }
        let src = self.t.heap.src(g);
        let mut lk = self.guarded.inner.lock(g);
        let inner = &mut *lk;
        if !inner.tried {
            inner.tried = true;
            if let Some(b) = src.reserve(GUARDED_POOL_BYTES, PAGE_SIZE) {
                // SAFETY: the pool was just reserved and nothing of it is committed.
                unsafe { src.guard(b, GUARDED_POOL_BYTES) };
                inner.base = b.as_ptr() as usize;
                self.guarded.base.store(inner.base, Ordering::Release);
                self.guarded.len.store(GUARDED_POOL_BYTES, Ordering::Release);
            }
        }
        if inner.base == 0 {
            return ptr::null_mut();
        }
        let (slot, fresh) = if inner.fresh < GUARDED_SLOTS {
            (inner.fresh, true)
        } else if inner.qlen > QUARANTINE_MIN {
            (inner.queue[inner.head] as usize, false)
        } else {
            return ptr::null_mut();
        };
        let data = inner.base + slot * SLOT_BYTES;
        // SAFETY: the slot's data page lies in the pool's reservation and is not committed (fresh, or
        // decommitted at its free).
        if !unsafe { src.commit_unguard(NonNull::new_unchecked(data as *mut u8), PAGE_SIZE) } {
            return ptr::null_mut();
        }
        if fresh {
            inner.fresh += 1;
        } else {
            inner.head = (inner.head + 1) % GUARDED_SLOTS;
            inner.qlen -= 1;
        }
        let addr = (data + PAGE_SIZE - size) & !(align - 1);
        inner.slots[slot] = Slot { state: SlotState::Live, addr, size, align };
        drop(lk);
        // SAFETY: the data page was committed above and is this object's alone: the canary before the object,
        // then the object.
        unsafe {
            ptr::write_bytes(data as *mut u8, GUARDED_CANARY, addr - data);
            if zero && !src.commit_zeroes() {
                ptr::write_bytes(addr as *mut u8, 0, size);
            }
        }
        addr as *mut u8
    }

    /// Checks a free (or realloc) of pool address `addr` with `layout` against its slot's record; with
    /// `consume`, a valid free also marks the slot quarantined (under the lock, so one of two racing frees
    /// of the same object wins).
    fn guarded_verdict(&self, addr: usize, layout: Layout, consume: bool, g: Guarded<'_>) -> Verdict {
        let mut lk = self.guarded.inner.lock(g);
        let inner = &mut *lk;
        let off = addr - inner.base;
        let slot = off / SLOT_BYTES;
        let data = inner.base + slot * SLOT_BYTES;
        let s = inner.slots[slot];
        if s.state == SlotState::Fresh || addr >= data + PAGE_SIZE {
            return Verdict::Bad(Reason::NotInHeap);
        }
        if addr != s.addr {
            return Verdict::Bad(Reason::Interior);
        }
        if s.state != SlotState::Live {
            return Verdict::Bad(Reason::DoubleFree);
        }
        if layout.size().max(1) != s.size || layout.align() != s.align {
            return Verdict::Bad(Reason::LayoutMismatch { size: layout.size(), align: layout.align() });
        }
        // SAFETY: the slot is live, so its data page is committed; the canary is `[data, addr)`.
        if let Some(at) = unsafe { canary_damage(data, addr) } {
            return Verdict::Canary(at);
        }
        if consume {
            inner.slots[slot].state = SlotState::Quarantined;
        }
        Verdict::Ok { slot, data }
    }

    /// Reports a bad verdict; returns the slot and data page of a good one.
    fn guarded_check(&self, addr: usize, layout: Layout, consume: bool, g: Guarded<'_>) -> (usize, usize) {
        match self.guarded_verdict(addr, layout, consume, g) {
            Verdict::Ok { slot, data } => (slot, data),
            Verdict::Bad(reason) => self.report(addr, reason),
            Verdict::Canary(at) => self.report(addr, Reason::GuardedCanary { offset: addr - at }),
        }
    }

    /// Frees a pool object: checked against its slot, then its data page is decommitted and the slot
    /// quarantined.
    ///
    /// # Safety
    /// As for [`Malloc::dealloc`]; `ptr` lies in the pool.
    #[cold]
    pub(super) unsafe fn free_guarded(&self, ptr: *mut u8, layout: Layout) {
        self.with_guard(|g| {
            let (slot, data) = self.guarded_check(ptr as usize, layout, true, g);
            // SAFETY: the slot was live (checked) and is now marked quarantined: its data page is committed and
            // nobody uses it any more (the caller gave the object up).
            unsafe { self.t.heap.src(g).decommit_guard(NonNull::new_unchecked(data as *mut u8), PAGE_SIZE) };
            let mut lk = self.guarded.inner.lock(g);
            let at = (lk.head + lk.qlen) % GUARDED_SLOTS;
            lk.queue[at] = slot as u16;
            lk.qlen += 1;
        });
        self.guarded.frees.fetch_add(1, Ordering::Relaxed);
    }

    /// `realloc` of a pool object: checked as a free would be, then moved (allocate, copy, free).
    ///
    /// # Safety
    /// As for [`Malloc::realloc`]; `ptr` lies in the pool.
    #[cold]
    pub(super) unsafe fn realloc_guarded(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.with_guard(|g| self.guarded_check(ptr as usize, layout, false, g));
        // SAFETY: the caller guarantees the size/alignment pair is a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = self.alloc(new_layout);
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and do not overlap; the old one is freed once.
            unsafe {
                ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.free_guarded(ptr, layout);
            }
        }
        new
    }
}
