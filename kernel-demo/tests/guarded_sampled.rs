//! Test kernel (`harness = false`): sampled guarded allocations (KFENCE / GWP-ASan style,
//! `Malloc::set_guarded_sample_rate`) catch a use after free in the kernel heap. With every allocation
//! sampled (profile rate 1) and every sample guarded, a 64-byte object lands in goheap's guarded pool against
//! a guard page; after its free the kernel writes to it. Passes only if the write page-faults at that
//! object's address (the kernel's page source unmapped the slot's page at the free). Reaching the end, or
//! another panic, fails.
//!
//! xtask: smp=1 timeout=180
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use bootloader_api::BootInfo;
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::heap::HEAP;
use kernel_demo::testing::{self, MsgBuf};
use kernel_demo::{exit_qemu, serial_println, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    let mut want = MsgBuf::new();
    let _ = write!(want, "page fault at address {:#x}: write", ADDR.load(Ordering::SeqCst));
    testing::expect_panic_containing(info, &[want.as_str(), "page not present"])
});

/// The guarded object's address (0 until allocated).
static ADDR: AtomicUsize = AtomicUsize::new(0);

fn run(boot_info: &'static mut BootInfo) -> ! {
    testing::boot(boot_info);
    kernel_demo::serial_print!("guarded_sampled::use_after_free_faults...\t");
    HEAP.set_profile_rate(1);
    HEAP.set_guarded_sample_rate(1);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let before = HEAP.guarded_stats().allocs;
    // SAFETY: non-zero size.
    let p = unsafe { alloc(layout) };
    assert!(!p.is_null());
    let after = HEAP.guarded_stats();
    assert_eq!(after.allocs, before + 1, "the allocation was not guarded: {after:?}");
    // The object ends at its page's end: the next page is the guard page.
    assert_eq!((p as usize + 64) % goheap::PAGE_SIZE, 0, "{p:p} does not end at a page end");
    // SAFETY: 64 bytes of ours.
    unsafe { p.write_bytes(0xa5, 64) };
    // SAFETY: allocated above with `layout`.
    unsafe { dealloc(p, layout) };
    HEAP.set_guarded_sample_rate(0);
    ADDR.store(p as usize, Ordering::SeqCst);
    // SAFETY: deliberately invalid: a write after free; the slot's page is unmapped, so it faults.
    unsafe { core::ptr::write_volatile(core::hint::black_box(p), 1) };
    serial_println!("[failed: the write after free of {p:p} did not fault]");
    exit_qemu(ExitCode::Failed)
}
