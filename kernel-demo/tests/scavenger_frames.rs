//! Test kernel: goheap's scavenger gives frames back to the kernel's frame allocator, on 4 CPUs.
//!
//! `release_all_returns_the_frames`: every CPU allocates about 8 MiB of mixed objects (small, medium and
//! large) and keeps them; the frame allocator's free count must fall by at least 3/4 of the 32 MiB. Then
//! every CPU frees its objects and flushes its own cache, and `release_all()` runs. Checks:
//! - `frames::free_count()` is back within 4 MiB of its value before the allocations, and every frame not
//!   back is held by the heap (committed) or is a page table of its window (64 KiB slack);
//! - no free heap page stays committed (`heap_idle == heap_released`), at most 2 MiB of empty spans stay
//!   (`heap_inuse`: the central lists keep one empty span per class, as Go's do), and
//!   `heap::committed_frames()` is at most that floor plus the metadata (span descriptors, page map,
//!   page-allocator data, from `mem_stats()`) plus 64 KiB;
//! - frames handed out but not held by goheap's window (`in_use - committed`: the page-table frames of
//!   the window) never shrink: a frame returned while still mapped would make it shrink;
//! - every object's tags survived until its free.
//!
//! `c_live_neighbours_survive_release_all`: 64 large objects of 40 KiB, every other one freed, then
//! `release_all()`: the live ones (each right after a released run) must be intact, word by word; a
//! scavenger that gives back a page still in use faults or finds them changed.
//!
//! `memory_limit_with_background_steps`: with 24 MiB freed but still committed, a memory limit of the
//! metadata plus 8 MiB is set and background steps run (as idle loops would): committed frames must come
//! down to within 5 % + 256 KiB of the limit, and stay there while 6 MiB are allocated and freed again
//! under the limit.
//!
//! xtask: smp=4 timeout=180
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::heap::{self, HEAP};
use kernel_demo::testing;
use kernel_demo::{background, frames, serial_println, smp};
use testkit::Rng;

kernel_demo::test_kernel!(cpus = 4);

const FRAME: usize = 4096;
const PER_CPU_BYTES: usize = 8 << 20;
const MAX_OBJECTS: usize = 4096;
const CPUS: usize = 4;

/// Each CPU's objects: address and size (0 = empty).
static OBJECTS: [[(AtomicUsize, AtomicUsize); MAX_OBJECTS]; CPUS] =
    [const { [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_OBJECTS] }; CPUS];

fn tag_of(p: usize) -> u64 {
    (p as u64).rotate_left(17) ^ 0xA5A5_5A5A_F00D_CAFE
}

fn allocate(cpu: usize, _n: usize) {
    let mut rng = Rng::new(7 + cpu as u64);
    let mut bytes = 0;
    for (a, s) in OBJECTS[cpu].iter() {
        if bytes >= PER_CPU_BYTES {
            break;
        }
        let size = match rng.below(10) {
            0..6 => 16 + rng.below(1024) as usize,
            6..9 => 1024 + rng.below(31 << 10) as usize,
            _ => (64 << 10) + rng.below(960 << 10) as usize,
        } & !7;
        // SAFETY: non-zero size, valid alignment.
        let p = unsafe { alloc(Layout::from_size_align_unchecked(size, 8)) };
        assert!(!p.is_null(), "CPU {cpu}: allocation of {size} B failed");
        // SAFETY: a fresh 8-aligned allocation of `size` >= 16 bytes: first and last word are inside.
        unsafe {
            p.cast::<u64>().write(tag_of(p as usize));
            p.add(size - 8).cast::<u64>().write(!tag_of(p as usize));
        }
        a.store(p as usize, Ordering::Relaxed);
        s.store(size, Ordering::Relaxed);
        bytes += size;
    }
}

