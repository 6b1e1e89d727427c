//! Test kernel: memory is reused, not leaked. On one CPU, 64 rounds each allocate about 8 MiB of mixed
//! sizes (mostly small objects, some medium, a few large), tag and check every object, keep an eighth alive
//! into the next round and free the rest in random order: 512 MiB allocated in all, twice QEMU's memory.
//!
//! Checks: after every round from the third on, the frames goheap holds (`heap::committed_frames()`) and
//! the frames in use (`frames::counts().in_use`) stay within 1.5 x + 2 MiB of their peak over the first
//! two rounds; every object keeps its tags; the heap's live-object count returns to its start value.
//! A free that never reuses memory fails the bound within a few rounds (about 2 MiB of small objects
//! would leak per round).
//!
//! xtask: smp=1 timeout=120
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use alloc::vec::Vec;
use kernel_demo::heap::{self, HEAP};
use kernel_demo::{frames, serial_println};
use testkit::Rng;

kernel_demo::test_kernel!();

const ROUNDS: usize = 64;
const ROUND_BYTES: usize = 8 << 20;

/// A size from the mix: 60 % 8..512 B, 30 % 512 B..8 KiB, 8 % 8..32 KiB, 2 % 32 KiB..1 MiB (large).
fn mixed_size(rng: &mut Rng) -> usize {
    let r = rng.below(100);
    let (lo, hi) = match r {
        0..60 => (8, 512),
        60..90 => (512, 8 << 10),
        90..98 => (8 << 10, 32 << 10),
        _ => (32 << 10, 1 << 20),
    };
    (lo + rng.below((hi - lo) as u64) as usize) & !7
}

/// Writes the tag at both ends of an object of `size` (>= 16) bytes.
///
/// # Safety
/// `p` is an 8-aligned live allocation of `size` bytes.
unsafe fn tag(p: *mut u8, size: usize, t: u64) {
    // SAFETY: both words lie inside the object and are distinct (size >= 16, 8-aligned, size a multiple of 8).
    unsafe {
        p.cast::<u64>().write(t);
        p.add(size - 8).cast::<u64>().write(!t);
    }
}

/// Checks [`tag`]'s words, then frees the object.
///
/// # Safety
/// As [`tag`], and the object was allocated with `Layout(size, 8)` and is not used afterwards.
unsafe fn check_and_free(p: *mut u8, size: usize, t: u64) {
    // SAFETY: as in `tag`.
    let (a, b) = unsafe { (p.cast::<u64>().read(), p.add(size - 8).cast::<u64>().read()) };
    assert!(a == t && b == !t, "object {p:p} ({size} B) lost its tags: {a:#x} {b:#x}, want {t:#x}");
    // SAFETY: allocated with this layout, freed once.
    unsafe { dealloc(p, Layout::from_size_align_unchecked(size, 8)) };
}

#[test_case]
fn many_times_the_heap_is_reused() {
    let objects_before = HEAP.mem_stats().live_objects();
    let alloc_before = HEAP.mem_stats().total_alloc;
    let mut rng = Rng::new(42);
    // (address, size, tag); bookkeeping allocated once, up front.
    let mut live: Vec<(usize, usize, u64)> = Vec::with_capacity(8192);
    let mut carried: Vec<(usize, usize, u64)> = Vec::with_capacity(8192);
    let (mut peak_committed, mut peak_in_use) = (0usize, 0usize);
    let mut bound = (usize::MAX, usize::MAX);
    let mut seq = 0u64;
    for round in 0..ROUNDS {
        let mut bytes = 0;
        while bytes < ROUND_BYTES && live.len() < live.capacity() {
            let size = mixed_size(&mut rng).max(16);
            // SAFETY: non-zero size, valid alignment.
            let p = unsafe { alloc(Layout::from_size_align_unchecked(size, 8)) };
            assert!(!p.is_null(), "round {round}: allocation of {size} B failed after {bytes} B this round");
            seq += 1;
            // SAFETY: fresh allocation of `size` bytes, 8-aligned.
            unsafe { tag(p, size, seq) };
            live.push((p as usize, size, seq));
            bytes += size;
        }
        // Free last round's survivors, then all but an eighth of this round's, in random order.
        for &(p, size, t) in &carried {
            // SAFETY: allocated with (size, 8) in the previous round, tagged, freed once.
            unsafe { check_and_free(p as *mut u8, size, t) };
        }
        carried.clear();
        while !live.is_empty() {
            let i = rng.below(live.len() as u64) as usize;
            let (p, size, t) = live.swap_remove(i);
            if live.len() % 8 == 0 {
                carried.push((p, size, t));
            } else {
                // SAFETY: allocated with (size, 8) this round, tagged, freed once.
                unsafe { check_and_free(p as *mut u8, size, t) };
            }
        }
        let committed = heap::committed_frames();
        let in_use = frames::counts().in_use;
        if round < 2 {
            peak_committed = peak_committed.max(committed);
            peak_in_use = peak_in_use.max(in_use);
            if round == 1 {
                bound = (peak_committed * 3 / 2 + 512, peak_in_use * 3 / 2 + 512);
                serial_println!(
                    "  after 2 rounds: heap holds {peak_committed} frames, {peak_in_use} in use; bounds {} / {} frames",
                    bound.0,
                    bound.1
                );
            }
        } else {
            assert!(
                committed <= bound.0,
                "round {round}: goheap holds {committed} frames, over the bound {} (memory not reused)",
                bound.0
            );
            assert!(in_use <= bound.1, "round {round}: {in_use} frames in use, over the bound {}", bound.1);
        }
        if round % 16 == 15 {
            serial_println!("  round {}: heap holds {committed} frames, {in_use} in use", round + 1);
        }
    }
    for &(p, size, t) in &carried {
        // SAFETY: allocated with (size, 8) in the last round, tagged, freed once.
        unsafe { check_and_free(p as *mut u8, size, t) };
    }
    drop(carried);
    drop(live);
    let m = HEAP.mem_stats();
    let total = (m.total_alloc - alloc_before) >> 20;
    serial_println!("  {total} MiB allocated in {ROUNDS} rounds, {seq} objects");
    assert!(total >= (ROUNDS * ROUND_BYTES) as u64 >> 20, "only {total} MiB allocated");
    assert_eq!(m.live_objects(), objects_before, "live objects after freeing everything");
}
