//! The kernel heap: goheap as `#[global_allocator]`, with a small early heap before it is ready.
//!
//! # Which allocations go where
//! - **Early heap** (`linked_list_allocator` over a [`EARLY_HEAP_SIZE`] static array): every allocation
//!   from [`init`] (called by `kernel_demo::init`) until [`init_goheap`] hands goheap its page tables and
//!   frames; that is, whatever the kernel allocates while parsing boot information before the heap is
//!   wired. Test kernels that never call [`init_goheap`] run on it alone. Objects allocated there are
//!   freed there, whenever that happens (dealloc goes by address).
//! - **goheap** ([`HEAP`]): every allocation after [`init_goheap`], on every CPU. goheap never allocates
//!   from itself or from the early heap: its metadata comes straight from its page source.
//! - **Comparison heap** (only while [`compare_begin`] .. [`compare_end`] run): a peer allocator over one
//!   area of a given size, chosen at [`compare_begin`] ([`CompareKind`]: `linked_list_allocator`,
//!   talc, or the empty allocator that measures the harness's own cost), for measuring the same workload on another heap (the demo's phase 2, the `--bench` kernel
//!   bench). Its area is one large goheap allocation; frees of its objects go to it by address.
//!
//! The global allocator picks the heap for `alloc` by a mode flag and for `dealloc` by address (goheap's
//! level-4 entry minus the comparison area, the comparison area, the early array), so a pointer always
//! returns to the heap that made it. Both jump through a table of one function per heap, so each heap is
//! reached by the same instructions (what the kernel bench's harness subtraction relies on).
//!
//! # goheap's wiring
//! goheap's one-call kernel setup, `goheap::x86_64::KernelHeap` (the path the crate's README and its
//! minimal example kernel, `examples/minimal.rs`, show), in [`HEAP`]:
//! - Page source: `goheap::x86_64::FrameSource` over the virtual window [`HEAP_WINDOW_START`]
//!   .. `+ HEAP_WINDOW_BYTES` (inside L4 entry 136, which nothing else maps), mapping frames from
//!   goheap's `BootFrames` (`HEAP.frames()`, read through [`crate::frames`]) through an `OffsetPageTable`
//!   on the active page tables, and returning them when the scavenger decommits. The window holds goheap's
//!   arena (at most [`HEAP_MAX_BYTES`], reserved, committed on demand), its page map and page-allocator
//!   metadata, and its span descriptors.
//! - CPU provider: `goheap::x86_64::IrqCpus` over `crate::percpu::GsIndex` (interrupts off in the allocator;
//!   the CPU index is one `gs:`-relative load compiled into goheap's fast path).
//! - TLB shoot-down: the hook in [`SHOOTDOWN`] runs after goheap unmaps heap pages, before their frames
//!   are reused.

use crate::percpu::GsIndex;
use bootloader_api::BootInfo;
use core::alloc::{GlobalAlloc, Layout};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use goheap::page::pagealloc::PALLOC_CHUNK_BYTES;
use goheap::x86_64::{IrqCpus, KernelHeap, ShootdownHook};
use linked_list_allocator::LockedHeap;
use talc::{ErrOnOom, Span, Talc, Talck};

/// Size of the early heap (boot-time allocations before goheap is ready; all of a test kernel's).
pub const EARLY_HEAP_SIZE: usize = 256 << 10;
/// Start of goheap's virtual window: L4 entry 136, unused by the bootloader's mappings (checked at init).
/// 4 MiB aligned, as goheap aligns its arena to the page allocator's chunk.
pub const HEAP_WINDOW_START: u64 = 0x4444_0000_0000;
/// goheap's arena bound: address space only, frames are taken as the heap grows. Larger than any
/// memory QEMU is given here, so the frames run out before the arena does.
pub const HEAP_MAX_BYTES: usize = 4 << 30;
/// The window: everything goheap may reserve for that arena over its life (arena, metadata, span
/// descriptors), as `goheap::page::heap::reservation_bytes` computes it, plus the heap profile's region and
/// tables (`goheap::malloc::PROFILE_RESERVATION_BYTES`, reserved at the first sample): what
/// `KernelHeap::new` sizes it to.
pub const HEAP_WINDOW_BYTES: u64 =
    (goheap::page::heap::reservation_bytes(HEAP_MAX_BYTES) + goheap::malloc::PROFILE_RESERVATION_BYTES) as u64;

