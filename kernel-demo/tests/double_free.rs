//! Test kernel (`harness = false`): a double free is caught. Frees a 48-byte object twice through the
//! global allocator (goheap, with kernel-demo's `checks` feature); passes only if goheap's report panics
//! and the message is the double-free report naming that object's address
//! ("goheap: invalid free of 0x...: double free ..."). Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=60
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use bootloader_api::BootInfo;
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::testing;
use kernel_demo::{exit_qemu, serial_println, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    testing::expect_bad_free_report(info, ADDR.load(Ordering::SeqCst), "double free")
});

/// The address freed twice (0 until then).
static ADDR: AtomicUsize = AtomicUsize::new(0);

fn run(boot_info: &'static mut BootInfo) -> ! {
    testing::boot(boot_info);
    kernel_demo::serial_print!("double_free::small_object_freed_twice...\t");
    let layout = Layout::from_size_align(48, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc(layout) };
    assert!(!p.is_null());
    // A neighbour stays live, so the object's span stays in use after the first free.
    // SAFETY: non-zero size.
    let keep = unsafe { alloc(layout) };
    assert!(!keep.is_null());
    ADDR.store(p as usize, Ordering::SeqCst);
    // SAFETY: the first free is valid: `p` came from `alloc(layout)`.
    unsafe { dealloc(p, layout) };
    // SAFETY: deliberately invalid: the second free of `p`; goheap's check must refuse it before touching
    // any state (and panic).
    unsafe { dealloc(core::hint::black_box(p), layout) };
    serial_println!("[failed: the double free of {p:p} was not reported]");
    exit_qemu(ExitCode::Failed)
}
