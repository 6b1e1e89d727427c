//! [`KernelHeap`]: goheap as a kernel's heap in one `static` and one `init` call (feature `bootloader_api`).
//!
//! See `lib.rs` for an overview of the allocator and `x86_64.rs` for the kernel adapters it puts together:
//! a [`BootFrames`] frame allocator over the boot memory map, a [`FrameSource`] mapping those frames into a
//! virtual window through an `OffsetPageTable` on the active page tables, and a [`Malloc`] over that source
//! with the kernel's CPU provider. The window is sized from the arena bound, given once.

use super::{BootFrames, FrameSource, ShootdownHook};
use crate::cpu::CpuProvider;
use crate::malloc::Malloc;
use crate::page::heap::reservation_bytes;
use crate::page::pagealloc::PALLOC_CHUNK_BYTES;
use crate::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use bootloader_api::info::MemoryRegion;
use bootloader_api::BootInfo;
use core::alloc::{GlobalAlloc, Layout};
use x86_64::registers::control::Cr3;
use x86_64::structures::paging::{OffsetPageTable, PageTable};
use x86_64::VirtAddr;

/// The page source of a [`KernelHeap`]: frames from its [`BootFrames`], mapped through an `OffsetPageTable`.
pub type KernelSource = FrameSource<OffsetPageTable<'static>, &'static BootFrames>;

/// Bytes one level-4 page-table entry maps (512 GiB).
const L4_SPAN: u64 = 1 << 39;
/// The end of the lower canonical half: the window must lie below it.
const LOWER_HALF_END: u64 = 1 << 47;

const UNINIT: u8 = 0;
const INITIALISING: u8 = 1;
const READY: u8 = 2;

/// Why [`KernelHeap::init`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitError {
    /// `BootInfo::physical_memory_offset` is missing: set `mappings.physical_memory =
    /// Some(Mapping::Dynamic)` in the `BootloaderConfig` given to `entry_point!`.
    NoPhysicalMemoryMapping,
    /// Level-4 entry `index`, inside the heap window, already maps something: pick another window start.
    WindowInUse {
        /// The level-4 page-table index.
        index: usize,
    },
    /// `init` ran before (or is running on another CPU).
    AlreadyInitialised,
}

impl core::fmt::Display for InitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InitError::NoPhysicalMemoryMapping => f.write_str(
                "the bootloader did not map physical memory: set mappings.physical_memory = \
                 Some(Mapping::Dynamic) in the BootloaderConfig",
            ),
            InitError::WindowInUse { index } => {
                write!(f, "the heap window overlaps an existing mapping (level-4 entry {index})")
            }
            InitError::AlreadyInitialised => f.write_str("the kernel heap was initialised before"),
        }
    }
}

