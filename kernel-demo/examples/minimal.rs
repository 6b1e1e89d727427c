//! A minimal kernel with goheap as its heap: copy this file to start your own.
//!
//! Booted by `bootloader` 0.11.15 (UEFI or BIOS), on one CPU: serial output on COM1, an IDT with a page-fault
//! handler and a PIT timer interrupt (through the legacy 8259 PIC) whose handler allocates and frees, goheap
//! set up in a dozen lines (`KernelHeap`), a few collections, then QEMU's `isa-debug-exit` with success.
//! `cargo xtask test` builds it and boots it under UEFI and BIOS; the README's "Using goheap as your kernel
//! heap" quotes it (the `ANCHOR` lines mark what it quotes; a test checks the quotes match).
//!
//! Needs (Cargo.toml): `bootloader_api = "=0.11.15"`, `goheap = { features = ["bootloader_api"] }`,
//! `x86_64 = { version = "0.15", default-features = false, features = ["instructions", "abi_x86_interrupt"] }`,
//! `log = "0.4"`; built with `-Zbuild-std=core,alloc` for `x86_64-unknown-none`.
#![no_std]
#![no_main]
#![feature(abi_x86_interrupt)]

extern crate alloc;

use alloc::{boxed::Box, collections::BTreeMap, string::String, vec::Vec};
use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::instructions::port::Port;
use x86_64::structures::idt::{InterruptDescriptorTable, InterruptStackFrame, PageFaultErrorCode};

// ANCHOR: config
use bootloader_api::config::{BootloaderConfig, Mapping};
use bootloader_api::{entry_point, BootInfo};

/// goheap reaches physical frames through the bootloader's mapping of all physical memory.
pub static BOOTLOADER_CONFIG: BootloaderConfig = {
    let mut config = BootloaderConfig::new_default();
    config.mappings.physical_memory = Some(Mapping::Dynamic);
    config
};
entry_point!(kernel_main, config = &BOOTLOADER_CONFIG);
// ANCHOR_END: config

// ANCHOR: heap
use goheap::x86_64::{IrqSingle, KernelHeap};

/// The heap's virtual window: level-4 entry 136, which the bootloader leaves free (`init` checks it).
const HEAP_START: u64 = 0x4444_0000_0000;
/// The most the heap may ever hold: address space only, frames are mapped as it grows.
const HEAP_MAX_BYTES: usize = 1 << 30;

#[global_allocator]
static HEAP: KernelHeap<IrqSingle> = KernelHeap::new(
    HEAP_START,
    HEAP_MAX_BYTES,
    // SAFETY: goheap runs on this one CPU only (interrupts off inside the allocator, cache index 0).
    unsafe { IrqSingle::new() },
    None, // one CPU: no TLB shoot-down hook
);
// ANCHOR_END: heap

/// COM1, polled. QEMU's UART needs no set-up; real hardware wants the 16550 programmed first.
struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for byte in s.bytes() {
            // SAFETY: COM1's line status and data ports; reading and writing them touches no memory.
            unsafe {
                while Port::<u8>::new(0x3FD).read() & 0x20 == 0 {}
                Port::<u8>::new(0x3F8).write(byte);
            }
        }
        Ok(())
    }
}

macro_rules! println {
    ($($arg:tt)*) => {{ let _ = writeln!(Serial, $($arg)*); }};
}

/// Log lines (goheap's reports, such as an allocation before `init`) go to the serial port.
struct SerialLog;

impl log::Log for SerialLog {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        println!("[{}] {}", record.level(), record.args());
    }
    fn flush(&self) {}
}

