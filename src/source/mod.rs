//! The page source: the contract between goheap and whatever provides memory.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! Shaped like Go's `sys*` layer (`mem_linux.go`): address space is *reserved* in large ranges, parts of it
//! are *committed* (made readable and writable, backed by physical memory) as the heap grows, and free pages
//! are *decommitted* by the scavenger (the physical memory goes back, the range stays reserved). Failure is an
//! ordinary outcome: the heap turns it into a null allocation and stays consistent.
//!
//! Implementations: [`mmap::MmapSource`] (feature `std`) and [`bounded::BoundedSource`] (a fixed budget over
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
