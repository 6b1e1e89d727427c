//! Helpers shared by the test kernels (`tests/*.rs`): the heap kernels (`heap_*.rs`, `smp_stress.rs`,
//! `scavenger_frames.rs`, `oom.rs`, `percpu_caches*.rs`) and the must-panic kernels. Their entry point and
//! panic handler come from [`test_kernel!`](crate::test_kernel); their random workloads use
//! `testkit::Rng`.
//!
//! - [`boot`]: serial console, goheap as the kernel heap, the BSP's CPU set-up and every AP, each AP
//!   parked in a loop that waits (halted) for work;
//! - [`run_on_all`]: runs one `fn(cpu_index, ncpus)` on every online CPU at once (the BSP too) and returns
//!   when all finished; [`barrier`] lines the CPUs up between phases of such a function;
//! - [`flush_all_caches`]: every CPU gives its goheap cache back (only the owner can flush a cache);
//! - [`MsgBuf`]: formats a message without the heap; [`expect_panic_containing`] and
//!   [`expect_bad_free_report`]: the panic judges of must-panic kernels.
//!
//! - [`reserve_mib_blocks`]: fills the heap with 1 MiB blocks until a reservation fails (the OOM kernels
//!   and the demo's OOM run).
//!
//! Nothing here allocates but [`reserve_mib_blocks`]: the tests count heap objects around it.

use crate::heap::HEAP;
use crate::percpu::PerCpu;
use crate::{apic, heap, smp, time};
use bootloader_api::BootInfo;
use core::sync::atomic::{AtomicUsize, Ordering};

/// The job of the current [`run_on_all`] (a `fn(usize, usize)` as usize) and its generation.
static JOB: AtomicUsize = AtomicUsize::new(0);
static GEN: AtomicUsize = AtomicUsize::new(0);
/// APs that finished the current job.
static DONE: AtomicUsize = AtomicUsize::new(0);
static BARRIER: smp::Barrier = smp::Barrier::new(1);
/// How long [`run_on_all`] waits for the APs (TCG on a loaded host is slow; a hang still ends).
const JOB_TIMEOUT_US: u64 = 150_000_000;

/// Boots a heap test kernel: `kernel_demo::init`, goheap as the kernel heap, the BSP's per-CPU set-up
/// (from here on every CPU uses its own goheap cache) and all APs. Returns the number of CPUs online.
pub fn boot(boot_info: &'static mut BootInfo) -> usize {
    crate::init();
    let boot_info: &'static BootInfo = boot_info;
    heap::init_goheap(boot_info);
    smp::init_bsp(boot_info).unwrap_or_else(|e| panic!("smp::init_bsp: {e:?}"));
    let n = smp::start_aps(ap_loop);
    assert_eq!(smp::ap_failures(), 0, "an AP failed to come up");
    BARRIER.set_parties(n);
    crate::serial_println!(
        "testing: goheap is the kernel heap; {n} CPU(s) online, cache indices {:?}",
        CpuList::online()
    );
    n
}

/// The online CPUs' indices, printable without allocating.
pub struct CpuList;

impl CpuList {
    fn online() -> Self {
        CpuList
    }
}

impl core::fmt::Debug for CpuList {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries((0..smp::MAX_CPUS).filter(|&i| smp::is_online(i))).finish()
    }
}

fn run_job(index: usize) {
    let job = JOB.load(Ordering::Acquire);
    // SAFETY: JOB only ever holds a `fn(usize, usize)` stored by `run_on_all` before it bumped GEN.
    let job: fn(usize, usize) = unsafe { core::mem::transmute::<usize, fn(usize, usize)>(job) };
    job(index, smp::online());
}

