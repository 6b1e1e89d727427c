//! Multiprocessor start-up and cross-CPU services: BSP set-up, AP start-up by INIT-SIPI-SIPI, the set of
//! online CPUs, TLB shoot-down by NMI, and a barrier.
//!
//! Boot path (all without heap allocation):
//!
//! 1. [`init_bsp`] on the BSP: reads the ACPI MADT, masks the legacy PICs, builds and loads the IDT,
//!    registers the BSP's APIC ID (index 0), loads its GDT/TSS, maps the local APIC uncached and enables
//!    it, points GS at its `PerCpu`, calibrates the TSC and the APIC timer.
//! 2. [`start_aps`]: copies the real-mode trampoline (`smp/trampoline.S`) to physical [`TRAMPOLINE_PHYS`]
//!    (0x8000), identity-maps that page in the active page tables, then for each enabled MADT CPU in turn
//!    sends INIT, waits 10 ms, sends SIPI twice (200 us apart) and waits for the AP to come online. The AP
//!    switches to long mode with the BSP's CR3, takes its own static stack (picked by its APIC ID), and in
//!    [`ap_entry`] registers its APIC ID (next dense index), loads its GDT/TSS and the IDT, enables its
//!    APIC, sets GS, goes online and calls the caller's `fn(&'static PerCpu) -> !` with interrupts off.
//!    Afterwards the identity mapping is removed (and shot down).
//!
//! Page-table frames: by default from [`PoolFrames`], a static pool of [`POOL_FRAMES`] page-aligned
//! frames inside the kernel image's .bss (never in the boot memory map's usable regions, so no frame
//! allocator has to exclude them); or from the caller's allocator ([`init_bsp_with`], [`start_aps_with`]).
//! Low memory: the trampoline overwrites physical page 0x8000..0x9000 during [`start_aps`]; a frame
//! allocator must not hand that frame out (simplest: hand out nothing below 1 MiB).

use crate::acpi::{self, AcpiError, Madt};
use crate::percpu::{self, PerCpu, CPU_MAP};
use crate::{apic, gdt, idt, time};
use bootloader_api::BootInfo;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use x86_64::instructions::interrupts::without_interrupts;
use x86_64::registers::control::{Cr3, Cr4};
use x86_64::registers::model_specific::Efer;
use x86_64::structures::paging::{FrameAllocator, Mapper, Page, PageTableFlags, PhysFrame, Size4KiB, Translate};
use x86_64::{PhysAddr, VirtAddr};

/// Most CPUs: goheap's number of per-CPU cache slots (64).
pub const MAX_CPUS: usize = goheap::cpu::MAX_CPUS;
/// Physical (and, during start-up, virtual) address of the AP trampoline; SIPI vector = this >> 12.
pub const TRAMPOLINE_PHYS: u64 = 0x8000;
/// Stack of each AP.
pub const AP_STACK_SIZE: usize = 64 * 1024;
/// Frames in the static page-table pool ([`PoolFrames`]).
pub const POOL_FRAMES: usize = 8;
/// How long the BSP waits for one AP to come online after its SIPIs.
pub const AP_TIMEOUT_US: u64 = 3_000_000;

/// Why SMP set-up failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmpError {
    /// Reading the MADT failed.
    Acpi(AcpiError),
    /// Mapping the local APIC failed.
    Apic(apic::MapError),
    /// [`init_bsp`] was called twice, or [`start_aps`] before [`init_bsp`] / twice.
    WrongOrder,
    /// The BSP's APIC ID got no index (out of range).
    NoIndex,
    /// The trampoline page is mapped to another frame at its identity address.
    TrampolineAddressTaken,
    /// No frame for a page table.
    OutOfFrames,
}

// ---------------------------------------------------------------------------------------------------
// Page-table frames from a static pool inside the kernel image.

#[repr(C, align(4096))]
struct Pool(UnsafeCell<[[u8; 4096]; POOL_FRAMES]>);
// SAFETY: the pool's memory is handed out frame by frame (NEXT) to the page-table code, which accesses it
// only as page tables through the physical mapping; Rust never reads it as data.
unsafe impl Sync for Pool {}
static POOL: Pool = Pool(UnsafeCell::new([[0; 4096]; POOL_FRAMES]));
static POOL_NEXT: AtomicUsize = AtomicUsize::new(0);

