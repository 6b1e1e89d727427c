//! Test kernel: one CPU, goheap with the single-CPU provider `goheap::x86_64::IrqSingle` (issue 11). The
//! LAPIC timer's handler allocates, writes, reallocates across the tiers and frees (tiny, small, large)
//! on an allocator whose provider is `IrqSingle` (by value), while the main loop calls every entry point
//! of the same allocator: `alloc`, `alloc_zeroed`, `dealloc`, `realloc` (every tier, a large object grown
//! and shrunk in place), `background`, `release_all`, `flush_cpu_cache`, `set_memory_limit`. A path that
//! took a goheap lock (or called the page source, which takes its own lock here as a frame source does)
//! outside the provider's guard would let the handler spin on a lock its CPU holds: the kernel would hang
//! and the xtask timeout would fail it. Contents are checked everywhere.
//!
//! The allocator under test is a second goheap instance over a page source of its own: a region carved
//! out of the kernel heap; commit and decommit only count (the memory stays mapped), under a spin lock.
//!
//! xtask: smp=1 timeout=300
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use goheap::cpu::MAX_CPUS;
use goheap::page::pagealloc::PALLOC_CHUNK_BYTES;
use goheap::source::PageSource;
use goheap::x86_64::IrqSingle;
use goheap::Malloc;
use kernel_demo::{apic, serial_println};
use testkit::pattern::marked;

kernel_demo::test_kernel!();

// ---- The page source: a region of the kernel heap ----------------------------------------------------------

/// Arena of the allocator under test.
const ARENA: usize = 16 << 20;
/// Everything it may reserve, plus a chunk of slack to align the region.
const REGION: usize = goheap::page::heap::reservation_bytes(ARENA) + PALLOC_CHUNK_BYTES;

/// Reservations are carved from `[base, base + len)` in order; commit and decommit count bytes.
struct RegionSource {
    base: AtomicUsize,
    len: AtomicUsize,
    next: AtomicUsize,
    committed: AtomicUsize,
    lock: spin::Mutex<()>,
}

// SAFETY: reservations are disjoint ranges of a region this source owns (handed over once by `give`), all
// of it mapped and writable, so committed memory is usable; the lock serialises the bookkeeping.
unsafe impl PageSource for RegionSource {
    fn reserve(&self, nbytes: usize, align: usize) -> Option<NonNull<u8>> {
        let _g = self.lock.lock();
        let (base, len) = (self.base.load(Ordering::Relaxed), self.len.load(Ordering::Relaxed));
        let start = (base + self.next.load(Ordering::Relaxed)).next_multiple_of(align);
        if base == 0 || start + nbytes > base + len {
            return None;
        }
        self.next.store(start + nbytes - base, Ordering::Relaxed);
        NonNull::new(start as *mut u8)
    }
    unsafe fn commit(&self, _addr: NonNull<u8>, nbytes: usize) -> bool {
        let _g = self.lock.lock();
        self.committed.fetch_add(nbytes, Ordering::Relaxed);
        true
    }
    unsafe fn decommit(&self, _addr: NonNull<u8>, nbytes: usize) {
        let _g = self.lock.lock();
        self.committed.fetch_sub(nbytes, Ordering::Relaxed);
    }
}

/// The allocator under test: the single-CPU provider, by value.
static M: Malloc<RegionSource, IrqSingle> = Malloc::with_max_bytes(
    RegionSource {
        base: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        next: AtomicUsize::new(0),
        committed: AtomicUsize::new(0),
        lock: spin::Mutex::new(()),
    },
    // SAFETY: this kernel runs on one CPU (smp=1), so only that CPU ever calls `M`.
    unsafe { IrqSingle::new() },
    ARENA,
);

/// Hands `M` its region (a block of the kernel heap that is never freed).
fn give_region() {
    let layout = Layout::from_size_align(REGION, PALLOC_CHUNK_BYTES).unwrap();
    // SAFETY: a non-zero size.
    let p = unsafe { alloc::alloc::alloc(layout) };
    assert!(!p.is_null(), "no {REGION} B region for the allocator under test");
    let src = M.heap().source();
    src.len.store(REGION, Ordering::Relaxed);
    src.base.store(p as usize, Ordering::Release);
}

// ---- Contents ----------------------------------------------------------------------------------------------

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

