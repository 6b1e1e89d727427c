//! Test kernel (`harness = false`): a must-panic case. The kernel passes if the panic happens: its own
//! panic handler reports success, and reaching the end reports failure.
#![no_std]
#![no_main]

use bootloader_api::{entry_point, BootInfo};
use core::panic::PanicInfo;
use kernel_demo::{exit_qemu, serial_println, ExitCode};

entry_point!(main, config = &kernel_demo::BOOTLOADER_CONFIG);

fn main(_boot_info: &'static mut BootInfo) -> ! {
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

#[panic_handler]
fn panic(_info: &PanicInfo) -> ! {
    serial_println!("[ok]");
    exit_qemu(ExitCode::Success)
}