fn free_and_flush(cpu: usize, _n: usize) {
    for (a, s) in OBJECTS[cpu].iter() {
        let (p, size) = (a.swap(0, Ordering::Relaxed), s.swap(0, Ordering::Relaxed));
        if p == 0 {
            continue;
        }
        let p = p as *mut u8;
        // SAFETY: allocated by `allocate` with (size, 8), tagged at both ends, freed once.
        unsafe {
            let (x, y) = (p.cast::<u64>().read(), p.add(size - 8).cast::<u64>().read());
            assert!(
                x == tag_of(p as usize) && y == !tag_of(p as usize),
                "CPU {cpu}: object {p:p} ({size} B) corrupted"
            );
            dealloc(p, Layout::from_size_align_unchecked(size, 8));
        }
    }
    HEAP.flush_cpu_cache();
}

/// Frames in use that goheap's window does not hold: the window's page tables (they only grow).
fn table_frames() -> isize {
    frames::counts().in_use as isize - heap::committed_frames() as isize
}

/// Frames goheap legitimately keeps committed with no live object: span descriptors, page map and
/// page-allocator metadata, and the pages of spans still in use (`heap_inuse`: after `release_all`, the
/// empty span per size class the central lists keep, as Go's do).
fn metadata_floor_frames() -> usize {
    let m = HEAP.mem_stats();
    (m.mspan_sys + m.other_sys + m.heap_inuse) as usize / FRAME
}

#[test_case]
fn a_release_all_returns_the_frames() {
    let free0 = frames::free_count();
    let tables0 = table_frames();
    let objects0 = HEAP.mem_stats().live_objects();
    serial_println!("  before: {free0} frames free, heap holds {}", heap::committed_frames());

    testing::run_on_all(allocate);
    let free1 = frames::free_count();
    let taken = free0 - free1;
    serial_println!("  allocated: {free1} frames free ({taken} taken), heap holds {}", heap::committed_frames());
    assert!(taken * FRAME >= CPUS * PER_CPU_BYTES * 3 / 4, "only {taken} frames taken for 32 MiB");

    testing::run_on_all(free_and_flush);
    assert_eq!(HEAP.mem_stats().live_objects(), objects0, "live objects after freeing everything");
    let released = HEAP.release_all();
    let free2 = frames::free_count();
    let committed = heap::committed_frames();
    let floor = metadata_floor_frames();
    let tables = table_frames();
    serial_println!(
        "  release_all gave back {} KiB: {free2} frames free, heap holds {committed} (metadata floor {floor}), window page tables {tables0} -> {tables}",
        released >> 10
    );
    assert!(released >= CPUS * PER_CPU_BYTES / 2, "release_all released only {released} bytes");
    let m = HEAP.mem_stats();
    assert!(m.heap_inuse <= 2 << 20, "{} KiB of in-use spans with no live object", m.heap_inuse >> 10);
    assert_eq!(m.heap_idle, m.heap_released, "free heap pages still committed after release_all");
    assert!(committed <= floor + 16, "heap holds {committed} frames, above the floor {floor} + 16");
    // Every frame not back is one the heap holds (or a page table of its window): nothing leaked.
    let held = committed as isize + (tables - tables0);
    assert!(
        free2 as isize + held + 16 >= free0 as isize,
        "free frames {free2}, {free0} before, heap holds {held}: frames lost"
    );
    assert!(free2 + 1024 >= free0, "free frames {free2}, not back within 4 MiB of {free0}: frames not returned");
    assert!(tables >= tables0, "frames in use outside the heap's committed ones shrank ({tables0} -> {tables}): a frame was returned while still mapped");
}

