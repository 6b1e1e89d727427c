//! Shared body of `percpu_caches.rs` and `percpu_caches_gaps.rs` (included with `#[path]`; cargo builds
//! no kernel from `tests/common/`).
//!
//! Every online CPU allocates `N` objects of one small size class and keeps them alive; each records the
//! goheap cache index it runs on and, for every object, the span that holds it (the span descriptor's
//! address from `HEAP.heap().span_of`, one per span). Then:
//! - the recorded indices are distinct, one per online CPU, and each is that CPU's dense index;
//! - `HEAP.cpu_stats(i).mallocs` grew by at least `N` for every online CPU's index `i` (each CPU
//!   allocated through its own cache, not the shared one);
//! - no span holds objects of two CPUs: each CPU's cache allocates from spans it alone holds.

use alloc::alloc::{alloc, dealloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::heap::{self, HEAP};
use kernel_demo::smp::{self, MAX_CPUS};
use kernel_demo::{percpu, serial_println, testing};

/// Objects per CPU: a few spans' worth of the 64-byte class (128 objects per 8 KiB span).
pub const N: usize = 300;
const SIZE: usize = 64;
/// Up to 4 CPUs' objects are recorded.
const CPUS: usize = 4;

static OBJECTS: [[AtomicUsize; N]; CPUS] = [const { [const { AtomicUsize::new(0) }; N] }; CPUS];
/// The cache index each CPU saw (+1; 0 = not run).
static SEEN_INDEX: [AtomicUsize; CPUS] = [const { AtomicUsize::new(0) }; CPUS];

fn layout() -> Layout {
    Layout::from_size_align(SIZE, 8).unwrap()
}

fn allocate(cpu: usize, _n: usize) {
    assert!(cpu < CPUS);
    SEEN_INDEX[cpu].store(heap::current_cpu_index().map_or(usize::MAX, |i| i + 1), Ordering::Relaxed);
    assert_eq!(percpu::this().index, cpu);
    testing::barrier();
    for slot in OBJECTS[cpu].iter() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout()) };
        assert!(!p.is_null());
        // SAFETY: a fresh 64-byte allocation.
        unsafe { p.cast::<usize>().write(cpu) };
        slot.store(p as usize, Ordering::Relaxed);
    }
}

fn free(cpu: usize, _n: usize) {
    for slot in OBJECTS[cpu].iter() {
        let p = slot.swap(0, Ordering::Relaxed) as *mut u8;
        // SAFETY: allocated by `allocate` on this CPU with `layout()`, tagged with the CPU, freed once.
        unsafe {
            assert_eq!(p.cast::<usize>().read(), cpu, "object {p:p} of CPU {cpu} overwritten");
            dealloc(p, layout());
        }
    }
}

fn span_of(p: usize) -> usize {
    HEAP.heap().span_of(p).unwrap_or_else(|| panic!("object {p:#x} is in no span")).as_ptr() as usize
}

/// The test: see the module docs.
pub fn each_cpu_allocates_through_its_own_cache() {
    let n = smp::online();
    assert_eq!(n, CPUS, "QEMU runs with 4 CPUs");
    let before: [u64; MAX_CPUS] = core::array::from_fn(|i| HEAP.cpu_stats(i).mallocs);
    let shared_before = HEAP.cpu_stats(MAX_CPUS).mallocs;
    testing::run_on_all(allocate);

    // Distinct dense indices, one per online CPU.
    let mut taken = [false; MAX_CPUS];
    for cpu in 0..n {
        let seen = SEEN_INDEX[cpu].load(Ordering::Relaxed);
        assert!(seen != 0 && seen != usize::MAX, "CPU {cpu} ran with no cache index");
        let i = seen - 1;
        assert_eq!(i, cpu, "CPU {cpu} (APIC ID {}) got cache index {i}", percpu::get(cpu).unwrap().apic_id);
        assert!(!taken[i], "cache index {i} used by two CPUs");
        taken[i] = true;
        assert!(smp::is_online(i));
    }

    // Each CPU's own cache counted its objects.
    for i in 0..n {
        let grew = HEAP.cpu_stats(i).mallocs - before[i];
        serial_println!("  cache {i} (APIC ID {}): {grew} mallocs", percpu::get(i).unwrap().apic_id);
        assert!(grew >= N as u64, "cache {i} counted {grew} mallocs, want at least {N}: its CPU allocated elsewhere");
    }
    let shared = HEAP.cpu_stats(MAX_CPUS).mallocs - shared_before;
    assert!(shared < N as u64, "the shared cache served {shared} allocations");

    // No span holds objects of two CPUs.
    let mut spans_seen = 0;
    for a in 0..n {
        for pa in OBJECTS[a].iter().map(|s| s.load(Ordering::Relaxed)) {
            let sa = span_of(pa);
            for b in a + 1..n {
                if let Some(pb) = OBJECTS[b].iter().map(|s| s.load(Ordering::Relaxed)).find(|&pb| span_of(pb) == sa) {
                    panic!("objects {pa:#x} (CPU {a}) and {pb:#x} (CPU {b}) share a span: two CPUs share a cache");
                }
            }
            spans_seen += 1;
        }
    }
    assert_eq!(spans_seen, n * N);
    testing::run_on_all(free);
}
