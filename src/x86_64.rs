//! Kernel adapters for x86_64 (feature `x86_64`): a page source over frames and page tables, and a CPU
//! provider that keeps interrupts off and maps APIC IDs to dense cache indices.
//!
//! See `lib.rs` for an overview of the allocator.
//!
//! These are what a hobby kernel on the `x86_64` crate needs to use goheap as its heap (the demo kernel
//! wires them; see its `heap.rs`):
//!
//! - [`FrameSource`]: a [`PageSource`] that hands out a virtual window, and on `commit` takes frames from
//!   any `FrameAllocator` and maps them with any `Mapper` (e.g. `OffsetPageTable`); on `decommit` it unmaps
//!   the pages, invalidates their TLB entries (locally, and on other CPUs through a shoot-down hook the
//!   kernel supplies) and gives the frames back through `FrameDeallocator`.
//! - [`CpuIndexMap`]: APIC ID → dense cache index, filled as CPUs start (APIC IDs need not be dense).
//! - [`IrqCpus`]: a [`CpuProvider`] whose guard keeps interrupts off for the whole allocator operation and
//!   whose index comes from the kernel through a [`CpuIndex`] (typically a GS-relative per-CPU load,
//!   inlined into the fast path; or a function pointer): for SMP kernels.
//! - [`IrqSingle`]: the same for a kernel that runs goheap on one CPU (index 0, no per-CPU data).
//! - [`IrqsOff`]: interrupts off on this CPU while alive, and the [`Guarded`] token that proves it (the key
//!   to a [`GuardedMutex`](crate::cpu::GuardedMutex)).
//!
//! With the feature `bootloader_api` (a kernel booted by the `bootloader` crate 0.11):
//!
//! - `BootFrames`: a frame allocator over the boot memory map that takes frames back (a free stack
//!   threaded through the free frames), for `FrameSource` and the rest of the kernel.
//! - `KernelHeap`: the whole heap in one `static` (window, frames, page source, CPU provider), set up by
//!   one `init` call, usable as `#[global_allocator]`. The pieces stay reachable (`source()`, `frames()`,
//!   and every `Malloc` method through `Deref`).
//!
//! With either, every public entry point of `Malloc` may be called from an interrupt handler (not from an
//! NMI handler): see "Interrupts and signals" in `cpu.rs`. Both work by value (`Malloc<_, IrqSingle>`) or
//! by reference (`Malloc<_, &'static IrqCpus>`).
//!
//! The data structures need no privileged instruction and are tested on the host; the instruction
//! wrappers (`cli`, `invlpg`) only run inside the kernel.

use crate::cpu::{CpuProvider, Guarded, MAX_CPUS};
use crate::source::PageSource;
use crate::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use core::marker::PhantomData;
use core::ptr::NonNull;
use x86_64::structures::paging::{FrameAllocator, FrameDeallocator, Mapper, Page, PageTableFlags, PhysFrame, Size4KiB};
use x86_64::VirtAddr;

#[cfg(feature = "bootloader_api")]
mod frames;
#[cfg(feature = "bootloader_api")]
mod kernel;
#[cfg(feature = "bootloader_api")]
pub use frames::{BootFrames, FrameCounts, LOW_MEMORY_END, MAX_RANGES};
#[cfg(feature = "bootloader_api")]
pub use kernel::{InitError, KernelHeap, KernelSource};

/// APIC IDs the map covers: xAPIC IDs are 8 bits.
pub const MAX_APIC_ID: usize = 256;
const NO_INDEX: u16 = u16::MAX;

/// APIC ID → dense cache index (`0..MAX_CPUS`), assigned in the order CPUs register.
///
/// Invariant: indices handed out are `0..count`, each to exactly one APIC ID, never reassigned.
#[derive(Debug)]
pub struct CpuIndexMap {
    index_of: [AtomicU16; MAX_APIC_ID],
    count: AtomicUsize,
}

impl Default for CpuIndexMap {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuIndexMap {
    /// An empty map.
    pub const fn new() -> Self {
        CpuIndexMap { index_of: [const { AtomicU16::new(NO_INDEX) }; MAX_APIC_ID], count: AtomicUsize::new(0) }
    }

