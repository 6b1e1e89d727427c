//! Slicing long page-heap operations into guarded sections with interrupt windows between them.
//!
//! See `lib.rs` for an overview of the allocator and `heap/mod.rs` for the heap's invariants.
//!
//! # Why
//! Every goheap lock and every page-source call happens inside the CPU provider's guard (a [`Guarded`]
//! token, see `cpu.rs`); in a kernel that guard keeps interrupts off. Some operations touch many pages:
//! committing the frames of a 64 MiB allocation, decommitting what `release_all` or the scavenger gives
//! back. Done in one guarded section, such an operation keeps interrupts off for its whole length (10
//! million instructions for 64 MiB under QEMU `-icount` with the demo kernel's frame source). So they work
//! in *slices*: a bounded amount of work per section, and the guard is dropped (interrupts may run) and
//! entered again between slices.
//!
//! # How
//! An operation that may be long takes a [`Sections`] instead of a token: something that opens guarded
//! sections one after another. [`ProviderSections`] enters a fresh guard of a [`CpuProvider`] for each
//! section (what `Malloc` passes); a [`Guarded`] token is itself a `Sections` whose sections all run inside
//! the one guard the caller holds (no windows: the old behaviour, for callers of the heap's token API).
//! Only the guard is dropped between slices: every lock and source call of a slice is inside its section.
//!
//! # Why it is safe
//! Between slices the operation holds no lock, so it must leave the heap consistent after each slice, and
//! what it is working on must be invisible to others: pages being committed for a span are *allocated* in
//! the page allocator (the scavenger, `release_all` and other allocations only take free pages) and counted
//! in `Heap::pending_npages` (so the accounting equations hold in between, see `heap/mod.rs`); pages being
//! decommitted by the scavenger are taken in the page allocator and counted in `scav_inflight_npages` (see
//! `scavenger.rs`). The span of a large allocation is published in the page map only after its last slice,
//! so nothing can reach it half-committed.
//!
//! # Slice sizes (the bound)
//! The aim is interrupts off for under [`IRQ_OFF_BOUND_INSNS`] instructions per section at 1 CPU, whatever
//! the heap size. Measured in the demo kernel (`cargo xtask bench --kernel --icount`, latency boot; a
//! goheap page is 8 KiB, two 4 KiB frames): a section committing 16 pages took up to 30 814 instructions
//! (mean 22 945: the frame source maps and zeroes each frame; about [`PAGE_COST_INSNS`] a page with the
//! section's share of fixed costs), and a section decommitting 16 pages up to 11 751 (unmap, `invlpg`,
//! frame free: no zeroing). So `COMMIT_SLICE_NPAGES × PAGE_COST_INSNS + SLICE_FIXED_INSNS ≤
//! IRQ_OFF_BOUND_INSNS`, i.e. `8 × 1 900 + 3 000 = 18 200 ≤ 20 000`, and 16 pages per decommit section.
//! A sliced commit that the source refuses (out of memory) releases free committed pages elsewhere in a
//! section of its own and retries in a third (`Heap::commit_in_sections`); the section that takes a large
//! run neither grows the heap (done before, a chunk per section) nor, if it committed pages, publishes the
//! span (done after, in a section of its own): each together with a commit slice went over the bound.
//! The object tier slices its flushes the same way (`object::cpucache::FLUSH_SLICE_OBJS`).

use crate::sync::atomic::Ordering;
use core::ptr::NonNull;

use super::Heap;
use crate::cpu::{CpuProvider, Guarded};
use crate::page::pagealloc::PALLOC_CHUNK_PAGES;
use crate::page::span::Span;
use crate::source::PageSource;
use crate::PAGE_SIZE;

/// The stated bound on one interrupts-off stretch inside goheap at 1 CPU, in instructions (QEMU `-icount`,
/// the demo kernel): what the slice sizes below are chosen for.
pub const IRQ_OFF_BOUND_INSNS: usize = 20_000;