/// An AP's life: wait (halted, woken by the test IPI) for a new job generation, run it, report, repeat.
fn ap_loop(cpu: &'static PerCpu) -> ! {
    let mut seen = 0;
    loop {
        x86_64::instructions::interrupts::disable();
        let g = GEN.load(Ordering::Acquire);
        if g != seen {
            seen = g;
            run_job(cpu.index);
            DONE.fetch_add(1, Ordering::AcqRel);
        } else {
            // `sti; hlt`: an IPI sent after the load above still wakes us.
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}

/// Runs `job(cpu_index, ncpus)` on every online CPU at once (the BSP, index 0, included) and returns when
/// all finished. Panics if the APs do not finish within 150 s. Call on the BSP only.
pub fn run_on_all(job: fn(usize, usize)) {
    let aps = smp::online() - 1;
    BARRIER.set_parties(aps + 1);
    DONE.store(0, Ordering::Release);
    JOB.store(job as usize, Ordering::Release);
    GEN.fetch_add(1, Ordering::AcqRel);
    if aps > 0 {
        apic::send_fixed_all_but_self(apic::TEST_IPI_VECTOR);
    }
    run_job(0);
    let t0 = time::rdtsc();
    while DONE.load(Ordering::Acquire) < aps {
        assert!(
            time::us_since(t0) < JOB_TIMEOUT_US,
            "testing::run_on_all: only {} of {aps} APs finished",
            DONE.load(Ordering::Acquire)
        );
        core::hint::spin_loop();
    }
}

/// Waits until every CPU running the current [`run_on_all`] job reached this point.
pub fn barrier() {
    BARRIER.wait();
}

/// Every online CPU flushes its own goheap cache back to the central lists.
pub fn flush_all_caches() {
    run_on_all(|_, _| HEAP.flush_cpu_cache());
}

/// Pushes 1 MiB blocks (goheap's large-object path, through `try_reserve_exact`) into `blocks` until one
/// cannot be had or `blocks` is full; block `i` starts with the byte `i as u8`. `blocks` is never grown (its
/// capacity is the caller's bookkeeping, reserved before the heap runs dry). Returns whether a
/// reservation failed.
pub fn reserve_mib_blocks(blocks: &mut alloc::vec::Vec<alloc::vec::Vec<u8>>) -> bool {
    while blocks.len() < blocks.capacity() {
        let mut v = alloc::vec::Vec::new();
        if v.try_reserve_exact(1 << 20).is_err() {
            return true;
        }
        v.push(blocks.len() as u8);
        blocks.push(v);
    }
    false
}

/// A fixed buffer to format a message into without the heap (a panic handler's).
pub struct MsgBuf {
    bytes: [u8; 512],
    len: usize,
}

impl MsgBuf {
    /// An empty buffer.
    pub const fn new() -> Self {
        MsgBuf { bytes: [0; 512], len: 0 }
    }

    /// What was written (cut at 512 bytes, on a character boundary).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.bytes[..self.len]) {
            Ok(s) => s,
            Err(e) => core::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or(""),
        }
    }
}

impl Default for MsgBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl core::fmt::Write for MsgBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The panic judge of a must-panic kernel (see [`test_kernel!`](crate::test_kernel)): exits with success
/// only if the panic message contains every string of `wants`, else with failure, printing the message
/// either way. Formats without the heap (into a [`MsgBuf`]): the heap may be what panicked.
pub fn expect_panic_containing(info: &core::panic::PanicInfo, wants: &[&str]) -> ! {
    use core::fmt::Write;
    crate::serial::force_unlock();
    let mut buf = MsgBuf::new();
    let _ = write!(buf, "{}", info.message());
    let msg = buf.as_str();
    if wants.iter().all(|w| msg.contains(w)) {
        crate::serial_println!("[ok] ({msg})");
        crate::exit_qemu(crate::ExitCode::Success)
    }
    crate::serial_println!("[failed] unexpected panic: {msg} (wanted {wants:?})");
    crate::exit_qemu(crate::ExitCode::Failed)
}

/// The panic judge of a must-panic kernel that expects goheap's bad-free report: exits with success only
/// if the message names the address stored in `addr` (non-zero) followed by `reason`, e.g.
/// "goheap: invalid free of 0x...: double free".
pub fn expect_bad_free_report(info: &core::panic::PanicInfo, addr: usize, reason: &str) -> ! {
    use core::fmt::Write;
    let mut want = MsgBuf::new();
    let _ = write!(want, "goheap: invalid free of {addr:#x}: {reason}");
    if addr == 0 {
        crate::serial::force_unlock();
        crate::serial_println!("[failed] panicked before the bad free: {}", info.message());
        crate::exit_qemu(crate::ExitCode::Failed)
    }
    expect_panic_containing(info, &[want.as_str()])
}