    /// Gives `apic_id` a cache index (the same one if it has one already). `None` if the APIC ID is out of
    /// range or all `MAX_CPUS` indices are taken.
    pub fn register(&self, apic_id: u32) -> Option<usize> {
        let slot = self.index_of.get(apic_id as usize)?;
        let cur = slot.load(Ordering::Acquire);
        if cur != NO_INDEX {
            return Some(cur as usize);
        }
        let idx = self.count.fetch_add(1, Ordering::AcqRel);
        if idx >= MAX_CPUS {
            self.count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        match slot.compare_exchange(NO_INDEX, idx as u16, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Some(idx),
            // Registered concurrently by the same CPU (cannot happen in practice); keep the winner's index.
            // The index `idx` stays unused.
            Err(winner) => Some(winner as usize),
        }
    }

    /// The cache index of `apic_id`, if registered.
    #[inline]
    pub fn index_of(&self, apic_id: u32) -> Option<usize> {
        let v = self.index_of.get(apic_id as usize)?.load(Ordering::Acquire);
        (v != NO_INDEX).then_some(v as usize)
    }

    /// Number of registered CPUs.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire).min(MAX_CPUS)
    }

    /// True when no CPU registered yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where [`IrqCpus`] reads the running CPU's dense cache index: the kernel's per-CPU data, inlined into
/// goheap's fast path.
///
/// [`CpuIndex::current`] returns the running CPU's dense cache index (`0..MAX_CPUS`, each CPU its own),
/// or `None` before the CPU has one (early boot). [`IrqCpus`] calls it with interrupts off on every
/// allocation and free, so it must be cheap and must not allocate, take a lock that an allocating
/// interrupt handler could hold, or fault. An index of `MAX_CPUS` or more counts as `None`.
///
/// Implement it on a zero-sized type whose `current` reads the index directly (a GS-relative load of the
/// kernel's per-CPU block, marked `#[inline]`): the read is then compiled into goheap's fast path, with no
/// call. A plain function pointer `fn() -> Option<usize>` implements it too (what [`IrqCpus::new`] takes):
/// an indirect call per operation, and the call makes the fast path save and restore registers.
///
/// ```no_run
/// use goheap::x86_64::{CpuIndex, IrqCpus};
///
/// /// The kernel's per-CPU block keeps the dense index at `gs:[8]`; `usize::MAX` there means "none yet".
/// struct GsIndex;
///
/// impl CpuIndex for GsIndex {
///     #[inline]
///     fn current(&self) -> Option<usize> {
///         let index: usize;
///         // SAFETY: GS base points at this CPU's per-CPU block (set before the CPU allocates).
///         unsafe { core::arch::asm!("mov {}, gs:[8]", out(reg) index, options(nostack, readonly, preserves_flags)) };
///         Some(index) // out of range (`usize::MAX`): `IrqCpus` takes it as `None`
///     }
/// }
///
/// static CPUS: IrqCpus<GsIndex> = IrqCpus::with_index(GsIndex);
/// ```
pub trait CpuIndex: Sync {
    /// The running CPU's dense cache index, or `None` (see the trait docs). Called with interrupts off.
    fn current(&self) -> Option<usize>;
}

/// A kernel function giving the index (the form `IrqCpus::new` takes): called through the pointer.
impl CpuIndex for fn() -> Option<usize> {
    #[inline]
    fn current(&self) -> Option<usize> {
        self()
    }
}

/// A CPU provider for kernels: interrupts off for the whole operation, index from a [`CpuIndex`].
///
/// The index comes from `I` (by default a function pointer, as [`IrqCpus::new`] takes; a type whose read
/// is inlined, through [`IrqCpus::with_index`], keeps the fast path free of calls). It runs with
/// interrupts off and must not allocate. A per-CPU busy flag turns a re-entrant call (an exception
/// handler that allocates while the allocator runs) into `None`, the shared-cache path.
#[derive(Debug)]
pub struct IrqCpus<I: CpuIndex = fn() -> Option<usize>> {
    index: I,
    busy: [AtomicBool; MAX_CPUS],
}

impl IrqCpus {
    /// A provider reading the CPU index with `current_index`, through the function pointer (one indirect
    /// call per operation; [`IrqCpus::with_index`] over a [`CpuIndex`] type avoids it).
    pub const fn new(current_index: fn() -> Option<usize>) -> Self {
        IrqCpus::with_index(current_index)
    }
}

impl<I: CpuIndex> IrqCpus<I> {
    /// A provider reading the CPU index from `index` (see [`CpuIndex`]).
    pub const fn with_index(index: I) -> Self {
        IrqCpus { index, busy: [const { AtomicBool::new(false) }; MAX_CPUS] }
    }

