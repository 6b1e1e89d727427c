//! goheap's demo kernel: boots, makes goheap the kernel heap, runs the demo on every CPU, prints the
//! report and exits QEMU (see `demo.rs` for the phases and `heap.rs` for the heap wiring).
//!
//! Boot path: serial console and early heap (`kernel_demo::init`) → goheap over the frame allocator
//! (`heap::init_goheap`) → the BSP's CPU set-up (`smp::init_bsp`: IDT, GDT/TSS, LAPIC, per-CPU data) →
//! the APs (`smp::start_aps`) → the demo on all CPUs (`demo.rs`) → exit.
//!
//! Kernel arguments (`cargo xtask run -- ARGS`):
//! - `--oom`: exhausts the heap under a frame budget, shows it recovers, then shows the allocation-error
//!   path. Exit status: 0 when the alloc error handler was reached by the deliberate failing allocation
//!   (the expected end of the run), 1 on anything else (a panic, an unexpected allocation failure, or the
//!   deliberate allocation succeeding).
//! - `--bench`: instead of the demo, the kernel benchmark (`kbench.rs`; run by `cargo xtask bench
//!   --kernel`): goheap against linked_list_allocator and talc heaps of the same size on every CPU,
//!   machine-readable `KBENCH` lines on serial. Options `--bench-reps=N`, `--bench-quick`.
//! - `--profile`: goheap's heap profile of a known workload, printed over serial between markers (see
//!   `kernel_demo::profile`); `cargo xtask profile` boots it and writes the pprof file. `--profile-rate=N`
//!   sets the sampling rate (default 16 KiB).
//! - `--panic` panics, `--hang` hangs (to see the runner's failure and timeout paths).
#![no_std]
#![no_main]
#![feature(alloc_error_handler)]

extern crate alloc;

mod demo;
mod kbench;

use bootloader_api::{entry_point, BootInfo};
use core::alloc::Layout;
use core::panic::PanicInfo;
use core::sync::atomic::Ordering;
use kernel_demo::percpu::{self, PerCpu};
use kernel_demo::{
    args::Args, background, exit_qemu, frames, heap, memory::MemorySummary, serial_println, smp, ExitCode,
};

entry_point!(kernel_main, config = &kernel_demo::BOOTLOADER_CONFIG);

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    // Serial console, and the early heap for anything allocated before goheap is wired.
    kernel_demo::init();
    background::init_logger();
    let boot_info: &'static BootInfo = boot_info;
    let args = Args::from_boot_info(boot_info);
    let mem = MemorySummary::of(&boot_info.memory_regions);

    serial_println!();
    serial_println!("goheap demo kernel {}", env!("CARGO_PKG_VERSION"));
    serial_println!(
        "memory map: {} regions, {} usable ({} MiB, largest {} MiB)",
        mem.regions,
        mem.usable_regions,
        mem.usable_bytes >> 20,
        mem.largest_usable >> 20
    );
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

    // goheap becomes the kernel heap.
    heap::init_goheap(boot_info);
    let c = frames::counts();
    serial_println!(
        "heap: goheap over frames; window {:#x} + {} MiB (arena up to {} MiB); {} frames ({} MiB) usable above 1 MiB; early heap used {} of {} KiB",
        heap::HEAP_WINDOW_START,
        heap::HEAP_WINDOW_BYTES >> 20,
        heap::HEAP_MAX_BYTES >> 20,
        c.total,
        c.total >> 8,
        heap::early_used() >> 10,
        heap::EARLY_HEAP_SIZE >> 10
    );

    // The CPUs: the BSP's per-CPU data (from here on goheap uses per-CPU caches), then the APs, each
    // entering `ap_main`. Background work: every LAPIC timer tick marks it due; idle loops run it.
    let madt = smp::init_bsp(boot_info).unwrap_or_else(|e| panic!("smp::init_bsp: {e:?}"));
    background::install_tick();
    serial_println!("cpus: {} enabled in the MADT; BSP APIC ID {}", madt.enabled_count(), percpu::this().apic_id);

    if args.has("--oom") {
        demo::run_oom();
    }

    if args.has("--profile") {
        run_profile(&args, boot_info.kernel_image_offset);
    }

    if args.has("--bench") {
        let ncpus = smp::start_aps(bench_ap_main);
        serial_println!("cpus: {} online ({} failed to start)", ncpus, smp::ap_failures());
        kbench::run_bsp(ncpus, &args);
    }

    let ncpus = smp::start_aps(ap_main);
    serial_println!("cpus: {} online ({} failed to start)", ncpus, smp::ap_failures());

    let ok = demo::run_bsp(ncpus);
    if ok {
        serial_println!("goheap demo kernel: done");
        exit_qemu(ExitCode::Success)
    } else {
        serial_println!("goheap demo kernel: FAILED (see above)");
        exit_qemu(ExitCode::Failed)
    }
}