// The window must stay inside its L4 entry (512 GiB each), which nothing else maps.
const _: () = assert!(HEAP_WINDOW_START >> 39 == (HEAP_WINDOW_START + HEAP_WINDOW_BYTES - 1) >> 39);
const _: () = assert!(HEAP_WINDOW_START % PALLOC_CHUNK_BYTES as u64 == 0);

/// The running CPU's goheap cache index (what goheap reads inline through `crate::percpu::GsIndex`), for
/// tests and reports. The dense index comes from `crate::percpu::CPU_MAP`, goheap's `CpuIndexMap` keyed by
/// APIC ID.
#[inline]
pub fn current_cpu_index() -> Option<usize> {
    // `None` before `smp::init_bsp` set up the BSP's per-CPU data: goheap then uses its shared, locked
    // cache. (Single-CPU stand-in, before the CPU bring-up existed: `Some(0)`.)
    crate::percpu::current_index()
}

/// TLB shoot-down after goheap unmaps pages: an NMI IPI to the other online CPUs (see `crate::smp`); a
/// no-op while only the BSP runs.
pub const SHOOTDOWN: Option<ShootdownHook> = Some(crate::apic::tlb_shootdown);

/// goheap's CPU provider in this kernel: `IrqCpus` over `GsIndex` (by value), or with the feature
/// `irq-latency` the same wrapped in `crate::irqlat::MeasuredCpus`, which times every interrupts-off section.
#[cfg(not(feature = "irq-latency"))]
pub type Cpus = IrqCpus<GsIndex>;
/// goheap's CPU provider in this kernel (see the other definition).
#[cfg(feature = "irq-latency")]
pub type Cpus = crate::irqlat::MeasuredCpus;

/// goheap as this kernel instantiates it.
pub type Heap = KernelHeap<Cpus>;

#[cfg(not(feature = "irq-latency"))]
const PROVIDER: Cpus = IrqCpus::with_index(GsIndex);
#[cfg(feature = "irq-latency")]
static CPUS: IrqCpus<GsIndex> = IrqCpus::with_index(GsIndex);
#[cfg(feature = "irq-latency")]
const PROVIDER: Cpus = crate::irqlat::MeasuredCpus::new(&CPUS);

/// The kernel heap. Statistics, `background`, `flush_cpu_cache`, `release_all` and the memory limit are
/// reached through it (goheap's `Malloc`, by `Deref`); the frame allocator through `HEAP.frames()`.
pub static HEAP: Heap = KernelHeap::new(HEAP_WINDOW_START, HEAP_MAX_BYTES, PROVIDER, SHOOTDOWN);

const MODE_EARLY: u8 = 0;
const MODE_GOHEAP: u8 = 1;
const MODE_COMPARE_LL: u8 = 2;
const MODE_COMPARE_TALC: u8 = 3;
const MODE_COMPARE_EMPTY: u8 = 4;
/// Which heap serves `alloc` (frees go by address).
static MODE: AtomicU8 = AtomicU8::new(MODE_EARLY);

static EARLY: LockedHeap = LockedHeap::empty();
static mut EARLY_AREA: [u8; EARLY_HEAP_SIZE] = [0; EARLY_HEAP_SIZE];

/// The allocator a comparison heap runs ([`compare_begin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompareKind {
    /// `linked_list_allocator::LockedHeap` (first fit over an address-ordered hole list, one spin lock).
    LinkedList,
    /// talc's `Talck` (size-binned free lists with boundary tags) under a `spinning_top` spin lock: the
    /// configuration of the host benchmark.
    Talc,
    /// The *empty allocator*: a per-CPU bump pointer that wraps around in its CPU's share of the area, with
    /// a free that does nothing. Not a heap (blocks are reused after a wrap while still "live"); it measures
    /// what the bench harness and the global allocator's dispatch cost around an allocator, so the kernel
    /// bench can subtract it (`kbench.rs`). Its own cost (a `gs:` load, an align-up, a compare, a store) is
    /// about ten instructions per allocation.
    Empty,
}