    /// The index source.
    pub fn index(&self) -> &I {
        &self.index
    }

    /// The running CPU's index if its busy flag is clear; then marks it busy when `claim`. Called with
    /// interrupts off.
    #[inline(always)]
    fn take(&self, claim: bool) -> (Option<&AtomicBool>, Option<usize>) {
        match self.index.current() {
            Some(i) if i < MAX_CPUS && !self.busy[i].load(Ordering::Acquire) => {
                if claim {
                    self.busy[i].store(true, Ordering::Relaxed);
                    (Some(&self.busy[i]), Some(i))
                } else {
                    (None, Some(i))
                }
            }
            _ => (None, None),
        }
    }
}

/// Keeps interrupts off while alive; restores them (if they were on) and clears the busy flag on drop.
#[derive(Debug)]
pub struct IrqGuard<'a> {
    busy: Option<&'a AtomicBool>,
    /// RFLAGS as it was before `cli`: interrupts come back on if its IF bit was set.
    rflags: u64,
}

impl IrqGuard<'_> {
    /// Whether interrupts were on when the guard was taken (and come back on when it drops).
    #[inline]
    pub fn were_enabled(&self) -> bool {
        self.rflags & mask::IF != 0
    }
}

impl Drop for IrqGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if let Some(b) = self.busy {
            b.store(false, Ordering::Release);
        }
        if self.rflags & mask::IF != 0 {
            mask::enable();
        }
    }
}

/// Interrupts off on this CPU from [`IrqsOff::new`] until drop (then back on if they were on), and the
/// [`Guarded`] token that proves it: how code outside the allocator takes a goheap-style
/// [`GuardedMutex`](crate::cpu::GuardedMutex) (as `BootFrames` does for its lock). Not `Send`: it
/// speaks of one CPU.
#[derive(Debug)]
pub struct IrqsOff {
    rflags: u64,
    _this_cpu: PhantomData<*const ()>,
}

impl IrqsOff {
    /// Turns interrupts off (`cli`) on this CPU. Kernel mode only: `cli` faults in user mode.
    #[inline]
    #[allow(clippy::new_without_default)] // a `Default` that executes `cli` would surprise
    pub fn new() -> Self {
        IrqsOff { rflags: mask::save_and_disable(), _this_cpu: PhantomData }
    }

    /// The token for goheap's locks, valid while interrupts stay off.
    #[inline]
    pub fn token(&self) -> Guarded<'_> {
        // SAFETY: interrupts are off on this CPU until `self` drops, and the token cannot outlive `self`, so
        // no interrupt handler runs here meanwhile (NMI handlers must not call goheap: the module contract).
        unsafe { Guarded::new_unchecked() }
    }
}

impl Drop for IrqsOff {
    #[inline]
    fn drop(&mut self) {
        if self.rflags & mask::IF != 0 {
            mask::enable();
        }
    }
}