fn lay(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

// ---- The timer handler ---------------------------------------------------------------------------------------

static HANDLER_RUNS: AtomicUsize = AtomicUsize::new(0);
static HANDLER_BAD: AtomicBool = AtomicBool::new(false);
/// An object a handler run leaves for the next one: address, size, seed.
static KEPT: [AtomicUsize; 3] = [const { AtomicUsize::new(0) }; 3];

fn h_check(p: *const u8, size: usize, seed: usize) {
    // SAFETY: a live object of at least that many bytes.
    if !unsafe { intact(p, size, seed) } {
        HANDLER_BAD.store(true, Ordering::Relaxed);
    }
}

fn on_tick() {
    let run = HANDLER_RUNS.fetch_add(1, Ordering::Relaxed) + 1;
    let seed = run * 7;
    // Tiny, small and large at once.
    let objs = [(8, seed), (300, seed + 1), (64 << 10, seed + 2)];
    let ps = objs.map(|(size, s)| {
        let p = M.alloc(lay(size));
        if !p.is_null() {
            // SAFETY: a live object of at least that many bytes, which this code owns.
            unsafe { fill(p, size, s) };
        }
        p
    });
    // Across the tiers and back; the large steps may resize in place.
    let mut size = 12;
    let mut p = M.alloc(lay(size));
    if !p.is_null() {
        // SAFETY: a live object of at least that many bytes, which this code owns.
        unsafe { fill(p, size, seed + 3) };
        for next in [100, 3000, 40 << 10, 200 << 10, 72 << 10, 500, 4] {
            // SAFETY: `p` is a live allocation of `size` bytes, align 8, from `M`.
            let q = unsafe { M.realloc(p, lay(size), next) };
            if q.is_null() {
                break;
            }
            h_check(q, size.min(next), seed + 3);
            // SAFETY: a live object of at least that many bytes, which this code owns.
            unsafe { fill(q, next, seed + 3) };
            (p, size) = (q, next);
        }
        h_check(p, size, seed + 3);
        // SAFETY: as above.
        unsafe { M.dealloc(p, lay(size)) };
    }
    for (p, (size, s)) in ps.into_iter().zip(objs) {
        if !p.is_null() {
            h_check(p, size, s);
            // SAFETY: allocated above with this layout.
            unsafe { M.dealloc(p, lay(size)) };
        }
    }
    let (addr, size, s) =
        (KEPT[0].load(Ordering::Relaxed), KEPT[1].load(Ordering::Relaxed), KEPT[2].load(Ordering::Relaxed));
    if addr != 0 {
        h_check(addr as *const u8, size, s);
        // SAFETY: left by the previous run with this layout.
        unsafe { M.dealloc(addr as *mut u8, lay(size)) };
    }
    let size = [24, 1000, 20 << 10, 48 << 10][run % 4];
    let p = M.alloc(lay(size));
    if !p.is_null() {
        // SAFETY: a live object of at least that many bytes, which this code owns.
        unsafe { fill(p, size, seed + 4) };
    }
    KEPT[0].store(p as usize, Ordering::Relaxed);
    KEPT[1].store(size, Ordering::Relaxed);
    KEPT[2].store(seed + 4, Ordering::Relaxed);
    // A timer interrupt's background step, now and then (the interrupt contract allows it).
    if run % 8 == 0 {
        M.background(2, 128 << 10);
    }
}

// ---- The main workload -------------------------------------------------------------------------------------

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn random_size(r: &mut Rng) -> usize {
    match r.below(10) {
        0..=2 => 1 + r.below(15),
        3..=6 => 16 + r.below(4000),
        7 | 8 => 4000 + r.below(28 << 10),
        _ => (32 << 10) + r.below(300 << 10),
    }
}

#[test_case]
fn every_entry_point_with_an_allocating_timer_handler() {
    give_region();
    // Warm up with interrupts off, then let the handler in.
    let p = M.alloc(lay(64));
    assert!(!p.is_null());
    // SAFETY: allocated just above.
    unsafe { M.dealloc(p, lay(64)) };
    apic::set_tick_handler(Some(on_tick));
    // Every 10 ms: under TCG the handler's share of the CPU grows as the emulated CPU slows down.
    apic::start_timer(10_000);
    x86_64::instructions::interrupts::enable();

    const SLOTS: usize = 48;
    let mut live = [(0usize, 0usize, 0usize); SLOTS];
    let mut r = Rng(0x2545_F491_4F6C_DD1D);
    let mut limited = false;
    let mut step = 0usize;
    while step < 600 || HANDLER_RUNS.load(Ordering::Relaxed) < 100 {
        assert!(step < 200_000, "the timer handler ran only {} times", HANDLER_RUNS.load(Ordering::Relaxed));
        step += 1;
        if step % 100 == 0 {
            serial_println!("irq_single: step {step}, {} timer handler runs", HANDLER_RUNS.load(Ordering::Relaxed));
        }
        let k = r.below(SLOTS);
        match r.below(100) {
            0..=59 => {
                let (addr, size, seed) = live[k];
                if addr != 0 {
                    // SAFETY: a live object of at least that many bytes.
                    assert!(
                        unsafe { intact(addr as *const u8, size, seed) },
                        "object {addr:#x} ({size} B) overwritten"
                    );
                    if r.below(2) == 0 {
                        // SAFETY: a live allocation of `size` bytes, align 8, from `M`.
                        unsafe { M.dealloc(addr as *mut u8, lay(size)) };
                        live[k] = (0, 0, 0);
                    } else {
                        let new = random_size(&mut r);
                        // SAFETY: as above.
                        let q = unsafe { M.realloc(addr as *mut u8, lay(size), new) };
                        assert!(!q.is_null(), "realloc to {new} B failed");
                        // SAFETY: a live object of at least that many bytes.
                        assert!(unsafe { intact(q, size.min(new), seed) }, "realloc lost contents");
                        // SAFETY: a live object of at least that many bytes, which this code owns.
                        unsafe { fill(q, new, seed) };
                        live[k] = (q as usize, new, seed);
                    }
                } else {
                    let size = random_size(&mut r);
                    let zeroed = r.below(4) == 0;
                    let q = if zeroed { M.alloc_zeroed(lay(size)) } else { M.alloc(lay(size)) };
                    assert!(!q.is_null(), "alloc of {size} B failed");
                    if zeroed {
                        // SAFETY: `q` is valid for `size` bytes.
                        assert!(marked(size).all(|i| unsafe { q.add(i).read() } == 0), "alloc_zeroed not zeroed");
                    }
                    // SAFETY: a live object of at least that many bytes, which this code owns.
                    unsafe { fill(q, size, step) };
                    live[k] = (q as usize, size, step);
                }
            }
            60..=74 => {
                // A large object grown and shrunk: in place whenever the following pages are free.
                let mut size = 48 << 10;
                let mut p = M.alloc(lay(size));
                assert!(!p.is_null());
                // SAFETY: a live object of at least that many bytes, which this code owns.
                unsafe { fill(p, size, step) };
                for new in [160 << 10, 400 << 10, 64 << 10, 33 << 10] {
                    // SAFETY: a live allocation of `size` bytes, align 8.
                    let q = unsafe { M.realloc(p, lay(size), new) };
                    assert!(!q.is_null());
                    // SAFETY: a live object of at least that many bytes.
                    assert!(unsafe { intact(q, size.min(new), step) }, "large realloc lost contents");
                    // SAFETY: a live object of at least that many bytes, which this code owns.
                    unsafe { fill(q, new, step) };
                    (p, size) = (q, new);
                }
                // SAFETY: as above.
                unsafe { M.dealloc(p, lay(size)) };
            }
            75..=84 => {
                M.background(4, 256 << 10);
            }
            85..=89 => {
                M.release_all();
            }
            90..=94 => M.flush_cpu_cache(),
            _ => {
                limited = !limited;
                M.set_memory_limit(if limited { 4 << 20 } else { usize::MAX });
            }
        }
    }
    x86_64::instructions::interrupts::disable();
    apic::set_tick_handler(None);
    for (addr, size, seed) in live {
        if addr != 0 {
            // SAFETY: a live object of at least that many bytes.
            assert!(unsafe { intact(addr as *const u8, size, seed) }, "object {addr:#x} ({size} B) overwritten");
            // SAFETY: a live allocation of `size` bytes, align 8, from `M`.
            unsafe { M.dealloc(addr as *mut u8, lay(size)) };
        }
    }
    let runs = HANDLER_RUNS.load(Ordering::Relaxed);
    serial_println!("irq_single: {step} steps, {runs} timer handler runs");
    assert!(!HANDLER_BAD.load(Ordering::Relaxed), "the timer handler found a corrupted object");
    // The provider always gave cache index 0: nothing went through the shared, locked cache.
    assert_eq!(M.cpu_stats(MAX_CPUS).mallocs, 0, "an allocation took the shared cache");
    assert!(M.cpu_stats(0).mallocs as usize > runs, "the handler's allocations are not counted on cache 0");
}