/// A frame allocator over [`POOL_FRAMES`] page-aligned frames in the kernel's .bss (see module docs),
/// their physical addresses looked up once in [`PoolFrames::new`]. Frames are never freed.
pub struct PoolFrames {
    frames: [Option<PhysFrame<Size4KiB>>; POOL_FRAMES],
}

impl PoolFrames {
    /// Looks up the pool's physical frames through `translate` (the active page tables).
    pub fn new(translate: &impl Translate) -> Self {
        let mut frames = [None; POOL_FRAMES];
        for (i, f) in frames.iter_mut().enumerate() {
            let virt = POOL.0.get() as u64 + (i as u64) * 4096;
            *f = translate.translate_addr(VirtAddr::new(virt)).map(PhysFrame::containing_address);
        }
        PoolFrames { frames }
    }
}

// SAFETY: each pool frame is handed out once (POOL_NEXT only grows, shared by all PoolFrames values), is
// part of the kernel image (in no other allocator's regions) and is zero (.bss, untouched before).
unsafe impl FrameAllocator<Size4KiB> for PoolFrames {
    fn allocate_frame(&mut self) -> Option<PhysFrame<Size4KiB>> {
        let i = POOL_NEXT.fetch_add(1, Ordering::Relaxed);
        self.frames.get(i).copied().flatten()
    }
}

/// Frames of the pool used so far (for reports).
pub fn pool_frames_used() -> usize {
    POOL_NEXT.load(Ordering::Relaxed).min(POOL_FRAMES)
}

// ---------------------------------------------------------------------------------------------------
// State.

struct MadtCell(UnsafeCell<Option<Madt>>);
// SAFETY: written once in `init_bsp` before BSP_DONE is set (Release); read only after (Acquire).
unsafe impl Sync for MadtCell {}
static MADT: MadtCell = MadtCell(UnsafeCell::new(None));

static BSP_DONE: AtomicBool = AtomicBool::new(false);
static APS_STARTED: AtomicBool = AtomicBool::new(false);
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
/// Online CPUs by dense index (MAX_CPUS = 64 bits).
static ONLINE_MASK: AtomicU64 = AtomicU64::new(0);
static ONLINE_COUNT: AtomicUsize = AtomicUsize::new(0);
/// Set when every enabled MADT CPU is online (so all-but-self IPIs reach only online CPUs).
static ALL_ONLINE: AtomicBool = AtomicBool::new(false);
/// The caller's AP entry (`fn(&'static PerCpu) -> !` as usize).
static AP_ENTRY: AtomicUsize = AtomicUsize::new(0);
/// The BSP's CR4 and EFER, copied by each AP.
static BSP_CR4: AtomicU64 = AtomicU64::new(0);
static BSP_EFER: AtomicU64 = AtomicU64::new(0);
/// APs that started but could not get an index or failed otherwise.
static AP_FAILURES: AtomicUsize = AtomicUsize::new(0);

/// Stack tops by APIC ID, read by the trampoline (0 = no stack: the AP halts).
struct StackTable(UnsafeCell<[u64; acpi::MAX_MADT_CPUS]>);
// SAFETY: written by the BSP before the SIPIs of the AP that reads its entry; read-only for APs.
unsafe impl Sync for StackTable {}
static STACK_TOPS: StackTable = StackTable(UnsafeCell::new([0; acpi::MAX_MADT_CPUS]));

#[repr(C, align(16))]
struct ApStack([u8; AP_STACK_SIZE]);
struct ApStacks(UnsafeCell<[ApStack; MAX_CPUS]>);
// SAFETY: stack k is handed to exactly one AP (through STACK_TOPS) and used only as its stack.
unsafe impl Sync for ApStacks {}
static AP_STACKS: ApStacks = ApStacks(UnsafeCell::new([const { ApStack([0; AP_STACK_SIZE]) }; MAX_CPUS]));

core::arch::global_asm!(include_str!("smp/trampoline.S"));

extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_data: u8;
    static ap_trampoline_end: u8;
}

// ---------------------------------------------------------------------------------------------------
// BSP.

/// Sets up the BSP (see the module docs), with page tables for the APIC mapping from [`PoolFrames`].
/// Call once, early, with interrupts off. Returns the MADT.
pub fn init_bsp(boot_info: &BootInfo) -> Result<&'static Madt, SmpError> {
    let phys_offset =
        boot_info.physical_memory_offset.into_option().ok_or(SmpError::Acpi(AcpiError::NoPhysicalMapping))?;
    // SAFETY: the bootloader maps all physical memory at `phys_offset`; only the BSP runs, and nothing
    // else modifies the page tables while this mapper lives (boot is single-threaded here).
    let mapper = unsafe { apic::active_mapper(phys_offset) };
    let mut frames = PoolFrames::new(&mapper);
    drop(mapper);
    init_bsp_with(boot_info, &mut frames)
}

