//! A soft memory limit below the live heap: what allocation-path scavenging costs (issue 11).
//!
//! `cargo run --release --example limit_churn --features std`
//!
//! Keeps about 64 MiB live (objects of 1 KiB to 128 KiB, a fifth of them large) and replaces one random
//! object by a new one of a random size 400 000 times, once without a limit and once with a 32 MiB limit
//! (half the live heap). Prints the time and the bytes decommitted on the allocation path and in all. With
//! the limit's backoff, the limited run decommits a bounded amount instead of decommitting and committing
//! again on every allocation.
use goheap::cpu::ThreadSlots;
use goheap::source::mmap::MmapSource;
use goheap::Malloc;
use std::alloc::Layout;
use std::time::Instant;

const LIVE_BYTES: usize = 64 << 20;
const STEPS: usize = 400_000;

fn run(limit: Option<usize>) {
    let m = Box::new(Malloc::with_max_bytes(MmapSource::new(), ThreadSlots::new(), 1 << 32));
    if let Some(l) = limit {
        m.set_memory_limit(l);
    }
    let size = |r: u64| -> usize {
        if r % 5 == 0 {
            (32 << 10) + (r as usize >> 8) % (96 << 10) // large: 32..128 KiB
        } else {
            1024 + (r as usize >> 8) % (7 << 10) // small: 1..8 KiB
        }
    };
    let mut live: Vec<(*mut u8, usize)> = Vec::new();
    let mut bytes = 0;
    let mut seed = 1u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        seed >> 11
    };
    while bytes < LIVE_BYTES {
        let s = size(next());
        let p = m.alloc(Layout::from_size_align(s, 8).unwrap());
        assert!(!p.is_null());
        live.push((p, s));
        bytes += s;
    }
    let before = m.heap().stats();
    let cpu0 = cpu_times();
    let t = Instant::now();
    for _ in 0..STEPS {
        let i = next() as usize % live.len();
        let (p, s) = live[i];
        // SAFETY: allocated above with this layout, freed once.
        unsafe { m.dealloc(p, Layout::from_size_align(s, 8).unwrap()) };
        let s = size(next());
        let p = m.alloc(Layout::from_size_align(s, 8).unwrap());
        assert!(!p.is_null());
        // SAFETY: fresh allocation of `s` bytes (touch it, as a program would).
        unsafe { p.write_bytes(0x5A, s.min(4096)) };
        live[i] = (p, s);
    }
    let el = t.elapsed();
    let cpu1 = cpu_times();
    let st = m.heap().stats();
    println!(
        "limit {:>8}: {} steps in {:>7.1} ms (CPU: user {:>6.1} ms, sys {:>6.1} ms); decommitted on the allocation path {:>8} KiB, in all {:>8} KiB; committed at the end {} KiB",
        limit.map_or("none".into(), |l| format!("{} MiB", l >> 20)),
        STEPS,
        el.as_secs_f64() * 1e3,
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        (st.scavenged_alloc_bytes - before.scavenged_alloc_bytes) >> 10,
        (st.scavenged_total_bytes - before.scavenged_total_bytes) >> 10,
        st.total_bytes >> 10,
    );
    for (p, s) in live {
        // SAFETY: allocated above with this layout, freed once.
        unsafe { m.dealloc(p, Layout::from_size_align(s, 8).unwrap()) };
    }
}

/// This process's (user, system) CPU time in milliseconds (wall time is noisy on a loaded machine).
fn cpu_times() -> (f64, f64) {
    // SAFETY: `getrusage` fills the zeroed struct we pass.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    (ms(ru.ru_utime), ms(ru.ru_stime))
}

fn main() {
    run(None);
    run(Some(32 << 20));
}
