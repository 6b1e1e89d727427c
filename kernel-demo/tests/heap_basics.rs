//! Test kernel: goheap as the kernel heap, the basics, on one CPU under UEFI and BIOS.
//!
//! Checks: `Box`, `Vec` growth, `String`, `BTreeMap` through the global allocator; large allocations
//! (40 KiB past the small classes, 1 MiB, 4 MiB) written and read back whole; every power-of-two
//! alignment from 8 B to 2 MiB through `alloc::alloc::alloc` with a `Layout` (address aligned, block written
//! and read back whole); `alloc_zeroed` returns zeroes even where a dirtied block was just freed; `realloc`
//! keeps the contents while growing and shrinking across small classes and large objects; and that these
//! allocations really came from goheap (its statistics count them).
//!
//! xtask: smp=1 firmware=both timeout=300
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, alloc_zeroed, dealloc, realloc, Layout};
use alloc::boxed::Box;
use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::vec::Vec;
use kernel_demo::heap::{self, HEAP};

kernel_demo::test_kernel!();

/// Fills `len` bytes at `p` with testkit's pattern for `seed` (word-sized stores keep the run short under TCG).
///
/// # Safety
/// `p` is valid for `len` bytes of writes that nothing else uses meanwhile.
unsafe fn fill(p: *mut u8, len: usize, seed: usize) {
    // SAFETY: the caller's contract.
    unsafe { testkit::pattern::fill(p, len, seed as u64) }
}

/// Checks the first `len` bytes at `p` hold [`fill`]'s pattern for `seed`; a change fails the kernel.
///
/// # Safety
/// `p` is valid for `len` bytes of reads.
unsafe fn check(p: *const u8, len: usize, seed: usize, what: &str) {
    // SAFETY: the caller's contract.
    if let Err(off) = unsafe { testkit::pattern::check(p, len, seed as u64) } {
        panic!("{what}: byte {off} of {len} B at {p:p} changed");
    }
}

#[test_case]
fn allocations_go_to_goheap() {
    let before = HEAP.mem_stats().mallocs;
    let b = Box::new([7u64; 4]);
    assert!(heap::goheap_ready());
    assert_eq!(HEAP.mem_stats().mallocs, before + 1, "the Box did not come from goheap");
    let a = &*b as *const _ as usize;
    assert!(
        (heap::HEAP_WINDOW_START..heap::HEAP_WINDOW_START + heap::HEAP_WINDOW_BYTES).contains(&(a as u64)),
        "Box at {a:#x} is outside goheap's window"
    );
}

#[test_case]
fn boxes() {
    let a = Box::new(41u64);
    let b = Box::new([0xABu8; 100]);
    let c = Box::new((1u32, 2u16, 3u8));
    assert_eq!(*a + 1, 42);
    assert!(b.iter().all(|&x| x == 0xAB));
    assert_eq!(*c, (1, 2, 3));
    let (pa, pb) = (&*a as *const u64 as usize, &*b as *const [u8; 100] as usize);
    assert!(pa + 8 <= pb || pb + 100 <= pa, "two live boxes overlap");
    let boxes: Vec<Box<usize>> = (0..2000).map(Box::new).collect();
    assert!(boxes.iter().enumerate().all(|(i, b)| **b == i));
}

#[test_case]
fn vec_growth() {
    let mut v: Vec<u64> = Vec::new();
    let mut moves = 0;
    let mut last = v.as_ptr();
    for i in 0..200_000u64 {
        v.push(i * 3);
        if v.as_ptr() != last {
            moves += 1;
            last = v.as_ptr();
        }
    }
    assert!(moves >= 10, "only {moves} reallocations for 200000 pushes");
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3), "contents lost while growing");
    v.truncate(10);
    v.shrink_to_fit();
    assert_eq!(v, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]);
}

#[test_case]
fn strings() {
    let mut s = String::new();
    for i in 0..3000 {
        s.push_str(&alloc::format!("{i},"));
    }
    assert!(s.starts_with("0,1,2,3,"));
    assert!(s.ends_with("2998,2999,"));
    assert_eq!(s.split(',').filter(|x| !x.is_empty()).count(), 3000);
}

#[test_case]
fn btreemap() {
    let mut m = BTreeMap::new();
    for i in 0..2000u32 {
        m.insert(i.wrapping_mul(2_654_435_761), alloc::format!("v{i}"));
    }
    for i in (0..2000u32).step_by(2) {
        assert_eq!(m.remove(&i.wrapping_mul(2_654_435_761)), Some(alloc::format!("v{i}")));
    }
    assert_eq!(m.len(), 1000);
    for i in (1..2000u32).step_by(2) {
        assert_eq!(m[&i.wrapping_mul(2_654_435_761)], alloc::format!("v{i}"));
    }
}