/// Measured cost of committing one page with the demo kernel's frame source, in instructions, with the
/// section's share of its fixed costs: the longest 16-page commit section took 30 814 (`-icount`), about
/// 1 900 a page.
pub const PAGE_COST_INSNS: usize = 1_900;

/// A slice's fixed part, in instructions: entering the guard, the heap lock, the page allocator's checks
/// and bookkeeping (an upper estimate).
pub const SLICE_FIXED_INSNS: usize = 3_000;

/// Pages committed per guarded section when a large allocation (or a large `realloc` in place) commits
/// its run in slices: `COMMIT_SLICE_NPAGES × PAGE_COST_INSNS + SLICE_FIXED_INSNS = 18 200 ≤
/// IRQ_OFF_BOUND_INSNS`.
pub const COMMIT_SLICE_NPAGES: usize = 8;

/// Pages decommitted per guarded section by the scavenger's unlocked path (background step, `release_all`,
/// growth and memory-limit scavenging): 16, measured at 11 751 instructions at most per section (a
/// decommit costs the frame source less than a commit: no zeroing), under `IRQ_OFF_BOUND_INSNS`.
pub const DECOMMIT_SLICE_NPAGES: usize = 16;

/// Largest span whose page map a sliced allocation stores inside its guarded section (one store per page,
/// a few instructions each); a larger one is published with its map stores outside the guard.
pub const PUBLISH_IN_SECTION_NPAGES: usize = 1024;

/// Chunks (4 MiB each) a sliced large allocation grows the heap by per guarded section: a chunk's metadata
/// is 4 KiB of page map (512 entries) and a few hundred bytes of bitmaps and summaries (a page of each
/// summary level the first time it is reached), so a growth step commits at most a few pages.
pub const GROW_SLICE_CHUNKS: usize = 1;

const _: () = assert!(COMMIT_SLICE_NPAGES * PAGE_COST_INSNS + SLICE_FIXED_INSNS <= IRQ_OFF_BOUND_INSNS);

/// Opens guarded sections one after another (see the module docs): a long operation does each slice of
/// its work inside one [`Sections::section`] call, with the token it is given there.
pub trait Sections {
    /// Whether sections are separate guards (with interrupt windows between them). When `false`, every
    /// section runs inside one guard the caller holds, and slicing only costs time: callers may then do the
    /// whole operation in one piece.
    fn windows(&self) -> bool;

    /// Runs `f` inside a guarded section, with the section's token.
    fn section<R>(&mut self, f: impl FnOnce(Guarded<'_>) -> R) -> R;
}

/// Every section inside the caller's one guard (no interrupt windows): the heap's token API.
impl Sections for Guarded<'_> {
    #[inline]
    fn windows(&self) -> bool {
        false
    }

    #[inline]
    fn section<R>(&mut self, f: impl FnOnce(Guarded<'_>) -> R) -> R {
        f(*self)
    }
}

/// Sections that each enter a fresh guard of a [`CpuProvider`] (and drop it at their end): interrupts may
/// run between them. The caller must not hold a guard of the same provider on this CPU or thread (else the
/// inner guards nest in it and there are no windows; still correct).
pub struct ProviderSections<'p, P: CpuProvider>(pub &'p P);

impl<P: CpuProvider> core::fmt::Debug for ProviderSections<'_, P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ProviderSections")
    }
}

impl<P: CpuProvider> Sections for ProviderSections<'_, P> {
    #[inline]
    fn windows(&self) -> bool {
        true
    }

    #[inline]
    fn section<R>(&mut self, f: impl FnOnce(Guarded<'_>) -> R) -> R {
        let (guard, _) = self.0.enter();
        // SAFETY: `guard` is the provider's guard and lives until after `f` returns; the token's lifetime is
        // bounded by this call (`f` is generic over it).
        let r = f(unsafe { Guarded::new_unchecked() });
        drop(guard);
        r
    }
}