impl CompareKind {
    /// Short name, as the benchmarks print it (`llalloc`, `talc`).
    pub fn name(self) -> &'static str {
        match self {
            CompareKind::LinkedList => "llalloc",
            CompareKind::Talc => "talc",
            CompareKind::Empty => "empty",
        }
    }
}

static COMPARE_LL: LockedHeap = LockedHeap::empty();
static COMPARE_TALC: Talck<spinning_top::RawSpinlock, ErrOnOom> = Talck::new(Talc::new(ErrOnOom));
/// The registered comparison area, in one place (one address to reach on `dealloc`'s path).
struct CompareArea {
    /// The area's start; 0 when none is registered.
    start: AtomicUsize,
    /// Its length in bytes; 0 when none is registered (so no address lies in `[start, start + len)`).
    len: AtomicUsize,
    /// Which allocator owns it (a `MODE_COMPARE_*` value; frees go by it).
    owner: AtomicU8,
}

static AREA: CompareArea =
    CompareArea { start: AtomicUsize::new(0), len: AtomicUsize::new(0), owner: AtomicU8::new(MODE_COMPARE_LL) };
/// The span talc's `claim` returned for the registered area (`get_allocated_span` wants it back).
static TALC_HEAP: spin::Mutex<Option<(usize, usize)>> = spin::Mutex::new(None);
/// talc's allocated extent right after it claimed the area (its own metadata at the bottom): the heap
/// is empty exactly when its allocated extent is back to this (see [`compare_end`]).
static TALC_BASELINE_END: AtomicUsize = AtomicUsize::new(0);

/// CPUs with their own part of the empty allocator's area (others share the last part).
const EMPTY_CPUS: usize = 16;
/// Each CPU's bump offset in its part of the area (written only by that CPU: plain load and store).
static EMPTY_OFF: [AtomicUsize; EMPTY_CPUS] = [const { AtomicUsize::new(0) }; EMPTY_CPUS];
/// Bytes of each CPU's part (the area's size / [`EMPTY_CPUS`]).
static EMPTY_PART: AtomicUsize = AtomicUsize::new(0);

/// The empty allocator's `alloc` ([`CompareKind::Empty`]): the next `layout`-aligned bytes of this CPU's
/// part, wrapping to its start when they do not fit; null if the block is larger than a part.
#[inline]
fn empty_alloc(layout: Layout) -> *mut u8 {
    let cpu = crate::percpu::current_index().unwrap_or(0).min(EMPTY_CPUS - 1);
    let part = EMPTY_PART.load(Ordering::Relaxed);
    let off = EMPTY_OFF[cpu].load(Ordering::Relaxed);
    let (size, align) = (layout.size(), layout.align());
    let mut start = (off + align - 1) & !(align - 1);
    if start + size > part {
        if size > part {
            return core::ptr::null_mut();
        }
        start = 0;
    }
    EMPTY_OFF[cpu].store(start + size, Ordering::Relaxed);
    (AREA.start.load(Ordering::Relaxed) + cpu * part + start) as *mut u8
}

/// The global allocator: dispatches to the early heap, goheap or the comparison heap (module docs).
pub struct KernelAllocator;

#[global_allocator]
static ALLOCATOR: KernelAllocator = KernelAllocator;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    Early,
    CompareLl,
    CompareTalc,
    CompareEmpty,
    Goheap,
}

fn compare_owner(mode: u8) -> Owner {
    match mode {
        MODE_COMPARE_TALC => Owner::CompareTalc,
        MODE_COMPARE_EMPTY => Owner::CompareEmpty,
        _ => Owner::CompareLl,
    }
}

fn early_range() -> (usize, usize) {
    let start = core::ptr::addr_of!(EARLY_AREA) as usize;
    (start, start + EARLY_HEAP_SIZE)
}

#[inline]
fn owner_of(ptr: *mut u8) -> Owner {
    let a = ptr as usize;
    let (es, ee) = early_range();
    if (es..ee).contains(&a) {
        return Owner::Early;
    }
    if in_compare_area(a) {
        return compare_owner(AREA.owner.load(Ordering::Acquire));
    }
    Owner::Goheap
}