#[test_case]
fn large_allocations() {
    let large_before = HEAP.mem_stats().large_allocs;
    for (k, &size) in [40 << 10, (32 << 10) + 1, 1 << 20, 4 << 20].iter().enumerate() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: non-zero size.
        let p = unsafe { alloc(layout) };
        assert!(!p.is_null(), "{size} B allocation failed");
        // SAFETY: `p` is a fresh allocation of `size` bytes, freed once below.
        unsafe {
            fill(p, size, k);
            check(p, size, k, "large block");
            dealloc(p, layout);
        }
    }
    assert!(HEAP.mem_stats().large_allocs >= large_before + 4, "blocks over 32 KiB should be large objects");
    // Two live large objects do not overlap.
    let a: Vec<u64> = alloc::vec![1; 1 << 17];
    let b: Vec<u64> = alloc::vec![2; 1 << 17];
    let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
    assert!(pa + (1 << 20) <= pb || pb + (1 << 20) <= pa, "two live large objects overlap");
    assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
}

#[test_case]
fn every_alignment_from_8_bytes_to_2_mib() {
    let mut align = 8;
    while align <= 2 << 20 {
        // An object of exactly the alignment, a small one, and (up to 256 KiB, to keep the run short) one
        // spanning more than one alignment unit.
        let sizes = [align, 24, align + align / 2 + 8];
        for &size in &sizes[..if align <= 256 << 10 { 3 } else { 2 }] {
            let layout = Layout::from_size_align(size, align).unwrap();
            // SAFETY: non-zero size.
            let p = unsafe { alloc(layout) };
            assert!(!p.is_null(), "alloc(size {size}, align {align}) failed");
            assert_eq!(p as usize % align, 0, "alloc(size {size}, align {align}) returned {p:p}");
            // SAFETY: `p` is a fresh allocation of `size` bytes, freed once below.
            unsafe {
                fill(p, size, align);
                check(p, size, align, "aligned block");
                dealloc(p, layout);
            }
        }
        align *= 2;
    }
}

#[test_case]
fn alloc_zeroed_is_zero() {
    for &size in &[8usize, 48, 1000, 4096, 20 << 10, 100 << 10, 2 << 20] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        // Dirty a block of this size and free it, so the zeroed one below likely reuses dirty memory.
        // SAFETY: non-zero size; the block is written whole and freed once.
        unsafe {
            let d = alloc(layout);
            assert!(!d.is_null());
            d.write_bytes(0xFF, size);
            dealloc(d, layout);
        }
        // SAFETY: non-zero size.
        let p = unsafe { alloc_zeroed(layout) };
        assert!(!p.is_null(), "alloc_zeroed({size}) failed");
        // SAFETY: `p` is 8-aligned and valid for `size` bytes (all sizes here are multiples of 8).
        let words = unsafe { core::slice::from_raw_parts(p.cast::<u64>(), size / 8) };
        if let Some(i) = words.iter().position(|&w| w != 0) {
            panic!("alloc_zeroed({size}) at {p:p}: word {i} is {:#x}", words[i]);
        }
        // SAFETY: allocated above with `layout`.
        unsafe { dealloc(p, layout) };
    }
}

#[test_case]
fn realloc_keeps_contents() {
    // Growing from a small class through larger ones into large objects, then shrinking back.
    let sizes = [16usize, 100, 1024, 8000, 30 << 10, 200 << 10, 1 << 20, 50 << 10, 3000, 40, 8];
    let mut layout = Layout::from_size_align(sizes[0], 8).unwrap();
    // SAFETY: non-zero size.
    let mut p = unsafe { alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: fresh allocation of `sizes[0]` bytes.
    unsafe { fill(p, sizes[0], 99) };
    for &new in &sizes[1..] {
        let keep = layout.size().min(new);
        // SAFETY: `p` was allocated with `layout`; `new` is non-zero and a valid size with align 8.
        let q = unsafe { realloc(p, layout, new) };
        assert!(!q.is_null(), "realloc {} -> {new} failed", layout.size());
        // SAFETY: `q` holds at least `keep` bytes copied from the old block.
        unsafe { check(q, keep, 99, "realloc") };
        layout = Layout::from_size_align(new, 8).unwrap();
        // SAFETY: `q` is valid for `new` bytes; refill so the next step checks all of it.
        unsafe { fill(q, new, 99) };
        p = q;
    }
    // SAFETY: allocated (last) with `layout`.
    unsafe { dealloc(p, layout) };
}
