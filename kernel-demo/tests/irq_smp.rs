//! Test kernel: 4 CPUs, goheap as the kernel heap (`IrqCpus`), interrupt handlers that allocate (issue 11).
//!
//! On every CPU the LAPIC timer (every 20 ms) and the fixed IPI, which the CPUs send each other, run a
//! handler that allocates, writes, reallocates across the tiers and frees (tiny, small, large) and keeps
//! one object per CPU from one run to the next, while every CPU runs a mixed workload on the same heap:
//! alloc, alloc_zeroed, realloc across the tiers and free with contents checked, `background` steps,
//! `release_all`, and (CPU 0) `set_memory_limit` toggled on and off. A goheap lock taken, or a frame
//! allocated, outside the CPU provider's guard would let a handler spin on a lock its own CPU holds: the
//! kernel would hang and the xtask timeout would fail it. Checked: every object's contents, no handler
//! found a corrupted object, and the handlers ran on every CPU, from both interrupt sources.
//!
//! xtask: smp=4 mem=512M timeout=900 firmware=both
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use kernel_demo::heap::HEAP;
use kernel_demo::smp::MAX_CPUS;
use kernel_demo::{apic, percpu, serial_println, testing};
use testkit::pattern::marked;
use testkit::Rng;

kernel_demo::test_kernel!(cpus = 4);

/// Workload steps per CPU.
const STEPS: usize = 400;
/// Live objects per CPU in the workload.
const SLOTS: usize = 32;