#[inline]
fn current_owner() -> Owner {
    match MODE.load(Ordering::Acquire) {
        MODE_GOHEAP => Owner::Goheap,
        MODE_EARLY => Owner::Early,
        m => compare_owner(m),
    }
}

/// Whether address `a` lies in the registered comparison area.
#[inline(always)]
fn in_compare_area(a: usize) -> bool {
    a.wrapping_sub(AREA.start.load(Ordering::Acquire)) < AREA.len.load(Ordering::Acquire)
}

// ---- The hot dispatch: one function per allocator, reached the same way by each ----
//
// `alloc` jumps through `ALLOC_FNS[MODE]` and `dealloc` through `DEALLOC_FNS[owner]`, so every allocator
// (goheap, the peers and the empty allocator that measures the harness) is reached by the same few
// instructions and runs in a function of its own, as it would as a kernel's only global allocator: none
// pays for the others' register saves, and the kernel bench's harness subtraction (the empty allocator's
// run) removes the same dispatch from every allocator's count.

type AllocFn = unsafe fn(Layout) -> *mut u8;
type DeallocFn = unsafe fn(*mut u8, Layout);

/// `alloc` by mode (indexed by the `MODE_*` values).
static ALLOC_FNS: [AllocFn; 5] = [alloc_early, alloc_goheap, alloc_ll, alloc_talc, alloc_empty];
/// `dealloc` by owner (indexed by the `MODE_*` values of the heap that owns the pointer).
static DEALLOC_FNS: [DeallocFn; 5] = [dealloc_early, dealloc_goheap, dealloc_ll, dealloc_talc, dealloc_empty];

/// # Safety
/// `GlobalAlloc::alloc`'s contract.
unsafe fn alloc_early(layout: Layout) -> *mut u8 {
    // SAFETY: forwarded with the caller's layout (non-zero size by GlobalAlloc's contract).
    unsafe { EARLY.alloc(layout) }
}

/// # Safety
/// `GlobalAlloc::alloc`'s contract.
unsafe fn alloc_goheap(layout: Layout) -> *mut u8 {
    HEAP.alloc(layout)
}

/// # Safety
/// `GlobalAlloc::alloc`'s contract.
unsafe fn alloc_ll(layout: Layout) -> *mut u8 {
    // SAFETY: forwarded with the caller's layout.
    unsafe { COMPARE_LL.alloc(layout) }
}

/// # Safety
/// `GlobalAlloc::alloc`'s contract.
unsafe fn alloc_talc(layout: Layout) -> *mut u8 {
    // SAFETY: forwarded with the caller's layout.
    unsafe { COMPARE_TALC.alloc(layout) }
}

/// # Safety
/// `GlobalAlloc::alloc`'s contract, and routed to only after `compare_begin_empty` (see its contract).
unsafe fn alloc_empty(layout: Layout) -> *mut u8 {
    empty_alloc(layout)
}

/// # Safety
/// `ptr` came from the early heap with `layout`.
unsafe fn dealloc_early(ptr: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    unsafe { EARLY.dealloc(ptr, layout) }
}

/// # Safety
/// `ptr` came from goheap with `layout`, or lies outside every heap (goheap then reports a bad free).
unsafe fn dealloc_goheap(ptr: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    unsafe { HEAP.dealloc(ptr, layout) }
}

/// # Safety
/// `ptr` came from the linked-list comparison heap with `layout`.
unsafe fn dealloc_ll(ptr: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    unsafe { COMPARE_LL.dealloc(ptr, layout) }
}

/// # Safety
/// `ptr` came from the talc comparison heap with `layout`.
unsafe fn dealloc_talc(ptr: *mut u8, layout: Layout) {
    // SAFETY: the caller's contract.
    unsafe { COMPARE_TALC.dealloc(ptr, layout) }
}

/// The empty allocator frees nothing.
unsafe fn dealloc_empty(_ptr: *mut u8, _layout: Layout) {}

