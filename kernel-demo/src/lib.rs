//! goheap's demo kernel, as a library shared by the demo (`src/main.rs`) and the test kernels
//! (`tests/*.rs`, each its own kernel, booted in QEMU by `cargo xtask test`).
//!
//! - [`serial`]: COM1 console, `serial_print!`/`serial_println!`.
//! - [`exit`]: ending the QEMU run with success or failure (isa-debug-exit).
//! - [`heap`]: the kernel heap: goheap as `#[global_allocator]` over [`frames`] (physical frames), an
//!   early heap before it; [`background`]: goheap's sweep/scavenge from idle loops and timer ticks.
//! - [`args`]: kernel arguments from `cargo xtask run -- ARGS`.
//! - [`memory`]: a summary of the boot memory map.
//! - CPUs: [`smp`] (BSP set-up, AP start-up, TLB shoot-down, barrier), [`percpu`] (GS-based per-CPU
//!   data, dense CPU index), [`gdt`], [`idt`], [`apic`] (local APIC, IPIs, timer), [`acpi`] (MADT),
//!   [`time`] (PIT/TSC delays).
//! - [`test_runner`] and friends: the custom test framework of the test kernels; [`testing`]: helpers of
//!   the heap test kernels (boot goheap and all CPUs, run a function on every CPU).
#![no_std]
#![feature(abi_x86_interrupt)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

extern crate alloc;

pub mod acpi;
pub mod apic;
pub mod args;
pub mod background;
pub mod exit;
pub mod frames;
pub mod gdt;
pub mod heap;
pub mod idt;
pub mod memory;
pub mod percpu;
pub mod serial;
pub mod smp;
pub mod testing;
pub mod time;

use bootloader_api::config::{BootloaderConfig, Mapping};
use core::panic::PanicInfo;

pub use exit::{exit_qemu, hlt_loop, ExitCode};

/// The bootloader configuration of every kernel here: all physical memory mapped at an offset the
/// bootloader picks (`BootInfo::physical_memory_offset`), which the heap's page source will use.
pub const BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config.kernel_stack_size = 256 * 1024;
    config
};

/// Early set-up shared by every kernel: the serial console and the heap.
pub fn init() {
    serial::init();
    heap::init();
}

/// Prints the panic on the serial console and ends the run with failure.
pub fn panic_and_fail(info: &PanicInfo) -> ! {
    serial::force_unlock();
    serial_println!("KERNEL PANIC: {info}");
    exit_qemu(ExitCode::Failed)
}

/// A test case of a test kernel: a function, printed with its name.
pub trait Testable {
    /// Runs the test, printing `name... [ok]`.
    fn run(&self);
}

impl<T: Fn()> Testable for T {
    fn run(&self) {
        serial_print!("{}...\t", core::any::type_name::<T>());
        self();
        serial_println!("[ok]");
    }
}

/// The custom test framework's runner: `#![test_runner(kernel_demo::test_runner)]`.
/// Runs every `#[test_case]`, then ends the run with success (a failing test panics first).
pub fn test_runner(tests: &[&dyn Testable]) {
    serial_println!("running {} tests", tests.len());
    for test in tests {
        test.run();
    }
    serial_println!("test result: ok. {} passed; 0 failed", tests.len());
    exit_qemu(ExitCode::Success);
}

/// The panic handler of test kernels: marks the running test failed, then [`panic_and_fail`].
pub fn test_panic_handler(info: &PanicInfo) -> ! {
    serial::force_unlock();
    serial_println!("[failed]");
    panic_and_fail(info)
}