/// Large spans committed in slices.
impl<S: PageSource> Heap<S> {
    /// A large-object span (class 0) of `npages` whose base is aligned to `align` (a power of two), its
    /// pages committed [`COMMIT_SLICE_NPAGES`] per section of `secs`: the run is first taken in the page
    /// allocator under the heap lock (and counted in `pending_npages`), then committed slice by slice, each
    /// slice under the heap lock in a section of its own, and only then published in the page map. With
    /// `fresh_zero` (for a source whose committed memory reads as zero, else `None`), the run's committed
    /// pages are decommitted first, slice by slice, so the span reads as zero (see
    /// [`Heap::alloc_span_fresh_zero`]). A run with at most `COMMIT_SLICE_NPAGES` pages to commit, or
    /// sections without windows, is done in the first section. `None` when the source is out of memory
    /// (after releasing free committed pages and retrying a slice once) or the arena is full: the run goes
    /// back to the page allocator (its committed pages as free committed pages) and the heap is consistent.
    #[must_use]
    pub fn alloc_span_sliced(
        &self,
        secs: &mut impl Sections,
        npages: usize,
        align: usize,
        fresh_zero: bool,
    ) -> Option<NonNull<Span>> {
        if npages == 0 || !align.is_power_of_two() || (fresh_zero && !self.source.commit_zeroes()) {
            return None;
        }
        let align = align.max(PAGE_SIZE);
        let windows = secs.windows();
        // First the heap grows, at most `GROW_SLICE_CHUNKS` chunks per section (their metadata is committed
        // page by page too), until the run fits.
        if windows {
            loop {
                let fits = secs.section(|g| {
                    let mut lk = self.lock_ready(g)?;
                    let inner = &mut *lk;
                    let total = npages.checked_add(align / PAGE_SIZE - 1)?;
                    let grown = inner.pa.grown_npages();
                    let need = grown + total.saturating_sub(inner.pa.free_tail_npages());
                    let have = inner.pa.grown_chunks() * PALLOC_CHUNK_PAGES;
                    // Grown enough: section 2 takes the run without growing (growth there, with a commit and
                    // a publication, made the demo's longest large-allocation sections).
                    if need <= have || inner.pa.find(total).is_some() {
                        return Some(true);
                    }
                    self.grow_locked(inner, 0, have + GROW_SLICE_CHUNKS * PALLOC_CHUNK_PAGES).then_some(false)
                });
                match fits {
                    Some(true) => break,
                    Some(false) => continue,
                    None => return None,
                }
            }
        }
        // A descriptor first, in a section of its own when there are windows (refilling the descriptor
        // allocator commits a block).
        let desc = if windows { secs.section(|g| self.new_descriptor_locked(&mut *self.lock_ready(g)?)) } else { None };
        // Take the run (and a descriptor); finish at once if there is little to commit.
        let (s, idx, needzero, committed) = secs.section(|g| {
            let mut lk = self.lock_ready(g)?;
            let inner = &mut *lk;
            let s = match desc {
                Some(s) => s,
                None => self.new_descriptor_locked(inner)?,
            };
            // SAFETY: `s` was just taken from this allocator and is unused.
            let idx = unsafe { self.alloc_pages_for_locked(inner, s, npages, align) }?;
            let nscav = inner.pa.count_scav(idx, npages);
            let needzero = !(fresh_zero || (nscav == npages && self.source.commit_zeroes()));
            let mut committed = false;
            if !windows || (!fresh_zero && nscav <= COMMIT_SLICE_NPAGES) {
                if !self.commit_slice_locked(inner, idx, npages, fresh_zero) {
                    // SAFETY: as above; the run was taken for `s` just now.
                    unsafe { self.drop_unpublished_locked(inner, s, Some((idx, npages))) };
                    return None;
                }
                // Published in this section only if it committed nothing: a commit of a slice and the map
                // stores of up to `PUBLISH_IN_SECTION_NPAGES` pages together measured up to 28 146
                // instructions in the demo kernel (a mostly committed free run reused).
                if !windows || (npages <= PUBLISH_IN_SECTION_NPAGES && nscav == 0) {
                    self.publish_span(s, idx, npages, 0, needzero);
                    return Some((s, usize::MAX, needzero, true));
                }
                committed = true; // published below, its page map outside the guard
            }
            self.pending_npages.fetch_add(npages, Ordering::Relaxed);
            Some((s, idx, needzero, committed))
        })?;
        if idx != usize::MAX {
            // The slices: the run is allocated in the page allocator and counted in `pending_npages`, so the
            // scavenger, `release_all` and other allocations leave it alone between sections.
            let mut off = if committed { npages } else { 0 };
            while off < npages {
                let k = COMMIT_SLICE_NPAGES.min(npages - off);
                if fresh_zero {
                    // The slice's dirty pages go back first, in a section of their own (a decommit and a
                    // commit of a slice together would take about twice a slice's time).
                    secs.section(|g| self.decommit_committed_locked(&mut self.inner.lock(g), idx + off, k));
                }
                if !self.commit_in_sections(secs, idx + off, k) {
                    // The whole run goes back (committed pages as free committed pages).
                    secs.section(|g| {
                        let mut lk = self.inner.lock(g);
                        self.pending_npages.fetch_sub(npages, Ordering::Relaxed);
                        // SAFETY: `s` and its run were taken in section 2 and never published.
                        unsafe { self.drop_unpublished_locked(&mut lk, s, Some((idx, npages))) };
                    });
                    return None;
                }
                off += k;
            }
            // Publication: the descriptor's fields, then the page map (atomic stores, no lock: no guard
            // needed, so with interrupts on; one store per page), then the counters under the heap lock.
            // Nobody can reach the span before it is returned, so the order only matters for `validate`
            // (quiescent) and bad frees, which find either no span or this one, `InUse`.
            self.write_span_fields(s, idx, npages, 0, needzero);
            self.set_map(idx, npages, s.as_ptr());
            secs.section(|g| {
                let _lk = self.inner.lock(g);
                self.pending_npages.fetch_sub(npages, Ordering::Relaxed);
                self.count_published(npages);
            });
            self.check_map(idx, npages, s.as_ptr());
        }
        self.after_alloc(secs);
        Some(s)
    }

