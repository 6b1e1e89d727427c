//! The local APIC (xAPIC, MMIO): software enable, IPIs (INIT, SIPI, NMI, fixed vector) and the timer.
//!
//! The registers are mapped once, by the BSP ([`map`]), into a 4 KiB page of their own with caching off
//! (`NO_CACHE | WRITE_THROUGH`, i.e. UC): the bootloader's physical-memory mapping is cacheable and may not
//! even cover the APIC's address. The page lies in a level-4 slot that was empty at boot, found from the
//! top of the address space down (see [`mmio_window`]). Every CPU reaches its own APIC through the same
//! virtual address. Register access goes through the `volatile` crate.
//!
//! The timer: [`calibrate_timer`] measures the APIC timer against the PIT once (all CPUs of a machine
//! share the bus clock), then [`start_timer`] runs it periodically on the calling CPU. Each tick bumps
//! the CPU's `PerCpu::ticks` and calls the function given to [`set_tick_handler`], if any.

use crate::idt::{FIXED_IPI_VECTOR, SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::percpu;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use volatile::VolatilePtr;
use x86_64::instructions::interrupts::without_interrupts;
use x86_64::structures::paging::{
    FrameAllocator, Mapper, OffsetPageTable, Page, PageTable, PageTableFlags, PhysFrame, Size4KiB,
};
use x86_64::{PhysAddr, VirtAddr};

/// Register offsets (xAPIC MMIO).
pub mod reg {
    /// Local APIC ID (bits 31:24).
    pub const ID: usize = 0x20;
    /// Version.
    pub const VERSION: usize = 0x30;
    /// Task priority.
    pub const TPR: usize = 0x80;
    /// End of interrupt.
    pub const EOI: usize = 0xB0;
    /// Spurious interrupt vector (bit 8: software enable).
    pub const SVR: usize = 0xF0;
    /// Error status.
    pub const ESR: usize = 0x280;
    /// Interrupt command, low half (writing it sends).
    pub const ICR_LOW: usize = 0x300;
    /// Interrupt command, high half (destination in bits 31:24).
    pub const ICR_HIGH: usize = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: usize = 0x320;
    /// LVT error.
    pub const LVT_ERROR: usize = 0x370;
    /// Timer initial count.
    pub const TIMER_INIT: usize = 0x380;
    /// Timer current count.
    pub const TIMER_CURRENT: usize = 0x390;
    /// Timer divide configuration.
    pub const TIMER_DIVIDE: usize = 0x3E0;
}

const ICR_PENDING: u32 = 1 << 12;
const ICR_ASSERT: u32 = 1 << 14;
const ICR_FIXED: u32 = 0b000 << 8;
const ICR_NMI: u32 = 0b100 << 8;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
/// Divide configuration 0b0011: by 16.
const TIMER_DIV_16: u32 = 0b0011;

/// Virtual address of the mapped registers (0 until [`map`]).
static BASE: AtomicU64 = AtomicU64::new(0);
/// Physical address of the registers.
static PHYS: AtomicU64 = AtomicU64::new(0);
/// Level-4 index of the MMIO window (512 = none).
static P4_INDEX: AtomicUsize = AtomicUsize::new(512);
/// APIC timer ticks (divide by 16) per millisecond, 0 until calibrated.
static TIMER_PER_MS: AtomicU64 = AtomicU64::new(0);
/// The `fn()` run on every timer tick (0 = none).
static TICK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Why [`map`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapError {
    /// No level-4 entry in the upper half is free.
    NoFreeSlot,
    /// The frame allocator ran out while creating page tables.
    FrameAllocationFailed,
    /// The page was mapped already (should not happen: the slot was empty).
    AlreadyMapped,
}

/// The page-table view of the running CPU's active tables, through the physical-memory mapping.
///
/// # Safety
/// `phys_offset` is the bootloader's physical-memory mapping offset, and the caller does not use the
/// returned mapper while anything else modifies the same page tables.
pub unsafe fn active_mapper(phys_offset: u64) -> OffsetPageTable<'static> {
    let (p4, _) = x86_64::registers::control::Cr3::read();
    let virt = phys_offset + p4.start_address().as_u64();
    // SAFETY: all physical memory is mapped at `phys_offset` (caller), so `virt` is the active level-4
    // table; exclusive use is the caller's contract.
    unsafe { OffsetPageTable::new(&mut *(virt as *mut PageTable), VirtAddr::new(phys_offset)) }
}

/// Maps the APIC registers at physical `phys` uncached (UC: `NO_CACHE | WRITE_THROUGH`, not executable)
/// into a free upper-half level-4 slot, using `frames` for the page tables, and remembers the address.
///
/// # Safety
/// `mapper` maps the active page tables, nothing else modifies them meanwhile, and `phys` is the local
/// APIC's register page.
pub unsafe fn map(
    mapper: &mut OffsetPageTable<'static>,
    frames: &mut impl FrameAllocator<Size4KiB>,
    phys: u64,
) -> Result<u64, MapError> {
    let slot = (256..511).rev().find(|&i| mapper.level_4_table()[i].is_unused()).ok_or(MapError::NoFreeSlot)?;
    let virt = VirtAddr::new_truncate((slot as u64) << 39);
    let page = Page::<Size4KiB>::containing_address(virt);
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(phys));
    let flags = PageTableFlags::PRESENT
        | PageTableFlags::WRITABLE
        | PageTableFlags::NO_CACHE
        | PageTableFlags::WRITE_THROUGH
        | PageTableFlags::NO_EXECUTE;
    // SAFETY: the level-4 slot was unused, so the page is not mapped and nothing refers to it; the frame is
    // the APIC's register page (caller), which the kernel uses only through this uncached mapping.
    let flush = unsafe { mapper.map_to(page, frame, flags, frames) }.map_err(|e| match e {
        x86_64::structures::paging::mapper::MapToError::FrameAllocationFailed => MapError::FrameAllocationFailed,
        _ => MapError::AlreadyMapped,
    })?;
    flush.flush();
    let base = virt.as_u64() + (phys & 0xFFF);
    PHYS.store(phys, Ordering::Relaxed);
    P4_INDEX.store(slot, Ordering::Relaxed);
    BASE.store(base, Ordering::Release);
    Ok(base)
}

