//! Test kernel (`harness = false`): a must-panic case. The kernel passes if the panic happens with an
//! index-out-of-bounds message: its panic handler reports success, and reaching the end reports failure.
#![no_std]
#![no_main]

use bootloader_api::BootInfo;
use kernel_demo::{exit_qemu, serial_println, testing, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| testing::expect_panic_containing(info, &["index out of bounds"]));

fn run(_boot_info: &'static mut BootInfo) -> ! {
    kernel_demo::init();
    kernel_demo::serial_print!("should_panic::index_out_of_bounds...\t");
    index_out_of_bounds();
    serial_println!("[failed: did not panic]");
    exit_qemu(ExitCode::Failed)
}

#[inline(never)]
fn index_out_of_bounds() {
    let v = [1u8, 2, 3];
    let i = core::hint::black_box(3);
    core::hint::black_box(v[i]);
}