/// goheap as a kernel's heap: a frame allocator, a page source over a virtual window and the allocator, in
/// one `static`, usable as `#[global_allocator]`.
///
/// - [`KernelHeap::new`] (const) takes the window's start, the arena bound (the most the heap may ever
///   hold; the window is sized from it, metadata included, see [`KernelHeap::window_bytes`]), the CPU
///   provider and the TLB shoot-down hook (`None` on a single CPU).
/// - [`KernelHeap::init`] takes the `BootInfo` (memory map, physical-memory offset) and the active page
///   tables; allocations succeed from then on. Before it, every allocation returns null and logs (through
///   the `log` facade, at error level) a line naming the size and saying the heap is not initialised
///   ([`KernelHeap::refused_before_init`] counts them).
/// - [`KernelHeap::is_ready`], [`KernelHeap::frames`] (free/total counts), [`KernelHeap::source`]
///   (committed frames, the mapper), and every [`Malloc`] method (statistics, `background`,
///   `set_memory_limit`, `release_all`, ...) through `Deref`.
///
/// Frames are taken as the heap grows and given back when the scavenger returns memory; nothing here ever
/// allocates from a heap.
///
/// ```no_run
/// use goheap::x86_64::{IrqSingle, KernelHeap};
///
/// #[global_allocator]
/// // SAFETY: this kernel runs goheap on one CPU.
/// static HEAP: KernelHeap<IrqSingle> =
///     KernelHeap::new(0x4444_0000_0000, 1 << 30, unsafe { IrqSingle::new() }, None);
///
/// fn kernel_main(boot_info: &'static mut bootloader_api::BootInfo) {
///     // SAFETY: the bootloader's BootInfo and page tables, called once before anything allocates.
///     unsafe { HEAP.init(boot_info) }.expect("kernel heap");
///     assert!(HEAP.is_ready());
/// }
/// ```
///
/// With several CPUs, `IrqCpus` (by value) reads each CPU's cache index from the kernel through a
/// [`CpuIndex`](super::CpuIndex) (compiled into goheap's fast path), and the shoot-down hook makes the other
/// CPUs drop stale TLB entries after goheap unmaps heap pages:
///
/// ```no_run
/// use goheap::x86_64::{CpuIndex, CpuIndexMap, IrqCpus, KernelHeap};
///
/// /// APIC ID -> dense cache index; each CPU calls `CPU_MAP.register(its_apic_id)` when it starts.
/// static CPU_MAP: CpuIndexMap = CpuIndexMap::new();
///
/// /// The running CPU's cache index (`None`: not registered yet, goheap uses its shared cache). Runs with
/// /// interrupts off inside goheap and must not allocate; a kernel with per-CPU data reads the index there
/// /// (a GS-relative load, as the demo kernel's `percpu.rs` does), this one asks CPUID for the APIC ID.
/// struct CurrentCpu;
///
/// impl CpuIndex for CurrentCpu {
///     #[inline]
///     #[allow(unused_unsafe)]
///     fn current(&self) -> Option<usize> {
///         // SAFETY: CPUID leaf 1 exists on every x86_64 CPU.
///         let apic_id = unsafe { core::arch::x86_64::__cpuid(1) }.ebx >> 24;
///         CPU_MAP.index_of(apic_id)
///     }
/// }
///
/// /// Invalidates `[start, start + nbytes)` in the other online CPUs' TLBs and returns once they did: an
/// /// NMI IPI reaches CPUs that spin on a goheap lock with interrupts off (its handler must not allocate).
/// fn tlb_shootdown(start: u64, nbytes: usize) {
///     let _ = (start, nbytes); // send the IPI, wait for every CPU's acknowledgement
/// }
///
/// #[global_allocator]
/// static HEAP: KernelHeap<IrqCpus<CurrentCpu>> =
///     KernelHeap::new(0x4444_0000_0000, 4 << 30, IrqCpus::with_index(CurrentCpu), Some(tlb_shootdown));
/// ```
///
/// `IrqCpus::new(f)` over a plain `fn() -> Option<usize>` (the type `KernelHeap<IrqCpus>`) works as well,
/// at the price of an indirect call on every allocation and free.
pub struct KernelHeap<P: CpuProvider> {
    malloc: Malloc<KernelSource, P>,
    frames: BootFrames,
    state: AtomicU8,
    window_start: u64,
    window_bytes: u64,
    refused: AtomicUsize,
    reporting: AtomicBool,
}

impl<P: CpuProvider> KernelHeap<P> {
    /// A heap over the virtual window starting at `window_start` for an arena of at most `max_bytes`
    /// (address space only: frames are taken as the heap grows), with CPU provider `provider` and TLB
    /// shoot-down hook `shootdown` (see [`ShootdownHook`]; `None` for a kernel that runs goheap on one CPU).
    /// Usable in a `static`; nothing happens until [`KernelHeap::init`].
    ///
    /// Panics (at compile time in a `static`) unless `window_start` is a multiple of 4 MiB (the page
    /// allocator's chunk) and the window lies in the lower canonical half; it should lie in level-4 entries
    /// nothing else maps (checked by `init`), e.g. `0x4444_0000_0000` (entry 136).
    ///
    /// ```compile_fail
    /// use goheap::x86_64::{IrqSingle, KernelHeap};
    /// // Not on a 4 MiB boundary: the `static` does not compile.
    /// static HEAP: KernelHeap<IrqSingle> = KernelHeap::new(0x4444_0000_1000, 1 << 30, unsafe { IrqSingle::new() }, None);
    /// ```
    pub const fn new(window_start: u64, max_bytes: usize, provider: P, shootdown: Option<ShootdownHook>) -> Self {
        assert!(window_start % PALLOC_CHUNK_BYTES as u64 == 0, "the heap window must start on a 4 MiB boundary");
        // The arena's reservations plus the heap profile's (made at the first sample).
        let window_bytes = (reservation_bytes(max_bytes) + crate::malloc::PROFILE_RESERVATION_BYTES) as u64;
        assert!(window_start > 0 && window_start < LOWER_HALF_END, "the heap window must lie in the lower half");
        assert!(window_bytes <= LOWER_HALF_END - window_start, "the heap window must end below 1 << 47");
        KernelHeap {
            malloc: Malloc::with_max_bytes(
                FrameSource::new(window_start, window_bytes, shootdown),
                provider,
                max_bytes,
            ),
            frames: BootFrames::new(),
            state: AtomicU8::new(UNINIT),
            window_start,
            window_bytes,
            refused: AtomicUsize::new(0),
            reporting: AtomicBool::new(false),
        }
    }