/// The interrupt flag: `pushfq; pop; cli` to save and mask, `sti; nop` to restore. The guards keep the
/// saved RFLAGS and test its IF bit when they drop (no `popf`, which is slow on some cores). The `nop`
/// after `sti` is kept: without it, the `irq_single` test kernel (goheap calls in a loop with interrupts
/// on, an allocating timer handler) made almost no progress under QEMU's TCG while its handler kept
/// running, and timed out (step 200 of 600 after 5 minutes, twice); with it, it passes in seconds. The
/// likely cause is `sti`'s interrupt shadow (an interrupt is taken only after the instruction that follows
/// `sti`) meeting TCG, which looks for pending interrupts at translation-block boundaries: the `nop` gives
/// the shadow an instruction of its own, so the block can end with interrupts deliverable, before the
/// loop's next `cli`. On hardware the `nop` costs nothing measurable.
#[cfg(not(test))]
mod mask {
    /// RFLAGS' interrupt-enable bit.
    pub const IF: u64 = 1 << 9;

    /// Reads RFLAGS, then turns interrupts off; returns the RFLAGS read.
    #[inline(always)]
    pub fn save_and_disable() -> u64 {
        let rflags: u64;
        // SAFETY: `pushfq`/`pop` read RFLAGS through the stack (balanced); `cli` masks interrupts on this CPU
        // (kernel mode: the callers' contract, as `IrqsOff::new` and the providers state). Not `nomem`: the
        // block orders memory accesses as a lock acquisition would.
        unsafe { core::arch::asm!("pushfq", "pop {}", "cli", out(reg) rflags, options(preserves_flags)) };
        rflags
    }

    /// Turns interrupts on (`sti; nop`: see the module's note on the `nop`).
    #[inline(always)]
    pub fn enable() {
        // SAFETY: `sti` only unmasks interrupts on this CPU (the `nop` does nothing); called when they were
        // on before the guard. Not `nomem`: the block orders memory accesses as a lock release would.
        unsafe { core::arch::asm!("sti", "nop", options(preserves_flags, nostack)) };
    }
}

/// The host's stand-in for the interrupt flag (unit tests: `cli` faults in user mode): a thread-local flag,
/// so the providers' logic (index, busy flags, what the guards restore) is tested on the host.
#[cfg(test)]
mod mask {
    use std::cell::Cell;

    /// RFLAGS' interrupt-enable bit.
    pub const IF: u64 = 1 << 9;

    std::thread_local! {
        /// This thread's "interrupts enabled" flag.
        pub static ENABLED: Cell<bool> = const { Cell::new(true) };
    }

    /// Returns "RFLAGS" (only IF) and clears the flag.
    pub fn save_and_disable() -> u64 {
        ENABLED.with(|e| if e.replace(false) { IF } else { 0 })
    }

    /// Sets the flag.
    pub fn enable() {
        ENABLED.with(|e| e.set(true));
    }
}

// SAFETY: an index is returned only to code running on that CPU with interrupts off, and only while the
// CPU's busy flag was clear; `enter` sets the flag until the guard drops (a leaf section runs to its end
// with interrupts off and calls nothing, so nothing on the CPU can enter in between). Another CPU never gets
// the same index (the `CpuIndex` contract: each CPU its own, as `CpuIndexMap` never hands an index out
// twice), and indices of `MAX_CPUS` or more are refused. Interrupts off on one CPU plus the flag give
// exclusivity; Release/Acquire on the flag orders the sections. `&IrqCpus` is a provider too (the blanket
// impl for references).
unsafe impl<I: CpuIndex> CpuProvider for IrqCpus<I> {
    type Guard<'a>
        = IrqGuard<'a>
    where
        I: 'a;

    #[inline]
    fn enter(&self) -> (IrqGuard<'_>, Option<usize>) {
        let rflags = mask::save_and_disable();
        let (busy, idx) = self.take(true);
        (IrqGuard { busy, rflags }, idx)
    }

    type LeafGuard<'a>
        = IrqGuard<'a>
    where
        I: 'a;

    /// As `enter`, with interrupts off, but reading the busy flag without setting it: a leaf section calls
    /// nothing, so only an exception handler could re-enter it, and an allocator fault is a bug either way.
    #[inline]
    fn enter_leaf(&self) -> (IrqGuard<'_>, Option<usize>) {
        let rflags = mask::save_and_disable();
        let (_, idx) = self.take(false);
        (IrqGuard { busy: None, rflags }, idx)
    }
}