    /// Commits the scavenged pages of the allocated range `[idx, idx + n)` (at most a slice) in a section;
    /// if the source is out of memory, gives free committed pages elsewhere back in a section of their own
    /// and tries once more in a third. (With the release and the retry in the commit's section, as
    /// `commit_range_locked` does, a section took up to twice a slice's time: 28 146 instructions, the
    /// demo's longest large-allocation sections.) `false` as for `commit_range_locked`.
    pub(super) fn commit_in_sections(&self, secs: &mut impl Sections, idx: usize, n: usize) -> bool {
        let commit =
            |secs: &mut _| Sections::section(secs, |g| self.commit_range_once_locked(&mut self.inner.lock(g), idx, n));
        commit(secs)
            || (secs.section(|g| {
                let mut lk = self.inner.lock(g);
                let need = lk.pa.count_scav(idx, n) * PAGE_SIZE;
                self.release_for_commit_locked(&mut lk, need) >= need
            }) && commit(secs))
    }

    /// Commits the scavenged pages of the allocated range `[idx, idx + n)` (with `fresh_zero`, after
    /// decommitting its committed ones, so all of it reads as zero). Heap lock held. `false` as for
    /// `commit_range_locked`.
    fn commit_slice_locked(&self, inner: &mut super::HeapInner, idx: usize, n: usize, fresh_zero: bool) -> bool {
        if fresh_zero {
            self.decommit_committed_locked(inner, idx, n);
        }
        self.commit_range_locked(inner, idx, n)
    }
}