/// The virtual range the APIC mapping reserved: the whole level-4 slot (512 GiB) it took, `[start, end)`.
/// A heap window must lie elsewhere. `None` before [`map`].
pub fn mmio_window() -> Option<(u64, u64)> {
    let slot = P4_INDEX.load(Ordering::Relaxed);
    (slot < 512).then(|| {
        let start = VirtAddr::new_truncate((slot as u64) << 39).as_u64();
        (start, start + (1 << 39))
    })
}

/// Physical address of the APIC registers (0 before [`map`]).
pub fn phys_base() -> u64 {
    PHYS.load(Ordering::Relaxed)
}

fn reg_ptr(offset: usize) -> VolatilePtr<'static, u32> {
    let base = BASE.load(Ordering::Acquire);
    assert!(base != 0, "local APIC used before apic::map");
    // SAFETY: `base` is the uncached mapping of the APIC's 4 KiB register page made by `map`, which stays
    // for the whole run; `offset` is one of the aligned 32-bit register offsets of `reg`.
    unsafe { VolatilePtr::new(NonNull::new_unchecked((base as usize + offset) as *mut u32)) }
}

/// Reads an APIC register (`reg::*`).
#[inline]
pub fn read(offset: usize) -> u32 {
    reg_ptr(offset).read()
}

/// Writes an APIC register (`reg::*`).
#[inline]
pub fn write(offset: usize, value: u32) {
    reg_ptr(offset).write(value)
}

/// The running CPU's APIC ID from CPUID leaf 1 (works before the APIC is mapped).
pub fn cpuid_apic_id() -> u32 {
    let r = core::arch::x86_64::__cpuid(1);
    r.ebx >> 24
}

/// The running CPU's APIC ID from the ID register.
pub fn id() -> u32 {
    read(reg::ID) >> 24
}

/// Software-enables the running CPU's APIC: spurious vector [`SPURIOUS_VECTOR`] with the enable bit,
/// task priority 0 (accept everything), timer and error LVTs masked, error status cleared.
pub fn enable_local() {
    write(reg::TPR, 0);
    write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(reg::LVT_ERROR, LVT_MASKED);
    write(reg::ESR, 0);
    write(reg::ESR, 0);
    write(reg::SVR, (1 << 8) | u32::from(SPURIOUS_VECTOR));
}

/// Signals the end of the current interrupt.
#[inline]
pub fn eoi() {
    write(reg::EOI, 0);
}

