//! Test kernel: out of memory is an error value, not a panic or a hang, and the heap recovers.
//!
//! Under a frame budget of 32 MiB above current use (`frames::set_limit`), on one CPU:
//! - 1 MiB blocks through `Vec::try_reserve_exact` until it returns `Err`, then 2 KiB objects through the
//!   raw `GlobalAlloc::alloc` until it returns null; a 64 MiB `try_reserve` also returns `Err`. The heap
//!   must have handed out between half of the budget and the budget (it did run dry, and not beyond);
//! - every object is intact, everything is freed, caches flushed and `release_all()` run: the frames come
//!   back (free count within 512 KiB of before), the live-object count returns to its start value;
//! - under the same budget, a 16 MiB vector and 1000 strings can be allocated again and are intact.
//!
//! xtask: smp=1 timeout=120
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use alloc::string::String;
use alloc::vec::Vec;
use kernel_demo::heap::{self, HEAP};
use kernel_demo::{frames, serial_println, testing};

kernel_demo::test_kernel!();

const BUDGET: usize = 32 << 20;

#[test_case]
fn fallible_allocations_fail_and_the_heap_recovers() {
    let objects0 = HEAP.mem_stats().live_objects();
    let small = Layout::from_size_align(2048, 8).unwrap();
    // Bookkeeping first, so it is not what fails.
    let mut blocks: Vec<Vec<u8>> = Vec::with_capacity(256);
    let mut smalls: Vec<usize> = Vec::with_capacity(BUDGET / small.size() + 1024);
    let free0 = frames::free_count();
    frames::set_limit(frames::counts().in_use + BUDGET / 4096);

    assert!(testing::reserve_mib_blocks(&mut blocks), "try_reserve_exact never failed under a 32 MiB budget");
    while smalls.len() < smalls.capacity() {
        // SAFETY: non-zero size.
        let p = unsafe { alloc(small) };
        if p.is_null() {
            break;
        }
        // SAFETY: a fresh 2 KiB allocation.
        unsafe { p.write_bytes(0xA5, small.size()) };
        smalls.push(p as usize);
    }
    assert!(smalls.len() < smalls.capacity(), "alloc never returned null under a 32 MiB budget");
    let mut big: Vec<u8> = Vec::new();
    assert!(big.try_reserve(64 << 20).is_err(), "a 64 MiB try_reserve succeeded under a 32 MiB budget");
    let got = blocks.len() * (1 << 20) + smalls.len() * small.size();
    let m = HEAP.mem_stats();
    serial_println!(
        "  ran dry after {} KiB: {} blocks of 1 MiB, {} objects of 2 KiB; heap_alloc {} KiB; {} frames free",
        got >> 10,
        blocks.len(),
        smalls.len(),
        m.heap_alloc >> 10,
        frames::free_count()
    );
    assert!(got >= BUDGET / 2, "only {got} bytes before running dry under a {BUDGET} byte budget");
    assert!(got <= BUDGET, "{got} bytes handed out under a {BUDGET} byte budget");
    assert!(m.heap_alloc as usize <= BUDGET + (1 << 20), "heap_alloc {} over the budget", m.heap_alloc);

    // Everything intact, then freed and given back.
    for (i, b) in blocks.iter().enumerate() {
        assert!(b.capacity() >= 1 << 20 && b[..] == [i as u8], "block {i} corrupted");
    }
    drop(blocks);
    for &p in &smalls {
        let p = p as *mut u8;
        // SAFETY: allocated above with `small`, filled with 0xA5, freed once.
        unsafe {
            assert!(*p == 0xA5 && *p.add(small.size() - 1) == 0xA5, "object {p:p} corrupted");
            dealloc(p, small);
        }
    }
    drop(smalls);
    drop(big);
    HEAP.flush_cpu_cache();
    let released = HEAP.release_all();
    let m = HEAP.mem_stats();
    serial_println!(
        "  freed: release_all gave back {} KiB; {} frames free (before: {free0}); heap holds {} frames; live objects {}",
        released >> 10,
        frames::free_count(),
        heap::committed_frames(),
        m.live_objects()
    );
    assert_eq!(m.live_objects(), objects0, "live objects after freeing everything");
    assert_eq!(m.heap_objects, m.mallocs - m.frees);
    assert!(frames::free_count() + 128 >= free0, "frames not given back");

    // The heap works again, under the same budget.
    let mut v: Vec<u64> = alloc::vec![7; 2 << 20];
    v[12345] = 8;
    assert_eq!(v.iter().sum::<u64>(), 7 * (2 << 20) + 1);
    drop(v);
    let strings: Vec<String> = (0..1000).map(|i| alloc::format!("string {i}")).collect();
    assert!(strings.iter().enumerate().all(|(i, s)| *s == alloc::format!("string {i}")));
    drop(strings);
    assert_eq!(HEAP.mem_stats().live_objects(), objects0);
    frames::set_limit(usize::MAX);
}