/// [`init_bsp`] with the caller's frame allocator for the (at most three) page-table frames the APIC
/// mapping may need.
pub fn init_bsp_with(
    boot_info: &BootInfo,
    frames: &mut impl FrameAllocator<Size4KiB>,
) -> Result<&'static Madt, SmpError> {
    if BSP_DONE.load(Ordering::Acquire) {
        return Err(SmpError::WrongOrder);
    }
    let phys_offset =
        boot_info.physical_memory_offset.into_option().ok_or(SmpError::Acpi(AcpiError::NoPhysicalMapping))?;
    let rsdp = boot_info.rsdp_addr.into_option().ok_or(SmpError::Acpi(AcpiError::NoRsdp))?;
    PHYS_OFFSET.store(phys_offset, Ordering::Relaxed);
    // SAFETY: the RSDP address comes from the bootloader, and physical memory is mapped at the offset.
    let madt = unsafe { acpi::read_madt(rsdp, phys_offset) }.map_err(SmpError::Acpi)?;
    x86_64::instructions::interrupts::disable();
    idt::disable_pic();
    idt::init();
    idt::load();
    let apic_id = apic::cpuid_apic_id();
    let index = CPU_MAP.register(apic_id).ok_or(SmpError::NoIndex)?;
    // SAFETY: `index` is the BSP's own, fresh from CPU_MAP; this runs once (BSP_DONE).
    unsafe { gdt::init_cpu(index) };
    // SAFETY: as in `init_bsp`: only the BSP runs and the page tables are not modified elsewhere.
    let mut mapper = unsafe { apic::active_mapper(phys_offset) };
    // SAFETY: `mapper` maps the active tables; `lapic_phys` is the APIC's register page per the MADT.
    unsafe { apic::map(&mut mapper, frames, madt.lapic_phys) }.map_err(SmpError::Apic)?;
    apic::enable_local();
    // SAFETY: `index` is the BSP's own; called once.
    unsafe { percpu::init_cpu(index, apic_id) };
    time::calibrate_tsc();
    apic::calibrate_timer();
    // SAFETY: written once, before BSP_DONE is published.
    unsafe { *MADT.0.get() = Some(madt) };
    go_online(index);
    if madt.enabled_count() <= 1 {
        ALL_ONLINE.store(true, Ordering::Release);
    }
    BSP_DONE.store(true, Ordering::Release);
    Ok(madt_ref().expect("just stored"))
}

fn madt_ref() -> Option<&'static Madt> {
    if !BSP_DONE.load(Ordering::Acquire) && ONLINE_COUNT.load(Ordering::Acquire) == 0 {
        return None;
    }
    // SAFETY: written once in `init_bsp_with` before ONLINE_COUNT/BSP_DONE were published; read-only after.
    unsafe { (*MADT.0.get()).as_ref() }
}

/// The MADT read by [`init_bsp`].
pub fn madt() -> Option<&'static Madt> {
    madt_ref()
}

/// Marks CPU `index` online, under the shoot-down lock so that a shoot-down either includes it or
/// happened entirely before; then flushes this CPU's TLB.
fn go_online(index: usize) {
    without_interrupts(|| {
        let _g = SHOOTDOWN_LOCK.lock();
        ONLINE_MASK.fetch_or(1 << index, Ordering::AcqRel);
        ONLINE_COUNT.fetch_add(1, Ordering::AcqRel);
    });
    x86_64::instructions::tlb::flush_all();
}

/// Number of CPUs online (BSP included; 0 before [`init_bsp`]).
pub fn online() -> usize {
    ONLINE_COUNT.load(Ordering::Acquire)
}

/// Whether CPU `index` is online.
pub fn is_online(index: usize) -> bool {
    index < MAX_CPUS && ONLINE_MASK.load(Ordering::Acquire) & (1 << index) != 0
}

