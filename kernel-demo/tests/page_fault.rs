//! Test kernel (`harness = false`): the page-fault handler. Writes to an unmapped address after
//! `smp::init_bsp` loaded the IDT; passes if the panic message names the faulting address (from CR2) and
//! the access ("write", kernel mode, page not present). Reaching the end, or another panic, fails.
//!
//! xtask: smp=1 timeout=60
#![no_std]
#![no_main]

use bootloader_api::{entry_point, BootInfo};
use core::fmt::Write;
use core::panic::PanicInfo;
use kernel_demo::{exit_qemu, serial_println, smp, ExitCode};

entry_point!(main, config = &kernel_demo::BOOTLOADER_CONFIG);

const BAD_ADDR: u64 = 0xdead_b000;

fn main(boot_info: &'static mut BootInfo) -> ! {
    kernel_demo::init();
    smp::init_bsp(boot_info).expect("smp::init_bsp");
    kernel_demo::serial_print!("page_fault::write_to_unmapped_page...\t");
    // SAFETY: deliberately faulting: the address is not mapped, and the page-fault handler panics.
    unsafe { core::ptr::write_volatile(BAD_ADDR as *mut u64, 1) };
    serial_println!("[failed: no page fault]");
    exit_qemu(ExitCode::Failed)
}

/// A fixed buffer to format the panic message into (no heap in a panic).
struct Buf {
    bytes: [u8; 512],
    len: usize,
}

impl Write for Buf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    kernel_demo::serial::force_unlock();
    let mut buf = Buf { bytes: [0; 512], len: 0 };
    let _ = write!(buf, "{}", info.message());
    let msg = core::str::from_utf8(&buf.bytes[..buf.len]).unwrap_or("");
    let want = ["page fault at address 0xdeadb000", "write", "kernel mode", "page not present"];
    if want.iter().all(|w| msg.contains(w)) {
        serial_println!("[ok] ({msg})");
        exit_qemu(ExitCode::Success)
    }
    serial_println!("[failed] unexpected panic: {msg}");
    exit_qemu(ExitCode::Failed)
}
