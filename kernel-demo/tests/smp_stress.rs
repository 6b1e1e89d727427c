//! Test kernel: all 4 CPUs allocate, fill, verify and free at once, and hand objects to each other.
//!
//! Each CPU runs `OPS` steps: allocate an object (mostly 8 B..2 KiB, some up to 64 KiB), fill it whole
//! with a pattern derived from its tag (CPU and sequence number), then either keep it in a small local
//! pool (replacing, verifying and freeing an older one) or push it on a shared queue; every step also
//! pops one object from the queue (mostly another CPU's), verifies it whole and frees it there.
//!
//! Checks: every object's contents survive until its free (on whichever CPU); afterwards the heap's
//! live-object count (`mem_stats().live_objects()`) is back at its start value, every CPU took objects from
//! others, and each online CPU's cache counted at least the objects that CPU allocated
//! (`cpu_stats(index).mallocs`). Then the CPUs hand their caches back one at a time, CPU 0 first, while
//! the later ones still cache their spans: the freed objects a CPU holds from another CPU's cached span
//! reach that span as deferred (remote) frees, so `remote_frees > 0`. (Frees first stay in the freeing
//! CPU's stock, which grows with use, so a short run may never flush one on its own.)
//!
//! xtask: smp=4 timeout=300 firmware=both
#![no_std]
#![no_main]
#![feature(custom_test_frameworks)]
#![test_runner(kernel_demo::test_runner)]
#![reexport_test_harness_main = "test_main"]

extern crate alloc;

use alloc::alloc::{alloc, dealloc, Layout};
use core::sync::atomic::{AtomicU64, Ordering};
use kernel_demo::heap::HEAP;
use kernel_demo::smp::{self, MAX_CPUS};
use kernel_demo::testing;
use kernel_demo::{serial_println, time};
use testkit::Rng;

kernel_demo::test_kernel!(cpus = 4);

const OPS: usize = 3000;
const POOL: usize = 32;
const QUEUE: usize = 1024;

/// An object in flight: address, size, tag (CPU index << 32 | sequence number).
#[derive(Clone, Copy)]
struct Obj {
    addr: usize,
    size: usize,
    tag: u64,
}

/// The shared queue: a fixed ring (no allocation of its own) under a spin lock.
struct Ring {
    items: [Obj; QUEUE],
    head: usize,
    len: usize,
}

static QUEUE_LOCK: spin::Mutex<Ring> =
    spin::Mutex::new(Ring { items: [Obj { addr: 0, size: 0, tag: 0 }; QUEUE], head: 0, len: 0 });

static ALLOCS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static CROSS_FREES: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static VERIFIED: AtomicU64 = AtomicU64::new(0);

fn word(tag: u64, i: usize) -> u64 {
    (tag ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).rotate_left(i as u32 & 63)
}

fn make(rng: &mut Rng, cpu: usize, seq: u64) -> Obj {
    let size = match rng.below(100) {
        0..85 => 8 + rng.below(2040) as usize,
        85..98 => 2048 + rng.below(14 << 10) as usize,
        _ => (16 << 10) + rng.below(48 << 10) as usize,
    } & !7;
    let tag = (cpu as u64) << 32 | seq;
    // SAFETY: non-zero size, valid alignment.
    let p = unsafe { alloc(Layout::from_size_align_unchecked(size, 8)) };
    assert!(!p.is_null(), "CPU {cpu}: allocation of {size} B failed");
    // SAFETY: `p` is a fresh 8-aligned allocation of `size` bytes (a multiple of 8).
    let words = unsafe { core::slice::from_raw_parts_mut(p.cast::<u64>(), size / 8) };
    for (i, w) in words.iter_mut().enumerate() {
        *w = word(tag, i);
    }
    ALLOCS[cpu].fetch_add(1, Ordering::Relaxed);
    Obj { addr: p as usize, size, tag }
}

fn verify_and_free(o: Obj, cpu: usize) {
    // SAFETY: `o` is a live allocation of `o.size` bytes filled by `make`, owned by the caller now.
    let words = unsafe { core::slice::from_raw_parts(o.addr as *const u64, o.size / 8) };
    for (i, &w) in words.iter().enumerate() {
        if w != word(o.tag, i) {
            panic!(
                "CPU {cpu}: object {:#x} ({} B) from CPU {} #{}: word {i} is {w:#x}, want {:#x}",
                o.addr,
                o.size,
                o.tag >> 32,
                o.tag & 0xFFFF_FFFF,
                word(o.tag, i)
            );
        }
    }
    if (o.tag >> 32) as usize != cpu {
        CROSS_FREES[cpu].fetch_add(1, Ordering::Relaxed);
    }
    VERIFIED.fetch_add(1, Ordering::Relaxed);
    // SAFETY: allocated by `make` with (size, 8), freed once (the object left the pool/queue).
    unsafe { dealloc(o.addr as *mut u8, Layout::from_size_align_unchecked(o.size, 8)) };
}

