//! Test kernel (`harness = false`): the page-fault handler. Writes to an unmapped address after
//! `smp::init_bsp` loaded the IDT; passes if the panic message names the faulting address (from CR2) and
//! the access ("write", kernel mode, page not present). Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=60
#![no_std]
#![no_main]

use bootloader_api::BootInfo;
use kernel_demo::{exit_qemu, serial_println, smp, testing, ExitCode};

kernel_demo::test_kernel!(must_panic: run, on_panic: |info| {
    testing::expect_panic_containing(
        info,
        &["page fault at address 0xdeadb000", "write", "kernel mode", "page not present"],
    )
});

const BAD_ADDR: u64 = 0xdead_b000;

fn run(boot_info: &'static mut BootInfo) -> ! {
    kernel_demo::init();
    smp::init_bsp(boot_info).expect("smp::init_bsp");
    kernel_demo::serial_print!("page_fault::write_to_unmapped_page...\t");
    // SAFETY: deliberately faulting: the address is not mapped, and the page-fault handler panics.
    unsafe { core::ptr::write_volatile(BAD_ADDR as *mut u64, 1) };
    serial_println!("[failed: no page fault]");
    exit_qemu(ExitCode::Failed)
}
