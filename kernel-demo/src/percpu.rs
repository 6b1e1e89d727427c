//! Per-CPU data, reached through the GS base: one [`PerCpu`] per online CPU.
//!
//! Each CPU's APIC ID gets a dense index (`0..n`, the BSP first) from [`CPU_MAP`], goheap's
//! `CpuIndexMap`, so sparse APIC IDs (several sockets, hyper-threads, hot-plug slots) still give dense
//! cache indices. The CPU's `PerCpu` sits in a static slot of that index, and its address is written to
//! the IA32_GS_BASE MSR, so [`current_index`] is a single `gs:`-relative load.
//!
//! Before the BSP ran [`init_cpu`], GS base is 0 and [`current_index`] returns `None` (a flag is checked
//! first). An AP sets its GS base first thing in its start-up path ([`crate::smp`]), before anything that
//! could call [`current_index`] runs on it.
//!
//! goheap reads the index through [`GsIndex`], its `CpuIndex`: the `gs:` load alone, inlined into its fast
//! path, with no flag to check. For that, the BSP's GS base points at a *boot block* from [`init_boot_gs`]
//! (called by `heap::init`, before goheap serves anything) until [`init_cpu`] points it at the BSP's
//! `PerCpu`: the boot block's index field holds [`NO_INDEX`], which goheap refuses (out of range), so
//! until then goheap uses its shared cache, as with [`current_index`]'s `None`.

use crate::smp::MAX_CPUS;
use core::cell::UnsafeCell;
use core::mem::{offset_of, MaybeUninit};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use goheap::x86_64::{CpuIndex, CpuIndexMap};
use x86_64::registers::model_specific::{GsBase, KernelGsBase};
use x86_64::VirtAddr;

/// APIC ID → dense CPU index, shared with goheap (`IrqCpus::with_index(percpu::GsIndex)` keys its caches
/// by the same indices).
pub static CPU_MAP: CpuIndexMap = CpuIndexMap::new();

/// One CPU's data. The first two fields are read by `gs:`-relative loads: keep them first.
#[repr(C)]
pub struct PerCpu {
    self_ptr: *const PerCpu,
    /// Dense CPU index (goheap's cache index), `0` for the BSP.
    pub index: usize,
    /// Local APIC ID.
    pub apic_id: u32,
    /// LAPIC timer ticks on this CPU.
    pub ticks: AtomicU64,
    /// NMIs taken on this CPU.
    pub nmis: AtomicU64,
    /// TLB shoot-downs this CPU performed for others.
    pub shootdowns_done: AtomicU64,
    /// Fixed-vector test IPIs received.
    pub fixed_ipis: AtomicU64,
    /// Last shoot-down generation handled (see `smp`).
    pub(crate) sd_seen: AtomicU64,
}

// SAFETY: the only non-Sync field is `self_ptr`, a read-only pointer to the struct itself; the rest is
// set once before the struct is published, or atomic.
unsafe impl Sync for PerCpu {}

const _: () = assert!(offset_of!(PerCpu, self_ptr) == 0 && offset_of!(PerCpu, index) == 8);

struct Slots(UnsafeCell<[MaybeUninit<PerCpu>; MAX_CPUS]>);
// SAFETY: slot `i` is written once by the CPU holding index `i`, then published through PUBLISHED[i]
// (Release) and only read after (Acquire); CPU_MAP hands each index out once.
unsafe impl Sync for Slots {}
static SLOTS: Slots = Slots(UnsafeCell::new([const { MaybeUninit::uninit() }; MAX_CPUS]));
static PUBLISHED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Set once the BSP's GS base points at its `PerCpu`.
static GS_READY: AtomicBool = AtomicBool::new(false);

/// The index field of the boot block: no index (any value of goheap's `MAX_CPUS` or more is refused).
pub const NO_INDEX: usize = usize::MAX;

/// What the BSP's GS base points at before [`init_cpu`]: the first two words of a [`PerCpu`], with no
/// self pointer (0) and no index ([`NO_INDEX`]). Only [`GsIndex`] reads it.
#[repr(C)]
struct BootBlock {
    self_ptr: usize,
    index: usize,
}

static BOOT_BLOCK: BootBlock = BootBlock { self_ptr: 0, index: NO_INDEX };

/// Points the running CPU's GS base at the boot block if it has none yet (GS base 0), so [`GsIndex`] can
/// read it. Call on the BSP before goheap serves allocations (`heap::init` does); [`init_cpu`] replaces it.
pub fn init_boot_gs() {
    if GsBase::read().as_u64() == 0 {
        GsBase::write(VirtAddr::from_ptr(core::ptr::addr_of!(BOOT_BLOCK)));
    }
}

