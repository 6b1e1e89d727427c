//! Test kernel: SMP bring-up on 4 CPUs. Checks that every CPU of the MADT comes online, that the dense
//! CPU indices are distinct and `0..n`, that per-CPU data is reached through GS on every CPU, that fixed
//! IPIs and the LAPIC timer reach every CPU, that a TLB shoot-down is acknowledged by all other CPUs and
//! really drops their stale translations, that breakpoints are handled, and the barrier.
//!
//! The APs wait for commands (`run_on_aps`) with interrupts on, halted, woken by a fixed IPI.
//!
//! xtask: smp=4 firmware=both timeout=300
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

use bootloader_api::BootInfo;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use kernel_demo::percpu::{self, PerCpu, CPU_MAP};
use kernel_demo::{apic, serial_println, smp, time};
use x86_64::structures::paging::{Mapper, Page, PageTableFlags, PhysFrame, Size4KiB, Translate};
use x86_64::{PhysAddr, VirtAddr};

const N: usize = smp::MAX_CPUS;
/// What each CPU saw of itself: APIC ID (register), `current_index()`, `this().index`, `this().apic_id`.
static SEEN_APIC: [AtomicU64; N] = [const { AtomicU64::new(u64::MAX) }; N];
static SEEN_INDEX: [AtomicU64; N] = [const { AtomicU64::new(u64::MAX) }; N];
static SEEN_GS_INDEX: [AtomicU64; N] = [const { AtomicU64::new(u64::MAX) }; N];
static SEEN_GS_APIC: [AtomicU64; N] = [const { AtomicU64::new(u64::MAX) }; N];
/// Values read through the test page by each CPU.
static READ_VALUE: [AtomicU64; N] = [const { AtomicU64::new(0) }; N];
static PHYS_OFFSET: AtomicU64 = AtomicU64::new(0);
static START_MS: AtomicU64 = AtomicU64::new(0);

/// Commands for the APs: generation in the high bits, the operation in the low byte.
static CMD: AtomicUsize = AtomicUsize::new(0);
static DONE: AtomicUsize = AtomicUsize::new(0);
const OP_RECORD: usize = 1;
const OP_READ_TEST_PAGE: usize = 2;
const OP_BARRIER: usize = 3;
static BARRIER: smp::Barrier = smp::Barrier::new(0);
static BARRIER_ROUNDS: AtomicUsize = AtomicUsize::new(0);

/// Two page-aligned frames in the kernel image, mapped in turn at the test page.
#[repr(C, align(4096))]
struct TestFrames([[u64; 512]; 2]);
static mut TEST_FRAMES: TestFrames = TestFrames([[0; 512]; 2]);

fn record() {
    let cpu = percpu::this();
    let i = cpu.index;
    SEEN_APIC[i].store(u64::from(apic::id()), Ordering::Relaxed);
    SEEN_INDEX[i].store(percpu::current_index().map_or(u64::MAX - 1, |x| x as u64), Ordering::Relaxed);
    SEEN_GS_INDEX[i].store(i as u64, Ordering::Relaxed);
    SEEN_GS_APIC[i].store(u64::from(cpu.apic_id), Ordering::Relaxed);
}

fn test_page() -> u64 {
    apic::mmio_window().expect("APIC mapped").0 + 0x1000
}

fn read_test_page() {
    // SAFETY: the BSP mapped the test page before posting this command; reading a u64 from it is fine.
    let v = unsafe { core::ptr::read_volatile(test_page() as *const u64) };
    READ_VALUE[percpu::this().index].store(v, Ordering::Relaxed);
}