/// APs that started but could not be set up (no free index).
pub fn ap_failures() -> usize {
    AP_FAILURES.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------------
// APs.

/// Starts every other enabled CPU of the MADT; each runs `entry` once set up (interrupts off). Page
/// tables for the trampoline's identity mapping come from [`PoolFrames`]. Returns the number of CPUs
/// online (BSP included). Call once, on the BSP, after [`init_bsp`].
pub fn start_aps(entry: fn(&'static PerCpu) -> !) -> usize {
    let phys_offset = PHYS_OFFSET.load(Ordering::Relaxed);
    // SAFETY: as in `init_bsp`.
    let mapper = unsafe { apic::active_mapper(phys_offset) };
    let mut frames = PoolFrames::new(&mapper);
    drop(mapper);
    start_aps_with(entry, &mut frames).unwrap_or_else(|e| panic!("smp::start_aps: {e:?}"))
}

/// [`start_aps`] with the caller's frame allocator for the (at most three) page-table frames of the
/// trampoline's identity mapping.
pub fn start_aps_with(
    entry: fn(&'static PerCpu) -> !,
    frames: &mut impl FrameAllocator<Size4KiB>,
) -> Result<usize, SmpError> {
    if !BSP_DONE.load(Ordering::Acquire) || APS_STARTED.swap(true, Ordering::AcqRel) {
        return Err(SmpError::WrongOrder);
    }
    let madt = madt_ref().ok_or(SmpError::WrongOrder)?;
    let bsp_id = percpu::this().apic_id;
    if madt.enabled().all(|id| id == bsp_id) {
        ALL_ONLINE.store(true, Ordering::Release);
        return Ok(online());
    }
    let phys_offset = PHYS_OFFSET.load(Ordering::Relaxed);
    AP_ENTRY.store(entry as usize, Ordering::Release);
    BSP_CR4.store(Cr4::read_raw(), Ordering::Relaxed);
    BSP_EFER.store(Efer::read_raw(), Ordering::Relaxed);

    // Identity-map the trampoline page (executable) unless it already is.
    // SAFETY: as in `init_bsp`: only the BSP runs and nothing else modifies the page tables meanwhile.
    let mut mapper = unsafe { apic::active_mapper(phys_offset) };
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(TRAMPOLINE_PHYS));
    let frame = PhysFrame::<Size4KiB>::containing_address(PhysAddr::new(TRAMPOLINE_PHYS));
    let mapped_here = match mapper.translate_addr(VirtAddr::new(TRAMPOLINE_PHYS)) {
        Some(p) if p.as_u64() == TRAMPOLINE_PHYS => false,
        Some(_) => return Err(SmpError::TrampolineAddressTaken),
        None => {
            // SAFETY: the page is unmapped (translate said so) and the frame is the trampoline's, which the
            // kernel reserves for this (module docs).
            let flush =
                unsafe { mapper.map_to(page, frame, PageTableFlags::PRESENT | PageTableFlags::WRITABLE, frames) }
                    .map_err(|_| SmpError::OutOfFrames)?;
            flush.flush();
            true
        }
    };

    // Copy the trampoline and fill in its data block.
    let start = core::ptr::addr_of!(ap_trampoline_start) as u64;
    let end = core::ptr::addr_of!(ap_trampoline_end) as u64;
    let data_off = core::ptr::addr_of!(ap_trampoline_data) as u64 - start;
    assert_eq!(data_off, 0x230, "trampoline layout (smp/trampoline.S) changed");
    let len = (end - start) as usize;
    assert!(len <= 4096, "AP trampoline larger than a page");
    let dst = (phys_offset + TRAMPOLINE_PHYS) as *mut u8;
    let (cr3_frame, _) = Cr3::read();
    assert!(cr3_frame.start_address().as_u64() < 1 << 32, "the AP trampoline loads CR3 in 32-bit mode");
    // SAFETY: `dst` is physical 0x8000..0x9000 through the physical mapping; the page is reserved for the
    // trampoline (module docs); the source is the trampoline's bytes in the kernel image. The data block
    // is 8-aligned within the page (`.balign 8`).
    unsafe {
        core::ptr::copy_nonoverlapping(start as *const u8, dst, len);
        let data = dst.add(data_off as usize).cast::<u64>();
        data.write_volatile(cr3_frame.start_address().as_u64());
        data.add(1).write_volatile(STACK_TOPS.0.get() as u64);
        data.add(2).write_volatile(ap_entry as *const () as u64);
    }

    // Start each AP in turn.
    let stacks = AP_STACKS.0.get().cast::<ApStack>();
    let mut next_stack = 0;
    for apic_id in madt.enabled() {
        if apic_id == bsp_id {
            continue;
        }
        if next_stack >= MAX_CPUS || apic_id as usize >= acpi::MAX_MADT_CPUS {
            break;
        }
        // SAFETY: `next_stack < MAX_CPUS`; each stack is handed to one AP only; the table entry of this
        // APIC ID is written before its SIPIs and read only by that AP.
        unsafe {
            let top = stacks.add(next_stack) as u64 + AP_STACK_SIZE as u64;
            (*STACK_TOPS.0.get())[apic_id as usize] = top;
        }
        next_stack += 1;
        let before = online();
        apic::send_init(apic_id);
        time::delay_us(10_000);
        apic::send_sipi(apic_id, (TRAMPOLINE_PHYS >> 12) as u8);
        time::delay_us(200);
        if online() == before {
            apic::send_sipi(apic_id, (TRAMPOLINE_PHYS >> 12) as u8);
            time::delay_us(200);
        }
        let t0 = time::rdtsc();
        while online() == before && time::us_since(t0) < AP_TIMEOUT_US {
            core::hint::spin_loop();
        }
        if online() == before {
            crate::serial_println!("smp: APIC ID {apic_id} did not come online");
        }
    }

    if online() == madt.enabled_count() {
        ALL_ONLINE.store(true, Ordering::Release);
    }
    if mapped_here {
        if let Ok((_, flush)) = mapper.unmap(page) {
            flush.flush();
            tlb_shootdown(TRAMPOLINE_PHYS, 4096);
        }
    }
    Ok(online())
}

/// The Rust entry of an AP, called by the trampoline on the AP's own stack with its APIC ID.
extern "sysv64" fn ap_entry(apic_id: u32) -> ! {
    // SAFETY: the BSP's CR4 and EFER are valid for this CPU (same model); copying them enables the same
    // features (e.g. NXE, which the page tables use, set already by the trampoline).
    unsafe {
        Cr4::write_raw(BSP_CR4.load(Ordering::Relaxed));
        Efer::write_raw(BSP_EFER.load(Ordering::Relaxed));
    }
    let Some(index) = CPU_MAP.register(apic_id) else {
        AP_FAILURES.fetch_add(1, Ordering::Relaxed);
        loop {
            x86_64::instructions::interrupts::disable();
            x86_64::instructions::hlt();
        }
    };
    // SAFETY: `index` is this AP's own, fresh from CPU_MAP; each AP runs this once.
    unsafe { gdt::init_cpu(index) };
    idt::load();
    apic::enable_local();
    // SAFETY: as above.
    let cpu = unsafe { percpu::init_cpu(index, apic_id) };
    go_online(index);
    let entry = AP_ENTRY.load(Ordering::Acquire);
    // SAFETY: AP_ENTRY holds the `fn(&'static PerCpu) -> !` given to `start_aps_with`, stored before
    // any SIPI.
    let entry: fn(&'static PerCpu) -> ! = unsafe { core::mem::transmute::<usize, fn(&'static PerCpu) -> !>(entry) };
    entry(cpu)
}

// ---------------------------------------------------------------------------------------------------
// TLB shoot-down.

static SHOOTDOWN_LOCK: spin::Mutex<()> = spin::Mutex::new(());
static SD_GEN: AtomicU64 = AtomicU64::new(0);
static SD_TARGETS: AtomicU64 = AtomicU64::new(0);
static SD_START: AtomicU64 = AtomicU64::new(0);
static SD_LEN: AtomicU64 = AtomicU64::new(0);
static SD_ACKS: AtomicUsize = AtomicUsize::new(0);
/// Shoot-downs that sent IPIs (for reports).
pub static SHOOTDOWNS: AtomicU64 = AtomicU64::new(0);
/// Up to this many pages are invalidated one by one; larger ranges reload CR3.
const INVLPG_MAX_PAGES: u64 = 32;
/// A shoot-down not acknowledged within this time panics (a CPU is dead or NMIs are broken).
const SHOOTDOWN_TIMEOUT_US: u64 = 10_000_000;

/// Invalidates `[start, start + nbytes)` in the TLBs of all *other* online CPUs and returns once each
/// acknowledged (goheap's `ShootdownHook`). The caller invalidates its own TLB (goheap's `FrameSource`
/// does, page by page). An NMI IPI reaches CPUs spinning with interrupts off, so waiting cannot deadlock;
/// concurrent shoot-downs are serialised by a spin lock (NMIs while holding it are fine: the handler
/// takes no lock). Ranges over 32 pages reload CR3, which drops non-global entries only (the heap's
/// mappings are not global). No-op before other CPUs are online. Never allocates.
pub fn tlb_shootdown(start: u64, nbytes: usize) {
    if nbytes == 0 || ONLINE_COUNT.load(Ordering::Acquire) < 2 {
        return;
    }
    let me = percpu::current_index();
    without_interrupts(|| {
        let _g = SHOOTDOWN_LOCK.lock();
        let self_bit = me.map_or(0, |i| 1u64 << i);
        let targets = ONLINE_MASK.load(Ordering::Acquire) & !self_bit;
        if targets == 0 {
            return;
        }
        SD_START.store(start, Ordering::Relaxed);
        SD_LEN.store(nbytes as u64, Ordering::Relaxed);
        SD_TARGETS.store(targets, Ordering::Relaxed);
        SD_ACKS.store(0, Ordering::Relaxed);
        SD_GEN.fetch_add(1, Ordering::Release);
        SHOOTDOWNS.fetch_add(1, Ordering::Relaxed);
        if ALL_ONLINE.load(Ordering::Acquire) && me.is_some() {
            apic::send_nmi_all_but_self();
        } else {
            for index in 0..MAX_CPUS {
                if targets & (1 << index) != 0 {
                    if let Some(cpu) = percpu::get(index) {
                        apic::send_nmi(cpu.apic_id);
                    }
                }
            }
        }
        let want = targets.count_ones() as usize;
        let t0 = time::rdtsc();
        while SD_ACKS.load(Ordering::Acquire) < want {
            if time::us_since(t0) > SHOOTDOWN_TIMEOUT_US {
                panic!(
                    "TLB shoot-down of {start:#x}+{nbytes:#x}: {} of {want} CPUs acknowledged within {} ms",
                    SD_ACKS.load(Ordering::Acquire),
                    SHOOTDOWN_TIMEOUT_US / 1000
                );
            }
            core::hint::spin_loop();
        }
    });
}

/// The NMI handler's work: serve a pending shoot-down aimed at this CPU. Lock-free, allocation-free.
pub(crate) fn handle_nmi() {
    // Read the GS base itself rather than trusting the global flag: an NMI may hit an AP before its GS
    // base is set (then it has nothing to do: it was never a target).
    if x86_64::registers::model_specific::GsBase::read().as_u64() == 0 {
        return;
    }
    let Some(cpu) = percpu::try_this() else { return };
    cpu.nmis.fetch_add(1, Ordering::Relaxed);
    let gen = SD_GEN.load(Ordering::Acquire);
    if gen == cpu.sd_seen.load(Ordering::Relaxed) || SD_TARGETS.load(Ordering::Relaxed) & (1 << cpu.index) == 0 {
        return;
    }
    let start = SD_START.load(Ordering::Relaxed);
    let len = SD_LEN.load(Ordering::Relaxed);
    let pages = len.div_ceil(4096);
    if pages <= INVLPG_MAX_PAGES {
        for i in 0..pages {
            x86_64::instructions::tlb::flush(VirtAddr::new_truncate(start + i * 4096));
        }
    } else {
        x86_64::instructions::tlb::flush_all();
    }
    cpu.sd_seen.store(gen, Ordering::Relaxed);
    cpu.shootdowns_done.fetch_add(1, Ordering::Relaxed);
    SD_ACKS.fetch_add(1, Ordering::Release);
}

// ---------------------------------------------------------------------------------------------------
// Barrier.

/// A reusable spinning barrier for `n` CPUs (no allocation; interrupts may stay on or off).
pub struct Barrier {
    n: AtomicUsize,
    count: AtomicUsize,
    generation: AtomicUsize,
}

impl Barrier {
    /// A barrier for `n` parties (`n` may be set later with [`Barrier::set_parties`]).
    pub const fn new(n: usize) -> Self {
        Barrier { n: AtomicUsize::new(n), count: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    /// Sets the number of parties (before anyone waits).
    pub fn set_parties(&self, n: usize) {
        self.n.store(n, Ordering::Release);
    }

    /// Waits until `n` CPUs called `wait` (for this round); returns true on exactly one of them.
    pub fn wait(&self) -> bool {
        let gen = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n.load(Ordering::Acquire) {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            true
        } else {
            while self.generation.load(Ordering::Acquire) == gen {
                core::hint::spin_loop();
            }
            false
        }
    }
}