    /// Sets the heap up from the bootloader's `BootInfo`: its memory map feeds the frame allocator, its
    /// physical-memory offset reaches the active page tables (CR3), which the page source maps the window
    /// with. Call once, on one CPU, before other CPUs allocate.
    ///
    /// # Safety
    /// `boot_info` is what the bootloader passed (its map true, all physical memory mapped read-write at its
    /// offset); the active page tables are the ones the bootloader built for the kernel (reached through
    /// that mapping); from now on nothing else maps pages in the window, creates a `&mut` to the level-4
    /// table, or uses the `Usable` frames at or above 1 MiB except through [`KernelHeap::frames`].
    pub unsafe fn init(&'static self, boot_info: &BootInfo) -> Result<(), InitError> {
        let offset = boot_info.physical_memory_offset.into_option().ok_or(InitError::NoPhysicalMemoryMapping)?;
        // SAFETY: the caller's contract, as the bootloader passed it.
        unsafe { self.init_from(&boot_info.memory_regions, offset) }
    }

    /// As [`KernelHeap::init`], from the memory map and the physical-memory offset (for a kernel that keeps
    /// `BootInfo` elsewhere or builds these itself).
    ///
    /// # Safety
    /// As for [`KernelHeap::init`], with `regions` and `phys_offset` in place of the `BootInfo`.
    pub unsafe fn init_from(&'static self, regions: &[MemoryRegion], phys_offset: u64) -> Result<(), InitError> {
        let (l4_frame, _) = Cr3::read();
        let l4_ptr = phys_offset.wrapping_add(l4_frame.start_address().as_u64()) as *mut PageTable;
        // SAFETY: the active level-4 table, reached through the physical-memory mapping (the caller's
        // contract); this `&mut` is the only one (the contract again) and goes to the mapper.
        let l4: &'static mut PageTable = unsafe { &mut *l4_ptr };
        // SAFETY: `l4` is the active table and all physical memory is mapped at `phys_offset`.
        let mapper = unsafe { OffsetPageTable::new(l4, VirtAddr::new(phys_offset)) };
        // SAFETY: forwarded contract.
        unsafe { self.init_with_mapper(regions, mapper) }
    }

    /// As [`KernelHeap::init_from`], with the kernel's own mapper over the active page tables (the physical
    /// offset is the mapper's). The mapper goes to the page source; reach it later with
    /// `source().with_mapper(..)` to map other things through the same tables.
    ///
    /// # Safety
    /// As for [`KernelHeap::init`]; `mapper` maps the active page tables and no other mapper edits the
    /// level-4 entries of the window.
    pub unsafe fn init_with_mapper(
        &'static self,
        regions: &[MemoryRegion],
        mapper: OffsetPageTable<'static>,
    ) -> Result<(), InitError> {
        if self.state.compare_exchange(UNINIT, INITIALISING, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return Err(InitError::AlreadyInitialised);
        }
        let first = (self.window_start / L4_SPAN) as usize;
        let last = ((self.window_start + self.window_bytes - 1) / L4_SPAN) as usize;
        if let Some(index) = (first..=last).find(|&i| !mapper.level_4_table()[i].is_unused()) {
            self.state.store(UNINIT, Ordering::Release);
            return Err(InitError::WindowInUse { index });
        }
        let phys_offset = mapper.phys_offset().as_u64();
        // SAFETY: the caller's contract: the map is true, physical memory is mapped at `phys_offset`, and
        // the usable frames are ours.
        if !unsafe { self.frames.init(regions, phys_offset) } {
            self.state.store(UNINIT, Ordering::Release);
            return Err(InitError::AlreadyInitialised);
        }
        // SAFETY: the window's level-4 entries are empty (checked above) and only this source maps there
        // (the caller's contract); the mapper maps the active tables; the frames are ours alone.
        unsafe { self.malloc.heap().source().init(mapper, &self.frames) };
        self.state.store(READY, Ordering::Release);
        Ok(())
    }

    /// Whether [`KernelHeap::init`] succeeded (allocations can succeed).
    #[inline]
    pub fn is_ready(&self) -> bool {
        self.state.load(Ordering::Acquire) == READY
    }

    /// The frame allocator: free/total counts, a cap for out-of-memory tests, and frames for the rest of
    /// the kernel (`(&*HEAP.frames()).allocate_frame()`).
    pub fn frames(&self) -> &BootFrames {
        &self.frames
    }

    /// The page source: frames committed to the heap, commit counts, the page-table mapper.
    pub fn source(&self) -> &KernelSource {
        self.malloc.heap().source()
    }

    /// The allocator itself (also reached through `Deref`).
    pub fn malloc(&self) -> &Malloc<KernelSource, P> {
        &self.malloc
    }

    /// The window's start, as given to [`KernelHeap::new`].
    pub fn window_start(&self) -> u64 {
        self.window_start
    }