fn run(op: usize) {
    match op {
        OP_RECORD => record(),
        OP_READ_TEST_PAGE => read_test_page(),
        OP_BARRIER => {
            for _ in 0..5 {
                if BARRIER.wait() {
                    BARRIER_ROUNDS.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        _ => {}
    }
}

fn ap_main(cpu: &'static PerCpu) -> ! {
    serial_println!("AP up: APIC ID {} index {}", cpu.apic_id, cpu.index);
    apic::start_timer(1000);
    let mut seen = 0;
    loop {
        x86_64::instructions::interrupts::disable();
        let c = CMD.load(Ordering::Acquire);
        if c >> 8 != seen {
            seen = c >> 8;
            x86_64::instructions::interrupts::enable();
            run(c & 0xFF);
            DONE.fetch_add(1, Ordering::AcqRel);
        } else {
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}

/// Runs `op` on every AP (and, for the barrier, on the BSP too) and waits until all did.
fn run_on_aps(op: usize) {
    let aps = smp::online() - 1;
    DONE.store(0, Ordering::Release);
    let gen = (CMD.load(Ordering::Relaxed) >> 8) + 1;
    CMD.store(gen << 8 | op, Ordering::Release);
    apic::send_fixed_all_but_self(apic::TEST_IPI_VECTOR);
    if op == OP_BARRIER {
        run(op);
    }
    let t0 = time::rdtsc();
    while DONE.load(Ordering::Acquire) < aps {
        assert!(
            time::us_since(t0) < 10_000_000,
            "APs did not finish op {op}: {} of {aps}",
            DONE.load(Ordering::Acquire)
        );
        core::hint::spin_loop();
    }
}

/// The set-up before the cases.
fn boot(boot_info: &'static mut BootInfo) {
    kernel_demo::init();
    PHYS_OFFSET.store(boot_info.physical_memory_offset.into_option().unwrap(), Ordering::Relaxed);
    let t0 = time::rdtsc();
    let madt = smp::init_bsp(boot_info).expect("smp::init_bsp");
    let ids: [u32; 8] = core::array::from_fn(|i| madt.cpus().get(i).map_or(u32::MAX, |c| c.apic_id));
    serial_println!(
        "MADT: {} CPUs, {} enabled, APIC IDs {:?}, LAPIC at {:#x}",
        madt.cpus().len(),
        madt.enabled_count(),
        &ids[..madt.cpus().len().min(8)],
        madt.lapic_phys
    );
    let n = smp::start_aps(ap_main);
    START_MS.store(time::us_since(t0) / 1000, Ordering::Relaxed);
    serial_println!("{n} CPUs online after {} ms (init_bsp + start_aps)", START_MS.load(Ordering::Relaxed));
    record();
    run_on_aps(OP_RECORD);
}

kernel_demo::test_kernel!(boot);

#[test_case]
fn all_madt_cpus_came_online() {
    let madt = smp::madt().unwrap();
    assert_eq!(madt.enabled_count(), 4, "QEMU runs with -smp 4");
    assert_eq!(smp::online(), madt.enabled_count());
    assert_eq!(smp::ap_failures(), 0);
    for id in madt.enabled() {
        let i = CPU_MAP.index_of(id).unwrap_or_else(|| panic!("APIC ID {id} has no index"));
        assert!(smp::is_online(i));
    }
}

#[test_case]
fn cpu_indices_are_distinct_and_dense() {
    let n = smp::online();
    let mut seen = [false; N];
    for i in 0..n {
        let idx = SEEN_INDEX[i].load(Ordering::Relaxed);
        assert_eq!(idx, i as u64, "CPU in slot {i} saw current_index {idx}");
        assert!(!seen[idx as usize]);
        seen[idx as usize] = true;
        let apic_id = SEEN_APIC[i].load(Ordering::Relaxed) as u32;
        assert_eq!(CPU_MAP.index_of(apic_id), Some(i), "APIC ID {apic_id}");
    }
    assert_eq!(CPU_MAP.len(), n);
    assert_eq!(percpu::current_index(), Some(0), "the BSP has index 0");
}

#[test_case]
fn percpu_data_through_gs() {
    for i in 0..smp::online() {
        assert_eq!(SEEN_GS_INDEX[i].load(Ordering::Relaxed), i as u64);
        assert_eq!(
            SEEN_GS_APIC[i].load(Ordering::Relaxed),
            SEEN_APIC[i].load(Ordering::Relaxed),
            "CPU {i}: PerCpu::apic_id vs the APIC ID register"
        );
        let cpu = percpu::get(i).unwrap();
        assert_eq!((cpu.index, u64::from(cpu.apic_id)), (i, SEEN_APIC[i].load(Ordering::Relaxed)));
    }
    assert_eq!(percpu::all().count(), smp::online());
}

#[test_case]
fn fixed_ipis_reach_every_ap() {
    let before: [u64; N] = core::array::from_fn(|i| percpu::get(i).map_or(0, |c| c.fixed_ipis.load(Ordering::Relaxed)));
    run_on_aps(0);
    // An AP woken by its own timer may see the command and finish before the BSP's IPI even reaches it, so
    // the IPI may land after `run_on_aps` returns: wait for it (a lost IPI still fails, after 10 s).
    let t0 = time::rdtsc();
    for i in 1..smp::online() {
        while percpu::get(i).unwrap().fixed_ipis.load(Ordering::Relaxed) <= before[i] {
            assert!(time::us_since(t0) < 10_000_000, "CPU {i} got no IPI");
            core::hint::spin_loop();
        }
    }
}

#[test_case]
fn tlb_shootdown_is_acknowledged_and_drops_stale_entries() {
    let phys_offset = PHYS_OFFSET.load(Ordering::Relaxed);
    // SAFETY: only the BSP changes page tables now, and only the test page in the APIC's MMIO slot.
    let mut mapper = unsafe { apic::active_mapper(phys_offset) };
    let frames = core::ptr::addr_of_mut!(TEST_FRAMES);
    let frame = |k: usize| {
        // SAFETY: only the address of the static is taken.
        let virt = unsafe { core::ptr::addr_of!((*frames).0[k]) } as u64;
        PhysFrame::<Size4KiB>::containing_address(mapper.translate_addr(VirtAddr::new(virt)).unwrap())
    };
    let (a, b) = (frame(0), frame(1));
    // SAFETY: the BSP writes the frames before any CPU reads them through the test page.
    unsafe {
        (*frames).0[0][0] = 0xAAAA;
        (*frames).0[1][0] = 0xBBBB;
    }
    let page = Page::<Size4KiB>::containing_address(VirtAddr::new(test_page()));
    let flags = PageTableFlags::PRESENT | PageTableFlags::WRITABLE | PageTableFlags::NO_EXECUTE;
    let mut no_frames = smp::PoolFrames::new(&mapper);
    // SAFETY: the test page is unused (next to the APIC page, same level-1 table, so no new table);
    // frame A is ours.
    unsafe { mapper.map_to(page, a, flags, &mut no_frames) }.expect("map test page").flush();
    run_on_aps(OP_READ_TEST_PAGE);
    for i in 1..smp::online() {
        assert_eq!(READ_VALUE[i].load(Ordering::Relaxed), 0xAAAA);
    }
    // Remap to frame B without telling anyone but through the shoot-down.
    let (old, flush) = mapper.unmap(page).unwrap();
    flush.flush();
    assert_eq!(old, a);
    // SAFETY: as above, frame B is ours.
    unsafe { mapper.map_to(page, b, flags, &mut no_frames) }.unwrap().flush();
    let before: [u64; N] =
        core::array::from_fn(|i| percpu::get(i).map_or(0, |c| c.shootdowns_done.load(Ordering::Relaxed)));
    smp::tlb_shootdown(page.start_address().as_u64(), 4096);
    for i in 1..smp::online() {
        assert_eq!(
            percpu::get(i).unwrap().shootdowns_done.load(Ordering::Relaxed),
            before[i] + 1,
            "CPU {i} did not ack"
        );
    }
    assert_eq!(percpu::this().shootdowns_done.load(Ordering::Relaxed), before[0], "the caller is not a target");
    run_on_aps(OP_READ_TEST_PAGE);
    for i in 1..smp::online() {
        assert_eq!(READ_VALUE[i].load(Ordering::Relaxed), 0xBBBB, "CPU {i} read through a stale TLB entry");
    }
    // A large range (CR3 reload path) and many in a row.
    for _ in 0..50 {
        smp::tlb_shootdown(0xFFFF_FF80_0000_0000, 1 << 20);
    }
    let (_, flush) = mapper.unmap(page).unwrap();
    flush.flush();
    smp::tlb_shootdown(page.start_address().as_u64(), 4096);
    let _ = PhysAddr::new(0);
}

#[test_case]
fn timer_ticks_on_every_cpu() {
    // At 1 kHz, wait until every CPU saw 20 more ticks (a loaded host may starve a vCPU for a while, so
    // the limit is generous: 10 s).
    apic::start_timer(1000);
    let n = smp::online();
    let ticks = |i: usize| percpu::get(i).map_or(0, |c| c.ticks.load(Ordering::Relaxed));
    let before: [u64; N] = core::array::from_fn(ticks);
    let t0 = time::rdtsc();
    x86_64::instructions::interrupts::enable();
    while (0..n).any(|i| ticks(i) < before[i] + 20) && time::us_since(t0) < 10_000_000 {
        x86_64::instructions::hlt();
    }
    x86_64::instructions::interrupts::disable();
    apic::stop_timer();
    let ms = time::us_since(t0) / 1000;
    for i in 0..n {
        let t = ticks(i) - before[i];
        serial_println!("  CPU {i}: {t} ticks in {ms} ms");
        assert!(t >= 20, "CPU {i}: only {t} timer ticks in {ms} ms at 1 kHz");
    }
}

#[test_case]
fn barrier_holds_all_cpus() {
    BARRIER.set_parties(smp::online());
    run_on_aps(OP_BARRIER);
    assert_eq!(BARRIER_ROUNDS.load(Ordering::Relaxed), 5);
}

#[test_case]
fn breakpoint_is_handled() {
    let before = kernel_demo::idt::BREAKPOINTS.load(Ordering::Relaxed);
    x86_64::instructions::interrupts::int3();
    assert_eq!(kernel_demo::idt::BREAKPOINTS.load(Ordering::Relaxed), before + 1);
}