/// `--profile`: goheap's heap profile of a known workload (`kernel_demo::profile::workload`) on the BSP,
/// sampled at `--profile-rate=N` bytes (default 16 KiB) with frame-pointer stacks, printed over serial for
/// `cargo xtask profile` (see `kernel_demo::profile`). Exits with success after the dump.
#[inline(never)]
fn run_profile(args: &Args, image_offset: u64) -> ! {
    use kernel_demo::profile;
    let rate =
        args.iter().find_map(|a| a.strip_prefix("--profile-rate=")).and_then(|v| v.parse().ok()).unwrap_or(16 << 10);
    // Stacks end at this frame: the walk reads no further up the boot stack.
    let anchor = 0u8;
    profile::set_stack_top(core::hint::black_box(&anchor) as *const u8 as usize);
    heap::HEAP.set_stack_hook(Some(profile::fp_stack));
    heap::HEAP.set_profile_rate(rate);
    serial_println!("profile: workload on the BSP, sampling every {rate} bytes on average");
    let keep = profile::workload();
    heap::HEAP.set_profile_rate(0);
    profile::dump(rate, image_offset);
    drop(keep);
    serial_println!("goheap demo kernel: profile done");
    exit_qemu(ExitCode::Success)
}

/// Where each AP starts once the CPU bring-up set it up (interrupts off): the demo, then the idle loop.
fn ap_main(_cpu: &'static PerCpu) -> ! {
    demo::run_ap()
}

/// Where each AP starts in a `--bench` boot: the bench's schedule, then the idle loop.
fn bench_ap_main(_cpu: &'static PerCpu) -> ! {
    kbench::run_ap()
}

fn serial_print_args(args: &Args) {
    kernel_demo::serial_print!("kernel args:");
    for a in args.iter() {
        kernel_demo::serial_print!(" {a}");
    }
    serial_println!();
}

/// Where an infallible allocation that failed ends up (`handle_alloc_error`): a clear message with the
/// heap's state, then the exit described in the module docs. Allocates nothing.
#[alloc_error_handler]
fn alloc_error(layout: Layout) -> ! {
    kernel_demo::serial::force_unlock();
    let m = heap::HEAP.mem_stats();
    let f = frames::counts();
    serial_println!(
        "OUT OF MEMORY: allocation of {} bytes (align {}) failed; heap: {} KiB in use, {} KiB of arena grown, {} frames mapped, {} live objects; frame allocator: {} free, {} in use",
        layout.size(),
        layout.align(),
        m.heap_alloc >> 10,
        m.heap_sys >> 10,
        heap::committed_frames(),
        m.heap_objects,
        f.free,
        f.in_use
    );
    if demo::EXPECT_OOM.load(Ordering::SeqCst) {
        serial_println!("oom: the allocation-error path was reached as expected; exiting with success");
        exit_qemu(ExitCode::Success)
    }
    exit_qemu(ExitCode::Failed)
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kernel_demo::panic_and_fail(info)
}