/// A CPU provider for a kernel that runs goheap on one CPU: interrupts off for the whole operation (as
/// [`IrqCpus`]), cache index 0, no per-CPU data needed. The interrupt-safe choice where `NoCpuCache` (which
/// masks nothing) would hang as soon as an interrupt handler allocates.
///
/// Usable in a `static`, by value (`Malloc<_, IrqSingle>`) or by reference.
#[derive(Debug)]
pub struct IrqSingle {
    busy: AtomicBool,
}

impl IrqSingle {
    /// The provider.
    ///
    /// # Safety
    /// Only one CPU ever calls into the allocators that use it (a uniprocessor kernel, or one whose other
    /// CPUs never touch these heaps): cache index 0 is exclusive only because interrupts are off on the one
    /// CPU. A kernel that starts more CPUs uses [`IrqCpus`].
    pub const unsafe fn new() -> Self {
        IrqSingle { busy: AtomicBool::new(false) }
    }
}

// SAFETY: index 0 is returned only with interrupts off, on the one CPU that uses the provider (the
// constructor's contract), and only while the busy flag is clear; `enter` sets the flag until its guard
// drops, so a re-entrant call (an exception handler that allocates) gets `None`. A leaf section runs to its
// end with interrupts off and calls nothing.
unsafe impl CpuProvider for IrqSingle {
    type Guard<'a> = IrqGuard<'a>;

    #[inline]
    fn enter(&self) -> (IrqGuard<'_>, Option<usize>) {
        let rflags = mask::save_and_disable();
        if self.busy.load(Ordering::Relaxed) {
            return (IrqGuard { busy: None, rflags }, None);
        }
        self.busy.store(true, Ordering::Relaxed);
        (IrqGuard { busy: Some(&self.busy), rflags }, Some(0))
    }

    type LeafGuard<'a> = IrqGuard<'a>;

    #[inline]
    fn enter_leaf(&self) -> (IrqGuard<'_>, Option<usize>) {
        let rflags = mask::save_and_disable();
        let idx = if self.busy.load(Ordering::Relaxed) { None } else { Some(0) };
        (IrqGuard { busy: None, rflags }, idx)
    }
}

// The providers work by value and by reference (a compile-time check).
const _: fn() = || {
    fn provider<P: CpuProvider>() {}
    struct Inline;
    impl CpuIndex for Inline {
        fn current(&self) -> Option<usize> {
            None
        }
    }
    provider::<IrqCpus>();
    provider::<&IrqCpus>();
    provider::<IrqCpus<Inline>>();
    provider::<&IrqCpus<Inline>>();
    provider::<IrqSingle>();
    provider::<&IrqSingle>();
};

/// Invalidates other CPUs' TLB entries for `[start, start + nbytes)` and returns once they did (e.g. by an
/// NMI IPI, which also reaches CPUs spinning on a goheap lock with interrupts off). Called after the pages
/// were unmapped and before their frames are reused.
pub type ShootdownHook = fn(start: u64, nbytes: usize);

#[derive(Debug)]
struct FrameInner<M, F> {
    mapper: M,
    frames: F,
    /// Next unreserved address in the window.
    next: u64,
}

/// A page source over a kernel's frame allocator and page tables (see the module docs).
///
/// Committed memory is zeroed through `zero` (the frames as mapped) so `commit_zeroes()` is true.
#[derive(Debug)]
pub struct FrameSource<M, F> {
    inner: spin::Mutex<Option<FrameInner<M, F>>>,
    window_start: u64,
    window_end: u64,
    shootdown: Option<ShootdownHook>,
    committed_frames: AtomicUsize,
    total_commits: AtomicUsize,
    total_decommits: AtomicUsize,
}

