//! goheap's demo kernel: boots, prints a banner with the memory map, exercises the heap and exits QEMU.
//!
//! Kernel arguments (`cargo xtask run -- ARGS`): `--panic` panics, `--hang` hangs (to see the runner's
//! failure and timeout paths).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::{boxed::Box, string::String, vec::Vec};
use bootloader_api::{entry_point, BootInfo};
use core::panic::PanicInfo;
use kernel_demo::{args::Args, exit_qemu, memory::MemorySummary, serial_println, ExitCode};

entry_point!(kernel_main, config = &kernel_demo::BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    kernel_demo::init();
    let args = Args::from_boot_info(boot_info);
    let mem = MemorySummary::of(&boot_info.memory_regions);

    serial_println!();
    serial_println!("goheap demo kernel {}", env!("CARGO_PKG_VERSION"));
    serial_println!(
        "memory map: {} regions, {} usable ({} bytes = {} MiB, largest {} MiB)",
        mem.regions,
        mem.usable_regions,
        mem.usable_bytes,
        mem.usable_bytes >> 20,
        mem.largest_usable >> 20
    );
    match boot_info.physical_memory_offset.into_option() {
        Some(offset) => serial_println!("physical memory mapped at {offset:#x}"),
        None => serial_println!("physical memory not mapped"),
    }
    if args.is_empty() {
        serial_println!("kernel args: (none)");
    } else {
        serial_print_args(&args);
    }

    // Failure paths of the runner, on request: `cargo xtask run -- --panic` / `-- --hang`.
    if args.has("--panic") {
        panic!("panic requested by the --panic kernel argument");
    }
    if args.has("--hang") {
        serial_println!("hanging as requested by --hang (the runner's timeout ends this)");
        kernel_demo::hlt_loop();
    }

    // The heap (a stand-in until goheap replaces it, see src/heap.rs).
    let boxed = Box::new(41u64 + 1);
    let v: Vec<usize> = (0..1000).collect();
    let mut s = String::new();
    s.push_str("heap ok");
    assert_eq!((*boxed, v.iter().sum::<usize>(), s.as_str()), (42, 499_500, "heap ok"));
    serial_println!("{s}: box, vec and string work ({} KiB stand-in heap)", kernel_demo::heap::HEAP_SIZE >> 10);

    serial_println!("goheap demo kernel: done");
    exit_qemu(ExitCode::Success)
}

fn serial_print_args(args: &Args) {
    kernel_demo::serial_print!("kernel args:");
    for a in args.iter() {
        kernel_demo::serial_print!(" {a}");
    }
    serial_println!();
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kernel_demo::panic_and_fail(info)
}