#[test_case]
fn b_memory_limit_with_background_steps() {
    // 24 MiB allocated on this CPU and freed: the pages stay committed (nothing scavenges yet).
    let layout = Layout::from_size_align(256 << 10, 8).unwrap();
    let mut blocks = [0usize; 96];
    for b in blocks.iter_mut() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: a fresh 256 KiB allocation.
        unsafe { p.write_bytes(0x5A, 64) };
        *b = p as usize;
    }
    for &b in &blocks {
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { dealloc(b as *mut u8, layout) };
    }
    HEAP.flush_cpu_cache();
    let high = heap::committed_frames();
    let limit = (metadata_floor_frames() * FRAME) + (8 << 20);
    let slack = limit / 20 + (256 << 10);
    serial_println!("  freed 24 MiB: heap holds {high} frames; memory limit {} KiB", limit >> 10);
    assert!(high * FRAME > limit + slack, "the setup did not leave memory above the limit");
    HEAP.set_memory_limit(limit);
    let mut steps = 0;
    while heap::committed_frames() * FRAME > limit + slack && steps < 500 {
        background::step();
        steps += 1;
    }
    let after = heap::committed_frames();
    serial_println!("  {steps} background steps: heap holds {after} frames ({} KiB)", after * 4);
    assert!(
        after * FRAME <= limit + slack,
        "after {steps} background steps the heap holds {} KiB, limit {} KiB",
        after * 4,
        limit >> 10
    );

    // Allocating under the limit keeps the heap near it.
    let mut peak = after;
    for round in 0..3 {
        let mut held = [0usize; 24];
        for b in held.iter_mut() {
            // SAFETY: non-zero size.
            let p = unsafe { alloc(layout) };
            assert!(!p.is_null(), "round {round}: allocation under the limit failed");
            *b = p as usize;
            peak = peak.max(heap::committed_frames());
        }
        for &b in &held {
            // SAFETY: allocated above with `layout`, freed once.
            unsafe { dealloc(b as *mut u8, layout) };
        }
        for _ in 0..8 {
            background::step();
        }
    }
    HEAP.set_memory_limit(usize::MAX);
    serial_println!("  6 MiB allocated and freed 3 times under the limit: peak {peak} frames ({} KiB)", peak * 4);
    assert!(peak * FRAME <= limit + slack, "heap grew to {} KiB under a {} KiB limit", peak * 4, limit >> 10);
    let _ = smp::online();
}

#[test_case]
fn c_live_neighbours_survive_release_all() {
    // Large objects of 5 heap pages, every other one freed: each freed run is followed by a live object,
    // so a scavenger that released one page too many would unmap a live page.
    let layout = Layout::from_size_align(40 << 10, 8).unwrap();
    let mut blocks = [0usize; 64];
    for (k, b) in blocks.iter_mut().enumerate() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null());
        // SAFETY: a fresh 8-aligned allocation of 40 KiB.
        let words = unsafe { core::slice::from_raw_parts_mut(p.cast::<u64>(), layout.size() / 8) };
        for (i, w) in words.iter_mut().enumerate() {
            *w = tag_of(p as usize) ^ (k * 7919 + i) as u64;
        }
        *b = p as usize;
    }
    for &b in blocks.iter().step_by(2) {
        // SAFETY: allocated above with `layout`, freed once (odd ones stay).
        unsafe { dealloc(b as *mut u8, layout) };
    }
    HEAP.flush_cpu_cache();
    let tables0 = table_frames();
    let released = HEAP.release_all();
    let m = HEAP.mem_stats();
    serial_println!(
        "  release_all with live neighbours gave back {} KiB; heap_idle {} KiB, released {} KiB",
        released >> 10,
        m.heap_idle >> 10,
        m.heap_released >> 10
    );
    assert!(released >= 32 * layout.size(), "only {released} bytes released of 32 freed blocks");
    for (k, &b) in blocks.iter().enumerate().skip(1).step_by(2) {
        // SAFETY: a live 40 KiB block filled above.
        let words = unsafe { core::slice::from_raw_parts(b as *const u64, layout.size() / 8) };
        for (i, &w) in words.iter().enumerate() {
            assert_eq!(w, tag_of(b) ^ (k * 7919 + i) as u64, "block {k} at {b:#x}: word {i} changed after release_all");
        }
        // SAFETY: allocated above with `layout`, freed once.
        unsafe { dealloc(b as *mut u8, layout) };
    }
    assert!(table_frames() >= tables0, "frames in use outside the heap's committed ones shrank");
}
