//! Test kernel (`harness = false`): `checks`' poisoning of freed objects (Go's `clobberfree`) catches a
//! write after free in the kernel heap. A 48-byte object is freed (its free fills it with the poison
//! pattern), written to at byte 40 while free, and handed out again by the next allocation of its class
//! (from this CPU's stock). Passes only if goheap reports "write after free at" that byte's address.
//! Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=180
#![no_std]
#![no_main]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use bootloader_api::BootInfo;
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use kernel_demo::testing::{self, MsgBuf};
use kernel_demo::{exit_qemu, serial_println, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    let mut want = MsgBuf::new();
    let _ = write!(want, "goheap: write after free at {:#x}", ADDR.load(Ordering::SeqCst) + 40);
    testing::expect_panic_containing(info, &[want.as_str()])
});

/// The object written after its free (0 until then).
static ADDR: AtomicUsize = AtomicUsize::new(0);

fn run(boot_info: &'static mut BootInfo) -> ! {
    testing::boot(boot_info);
    kernel_demo::serial_print!("clobberfree::write_after_free_reported...\t");
    let layout = Layout::from_size_align(48, 8).unwrap();
    // SAFETY: non-zero size.
    let p = unsafe { alloc(layout) };
    assert!(!p.is_null());
    // SAFETY: allocated above with `layout`.
    unsafe { dealloc(p, layout) };
    ADDR.store(p as usize, Ordering::SeqCst);
    // SAFETY: deliberately invalid: a write after free (the memory stays mapped: no fault; the poison
    // check finds it).
    unsafe { core::ptr::write_volatile(core::hint::black_box(p).add(40), 7) };
    // SAFETY: non-zero size; the stock hands the same object out again and verifies its poison.
    let q = unsafe { alloc(layout) };
    serial_println!("[failed: no report; the next allocation returned {q:p} (the freed object was {p:p})]");
    exit_qemu(ExitCode::Failed)
}