    /// The window's size: everything the heap may reserve for its arena bound over its life (the arena,
    /// its page map and page-allocator metadata, the span descriptors).
    pub fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// Allocations refused because they came before [`KernelHeap::init`].
    pub fn refused_before_init(&self) -> usize {
        self.refused.load(Ordering::Relaxed)
    }

    /// `Malloc::alloc`, and the report when it fails because the heap is not initialised.
    #[inline]
    pub fn alloc(&self, layout: Layout) -> *mut u8 {
        self.malloc.alloc_or::<false>(layout, |l| self.alloc_slow::<false>(l))
    }

    /// `Malloc::alloc_zeroed`, with the same report as [`KernelHeap::alloc`].
    #[inline]
    pub fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.malloc.alloc_or::<true>(layout, |l| self.alloc_slow::<true>(l))
    }

    /// The general path of an allocation (`Malloc::alloc_or`; the fast path never returns null) and the
    /// report of a null result. One function out of line, so the inlined fast path keeps no registers for it.
    #[inline(never)]
    fn alloc_slow<const ZERO: bool>(&self, layout: Layout) -> *mut u8 {
        let p = self.malloc.alloc_general::<ZERO>(layout);
        if p.is_null() {
            self.null_result(layout);
        }
        p
    }

    /// A null result: if the heap is not initialised, count it and say so (once at a time: a logger that
    /// allocates would come back here).
    #[cold]
    fn null_result(&self, layout: Layout) {
        if self.is_ready() {
            return;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        if !self.reporting.swap(true, Ordering::Acquire) {
            log::error!(
                "goheap: allocation of {} bytes (align {}) before KernelHeap::init: the kernel heap is not \
                 initialised; returning null",
                layout.size(),
                layout.align()
            );
            self.reporting.store(false, Ordering::Release);
        }
    }
}

impl<P: CpuProvider> core::ops::Deref for KernelHeap<P> {
    type Target = Malloc<KernelSource, P>;

    /// The allocator: statistics, `background`, `set_memory_limit`, `release_all`, `flush_cpu_cache`, ...
    fn deref(&self) -> &Self::Target {
        &self.malloc
    }
}

impl<P: CpuProvider> core::fmt::Debug for KernelHeap<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("KernelHeap")
            .field("window_start", &self.window_start)
            .field("window_bytes", &self.window_bytes)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

// SAFETY: forwards to `Malloc`'s `GlobalAlloc`, which is sound; the added check only reads state and logs
// (guarded against re-entry) when an allocation failed.
unsafe impl<P: CpuProvider> GlobalAlloc for KernelHeap<P> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        KernelHeap::alloc(self, layout)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        KernelHeap::alloc_zeroed(self, layout)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract: `ptr` came from this heap with `layout`.
        unsafe { self.malloc.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract, forwarded.
        unsafe { self.malloc.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    //! What runs on the host: the heap before `init` (which reads CR3, so only runs in a kernel). The
    //! provider here is `NoCpuCache`: `IrqSingle`'s `cli` faults in user mode.
    use super::*;
    use crate::cpu::NoCpuCache;
    use std::string::{String, ToString};
    use std::sync::Mutex;
    use std::vec::Vec;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Capture;
    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata) -> bool {
            true
        }
        fn log(&self, record: &log::Record) {
            LINES.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    static HEAP: KernelHeap<NoCpuCache> = KernelHeap::new(0x4444_0000_0000, 1 << 30, NoCpuCache, None);

    #[test]
    fn allocating_before_init_returns_null_and_says_why() {
        static CAPTURE: Capture = Capture;
        let _ = log::set_logger(&CAPTURE);
        log::set_max_level(log::LevelFilter::Trace);
        assert!(!HEAP.is_ready());
        assert_eq!(
            HEAP.window_bytes(),
            (reservation_bytes(1 << 30) + crate::malloc::PROFILE_RESERVATION_BYTES) as u64,
            "the window is sized from the bound"
        );
        let layout = Layout::from_size_align(24, 8).unwrap();
        assert!(HEAP.alloc(layout).is_null());
        // SAFETY: a non-zero-size layout.
        assert!(unsafe { GlobalAlloc::alloc_zeroed(&HEAP, Layout::new::<[u64; 100]>()) }.is_null());
        assert_eq!(HEAP.refused_before_init(), 2);
        let lines = LINES.lock().unwrap();
        let ours: Vec<&String> = lines.iter().filter(|l| l.contains("KernelHeap::init")).collect();
        assert_eq!(ours.len(), 2, "{lines:?}");
        assert!(ours[0].contains("allocation of 24 bytes") && ours[0].contains("not initialised"), "{}", ours[0]);
        assert!(ours[1].contains("allocation of 800 bytes"), "{}", ours[1]);
    }
}
