//! goheap's background work (its sweeper and scavenger), run by every CPU when it has nothing else to do.
//!
//! goheap starts no threads: a kernel calls [`goheap::Malloc::background`] now and then on each CPU. It
//! folds frees other CPUs deferred to this CPU's spans, returns empty spans to the page heap and lets the
//! scavenger give a bounded number of bytes back to the frame allocator. goheap's interrupt contract would
//! allow calling it from the timer handler (it runs inside `IrqCpus`' guard, interrupts off), but a step
//! then adds to interrupt latency and [`step`] prints on the serial console, so the split here is
//!
//! - [`tick`] (for a periodic timer interrupt): marks background work due on this CPU: one atomic store,
//!   no lock, no allocation;
//! - [`idle_step`] (for the idle loop, interrupts allowed, no lock held): runs one [`step`] if one is due.
//!
//! [`step`] prints one line when a step released memory; with `HEAP.set_scavtrace(true)` (off by default)
//! goheap also logs Go's scavtrace line (`scav ... KiB work (bg), ... KiB work (eager), ... KiB now, ...%
//! util`) at the end of each scavenger epoch with work through the `log` facade, which [`init_logger`]
//! routes to the serial console.

use crate::heap::{self, HEAP};
use crate::serial_println;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use goheap::cpu::MAX_CPUS;
use goheap::malloc::BackgroundReport;

/// Empty spans returned per size class per step.
pub const MAX_SPANS: usize = 4;
/// Bytes the scavenger may give back per step: small, so a step stays short.
pub const SCAVENGE_BUDGET: usize = 256 << 10;

/// [`step`] prints a line each time the bytes released by all steps cross a multiple of this.
const LINE_EVERY: usize = 4 << 20;

static DUE: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static STEPS: AtomicUsize = AtomicUsize::new(0);
static RELEASED: AtomicUsize = AtomicUsize::new(0);
/// Print a line for every step that releases memory (the demo turns it off around measurements).
static VERBOSE: AtomicBool = AtomicBool::new(true);

/// From a timer interrupt: background work is due on this CPU. Interrupt-safe (one atomic store).
#[inline]
pub fn tick() {
    if let Some(i) = heap::current_cpu_index() {
        if let Some(d) = DUE.get(i) {
            d.store(true, Ordering::Relaxed);
        }
    }
}

/// From the idle loop: runs one [`step`] if [`tick`] marked one due on this CPU.
pub fn idle_step() -> Option<BackgroundReport> {
    let i = heap::current_cpu_index()?;
    if DUE.get(i)?.swap(false, Ordering::Relaxed) {
        step()
    } else {
        None
    }
}

/// One background step on this CPU now (not from an interrupt handler). `None` before goheap is ready.
pub fn step() -> Option<BackgroundReport> {
    if !heap::goheap_ready() {
        return None;
    }
    // Tagged for the interrupt-latency figures (`irqlat`; nothing without its feature).
    let was = crate::irqlat::kind();
    crate::irqlat::set_kind(crate::irqlat::Kind::Background);
    let rep = HEAP.background(MAX_SPANS, SCAVENGE_BUDGET);
    crate::irqlat::set_kind(was);
    STEPS.fetch_add(1, Ordering::Relaxed);
    if rep.nbytes_released > 0 {
        let before = RELEASED.fetch_add(rep.nbytes_released, Ordering::Relaxed);
        // One line per 4 MiB released (on all CPUs together), not one per step.
        let crossed = (before + rep.nbytes_released) / LINE_EVERY != before / LINE_EVERY;
        if crossed && VERBOSE.load(Ordering::Relaxed) {
            serial_println!(
                "bg: cache {:?}: step released {} KiB (folded {} frees, swept {} pages); {} KiB released by background steps so far; heap holds {} frames",
                heap::current_cpu_index(),
                rep.nbytes_released >> 10,
                rep.nfolded,
                rep.npages_swept,
                (before + rep.nbytes_released) >> 10,
                heap::committed_frames()
            );
        }
    }
    Some(rep)
}

/// Makes every CPU's LAPIC timer tick call [`tick`] (the cheap, interrupt-safe half).
pub fn install_tick() {
    crate::apic::set_tick_handler(Some(tick));
}

/// Whether [`step`] prints a line when it releases memory.
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

/// Background steps run so far and bytes they released, on all CPUs.
pub fn totals() -> (usize, usize) {
    (STEPS.load(Ordering::Relaxed), RELEASED.load(Ordering::Relaxed))
}

/// Period of the LAPIC timer that [`idle_loop`] starts: how often an idle CPU does background work.
pub const TICK_PERIOD_US: u64 = 10_000;

/// The idle loop of a CPU with nothing else to do: starts this CPU's LAPIC timer (its tick calls [`tick`],
/// see [`install_tick`]), then does background work when a tick asked for it and `hlt`s until the next
/// interrupt (a timer tick or an NMI shoot-down).
pub fn idle_loop() -> ! {
    if crate::apic::timer_ticks_per_ms().is_some() {
        crate::apic::start_timer(TICK_PERIOD_US);
    }
    x86_64::instructions::interrupts::enable();
    loop {
        idle_step();
        x86_64::instructions::hlt();
    }
}

/// Prints `log` records (goheap's scavtrace lines) on the serial console. Allocates nothing.
struct SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            serial_println!("[{}] {}", record.target(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: SerialLogger = SerialLogger;

/// Routes the `log` facade (goheap's scavtrace lines) to the serial console. Later calls do nothing.
pub fn init_logger() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
}
