//! Leaving QEMU: the `isa-debug-exit` device at I/O port 0xF4.
//!
//! `cargo xtask` starts QEMU with `-device isa-debug-exit,iobase=0xf4,iosize=0x04`. Writing `code` there
//! ends QEMU with status `(code << 1) | 1`: 0x10 gives 33 (success), 0x11 gives 35 (failure).

use x86_64::instructions::port::Port;

/// What the kernel reports to `cargo xtask`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ExitCode {
    /// QEMU exits with 33; `cargo xtask` reports success.
    Success = 0x10,
    /// QEMU exits with 35; `cargo xtask` reports a kernel failure.
    Failed = 0x11,
}

/// Ends the QEMU run with `code`. Outside QEMU (no debug-exit device) it halts forever.
pub fn exit_qemu(code: ExitCode) -> ! {
    // SAFETY: port 0xF4 is QEMU's isa-debug-exit device; the write ends the virtual machine. On hardware
    // without the device the write goes nowhere.
    unsafe { Port::<u32>::new(0xF4).write(code as u32) };
    hlt_loop()
}

/// Halts the CPU forever (wakes on interrupts only to halt again).
pub fn hlt_loop() -> ! {
    loop {
        x86_64::instructions::hlt();
    }
}
