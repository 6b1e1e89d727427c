//! Delays and clocks: the PIT's channel 2 as a reference, and the TSC calibrated against it.
//!
//! The legacy PIT (8253/8254, 1.193182 MHz) is present on QEMU's `pc` machine under both firmwares. Its
//! channel 2 is the speaker timer: its gate is bit 0 of port 0x61 and its output can be read back in
//! bit 5 of the same port, so a delay needs no interrupt. Being one device, it is used under a lock and
//! mainly on the BSP during boot (AP start-up, LAPIC timer and TSC calibration); once [`calibrate_tsc`]
//! ran, [`delay_us`] uses the TSC, which every CPU can read at once.

use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;
use x86_64::instructions::port::Port;

/// PIT input clock, Hz.
pub const PIT_HZ: u64 = 1_193_182;

/// Serialises the PIT (one device for all CPUs).
static PIT: Mutex<()> = Mutex::new(());

/// TSC ticks per millisecond, 0 until [`calibrate_tsc`] ran.
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);

/// Reads the time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter; CR4.TSD is clear in ring 0 anyway.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Waits `ticks` PIT ticks (at most 65535, about 54.9 ms) by polling channel 2's output.
fn pit_wait_ticks(ticks: u16) {
    let _pit = PIT.lock();
    let mut gate: Port<u8> = Port::new(0x61);
    let mut command: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // SAFETY: ports 0x61 (speaker/gate control), 0x43 (PIT mode) and 0x42 (channel 2 count) belong to
    // the PIT and the speaker, which nothing else in the kernel drives; the PIT lock serialises users.
    // Channel 2 in mode 0 (interrupt on terminal count): its output goes high when the count reaches 0.
    unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // speaker data off, channel 2 gate on
        command.write(0b1011_0000); // channel 2, lobyte/hibyte, mode 0, binary
        ch2.write((ticks & 0xFF) as u8);
        ch2.write((ticks >> 8) as u8); // writing the count starts the countdown
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
    }
}

/// Busy-waits `us` microseconds on the PIT (any length; chunks of up to 50 ms).
pub fn pit_delay_us(us: u64) {
    let mut ticks = (us * PIT_HZ).div_ceil(1_000_000);
    while ticks > 0 {
        let chunk = ticks.min(59_659); // 50 ms
        pit_wait_ticks(chunk.max(1) as u16);
        ticks -= chunk;
    }
}

/// Measures the TSC rate against the PIT (20 ms) and remembers it; returns TSC ticks per millisecond.
pub fn calibrate_tsc() -> u64 {
    let t0 = rdtsc();
    pit_delay_us(20_000);
    let per_ms = ((rdtsc() - t0) / 20).max(1);
    TSC_PER_MS.store(per_ms, Ordering::Relaxed);
    per_ms
}

/// TSC ticks per millisecond, if [`calibrate_tsc`] ran.
pub fn tsc_per_ms() -> Option<u64> {
    match TSC_PER_MS.load(Ordering::Relaxed) {
        0 => None,
        v => Some(v),
    }
}

/// Busy-waits `us` microseconds: on the TSC once calibrated (any CPU, no lock), else on the PIT.
pub fn delay_us(us: u64) {
    match tsc_per_ms() {
        Some(per_ms) => {
            let start = rdtsc();
            let wait = us.saturating_mul(per_ms) / 1000;
            while rdtsc().wrapping_sub(start) < wait {
                core::hint::spin_loop();
            }
        }
        None => pit_delay_us(us),
    }
}

/// Microseconds since the TSC read `since` (needs [`calibrate_tsc`]; 0 before).
pub fn us_since(since: u64) -> u64 {
    tsc_per_ms().map_or(0, |per_ms| rdtsc().wrapping_sub(since) * 1000 / per_ms)
}