fn lay(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Writes testkit's pattern for `seed` into the marked bytes of the object (the first 64 and one in 509: cheap
/// under TCG; the same set for every size, so a prefix of a reallocated object checks as written).
///
/// # Safety
/// `p` is valid for writes of `size` bytes that nothing else uses meanwhile.
unsafe fn fill(p: *mut u8, size: usize, seed: usize) {
    // SAFETY: the caller's contract.
    unsafe { testkit::pattern::fill_marked(p, size, seed as u64) }
}

/// Whether the marked bytes still hold [`fill`]'s pattern for `seed`.
///
/// # Safety
/// `p` is valid for reads of `size` bytes.
unsafe fn intact(p: *const u8, size: usize, seed: usize) -> bool {
    // SAFETY: the caller's contract.
    unsafe { testkit::pattern::check_marked(p, size, seed as u64) }.is_ok()
}

// ---- The interrupt handler (timer and IPI) -----------------------------------------------------------------

static TIMER_RUNS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static IPI_RUNS: [AtomicUsize; MAX_CPUS] = [const { AtomicUsize::new(0) }; MAX_CPUS];
static HANDLER_BAD: AtomicBool = AtomicBool::new(false);
/// Per CPU, an object a handler run leaves for the next one on that CPU: address, size, seed.
static KEPT: [[AtomicUsize; 3]; MAX_CPUS] = [const { [const { AtomicUsize::new(0) }; 3] }; MAX_CPUS];

fn h_check(p: *const u8, size: usize, seed: usize) {
    // SAFETY: callers pass live allocations of at least `size` bytes.
    if !unsafe { intact(p, size, seed) } {
        HANDLER_BAD.store(true, Ordering::Relaxed);
    }
}

/// What both interrupt handlers do, on the interrupted CPU (interrupts off).
fn in_interrupt(cpu: usize, run: usize) {
    let seed = (cpu << 40) | (run << 4);
    // Tiny, small and large at once.
    let objs = [(8, seed), (300, seed + 1), (40 << 10, seed + 2)];
    // SAFETY: non-zero sizes; each object is filled only when the allocation succeeded.
    let ps = objs.map(|(size, s)| unsafe {
        let p = alloc(lay(size));
        if !p.is_null() {
            fill(p, size, s);
        }
        p
    });
    // Across the tiers and back.
    let mut size = 12;
    // SAFETY: a non-zero size.
    let mut p = unsafe { alloc(lay(size)) };
    if !p.is_null() {
        // SAFETY: `p` is a live allocation of `size` bytes.
        unsafe { fill(p, size, seed + 3) };
        for next in [200, 3000, 48 << 10, 500, 4] {
            // SAFETY: `p` is a live allocation of `size` bytes, align 8.
            let q = unsafe { realloc(p, lay(size), next) };
            if q.is_null() {
                break;
            }
            h_check(q, size.min(next), seed + 3);
            // SAFETY: `q` is a live allocation of `next` bytes.
            unsafe { fill(q, next, seed + 3) };
            (p, size) = (q, next);
        }
        h_check(p, size, seed + 3);
        // SAFETY: as above.
        unsafe { dealloc(p, lay(size)) };
    }
    for (p, (size, s)) in ps.into_iter().zip(objs) {
        if !p.is_null() {
            h_check(p, size, s);
            // SAFETY: allocated above with this layout.
            unsafe { dealloc(p, lay(size)) };
        }
    }
    let kept = &KEPT[cpu];
    let (addr, size, s) =
        (kept[0].load(Ordering::Relaxed), kept[1].load(Ordering::Relaxed), kept[2].load(Ordering::Relaxed));
    if addr != 0 {
        h_check(addr as *const u8, size, s);
        // SAFETY: left by this CPU's previous run with this layout.
        unsafe { dealloc(addr as *mut u8, lay(size)) };
    }
    let size = [24, 1000, 20 << 10, 72 << 10][run % 4];
    // SAFETY: a non-zero size; filled only when it succeeded.
    let p = unsafe { alloc(lay(size)) };
    if !p.is_null() {
        // SAFETY: a live allocation of `size` bytes.
        unsafe { fill(p, size, seed + 4) };
    }
    kept[0].store(p as usize, Ordering::Relaxed);
    kept[1].store(size, Ordering::Relaxed);
    kept[2].store(seed + 4, Ordering::Relaxed);
    // A background step from interrupt context now and then (the interrupt contract allows it).
    if run % 16 == 0 {
        HEAP.background(2, 128 << 10);
    }
}

fn on_timer() {
    if let Some(c) = percpu::try_this() {
        let run = TIMER_RUNS[c.index].fetch_add(1, Ordering::Relaxed) + 1;
        in_interrupt(c.index, run * 2);
    }
}

fn on_ipi() {
    if let Some(c) = percpu::try_this() {
        let run = IPI_RUNS[c.index].fetch_add(1, Ordering::Relaxed) + 1;
        in_interrupt(c.index, run * 2 + 1);
    }
}

// ---- The workload ------------------------------------------------------------------------------------------

fn random_size(r: &mut Rng) -> usize {
    match r.index(10) {
        0..=2 => 1 + r.index(15),
        3..=6 => 16 + r.index(4000),
        7 | 8 => 4000 + r.index(28 << 10),
        _ => (32 << 10) + r.index(300 << 10),
    }
}

static LIMITED: AtomicBool = AtomicBool::new(false);

fn workload(cpu: usize, ncpus: usize) {
    apic::start_timer(20_000);
    x86_64::instructions::interrupts::enable();
    let mut live = [(0usize, 0usize, 0usize); SLOTS];
    let mut r = Rng::new(0x9E37_79B9_7F4A_7C15 ^ (cpu as u64 + 1));
    for step in 0..STEPS {
        if cpu == 0 && step % 50 == 0 {
            let runs: usize = TIMER_RUNS.iter().chain(&IPI_RUNS).map(|n| n.load(Ordering::Relaxed)).sum();
            serial_println!("irq_smp: CPU 0 at step {step} of {STEPS}, {runs} handler runs on all CPUs");
        }
        let k = r.index(SLOTS);
        let seed = (cpu << 40) | (1 << 39) | step;
        match r.index(100) {
            0..=69 => {
                let (addr, size, s) = live[k];
                if addr != 0 {
                    // SAFETY: a live allocation of `size` bytes.
                    assert!(unsafe { intact(addr as *const u8, size, s) }, "object {addr:#x} ({size} B) overwritten");
                    if r.index(2) == 0 {
                        // SAFETY: a live allocation of `size` bytes, align 8.
                        unsafe { dealloc(addr as *mut u8, lay(size)) };
                        live[k] = (0, 0, 0);
                    } else {
                        let new = random_size(&mut r);
                        // SAFETY: as above.
                        let q = unsafe { realloc(addr as *mut u8, lay(size), new) };
                        assert!(!q.is_null(), "realloc to {new} B failed");
                        // SAFETY: `q` is a live allocation of `new` bytes.
                        unsafe {
                            assert!(intact(q, size.min(new), s), "realloc lost contents");
                            fill(q, new, s);
                        }
                        live[k] = (q as usize, new, s);
                    }
                } else {
                    let size = random_size(&mut r);
                    let zeroed = r.index(4) == 0;
                    // SAFETY: a non-zero size.
                    let q = unsafe {
                        if zeroed {
                            alloc_zeroed(lay(size))
                        } else {
                            alloc(lay(size))
                        }
                    };
                    assert!(!q.is_null(), "alloc of {size} B failed");
                    if zeroed {
                        // SAFETY: `q` is valid for `size` bytes.
                        assert!(marked(size).all(|i| unsafe { q.add(i).read() } == 0), "alloc_zeroed not zeroed");
                    }
                    // SAFETY: as above.
                    unsafe { fill(q, size, seed) };
                    live[k] = (q as usize, size, seed);
                }
            }
            70..=79 => {
                HEAP.background(4, 256 << 10);
            }
            80..=81 => {
                HEAP.release_all();
            }
            82..=89 => {
                // Wake the other CPUs' IPI handlers.
                apic::send_fixed_all_but_self(apic::TEST_IPI_VECTOR);
            }
            90..=94 if cpu == 0 => {
                let on = !LIMITED.load(Ordering::Relaxed);
                LIMITED.store(on, Ordering::Relaxed);
                HEAP.set_memory_limit(if on { 8 << 20 } else { usize::MAX });
            }
            _ => HEAP.flush_cpu_cache(),
        }
    }
    testing::barrier();
    x86_64::instructions::interrupts::disable();
    apic::stop_timer();
    for (addr, size, s) in live {
        if addr != 0 {
            // SAFETY: a live allocation of `size` bytes, align 8.
            unsafe {
                assert!(intact(addr as *const u8, size, s), "object {addr:#x} ({size} B) overwritten");
                dealloc(addr as *mut u8, lay(size));
            }
        }
    }
    let _ = ncpus;
}

#[test_case]
fn interrupt_handlers_allocate_on_every_cpu_while_every_cpu_works() {
    apic::set_tick_handler(Some(on_timer));
    apic::set_ipi_handler(Some(on_ipi));
    testing::run_on_all(workload);
    apic::set_tick_handler(None);
    apic::set_ipi_handler(None);
    HEAP.set_memory_limit(usize::MAX);
    for (i, (t, p)) in TIMER_RUNS.iter().zip(&IPI_RUNS).enumerate().take(4) {
        let (t, p) = (t.load(Ordering::Relaxed), p.load(Ordering::Relaxed));
        serial_println!("irq_smp: CPU {i}: {t} timer handler runs, {p} IPI handler runs");
        assert!(t > 0, "CPU {i}'s timer handler never ran");
        assert!(p > 0, "CPU {i}'s IPI handler never ran");
    }
    assert!(!HANDLER_BAD.load(Ordering::Relaxed), "an interrupt handler found a corrupted object");
}