impl<M, F> FrameSource<M, F>
where
    M: Mapper<Size4KiB> + Send,
    F: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB> + Send,
{
    /// A source over the virtual window `[window_start, window_start + window_bytes)`, usable once
    /// [`FrameSource::init`] gave it the mapper and frame allocator. Before that, `reserve` fails (the heap
    /// then returns null; early allocations belong on a boot heap).
    pub const fn new(window_start: u64, window_bytes: u64, shootdown: Option<ShootdownHook>) -> Self {
        FrameSource {
            inner: spin::Mutex::new(None),
            window_start,
            window_end: window_start + window_bytes,
            shootdown,
            committed_frames: AtomicUsize::new(0),
            total_commits: AtomicUsize::new(0),
            total_decommits: AtomicUsize::new(0),
        }
    }

    /// Hands the source its mapper and frame allocator.
    ///
    /// # Safety
    /// The window is unused virtual address space that only this source maps; `mapper` maps the active
    /// page tables; `frames` hands out frames nothing else uses.
    pub unsafe fn init(&self, mapper: M, frames: F) {
        *self.inner.lock() = Some(FrameInner { mapper, frames, next: self.window_start });
    }

    /// Runs `f` on the page-table mapper, under the source's lock (so a kernel can map other things, such as
    /// MMIO windows, through the same mapper instead of a second one aliasing the same tables).
    pub fn with_mapper<R>(&self, f: impl FnOnce(&mut M, &mut F) -> R) -> Option<R> {
        self.inner.lock().as_mut().map(|i| f(&mut i.mapper, &mut i.frames))
    }

    /// Runs `f` on the frame allocator (e.g. to read its free count for a report).
    pub fn with_frames<R>(&self, f: impl FnOnce(&mut F) -> R) -> Option<R> {
        self.inner.lock().as_mut().map(|i| f(&mut i.frames))
    }

    /// 4 KiB frames currently mapped into the window by `commit`.
    pub fn committed_frames(&self) -> usize {
        self.committed_frames.load(Ordering::Relaxed)
    }

    /// Cumulative `commit` and `decommit` calls.
    pub fn commit_counts(&self) -> (usize, usize) {
        (self.total_commits.load(Ordering::Relaxed), self.total_decommits.load(Ordering::Relaxed))
    }

    /// Undoes a partial `commit`: unmaps and frees the first `npages` pages at `start`.
    fn unmap_range(inner: &mut FrameInner<M, F>, start: u64, npages: u64) {
        for i in 0..npages {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(start + i * 4096));
            if let Ok((frame, flush)) = inner.mapper.unmap(page) {
                flush.flush();
                // SAFETY: the frame was mapped moments ago by the failing `commit` and never handed out, so
                // no code used the page; it is unmapped and flushed locally now.
                unsafe { inner.frames.deallocate_frame(frame) };
            }
        }
    }
}