fn wait_icr_idle() {
    while read(reg::ICR_LOW) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// Sends an IPI: `low` is the ICR's low half (mode, vector, shorthand), `dest` the target APIC ID.
/// Interrupts are off while the two halves are written, and the call returns once the APIC sent it.
pub fn send_ipi(dest: u32, low: u32) {
    without_interrupts(|| {
        wait_icr_idle();
        write(reg::ICR_HIGH, dest << 24);
        write(reg::ICR_LOW, low);
        wait_icr_idle();
    });
}

/// INIT IPI (assert) to `dest`.
pub fn send_init(dest: u32) {
    send_ipi(dest, ICR_INIT | ICR_ASSERT);
}

/// Start-up IPI to `dest`: the AP starts in real mode at `page << 12` (page < 0x100).
pub fn send_sipi(dest: u32, page: u8) {
    send_ipi(dest, ICR_STARTUP | ICR_ASSERT | u32::from(page));
}

/// NMI to `dest`.
pub fn send_nmi(dest: u32) {
    send_ipi(dest, ICR_NMI | ICR_ASSERT);
}

/// NMI to every other CPU of the machine (including ones never started: use only when all are online).
pub fn send_nmi_all_but_self() {
    send_ipi(0, ICR_NMI | ICR_ASSERT | ICR_ALL_BUT_SELF);
}

/// Fixed-vector interrupt `vector` to `dest`.
pub fn send_fixed(dest: u32, vector: u8) {
    send_ipi(dest, ICR_FIXED | ICR_ASSERT | u32::from(vector));
}

/// Fixed-vector interrupt `vector` to every other CPU.
pub fn send_fixed_all_but_self(vector: u8) {
    send_ipi(0, ICR_FIXED | ICR_ASSERT | ICR_ALL_BUT_SELF | u32::from(vector));
}

/// Measures the APIC timer's rate (divide by 16) against the PIT over 10 ms; returns ticks per ms.
/// Call once, on the BSP, after [`enable_local`]. Uses the PIT (see [`crate::time`]).
pub fn calibrate_timer() -> u64 {
    write(reg::TIMER_DIVIDE, TIMER_DIV_16);
    write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(reg::TIMER_INIT, u32::MAX);
    crate::time::pit_delay_us(10_000);
    let elapsed = u32::MAX - read(reg::TIMER_CURRENT);
    write(reg::TIMER_INIT, 0);
    let per_ms = (u64::from(elapsed) / 10).max(1);
    TIMER_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// APIC timer ticks per millisecond (divide by 16), once calibrated.
pub fn timer_ticks_per_ms() -> Option<u64> {
    match TIMER_PER_MS.load(Ordering::Relaxed) {
        0 => None,
        v => Some(v),
    }
}

/// Starts the running CPU's APIC timer, periodic, every `period_us` microseconds, on [`TIMER_VECTOR`].
/// Ticks arrive once interrupts are enabled on this CPU. Panics if [`calibrate_timer`] has not run.
pub fn start_timer(period_us: u64) {
    let per_ms = timer_ticks_per_ms().expect("apic::start_timer before apic::calibrate_timer (smp::init_bsp)");
    let count = (per_ms * period_us / 1000).clamp(1, u64::from(u32::MAX)) as u32;
    write(reg::TIMER_DIVIDE, TIMER_DIV_16);
    write(reg::LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    write(reg::TIMER_INIT, count);
}

/// Stops the running CPU's APIC timer.
pub fn stop_timer() {
    write(reg::LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    write(reg::TIMER_INIT, 0);
}

/// Sets the function every timer tick calls, on the ticking CPU, in interrupt context (interrupts off):
/// it must be short, must not block on a lock a preempted thread of the same CPU may hold, and should
/// not print while holding locks. `None` removes it.
pub fn set_tick_handler(f: Option<fn()>) {
    TICK_HOOK.store(f.map_or(0, |f| f as usize), Ordering::Release);
}

/// The timer interrupt: count, run the hook, EOI. Allocation-free itself.
pub(crate) fn timer_interrupt() {
    if let Some(cpu) = percpu::try_this() {
        cpu.ticks.fetch_add(1, Ordering::Relaxed);
    }
    let hook = TICK_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: the only non-zero values stored are `fn()` pointers (`set_tick_handler`).
        let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
        f();
    }
    eoi();
}

/// The `fn()` run on every fixed test IPI (0 = none).
static IPI_HOOK: AtomicUsize = AtomicUsize::new(0);

/// Sets the function every fixed test IPI calls, on the receiving CPU, in interrupt context (as
/// [`set_tick_handler`]'s). `None` removes it.
pub fn set_ipi_handler(f: Option<fn()>) {
    IPI_HOOK.store(f.map_or(0, |f| f as usize), Ordering::Release);
}

/// The fixed test IPI: count it, run the hook, EOI.
pub(crate) fn fixed_ipi_interrupt() {
    if let Some(cpu) = percpu::try_this() {
        cpu.fixed_ipis.fetch_add(1, Ordering::Relaxed);
    }
    let hook = IPI_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: the only non-zero values stored are `fn()` pointers (`set_ipi_handler`).
        let f: fn() = unsafe { core::mem::transmute::<usize, fn()>(hook) };
        f();
    }
    eoi();
}

/// The vector of the fixed test IPI (counted in `PerCpu::fixed_ipis`).
pub const TEST_IPI_VECTOR: u8 = FIXED_IPI_VECTOR;

/// The TLB shoot-down (goheap's `ShootdownHook`), re-exported here for the heap's page source.
pub use crate::smp::tlb_shootdown;