/// goheap's [`CpuIndex`] in this kernel: the running CPU's dense index by one `gs:`-relative load, inlined
/// into goheap's fast path (no call, no flag). Before the BSP's [`init_cpu`] it reads the boot block's
/// [`NO_INDEX`], which goheap's `IrqCpus` takes as "no index" (shared cache).
///
/// Requires GS base to point at a boot block or a `PerCpu` on every CPU that calls goheap: the BSP's from
/// [`init_boot_gs`] (before goheap serves anything), an AP's from its start-up path, as for
/// [`current_index`].
pub struct GsIndex;

impl CpuIndex for GsIndex {
    #[inline(always)]
    fn current(&self) -> Option<usize> {
        let index: usize;
        // SAFETY: GS base points at the boot block or at this CPU's `PerCpu` (the type's requirement, met by
        // `heap::init` on the BSP and by every AP's start-up path), whose second word (offset 8, checked at
        // compile time for `PerCpu`; `repr(C)` for the boot block) is the index.
        unsafe { core::arch::asm!("mov {}, gs:[8]", out(reg) index, options(nostack, preserves_flags, readonly)) };
        Some(index)
    }
}

const _: () = assert!(offset_of!(BootBlock, index) == 8);

/// Fills slot `index` for the running CPU and points its GS base (and kernel GS base) at it.
///
/// # Safety
/// `index` is the running CPU's own index from [`CPU_MAP`] (so no other CPU uses the slot), `< MAX_CPUS`,
/// and this is called once per CPU.
pub unsafe fn init_cpu(index: usize, apic_id: u32) -> &'static PerCpu {
    assert!(index < MAX_CPUS);
    // SAFETY: the slot is this CPU's alone (caller's contract) and not yet published; it is a static.
    let cpu: &'static PerCpu = unsafe {
        let slot = SLOTS.0.get().cast::<MaybeUninit<PerCpu>>().add(index);
        let p = slot.cast::<PerCpu>();
        (*slot).write(PerCpu {
            self_ptr: p,
            index,
            apic_id,
            ticks: AtomicU64::new(0),
            nmis: AtomicU64::new(0),
            shootdowns_done: AtomicU64::new(0),
            fixed_ipis: AtomicU64::new(0),
            sd_seen: AtomicU64::new(0),
        });
        &*p
    };
    let addr = VirtAddr::from_ptr(cpu as *const PerCpu);
    GsBase::write(addr);
    KernelGsBase::write(addr);
    PUBLISHED[index].store(true, Ordering::Release);
    if index == 0 {
        GS_READY.store(true, Ordering::Release);
    }
    cpu
}

/// The running CPU's dense index, or `None` before its per-CPU data is set up.
///
/// One relaxed load of a global flag, then one `gs:`-relative load: no lock, no allocation. goheap reads
/// the same field through [`GsIndex`] (without the flag).
#[inline]
pub fn current_index() -> Option<usize> {
    if !GS_READY.load(Ordering::Relaxed) {
        return None;
    }
    let index: usize;
    // SAFETY: GS_READY means the BSP's GS base points at its PerCpu, and every AP sets its GS base before
    // running anything that calls this; `index` is at offset 8 (checked at compile time).
    unsafe { core::arch::asm!("mov {}, gs:[8]", out(reg) index, options(nostack, preserves_flags, readonly)) };
    Some(index)
}

/// The running CPU's data, if set up (see [`current_index`] for the same conditions).
#[inline]
pub fn try_this() -> Option<&'static PerCpu> {
    if !GS_READY.load(Ordering::Relaxed) {
        return None;
    }
    let p: *const PerCpu;
    // SAFETY: as in `current_index`; offset 0 holds the PerCpu's own address.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) p, options(nostack, preserves_flags, readonly)) };
    // SAFETY: a published PerCpu lives in a static and is never written again except through atomics.
    Some(unsafe { &*p })
}

/// The running CPU's data. Panics before `smp::init_bsp` (on the BSP).
#[inline]
pub fn this() -> &'static PerCpu {
    try_this().expect("percpu::this() before the CPU's per-CPU data was set up (smp::init_bsp)")
}

/// The data of the CPU with dense index `index`, once that CPU set it up.
pub fn get(index: usize) -> Option<&'static PerCpu> {
    if index >= MAX_CPUS || !PUBLISHED[index].load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: published (Acquire pairs with the Release in `init_cpu`), so initialised and never written
    // again except through atomics.
    Some(unsafe { (*SLOTS.0.get())[index].assume_init_ref() })
}

/// Iterates over the data of every CPU that set it up, in index order.
pub fn all() -> impl Iterator<Item = &'static PerCpu> {
    (0..MAX_CPUS).filter_map(get)
}
