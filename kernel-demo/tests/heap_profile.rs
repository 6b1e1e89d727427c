//! Test kernel: goheap's heap profile in the kernel (issue 14): frame-pointer stacks name the allocating
//! function, the sampled counts match a known workload within the sampling error, frees of sampled objects
//! bring the in-use counts back to zero, and the profile printed over serial is one `cargo xtask test`
//! decodes into a pprof file (`xtask/src/test.rs` checks every kernel output that carries a profile dump).
//!
//! xtask: smp=1 firmware=uefi timeout=300

#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use kernel_demo::heap::HEAP;
use kernel_demo::profile;

static IMAGE_OFFSET: AtomicU64 = AtomicU64::new(0);

kernel_demo::test_kernel!(|boot_info| {
    IMAGE_OFFSET.store(boot_info.kernel_image_offset, Ordering::Relaxed);
    kernel_demo::testing::boot(boot_info);
});

const RATE: usize = 4096;
const OBJECTS: usize = 2000;
const SIZE: usize = 128;

/// The allocation site: `OBJECTS` boxes of `SIZE` bytes, kept.
#[inline(never)]
fn profiled_site(keep: &mut Vec<Box<[u8; SIZE]>>) {
    for i in 0..OBJECTS {
        keep.push(Box::new([i as u8; SIZE]));
    }
}

/// Sums (allocs, frees, buckets) over the buckets of size `SIZE` whose stack has a return address inside
/// `profiled_site` (its code starts at the function's address; its body is far shorter than 4 KiB).
fn site_counts() -> (u64, u64, usize) {
    let start = profiled_site as usize;
    let mut t = (0, 0, 0);
    HEAP.heap_profile(|r| {
        if r.size == SIZE && r.stack().iter().any(|&ret| ret > start && ret < start + 4096) {
            t.0 += r.allocs;
            t.1 += r.frees;
            t.2 += 1;
        }
    });
    t
}

#[test_case]
fn stacks_name_the_site_and_counts_match_the_workload() {
    let anchor = 0u8;
    profile::set_stack_top(core::hint::black_box(&anchor) as *const u8 as usize);
    HEAP.set_stack_hook(Some(profile::fp_stack));
    HEAP.set_profile_rate(RATE);
    let mut keep = Vec::with_capacity(OBJECTS);
    profiled_site(&mut keep);
    let (allocs, frees, buckets) = site_counts();
    // 2000 × 128 B at 4 KiB: 62.5 samples expected (Poisson, σ ≈ 7.9); 3.5σ either side.
    assert!(buckets >= 1, "no bucket's stack passes through profiled_site: the frame-pointer walk failed");
    assert!((35..=90).contains(&allocs), "{allocs} samples of profiled_site, expected about 62");
    assert_eq!(frees, 0);
    drop(keep);
    let (allocs_after, frees_after, _) = site_counts();
    assert_eq!(allocs_after, allocs);
    assert_eq!(frees_after, allocs, "frees of sampled objects were not all tracked");
    HEAP.set_profile_rate(0);
}

#[test_case]
fn the_profile_dump_goes_out_on_serial() {
    // Printed last: `cargo xtask test` decodes it (the marker lines and base64 are checked there).
    profile::dump(RATE, IMAGE_OFFSET.load(Ordering::Relaxed));
    assert!(site_counts().0 > 0);
}
