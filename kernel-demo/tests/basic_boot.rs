//! Test kernel: boots with the shared configuration and checks the console, the heap and the memory map.
//!
//! Each file in tests/ is one kernel: its crate attributes, then `kernel_demo::test_kernel!` for the entry
//! point and panic handler (here with a set-up function of its own). `cargo xtask test` builds them all and
//! boots each in QEMU; lines starting with `//! xtask:` set its QEMU options (see xtask/src/test.rs), e.g.:
//!
//! xtask: smp=2 mem=128M timeout=60
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::vec::Vec;
use bootloader_api::BootInfo;
use kernel_demo::memory::MemorySummary;

static mut USABLE_BYTES: u64 = 0;

/// The set-up before the cases.
fn boot(boot_info: &'static mut BootInfo) {
    kernel_demo::init();
    // SAFETY: single CPU, written once before the tests run and only read by them.
    unsafe { USABLE_BYTES = MemorySummary::of(&boot_info.memory_regions).usable_bytes };
    assert!(boot_info.physical_memory_offset.into_option().is_some());
}

kernel_demo::test_kernel!(boot);

#[test_case]
fn serial_prints() {
    kernel_demo::serial_print!("(serial) ");
}

#[test_case]
fn heap_allocates() {
    let v: Vec<u32> = (0..10_000).collect();
    assert_eq!(v.iter().map(|&x| x as u64).sum::<u64>(), 49_995_000);
}

#[test_case]
fn memory_map_has_usable_memory() {
    // SAFETY: written once in `main` before any test ran.
    let usable = unsafe { USABLE_BYTES };
    // QEMU runs with mem=128M here: most of it is usable.
    assert!(usable > 64 << 20, "only {usable} usable bytes");
}