/// Ends the QEMU run through `-device isa-debug-exit,iobase=0xf4,iosize=0x04` (0x10: exit status 33).
fn exit_qemu(code: u32) -> ! {
    // SAFETY: QEMU's isa-debug-exit port; the write ends the virtual machine.
    unsafe { Port::<u32>::new(0xF4).write(code) };
    loop {
        x86_64::instructions::hlt();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PANIC: {info}");
    exit_qemu(0x11)
}

const TIMER_VECTOR: u8 = 32;
static TICKS: AtomicUsize = AtomicUsize::new(0);
static HANDLER_BYTES: AtomicUsize = AtomicUsize::new(0);

// ANCHOR: timer
/// The PIT's interrupt: allocates and frees on every tick. goheap keeps interrupts off inside the
/// allocator (`IrqSingle`), so the handler may interrupt the kernel in the middle of an allocation.
extern "x86-interrupt" fn timer(_frame: InterruptStackFrame) {
    let tick = TICKS.fetch_add(1, Ordering::Relaxed);
    let squares: Vec<usize> = (0..tick % 100 + 1).map(|i| i * i).collect();
    let name = alloc::format!("tick {tick}");
    HANDLER_BYTES.fetch_add(squares.len() * 8 + name.len(), Ordering::Relaxed);
    drop((squares, name));
    // SAFETY: end of interrupt to the master PIC.
    unsafe { Port::<u8>::new(0x20).write(0x20) };
}
// ANCHOR_END: timer

extern "x86-interrupt" fn page_fault(frame: InterruptStackFrame, code: PageFaultErrorCode) {
    let addr = x86_64::registers::control::Cr2::read_raw();
    panic!("page fault at {addr:#x} ({code:?}), {frame:?}");
}

/// The legacy 8259 PICs remapped to vectors 32..48 with only IRQ 0 (the PIT) unmasked, and the PIT's
/// channel 0 at about 1 kHz.
fn start_timer() {
    let pic = |port: u16, value: u8| {
        // SAFETY: the 8259 PICs' and the 8254 PIT's I/O ports; programming them touches no memory.
        unsafe { Port::<u8>::new(port).write(value) }
    };
    for (port, value) in [(0x20, 0x11), (0xA0, 0x11), (0x21, TIMER_VECTOR), (0xA1, TIMER_VECTOR + 8)] {
        pic(port, value); // ICW1 (initialise, ICW4 follows), ICW2 (vector offsets)
    }
    for (port, value) in [(0x21, 4), (0xA1, 2), (0x21, 1), (0xA1, 1), (0x21, 0xFE), (0xA1, 0xFF)] {
        pic(port, value); // ICW3 (cascade on IRQ 2), ICW4 (8086 mode), masks: IRQ 0 only
    }
    let divisor: u16 = 1193; // 1.193182 MHz / 1193 = 1 kHz
    for (port, value) in [(0x43, 0x34), (0x40, divisor as u8), (0x40, (divisor >> 8) as u8)] {
        pic(port, value); // channel 0, low then high byte, mode 2 (rate generator)
    }
}

fn kernel_main(boot_info: &'static mut BootInfo) -> ! {
    static LOGGER: SerialLog = SerialLog;
    let _ = log::set_logger(&LOGGER).map(|()| log::set_max_level(log::LevelFilter::Info));
    println!("minimal: booted");

    // Before `init`, an allocation returns null and goheap logs why (checked here; your kernel skips this).
    // SAFETY: a non-zero-size layout.
    assert!(unsafe { alloc::alloc::alloc(core::alloc::Layout::new::<u64>()) }.is_null());
    assert_eq!(HEAP.refused_before_init(), 1);

    // ANCHOR: init
    // SAFETY: the bootloader's BootInfo and page tables; called once, before anything allocates.
    unsafe { HEAP.init(boot_info) }.expect("kernel heap");
    // ANCHOR_END: init
    assert!(HEAP.is_ready());
    let frames = HEAP.frames().counts();
    println!("minimal: heap ready, {} MiB of {} MiB free", frames.free >> 8, frames.total >> 8);

    // The IDT lives on the heap: it must stay put while loaded.
    let idt: &'static mut InterruptDescriptorTable = Box::leak(Box::new(InterruptDescriptorTable::new()));
    idt.page_fault.set_handler_fn(page_fault);
    idt[TIMER_VECTOR].set_handler_fn(timer);
    idt.load();
    start_timer();
    x86_64::instructions::interrupts::enable();

    // Collections, while the timer interrupts (and allocates) at any point, also inside the allocator.
    let mut words: BTreeMap<String, usize> = BTreeMap::new();
    let mut rounds = 0;
    while TICKS.load(Ordering::Relaxed) < 200 {
        let mut v: Vec<u64> = (0..1000).collect();
        v.retain(|x| x % 3 != 0);
        let text: String = v.iter().take(50).map(|x| alloc::format!("w{} ", x % 7)).collect();
        for w in text.split_whitespace() {
            *words.entry(String::from(w)).or_insert(0) += 1;
        }
        assert_eq!(v.len(), 666);
        rounds += 1;
    }
    x86_64::instructions::interrupts::disable();
    assert_eq!(words.len(), 7);
    assert_eq!(words.values().sum::<usize>(), rounds * 50);

    // ANCHOR: idle
    // In the idle loop: return idle memory to the frame allocator, a bounded step at a time.
    HEAP.background(16, 1 << 20);
    // ANCHOR_END: idle

    let m = HEAP.mem_stats();
    println!(
        "minimal: {rounds} rounds, {} ticks, {} bytes allocated in the handler, {} objects live, {} frames committed",
        TICKS.load(Ordering::Relaxed),
        HANDLER_BYTES.load(Ordering::Relaxed),
        m.heap_objects,
        HEAP.source().committed_frames(),
    );
    println!("minimal: ok");
    exit_qemu(0x10)
}
