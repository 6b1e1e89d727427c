//! The serial console: a minimal 16550 UART driver on COM1 (I/O port 0x3F8).
//!
//! QEMU's `-serial stdio` connects COM1 to the terminal that ran `cargo xtask run`.

use core::fmt::{self, Write};
use spin::Mutex;
use x86_64::instructions::port::Port;

const COM1: u16 = 0x3F8;

/// One 16550 UART, driven by polling.
pub struct SerialPort {
    base: u16,
}

impl SerialPort {
    /// A port at I/O base `base`; call [`SerialPort::init`] before writing.
    pub const fn new(base: u16) -> Self {
        Self { base }
    }

    fn port(&self, offset: u16) -> Port<u8> {
        Port::new(self.base + offset)
    }

    /// 38400 baud, 8N1, FIFOs on, interrupts off.
    pub fn init(&mut self) {
        let settings: [(u16, u8); 7] = [
            (1, 0x00), // interrupt enable: none
            (3, 0x80), // line control: DLAB on, to set the divisor
            (0, 0x03), // divisor low byte: 115200 / 3 = 38400 baud
            (1, 0x00), // divisor high byte
            (3, 0x03), // line control: DLAB off, 8 bits, no parity, one stop bit
            (2, 0xC7), // FIFO control: enable, clear, 14-byte threshold
            (4, 0x0B), // modem control: DTR, RTS, OUT2
        ];
        for (offset, value) in settings {
            // SAFETY: COM1's registers are I/O ports owned by this driver; writing the standard 16550
            // set-up sequence has no effect on memory.
            unsafe { self.port(offset).write(value) };
        }
    }

    /// Sends one byte, waiting for the transmit holding register to empty.
    pub fn send(&mut self, byte: u8) {
        // SAFETY: reading the line status register (base + 5) only reports UART state.
        while unsafe { self.port(5).read() } & 0x20 == 0 {
            core::hint::spin_loop();
        }
        // SAFETY: the transmit register (base + 0) takes a byte to send; no memory is touched.
        unsafe { self.port(0).write(byte) };
    }
}

impl Write for SerialPort {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for byte in s.bytes() {
            if byte == b'\n' {
                self.send(b'\r');
            }
            self.send(byte);
        }
        Ok(())
    }
}

static SERIAL: Mutex<SerialPort> = Mutex::new(SerialPort::new(COM1));

/// Sets up COM1. Call once, first thing in the kernel.
pub fn init() {
    SERIAL.lock().init();
}

/// Used by the panic handler: a panic while the console lock is held must still be able to print.
pub fn force_unlock() {
    if SERIAL.is_locked() {
        // SAFETY: only called on the panic path, which never returns to the holder of the lock; at
        // worst two writers interleave their bytes on the UART.
        unsafe { SERIAL.force_unlock() };
    }
}

#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    // Console output must not be lost to formatting errors; there is nowhere to report them anyway.
    // Interrupts stay off while the lock is held: an interrupt handler that prints on the same CPU would
    // otherwise spin on it forever. One call prints one whole line, so CPUs never interleave mid-line.
    x86_64::instructions::interrupts::without_interrupts(|| {
        let _ = SERIAL.lock().write_fmt(args);
    });
}

/// Prints to the serial console.
#[macro_export]
macro_rules! serial_print {
    ($($arg:tt)*) => ($crate::serial::_print(format_args!($($arg)*)));
}

/// Prints to the serial console, with a newline.
#[macro_export]
macro_rules! serial_println {
    () => ($crate::serial_print!("\n"));
    ($($arg:tt)*) => ($crate::serial_print!("{}\n", format_args!($($arg)*)));
}