// SAFETY: `reserve` hands out disjoint ranges of a window only this source maps; `commit` maps fresh frames
// read-write (zeroed) for every page of the range or, on failure, unmaps what it mapped and reports false;
// `decommit` unmaps only the given range; all of it under one lock, from any CPU (the types are Send). The
// source never allocates from a heap.
unsafe impl<M, F> PageSource for FrameSource<M, F>
where
    M: Mapper<Size4KiB> + Send,
    F: FrameAllocator<Size4KiB> + FrameDeallocator<Size4KiB> + Send,
{
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        let mut g = self.inner.lock();
        let inner = g.as_mut()?;
        let start = inner.next.checked_next_multiple_of(align as u64)?;
        let end = start.checked_add(nbytes as u64)?;
        if end > self.window_end {
            return None;
        }
        inner.next = end;
        NonNull::new(start as *mut u8)
    }

    unsafe fn commit(&self, addr: NonNull<u8>, nbytes: usize) -> bool {
        let start = addr.as_ptr() as u64;
        let npages = nbytes as u64 / 4096;
        let mut g = self.inner.lock();
        let Some(inner) = g.as_mut() else { return false };
        let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
        for i in 0..npages {
            let page = Page::<Size4KiB>::containing_address(VirtAddr::new(start + i * 4096));
            let Some(frame): Option<PhysFrame<Size4KiB>> = inner.frames.allocate_frame() else {
                Self::unmap_range(inner, start, i);
                return false;
            };
            // SAFETY: the page is in our window and unmapped (the caller commits uncommitted ranges only);
            // the frame is fresh from the allocator.
            match unsafe { inner.mapper.map_to(page, frame, flags, &mut inner.frames) } {
                Ok(flush) => flush.flush(),
                Err(_) => {
                    // SAFETY: the frame was never mapped.
                    unsafe { inner.frames.deallocate_frame(frame) };
                    Self::unmap_range(inner, start, i);
                    return false;
                }
            }
            // SAFETY: the page was just mapped read-write to a frame only we use.
            unsafe { core::ptr::write_bytes((start + i * 4096) as *mut u8, 0, 4096) };
        }
        self.committed_frames.fetch_add(npages as usize, Ordering::Relaxed);
        self.total_commits.fetch_add(1, Ordering::Relaxed);
        true
    }

    unsafe fn decommit(&self, addr: NonNull<u8>, nbytes: usize) {
        let start = addr.as_ptr() as u64;
        let npages = nbytes as u64 / 4096;
        let mut g = self.inner.lock();
        let Some(inner) = g.as_mut() else { return };
        // Unmap first (local TLB flushed page by page), then make other CPUs drop their entries, and only
        // then hand the frames back: so no CPU can reach a frame through a stale entry once it is reused.
        let mut frames: [Option<PhysFrame<Size4KiB>>; 64] = [None; 64];
        let mut done = 0;
        while done < npages {
            let batch = (npages - done).min(64);
            for (k, slot) in frames.iter_mut().enumerate().take(batch as usize) {
                let page = Page::<Size4KiB>::containing_address(VirtAddr::new(start + (done + k as u64) * 4096));
                *slot = match inner.mapper.unmap(page) {
                    Ok((frame, flush)) => {
                        flush.flush();
                        Some(frame)
                    }
                    Err(_) => None,
                };
            }
            if let Some(shootdown) = self.shootdown {
                shootdown(start + done * 4096, batch as usize * 4096);
            }
            for slot in frames.iter_mut().take(batch as usize) {
                if let Some(frame) = slot.take() {
                    // SAFETY: unmapped here and shot down everywhere: nothing reaches the frame any more.
                    unsafe { inner.frames.deallocate_frame(frame) };
                }
            }
            done += batch;
        }
        self.committed_frames.fetch_sub(npages as usize, Ordering::Relaxed);
        self.total_decommits.fetch_add(1, Ordering::Relaxed);
    }

    fn commit_zeroes(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_ids_get_dense_indices_even_with_gaps() {
        let m = CpuIndexMap::new();
        assert!(m.is_empty());
        // A topology with gaps: sockets of 2 cores x 2 threads give IDs 0,1,2,3 then 8,9,...
        let ids = [0u32, 1, 4, 5, 8, 9, 12, 13];
        let got: std::vec::Vec<usize> = ids.iter().map(|&id| m.register(id).unwrap()).collect();
        assert_eq!(got, (0..ids.len()).collect::<std::vec::Vec<_>>());
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(m.index_of(id), Some(i));
            assert_eq!(m.register(id), Some(i), "re-registering keeps the index");
        }
        assert_eq!(m.index_of(2), None);
        assert_eq!(m.index_of(300), None);
        assert_eq!(m.register(300), None);
        assert_eq!(m.len(), ids.len());
    }

    /// A `CpuIndex` that returns whatever the test set for the current thread (a "CPU" per thread).
    struct FixedIndex;

    std::thread_local! {
        static INDEX: core::cell::Cell<Option<usize>> = const { core::cell::Cell::new(None) };
    }

    impl CpuIndex for FixedIndex {
        fn current(&self) -> Option<usize> {
            INDEX.with(|c| c.get())
        }
    }

    fn interrupts_enabled() -> bool {
        mask::ENABLED.with(|e| e.get())
    }

    #[test]
    fn irq_cpus_gives_the_cpus_index_and_refuses_reentry() {
        let cpus = IrqCpus::with_index(FixedIndex);
        std::thread::scope(|s| {
            s.spawn(|| {
                // No index yet (early boot): no cache, but interrupts are off all the same.
                assert!(interrupts_enabled());
                let (g, i) = cpus.enter_leaf();
                assert_eq!(i, None);
                assert!(!interrupts_enabled(), "the guard masks interrupts without an index too");
                drop(g);
                assert!(interrupts_enabled(), "dropping the guard restores them");

                INDEX.with(|c| c.set(Some(5)));
                assert_eq!(cpus.enter_leaf().1, Some(5));
                let (outer, i) = cpus.enter();
                assert_eq!(i, Some(5));
                assert!(!interrupts_enabled());
                // Re-entry on the same CPU while the full section is open (an exception handler that
                // allocates): both kinds of section are refused the index and keep interrupts off.
                let (inner, j) = cpus.enter();
                assert_eq!(j, None, "re-entrant enter got the busy index");
                assert_eq!(cpus.enter_leaf().1, None, "leaf section inside an enter section got the index");
                drop(inner);
                assert!(!interrupts_enabled(), "an inner guard must not turn interrupts on inside the outer");
                assert_eq!(cpus.enter_leaf().1, None, "the inner guard cleared the outer's busy flag");
                drop(outer);
                assert!(interrupts_enabled());
                assert_eq!(cpus.enter().1, Some(5), "the index is free again after the section");
                // A leaf section leaves no mark.
                drop(cpus.enter_leaf());
                assert_eq!(cpus.enter().1, Some(5));

                // Indices out of range are refused, not used.
                INDEX.with(|c| c.set(Some(MAX_CPUS)));
                assert_eq!(cpus.enter().1, None);
                assert_eq!(cpus.enter_leaf().1, None);
                INDEX.with(|c| c.set(Some(usize::MAX)));
                assert_eq!(cpus.enter().1, None);
            });
            // Another "CPU" (thread) with its own index is not blocked by CPU 5's open section.
            s.spawn(|| {
                INDEX.with(|c| c.set(Some(7)));
                let (g, i) = cpus.enter();
                assert_eq!(i, Some(7));
                drop(g);
            });
        });
    }

    #[test]
    fn irq_guards_restore_the_interrupt_state_they_found() {
        std::thread::spawn(|| {
            let cpus = IrqCpus::with_index(FixedIndex);
            INDEX.with(|c| c.set(Some(0)));
            // Entered with interrupts already off (an interrupt handler, or code under `IrqsOff`): the guard
            // must leave them off when it drops.
            let off = IrqsOff::new();
            assert!(!interrupts_enabled());
            let (g, i) = cpus.enter();
            assert_eq!(i, Some(0));
            assert!(!g.were_enabled());
            drop(g);
            assert!(!interrupts_enabled(), "a guard taken with interrupts off turned them on");
            drop(cpus.enter_leaf());
            assert!(!interrupts_enabled());
            drop(off);
            assert!(interrupts_enabled());
            let (g, _) = cpus.enter_leaf();
            assert!(g.were_enabled());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn irq_cpus_over_a_function_pointer_still_works() {
        fn three() -> Option<usize> {
            Some(3)
        }
        std::thread::spawn(|| {
            static CPUS: IrqCpus = IrqCpus::new(three);
            let (g, i) = CPUS.enter();
            assert_eq!(i, Some(3));
            assert_eq!(CPUS.enter().1, None);
            drop(g);
            // By reference too (`Malloc<_, &'static IrqCpus>`).
            let by_ref: &IrqCpus = &CPUS;
            assert_eq!(CpuProvider::enter_leaf(&by_ref).1, Some(3));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn irq_single_refuses_reentry() {
        std::thread::spawn(|| {
            // SAFETY: only this thread uses the provider.
            let one = unsafe { IrqSingle::new() };
            let (g, i) = one.enter();
            assert_eq!(i, Some(0));
            assert_eq!(one.enter().1, None);
            assert_eq!(one.enter_leaf().1, None);
            drop(g);
            assert!(interrupts_enabled());
            assert_eq!(one.enter_leaf().1, Some(0));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn indices_run_out_at_max_cpus() {
        let m = CpuIndexMap::new();
        for id in 0..MAX_CPUS as u32 {
            assert_eq!(m.register(id * 2), Some(id as usize));
        }
        assert_eq!(m.register(255), None);
        assert_eq!(m.len(), MAX_CPUS);
    }
}