/// The `MODE_*` value of the heap that owns `ptr`: an address in goheap's level-4 entry is goheap's unless
/// it lies in the registered comparison area (itself a goheap allocation); elsewhere, the early array's
/// are the early heap's, and anything else goes to goheap, which reports it as a bad free.
#[inline(always)]
fn owner_mode(ptr: *mut u8) -> usize {
    let a = ptr as usize;
    if a >> 39 == (HEAP_WINDOW_START >> 39) as usize {
        // Without a branch: goheap and the comparison heaps take the same instructions here (the kernel
        // bench subtracts the empty allocator's run, a comparison heap's, from goheap's).
        let owner = AREA.owner.load(Ordering::Acquire) as usize;
        let in_area = (in_compare_area(a) as usize).wrapping_neg();
        MODE_GOHEAP as usize ^ ((owner ^ MODE_GOHEAP as usize) & in_area)
    } else {
        let (es, ee) = early_range();
        if (es..ee).contains(&a) {
            MODE_EARLY as usize
        } else {
            MODE_GOHEAP as usize
        }
    }
}

// The level-4 test above: nothing but goheap's window (and the comparison area inside it) lies in its
// level-4 entry (`KernelHeap::init` checks the entry is unused before goheap maps it).
const _: () = assert!(HEAP_WINDOW_START >> 39 == (HEAP_WINDOW_START + HEAP_WINDOW_BYTES - 1) >> 39);