fn stress(cpu: usize, _n: usize) {
    let mut rng = Rng::new(0x5EED + cpu as u64);
    let mut pool: [Option<Obj>; POOL] = [None; POOL];
    testing::barrier();
    for seq in 0..OPS as u64 {
        let o = make(&mut rng, cpu, seq);
        if rng.below(2) == 0 {
            let spill = {
                let mut q = QUEUE_LOCK.lock();
                if q.len < QUEUE {
                    let at = (q.head + q.len) % QUEUE;
                    q.items[at] = o;
                    q.len += 1;
                    None
                } else {
                    Some(o)
                }
            };
            if let Some(o) = spill {
                verify_and_free(o, cpu);
            }
        } else {
            let slot = rng.below(POOL as u64) as usize;
            if let Some(old) = pool[slot].replace(o) {
                verify_and_free(old, cpu);
            }
        }
        // Take one from the queue, preferring another CPU's object (skip ours when it is at the head).
        let taken = {
            let mut q = QUEUE_LOCK.lock();
            if q.len > 0 && ((q.items[q.head].tag >> 32) as usize != cpu || q.len > QUEUE / 2) {
                let o = q.items[q.head];
                q.head = (q.head + 1) % QUEUE;
                q.len -= 1;
                Some(o)
            } else {
                None
            }
        };
        if let Some(o) = taken {
            verify_and_free(o, cpu);
        }
    }
    for o in pool.iter_mut().filter_map(Option::take) {
        verify_and_free(o, cpu);
    }
    testing::barrier();
    if cpu == 0 {
        let mut q = QUEUE_LOCK.lock();
        while q.len > 0 {
            let o = q.items[q.head];
            q.head = (q.head + 1) % QUEUE;
            q.len -= 1;
            verify_and_free(o, cpu);
        }
    }
}

/// Whose turn it is to flush (see [`flush_in_turn`]).
static TURN: AtomicU64 = AtomicU64::new(0);

/// Hands this CPU's cache back once every lower-numbered CPU has.
fn flush_in_turn(cpu: usize, _n: usize) {
    while TURN.load(Ordering::Acquire) != cpu as u64 {
        core::hint::spin_loop();
    }
    HEAP.flush_cpu_cache();
    TURN.store(cpu as u64 + 1, Ordering::Release);
}

#[test_case]
fn four_cpus_allocate_and_free_across_cpus() {
    let n = smp::online();
    let before = HEAP.mem_stats();
    let mallocs_before: [u64; MAX_CPUS] = core::array::from_fn(|i| HEAP.cpu_stats(i).mallocs);
    let t0 = time::rdtsc();
    testing::run_on_all(stress);
    let ms = time::us_since(t0) / 1000;
    testing::run_on_all(flush_in_turn);
    let after = HEAP.mem_stats();
    let remote = after.remote_frees - before.remote_frees;
    serial_println!(
        "  {} objects verified and freed in {ms} ms; remote frees {remote}; cross-CPU frees per CPU {:?}",
        VERIFIED.load(Ordering::Relaxed),
        core::array::from_fn::<u64, 4, _>(|i| CROSS_FREES[i].load(Ordering::Relaxed))
    );
    assert_eq!(VERIFIED.load(Ordering::Relaxed), (n * OPS) as u64, "every object verified and freed once");
    assert_eq!(after.live_objects(), before.live_objects(), "live objects not back at the start value");
    assert!(remote > 0, "no remote frees: objects freed on another CPU than the one caching their span");
    for i in 0..n {
        assert!(smp::is_online(i));
        let made = ALLOCS[i].load(Ordering::Relaxed);
        let counted = HEAP.cpu_stats(i).mallocs - mallocs_before[i];
        assert!(counted >= made, "CPU {i} allocated {made} objects but its cache counted {counted}");
        assert!(CROSS_FREES[i].load(Ordering::Relaxed) > 0, "CPU {i} freed no other CPU's object");
    }
}
