//! The page source: the contract between goheap and whatever provides memory.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Shaped like Go's `sys*` layer (`mem_linux.go`): address space is *reserved* in large ranges, parts of it
//! are *committed* (made readable and writable, backed by physical memory) as the heap grows, and free pages
//! are *decommitted* by the scavenger (the physical memory goes back, the range stays reserved). Failure is an
//! ordinary outcome: the heap turns it into a null allocation and stays consistent.
//!
//! Implementations: `mmap::MmapSource` (feature `std`) and [`bounded::BoundedSource`] (a fixed budget over
//! a host buffer or mmap, able to fail at chosen points, for tests). A kernel implements it over its frame
//! allocator and page-table mapper (see the demo kernel).

use core::ptr::NonNull;

/// Alignment and size granularity of every range passed across this trait: goheap's page, 8 KiB.
pub const SOURCE_GRANULE: usize = crate::PAGE_SIZE;

/// What goheap needs from the layer below it.
///
/// All addresses and sizes are multiples of [`SOURCE_GRANULE`] (8 KiB).
///
/// How goheap uses it (what an implementation may rely on):
/// - **Reservations are few and permanent.** The heap reserves its arena once (one range of up to
///   `max_heap_bytes`, aligned to the page allocator's 4 MiB chunk), one range for the page allocator's
///   metadata and page map, and 64 KiB blocks for span descriptors. It never gives a reservation back: there
///   is no `release`; reservations live as long as the source.
/// - **Commit/decommit granularity is the page.** `commit` and `decommit` get any page-granular subrange of a
///   reservation: a decommit may cover part of an earlier commit or several of them, and a commit may cover
///   several earlier decommits. goheap never commits a page that is committed, nor decommits one that is not
///   (the bounded test source checks this).
/// - **Concurrency.** `commit` and `decommit` may be called on disjoint ranges from several CPUs at once,
///   with or without the heap lock held (the page-cache path commits outside the lock; the background
///   scavenger decommits outside it).
/// - **Context.** Every call comes inside the CPU provider's guard (interrupts off in a kernel; see
///   "Interrupts and signals" in `cpu.rs`), often with goheap's spin locks held: an implementation must not
///   sleep, allocate from goheap, or take a lock that code running with interrupts on could hold on this
///   CPU (take its own locks with interrupts off).
/// - **Ownership.** The source owns what it reserved; the heap (which holds the source by value) uses the
///   ranges for its own lifetime. Dropping the heap drops the source, which may then reclaim them (the
///   bounded source unmaps its region), so no allocation may outlive its heap.
/// - **Zeroing.** goheap relies on zeroed memory only when [`PageSource::commit_zeroes`] says so; otherwise
///   it clears metadata itself and marks spans `needzero`.
/// - **Failure.** `reserve` returning `None` or `commit` returning `false` makes the allocation that needed
///   it return null; the heap stays consistent and later calls may succeed.
///
/// # Example: a source over memory that is always mapped
///
/// The smallest useful source, for a kernel with an identity-mapped pool or a program with a static buffer:
/// reserving bumps an offset through the region, and committing and decommitting have nothing to do (the
/// memory stays mapped, so the scavenger gives nothing back). [`page::heap::reservation_bytes`] sizes the
/// region for a heap bound; [`bounded::BoundedSource`] is the same idea with a budget and counters. A kernel
/// with page tables maps frames in `commit` and unmaps them in `decommit` instead (`goheap::x86_64`).
///
/// [`page::heap::reservation_bytes`]: crate::page::heap::reservation_bytes
///
/// ```
/// use core::alloc::{GlobalAlloc, Layout};
/// use core::cell::UnsafeCell;
/// use core::ptr::NonNull;
/// use core::sync::atomic::{AtomicUsize, Ordering};
/// use goheap::cpu::NoCpuCache;
/// use goheap::source::PageSource;
/// use goheap::Malloc;
///
/// /// Always-mapped memory `[base, base + len)`, handed out front to back.
/// struct Region {
///     base: *mut u8,
///     len: usize,
///     next: AtomicUsize,
/// }
///
/// // SAFETY: `base` is only used as an address; the offset is atomic.
/// unsafe impl Sync for Region {}
///
/// // SAFETY: reservations are disjoint pieces of a region nothing else uses; the region is always readable
/// // and writable, so every commit succeeds and a decommit makes nothing inaccessible; nothing here
/// // allocates, sleeps or locks.
/// unsafe impl PageSource for Region {
///     fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
///         let base = self.base as usize;
///         let mut off = self.next.load(Ordering::Relaxed);
///         loop {
///             let start = (base + off).checked_next_multiple_of(align)? - base;
///             let end = start.checked_add(nbytes).filter(|&end| end <= self.len)?;
///             match self.next.compare_exchange_weak(off, end, Ordering::Relaxed, Ordering::Relaxed) {
///                 Ok(_) => return NonNull::new(self.base.wrapping_add(start)),
///                 Err(now) => off = now,
///             }
///         }
///     }
///     unsafe fn commit(&self, _addr: NonNull<u8>, _nbytes: usize) -> bool {
///         true
///     }
///     unsafe fn decommit(&self, _addr: NonNull<u8>, _nbytes: usize) {}
/// }
///
/// const MAX_HEAP: usize = 8 << 20;
/// const REGION_BYTES: usize = goheap::page::heap::reservation_bytes(MAX_HEAP);
///
/// /// The memory, page-aligned (`SOURCE_GRANULE`).
/// #[repr(C, align(8192))]
/// struct Pool(UnsafeCell<[u8; REGION_BYTES]>);
/// // SAFETY: only the heap touches the pool, through the source.
/// unsafe impl Sync for Pool {}
/// static POOL: Pool = Pool(UnsafeCell::new([0; REGION_BYTES]));
///
/// // `NoCpuCache` keeps the example short: every call takes the shared cache's lock. A kernel uses
/// // `goheap::x86_64::IrqSingle` or `IrqCpus`, a program `goheap::Hosted`.
/// static HEAP: Malloc<Region, NoCpuCache> = Malloc::with_max_bytes(
///     Region { base: POOL.0.get().cast(), len: REGION_BYTES, next: AtomicUsize::new(0) },
///     NoCpuCache,
///     MAX_HEAP,
/// );
///
/// let layout = Layout::from_size_align(100, 8).unwrap();
/// // SAFETY: the layout's size is not zero.
/// let p = unsafe { HEAP.alloc(layout) };
/// assert!(!p.is_null());
/// // SAFETY: `p` is a live allocation of `layout` from `HEAP`.
/// unsafe {
///     p.write_bytes(0xA5, layout.size());
///     HEAP.dealloc(p, layout);
/// }
/// assert_eq!(HEAP.mem_stats().heap_objects, 0);
/// ```
///
/// # Safety
///
/// An implementation promises that:
/// - a range returned by `reserve` is exclusively goheap's: nothing else maps, uses or hands it out until the
///   source itself is dropped;
/// - after `commit` returns `true`, the whole range is readable and writable from every CPU/thread and stays
///   so until goheap decommits it; if [`PageSource::commit_zeroes`] returns `true`, it reads as zero;
/// - `decommit` never makes memory outside the given range inaccessible;
/// - it never allocates from the heap it feeds (it may be called with goheap's locks held, from inside
///   `alloc`), and it is safe to call from several CPUs/threads at once (`Sync`).
pub unsafe trait PageSource: Sync {
    /// Reserves `nbytes` of address space aligned to `align` (a power of two, at least [`SOURCE_GRANULE`]).
    /// The memory is not yet usable. `None` when the address space is exhausted.
    #[must_use]
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>>;

