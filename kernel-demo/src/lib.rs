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
//! - [`test_runner`] and friends: the custom test framework of the test kernels, [`test_kernel!`] their
//!   entry point and panic handler; [`testing`]: helpers of the test kernels (boot goheap and all CPUs, run
//!   a function on every CPU, judge a must-panic kernel's panic).
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
pub mod irqlat;
pub mod memory;
pub mod percpu;
pub mod profile;
pub mod serial;
pub mod smp;
pub mod testing;
pub mod time;

use bootloader_api::config::{BootloaderConfig, Mapping};
use core::panic::PanicInfo;

pub use exit::{exit_qemu, hlt_loop, ExitCode};

/// The boot protocol crate, for [`test_kernel!`]'s expansion in the test kernels.
#[doc(hidden)]
pub use bootloader_api as __bootloader_api;

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

/// A test kernel's entry point and panic handler: every `tests/*.rs` kernel calls this once at its root
/// and keeps only what a macro cannot emit, its crate attributes (`#![no_std]`, `#![no_main]` and, for the
/// custom test framework, `#![feature(custom_test_frameworks)]`, `#![test_runner(kernel_demo::test_runner)]`,
/// `#![reexport_test_harness_main = "test_main"]`).
///
/// - `test_kernel!();`: a custom-test-framework kernel that boots with [`testing::boot`] (goheap as the
///   kernel heap, every CPU online), then runs its `#[test_case]`s; a panic fails the running case.
/// - `test_kernel!(cpus = N);`: the same, and the boot asserts that `N` CPUs came online (QEMU's `-smp`).
/// - `test_kernel!(boot);`: the same with its own set-up, `boot: fn(&'static mut BootInfo)` (a path or
///   a closure that captures nothing), run before the cases.
/// - `test_kernel!(must_panic: run, on_panic: judge);`: a `harness = false` kernel that must panic:
///   `run: fn(&'static mut BootInfo) -> !` prints its case name, does what must panic and, when it did
///   not, exits with failure; the panic handler calls `judge: fn(&PanicInfo) -> !`, which decides (see
///   [`testing::expect_panic_containing`]).
#[macro_export]
macro_rules! test_kernel {
    () => {
        $crate::test_kernel!(|boot_info| {
            $crate::testing::boot(boot_info);
        });
    };
    (cpus = $n:expr) => {
        $crate::test_kernel!(|boot_info| {
            let online = $crate::testing::boot(boot_info);
            assert_eq!(online, $n, "QEMU runs with -smp {}", $n);
        });
    };
    (must_panic: $run:path, on_panic: $judge:expr $(,)?) => {
        $crate::__bootloader_api::entry_point!($run, config = &$crate::BOOTLOADER_CONFIG);

        #[panic_handler]
        fn __test_kernel_panic(info: &core::panic::PanicInfo) -> ! {
            let judge: fn(&core::panic::PanicInfo) -> ! = $judge;
            judge(info)
        }
    };
    ($boot:expr $(,)?) => {
        $crate::__bootloader_api::entry_point!(__test_kernel_main, config = &$crate::BOOTLOADER_CONFIG);

        fn __test_kernel_main(boot_info: &'static mut $crate::__bootloader_api::BootInfo) -> ! {
            let boot: fn(&'static mut $crate::__bootloader_api::BootInfo) = $boot;
            boot(boot_info);
            test_main();
            $crate::hlt_loop()
        }

        #[panic_handler]
        fn __test_kernel_panic(info: &core::panic::PanicInfo) -> ! {
            $crate::test_panic_handler(info)
        }
    };
}
