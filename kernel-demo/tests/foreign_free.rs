//! Test kernel (`harness = false`): a free of a pointer goheap never handed out is caught. Frees the
//! address of a static (inside the kernel image, outside every heap) with a small layout through the
//! global allocator, which passes it to goheap; passes only if goheap's report panics with the
//! foreign-pointer message naming that address ("goheap: invalid free of 0x...: not a live allocation of
//! this heap ..."). Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=60
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{dealloc, Layout};
use alloc::boxed::Box;
use bootloader_api::BootInfo;
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::testing;
use kernel_demo::{exit_qemu, serial_println, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    testing::expect_bad_free_report(info, ADDR.load(Ordering::SeqCst), "not a live allocation of this heap")
});

/// The address freed (0 until then).
static ADDR: AtomicUsize = AtomicUsize::new(0);
/// Memory goheap never saw.
static mut NOT_FROM_THE_HEAP: [u64; 4] = [1, 2, 3, 4];

fn run(boot_info: &'static mut BootInfo) -> ! {
    testing::boot(boot_info);
    kernel_demo::serial_print!("foreign_free::static_freed_into_goheap...\t");
    // The heap is in use (so the check is not just "heap empty").
    let live = Box::new([5u64; 4]);
    let p = core::ptr::addr_of_mut!(NOT_FROM_THE_HEAP).cast::<u8>();
    ADDR.store(p as usize, Ordering::SeqCst);
    // SAFETY: deliberately invalid: `p` is a static's address, never allocated; goheap's check must
    // refuse it before touching any state (and panic).
    unsafe { dealloc(core::hint::black_box(p), Layout::from_size_align(32, 8).unwrap()) };
    serial_println!("[failed: the free of {p:p} was not reported]");
    drop(live);
    exit_qemu(ExitCode::Failed)
}