// SAFETY: each pointer comes from exactly one of three allocators (early heap, goheap, comparison heap),
// and `dealloc`/`realloc` return it to the allocator whose memory range contains it: the early array and
// the comparison area are disjoint from each other and from goheap's window (the comparison area is a
// goheap allocation, but while it is registered goheap hands none of its bytes to anyone else), and the
// comparison area records which peer allocator owns it until it is unregistered. Each allocator is itself
// a sound GlobalAlloc, except the empty allocator, whose blocks may overlap earlier ones after its bump
// pointer wraps: it is only routed to through the `unsafe fn compare_begin_empty`, whose caller promises
// that until `compare_end` nothing allocates that relies on such blocks being disjoint.
unsafe impl GlobalAlloc for KernelAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mode = MODE.load(Ordering::Acquire) as usize;
        // SAFETY: MODE only ever holds one of the five `MODE_*` values (0..5), the table's indices; the
        // function is the current mode's allocator, called with the caller's layout (contract forwarded).
        unsafe { (ALLOC_FNS.get_unchecked(mode))(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match current_owner() {
            // goheap skips clearing memory fresh from the page source (it is zeroed when mapped).
            Owner::Goheap => HEAP.alloc_zeroed(layout),
            // SAFETY: forwarded with the caller's layout.
            Owner::CompareLl => unsafe { COMPARE_LL.alloc_zeroed(layout) },
            // SAFETY: as above.
            Owner::CompareTalc => unsafe { COMPARE_TALC.alloc_zeroed(layout) },
            Owner::CompareEmpty => {
                let p = empty_alloc(layout);
                if !p.is_null() {
                    // SAFETY: `p` is `layout.size()` bytes of the registered area.
                    unsafe { core::ptr::write_bytes(p, 0, layout.size()) };
                }
                p
            }
            // SAFETY: as above.
            Owner::Early => unsafe { EARLY.alloc_zeroed(layout) },
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let owner = owner_mode(ptr);
        // SAFETY: `owner_mode` returns a `MODE_*` value (0..5): MODE_EARLY, MODE_GOHEAP, or the comparison
        // area's owner (a `MODE_COMPARE_*` value); that heap allocated `ptr` with `layout` (see the impl's
        // SAFETY: ranges are disjoint), or it is goheap for a pointer of no heap, which reports it.
        unsafe { (DEALLOC_FNS.get_unchecked(owner))(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let owner = owner_of(ptr);
        if owner == Owner::Goheap && current_owner() == Owner::Goheap {
            // SAFETY: goheap allocated `ptr` with `layout`; the caller upholds realloc's contract.
            return unsafe { HEAP.realloc(ptr, layout, new_size) };
        }
        // Moving between heaps (or within a linked-list heap, which has no in-place resize anyway).
        // SAFETY: the caller guarantees `new_size` with `layout.align()` forms a valid layout.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        // SAFETY: non-zero size (realloc's contract).
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            // SAFETY: both blocks are valid for the smaller size and belong to different allocations.
            unsafe { core::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated with `layout` and is no longer used.
            unsafe { self.dealloc(ptr, layout) };
        }
        new
    }
}

/// Hands the early array to the early heap and points the BSP's GS base at the boot block goheap's CPU index
/// reads (`percpu::init_boot_gs`). Called by `kernel_demo::init`; later calls do nothing.
pub fn init() {
    static DONE: AtomicU8 = AtomicU8::new(0);
    if DONE.swap(1, Ordering::AcqRel) != 0 {
        return;
    }
    // goheap's CPU index (`GsIndex`) reads GS: give the BSP a boot block until its per-CPU data exists.
    crate::percpu::init_boot_gs();
    let (start, _) = early_range();
    // SAFETY: EARLY_AREA is EARLY_HEAP_SIZE bytes, lives for the whole run and is used by nothing but the
    // early heap; DONE makes this the only `init` on it.
    unsafe { EARLY.lock().init(start as *mut u8, EARLY_HEAP_SIZE) };
}

/// Makes goheap the kernel heap: `KernelHeap::init` gives goheap's frame allocator the usable memory and its
/// page source the active page tables, and new allocations go to goheap from now on. Call once, on the BSP,
/// before other CPUs start.
pub fn init_goheap(boot_info: &'static BootInfo) {
    init();
    // SAFETY: the bootloader's BootInfo (BOOTLOADER_CONFIG maps physical memory), called once before other
    // CPUs run. The bootloader's page tables are active; other kernel code that edits them (the CPU
    // bring-up) only touches other L4 entries, through its own mapper, and takes its frames from a static
    // pool (`smp::PoolFrames`) or goheap's `BootFrames` (`HEAP.frames()`), never from usable memory itself.
    if let Err(e) = unsafe { HEAP.init(boot_info) } {
        panic!("goheap's kernel heap: {e}");
    }
    MODE.store(MODE_GOHEAP, Ordering::Release);
}

/// True once [`init_goheap`] ran.
pub fn goheap_ready() -> bool {
    MODE.load(Ordering::Acquire) != MODE_EARLY
}

/// 4 KiB frames goheap holds mapped in its window (arena pages and metadata).
pub fn committed_frames() -> usize {
    HEAP.source().committed_frames()
}

/// Routes all new allocations to a fresh comparison heap of `kind` over `bytes`, carved out of goheap as
/// one large allocation, for a measurement. Call on one CPU while the others wait (none may be
/// allocating); returns false if goheap could not supply the area, or if an earlier comparison area is
/// still registered because objects of its run are alive (see [`compare_end`]), or if `kind` is
/// [`CompareKind::Empty`] (see [`compare_begin_empty`]).
pub fn compare_begin(kind: CompareKind, bytes: usize) -> bool {
    kind != CompareKind::Empty && begin(kind, bytes)
}

/// As [`compare_begin`] for the empty allocator ([`CompareKind::Empty`]): a bump pointer per CPU in its
/// sixteenth of `bytes`, wrapping around; frees do nothing.
///
/// # Safety
/// Until [`compare_end`], every allocation (on any CPU) is made by code that tolerates a block overlapping
/// blocks its CPU allocated more than `bytes / 16` bytes earlier, even live ones: code that writes its
/// blocks but never relies on reading back what it wrote before that much allocation happened (the kernel
/// bench's workloads). Nothing else may allocate meanwhile (interrupt handlers included).
pub unsafe fn compare_begin_empty(bytes: usize) -> bool {
    begin(CompareKind::Empty, bytes)
}

fn begin(kind: CompareKind, bytes: usize) -> bool {
    if AREA.len.load(Ordering::Acquire) != 0 {
        return false;
    }
    let layout = Layout::from_size_align(bytes, 4096).expect("valid layout");
    let area = HEAP.alloc(layout);
    if area.is_null() {
        return false;
    }
    let mode = match kind {
        CompareKind::LinkedList => {
            // SAFETY: `area` is `bytes` bytes goheap gave us and nobody else references; the previous
            // comparison run (if any) ended with its heap empty (no area is registered, checked above), so
            // re-initialising loses nothing.
            unsafe {
                let mut h = COMPARE_LL.lock();
                *h = linked_list_allocator::Heap::empty();
                h.init(area, bytes);
            }
            MODE_COMPARE_LL
        }
        CompareKind::Talc => {
            let mut t = COMPARE_TALC.lock();
            *t = Talc::new(ErrOnOom);
            // SAFETY: as above: `area` is ours alone for `bytes` bytes, valid for reads and writes, and
            // overlaps no other heap; the fresh `Talc` replaced one whose heap was empty.
            let claimed = match unsafe { t.claim(Span::from_base_size(area, bytes)) } {
                Ok(span) => span,
                Err(()) => {
                    drop(t);
                    // SAFETY: `area` came from `HEAP.alloc(layout)` above and was never handed out.
                    unsafe { HEAP.dealloc(area, layout) };
                    return false;
                }
            };
            // SAFETY: `claimed` is the span `claim` returned for this heap.
            let extent = unsafe { t.get_allocated_span(claimed) };
            let (base, acme) = claimed.get_base_acme().expect("a claimed heap is not empty");
            TALC_HEAP.lock().replace((base as usize, acme as usize));
            let baseline_end = extent.get_base_acme().map_or(base as usize, |(_, e)| e as usize);
            TALC_BASELINE_END.store(baseline_end, Ordering::Release);
            MODE_COMPARE_TALC
        }
        CompareKind::Empty => {
            for off in &EMPTY_OFF {
                off.store(0, Ordering::Relaxed);
            }
            EMPTY_PART.store(bytes / EMPTY_CPUS & !4095, Ordering::Relaxed);
            MODE_COMPARE_EMPTY
        }
    };
    AREA.owner.store(mode, Ordering::Release);
    AREA.start.store(area as usize, Ordering::Release);
    AREA.len.store(bytes, Ordering::Release);
    MODE.store(mode, Ordering::Release);
    true
}

/// Bytes still allocated on the registered comparison heap: exact for the linked-list heap; for talc the
/// extent from the end of its metadata to the end of its highest live chunk (0 exactly when it is empty:
/// talc coalesces free chunks, so with nothing live the top gap reaches down to its metadata).
fn compare_used() -> usize {
    match AREA.owner.load(Ordering::Acquire) {
        MODE_COMPARE_LL => return COMPARE_LL.lock().used(),
        // Frees nothing, holds nothing: its area may go back at once.
        MODE_COMPARE_EMPTY => return 0,
        _ => {}
    }
    let t = COMPARE_TALC.lock();
    let Some((base, acme)) = *TALC_HEAP.lock() else { return 0 };
    // SAFETY: (base, acme) is the span `claim` returned for the heap `t` manages (set in `compare_begin`).
    let extent = unsafe { t.get_allocated_span(Span::new(base as *mut u8, acme as *mut u8)) };
    let end = extent.get_base_acme().map_or(base, |(_, e)| e as usize);
    end.saturating_sub(TALC_BASELINE_END.load(Ordering::Acquire))
}

/// Ends a comparison run: allocations go to goheap again. If the comparison heap is empty its area goes
/// back to goheap; else (something allocated during the run is still alive) the area is kept registered
/// so those objects stay valid, and later [`compare_begin`] calls refuse. Returns the bytes still in use
/// on the comparison heap (0 when it was empty; for talc an extent, see `compare_used`).
pub fn compare_end() -> usize {
    MODE.store(MODE_GOHEAP, Ordering::Release);
    let used = compare_used();
    if used == 0 {
        let (start, len) = (AREA.start.load(Ordering::Acquire), AREA.len.load(Ordering::Acquire));
        let end = start + len;
        AREA.len.store(0, Ordering::Release);
        AREA.start.store(0, Ordering::Release);
        TALC_HEAP.lock().take();
        if let Some(p) = NonNull::new(start as *mut u8) {
            let layout = Layout::from_size_align(end - start, 4096).expect("valid layout");
            // SAFETY: the area came from `HEAP.alloc(layout)` in `compare_begin`; its heap is empty and no
            // longer registered, so nothing references it.
            unsafe { HEAP.dealloc(p.as_ptr(), layout) };
        }
    }
    used
}

/// Bytes in use on the early heap (for the boot report).
pub fn early_used() -> usize {
    EARLY.lock().used()
}