    /// Makes `[addr, addr + nbytes)` usable. Returns `false` (and leaves the range as it was) when the source
    /// has no memory left.
    ///
    /// # Safety
    /// The range lies within a range returned by `reserve` and is not currently committed.
    #[must_use]
    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool;

    /// Gives the physical memory behind `[addr, addr + nbytes)` back; the range stays reserved and must be
    /// committed again before use. Its contents are lost.
    ///
    /// # Safety
    /// The range lies within a range returned by `reserve`, is committed, and nothing uses it any more.
    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize);

    /// Makes `[addr, addr + nbytes)`, reserved and not committed, fault when touched, where it does not
    /// already (a guard page: goheap's guard and efence modes, the sampled guarded pool). The default does
    /// nothing: for a source whose uncommitted memory is inaccessible anyway (a kernel's unmapped pages).
    ///
    /// # Safety
    /// The range lies within a range returned by `reserve` and is not committed.
    unsafe fn guard(&self, addr: NonNull<u8>, nbytes: usize) {
        let _ = (addr, nbytes);
    }

    /// As [`PageSource::decommit`], and the range faults when touched until it is committed again with
    /// [`PageSource::commit_unguard`] (a freed object of the debug modes). The default is `decommit`.
    ///
    /// # Safety
    /// As for [`PageSource::decommit`].
    unsafe fn decommit_guard(&self, addr: NonNull<u8>, nbytes: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.decommit(addr, nbytes) }
    }

    /// As [`PageSource::commit`], for a range made inaccessible by [`PageSource::guard`] or
    /// [`PageSource::decommit_guard`] (or never committed). The default is `commit`.
    ///
    /// # Safety
    /// As for [`PageSource::commit`].
    #[must_use]
    unsafe fn commit_unguard(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        // SAFETY: forwarded contract.
        unsafe { self.commit(addr, nbytes) }
    }

    /// Capability query: does freshly committed memory read as zero? (mmap and a kernel that zeroes frames:
    /// yes.) When `true`, `alloc_zeroed` skips clearing memory that was never handed out since commit.
    fn commit_zeroes(&self) -> bool {
        false
    }
}

pub mod bounded;
#[cfg(feature = "std")]
pub mod mmap;
